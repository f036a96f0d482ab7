"""Rows in, Arrow tables of tokenised examples out: in this process, or in a pool of processes, in order.

Rendering chat templates and finding answer spans is Python, one row at a time; on a big file it is most
of the work, so the prepare step hands chunks of rows to one process per core (each tokenises its chunk
with one batched call) and writes the tables they send back in the order of the rows. At most two chunks
per process are in flight, so memory stays flat whatever the size of the data.
"""

from __future__ import annotations

import dataclasses
import os
import random
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from typing import TYPE_CHECKING, Any

from tuneyard.data.tokenize import ConversationEncoder, EncodeError, EncodeStats

if TYPE_CHECKING:
    import pyarrow as pa

CHUNK_ROWS = 512


class RowError(Exception):
    """A row that cannot be encoded: ``n`` is its example number (1-based, as the validator counts)."""

    def __init__(self, n: int, message: str) -> None:
        super().__init__(f"Example {n}: {message}")
        self.n = n
        self.message = message

    def __reduce__(self) -> tuple:  # it crosses from a pool process
        return RowError, (self.n, self.message)


def split_positions(n: int, ratio: float, kind: str, seed: int) -> set[int]:
    """0-based positions of the examples that go to validation when it is carved from the training file."""
    if ratio <= 0 or n < 2:
        return set()
    n_val = min(n - 1, max(1, round(n * ratio)))
    if kind == "sequential":
        return set(range(n - n_val, n))
    return set(random.Random(seed).sample(range(n), n_val))


def default_workers() -> int:
    """One process per core this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def make_encoder(tokenizer: Any, options: dict[str, Any]) -> Any:
    """The encoder for ``options["rows"]``: supervised rows (the default), preference pairs or image rows."""
    opts = dict(options)
    rows = opts.pop("rows", "supervised")
    if rows == "preference":
        from tuneyard.data.preference import PreferenceEncoder

        return PreferenceEncoder(tokenizer, **opts)
    if rows == "vision":  # ``tokenizer`` is the model's processor
        from tuneyard.data.vision import VisionEncoder

        return VisionEncoder(tokenizer, **opts)
    opts.pop("data_dir", None)
    return ConversationEncoder(tokenizer, **opts)


def features_for(options: dict[str, Any]) -> Any:
    """The columns of a split that ``options``' encoder fills."""
    if options.get("rows") == "preference":
        from tuneyard.data.preference import preference_features

        return preference_features()
    if options.get("rows") == "vision":
        from tuneyard.data.vision import vision_features

        return vision_features()
    from tuneyard.data.splits import token_features

    return token_features()


def _table(encoder: Any, examples: list) -> pa.Table:
    from tuneyard.data.preference import PreferenceEncoder, preference_table
    from tuneyard.data.splits import encoded_table
    from tuneyard.data.vision import VisionEncoder, vision_table

    if isinstance(encoder, VisionEncoder):
        return vision_table(examples)
    return preference_table(examples) if isinstance(encoder, PreferenceEncoder) else encoded_table(examples)


def _encode_chunk(encoder: Any, chunk: list[tuple[int, dict]], stats: EncodeStats) -> pa.Table:
    try:
        encoded = encoder.encode([row for _, row in chunk], stats)
    except EncodeError as e:
        raise RowError(chunk[e.index or 0][0], str(e)) from None
    return _table(encoder, [e for e in encoded if e is not None])


_worker_encoder: Any = None


def _worker_init(tokenizer: Any, options: dict[str, Any]) -> None:
    global _worker_encoder
    # A process per core: each tokenises on one thread (read by tokenizers when it first encodes).
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_encoder = make_encoder(tokenizer, options)


def _worker_encode(chunk: list[tuple[int, dict]]) -> tuple[pa.Table, dict[str, int]]:
    assert _worker_encoder is not None
    stats = EncodeStats()
    table = _encode_chunk(_worker_encoder, chunk, stats)
    return table, dataclasses.asdict(stats)


def _chunks(rows: Iterator[tuple[int, dict]], size: int) -> Iterator[list[tuple[int, dict]]]:
    chunk: list[tuple[int, dict]] = []
    for item in rows:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _add(stats: EncodeStats, counts: dict[str, int]) -> None:
    for key, value in counts.items():
        setattr(stats, key, getattr(stats, key) + value)


def encode_stream(rows: Iterator[tuple[int, dict]], tokenizer: Any, options: dict[str, Any], stats: EncodeStats,
                  *, workers: int = 1, chunk_rows: int = CHUNK_ROWS) -> Iterator[pa.Table]:
    """Tables of the encoded ``(example number, row)`` pairs, in row order; RowError on a row that fails.

    ``options`` are the encoder's keyword arguments (and ``rows``, which encoder); ``stats`` receives the counts.
    """
    chunks = _chunks(rows, chunk_rows)
    if workers <= 1:
        encoder = make_encoder(tokenizer, options)
        for chunk in chunks:
            yield _encode_chunk(encoder, chunk, stats)
        return
    import multiprocessing

    # spawn, not fork: the tokenizer's Rust thread pool does not survive a fork.
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_worker_init, initargs=(tokenizer, options))
    pending: deque[Future] = deque()
    try:
        for chunk in chunks:
            pending.append(pool.submit(_worker_encode, chunk))
            if len(pending) >= 2 * workers:
                table, counts = pending.popleft().result()
                _add(stats, counts)
                yield table
        while pending:
            table, counts = pending.popleft().result()
            _add(stats, counts)
            yield table
    finally:
        for future in pending:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


def streamed_examples(manifest: dict[str, Any], split: str, tokenizer: Any,
                      options: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The examples of a streamed split (see the prepare step's ``stream.json``), read from the source file
    and tokenised chunk by chunk as the trainer asks for them."""
    from tuneyard.data.validate import iter_examples

    held = manifest.get("held_out")
    held_out = split_positions(held["n"], held["ratio"], held["kind"], held["seed"]) if held else set()
    if split == "validation" and manifest.get("validation"):
        src, keep = manifest["validation"], None
    elif split == "validation":
        src, keep = manifest["train"], True
    else:
        src, keep = manifest["train"], False
    rows = ((n, row) for pos, (n, row) in enumerate(iter_examples(src["path"], src["format"], src["container"]))
            if keep is None or (pos in held_out) == keep)
    encoder = make_encoder(tokenizer, options)
    for chunk in _chunks(rows, 64):
        try:
            encoded = encoder.encode([row for _, row in chunk])
        except EncodeError as e:
            raise RowError(chunk[e.index or 0][0], str(e)) from None
        for enc in encoded:
            if enc is not None:
                yield {"input_ids": enc.input_ids, "labels": enc.labels}
