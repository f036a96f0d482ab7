"""The Llama Stack dialect against a real server (worker off), driven by the published llama-stack-client 0.2.12."""

from __future__ import annotations

import copy

import httpx
import llama_stack_client
import pytest
from llama_stack_client import LlamaStackClient

from tests.conftest import Server
from tuneyard.demo.tiny import CAPITALS

ROWS = [{"dialog": [{"role": "system", "content": "You answer in one word."},
                    {"role": "user", "content": f"What is the capital of {country}?"},
                    {"role": "assistant", "content": f"{capital}."}]} for country, capital in CAPITALS]


@pytest.fixture(scope="module")
def api(tmp_path_factory, tiny_model_dir):
    import shutil

    srv = Server(tmp_path_factory.mktemp("ls-home"), {"TUNEYARD_RUN_WORKER": "false", "TUNEYARD_GPU_COUNT": "0",
                                                      "TUNEYARD_RATE_LIMIT_PER_SECOND": "0"})
    shutil.copytree(tiny_model_dir, srv.local / "tiny-llama")
    srv.model_dir = str(srv.local / "tiny-llama")
    srv.token = srv.key("acme")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(api):
    return LlamaStackClient(base_url=api.base_url, api_key=api.token, max_retries=0)


@pytest.fixture(scope="module")
def dataset(client):
    return client.datasets.register(purpose="post-training/messages", source={"type": "rows", "rows": ROWS},
                                    dataset_id="capitals")


def request(api, **over) -> dict:
    body = {
        "job_uuid": over.pop("job_uuid", "job-1"), "model": api.model_dir,
        "algorithm_config": {"type": "LoRA", "lora_attn_modules": ["q_proj", "v_proj", "output_proj"],
                             "apply_lora_to_mlp": True, "apply_lora_to_output": False, "rank": 8, "alpha": 16},
        "training_config": {"n_epochs": 1, "max_steps_per_epoch": 3, "gradient_accumulation_steps": 1,
                            "max_validation_steps": 1, "dtype": "fp32",
                            "data_config": {"dataset_id": "capitals", "batch_size": 2, "shuffle": True,
                                            "data_format": "dialog"},
                            "optimizer_config": {"optimizer_type": "adamw", "lr": 1e-3, "weight_decay": 0.0,
                                                 "num_warmup_steps": 0}},
        "hyperparam_search_config": {}, "logger_config": {},
    }
    for path, value in over.items():
        node = body
        *parents, last = path.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return body


def test_datasets_register_list_get_delete(client, dataset):
    assert dataset.identifier == "capitals" and dataset.purpose == "post-training/messages"
    assert "capitals" in [d.identifier for d in client.datasets.list()]
    assert client.datasets.retrieve("capitals").source.type == "rows"
    with pytest.raises(llama_stack_client.ConflictError):
        client.datasets.register(purpose="post-training/messages", source={"type": "rows", "rows": ROWS},
                                 dataset_id="capitals")
    tmp = client.datasets.register(purpose="post-training/messages", source={"type": "rows", "rows": ROWS[:2]})
    client.datasets.unregister(tmp.identifier)
    with pytest.raises(llama_stack_client.NotFoundError):
        client.datasets.retrieve(tmp.identifier)


def test_bad_rows_are_refused_naming_the_row(client):
    bad = ROWS[:2] + [{"dialog": [{"role": "user", "content": "hi"}]}]
    with pytest.raises(llama_stack_client.BadRequestError) as e:
        client.datasets.register(purpose="post-training/messages", source={"type": "rows", "rows": bad})
    body = e.value.body
    assert body["status"] == 400 and body["title"] == "Bad Request" and "Row 3" in body["detail"]
    with pytest.raises(llama_stack_client.BadRequestError) as e:
        client.datasets.register(purpose="post-training/sometimes", source={"type": "rows", "rows": ROWS})
    assert "purpose" in e.value.body["detail"]
    with pytest.raises(llama_stack_client.BadRequestError) as e:
        client.datasets.register(purpose="post-training/messages", source={"type": "uri", "uri": "lsfs://x.jsonl"})
    assert "scheme" in e.value.body["detail"]


