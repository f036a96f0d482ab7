"""Using the fine-tuned model at once: after real jobs on the tiny model (server + worker + prepare + trainer), the
unchanged `openai` SDK chats with the fine-tuned models (plain and streamed), through the real inference process
the server starts; concurrent requests over three fine-tuned models of one base load that base once; the models
API tells the truth and deletes; a merged export answers as the adapter does."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from tests.conftest import Server
from tuneyard.demo.tiny import CAPITALS, write_sample_jsonl

pytestmark = pytest.mark.slow
LEARN = {"n_epochs": 25, "batch_size": 4, "learning_rate": 5e-3, "lora_r": 16, "lora_alpha": 32}
ASKED = CAPITALS[:4]


def question(country: str) -> list[dict]:
    return [{"role": "system", "content": "You answer in one word."},
            {"role": "user", "content": f"What is the capital of {country}?"}]


@pytest.fixture(scope="module")
def srv(tmp_path_factory, tiny_model_dir):
    home = tmp_path_factory.mktemp("infer-e2e")
    base = home / "local" / "tiny-llama"
    s = Server(home, {"TUNEYARD_BASE_MODELS": str(base), "TUNEYARD_RATE_LIMIT_PER_SECOND": "0"})
    shutil.copytree(tiny_model_dir, base)
    s.model_dir = str(base)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(srv):
    return srv.openai(srv.key("acme"))


def _wait(client, job_id: str, timeout: float = 600):
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.5)
    raise AssertionError(f"{job_id} still {job.status}")


@pytest.fixture(scope="module")
def jobs(srv, client, tmp_path_factory):
    """Three succeeded jobs of one base: the first learns the demo's answers, the other two train briefly."""
    f = client.files.create(file=write_sample_jsonl(tmp_path_factory.mktemp("d") / "t.jsonl").open("rb"),
                            purpose="fine-tune")
    learned = client.fine_tuning.jobs.create(
        model=srv.model_dir, training_file=f.id, suffix="learned", seed=11,
        method={"type": "supervised", "supervised": {"hyperparameters": LEARN}})
    brief = [client.fine_tuning.jobs.create(model=srv.model_dir, training_file=f.id, suffix=f"brief{i}", seed=i,
                                            hyperparameters={"n_epochs": 1, "batch_size": 4})
             for i in range(2)]
    done = [_wait(client, j.id) for j in (learned, *brief)]
    assert all(j.status == "succeeded" for j in done), [j.error for j in done]
    return done


def answer(client, model: str, country: str, **kw) -> str:
    r = client.chat.completions.create(model=model, messages=question(country), max_tokens=6, temperature=0, **kw)
    return r.choices[0].message.content


def test_concurrent_requests_over_three_models_load_the_base_once(srv, client, jobs):
    # First inference of this server: the inference process starts and loads the base while the API answers.
    models = [j.fine_tuned_model for j in jobs]
    results: list[object] = []

    def ask(i: int) -> None:
        try:
            results.append(answer(client, models[i % 3], ASKED[i % len(ASKED)][0]))
        except Exception as e:  # noqa: BLE001 - reported below
            results.append(e)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    latencies = []
    while any(t.is_alive() for t in threads):
        t0 = time.perf_counter()
        client.fine_tuning.jobs.retrieve(jobs[0].id)
        latencies.append(time.perf_counter() - t0)
        time.sleep(0.05)
    for t in threads:
        t.join()
    assert len(results) == 16 and all(isinstance(r, str) for r in results), results
    latencies.sort()
    print(f"retrieve during inference: median {latencies[len(latencies) // 2] * 1000:.0f} ms, "
          f"max {latencies[-1] * 1000:.0f} ms over {len(latencies)}")
    assert latencies[len(latencies) // 2] < 0.1 and latencies[-1] < 1.0, latencies
    cache = httpx.get(f"{srv.base_url}/healthz").json()["inference"]["cache"]
    assert cache["base_loads"] == {srv.model_dir: 1}
    assert sorted(cache["adapter_loads"].values()) == [1, 1, 1]


def test_fine_tuned_model_gives_the_trained_answers_and_the_base_does_not(srv, client, jobs):
    model = jobs[0].fine_tuned_model
    for country, capital in ASKED:
        assert answer(client, model, country).startswith(capital), country
        stream = client.chat.completions.create(model=model, messages=question(country), max_tokens=6,
                                                temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices).startswith(capital)
    assert not any(answer(client, srv.model_dir, c).startswith(cap) for c, cap in ASKED)
    from llama_stack_client import LlamaStackClient

    ls = LlamaStackClient(base_url=srv.base_url, api_key=client.api_key, max_retries=0)
    country, capital = ASKED[1]
    r = ls.inference.chat_completion(model_id=model, messages=question(country),
                                     sampling_params={"strategy": {"type": "greedy"}, "max_tokens": 6})
    assert r.completion_message.content.startswith(capital)


def test_a_checkpoint_is_callable_and_downloads(srv, client, jobs, tmp_path):
    import io
    import tarfile

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    (ck, *_) = client.fine_tuning.jobs.checkpoints.list(jobs[0].id)
    country, capital = ASKED[0]
    assert answer(client, ck.fine_tuned_model_checkpoint, country).startswith(capital)
    r = httpx.get(f"{srv.base_url}/v1/fine_tuning/jobs/{jobs[0].id}/checkpoints/{ck.id}/content",
                  headers={"Authorization": f"Bearer {client.api_key}"}, timeout=60)
    assert r.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(r.content)) as tar:
        tar.extractall(tmp_path, filter="data")
    got = tmp_path / ck.id
    assert (got / "adapter_model.safetensors").exists() and not (got / "optimizer.pt").exists()
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(srv.model_dir), str(got))


