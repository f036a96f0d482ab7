"""Naming a fine-tuned model as a job's model, refused in every dialect (worker off: the parent never succeeds).

Another organisation's model answers exactly as a model that exists nowhere (404 naming the model); a job that has
not succeeded is a 400; nothing is stored either way. Continuing a succeeded job, and the refusal of LoRA settings
that differ from its adapter, are in tests/integration/test_continue_e2e.py.
"""

from __future__ import annotations

import json

import httpx
import llama_stack_client
import openai
import pytest
from llama_stack_client import LlamaStackClient

from tests.conftest import Server
from tuneyard.demo.tiny import sample_rows, write_sample_jsonl


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir):
    import shutil

    srv = Server(tmp_path_factory.mktemp("cont-home"), {"TUNEYARD_RUN_WORKER": "false", "TUNEYARD_GPU_COUNT": "0",
                                                        "TUNEYARD_RATE_LIMIT_PER_SECOND": "0"})
    shutil.copytree(tiny_model_dir, srv.local / "tiny-llama")
    srv.model_dir = str(srv.local / "tiny-llama")
    srv.data = str(write_sample_jsonl(srv.local / "data" / "train.jsonl"))
    keys = {org: srv.key(org) for org in ("alpha", "beta")}
    clients = {org: srv.openai(k) for org, k in keys.items()}
    files = {}
    for org, c in clients.items():
        with open(srv.data, "rb") as fh:
            files[org] = c.files.create(file=fh, purpose="fine-tune").id
    parent = clients["alpha"].fine_tuning.jobs.create(model=srv.model_dir, training_file=files["alpha"], suffix="sft")
    srv.keys, srv.clients, srv.files = keys, clients, files
    # The name the job's model will have once it succeeds (it never does here: no worker).
    srv.parent_name = f"ft:tiny-llama:alpha:sft:{parent.id.removeprefix('ftjob-')}"
    yield srv
    srv.stop()


def n_jobs(srv, org: str) -> int:
    return len(list(srv.clients[org].fine_tuning.jobs.list(limit=100)))


def ghost(name: str) -> str:
    head, _, job = name.rpartition(":")
    return f"{head}:{'Z' * len(job)}"


def test_a_job_not_yet_succeeded_cannot_be_continued(world):
    a = world.clients["alpha"]
    before = n_jobs(world, "alpha")
    for model in (world.parent_name, world.parent_name + ":ckpt-step-1"):
        with pytest.raises(openai.BadRequestError) as e:
            a.fine_tuning.jobs.create(model=model, training_file=world.files["alpha"])
        err = e.value.body
        assert err["param"] == "model" and err["code"] == "model_not_ready", err
        assert "has not succeeded" in err["message"] and "validating_files" in err["message"]
    assert n_jobs(world, "alpha") == before


def test_every_problem_is_listed_with_the_model_refusal(world):
    with pytest.raises(openai.BadRequestError) as e:
        world.clients["alpha"].fine_tuning.jobs.create(model=world.parent_name, training_file="file-nope")
    msg = e.value.body["message"]
    assert e.value.body["param"] == "model" and "has not succeeded" in msg and "file-nope" in msg, msg


@pytest.mark.parametrize("suffix", ["", ":ckpt-step-1"])
def test_another_orgs_model_is_a_404_like_a_model_that_does_not_exist(world, suffix):
    b = world.clients["beta"]
    before = n_jobs(world, "beta")
    answers = []
    for model in (world.parent_name + suffix, ghost(world.parent_name) + suffix):
        with pytest.raises(openai.NotFoundError) as e:
            b.fine_tuning.jobs.create(model=model, training_file=world.files["beta"])
        assert e.value.body["param"] == "model" and e.value.body["code"] == "model_not_found"
        answers.append(e.value.body["message"].replace(model, "<model>"))
    assert answers[0] == answers[1]
    assert n_jobs(world, "beta") == before


@pytest.mark.parametrize("model", ["ft:", "ft:tiny-llama", "ft:tiny-llama:alpha:sft:x:ckpt-step-zz", "ft:a:b:c:d:e:f"])
def test_malformed_fine_tuned_names_are_a_404(world, model):
    with pytest.raises(openai.NotFoundError) as e:
        world.clients["alpha"].fine_tuning.jobs.create(model=model, training_file=world.files["alpha"])
    assert e.value.body["param"] == "model"


def _simplismart(world, org: str, base_model: str) -> httpx.Response:
    cfg = {
        "dataset_config": {"preprocessing": {"lazy_tokenize": False, "streaming": False}},
        "model_details": {"base_model": base_model, "source_type": "hf", "model_type": "llm"},
        "train_config": {"type": "sft", "train_type": "lora", "hyperparameters": {"num_epochs": 1}},
        "dataset_details": {"dataset_name": "d", "dataset_path": world.data, "dataset_type": "jsonl",
                            "source_type": "local"},
        "infra_config": {"gpu_type": "cpu", "gpu_count": 1, "node_count": 1},
    }
    form = {"org": org, "experiment_name": "continue", **{k: json.dumps(v) for k, v in cfg.items()}}
    return httpx.post(f"{world.base_url}/job/", data=form, headers={"Authorization": f"Bearer {world.keys[org]}"},
                      timeout=30)


def test_simplismart_names_base_model(world):
    r = _simplismart(world, "alpha", world.parent_name)
    assert r.status_code == 400 and r.json()["field"] == "model_details.base_model", r.text
    assert "has not succeeded" in r.text
    r = _simplismart(world, "beta", world.parent_name)
    assert r.status_code == 404 and r.json()["field"] == "model_details.base_model", r.text


def test_llama_stack_names_model(world):
    rows = [{"messages": r["messages"]} for r in sample_rows()]
    out = {}
    for org in ("alpha", "beta"):
        client = LlamaStackClient(base_url=world.base_url, api_key=world.keys[org], max_retries=0)
        client.datasets.register(purpose="post-training/messages", source={"type": "rows", "rows": rows},
                                 dataset_id="capitals")
        body = {"job_uuid": f"cont-{org}", "model": world.parent_name,
                "algorithm_config": {"type": "LoRA", "lora_attn_modules": ["q_proj", "v_proj"], "rank": 8,
                                     "alpha": 16},
                "training_config": {"n_epochs": 1, "data_config": {"dataset_id": "capitals", "batch_size": 2,
                                                                   "data_format": "instruct"}},
                "hyperparam_search_config": {}, "logger_config": {}}
        err = llama_stack_client.BadRequestError if org == "alpha" else llama_stack_client.NotFoundError
        with pytest.raises(err) as e:
            client.post_training.supervised_fine_tune(**body)
        out[org] = e.value.body
    assert "has not succeeded" in out["alpha"]["detail"], out
    assert "does not exist" in out["beta"]["detail"], out
