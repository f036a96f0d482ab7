"""Continued training: a fine-tuned model's name (``ft:...``, or a checkpoint's ``ft:...:ckpt-step-N``) given as a
job's model, resolved to the base and the weights the new job starts from.

An adapter is continued, not merged: the new job loads the parent's adapter on the parent's base and trains that
same adapter on, so its output is again one adapter on the original base (loaded like any other), and a DPO job's
reference is the model it started from. A fully fine-tuned parent is a model directory: it becomes the base. The
resolution is scoped like every query (``visible``): another organisation's model is a 404, as if it did not
exist; a job that has not succeeded, or weights gone from disk, a 400.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select

from tuneyard.domain.errors import InvalidRequest, NotFound, Problems
from tuneyard.domain.jobs import JobStatus, fine_tuned_model_name
from tuneyard.domain.spec import AdapterSpec, ModelSpec, TrainingSpec
from tuneyard.jobdir import CHECKPOINT_MARKER, JobDir
from tuneyard.service.auth import Principal, visible
from tuneyard.store.db import Store
from tuneyard.store.models import Checkpoint, Job

CHECKPOINT_SUFFIX = re.compile(r":ckpt-step-(\d+)$")
# AdapterSpec field -> (the service's name for it in a refusal, its key in PEFT's adapter_config.json).
LORA_FIELDS = {"r": ("lora_r", "r"), "alpha": ("lora_alpha", "lora_alpha"), "dropout": ("lora_dropout", "lora_dropout"),
               "target_modules": ("target_modules", "target_modules"), "use_dora": ("use_dora", "use_dora"),
               "modules_to_save": ("modules_to_save", "modules_to_save")}
# ModelSpec fields a continuing job takes from its parent unless it says otherwise.
INHERITED_MODEL_FIELDS = ("model_type", "torch_dtype", "quant_bits", "secret_id")


@dataclass(frozen=True)
class Parent:
    """The fine-tuned model a job continues: its job's spec and the directory of its weights."""

    name: str
    spec: TrainingSpec
    weights: Path

    @property
    def is_adapter(self) -> bool:
        return self.spec.adapter.type == "lora"


def resolve(store: Store, who: Principal, name: str) -> Parent:
    """The succeeded job (of the caller's organisation) and the weights a fine-tuned model's name stands for."""
    missing = NotFound(f"The model '{name}' does not exist", param="model", code="model_not_found")
    step_match = CHECKPOINT_SUFFIX.search(name)
    model_name = name[:step_match.start()] if step_match else name
    job_id = "ftjob-" + model_name.rsplit(":", 1)[-1]
    with store.session() as s:
        job = s.scalar(select(Job).where(Job.id == job_id, visible(Job, who)))
        ck = None
        if job is not None and step_match:
            ck = s.scalar(select(Checkpoint).where(Checkpoint.job_id == job_id,
                                                   Checkpoint.step == int(step_match.group(1))))
    if job is None or model_name not in (job.fine_tuned_model,
                                         fine_tuned_model_name(job.model, job.org_id, job.suffix, job.id)):
        raise missing
    if job.status != JobStatus.SUCCEEDED:
        raise InvalidRequest(f"model '{name}': its fine-tuning job {job.id} has not succeeded (it is {job.status}); "
                             "a job continues a succeeded job's model or one of its checkpoints", param="model",
                             code="model_not_ready")
    spec = TrainingSpec.model_validate(job.spec)
    if step_match:
        if ck is None:
            raise missing
        weights = Path(ck.path)
        if not (weights / CHECKPOINT_MARKER).is_file():
            raise InvalidRequest(f"model '{name}': that checkpoint is no longer on disk", param="model",
                                 code="model_not_available")
    else:
        weights = JobDir(Path(job.output_dir)).output
    wanted = "adapter_config.json" if spec.adapter.type == "lora" else "config.json"
    if not (weights / wanted).is_file():
        raise InvalidRequest(f"model '{name}': its weights are no longer on disk ({wanted} missing)", param="model",
                             code="model_not_available")
    return Parent(name=name, spec=spec, weights=weights)