def test_supervised_fine_tune_status_list_cancel(api, client, dataset):
    body = request(api, job_uuid="sft-1")
    out = client.post_training.supervised_fine_tune(**body)
    assert out.job_uuid == "sft-1"
    st = client.post_training.job.status(job_uuid="sft-1")
    assert st.status == "scheduled" and st.checkpoints == [] and st.scheduled_at
    assert st.resources_allocated["device"] == "cpu"
    assert "sft-1" in [j.job_uuid for j in client.post_training.job.list()]
    with pytest.raises(llama_stack_client.ConflictError):
        client.post_training.supervised_fine_tune(**body)
    assert client.post_training.job.artifacts(job_uuid="sft-1").checkpoints == []
    client.post_training.job.cancel(job_uuid="sft-1")
    assert client.post_training.job.status(job_uuid="sft-1").status == "cancelled"
    with pytest.raises(llama_stack_client.ConflictError):
        client.post_training.job.cancel(job_uuid="sft-1")
    with pytest.raises(llama_stack_client.NotFoundError) as e:
        client.post_training.job.status(job_uuid="nope")
    assert e.value.body["instance"] == "/v1/post-training/job/status"


def test_the_job_maps_every_field(api, client, dataset):
    import json

    client.post_training.supervised_fine_tune(**request(
        api, job_uuid="mapped", training_config__data_config__shuffle=False,
        training_config__data_config__packed=True))
    job_id = next(j.id for j in api.openai(api.token).fine_tuning.jobs.list() if j.status == "validating_files")
    spec = json.loads((api.home / "jobs" / "acme" / job_id / "spec.json").read_text())
    assert spec["adapter"]["target_modules"] == ["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert (spec["adapter"]["r"], spec["adapter"]["alpha"]) == (8, 16)
    hp = spec["hyperparameters"]
    assert (hp["per_device_batch_size"], hp["gradient_accumulation_steps"], hp["batch_size"]) == (2, 1, 2)
    assert (hp["max_steps_per_epoch"], hp["learning_rate"]) == (3, 1e-3)
    assert (hp["optimizer"], hp["warmup_steps"]) == ("adamw", 0)
    assert spec["data"]["shuffle"] is False and spec["data"]["packing"] is True
    assert spec["data"]["train"]["format"] == "dialog" and spec["model"]["torch_dtype"] == "float32"
    assert spec["schedule"]["max_validation_steps"] == 1


def test_path_style_on_v1alpha(api, client, dataset):
    h = {"Authorization": f"Bearer {api.token}"}
    r = httpx.post(f"{api.base_url}/v1alpha/post-training/supervised-fine-tune", json=request(api, job_uuid="alpha-1"),
                   headers=h)
    assert r.status_code == 200 and r.json() == {"job_uuid": "alpha-1"}
    r = httpx.get(f"{api.base_url}/v1alpha/post-training/jobs/alpha-1/status", headers=h)
    assert r.status_code == 200 and r.json()["status"] == "scheduled"
    r = httpx.get(f"{api.base_url}/v1alpha/post-training/jobs/alpha-1/artifacts", headers=h)
    assert r.json() == {"job_uuid": "alpha-1", "checkpoints": []}
    assert any(j["job_uuid"] == "alpha-1" for j in httpx.get(f"{api.base_url}/v1alpha/post-training/jobs",
                                                              headers=h).json()["data"])
    r = httpx.post(f"{api.base_url}/v1alpha/post-training/jobs/alpha-1/cancel", headers=h)
    assert r.status_code == 200
    assert httpx.get(f"{api.base_url}/v1/post-training/job/status", params={"job_uuid": "alpha-1"},
                     headers=h).json()["status"] == "cancelled"
    r = httpx.get(f"{api.base_url}/v1beta/datasets/capitals", headers=h)
    assert r.status_code == 200 and r.json()["identifier"] == "capitals"


def test_openai_jobs_are_visible_by_their_id(api, client, dataset, tmp_path):
    from tuneyard.demo.tiny import write_sample_jsonl

    oa = api.openai(api.token)
    with write_sample_jsonl(tmp_path / "t.jsonl").open("rb") as fh:
        f = oa.files.create(file=fh, purpose="fine-tune")
    job = oa.fine_tuning.jobs.create(model=api.model_dir, training_file=f.id)
    assert client.post_training.job.status(job_uuid=job.id).status == "scheduled"
    assert job.id in [j.job_uuid for j in client.post_training.job.list()]


def test_preference_optimize_refuses_what_it_cannot_run(client, api, dataset):
    """DPO runs (tests/integration/test_dpo_e2e.py trains one); what it cannot honour is one 400 naming each."""
    with pytest.raises(llama_stack_client.BadRequestError) as e:
        client.post_training.preference_optimize(
            job_uuid="dpo-1", finetuned_model=api.model_dir, algorithm_config={"beta": 0.1, "loss_type": "kto_pair"},
            training_config={"n_epochs": 1, "max_steps_per_epoch": 1, "gradient_accumulation_steps": 1,
                             "data_config": {"dataset_id": "capitals", "batch_size": 2, "shuffle": True,
                                             "data_format": "dialog", "packed": True}},
            hyperparam_search_config={}, logger_config={})
    detail = e.value.body["detail"]
    assert "algorithm_config.loss_type" in detail and "'kto_pair' is not offered" in detail, detail
    assert "training_config.data_config.packed" in detail, detail
    with pytest.raises(llama_stack_client.BadRequestError) as e:
        client.post_training.preference_optimize(
            job_uuid="dpo-2", finetuned_model=api.model_dir, algorithm_config={"beta": 0.1},
            training_config={"n_epochs": 1}, hyperparam_search_config={}, logger_config={})
    assert "training_config.data_config is required" in e.value.body["detail"]
    assert "dpo-1" not in [j.job_uuid for j in client.post_training.job.list()]


BAD = [
    ("training_config__data_config__data_format", "chat", "data_format"),
    ("training_config__optimizer_config__optimizer_type", "lion", "optimizer_type"),
    ("training_config__dtype", "int8", "training_config.dtype"),
    ("training_config__n_epochs", 0, "n_epochs"),
    ("training_config__data_config__batch_size", 0, "batch_size"),
    ("training_config__data_config__dataset_id", "missing", "dataset_id"),
    ("training_config__efficiency_config__enable_activation_offloading", True, "enable_activation_offloading"),
    ("training_config__efficiency_config__fsdp_cpu_offload", True, "fsdp_cpu_offload"),
    ("training_config__efficiency_config__memory_efficient_fsdp_wrap", True, "memory_efficient_fsdp_wrap"),
    # tuneyard's resources extension: FSDP and DeepSpeed need GPUs; a strategy's option beside another strategy.
    ("resources", {"distributed": "deepspeed", "deepspeed_stage": 3}, "resources.distributed"),
    ("resources", {"deepspeed_stage": 3}, "deepspeed_stage"),
    ("resources", {"gpu_count": 0}, "gpu_count"),
    ("algorithm_config__type", "Prefix", "algorithm_config"),
    ("algorithm_config__lora_attn_modules", ["attention"], "lora_attn_modules"),
    ("algorithm_config__quantize_base", True, "quantize_base"),
    ("algorithm_config__rank", 0, "rank"),
    ("hyperparam_search_config", {"lr": [1e-4, 1e-3]}, "hyperparam_search_config"),
    # A tracker's settings are checked (domain/tracking.py): W&B without a stored key, a setting TensorBoard has not,
    # a tracker this installation does not have.
    ("logger_config", {"type": "wandb", "project": "p"}, "logger_config"),
    ("logger_config", {"tensorboard": {"log_dir": "/tmp/tb"}}, "logger_config.tensorboard"),
    ("logger_config", {"comet": {"project": "p"}}, "logger_config.comet"),
    ("model", "/etc", "model"),
    ("checkpoint_dir", "/tmp", "checkpoint_dir"),
    ("training_config__unknown_field", 1, "unknown_field"),
]


@pytest.mark.parametrize("path,value,field", BAD, ids=[b[0] + "=" + str(b[1]) for b in BAD])
def test_each_bad_value_is_a_400_naming_its_field(api, client, dataset, path, value, field):
    before = len(client.post_training.job.list())
    r = httpx.post(f"{api.base_url}/v1/post-training/supervised-fine-tune",
                   json=request(api, job_uuid=f"bad-{path}", **{path: copy.deepcopy(value)}),
                   headers={"Authorization": f"Bearer {api.token}"})
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["status"] == 400 and field in body["detail"], body
    assert len(client.post_training.job.list()) == before


def test_logger_config_asks_for_a_tracker_in_either_shape(api, client, dataset):
    uri = "http://127.0.0.1:5000"
    for uuid, logger in (("mlflow-flat", {"type": "mlflow", "tracking_uri": uri, "experiment": "e"}),
                         ("mlflow-keyed", {"mlflow": {"tracking_uri": uri, "run_name": "r"}})):
        client.post_training.supervised_fine_tune(**request(api, job_uuid=uuid, logger_config=logger))
        assert client.post_training.job.status(job_uuid=uuid).status == "scheduled"
        client.post_training.job.cancel(job_uuid=uuid)
    with pytest.raises(llama_stack_client.BadRequestError) as e:
        client.post_training.supervised_fine_tune(**request(api, job_uuid="wandb", logger_config={
            "type": "wandb", "project": "p"}))
    body = e.value.body
    assert body["status"] == 400 and body["title"] and "no stored 'wandb' secret" in body["detail"], body
    assert "wandb" not in [j.job_uuid for j in client.post_training.job.list()]


def test_qat_is_refused(api, client, dataset):
    body = request(api, job_uuid="qat")
    body["algorithm_config"] = {"type": "QAT", "quantizer_name": "int8", "group_size": 32}
    with pytest.raises(llama_stack_client.BadRequestError) as e:
        client.post_training.supervised_fine_tune(**body)
    assert "QAT" in e.value.body["detail"]


def test_other_orgs_see_nothing(api, client, dataset):
    other = LlamaStackClient(base_url=api.base_url, api_key=api.key("globex"), max_retries=0)
    with pytest.raises(llama_stack_client.NotFoundError):
        other.post_training.job.status(job_uuid="sft-1")
    with pytest.raises(llama_stack_client.NotFoundError):
        other.datasets.retrieve("capitals")
    assert other.post_training.job.list() == [] and other.datasets.list() == []
    with pytest.raises(llama_stack_client.BadRequestError):  # training on another org's dataset
        other.post_training.supervised_fine_tune(**request(api, job_uuid="steal"))


def test_several_bad_values_are_one_400_with_all_in_detail(api, client, dataset):
    before = len(client.post_training.job.list())
    h = {"Authorization": f"Bearer {api.token}"}
    url = f"{api.base_url}/v1/post-training/supervised-fine-tune"
    # Translation's checks: all of them.
    body = request(api, job_uuid="many-1", training_config__dtype="int8",
                   training_config__data_config__dataset_id="missing", hyperparam_search_config={"lr": [1e-4]},
                   training_config__efficiency_config__enable_activation_offloading=True,
                   algorithm_config__lora_attn_modules=["attention"])
    r = httpx.post(url, json=body, headers=h)
    assert r.status_code == 400, r.text
    detail = r.json()["detail"]
    assert detail.startswith("5 problems:"), detail
    for field in ("training_config.dtype", "dataset_id", "hyperparam_search_config", "enable_activation_offloading",
                  "lora_attn_modules"):
        assert field in detail, (field, detail)
    # The service's checks, named the Llama Stack way: a model that is not one, 4-bit on a CPU machine.
    r = httpx.post(url, json=request(api, job_uuid="many-2", model="/etc", algorithm_config__quantize_base=True),
                   headers=h)
    assert r.status_code == 400 and r.json()["detail"].startswith("2 problems:"), r.text
    assert "model" in r.json()["detail"] and "algorithm_config.quantize_base" in r.json()["detail"]
    # pydantic's errors, every one.
    r = httpx.post(url, json=request(api, job_uuid="many-3", training_config__n_epochs=0,
                                     training_config__data_config__batch_size=0), headers=h)
    assert r.status_code == 400 and r.json()["detail"].startswith("2 problems:"), r.text
    assert "n_epochs" in r.json()["detail"] and "batch_size" in r.json()["detail"]
    assert len(client.post_training.job.list()) == before


def test_datasets_with_image_parts_are_accepted_and_a_bad_image_refused(client):
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buf, format="PNG")
    png = buf.getvalue()

    def row(data: bytes) -> dict:
        return {"dialog": [{"role": "user", "content": [
            {"type": "image", "image": {"data": base64.b64encode(data).decode()}},
            {"type": "text", "text": "What colour is this?"}]}, {"role": "assistant", "content": "Red."}]}

    url_row = {"dialog": [{"role": "user", "content": {"type": "image", "image": {"url": {
        "uri": "https://example.com/red.png"}}}}, {"role": "assistant", "content": "Red."}]}
    ds = client.datasets.register(purpose="post-training/messages",
                                  source={"type": "rows", "rows": [row(png), url_row]})
    client.datasets.unregister(ds.identifier)
    with pytest.raises(llama_stack_client.BadRequestError) as e:
        client.datasets.register(purpose="post-training/messages", source={"type": "rows",
                                                                           "rows": [row(png), row(png[:-30])]})
    assert "Row 2, message 1, content part 1: image 'data:;base64,...' is truncated" in e.value.body["detail"]