def test_another_organisation_gets_404(srv, client, jobs):
    other = srv.openai(srv.key("globex"))
    with pytest.raises(openai.NotFoundError):
        answer(other, jobs[0].fine_tuned_model, "Japan")
    with pytest.raises(openai.NotFoundError):
        other.models.delete(jobs[0].fine_tuned_model)
    assert jobs[0].fine_tuned_model not in {m.id for m in other.models.list()}


def test_merged_export_answers_as_the_adapter_does(srv, client, jobs, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    job = jobs[0]
    out = tmp_path / "merged"
    subprocess.run([sys.executable, "-m", "tuneyard.cli", "export", job.id, "--merged", "--out", str(out),
                    "--base-url", srv.base_url, "--api-key", client.api_key], env=srv.env, check=True,
                   capture_output=True, timeout=300)
    assert (out / "model.safetensors").exists() and not (out / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(str(out))
    tok = AutoTokenizer.from_pretrained(str(out))
    for country, capital in ASKED:
        enc = tok.apply_chat_template(question(country), add_generation_prompt=True, return_tensors="pt",
                                      return_dict=True)
        with torch.no_grad():
            ids = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        merged = tok.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        assert merged == answer(client, job.fine_tuned_model, country) and merged.startswith(capital)


def test_models_list_and_delete(srv, client, jobs, tmp_path_factory):
    train = client.files.list(purpose="fine-tune").data[0].id
    failed = client.fine_tuning.jobs.create(model="gpt-4o-mini", training_file=train)
    assert _wait(client, failed.id).status == "failed"
    listed = {m.id for m in client.models.list()}
    assert {j.fine_tuned_model for j in jobs} | {srv.model_dir} <= listed and "gpt-4o-mini" not in listed
    gone = jobs[2]
    out = srv.home / "jobs" / "acme" / gone.id / "output"
    assert out.exists() and answer(client, gone.fine_tuned_model, "Japan") is not None
    deleted = client.models.delete(gone.fine_tuned_model)
    assert (deleted.id, deleted.object, deleted.deleted) == (gone.fine_tuned_model, "model", True)
    assert gone.fine_tuned_model not in {m.id for m in client.models.list()}
    for call in (lambda: answer(client, gone.fine_tuned_model, "Japan"),
                 lambda: client.models.retrieve(gone.fine_tuned_model),
                 lambda: client.models.delete(gone.fine_tuned_model)):
        with pytest.raises(openai.NotFoundError):
            call()
    assert not out.exists() and not (out.parent / "checkpoints").exists()
    job = client.fine_tuning.jobs.retrieve(gone.id)
    assert job.status == "succeeded" and job.fine_tuned_model == gone.fine_tuned_model
    auth = {"Authorization": f"Bearer {client.api_key}"}
    r = httpx.get(f"{srv.base_url}/v1/fine_tuning/jobs/{gone.id}/artifacts", headers=auth)
    assert r.status_code == 404
    (ck, *_) = client.fine_tuning.jobs.checkpoints.list(gone.id)  # still listed with the job
    r = httpx.get(f"{srv.base_url}/v1/fine_tuning/jobs/{gone.id}/checkpoints/{ck.id}/content", headers=auth)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_deleted"
    assert answer(client, jobs[1].fine_tuned_model, "Japan") is not None  # the others are untouched
