"""The Simplismart dialect against a real server process (worker off: jobs stay where the API put them)."""

from __future__ import annotations

import copy
import json
import subprocess

import httpx
import pytest

from tests.conftest import Server
from tuneyard.demo.tiny import write_sample_jsonl


@pytest.fixture(scope="module")
def api(tmp_path_factory, tiny_model_dir):
    import shutil

    srv = Server(tmp_path_factory.mktemp("ss-home"), {"TUNEYARD_RUN_WORKER": "false", "TUNEYARD_GPU_COUNT": "0"})
    shutil.copytree(tiny_model_dir, srv.local / "tiny-llama")
    srv.model_dir = str(srv.local / "tiny-llama")
    srv.data = str(write_sample_jsonl(srv.local / "data" / "train.jsonl"))
    srv.token = srv.key("acme")
    yield srv
    srv.stop()


def configs(api) -> dict[str, dict]:
    """The seed page's configs with this machine's paths, and CPU infra in place of 2 x 2 H100s."""
    return {
        "dataset_config": {"preprocessing": {"lazy_tokenize": True, "streaming": False,
                                             "prompt": {"system": None, "max_length": 4096, "template": None}},
                           "split": {"type": "random", "ratios": [0.9, 0.1]}},
        "model_details": {"base_model": api.model_dir, "ownership": "public", "source_type": "local",
                          "model_type": "llm", "quantization": {"quant_bits": 16}},
        "train_config": {"type": "sft", "torch_dtype": "float32", "task_type": "causal_lm", "train_type": "lora",
                         "tuner_backend": "simplismart",
                         "hyperparameters": {"num_epochs": 1, "per_device_train_batch_size": 8,
                                             "per_device_eval_batch_size": 8, "gradient_checkpointing": True,
                                             "save_steps": 500, "save_total_limit": 2, "eval_steps": 500,
                                             "logging_steps": 5, "learning_rate": 0.0001,
                                             "dataloader_num_workers": 1},
                         "adapter_config": {"r": 16, "alpha": 16, "dropout": 0.1, "targets": ["all-linear"]},
                         "distributed": {"type": "ddp"}},
        "dataset_details": {"dataset_name": "dataset-name", "dataset_path": api.data, "dataset_description": "",
                            "dataset_type": "jsonl", "dataset_format": "sharegpt", "source_type": "local",
                            "ownership": "private", "secret_id": None, "region": None},
        "infra_config": {"gpu_type": "cpu", "gpu_count": 1, "infra_type": "simplismart", "node_count": 1},
    }


def post_job(api, cfg: dict[str, dict], *, org: str = "acme", name: str = "launch-simplismart-causal_lm-lora"):
    form = {"org": org, "experiment_name": name, **{k: json.dumps(v) for k, v in cfg.items()}}
    return httpx.post(f"{api.base_url}/job/", data=form, headers={"Authorization": f"Bearer {api.token}"},
                      timeout=30)


def get(api, path: str, **params):
    return httpx.get(f"{api.base_url}{path}", params=params, headers={"Authorization": f"Bearer {api.token}"},
                     timeout=30)


def n_jobs(api) -> int:
    return get(api, "/job/list/", org_id="acme").json()["total_count"]


def test_the_seed_curl_call_creates_a_job(api):
    cfg = configs(api)
    cfg["dataset_details"]["dataset_format"] = None  # the sample file is OpenAI chat, not ShareGPT
    args = ["curl", "-sS", "--request", "POST", "--url", f"{api.base_url}/job/",
            "--header", f"Authorization: Bearer {api.token}", "--header", "Content-Type: multipart/form-data",
            "--form", "org=acme", "--form", "experiment_name=launch-simplismart-causal_lm-lora"]
    for k, v in cfg.items():
        args += ["--form", f"{k}={json.dumps(v, indent=2)}\n"]
    raw = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    out = json.loads(raw)
    assert "request_id" in out, raw
    assert out["status"] == "QUEUED" and out["experiment_name"] == "launch-simplismart-causal_lm-lora"
    rec = get(api, "/job/get/", org_id="acme", request_id=out["request_id"]).json()
    assert rec["status"] == "QUEUED" and rec["progress"] == 0 and rec["output_model_path"] is None
    assert rec["train_config"]["adapter_config"] == {"r": 16, "alpha": 16.0, "dropout": 0.1,
                                                     "targets": ["all-linear"]}
    assert rec["train_config"]["hyperparameters"]["per_device_train_batch_size"] == 8
    assert rec["dataset_config"]["split"] == {"type": "random", "ratios": [0.9, 0.1]}
    assert rec["infra_config"]["gpu_type"] == "cpu" and rec["model_details"]["source_type"] == "local"
    assert rec["created_at"].endswith("Z") and rec["started_at"] is None and rec["error_message"] is None


