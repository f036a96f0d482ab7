"""A Ray rank's checkpoint uploads (``scheduler/ray_rank.py``) on directory storage: newest first, and a
checkpoint the trainer rotates away mid-upload leaves nothing half-written behind."""

from __future__ import annotations

import shutil

from tuneyard.jobdir import CHECKPOINT_MARKER
from tuneyard.scheduler.ray_rank import RankActor
from tuneyard.storage import complete_checkpoints


def test_a_rank_uploads_the_newest_checkpoint_first_and_survives_one_rotated_away_mid_upload(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "node"))
    actor = RankActor("ftjob-x", "jobs/o/ftjob-x", 0, {"url": str(tmp_path / "store")})
    for step in (4, 8, 12):
        d = actor.jd.checkpoints / f"checkpoint-{step}"
        d.mkdir(parents=True)
        for name in ("adapter.safetensors", "optimizer.pt", CHECKPOINT_MARKER):
            (d / name).write_text(f"{step}")
    uploaded = []
    real = actor.storage.put_file

    def put(local, key):
        uploaded.append(key)
        if key.endswith("checkpoint-4/adapter.safetensors"):  # the trainer rotates checkpoint-4 away meanwhile
            shutil.rmtree(actor.jd.checkpoints / "checkpoint-4")
        real(local, key)

    actor.storage.put_file = put  # type: ignore[method-assign]
    actor._sync_checkpoints()
    assert uploaded[0].endswith("checkpoint-12/adapter.safetensors")
    assert [s for s, _ in complete_checkpoints(actor.storage, "jobs/o/ftjob-x/checkpoints", CHECKPOINT_MARKER)] == [
        8, 12]
    assert actor.storage.list("jobs/o/ftjob-x/checkpoints/checkpoint-4") == []
    assert actor._uploaded == {"checkpoint-8", "checkpoint-12"}
