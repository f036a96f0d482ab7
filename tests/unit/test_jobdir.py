"""The job-process files (tuneyard.jobdir): each model round-trips, reads the shape the previous version wrote,
and a malformed file is a ProtocolError naming the file and the field, never anything else."""

from __future__ import annotations

import json
import math

import pytest

from tuneyard.jobdir import (
    CHECKPOINT_MARKER,
    CheckpointMarker,
    EventWriter,
    Failed,
    JobDir,
    JobError,
    PreparedFailed,
    PreparedOk,
    ProtocolError,
    Stopped,
    StopRequest,
    Succeeded,
    iter_events,
    latest_complete_checkpoint,
    read_checkpoint_marker,
    write_checkpoint_marker,
)

HP = {"n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 1.0, "learning_rate": 0.0002,
      "per_device_batch_size": 4, "gradient_accumulation_steps": 1}


@pytest.fixture()
def jd(tmp_path) -> JobDir:
    return JobDir(tmp_path / "ftjob-1").create()


def _old_write(path, obj) -> None:
    """What the previous version's writer (``json.dumps(obj, default=str)``, NaN as is) put on disk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, default=str))


# ----- round trips -------------------------------------------------------------------------------
@pytest.mark.parametrize("prepared", [
    PreparedOk(n_train=18, n_validation=6, train_tokens=900, trainable_tokens=300, validation_tokens=200,
               truncated=1, dropped=2, total_steps=108, format="openai", template="chatml", hyperparameters=HP),
    PreparedOk(n_train=5, total_steps=5, hyperparameters=HP),  # lazy / streaming: no token counts
    PreparedFailed(error=JobError(code="invalid_training_file", message="Example 3: bad", param="training_file")),
], ids=["ok", "deferred", "failed"])
def test_prepared_round_trips(jd, prepared):
    jd.write_prepared(prepared)
    assert jd.read_prepared() == prepared


@pytest.mark.parametrize("result", [
    Succeeded(output_dir="/o", trained_tokens=10, trained_steps=2, final_metrics={"train_loss": 1.5,
                                                                                  "rewards_margins": 0.25},
              adapter=True),
    Stopped(reason="pause", step=12, checkpoint="/c/checkpoint-12"),
    Stopped(reason="cancel"),
    Failed(error=JobError(code="training_error", message="RuntimeError: boom", rank=1)),
], ids=["succeeded", "paused", "cancelled", "failed"])
def test_result_round_trips(jd, result):
    jd.write_result(result)
    assert jd.read_result() == result


def test_marker_stop_and_events_round_trip(jd):
    ckpt = jd.checkpoints / "checkpoint-4"
    ckpt.mkdir(parents=True)
    marker = CheckpointMarker(step=4, trained_tokens=99, metrics={"train_loss": 2.0}, spec={"method": "sft"})
    write_checkpoint_marker(ckpt, marker)
    assert read_checkpoint_marker(ckpt) == marker and latest_complete_checkpoint(jd.checkpoints) == ckpt

    for reason in ("pause", "drain", "cancel"):  # a later request replaces an earlier one
        jd.request_stop(reason)
        assert jd.stop_requested() == StopRequest(reason=reason)
    assert (jd.control / "stop").read_text() == "cancel"  # the bare reason: what every trainer version reads
    jd.clear_stop()
    assert jd.stop_requested() is None

    w = EventWriter(jd.events, "trainer")
    w.emit("metrics", "Step 1/2", {"step": 1, "total_steps": 2, "train_loss": float("nan"), "eta_s": 3.5})
    w.emit("checkpoint", "Checkpoint saved at step 2", {"step": 2, "path": str(ckpt), "metrics": {"train_loss": 1.0}})
    first, second = iter_events(jd.events)
    assert (first.seq, first.source, first.type, first.data["train_loss"]) == (1, "trainer", "metrics", None)
    assert (first.progress().step, first.progress().eta_s, first.checkpoint()) == (1, 3.5, None)
    assert second.checkpoint().step == 2 and second.checkpoint().path == str(ckpt)
    assert [e.seq for e in iter_events(jd.events, after_seq=1)] == [2]
    assert EventWriter(jd.events, "trainer").seq == 2  # a new writer continues the numbering


# ----- what the previous version wrote -------------------------------------------------------------
def test_files_in_the_previous_versions_shape_still_read(jd):
    """A job adopted after an upgrade: its files were written by the old code (plain dicts through json.dumps)."""
    _old_write(jd.prepared, {"ok": True, "n_train": 18, "n_validation": 0, "train_tokens": None,
                             "trainable_tokens": None, "validation_tokens": None, "truncated": 0, "dropped": 0,
                             "total_steps": 54, "format": "openai", "template": "chatml", "hyperparameters": HP})
    assert jd.read_prepared() == PreparedOk(n_train=18, total_steps=54, format="openai", template="chatml",
                                            hyperparameters=HP)
    _old_write(jd.prepared, {"ok": False, "error": {"code": "internal_error", "message": "data preparation failed: "
                                                    "KeyError: 'x'", "param": None}})
    assert jd.read_prepared() == PreparedFailed(error=JobError(code="internal_error",
                                                               message="data preparation failed: KeyError: 'x'"))

    # A diverged loss was written as NaN (not JSON, but what json.dumps writes): it reads, as NaN.
    _old_write(jd.result, {"status": "succeeded", "output_dir": "/o", "trained_tokens": 1234, "trained_steps": 48,
                           "final_metrics": {"train_loss": float("nan"), "valid_loss": 1.5}, "adapter": True})
    res = jd.read_result()
    assert isinstance(res, Succeeded) and res.trained_steps == 48 and math.isnan(res.final_metrics["train_loss"])
    _old_write(jd.result, {"status": "stopped", "reason": "drain", "step": 7, "checkpoint": None})
    assert jd.read_result() == Stopped(reason="drain", step=7)
    # From a rank other than 0, which alone names itself.
    _old_write(jd.result, {"status": "failed", "error": {"code": "training_error", "message": "boom", "rank": 1}})
    assert jd.read_result() == Failed(error=JobError(code="training_error", message="boom", rank=1))

    ckpt = jd.checkpoints / "checkpoint-12"
    _old_write(ckpt / CHECKPOINT_MARKER, {"step": 12, "trained_tokens": 600, "metrics": {"train_loss": 1.25},
                                          "spec": {"method": "sft"}})
    assert read_checkpoint_marker(ckpt) == CheckpointMarker(step=12, trained_tokens=600,
                                                            metrics={"train_loss": 1.25}, spec={"method": "sft"})
    _old_write(ckpt / CHECKPOINT_MARKER, {"step": 12})  # the fewest fields any version wrote
    assert read_checkpoint_marker(ckpt) == CheckpointMarker(step=12)

    (jd.control / "stop").write_text("pause")
    assert jd.stop_requested() == StopRequest(reason="pause")

    old = [{"seq": 1, "ts": 1.5, "source": "prepare", "type": "message", "level": "info", "message": "Validating",
            "data": {}},
           {"seq": 2, "ts": 2.5, "source": "trainer", "type": "message", "level": "info",
            "message": "Training resumed at step 12/48", "data": {"total_steps": 48, "start_step": 12,
                                                                   "n_epochs": 4}},
           {"seq": 3, "ts": 3.5, "source": "trainer", "type": "metrics", "level": "info", "message": "Step 13/48",
            "data": {"step": 13, "total_steps": 48, "trained_tokens": 650, "eta_s": None, "train_loss": 1.0}}]
    jd.events.write_text("".join(json.dumps(e) + "\n" for e in old))
    events = list(iter_events(jd.events))
    assert [e.model_dump() for e in events] == old
    assert events[1].start_step() == 12 and events[0].start_step() is None
    p = events[2].progress()
    assert (p.step, p.total_steps, p.trained_tokens, p.eta_s) == (13, 48, 650, None)


def test_unknown_fields_are_ignored(jd):
    """A newer writer may add fields (with defaults); an older reader must still read the rest."""
    _old_write(jd.result, {"status": "stopped", "reason": "pause", "step": 3, "checkpoint": None, "future": [1]})
    assert jd.read_result() == Stopped(reason="pause", step=3)


# ----- malformed files ------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "fragment"), [
    ("", "Invalid JSON"),
    ("{\"status\": \"succ", "Invalid JSON"),
    ("[1, 2]", "Input should be"),
    ("{\"trained_steps\": 3}", "status"),                                   # no discriminator
    ("{\"status\": \"exploded\"}", "status"),                               # an unknown outcome
    ("{\"status\": \"failed\", \"error\": {}}", "failed.error.code: Field required"),
    ("{\"status\": \"stopped\", \"reason\": \"nap\"}", "stopped.reason"),
    ("{\"status\": \"succeeded\", \"output_dir\": \"/o\", \"trained_steps\": \"many\"}", "succeeded.trained_steps"),
    (b"\xff\xfe{}", "Invalid JSON"),
], ids=["empty", "torn", "list", "no-status", "unknown-status", "error-without-code", "unknown-reason",
        "wrong-type", "not-utf8"])
def test_a_malformed_result_is_a_protocol_error_naming_file_and_field(jd, text, fragment):
    if isinstance(text, bytes):
        jd.result.write_bytes(text)
    else:
        jd.result.write_text(text)
    with pytest.raises(ProtocolError) as e:
        jd.read_result()
    assert e.value.path == jd.result and str(jd.result) in str(e.value) and fragment in str(e.value), e.value


@pytest.mark.parametrize(("obj", "fragment"), [
    ({"ok": True, "n_train": 3}, "total_steps: Field required"),
    ({"ok": True, "n_train": "three", "total_steps": 3, "hyperparameters": {}}, "n_train"),
    ({"ok": False}, "error: Field required"),
    ({"n_train": 3}, "ok"),
])
def test_a_malformed_prepared_is_a_protocol_error(jd, obj, fragment):
    _old_write(jd.prepared, obj)
    with pytest.raises(ProtocolError, match="prepared.json is unreadable") as e:
        jd.read_prepared()
    assert fragment in e.value.problem, e.value


def test_a_result_that_is_no_file_is_a_protocol_error(jd):
    jd.result.mkdir()
    with pytest.raises(ProtocolError, match="result.json is unreadable"):
        jd.read_result()


def test_a_malformed_marker_is_skipped_for_the_newest_complete_checkpoint(jd):
    for step in (4, 8):
        (jd.checkpoints / f"checkpoint-{step}").mkdir(parents=True)
        write_checkpoint_marker(jd.checkpoints / f"checkpoint-{step}", CheckpointMarker(step=step))
    (jd.checkpoints / "checkpoint-8" / CHECKPOINT_MARKER).write_text("{\"step\": \"eight\"}")
    with pytest.raises(ProtocolError, match="step"):
        read_checkpoint_marker(jd.checkpoints / "checkpoint-8")
    assert latest_complete_checkpoint(jd.checkpoints) == jd.checkpoints / "checkpoint-4"
    assert read_checkpoint_marker(jd.checkpoints / "checkpoint-12") is None  # no marker: incomplete


def test_event_lines_that_are_no_event_are_skipped(jd):
    good = {"seq": 1, "ts": 1.0, "source": "trainer", "type": "message", "level": "info", "message": "a", "data": {}}
    lines = [json.dumps(good), "not json", json.dumps([1]), json.dumps({"type": "message"}),  # no seq
             json.dumps({**good, "seq": 2, "type": "bogus"}), json.dumps({**good, "seq": 3, "data": [1]}),
             json.dumps({**good, "seq": 4, "message": "b"})]
    jd.events.write_text("\n".join(lines) + "\n" + json.dumps({**good, "seq": 5})[:20])  # torn last line
    assert [(e.seq, e.message) for e in iter_events(jd.events)] == [(1, "a"), (4, "b")]
    w = EventWriter(jd.events, "trainer")
    assert w.seq == 4


def test_progress_takes_only_numbers(jd):
    w = EventWriter(jd.events, "trainer")
    w.emit("progress", "p", {"step": 3.0, "total_steps": "ten", "trained_tokens": True, "eta_s": None})
    (ev,) = iter_events(jd.events)
    p = ev.progress()
    assert (p.step, p.total_steps, p.trained_tokens, p.eta_s) == (3, None, None, None)


@pytest.mark.parametrize("text", ["", "stop", "pause\n", "PAUSE", "{\"reason\": \"pause\"}"])
def test_a_stop_file_holding_anything_but_a_reason_is_a_cancel(jd, text):
    (jd.control / "stop").write_text(text)
    expected = "pause" if text == "pause\n" else "cancel"
    assert jd.stop_requested() == StopRequest(reason=expected)


def test_a_stop_file_that_cannot_be_read_is_a_cancel(jd):
    (jd.control / "stop").mkdir()
    assert jd.stop_requested() == StopRequest(reason="cancel")


def test_a_request_is_one_of_the_reasons():
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        StopRequest(reason="nap")