def test_list_metrics_cancel(api):
    rid = post_job(api, configs(api)).json()["request_id"]
    listing = get(api, "/job/list/", org_id="acme").json()
    assert listing["jobs"][0]["request_id"] == rid and listing["total_count"] >= 1
    assert listing["jobs"][0]["train_type"] == "lora" and listing["jobs"][0]["base_model"] == api.model_dir
    assert get(api, "/job/metrics/", org_id="acme", request_id=rid).json() == {"request_id": rid, "metrics": []}
    h = {"Authorization": f"Bearer {api.token}"}
    r = httpx.post(f"{api.base_url}/job/cancel/", params={"org_id": "acme", "request_id": rid}, headers=h)
    assert r.status_code == 200 and r.json()["status"] == "CANCELED"
    r = httpx.post(f"{api.base_url}/job/cancel/", params={"org_id": "acme", "request_id": rid}, headers=h)
    assert r.status_code == 409 and r.json()["detail"]
    assert get(api, "/job/get/", org_id="acme", request_id=rid).json()["status"] == "CANCELED"


def test_other_org_and_unknown_job_are_404(api):
    r = get(api, "/job/get/", org_id="globex", request_id="ftjob-x")
    assert r.status_code == 404 and r.json()["field"] == "org_id"
    r = get(api, "/job/get/", org_id="acme", request_id="ftjob-nope")
    assert r.status_code == 404 and r.json()["field"] == "request_id"
    rid = post_job(api, configs(api)).json()["request_id"]
    other = api.key("globex")
    r = httpx.get(f"{api.base_url}/job/get/", params={"org_id": "globex", "request_id": rid},
                  headers={"Authorization": f"Bearer {other}"})
    assert r.status_code == 404
    assert post_job(api, configs(api), org="globex").status_code == 404
    r = httpx.get(f"{api.base_url}/job/list/", params={"org_id": "acme"})
    assert r.status_code == 401 and "detail" in r.json()


def test_openai_jobs_show_up_here(api):
    client = api.openai(api.token)
    with open(api.data, "rb") as fh:
        f = client.files.create(file=fh, purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model=api.model_dir, training_file=f.id, suffix="from-openai")
    rec = get(api, "/job/get/", org_id="acme", request_id=job.id).json()
    assert rec["status"] == "QUEUED" and rec["experiment_name"] == "from-openai"
    # In Simplismart's words: the uploaded file is a local file on this server (see tests/api/test_wire.py).
    assert rec["dataset_details"]["source_type"] == "local"
    assert rec["dataset_details"]["dataset_path"].endswith(f"{f.id}.jsonl")


def _set(cfg: dict, path: str, value) -> dict:
    out = copy.deepcopy(cfg)
    node = out
    *parents, last = path.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value
    return out


# (field, bad value): schema enums, then values valid in Simplismart that this CPU-only server cannot run.
BAD = [
    ("dataset_config.split.type", "shuffled"), ("dataset_config.split.ratios", [0.5, 0.2]),
    ("dataset_config.split.ratios", [0.8, 0.1, 0.1]), ("dataset_config.preprocessing.prompt.max_length", 0),
    ("model_details.ownership", "shared"), ("model_details.source_type", "gcs"),
    ("model_details.model_type", "audio"), ("model_details.quantization.quant_bits", 2),
    ("train_config.type", "rlhf"), ("train_config.torch_dtype", "float64"),
    ("train_config.task_type", "classification"), ("train_config.train_type", "prefix"),
    ("train_config.distributed.type", "horovod"), ("train_config.hyperparameters.num_epochs", 0),
    ("train_config.hyperparameters.learning_rate", -1), ("train_config.adapter_config.r", 0),
    ("train_config.adapter_config.dropout", 1.5), ("dataset_details.dataset_type", "xml"),
    ("dataset_details.dataset_format", "csv"), ("dataset_details.source_type", "ftp"),
    ("dataset_details.ownership", "x"), ("infra_config.gpu_type", "h200"), ("infra_config.gpu_count", 0),
    # Valid Simplismart values this installation refuses, with the reason.
    ("model_details.quantization.quant_bits", 4), ("model_details.model_type", "vlm"),
    ("model_details.source_type", "s3"), ("train_config.type", "ppo"),
    ("train_config.task_type", "seq2seq"), ("train_config.torch_dtype", "float16"),
    ("train_config.distributed.type", "fsdp"), ("train_config.distributed.type", "deepspeed"),
    ("train_config.tuner_backend", "unsloth"), ("dataset_details.source_type", "gcs"),
    ("infra_config.gpu_type", "h100"), ("infra_config.node_count", 2),
    ("model_details.base_model", "/etc"), ("dataset_details.dataset_path", "/etc/passwd"),
    ("dataset_details.region", "us-west-2"),
    # Simplismart has no experiment-tracking field: one is unknown, never accepted and ignored.
    ("train_config.report_to", "wandb"),
    ("dataset_details.dataset_path", "s3://bucket/train.jsonl"),  # does not match source_type local
]


