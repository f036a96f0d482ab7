"""The models one inference process holds: each base model loaded once, the fine-tuned adapters of it stacked over
it with PEFT, all within a memory budget (the least recently used evicted first).

Not thread-safe: the inference server uses it from one generation at a time.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter, OrderedDict
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("tuneyard.inference")
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")


def is_adapter(path: str | Path) -> bool:
    """Whether ``path`` is a PEFT adapter directory (else a full model, or a hub id)."""
    return (Path(path) / "adapter_config.json").is_file()


def adapter_name(path: str) -> str:
    """The PEFT name of the adapter at ``path``: PEFT names become module keys, which may hold no '.'."""
    return "a" + hashlib.sha1(path.encode()).hexdigest()[:16]


def _has_tokenizer(path: str) -> bool:
    return (Path(path) / "tokenizer_config.json").is_file()


@dataclass
class _Base:
    path: str
    model: Any  # the transformers model, or a PeftModel over it once an adapter is loaded
    tokenizer: Any
    adapters: dict[str, Any] = field(default_factory=dict)  # adapter path -> its tokenizer (the job's own)


@dataclass
class Loaded:
    """A model ready to generate: ``active()`` makes the requested adapter (or none: the bare base) the one used."""

    model: Any
    tokenizer: Any
    adapter: str | None

    def active(self) -> AbstractContextManager:
        """The adapter switched on for the duration (or all adapters off, for the base)."""
        from peft import PeftModel

        if not isinstance(self.model, PeftModel):
            return nullcontext()
        if self.adapter is None:
            return self.model.disable_adapter()
        self.model.set_adapter(adapter_name(self.adapter))
        return nullcontext()


class ModelCache:
    """Base models and their adapters, loaded on first use and kept until the budget needs their memory."""

    def __init__(self, budget_bytes: int = 0, device: str = "cpu") -> None:
        self.budget = budget_bytes
        self.device = device
        self.bases: dict[str, _Base] = {}
        # (base, adapter or None) -> bytes held, least recently used first.
        self.lru: OrderedDict[tuple[str, str | None], int] = OrderedDict()
        self.base_loads: Counter[str] = Counter()
        self.adapter_loads: Counter[str] = Counter()
        self.evictions = 0

    @property
    def bytes_used(self) -> int:
        return sum(self.lru.values())

    def get(self, base: str, adapter: str | None = None, *, trust_remote_code: bool = False) -> Loaded:
        """``base`` with ``adapter`` over it, loading whichever is not loaded yet, then evicting beyond the budget."""
        b = self.bases.get(base) or self._load_base(base, trust_remote_code)
        self.lru.move_to_end((base, None))
        tokenizer = b.tokenizer
        if adapter is not None:
            if adapter not in b.adapters:
                self._load_adapter(b, adapter)
            self.lru.move_to_end((base, adapter))
            tokenizer = b.adapters[adapter] or b.tokenizer
        self._evict(keep={(base, None), (base, adapter)})
        return Loaded(b.model, tokenizer, adapter)

    def forget(self, path: str) -> bool:
        """Drop the adapters or models at or under ``path`` wherever they are loaded (their model was deleted)."""
        inside = path.rstrip("/") + "/"
        hit = [k for k in self.lru if any(p is not None and (p == path or p.startswith(inside)) for p in k)]
        for k in hit:
            if k in self.lru:
                self._drop(k)
        return bool(hit)

    def stats(self) -> dict[str, Any]:
        """What is loaded and how often each model was loaded, for /healthz."""
        return {"budget_bytes": self.budget, "bytes_used": self.bytes_used, "evictions": self.evictions,
                "base_loads": dict(self.base_loads), "adapter_loads": dict(self.adapter_loads),
                "loaded": [{"base": b, "adapter": a, "bytes": n} for (b, a), n in self.lru.items()]}

    # ----- loading and eviction ---------------------------------------------------------------
    def _load_base(self, path: str, trust_remote_code: bool) -> _Base:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        log.info("loading base model %s", path)
        dtype = torch.float32 if self.device == "cpu" else "auto"
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
        model.to(self.device).eval()
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        size = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
        b = self.bases[path] = _Base(path, model, tokenizer)
        self.lru[(path, None)] = size
        self.base_loads[path] += 1
        return b

    def _load_adapter(self, b: _Base, path: str) -> None:
        from peft import PeftModel

        log.info("loading adapter %s over %s", path, b.path)
        name = adapter_name(path)
        if isinstance(b.model, PeftModel):
            b.model.load_adapter(path, adapter_name=name)
        else:
            b.model = PeftModel.from_pretrained(b.model, path, adapter_name=name)
        b.model.eval()
        tokenizer = None
        if _has_tokenizer(path):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(path)
        b.adapters[path] = tokenizer
        size = sum((Path(path) / f).stat().st_size for f in ADAPTER_FILES if (Path(path) / f).is_file())
        self.lru[(b.path, path)] = size
        self.adapter_loads[path] += 1

    def _evict(self, keep: set[tuple[str, str | None]]) -> None:
        if not self.budget:
            return
        for k in list(self.lru):
            if self.bytes_used <= self.budget:
                return
            if k not in keep and k in self.lru:
                self._drop(k)
                self.evictions += 1

    def _drop(self, key: tuple[str, str | None]) -> None:
        base, adapter = key
        b = self.bases[base]
        if adapter is None:
            log.info("evicting base model %s and its adapters", base)
            for a in b.adapters:
                self.lru.pop((base, a), None)
            del self.bases[base]
            self.lru.pop(key)
            return
        log.info("evicting adapter %s", adapter)
        del b.adapters[adapter]
        self.lru.pop(key)
        if b.adapters:
            b.model.delete_adapter(adapter_name(adapter))
        else:
            # The last adapter: give the base back its own layers (unload() removes LoRA without merging).
            b.model = b.model.unload()
