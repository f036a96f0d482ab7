"""What the API does with a trained model, after one real short job on the tiny model: Llama Stack's
inference.chat_completion on a checkpoint by its own identifier; the API form of export (POST
/v1/fine_tuning/jobs/{id}/export): the adapter and the merged model as exports that download and load, and a Hub
push refused clearly (nothing pushed, nothing kept) when the Hub cannot be reached, through the API and through
`tuneyard export --push-to-hub`. The Hub is made unreachable for real: HF_ENDPOINT names a loopback port nothing
listens on."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import tarfile
import time

import httpx
import pytest

from tests.conftest import Server, free_port
from tuneyard.demo.tiny import write_sample_jsonl

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def srv(tmp_path_factory, tiny_model_dir):
    home = tmp_path_factory.mktemp("export-home")
    base = home / "local" / "tiny-llama"
    s = Server(home, {"TUNEYARD_BASE_MODELS": str(base), "TUNEYARD_RATE_LIMIT_PER_SECOND": "0",
                      "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}", "HF_HUB_OFFLINE": "0"})
    shutil.copytree(tiny_model_dir, base)
    s.model_dir = str(base)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def key(srv):
    return srv.key("acme")


@pytest.fixture(scope="module")
def http(srv, key):
    with httpx.Client(base_url=f"{srv.base_url}/v1", headers={"Authorization": f"Bearer {key}"}, timeout=300) as c:
        yield c


@pytest.fixture(scope="module")
def job(srv, key, tmp_path_factory):
    client = srv.openai(key)
    f = client.files.create(file=write_sample_jsonl(tmp_path_factory.mktemp("d") / "t.jsonl").open("rb"),
                            purpose="fine-tune")
    j = client.fine_tuning.jobs.create(model=srv.model_dir, training_file=f.id,
                                       hyperparameters={"n_epochs": 1, "batch_size": 4})
    deadline = time.time() + 600
    while (j := client.fine_tuning.jobs.retrieve(j.id)).status not in ("succeeded", "failed", "cancelled"):
        assert time.time() < deadline
        time.sleep(0.5)
    assert j.status == "succeeded", j.error
    return j


MESSAGES = [{"role": "user", "content": "What is the capital of Japan?"}]


def test_llama_stack_chat_completion_on_a_checkpoint_by_its_identifier(srv, key, job):
    import llama_stack_client
    from llama_stack_client import LlamaStackClient

    ls = LlamaStackClient(base_url=srv.base_url, api_key=key, max_retries=0)
    arts = ls.post_training.job.artifacts(job_uuid=job.id)
    # llama-stack-client 0.2.12 types the artifacts' checkpoints as bare objects (dicts).
    ck_id = next(c["identifier"] for c in arts.checkpoints if c["identifier"].startswith("ftckpt-"))
    greedy = {"strategy": {"type": "greedy"}, "max_tokens": 6}
    r = ls.inference.chat_completion(model_id=ck_id, messages=MESSAGES, sampling_params=greedy)
    oa = srv.openai(key)
    want = next(c.fine_tuned_model_checkpoint for c in oa.fine_tuning.jobs.checkpoints.list(job.id).data
                if c.id == ck_id)
    same = oa.chat.completions.create(model=want, messages=MESSAGES, max_tokens=6, temperature=0)
    assert r.completion_message.content == same.choices[0].message.content
    streamed = list(ls.inference.chat_completion(model_id=ck_id, messages=MESSAGES, sampling_params=greedy,
                                                 stream=True))
    assert "".join(c.event.delta.text for c in streamed) == same.choices[0].message.content
    with pytest.raises(llama_stack_client.NotFoundError) as e:
        ls.inference.chat_completion(model_id="ftckpt-nope", messages=MESSAGES)
    detail = e.value.body["detail"]
    assert "model_id" in detail and "ftckpt-nope" in detail and "ckpt-step" not in detail
    other = LlamaStackClient(base_url=srv.base_url, api_key=srv.key("globex"), max_retries=0)
    with pytest.raises(llama_stack_client.NotFoundError):
        other.inference.chat_completion(model_id=ck_id, messages=MESSAGES)


def _unpack(http, url: str, dest) -> None:
    r = http.get(url.removeprefix("/v1"))
    assert r.status_code == 200, r.text
    with tarfile.open(fileobj=io.BytesIO(r.content)) as tar:
        tar.extractall(dest, filter="data")


def test_adapter_and_merged_exports_download_and_load(http, job, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = http.post(f"/fine_tuning/jobs/{job.id}/export", json={}).json()
    assert adapter["object"] == "fine_tuning.job.export" and adapter["merged"] is False and adapter["hub"] is None
    assert http.get(f"/fine_tuning/jobs/{job.id}/exports/{adapter['id']}").json() == adapter
    _unpack(http, adapter["content_url"], tmp_path)
    got = tmp_path / adapter["id"]
    assert (got / "adapter_config.json").is_file() and not list(got.glob("optimizer.pt"))
    base = AutoModelForCausalLM.from_pretrained(job.model)
    PeftModel.from_pretrained(base, str(got))

    ck = http.get(f"/fine_tuning/jobs/{job.id}/checkpoints").json()["data"][0]
    merged = http.post(f"/fine_tuning/jobs/{job.id}/export", json={"merged": True, "checkpoint": ck["id"]}).json()
    assert merged["merged"] is True and merged["checkpoint_id"] == ck["id"] and merged["bytes"] > 0
    _unpack(http, merged["content_url"], tmp_path)
    out = tmp_path / merged["id"]
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    AutoModelForCausalLM.from_pretrained(str(out))


def test_bad_export_requests_are_400_naming_the_field(http, job):
    for body, param in (({"merged": "yes"}, "merged"), ({"push_to_hub": {"repo_id": "no slash"}}, "push_to_hub"),
                        ({"push_to_hub": {"repo_id": "me/m", "secret_id": "nothing"}}, "push_to_hub.secret_id"),
                        ({"mergd": True}, "mergd")):
        r = http.post(f"/fine_tuning/jobs/{job.id}/export", json=body)
        assert r.status_code == 400, r.text
        assert (r.json()["error"]["param"] or "").startswith(param), r.json()
    assert http.post(f"/fine_tuning/jobs/{job.id}/export", json={"checkpoint": "ftckpt-nope"}).status_code == 404
    assert http.post("/fine_tuning/jobs/ftjob-nope/export", json={}).status_code == 404
    assert http.get(f"/fine_tuning/jobs/{job.id}/exports/..%2F..").status_code == 404
    http.post("/secrets", json={"name": "aws1", "type": "aws",
                                "value": {"access_key_id": "a", "secret_access_key": "b"}}).raise_for_status()
    r = http.post(f"/fine_tuning/jobs/{job.id}/export", json={"push_to_hub": {"repo_id": "me/m", "secret_id": "aws1"}})
    assert r.status_code == 400 and r.json()["error"]["code"] == "secret_wrong_type"


def test_push_to_an_unreachable_hub_is_refused_and_nothing_is_kept(srv, http, key, job):
    token = "hf_ThisIsNotARealTokenButMustNeverBeShown"
    http.post("/secrets", json={"name": "hf", "type": "hf", "value": {"token": token}}).raise_for_status()
    exports = srv.home / "jobs"
    before = sorted(p.name for p in exports.rglob("ftexp-*"))
    r = http.post(f"/fine_tuning/jobs/{job.id}/export", json={"merged": True, "push_to_hub": {"repo_id": "me/m"}})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "hub_unreachable" and err["param"] == "push_to_hub"
    assert "cannot be reached" in err["message"] and "nothing was pushed to me/m" in err["message"]
    assert sorted(p.name for p in exports.rglob("ftexp-*")) == before

    cli = subprocess.run([sys.executable, "-m", "tuneyard.cli", "export", job.id, "--merged", "--push-to-hub", "me/m",
                          "--secret", "hf", "--base-url", srv.base_url, "--api-key", key], env=srv.env,
                         capture_output=True, text=True, timeout=300)
    assert cli.returncode == 1 and "cannot be reached" in cli.stderr and "nothing was pushed" in cli.stderr
    logs = "".join(p.read_text(errors="replace") for p in srv.home.rglob("*.log"))
    assert token not in logs + cli.stderr + cli.stdout


def test_deleting_the_model_removes_its_exports(srv, http, key, job):
    made = http.post(f"/fine_tuning/jobs/{job.id}/export", json={}).json()
    assert http.get(f"/fine_tuning/jobs/{job.id}/exports/{made['id']}").status_code == 200
    srv.openai(key).models.delete(job.fine_tuned_model)
    r = http.get(f"/fine_tuning/jobs/{job.id}/exports/{made['id']}")
    assert r.status_code == 404 and r.json()["error"]["code"] == "export_not_found"
    assert not list(srv.home.rglob(made["id"]))
    assert http.post(f"/fine_tuning/jobs/{job.id}/export", json={}).status_code in (404, 409)
