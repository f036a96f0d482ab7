"""JobService refuses what this installation cannot honour at submit time, naming the field, and stores nothing."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest
from sqlalchemy import func, select

from tuneyard.demo.tiny import sample_rows
from tuneyard.domain.errors import InvalidRequest
from tuneyard.domain.spec import TrainingSpec
from tuneyard.service import Services
from tuneyard.service.auth import Principal, ensure_org
from tuneyard.service.jobs import Submission
from tuneyard.settings import Settings
from tuneyard.store.models import Job

WHO = Principal(org_id="acme", key_id="key-test", role="admin")


@pytest.fixture()
def svc(tmp_path):
    settings = Settings(home=tmp_path / "home", local_roots=str(tmp_path / "local"), gpu_count=0)
    (tmp_path / "local" / "model").mkdir(parents=True)
    services = Services.build(settings)
    ensure_org(services.store, "acme")
    yield services
    services.store.engine.dispose()


@pytest.fixture()
def file_id(svc):
    import json

    body = "".join(json.dumps(r) + "\n" for r in sample_rows()).encode()
    return svc.files.create(WHO, io.BytesIO(body), "train.jsonl", "fine-tune").id


def submit(svc, file_id, **over):
    raw = {"model": {"name": "org/base"}, "data": {"train": {"file_id": file_id}}}
    for section, values in over.items():
        raw[section] = {**raw.get(section, {}), **values} if isinstance(values, dict) else values
    return svc.jobs.submit(WHO, Submission(spec=TrainingSpec.model_validate(raw), dialect="test"))


@pytest.mark.parametrize("over,param,fragment", [
    ({"model": {"name": "/etc"}}, "model", "outside the allowed local roots"),
    ({"model": {"name": "not a model id"}}, "model", "neither a Hugging Face hub id"),
    # SFT trains VLMs (issue 15); DPO does not yet, and says so.
    ({"method": "dpo", "model": {"name": "org/base", "model_type": "vlm"}}, "model_type",
     r"preference optimisation \(DPO\) does not train vision-language models"),
    ({"resources": {"distributed": "fsdp"}}, "distributed", "'fsdp' needs CUDA GPUs: on CPU ranks"),
    ({"resources": {"distributed": "deepspeed"}}, "distributed", "'deepspeed' needs CUDA GPUs"),
    ({"model": {"name": "org/base", "model_type": "vlm"}, "data": {"packing": True}}, "packing",
     "not available for vision-language models"),
    ({"vision": {"freeze_vit": False}}, "freeze_vit", "applies to vision-language models"),
    ({"resources": {"node_count": 2}}, "node_count", "one node"),
    ({"resources": {"device": "cuda"}}, "device", "has none"),
    ({"model": {"name": "org/base", "quant_bits": 4}}, "quant_bits", "needs a CUDA GPU"),
    ({"model": {"name": "org/base", "torch_dtype": "float16"}}, "torch_dtype", "needs a CUDA GPU"),
    ({"data": {"streaming": True, "packing": True}}, "streaming", "cannot be combined"),
    ({"data": {"lazy_tokenize": True, "packing": True}}, "lazy_tokenize", "cannot be combined"),
    ({"data": {"lazy_tokenize": True, "truncation": "drop"}}, "lazy_tokenize", "keeps every row"),
    # DPO is a recipe now; what it does not take is refused from the capabilities table.
    ({"method": "dpo", "data": {"packing": True}}, "packing", r"not available for preference optimisation"),
    ({"method": "dpo", "data": {"train_on_input": True}}, "train_on_input", r"preference optimisation"),
    ({"method": "dpo", "hyperparameters": {"dpo_loss": "kto_pair"}}, "dpo_loss", r"'kto_pair' is not offered"),
    ({"hyperparameters": {"beta": 0.5}}, "beta", r"applies to preference optimisation \(DPO\) only"),
    # Trackers (domain/tracking.py): W&B needs a stored key; each tracker's settings are checked.
    ({"integrations": [{"type": "wandb", "config": {"project": "p"}}]}, "integrations", r"no stored 'wandb' secret"),
    ({"integrations": [{"type": "mlflow", "param": "logger_config"}]}, "logger_config",
     r"^logger_config: mlflow.tracking_uri: Field required"),
    ({"integrations": [{"type": "comet"}]}, "integrations", r"tracker 'comet' is not available"),
])
def test_unsupported_requests_are_refused_and_nothing_is_stored(svc, file_id, over, param, fragment):
    with pytest.raises(InvalidRequest, match=fragment) as e:
        submit(svc, file_id, **over)
    assert e.value.param == param
    with svc.store.session() as s:
        assert s.scalar(select(func.count()).select_from(Job)) == 0
    assert not (svc.settings.jobs_dir / "acme").exists() or not any((svc.settings.jobs_dir / "acme").iterdir())


def test_unknown_or_foreign_file_is_refused(svc, file_id):
    with pytest.raises(InvalidRequest, match="not found") as e:
        submit(svc, "file-doesnotexist")
    assert e.value.param == "training_file"
    other = Principal(org_id="globex", key_id="k2", role="admin")
    ensure_org(svc.store, "globex")
    spec = TrainingSpec.model_validate({"model": {"name": "org/base"}, "data": {"train": {"file_id": file_id}}})
    with pytest.raises(InvalidRequest, match="not found"):
        svc.jobs.submit(other, Submission(spec=spec, dialect="test"))


def test_a_good_submission_writes_the_spec_with_resolved_paths(svc, file_id, tmp_path):
    job = submit(svc, file_id, model={"name": str(tmp_path / "local" / "model")})
    assert job.status == "validating_files"
    stored = TrainingSpec.model_validate(job.spec)
    assert stored.model.source == "local" and stored.data.train.path.startswith(str(svc.settings.files_dir))


def test_the_api_process_does_not_import_torch():
    code = ("import sys, tuneyard.api.app, tuneyard.scheduler.worker, tuneyard.cli; "
            "print(sorted({'torch', 'transformers', 'datasets', 'trl', 'peft'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_unfinished_jobs_per_org_are_capped(svc, file_id):
    from tuneyard.domain.errors import RateLimited

    svc.settings.max_active_jobs_per_org = 2
    first = submit(svc, file_id)
    submit(svc, file_id)
    with pytest.raises(RateLimited, match="2 unfinished jobs") as e:
        submit(svc, file_id)
    assert e.value.status_code == 429 and e.value.code == "quota_exceeded" and e.value.headers["retry-after"]
    svc.jobs.cancel(WHO, first.id)  # a finished job frees its place
    submit(svc, file_id)


def test_the_operator_turns_torch_compile_on_for_every_job(tmp_path, file_id, svc):
    assert TrainingSpec.model_validate(submit(svc, file_id).spec).resources.torch_compile is False
    svc.jobs.settings = svc.jobs.settings.model_copy(update={"torch_compile": True})
    assert TrainingSpec.model_validate(submit(svc, file_id).spec).resources.torch_compile is True


def test_models_lists_only_models_that_exist(svc, file_id):
    from tuneyard.domain.errors import NotFound
    from tuneyard.domain.jobs import JobStatus as St
    from tuneyard.store.repo import transition

    svc.models.settings = svc.models.settings.model_copy(update={"base_models": "org/configured-base"})

    def finish(job, *steps, **fields):
        with svc.store.session(write=True) as s:
            for step in steps:
                assert transition(s, job.id, step, **(fields if step == steps[-1] else {}))

    failed = submit(svc, file_id, model={"name": "gpt-4o-mini"})
    finish(failed, St.FAILED, error={"code": "model_not_found", "message": "no such model"})
    done = submit(svc, file_id, model={"name": "org/trained-base"})
    finish(done, St.QUEUED, St.RUNNING, St.SUCCEEDED, fine_tuned_model="ft:trained-base:acme::x1")
    submit(svc, file_id, model={"name": "org/still-validating"})
    ids = [m[0] for m in svc.models.models(WHO)]
    assert ids == ["org/configured-base", "ft:trained-base:acme::x1"]
    assert svc.models.model(WHO, "ft:trained-base:acme::x1")[2] == "acme"
    assert svc.models.model(WHO, "org/configured-base")[0] == "org/configured-base"
    for missing in ("gpt-4o-mini", "org/trained-base", "org/still-validating"):
        with pytest.raises(NotFound) as e:
            svc.models.model(WHO, missing)
        assert e.value.code == "model_not_found"
    other = Principal(org_id="globex", key_id="k2", role="admin")
    ensure_org(svc.store, "globex")
    assert [m[0] for m in svc.models.models(other)] == ["org/configured-base"]
    with pytest.raises(NotFound):
        svc.models.model(other, "ft:trained-base:acme::x1")


def test_the_installation_settings_reach_the_jobs_through_the_spec(file_id, svc):
    """Job processes read no TUNEYARD_* variable: the service writes what they need into the spec (runtime)."""
    svc.jobs.settings = svc.jobs.settings.model_copy(update={
        "flash_attention": False, "max_tokens_per_job": 7, "s3_endpoint_url": "http://127.0.0.1:9",
        "tokenised_cache_bytes": 0, "prepare_workers": 3})
    # A caller cannot set it: whatever a spec arrives with, the installation's settings replace it.
    runtime = TrainingSpec.model_validate(submit(svc, file_id, runtime={"max_tokens_per_job": 10**9}).spec).runtime
    assert (runtime.flash_attention, runtime.max_tokens_per_job, runtime.s3_endpoint_url) == (
        False, 7, "http://127.0.0.1:9")
    assert (runtime.tokenised_cache_dir, runtime.prepare_workers, runtime.liger_kernels) == (None, 3, True)


def test_the_launcher_is_chosen_by_its_setting():
    from tuneyard.scheduler.launcher import make_launcher
    from tuneyard.scheduler.local import LocalLauncher

    assert isinstance(make_launcher(Settings(launcher="local", prepare_standby=False)), LocalLauncher)
    # Refused with the settings, before any process starts: never a server that fails its first submission.
    with pytest.raises(ValueError, match="TUNEYARD_LAUNCHER='nope': there is no such launcher"):
        Settings(launcher="nope")


def test_openai_resources_extension_and_the_gpu_default(tmp_path, file_id, svc):
    """OpenAI's request names devices and strategy through tuneyard's ``resources`` extension; without it a GPU
    job gets TUNEYARD_GPUS_PER_JOB, a CPU job TUNEYARD_CPU_PROCS_PER_JOB ranks."""
    import json

    from tuneyard.api.dialects.openai.schemas import CreateJobIn
    from tuneyard.api.dialects.openai.translate import to_submission
    from tuneyard.domain.errors import Problems

    def submitted(service, fid, **body):
        req = CreateJobIn(model="org/base", training_file=fid, hyperparameters={"batch_size": 4}, **body)
        return TrainingSpec.model_validate(service.jobs.submit(WHO, to_submission(req, None, Problems())).spec)

    # This machine has no GPU: the count asked for is the number of gloo ranks.
    assert submitted(svc, file_id, resources={"gpu_count": 2}).resources.nproc_per_node == 2
    assert submitted(svc, file_id).resources.nproc_per_node == 1
    with pytest.raises(InvalidRequest, match="'fsdp' needs CUDA GPUs") as e:
        submitted(svc, file_id, resources={"distributed": "fsdp", "fsdp_cpu_offload": True})
    assert e.value.param == "resources.distributed"
    with pytest.raises(ValueError, match="deepspeed_stage applies to distributed 'deepspeed', not 'ddp'"):
        CreateJobIn(model="m", training_file=file_id, resources={"deepspeed_stage": 3})

    # Two GPUs (TUNEYARD_GPU_COUNT) and TUNEYARD_GPUS_PER_JOB=2: a request without a count gets both.
    gpu = Services.build(Settings(home=tmp_path / "gpu", local_roots=str(tmp_path / "local"), gpu_count=2,
                                  gpus_per_job=2))
    try:
        ensure_org(gpu.store, "acme")
        body = "".join(json.dumps(r) + "\n" for r in sample_rows()).encode()
        fid = gpu.files.create(WHO, io.BytesIO(body), "t.jsonl", "fine-tune").id
        spec = submitted(gpu, fid)
        assert (spec.resources.nproc_per_node, spec.resources.distributed) == (2, "ddp")
        spec = submitted(gpu, fid, resources={"gpu_count": 1, "distributed": "fsdp",
                                              "fsdp_reshard_after_forward": False})
        assert (spec.resources.nproc_per_node, spec.resources.fsdp_reshard_after_forward) == (1, False)
        with pytest.raises(InvalidRequest, match="needs the deepspeed package") as e:
            submitted(gpu, fid, resources={"distributed": "deepspeed"})
        assert e.value.param == "resources.distributed"
        with pytest.raises(InvalidRequest, match="3 GPUs per node asked for, but this installation has 2"):
            submitted(gpu, fid, resources={"gpu_count": 3})
    finally:
        gpu.store.engine.dispose()
