"""Shared storage on a directory: a checkpoint counts once its marker is uploaded, and the marker goes last."""

from __future__ import annotations

import pytest

from tuneyard.jobdir import CHECKPOINT_MARKER
from tuneyard.storage import LocalStorage, StorageError, complete_checkpoints, get_dir, open_storage, put_dir


def test_a_directory_goes_up_marker_last_and_comes_back_whole(tmp_path):
    ckpt = tmp_path / "local" / "checkpoint-4"
    (ckpt / "sub").mkdir(parents=True)
    for name in (CHECKPOINT_MARKER, "adapter.safetensors", "sub/rng_state.pth", "zz.json"):
        (ckpt / name).write_text(name)
    written = []
    store = open_storage(str(tmp_path / "store"))
    assert isinstance(store, LocalStorage)
    real = store.put_file
    store.put_file = lambda local, key: (written.append(key), real(local, key))  # type: ignore[method-assign]
    put_dir(store, ckpt, "jobs/o/j/checkpoints/checkpoint-4", last=CHECKPOINT_MARKER)
    assert written[-1].endswith(CHECKPOINT_MARKER) and len(written) == 4
    # One without its marker (an upload cut off) is not complete.
    (tmp_path / "store/jobs/o/j/checkpoints/checkpoint-8").mkdir()
    (tmp_path / "store/jobs/o/j/checkpoints/checkpoint-8/adapter.safetensors").write_text("half")
    assert complete_checkpoints(store, "jobs/o/j/checkpoints", CHECKPOINT_MARKER) == [
        (4, "jobs/o/j/checkpoints/checkpoint-4")]
    assert get_dir(store, "jobs/o/j/checkpoints/checkpoint-4", tmp_path / "back") == 4
    assert (tmp_path / "back/sub/rng_state.pth").read_text() == "sub/rng_state.pth"
    assert not store.get_file("jobs/o/j/nothing", tmp_path / "x")
    store.delete_prefix("jobs/o/j")
    assert store.list("jobs/o/j") == []


def test_a_location_that_is_neither_s3_nor_an_absolute_path_is_refused():
    assert open_storage("s3://bucket/prefix").prefix == "prefix"  # type: ignore[union-attr]
    with pytest.raises(StorageError, match="TUNEYARD_STORAGE_URL"):
        open_storage("relative/dir")