def test_remote_sources_are_checked_and_model_secrets_refused(api):
    cfg = configs(api)
    cfg["dataset_details"].update(source_type="s3", dataset_path="s3://bucket/train.jsonl", ownership="private",
                                  secret_id="no-such-secret", region="us-west-2")
    r = post_job(api, cfg)
    assert r.status_code == 400 and r.json()["field"] == "dataset_details.secret_id", r.text
    cfg["dataset_details"].update(secret_id=None)
    r = post_job(api, cfg)
    assert r.status_code == 400 and r.json()["field"] == "dataset_details.secret_id"  # private S3 needs one
    cfg["dataset_details"].update(dataset_path="s3://B/k", ownership="public")
    r = post_job(api, cfg)
    assert r.status_code == 400 and r.json()["field"] == "dataset_details.dataset_path"
    cfg = configs(api)
    cfg["model_details"].update(source_type="hf", base_model="org/private-model", ownership="private",
                                secret_id="hf-token")
    r = post_job(api, cfg)
    assert r.status_code == 400 and r.json()["field"] == "model_details.secret_id"


@pytest.mark.parametrize("field,value", BAD, ids=[f"{f}={v}" for f, v in BAD])
def test_each_bad_value_is_a_400_naming_its_field(api, field, value):
    before = n_jobs(api)
    r = post_job(api, _set(configs(api), field, value))
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["field"] == field, body
    assert body["detail"] and body["code"]
    assert n_jobs(api) == before


def test_method_refusals_offer_only_what_runs(api):
    r = post_job(api, _set(configs(api), "train_config.type", "ppo"))
    body = r.json()
    assert r.status_code == 400 and body["code"] == "unsupported_method", body
    assert "use 'sft' or 'dpo'" in body["detail"], body


def test_a_fifo_as_dataset_path_is_named_for_what_it_is(api):
    import os

    fifo = api.local / "data" / "pipe.jsonl"
    os.mkfifo(fifo)
    before = n_jobs(api)
    r = post_job(api, _set(configs(api), "dataset_details.dataset_path", str(fifo)))
    body = r.json()
    assert r.status_code == 400 and body["field"] == "dataset_details.dataset_path", body
    assert "is not a regular file or directory: it is a FIFO (named pipe)" in body["detail"], body
    assert n_jobs(api) == before


def test_malformed_form_fields(api):
    cfg = {k: json.dumps(v) for k, v in configs(api).items()}
    h = {"Authorization": f"Bearer {api.token}"}
    r = httpx.post(f"{api.base_url}/job/", data={"org": "acme", "experiment_name": "x", **cfg,
                                                   "train_config": "{not json"}, headers=h)
    assert r.status_code == 400 and r.json()["field"] == "train_config" and "not valid JSON" in r.json()["detail"]
    r = httpx.post(f"{api.base_url}/job/", data={"org": "acme", "experiment_name": "x", **cfg,
                                                   "infra_config": "[1]"}, headers=h)
    assert r.status_code == 400 and r.json()["field"] == "infra_config"
    missing = {k: v for k, v in cfg.items() if k != "dataset_details"}
    r = httpx.post(f"{api.base_url}/job/", data={"org": "acme", "experiment_name": "x", **missing}, headers=h)
    assert r.status_code == 400 and r.json()["field"] == "dataset_details"
    r = post_job(api, _set(configs(api), "train_config.hyperparameters.warmup", 3))
    assert r.status_code == 400 and r.json()["field"] == "train_config.hyperparameters.warmup"
    assert "Unrecognized field" in r.json()["detail"]


