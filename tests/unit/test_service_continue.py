"""The service resolves a fine-tuned model named as a job's model: what the new job inherits from its parent, what
it may change, and what is refused (the API-level refusals are in tests/api/test_continue_api.py)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from tuneyard.demo.tiny import sample_rows
from tuneyard.domain.errors import InvalidRequest
from tuneyard.domain.jobs import JobStatus, fine_tuned_model_name
from tuneyard.domain.spec import TrainingSpec
from tuneyard.jobdir import JobDir
from tuneyard.service import Services
from tuneyard.service.auth import Principal, ensure_org
from tuneyard.service.jobs import Submission
from tuneyard.settings import Settings
from tuneyard.store.repo import transition

WHO = Principal(org_id="acme", key_id="key-test", role="admin")
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture()
def svc(tmp_path):
    settings = Settings(home=tmp_path / "home", local_roots=str(tmp_path / "local"), gpu_count=0)
    (tmp_path / "local" / "base").mkdir(parents=True)
    services = Services.build(settings)
    ensure_org(services.store, "acme")
    services.file_id = services.files.create(WHO, io.BytesIO("".join(json.dumps(r) + "\n" for r in sample_rows())
                                                             .encode()), "t.jsonl", "fine-tune").id
    services.base = str(tmp_path / "local" / "base")
    yield services
    services.store.engine.dispose()


def submit(svc, model: dict, adapter: dict | None = None):
    spec = TrainingSpec.model_validate({"model": model, "data": {"train": {"file_id": svc.file_id}},
                                        **({"adapter": adapter} if adapter is not None else {})})
    return svc.jobs.submit(WHO, Submission(spec=spec, dialect="test", suffix="s"))


def succeeded_parent(svc, adapter: dict, **model) -> str:
    """A job as the worker leaves a succeeded one (its output written as the trainer writes it); its name."""
    job = submit(svc, {"name": svc.base, **model}, adapter)
    out = JobDir(Path(job.output_dir)).output
    out.mkdir(parents=True)
    if adapter.get("type") == "full":
        (out / "config.json").write_text("{}")
    else:
        # PEFT writes "all-linear" as the module paths it found.
        (out / "adapter_config.json").write_text(json.dumps({"r": adapter.get("r", 8), "target_modules": [
            f"model.layers.{i}.{'mlp' if m.endswith(('gate_proj', 'up_proj', 'down_proj')) else 'self_attn'}.{m}"
            for i in range(2) for m in LINEAR]}))
    name = fine_tuned_model_name(job.model, job.org_id, job.suffix, job.id)
    with svc.store.session(write=True) as s:
        for step in (JobStatus.QUEUED, JobStatus.RUNNING):
            transition(s, job.id, step)
        transition(s, job.id, JobStatus.SUCCEEDED, fine_tuned_model=name)
    return name


def resolved(job) -> TrainingSpec:
    return TrainingSpec.model_validate(job.spec)


def test_an_adapter_parent_is_continued_with_its_own_settings(svc):
    parent = succeeded_parent(svc, {"r": 16, "alpha": 32, "use_dora": True}, quant_bits=None, torch_dtype="float32")
    job = submit(svc, {"name": parent})
    spec = resolved(job)
    assert job.model == parent and spec.model.parent == parent and spec.model.name == svc.base
    assert spec.model.init_adapter.endswith("/output") and spec.model.torch_dtype == "float32"
    assert (spec.adapter.r, spec.adapter.alpha, spec.adapter.use_dora) == (16, 32, True)
    # Its own name keeps the original base, also one generation further down.
    grandchild = fine_tuned_model_name(job.model, "acme", "s", job.id)
    assert grandchild.startswith("ft:base:acme:s:")


def test_the_same_settings_are_accepted_and_all_linear_matches_its_modules(svc):
    parent = succeeded_parent(svc, {"r": 16})
    assert resolved(submit(svc, {"name": parent}, {"r": 16, "target_modules": LINEAR})).adapter.r == 16
    with pytest.raises(InvalidRequest) as e:
        submit(svc, {"name": parent}, {"r": 8, "target_modules": ["q_proj", "v_proj"], "type": "full"})
    assert [p.param for p in e.value.problems] == ["lora", "lora_r", "target_modules"]


def test_a_full_parent_is_the_base_of_the_new_job(svc):
    parent = succeeded_parent(svc, {"type": "full"})
    spec = resolved(submit(svc, {"name": parent}))
    assert spec.model.name.endswith("/output") and spec.model.source == "local" and spec.model.init_adapter is None
    assert spec.adapter.type == "full"  # continued as the parent was trained
    spec = resolved(submit(svc, {"name": parent}, {"r": 4}))
    assert spec.adapter.type == "lora" and spec.adapter.r == 4  # LoRA settings asked for: a new adapter on it


def test_the_starting_weights_cannot_be_given_directly(svc):
    with pytest.raises(InvalidRequest, match="cannot be given") as e:
        submit(svc, {"name": svc.base, "init_adapter": "/etc"})
    assert e.value.param == "model"
