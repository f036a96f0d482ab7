"""The local launcher: starts a job's processes on this machine (prepare step, torchrun trainer).

Processes start in their own session (process group) so that a restart or crash of
``tuneyard serve`` does not take them down; a restarted worker re-adopts them by pid. This module alone
knows pids, pid files, ``/proc`` and process groups; ``capacity.py`` counts the GPUs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from tuneyard.domain import capabilities
from tuneyard.domain.errors import Problem
from tuneyard.domain.spec import TrainingSpec
from tuneyard.jobdir import JobDir, StopReason
from tuneyard.scheduler.capacity import Capacity, bitsandbytes_available, deepspeed_available, detect
from tuneyard.scheduler.joblogs import rotate_logs  # noqa: F401  (re-exported: its old home)
from tuneyard.scheduler.launcher import LaunchError, Placement
from tuneyard.settings import Settings, get_settings
from tuneyard.standby import order_line

log = logging.getLogger("tuneyard.launcher")

# The server's own W&B key must not report a job to the operator's account: a job's key is its organisation's.
PRIVATE_ENV = frozenset({"TUNEYARD_SECRET_KEY", "TUNEYARD_SOURCE_CREDENTIALS", "WANDB_API_KEY"})
PREPARE_MODULE = b"tuneyard.data.prepare"
TRAINER_MODULE = b"tuneyard.trainer"
# A standby process (see LocalLauncher.warm) names no job on its command line, only this flag.
STANDBY_FLAG = b"--standby"


@dataclass
class Proc:
    """A process group started for one phase of a job (ours, or adopted after a restart)."""

    job_id: str
    phase: str  # "prepare" | "train"
    pid: int
    popen: subprocess.Popen | None = None
    gpus: list[int] = field(default_factory=list)
    cpu_slot: bool = False
    # The job directory: every process of the job has it on its command line (see job_processes).
    root: Path | None = None
    # The job's attempt number this process was started for (unknown for an adopted process).
    attempt: int | None = None

    def poll(self) -> int | None:
        """None while any process of the job runs; the exit code (-1 when unknown, adopted) once all ended.

        A launcher that is gone while ranks of it live on (torchrun was killed) is not over: they must not go
        on training beside a retry, so they are killed, and the outcome waits until they are gone.
        """
        code = self.popen.poll() if self.popen is not None else (None if pid_alive(self.pid, self.job_id) else -1)
        if code is None:
            return None
        stray = self.leftovers()
        if stray:
            log.warning("job %s: %s exited (%s) leaving processes %s: killing them", self.job_id, self.phase, code,
                        stray)
            self.signal_group(signal.SIGKILL)
            return None
        return code

    def signal_group(self, sig: int) -> None:
        """Send ``sig`` to the process group and to every other process of the job (torchrun's ranks)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)
        # torchrun starts each rank in a session of its own, so the group signal does not reach them.
        for pid in job_processes(self.root) if self.root is not None else ():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)

    def leftovers(self) -> list[int]:
        """Processes of the job still alive, e.g. ranks orphaned when torchrun itself was killed."""
        return job_processes(self.root) if self.root is not None else []