# The seed page's POST /job/ example, form values verbatim (only the URL and the token are this server's).
SEED_FORM = {
    "org": "0bf00b43-430a-4ca3-a8b3-b13cc8dc6d4f",
    "experiment_name": "launch-simplismart-causal_lm-lora",
    "dataset_config": '{\n  "preprocessing": {\n    "lazy_tokenize": true,\n    "streaming": false,\n    "prompt": {\n'
                      '      "system": null,\n      "max_length": 4096,\n      "template": null\n    }\n  },\n'
                      '  "split": {\n    "type": "random",\n    "ratios": [0.9, 0.1]\n  }\n}\n',
    "model_details": '{\n  "base_model": "meta-llama/Llama-3.2-1B-Instruct",\n  "ownership": "public",\n'
                     '  "source_type": "hf",\n  "model_type": "llm",\n  "quantization": {\n    "quant_bits": 4\n'
                     '  }\n}\n',
    "train_config": '{\n  "type": "sft",\n  "torch_dtype": "bfloat16",\n  "task_type": "causal_lm",\n'
                    '  "train_type": "lora",\n  "tuner_backend": "simplismart",\n  "hyperparameters": {\n'
                    '    "num_epochs": 1,\n    "per_device_train_batch_size": 8,\n'
                    '    "per_device_eval_batch_size": 8,\n'
                    '    "gradient_checkpointing": true,\n    "save_steps": 500,\n    "save_total_limit": 2,\n'
                    '    "eval_steps": 500,\n    "logging_steps": 5,\n    "learning_rate": 0.0001,\n'
                    '    "dataloader_num_workers": 1\n  },\n  "adapter_config": {\n    "r": 16,\n    "alpha": 16,\n'
                    '    "dropout": 0.1,\n    "targets": ["all-linear"]\n  },\n  "distributed": {\n'
                    '    "type": "ddp"\n  }\n}\n',
    "dataset_details": '{\n  "dataset_name": "dataset-name",\n'
                       '  "dataset_path": "s3://training-dev-datasets/ds/sharegpt_ds_half.jsonl",\n'
                       '  "dataset_description": "",\n  "dataset_type": "jsonl",\n  "dataset_format": "sharegpt",\n'
                       '  "source_type": "s3",\n  "ownership": "private",\n  "secret_id": "<your-secret-key>",\n'
                       '  "region": "us-west-2"\n}\n',
    "infra_config": '{\n  "gpu_type": "h100",\n  "gpu_count": 2,\n  "infra_type": "simplismart",\n'
                    '  "node_count": 2\n}\n',
}


def test_the_seed_curl_as_written_gets_one_400_listing_every_problem(api):
    before = n_jobs(api)
    args = ["curl", "-sS", "-w", "\n%{http_code}", "--request", "POST", "--url", f"{api.base_url}/job/",
            "--header", f"Authorization: Bearer {api.token}", "--header", "Content-Type: multipart/form-data"]
    for k, v in SEED_FORM.items():
        args += ["--form", f"{k}={v}"]
    raw, status = subprocess.run(args, capture_output=True, text=True, check=True).stdout.rsplit("\n", 1)
    assert status == "400", raw
    body = json.loads(raw)
    fields = [e["field"] for e in body["errors"]]
    # Someone else's organisation, a secret this one does not have, and three things a CPU machine cannot do.
    assert sorted(fields) == sorted(["org", "dataset_details.secret_id", "infra_config.node_count",
                                     "infra_config.gpu_type", "model_details.quantization.quant_bits"]), body
    assert body["field"] == fields[0] == "org" and body["code"] == "org_not_found"
    assert body["detail"].startswith("5 problems:")
    for e in body["errors"]:
        assert e["message"] and e["field"] in body["detail"], e
    assert n_jobs(api) == before


def test_independent_config_problems_are_all_reported(api):
    before = n_jobs(api)
    # Schema errors in several configs at once.
    cfg = _set(_set(configs(api), "train_config.hyperparameters.num_epochs", 0), "infra_config.gpu_count", 0)
    cfg = _set(cfg, "dataset_details.dataset_type", "xml")
    r = post_job(api, cfg)
    assert r.status_code == 400, r.text
    assert {e["field"] for e in r.json()["errors"]} == {
        "train_config.hyperparameters.num_epochs", "infra_config.gpu_count", "dataset_details.dataset_type"}
    # A config that is not JSON does not hide a problem in another one.
    form = {"org": "acme", "experiment_name": "x", **{k: json.dumps(v) for k, v in configs(api).items()},
            "train_config": "{not json"}
    form["infra_config"] = json.dumps({**configs(api)["infra_config"], "gpu_count": 0})
    r = httpx.post(f"{api.base_url}/job/", data=form, headers={"Authorization": f"Bearer {api.token}"})
    assert r.status_code == 400 and [e["field"] for e in r.json()["errors"]] == ["train_config",
                                                                                 "infra_config.gpu_count"], r.text
    # Translation checks: each refused value is named.
    cfg = _set(_set(configs(api), "train_config.tuner_backend", "unsloth"), "train_config.task_type", "seq2seq")
    cfg = _set(_set(cfg, "dataset_details.region", "us-west-2"), "train_config.type", "ppo")
    r = post_job(api, cfg)
    assert r.status_code == 400 and {e["field"] for e in r.json()["errors"]} == {
        "train_config.tuner_backend", "train_config.task_type", "dataset_details.region", "train_config.type"}
    # Service checks: what this installation cannot run, all at once.
    cfg = _set(_set(configs(api), "train_config.distributed.type", "fsdp"), "model_details.model_type", "vlm")
    cfg = _set(_set(cfg, "train_config.torch_dtype", "float16"), "infra_config.node_count", 3)
    r = post_job(api, cfg)
    # model_type vlm: the model is a text model, and lazy_tokenize (on in these configs) is not for VLMs.
    assert r.status_code == 400 and {e["field"] for e in r.json()["errors"]} == {
        "train_config.distributed.type", "model_details.model_type", "train_config.torch_dtype",
        "infra_config.node_count", "dataset_config.preprocessing.lazy_tokenize"}, r.text
    # One problem keeps its own status and body (with a one-item list).
    r = post_job(api, configs(api), org="globex")
    assert r.status_code == 404 and r.json()["errors"] == [{"field": "org", "message": r.json()["detail"],
                                                            "code": "org_not_found"}]
    assert n_jobs(api) == before


