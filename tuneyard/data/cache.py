"""A cache of tokenised datasets, so a second job on the same data and tokenizer does not tokenise again.

The key covers everything that changes the tokens: the bytes of the source files, the tokenizer (its
vocabulary, special tokens and chat template), the resolved template, every encode option and the
split, and the code that tokenises. Entries are built in a temporary directory and renamed into place
(two prepare steps may race; the loser discards its copy); a job gets hard links to the cached files
(a copy where the filesystem refuses links). Least recently used entries go when the cache is over size.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

META = "meta.json"
CHUNK = 1024 * 1024
# The modules whose code decides the tokens: a change to any of them makes old entries stale.
_CODE = ("formats.py", "templates.py", "tokenize.py", "prepare.py")


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def tokenizer_digest(tokenizer: Any) -> str:
    """A fingerprint of a tokenizer: vocabulary and merges (fast tokenizers), special tokens, chat template."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps(getattr(tokenizer, "special_tokens_map", {}), sort_keys=True, default=str).encode())
    h.update(str(getattr(tokenizer, "chat_template", None)).encode())
    return h.hexdigest()


def code_digest() -> str:
    """A fingerprint of the tokenising code itself."""
    here = Path(__file__).parent
    h = hashlib.sha256()
    for name in _CODE:
        h.update((here / name).read_bytes())
    return h.hexdigest()


def cache_key(parts: dict[str, Any]) -> str:
    """The key of one tokenisation: a hash of every input that changes its result."""
    return hashlib.sha256(json.dumps({**parts, "code": code_digest()}, sort_keys=True, default=str).encode()
                          ).hexdigest()[:32]


class TokenisedCache:
    """Tokenised ``train``/``validation`` datasets by key, under ``root``, at most ``max_bytes`` in all."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes

    def fetch(self, key: str, dest: Path) -> dict[str, Any] | None:
        """Place the cached splits of ``key`` in ``dest`` and return their metadata; None on a miss."""
        entry = self.root / key
        meta_path = entry / META
        if not meta_path.is_file():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            for split in meta.get("splits", []):
                target = dest / split
                shutil.rmtree(target, ignore_errors=True)
                shutil.copytree(entry / split, target, copy_function=_link_or_copy)
        except (OSError, ValueError):
            return None  # evicted or damaged meanwhile: tokenise again
        os.utime(meta_path)  # least recently *used*
        return meta

    def store(self, key: str, source: Path, splits: list[str], meta: dict[str, Any]) -> None:
        """Put the splits found under ``source`` in the cache as ``key`` (no-op if another job did first)."""
        entry = self.root / key
        if (entry / META).is_file():
            return
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{key}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            for split in splits:
                shutil.copytree(source / split, tmp / split, copy_function=_link_or_copy)
            (tmp / META).write_text(json.dumps({**meta, "splits": splits, "created_at": time.time()}))
            tmp.rename(entry)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)  # lost the race, or no room: the job has its own copy
            return
        self.evict()

    def evict(self) -> None:
        """Drop least recently used entries until the cache fits ``max_bytes``."""
        entries = []
        for e in self.root.iterdir() if self.root.is_dir() else ():
            meta = e / META
            if e.is_dir() and meta.is_file():
                size = sum(f.stat().st_size for f in e.rglob("*") if f.is_file())
                entries.append((meta.stat().st_mtime, size, e))
        total = sum(size for _, size, _ in entries)
        for _, size, e in sorted(entries):
            if total <= self.max_bytes:
                break
            shutil.rmtree(e, ignore_errors=True)
            total -= size


def _link_or_copy(src: str, dst: str) -> None:
    # Arrow files are never written in place once saved, so sharing them between jobs is safe.
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
