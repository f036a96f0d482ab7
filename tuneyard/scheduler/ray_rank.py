"""One trainer rank of a job on a Ray node: a Ray actor that runs ``python -m tuneyard.trainer`` in a job
directory of its own on that node, filled from the shared storage (``tuneyard.storage``).

Every rank downloads the job's inputs (spec, prepared data, the newest complete checkpoint). Rank 0 alone
writes events, checkpoints and outputs (as on one machine); its actor uploads each complete checkpoint (marker
last), the output and the result to the storage, removes there the checkpoints its trainer rotated away, and
hands the lines it appended to events.jsonl to the worker, which asks for them (``events``): the worker need
not share a filesystem with any node. Imported on the Ray nodes only (and by the Ray launcher).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from tuneyard.jobdir import CHECKPOINT_MARKER, JobDir, StopReason
from tuneyard.storage import complete_checkpoints, get_dir, open_storage, put_dir

# What a rank needs besides the data directory: each file of the job directory the trainer reads.
INPUT_FILES = ("resolved_spec.json", "prepared.json", "events.jsonl", "tracking/runs.json")
SYNC_SECONDS = 1.0


def _die_with_parent() -> None:
    # The trainer must not outlive its actor: a node whose Ray processes are killed leaves no rank training on.
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    os.setsid()


class RankActor:
    """A trainer rank on this node (wrapped with ``ray.remote`` by the launcher)."""

    def __init__(self, job_id: str, job_key: str, rank: int, storage: dict[str, Any], python: str | None = None
                 ) -> None:
        self.job_id, self.job_key, self.rank = job_id, job_key, rank
        self.storage = open_storage(storage["url"], credentials=storage.get("credentials"),
                                    endpoint_url=storage.get("endpoint_url"))
        self.python = python or sys.executable
        self.root = Path(tempfile.gettempdir()) / "tuneyard-ray" / job_id / f"rank{rank}"
        self.jd = JobDir(self.root)
        self.proc: subprocess.Popen | None = None
        self.code: int | None = None
        self._events_base = 0
        self._uploaded: set[str] = set()
        self._done = threading.Event()
        self.error: str | None = None

    def address(self) -> tuple[str, int]:
        """This node's IP and a free port on it: the rendezvous address when this is rank 0."""
        import ray

        ip = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((ip, 0))
            return ip, s.getsockname()[1]

    def start(self, env: dict[str, str]) -> int:
        """Download the inputs and start the trainer with ``env`` (the rendezvous variables among it); the size of
        events.jsonl it starts from."""
        shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(parents=True)
        for name in INPUT_FILES:
            self.storage.get_file(f"{self.job_key}/{name}", self.root / name)
        get_dir(self.storage, f"{self.job_key}/data", self.jd.data)
        found = complete_checkpoints(self.storage, f"{self.job_key}/checkpoints", CHECKPOINT_MARKER)
        if found:
            step, key = found[-1]
            get_dir(self.storage, key, self.jd.checkpoints / f"checkpoint-{step}")
            self._uploaded.add(f"checkpoint-{step}")
        self._events_base = self.jd.events.stat().st_size if self.jd.events.exists() else 0
        self.jd.logs.mkdir(parents=True, exist_ok=True)
        full = {**os.environ, **env, "PYTHONUNBUFFERED": "1", "TUNEYARD_JOB_ID": self.job_id}
        with (self.jd.logs / f"train-rank{self.rank}.log").open("ab") as log:
            self.proc = subprocess.Popen([self.python, "-m", "tuneyard.trainer", str(self.root)], env=full,
                                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         cwd=str(self.root), preexec_fn=_die_with_parent)
        threading.Thread(target=self._supervise, daemon=True).start()
        return self._events_base

    def _supervise(self) -> None:
        assert self.proc is not None
        while True:
            try:
                code = self.proc.wait(SYNC_SECONDS)
            except subprocess.TimeoutExpired:
                code = None
            if self.rank == 0:
                try:
                    self._sync_checkpoints()
                    if code is not None:
                        self._upload_outcome()
                except Exception as e:  # reported through poll(): the worker decides what a lost upload means
                    self.error = f"{type(e).__name__}: {e}"
            if code is not None:
                self.code = code
                self._done.set()
                return

    def _sync_checkpoints(self) -> None:
        ckpts = self.jd.checkpoints
        local = {d.name for d in ckpts.glob("checkpoint-*") if (d / CHECKPOINT_MARKER).is_file()} \
            if ckpts.is_dir() else set()
        # Newest first: a resume wants the newest, and the older ones are the next the trainer rotates away.
        for name in sorted(local - self._uploaded, key=lambda n: -int(n.removeprefix("checkpoint-"))):
            key = f"{self.job_key}/checkpoints/{name}"
            try:
                put_dir(self.storage, ckpts / name, key, last=CHECKPOINT_MARKER)
            except FileNotFoundError:
                # A complete checkpoint loses files only when the trainer rotates it away (saves can come faster
                # than uploads): its marker never went up, so the storage holds no complete copy; take the
                # partial one away too.
                self.storage.delete_prefix(key)
                continue
            self._uploaded.add(name)
        # The trainer rotates its checkpoints (save_total_limit): the storage keeps the same ones.
        for name in sorted(self._uploaded - local):
            self.storage.delete_prefix(f"{self.job_key}/checkpoints/{name}")
            self._uploaded.discard(name)

    def _upload_outcome(self) -> None:
        if self.jd.output.is_dir():
            self.storage.delete_prefix(f"{self.job_key}/output")
            put_dir(self.storage, self.jd.output, f"{self.job_key}/output")
        for name in ("tracking/runs.json", "result.json"):
            if (self.root / name).is_file():
                self.storage.put_file(self.root / name, f"{self.job_key}/{name}")

    def poll(self) -> tuple[int | None, str | None]:
        """(exit code once the trainer ended and rank 0's uploads are done, else None; an upload error)."""
        return (self.code if self._done.is_set() else None), self.error

    def events(self, offset: int, root: str) -> tuple[int, bytes]:
        """The whole lines of events.jsonl from byte ``offset`` on (rank 0's; nothing on other ranks): how many
        bytes they are here, and the lines with this rank's directory written as ``root`` (the worker's job
        directory, where the paths they name are mirrored)."""
        if self.rank != 0 or not self.jd.events.exists():
            return 0, b""
        with self.jd.events.open("rb") as f:
            f.seek(offset)
            data = f.read(8 * 2**20)
        data = data[:data.rfind(b"\n") + 1]
        return len(data), data.replace(str(self.root).encode(), root.encode())

    def local_root(self) -> str:
        """This rank's job directory on its node."""
        return str(self.root)

    def stop(self, reason: StopReason) -> None:
        """Ask the trainer to stop at its next step (rank 0 reads the file and tells the others)."""
        self.jd.request_stop(reason)

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the trainer's process group."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)

    def resident_bytes(self) -> int:
        """Memory the trainer holds (its proportional set size)."""
        from tuneyard.scheduler.local import resident_bytes

        return resident_bytes([self.proc.pid]) if self.proc is not None and self.proc.poll() is None else 0

    def cleanup(self) -> None:
        """Kill the trainer if it still runs and remove this rank's directory."""
        self.signal(signal.SIGKILL)
        if self.proc is not None:
            with contextlib.suppress(Exception):
                self.proc.wait(10)
        shutil.rmtree(self.root, ignore_errors=True)