def test_train_config_integrations_extension(api):
    mlflow = {"type": "mlflow", "mlflow": {"tracking_uri": "http://127.0.0.1:5000", "experiment": "e"}}
    cfg = configs(api)
    cfg["dataset_details"]["dataset_format"] = None
    cfg["train_config"]["integrations"] = [mlflow]
    made = post_job(api, cfg)
    assert made.status_code == 200, made.text
    rec = get(api, "/job/get/", org_id="acme", request_id=made.json()["request_id"]).json()
    assert rec["train_config"]["integrations"] == [mlflow]
    before = n_jobs(api)
    # A key beside the tracker's block would be ignored, an unknown tracker cannot run: both refused at once.
    cfg["train_config"]["integrations"] = [{**mlflow, "junk": 1}, {"type": "comet", "comet": {}}]
    r = post_job(api, cfg)
    assert r.status_code == 400, r.text
    text = r.text
    assert "train_config.integrations[0]" in text and "junk" in text, text
    assert "train_config.integrations[1]" in text and "'comet' is not available" in text, text
    assert n_jobs(api) == before


def test_vlm_on_a_text_model_is_a_400_saying_so(api):
    cfg = configs(api)
    cfg["model_details"]["model_type"] = "vlm"
    r = post_job(api, cfg)
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["field"] == "model_details.model_type"
    assert f"model_type is 'vlm', but model '{api.model_dir}' is a text model" in body["detail"]


def test_vlm_with_sharegpt_image_rows_is_accepted(api, tiny_qwen2_vl_dir):
    import shutil

    from PIL import Image

    model = api.local / "tiny-qwen2-vl"
    if not model.exists():
        shutil.copytree(tiny_qwen2_vl_dir, model)
    data = api.local / "vision"
    data.mkdir(exist_ok=True)
    Image.new("RGB", (28, 28), "red").save(data / "red.png")
    row = {"conversations": [{"from": "human", "value": "<image>What colour is this?"},
                             {"from": "gpt", "value": "Red."}], "images": ["red.png"]}
    (data / "train.jsonl").write_text((json.dumps(row) + "\n") * 4)
    cfg = configs(api)
    cfg["model_details"].update(base_model=str(model), model_type="vlm")
    cfg["dataset_config"]["preprocessing"]["lazy_tokenize"] = False  # image rows are tokenised before the queue
    cfg["dataset_details"].update(dataset_path=str(data / "train.jsonl"), dataset_format="sharegpt")
    cfg["dataset_config"]["preprocessing"]["lazy_tokenize"] = False  # a VLM's rows are tokenised up front
    cfg["train_config"].update(freeze_aligner=False, max_pixels=3136)
    r = post_job(api, cfg)
    assert r.status_code == 200 and r.json()["status"] == "QUEUED", r.text
    rec = get(api, "/job/get/", org_id="acme", request_id=r.json()["request_id"]).json()
    assert rec["model_details"]["model_type"] == "vlm"
    assert (rec["train_config"]["freeze_aligner"], rec["train_config"]["max_pixels"]) == (False, 3136)
    # The same fields on a text model are refused by name.
    cfg = configs(api)
    cfg["train_config"]["freeze_vit"] = False
    r = post_job(api, cfg)
    assert r.status_code == 400 and r.json()["field"] == "train_config.freeze_vit", r.text
