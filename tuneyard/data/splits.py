"""The on-disk form of a prepared split: ``data/<split>/data.arrow``, one Arrow stream file, read memory-mapped.

The prepare step appends record batches to the file as it goes and renames the directory into place when
the split is complete, so it holds one batch in memory whatever the size of the data, and a half-written
split is never seen. (``Dataset.from_generator`` + ``save_to_disk`` wrote every row twice and paged the
whole first copy back in to write the second: peak memory grew with the data.)
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import datasets
    import pyarrow as pa

    from tuneyard.data.tokenize import Encoded

DATA_FILE = "data.arrow"
# A streaming job has no tokenised splits: ``data/stream.json`` says where the trainer reads the rows from.
STREAM_FILE = "stream.json"
# The column of a lazily tokenised split: each converted row as JSON, tokenised by the trainer.
LAZY_COLUMN = "row"


def token_features() -> datasets.Features:
    """Columns of a tokenised split."""
    import datasets

    return datasets.Features({"input_ids": datasets.List(datasets.Value("int32")),
                              "labels": datasets.List(datasets.Value("int32"))})


def row_features() -> datasets.Features:
    """The column of a lazily tokenised split."""
    import datasets

    return datasets.Features({LAZY_COLUMN: datasets.Value("string")})


def encoded_table(examples: list[Encoded]) -> pa.Table:
    """A table of tokenised examples, built from their int32 arrays without a Python object per token."""
    import pyarrow as pa

    lengths = np.fromiter((len(e.input_ids) for e in examples), dtype=np.int32, count=len(examples))
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int32))

    def column(arrays: list[np.ndarray]) -> pa.Array:
        flat = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int32)
        return pa.ListArray.from_arrays(offsets, pa.array(flat, type=pa.int32()))

    return pa.table({"input_ids": column([e.input_ids for e in examples]),
                     "labels": column([e.labels for e in examples])})


class SplitWriter:
    """Writes one split batch by batch into a temporary directory; ``commit`` renames it to ``out``."""

    def __init__(self, out: Path, features: datasets.Features | None) -> None:
        from datasets.arrow_writer import ArrowWriter

        self.out = out
        self.tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
        self.tmp.mkdir(parents=True)
        self.rows = 0
        self._writer = ArrowWriter(features=features, path=str(self.tmp / DATA_FILE))

    def write_table(self, table: pa.Table) -> None:
        """Append a table whose columns are the split's features."""
        if table.num_rows:
            self._writer.write_table(table)
            self.rows += table.num_rows

    def write_batch(self, columns: dict[str, list[Any]]) -> None:
        """Append rows given column by column."""
        n = len(next(iter(columns.values()), []))
        if n:
            self._writer.write_batch(columns)
            self.rows += n

    def commit(self) -> int:
        """Finish the file and move it into place (an empty split is removed instead); the row count."""
        self._writer.finalize()
        self._writer.close()
        shutil.rmtree(self.out, ignore_errors=True)
        if self.rows:
            self.tmp.rename(self.out)
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)
        return self.rows

    def abort(self) -> None:
        """Drop what was written."""
        try:
            self._writer.close()
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> SplitWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: Any) -> None:
        if kind is not None:
            self.abort()


def load_split(path: Path) -> datasets.Dataset:
    """A prepared split, memory-mapped (nothing is read into memory until used)."""
    import datasets

    file = path / DATA_FILE
    if not file.is_file():
        raise FileNotFoundError(f"no {DATA_FILE} in {path}")
    return datasets.Dataset.from_file(str(file))


def write_rows(out: Path, rows: list[dict[str, Any]], features: datasets.Features | None = None) -> int:
    """Write ``rows`` (dicts of one shape; features inferred unless given) as a split at ``out``; its row count."""
    columns = {key: [row[key] for row in rows] for key in rows[0]} if rows else {}
    with SplitWriter(out, features) as writer:
        writer.write_batch(columns)
        return writer.commit()