def continue_from(parent: Parent, spec: TrainingSpec) -> tuple[ModelSpec, AdapterSpec]:
    """The model and adapter of a job that continues ``parent``: what the caller left out taken from the parent,
    and every LoRA setting it gave that differs from the adapter it continues refused (all of them at once)."""
    asked = spec.model
    inherited = {f: getattr(parent.spec.model, f) for f in INHERITED_MODEL_FIELDS if f not in asked.model_fields_set}
    base = parent.spec.model
    if parent.is_adapter:
        model = asked.model_copy(update={**inherited, "name": base.name, "source": base.source,
                                         "revision": base.revision, "trust_remote_code": base.trust_remote_code,
                                         "init_adapter": str(parent.weights), "parent": parent.name})
        adapter = _same_adapter(parent, spec.adapter)
    else:
        # A full model is a model directory like any other: the job fine-tunes it, in full or with a new adapter.
        for field in ("quant_bits", "secret_id"):  # its base is a local directory, unquantised
            inherited.pop(field, None)
        model = asked.model_copy(update={**inherited, "name": str(parent.weights), "source": "local", "revision": None,
                                         "trust_remote_code": base.trust_remote_code, "init_adapter": None,
                                         "parent": parent.name})
        adapter = spec.adapter
        lora_asked = set(LORA_FIELDS) & adapter.model_fields_set
        if "type" not in adapter.model_fields_set and not lora_asked:
            adapter = adapter.model_copy(update={"type": "full"})
    if model.quant_bits in (4, 8) and adapter.type == "full":
        raise InvalidRequest(f"model '{parent.name}' was fully fine-tuned: continuing it in full cannot use a "
                             f"{model.quant_bits}-bit base; train an adapter (lora) on it or leave quant_bits out",
                             param="quant_bits")
    return model, adapter


def _same_adapter(parent: Parent, asked: AdapterSpec) -> AdapterSpec:
    """The parent's adapter settings, checked against those the caller gave explicitly."""
    have = parent.spec.adapter
    on_disk = _adapter_config(parent.weights)
    problems = Problems()
    if "type" in asked.model_fields_set and asked.type != "lora":
        problems.add(InvalidRequest(f"model '{parent.name}' is a LoRA adapter, and continuing it trains that adapter "
                                    "on: full fine-tuning (lora false) cannot continue it; leave lora out or true",
                                    param="lora", code="adapter_mismatch"))
    for field, (param, key) in LORA_FIELDS.items():
        if field not in asked.model_fields_set:
            continue
        value = getattr(asked, field)
        if not _same(field, value, getattr(have, field), on_disk.get(key)):
            problems.add(InvalidRequest(f"{param} {value!r} differs from the adapter of '{parent.name}' that the job "
                                        f"continues ({getattr(have, field)!r}); leave it out to continue that "
                                        "adapter as it is", param=param, code="adapter_mismatch"))
    problems.raise_if_any()
    return have.model_copy()


def _same(field: str, value: Any, have: Any, on_disk: Any) -> bool:
    if field == "target_modules":
        if value == "all-linear" or have == "all-linear":
            # PEFT stores "all-linear" as the module names it found; only the parent's spec knows the words.
            if value == have:
                return True
            # PEFT matches a short name against the end of a module's path: compare the layers' own names.
            names = value if value != "all-linear" else have
            return isinstance(on_disk, list) and set(names) == {str(t).rsplit(".", 1)[-1] for t in on_disk}
        return set(value) == set(have)
    if field == "modules_to_save":
        return set(value) == set(have)
    return value == have


def _adapter_config(weights: Path) -> dict[str, Any]:
    try:
        return json.loads((weights / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return {}