def job_processes(root: Path) -> list[int]:
    """Live processes whose command line names the job directory ``root`` (prepare, torchrun, ranks)."""
    needle = str(root).encode()
    me = os.getpid()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
            with open(f"/proc/{name}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z" and (needle in args or STANDBY_FLAG in args and _cwd(int(name)) == needle):
            found.append(int(name))
    return found


def _cwd(pid: int) -> bytes | None:
    # A standby process (see LocalLauncher.warm) names no job on its command line: once given one, it works in
    # the job's directory.
    try:
        return os.readlink(f"/proc/{pid}/cwd").encode()
    except OSError:
        return None


def resident_bytes(pids: list[int]) -> int:
    """Memory the processes hold together: proportional set size (shared pages split between their users)."""
    total = 0
    page = os.sysconf("SC_PAGE_SIZE")
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                total += next(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:"))
        except (OSError, StopIteration, ValueError):
            try:
                with open(f"/proc/{pid}/statm") as f:
                    total += int(f.read().split()[1]) * page
            except (OSError, IndexError, ValueError):
                continue
    return total


def pid_alive(pid: int, job_id: str) -> bool:
    """True when ``pid`` is running and is one of this job's processes (guards against pid reuse)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read()
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    if state == "Z":
        return False
    if job_id.encode() in cmd:
        return True
    cwd = _cwd(pid)
    return STANDBY_FLAG in cmd.split(b"\0") and cwd is not None and cwd.rsplit(b"/", 1)[-1] == job_id.encode()


def _waiting(proc: subprocess.Popen | None) -> bool:
    return proc is not None and proc.poll() is None


def _died(proc: subprocess.Popen | None, what: str) -> bool:
    if proc is None or proc.poll() is None:
        return False
    log.warning("the standby %s process exited (%s) before it was given a job: no longer kept", what, proc.returncode)
    return True


def _logs_to_wandb(jd: JobDir) -> bool:
    # The trainer's standby imported transformers with W&B hidden (trainer/__main__.py standby).
    try:
        integrations = json.loads(jd.resolved_spec.read_text()).get("integrations") or []
    except (OSError, ValueError, AttributeError):
        return True  # unreadable: a fresh trainer says so in the job's result
    return any(isinstance(i, dict) and i.get("type") == "wandb" for i in integrations)


class LocalLauncher:
    """Runs the prepare step and the torchrun trainer as subprocesses on this machine."""

    name = "local"

    def __init__(self, python: str | None = None, *, standby: bool = False, trainer_standby: bool = False,
                 settings: Settings | None = None) -> None:
        self.python = python or sys.executable
        # With ``standby``, one prepare process is kept started ahead of need, its imports done (~3 s of
        # transformers): the next job's prepare step is handed to it instead of starting from nothing.
        # ``trainer_standby`` does the same for the trainer of a one-process CPU job (~8 s of imports).
        self.standby = standby
        self.trainer_standby = trainer_standby
        self._standby: subprocess.Popen | None = None
        self._trainer_standby: subprocess.Popen | None = None
        self._settings = settings
        self._total: Capacity | None = None
        # Trainers started or adopted here, until they end: what holds this machine's devices.
        self._live: dict[str, Proc] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> LocalLauncher:
        """The launcher as the settings describe it (standby prepare process, GPU count)."""
        return cls(standby=settings.prepare_standby, trainer_standby=settings.trainer_standby, settings=settings)

    # ----- capacity ---------------------------------------------------------------------------
    def total(self) -> Capacity:
        """This machine's devices (``TUNEYARD_GPU_COUNT`` overriding nvidia-smi), all of them."""
        if self._total is None:
            self._total = detect(self._settings or get_settings())
        return self._total

    def capacity(self) -> Capacity:
        """This machine's devices, and those no trainer started here holds now."""
        total = self.total()
        for job_id, proc in list(self._live.items()):
            if proc.poll() is not None:
                del self._live[job_id]
        used_gpus = {g for p in self._live.values() for g in p.gpus}
        used_cpu = sum(1 for p in self._live.values() if p.cpu_slot)
        return replace(total, free_gpus=len([g for g in range(total.gpus) if g not in used_gpus]),
                       free_cpu_slots=total.cpu_slots - used_cpu)

    def _free_gpus(self) -> list[int]:
        used = {g for p in self._live.values() for g in p.gpus}
        return [g for g in range(self.total().gpus) if g not in used]

    def fits(self, spec: TrainingSpec) -> list[Problem]:
        """Why ``spec`` can never run on this machine: more than one node, or devices it does not have."""
        out = []
        if spec.resources.node_count > 1:
            out.append(Problem("node_count", f"node_count {spec.resources.node_count}: this installation runs jobs "
                                             "on one node with the local launcher; jobs over several nodes need "
                                             "TUNEYARD_LAUNCHER=ray"))
        return out + capabilities.check_hardware(spec, self.total(), bitsandbytes=bitsandbytes_available(),
                                                 deepspeed=deepspeed_available())

    def idle(self, jd: JobDir) -> bool:
        """True when no process of the job is alive (an earlier run of it may still be winding down)."""
        return not job_processes(jd.root)

    # ----- processes --------------------------------------------------------------------------
    @staticmethod
    def _inherited() -> dict[str, str]:
        # The job's processes get the credentials the worker passes in and nothing else secret: not the key that
        # decrypts every organisation's secrets, nor source credentials this process may have inherited. Nor any
        # tuneyard setting: what a job needs of them is in its spec (runtime), so it runs the same anywhere.
        return {k: v for k, v in os.environ.items() if k not in PRIVATE_ENV and not k.startswith("TUNEYARD_")}

    def warm(self) -> None:
        """Start the standby prepare (and trainer) process where standby is on and none is waiting."""
        # One that died before it was given a job cannot import what it needs: starting it again every tick
        # would only burn a core, and jobs start as well without it.
        if _died(self._standby, "prepare"):
            self.standby, self._standby = False, None
        if _died(self._trainer_standby, "trainer"):
            self.trainer_standby, self._trainer_standby = False, None
        if self.standby and not _waiting(self._standby):
            self._standby = self._start_standby(PREPARE_MODULE)
        # The trainer's only while no trainer started here runs: its imports would take cores from one.
        if self.trainer_standby and not _waiting(self._trainer_standby) and not self._running_trainers():
            self._trainer_standby = self._start_standby(TRAINER_MODULE)

    def _start_standby(self, module: bytes) -> subprocess.Popen:
        # No GPU: prepare steps never use one, and the trainer's standby takes CPU jobs only (a CUDA library
        # imported early may size itself to every GPU before the job's CUDA_VISIBLE_DEVICES is known). Its own
        # session, so that a server restart leaves a running step alone.
        env = {**self._inherited(), "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}
        return subprocess.Popen([self.python, "-m", module.decode(), STANDBY_FLAG.decode()],
                                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True, env=env)

    def _running_trainers(self) -> bool:
        return any(p.poll() is None for p in self._live.values())

    def close(self) -> None:
        """End the standby processes, if any (they hold no job)."""
        for proc in (self._standby, self._trainer_standby):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        self._standby = self._trainer_standby = None

    def _hand_to_standby(self, job_id: str, phase: str, jd: JobDir, attempt: int, env: dict[str, str]
                         ) -> Proc | None:
        if phase == "prepare":
            proc, self._standby = self._standby, None
        else:
            proc, self._trainer_standby = self._trainer_standby, None
        if proc is None or proc.poll() is not None or proc.stdin is None:
            return None
        jd.logs.mkdir(parents=True, exist_ok=True)
        order = order_line(str(jd.root), str(jd.logs / f"{phase}-{attempt}.log"), {"TUNEYARD_JOB_ID": job_id, **env})
        try:
            proc.stdin.write(order)
            proc.stdin.close()
        except OSError:  # it died meanwhile
            proc.kill()
            proc.wait()
            return None
        (jd.root / f"{phase}.pid").write_text(str(proc.pid))
        return Proc(job_id=job_id, phase=phase, pid=proc.pid, popen=proc, root=jd.root, attempt=attempt)

    def _spawn(self, job_id: str, phase: str, cmd: list[str], jd: JobDir, attempt: int, env: dict[str, str]
               ) -> Proc:
        jd.logs.mkdir(parents=True, exist_ok=True)
        log = (jd.logs / f"{phase}-{attempt}.log").open("ab")
        full_env = {**self._inherited(), "PYTHONUNBUFFERED": "1", "TUNEYARD_JOB_ID": job_id, **env}
        try:
            p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 start_new_session=True, env=full_env, cwd=str(jd.root))
        finally:
            log.close()
        (jd.root / f"{phase}.pid").write_text(str(p.pid))
        return Proc(job_id=job_id, phase=phase, pid=p.pid, popen=p, root=jd.root, attempt=attempt)

    def prepare(self, job_id: str, jd: JobDir, attempt: int, env: dict[str, str] | None = None) -> Proc:
        """Start the validation + tokenisation step of a job (``env``: e.g. the credentials of its sources)."""
        proc = self._hand_to_standby(job_id, "prepare", jd, attempt, env or {})
        if proc is not None:
            return proc
        # The prepare step never needs a GPU.
        return self._spawn(job_id, "prepare", [self.python, "-m", "tuneyard.data.prepare", str(jd.root)], jd,
                           attempt, {**(env or {}), "CUDA_VISIBLE_DEVICES": ""})

    def train(self, job_id: str, jd: JobDir, attempt: int, resources: Placement, env: dict[str, str] | None = None
              ) -> Proc | None:
        """Start ``torchrun`` with one rank per GPU asked for (none: CPU ranks on gloo); one rank runs alone.

        None when the devices are taken now (by other jobs' trainers, or an earlier run of this one).
        """
        if resources.node_count > 1:
            raise LaunchError(f"the local launcher runs a job on one node, not {resources.node_count}")
        if resources.gpus_per_node:
            free = self._free_gpus()
            gpus = list(resources.gpus) or free[:resources.gpus_per_node]
            if len(gpus) < resources.gpus_per_node or not set(gpus) <= set(free):
                return None
            nproc = len(gpus)
        else:
            if self.capacity().free_cpu_slots < 1:
                return None
            gpus, nproc = [], max(1, resources.cpu_ranks)
        if not self.idle(jd):
            return None
        # One process needs no rendezvous: torchrun would only add its own start-up (~1.5 s of imports) first.
        group = nproc > 1 or resources.rendezvous
        launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if group else []
        cmd = [self.python, *launcher, "-m", "tuneyard.trainer", str(jd.root)]
        env = {**(env or {}), "CUDA_VISIBLE_DEVICES": ",".join(str(g) for g in gpus)}
        if not gpus:
            # Ranks share the cores: without this each would start one thread per core.
            env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
        # The devices go beside the pid file: a worker that adopts the trainer after a restart counts them as taken.
        (jd.root / "train.gpus").write_text(",".join(str(g) for g in gpus))
        proc = None
        if not group and not gpus and not _logs_to_wandb(jd):
            proc = self._hand_to_standby(job_id, "train", jd, attempt, env)
        if proc is None:
            proc = self._spawn(job_id, "train", cmd, jd, attempt, env)
        proc.gpus = list(gpus)
        proc.cpu_slot = not gpus
        self._live[job_id] = proc
        return proc

    def adopt(self, job_id: str, jd: JobDir, phase: str) -> Proc | None:
        """The still-running process of a job started before this worker restarted, if any."""
        try:
            pid = int((jd.root / f"{phase}.pid").read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        if not pid_alive(pid, job_id):
            return None
        proc = Proc(job_id=job_id, phase=phase, pid=pid, root=jd.root)
        if phase == "train":
            try:
                proc.gpus = [int(g) for g in (jd.root / "train.gpus").read_text().split(",") if g.strip()]
            except (FileNotFoundError, ValueError):
                proc.gpus = []
            proc.cpu_slot = not proc.gpus
            self._live[job_id] = proc
        return proc

    @staticmethod
    def stop(h: Proc, jd: JobDir, reason: StopReason) -> None:
        """Ask the trainer to stop at its next step (it checkpoints first when pausing)."""
        jd.request_stop(reason)

    @staticmethod
    def terminate(h: Proc) -> None:
        """SIGTERM to the process group and to every other process of the job."""
        h.signal_group(signal.SIGTERM)

    @staticmethod
    def kill(h: Proc) -> None:
        """SIGKILL to the process group and to every other process of the job."""
        h.signal_group(signal.SIGKILL)

    @staticmethod
    def resident_bytes(h: Proc) -> int | None:
        """Proportional set size of every process of the job together."""
        return resident_bytes(job_processes(h.root)) if h.root is not None else None
