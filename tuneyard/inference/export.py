"""Exporting a trained model: the adapter merged into its base, saved as one plain transformers model, and pushed
to a Hugging Face Hub repository. Runs in the inference process (``/v1/export``) or the CLI, never in the API."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

# Training state, not the model: an export is for using the model.
TRAINING_STATE = ("optimizer.pt", "scheduler.pt", "rng_state*.pth", "training_args.bin")
WEIGHTS = ("*.safetensors", "*.bin")


class ExportError(Exception):
    """An export that cannot be done as asked: the API turns it into the dialect's 4xx (nothing was pushed)."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "param": self.param, "code": self.code, "status": self.status}}


class HubPush(BaseModel):
    """Where an export goes on the Hub, with the token of the organisation's ``hf`` secret."""

    model_config = ConfigDict(extra="forbid")
    repo_id: str
    token: str
    private: bool = True

    def __repr__(self) -> str:  # the token never reaches a log line through a repr
        return f"HubPush(repo_id={self.repo_id!r}, private={self.private})"

    __str__ = __repr__


class ExportJob(BaseModel):
    """One export as the API hands it to the inference process: resolved paths only, no names or organisations."""

    model_config = ConfigDict(extra="forbid")
    source: str  # the job's output or checkpoint directory: an adapter, or a full model
    base: str  # the adapter's base (hub id or directory)
    out: str
    merged: bool = False
    trust_remote_code: bool = False
    max_bytes: int = 0  # the largest merged model this export may write; 0: no bound
    push: HubPush | None = None


def weights_bytes(model: str) -> int | None:
    """The size of a model's weight files (a directory, or a hub id already in the local cache); None: unknown."""
    path = Path(model)
    if not path.is_dir():
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(model, local_files_only=True))
        except Exception:  # noqa: BLE001 - not cached (or no such repo): the size is not known before loading
            return None
    return sum(p.stat().st_size for g in WEIGHTS for p in path.glob(g))


def check_hub(push: HubPush) -> None:
    """Refuse before any work when the Hub cannot be reached or the token is not accepted (nothing is pushed)."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError

    where = constants.ENDPOINT
    if constants.HF_HUB_OFFLINE:
        raise ExportError(f"The Hugging Face Hub cannot be reached from this server (HF_HUB_OFFLINE is set); "
                          f"nothing was pushed to {push.repo_id}", param="push_to_hub", code="hub_unreachable")
    try:
        HfApi(token=push.token).whoami()
    except HfHubHTTPError as e:
        status = getattr(e.response, "status_code", None)
        raise ExportError(f"The Hub at {where} refused the hf secret's token (HTTP {status}); nothing was pushed "
                          f"to {push.repo_id}", param="push_to_hub.secret_id", code="hub_token_refused") from None
    except Exception as e:  # noqa: BLE001 - any transport failure (refused, DNS, timeout, offline) is the same answer
        raise ExportError(f"The Hugging Face Hub at {where} cannot be reached from this server "
                          f"({type(e).__name__}: {e}); nothing was pushed to {push.repo_id}",
                          param="push_to_hub", code="hub_unreachable") from None


def push_folder(folder: Path, push: HubPush) -> str:
    """Create the repository (if need be) and upload ``folder`` to it; returns the repository's URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=push.token)
    url = api.create_repo(push.repo_id, private=push.private, repo_type="model", exist_ok=True)
    api.upload_folder(repo_id=push.repo_id, folder_path=str(folder), repo_type="model",
                      commit_message="Upload model exported by tuneyard")
    return str(url)


def run(job: ExportJob) -> dict[str, Any]:
    """Do one export: check the Hub first (when pushing), write the model to ``job.out``, push it."""
    if job.push is not None:
        check_hub(job.push)
    out = Path(job.out)
    if job.merged:
        if job.max_bytes and (size := weights_bytes(job.base)) is not None and size > job.max_bytes:
            raise ExportError(f"The base model's weights are {size} bytes, more than this server merges "
                              f"({job.max_bytes}, TUNEYARD_EXPORT_MAX_BYTES); export the adapter (merged: false) "
                              "and merge it with `tuneyard export --merged` where it fits", param="merged",
                              code="export_too_large", status=413)
        merge(job.source, job.base, out, trust_remote_code=job.trust_remote_code)
    else:
        shutil.copytree(job.source, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns(*TRAINING_STATE))
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    url = push_folder(out, job.push) if job.push is not None else None
    return {"bytes": size, "hub_url": url}


def merge(adapter_dir: str | Path, base: str, out_dir: str | Path, *, trust_remote_code: bool = False) -> Path:
    """Write ``base`` with the LoRA adapter at ``adapter_dir`` merged in (safetensors, with the tokenizer) to
    ``out_dir``: it loads with ``AutoModelForCausalLM.from_pretrained`` alone. A full fine-tune is copied."""
    adapter_dir, out = Path(adapter_dir), Path(out_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        shutil.copytree(adapter_dir, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns(*TRAINING_STATE))
        return out
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, trust_remote_code=trust_remote_code)
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out), safe_serialization=True)
    # The job's tokenizer (its chat template included) when it saved one, else the base's.
    source = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base
    AutoTokenizer.from_pretrained(str(source), trust_remote_code=trust_remote_code).save_pretrained(str(out))
    return out
