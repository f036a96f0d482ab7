"""The Ray launcher (``TUNEYARD_LAUNCHER=ray``): a job's trainer ranks run on a Ray cluster
(``TUNEYARD_RAY_ADDRESS``), its files pass through the shared storage (``TUNEYARD_STORAGE_URL``).

A job of ``node_count`` N and ``nproc_per_node`` G gets a placement group of N bundles of G devices,
``STRICT_SPREAD`` (one bundle a node; within a bundle the ranks are packed on that node) and one detached
named actor per rank (``scheduler/ray_rank.py``), as LLaMA-Factory does, rather than Ray Train's
TorchTrainer: the ranks run tuneyard's own trainer process with torch's ``env://`` rendezvous, so one
trainer, its events, checkpoints and results are the same on one machine and on a cluster, and the actors
and the placement group are named after the job, so that a restarted worker finds them again
(``adopt``) instead of starting the job twice. The prepare step runs on the worker's machine (it needs the
worker's credentials and is not distributed); its outputs are uploaded before the ranks start.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import signal
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tuneyard.domain import capabilities
from tuneyard.domain.errors import Problem
from tuneyard.domain.spec import TrainingSpec
from tuneyard.jobdir import CHECKPOINT_MARKER, JobDir, StopReason
from tuneyard.scheduler.capacity import Capacity, bitsandbytes_available
from tuneyard.scheduler.launcher import LaunchError, Placement
from tuneyard.scheduler.local import LocalLauncher
from tuneyard.settings import Settings
from tuneyard.storage import Storage, complete_checkpoints, get_dir, open_storage, put_dir

log = logging.getLogger("tuneyard.ray")
NAMESPACE = "tuneyard"
# A rank whose actor has not answered for this long is taken as lost with its node (Ray may take a while to
# declare a node dead; a slow answer alone is no loss).
UNANSWERED_SECONDS = 60.0
# Once one rank ended, the others get this long to end too before they are killed (torchrun does the same).
STRAGGLER_SECONDS = 30.0
MIRROR_SECONDS = 2.0
INPUTS_MARKER = "inputs.json"


def job_key(jd: JobDir) -> str:
    """The job's prefix in the storage: ``jobs/<org>/<job>``, the job directory's place under the jobs dir."""
    return f"jobs/{jd.root.parent.name}/{jd.root.name}"


def _actor_name(job_id: str, rank: int) -> str:
    return f"tuneyard-{job_id}-rank{rank}"


def _pg_name(job_id: str) -> str:
    return f"tuneyard-{job_id}"


@dataclass
class RayJob:
    """The ranks of one job's trainer on the cluster (started here, or found again by name after a restart)."""

    job_id: str
    jd: JobDir
    actors: list[Any]
    launcher: RayLauncher
    phase: str = "train"
    attempt: int | None = None
    offset: int = 0
    # No local process: the ranks are the cluster's.
    pid: int | None = None
    _unanswered_since: dict[int, float] = field(default_factory=dict)
    _first_end: float | None = None
    _mirrored_at: float = 0.0
    _code: int | None = None

    @property
    def root(self) -> Path:
        return self.jd.root

    def poll(self) -> int | None:
        """None while the ranks run; once they ended, rank 0's exit code with its result and output brought back
        into the job directory, or -1 (no result) when a rank was lost with its node."""
        if self._code is not None:
            return self._code
        import ray

        self.pull_events()
        if time.time() - self._mirrored_at > MIRROR_SECONDS:
            self.launcher.mirror_checkpoints(self.jd)
            self._mirrored_at = time.time()
        try:
            refs = [a.poll.remote() for a in self.actors]
        except ray.exceptions.RayError:
            return self._end(-1)
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=5)
        codes: list[int | None] = []
        errors: list[str] = []
        lost: list[int] = []
        now = time.time()
        for rank, ref in enumerate(refs):
            if ref not in ready:
                since = self._unanswered_since.setdefault(rank, now)
                if now - since > UNANSWERED_SECONDS:
                    lost.append(rank)
                codes.append(None)
                continue
            self._unanswered_since.pop(rank, None)
            try:
                code, error = ray.get(ref)
            except ray.exceptions.RayError:
                lost.append(rank)
                codes.append(None)
                continue
            codes.append(code)
            if error:
                errors.append(f"rank {rank}: {error}")
        # A rank killed by a signal, or gone with its node: the infrastructure failed, not the job (retried).
        if lost or any(c is not None and c < 0 for c in codes) or errors:
            why = f"ranks {lost} lost" if lost else "; ".join(errors) or f"exit codes {codes}"
            log.warning("job %s: %s; stopping every rank", self.job_id, why)
            return self._end(-1)
        if all(c is not None for c in codes):
            self.pull_events()
            try:
                rank0 = ray.get(self.actors[0].local_root.remote(), timeout=30)
            except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
                return self._end(-1)
            self.launcher.collect(self.jd, rank0)
            return self._end(codes[0])
        if any(c is not None for c in codes):
            self._first_end = self._first_end or now
            if now - self._first_end > STRAGGLER_SECONDS:
                return self._end(-1)
        return None

    def _end(self, code: int) -> int:
        self.launcher.release(self.job_id, len(self.actors))
        self._code = code
        return code

    def pull_events(self) -> None:
        """Append to the job's events.jsonl the whole lines rank 0 wrote since the last pull."""
        import ray

        try:
            size, data = ray.get(self.actors[0].events.remote(self.offset, str(self.jd.root)), timeout=10)
        except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
            return
        if data:
            with self.jd.events.open("ab") as f:
                f.write(data)
            self.offset += size

    def signal_group(self, sig: int) -> None:
        """Send ``sig`` to every rank's trainer."""
        for a in self.actors:
            a.signal.remote(sig)


class RayLauncher:
    """Runs the prepare step here and the trainer's ranks on a Ray cluster."""

    name = "ray"

    def __init__(self, settings: Settings, *, local: LocalLauncher | None = None) -> None:
        if not settings.ray_address:
            raise ValueError("TUNEYARD_LAUNCHER=ray needs TUNEYARD_RAY_ADDRESS (the cluster's address)")
        if not settings.storage_url:
            raise ValueError("TUNEYARD_LAUNCHER=ray needs TUNEYARD_STORAGE_URL (storage every node can reach)")
        self.settings = settings
        self.local = local or LocalLauncher(standby=settings.prepare_standby)
        self.storage_args = {"url": settings.storage_url, "credentials": settings.storage_credentials_dict(),
                             "endpoint_url": settings.s3_endpoint_url}
        self.storage: Storage = open_storage(**self.storage_args)
        self._connected = False

    @classmethod
    def from_settings(cls, settings: Settings) -> RayLauncher:
        """The launcher for the cluster and storage the settings name."""
        return cls(settings, local=LocalLauncher.from_settings(settings))

    # ----- the cluster ----------------------------------------------------------------------------
    def _ray(self) -> Any:
        import ray

        if not self._connected:
            if not ray.is_initialized():
                ray.init(address=self.settings.ray_address, namespace=NAMESPACE, logging_level="WARNING",
                         log_to_driver=False, configure_logging=False)
            self._connected = True
        return ray

    def _nodes(self) -> list[dict[str, float]]:
        return [n["Resources"] for n in self._ray().nodes() if n.get("Alive")]

    def capacity(self) -> Capacity:
        """The cluster's devices: GPUs of the largest node (the first GPU type named), every CPU a slot; free:
        what Ray has unreserved now (summed over nodes: placing the job's group is the exact test)."""
        ray = self._ray()
        nodes = self._nodes()
        free = ray.available_resources()
        types = sorted({k.split(":", 1)[1] for n in nodes for k in n if k.startswith("accelerator_type:")})
        return Capacity(gpus=int(max((n.get("GPU", 0) for n in nodes), default=0)),
                        gpu_name=types[0] if types else None,
                        cpu_slots=max(1, int(sum(n.get("CPU", 0) for n in nodes))),
                        free_gpus=int(free.get("GPU", 0)), free_cpu_slots=int(free.get("CPU", 0)), nodes=len(nodes))

    def idle(self, jd: JobDir) -> bool:
        """True when no rank actor of the job lives on in the cluster (nor a prepare process here)."""
        ray = self._ray()
        prefix = f"tuneyard-{jd.root.name}-rank"
        names = ray.util.list_named_actors(all_namespaces=True)
        return self.local.idle(jd) and not any(
            (a["name"] if isinstance(a, dict) else a).startswith(prefix) for a in names)

    def fits(self, spec: TrainingSpec) -> list[Problem]:
        """What the job asks for that no set of this cluster's nodes has (it could never start), and what its
        devices cannot do (QLoRA without a GPU...)."""
        placement = self._fits_nodes(spec)
        hw = replace(self.capacity(), gpu_name=None)  # GPU types are checked per node above
        covered = {"gpu_count", "node_count", "gpu_type", "device"}
        return placement + [p for p in capabilities.check_hardware(spec, hw, bitsandbytes=bitsandbytes_available())
                            if p.param not in covered]

    def _fits_nodes(self, spec: TrainingSpec) -> list[Problem]:
        res = spec.resources
        nodes = self._nodes()
        if res.device == "cpu" or not any(n.get("GPU") for n in nodes):
            if res.device == "cuda":
                return [Problem("device", "a GPU was asked for, but the Ray cluster has none")]
            enough = [n for n in nodes if n.get("CPU", 0) >= res.nproc_per_node]
            out = []
            if not enough:
                most = int(max((n.get("CPU", 0) for n in nodes), default=0))
                out.append(Problem("gpu_count", f"gpu_count {res.nproc_per_node}: {res.nproc_per_node} CPU ranks "
                                                f"per node asked for, but no node of the Ray cluster has more than "
                                                f"{most} CPUs"))
            elif len(enough) < res.node_count:
                out.append(Problem("node_count", f"node_count {res.node_count}: the Ray cluster has "
                                                 f"{len(enough)} node(s) with {res.nproc_per_node} CPUs"))
            return out
        typed = nodes
        if res.gpu_type:
            typed = [n for n in nodes if any(k.lower() == f"accelerator_type:{res.gpu_type.lower()}" for k in n)]
            if not typed:
                have = sorted({k.split(":", 1)[1] for n in nodes for k in n if k.startswith("accelerator_type:")})
                return [Problem("gpu_type", f"gpu_type '{res.gpu_type}' asked for, but the Ray cluster's GPUs are "
                                            f"{', '.join(have) or 'of no labelled type'}")]
        enough = [n for n in typed if n.get("GPU", 0) >= res.nproc_per_node]
        if not enough:
            most = int(max((n.get("GPU", 0) for n in typed), default=0))
            return [Problem("gpu_count", f"gpu_count {res.nproc_per_node}: no node of the Ray cluster has more than "
                                         f"{most} GPUs{' of that type' if res.gpu_type else ''}")]
        if len(enough) < res.node_count:
            return [Problem("node_count", f"node_count {res.node_count}: the Ray cluster has {len(enough)} node(s) "
                                          f"with {res.nproc_per_node} GPUs{' of that type' if res.gpu_type else ''}")]
        return []

    # ----- the phases -----------------------------------------------------------------------------
    def prepare(self, job_id: str, jd: JobDir, attempt: int, env: dict[str, str] | None = None) -> Any:
        """The prepare step, on this machine (see the module's docstring)."""
        return self.local.prepare(job_id, jd, attempt, env)

    def warm(self) -> None:
        """Keep the local standby prepare process."""
        self.local.warm()

    def close(self) -> None:
        """End the standby prepare process; the ranks on the cluster go on (adopted by the next worker)."""
        self.local.close()

    def upload_inputs(self, jd: JobDir) -> None:
        """Put what every rank reads into the storage: the data once per job, the spec and events every start."""
        key = job_key(jd)
        if f"{key}/{INPUTS_MARKER}" not in self.storage.list(key):
            for sub in sorted(p for p in jd.data.iterdir() if p.name != "raw") if jd.data.is_dir() else ():
                if sub.is_dir():
                    put_dir(self.storage, sub, f"{key}/data/{sub.name}")
                else:
                    self.storage.put_file(sub, f"{key}/data/{sub.name}")
            self.storage.put_file(jd.prepared, f"{key}/{INPUTS_MARKER}")
        for name in ("resolved_spec.json", "prepared.json", "events.jsonl", "tracking/runs.json"):
            if (jd.root / name).is_file():
                self.storage.put_file(jd.root / name, f"{key}/{name}")
        # An earlier attempt's outcome (a rank 0 that failed when its peer's node was lost) is not this one's.
        self.storage.delete(f"{key}/result.json")
        # A checkpoint the storage lacks (the job was paused before the storage was configured): put it there.
        have = {k for _, k in complete_checkpoints(self.storage, f"{key}/checkpoints", CHECKPOINT_MARKER)}
        for d in sorted(jd.checkpoints.glob("checkpoint-*")) if jd.checkpoints.is_dir() else ():
            if (d / CHECKPOINT_MARKER).is_file() and f"{key}/checkpoints/{d.name}" not in have:
                put_dir(self.storage, d, f"{key}/checkpoints/{d.name}", last=CHECKPOINT_MARKER)

    def train(self, job_id: str, jd: JobDir, attempt: int, resources: Placement,
              env: dict[str, str] | None = None) -> RayJob | None:
        """Reserve the job's nodes and start its ranks; None when the cluster cannot place them now (it waits)."""
        ray = self._ray()
        from ray.util.placement_group import placement_group, remove_placement_group


        try:
            res = TrainingSpec.model_validate_json(jd.resolved_spec.read_text()).resources
        except (OSError, ValueError) as e:
            raise LaunchError(f"the job's resolved spec does not read: {e}") from e
        nodes, per_node, gpu = resources.node_count, resources.ranks_per_node, resources.gpus_per_node > 0
        bundle: dict[str, float] = {"GPU": per_node} if gpu else {"CPU": per_node}
        if gpu and res.gpu_type:
            bundle[f"accelerator_type:{res.gpu_type.upper()}"] = 0.001
        self.release(job_id, nodes * per_node)  # whatever an earlier attempt left behind
        pg = placement_group([dict(bundle) for _ in range(nodes)], strategy="STRICT_SPREAD" if nodes > 1 else "PACK",
                             name=_pg_name(job_id), lifetime="detached")
        try:
            ray.get(pg.ready(), timeout=self.settings.ray_placement_wait_seconds)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(pg)
            return None
        try:
            return self._start_ranks(job_id, jd, attempt, pg, nodes, per_node, gpu, env or {})
        except Exception as e:  # the group is reserved: nothing of a half-started job may stay behind
            self.release(job_id, nodes * per_node)
            raise LaunchError(f"could not start the ranks on the Ray cluster: {type(e).__name__}: {e}") from e

    def _start_ranks(self, job_id: str, jd: JobDir, attempt: int, pg: Any, nodes: int, per_node: int, gpu: bool,
                     env: dict[str, str]) -> RayJob:
        ray = self._ray()
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from tuneyard.scheduler.ray_rank import RankActor

        self.upload_inputs(jd)
        remote = ray.remote(RankActor)
        actors = []
        for rank in range(nodes * per_node):
            opts: dict[str, Any] = {"num_gpus": 1, "num_cpus": 0} if gpu else {"num_cpus": 1}
            actors.append(remote.options(
                name=_actor_name(job_id, rank), namespace=NAMESPACE, lifetime="detached", max_restarts=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=rank // per_node),
                **opts).remote(job_id, job_key(jd), rank, self.storage_args))
        master, port = ray.get(actors[0].address.remote(), timeout=120)
        world = nodes * per_node
        starts = []
        for rank, actor in enumerate(actors):
            rank_env = {**env, "MASTER_ADDR": master, "MASTER_PORT": str(port), "RANK": str(rank),
                        "WORLD_SIZE": str(world), "LOCAL_RANK": "0" if gpu else str(rank % per_node),
                        "LOCAL_WORLD_SIZE": str(per_node), "GROUP_RANK": str(rank // per_node)}
            if not gpu:
                # One rank per reserved CPU: without this each would start one thread per core of its node.
                rank_env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
            starts.append(actor.start.remote(rank_env))
        offsets = ray.get(starts, timeout=600)
        return RayJob(job_id=job_id, jd=jd, actors=actors, launcher=self, attempt=attempt, offset=offsets[0])

    def adopt(self, job_id: str, jd: JobDir, phase: str) -> Any:
        """The job's running ranks, found by name after this worker restarted (a prepare step: by pid)."""
        if phase != "train":
            return self.local.adopt(job_id, jd, phase)
        ray = self._ray()
        try:
            spec = TrainingSpec.model_validate_json(jd.resolved_spec.read_text())
            actors = [ray.get_actor(_actor_name(job_id, r), namespace=NAMESPACE) for r in range(spec.world_size)]
        except (ValueError, OSError):
            return None
        size = jd.events.stat().st_size if jd.events.exists() else 0
        return RayJob(job_id=job_id, jd=jd, actors=actors, launcher=self, offset=size)

    def release(self, job_id: str, world: int) -> None:
        """Kill the job's rank actors and remove its placement group (frees its nodes)."""
        ray = self._ray()
        from ray.util.placement_group import get_placement_group, remove_placement_group

        for rank in range(world):
            try:
                actor = ray.get_actor(_actor_name(job_id, rank), namespace=NAMESPACE)
            except ValueError:
                continue
            with contextlib.suppress(ray.exceptions.RayError):
                ray.get(actor.cleanup.remote(), timeout=10)
            ray.kill(actor, no_restart=True)
        with contextlib.suppress(ValueError):
            remove_placement_group(get_placement_group(_pg_name(job_id)))

    # ----- files back from the storage ------------------------------------------------------------
    def mirror_checkpoints(self, jd: JobDir) -> None:
        """Make the job directory's complete checkpoints the storage's (the worker and the API read them here)."""
        key = f"{job_key(jd)}/checkpoints"
        found = complete_checkpoints(self.storage, key, CHECKPOINT_MARKER)
        names = {f"checkpoint-{step}" for step, _ in found}
        for step, prefix in found:
            dest = jd.checkpoints / f"checkpoint-{step}"
            if (dest / CHECKPOINT_MARKER).is_file():
                continue
            tmp = jd.checkpoints / f".checkpoint-{step}.partial"
            shutil.rmtree(tmp, ignore_errors=True)
            get_dir(self.storage, prefix, tmp)
            shutil.rmtree(dest, ignore_errors=True)
            tmp.rename(dest)
        for d in jd.checkpoints.glob("checkpoint-*") if jd.checkpoints.is_dir() else ():
            if (d / CHECKPOINT_MARKER).is_file() and d.name not in names and found:
                shutil.rmtree(d, ignore_errors=True)  # rotated away by the trainer

    def collect(self, jd: JobDir, rank0_root: str) -> None:
        """Bring rank 0's outcome into the job directory (``rank0_root``: its directory on its node, which the
        result's paths name): result.json, output/, tracker run ids, checkpoints."""
        key = job_key(jd)
        self.mirror_checkpoints(jd)
        self.storage.get_file(f"{key}/tracking/runs.json", jd.root / "tracking" / "runs.json")
        if self.storage.list(f"{key}/output"):
            partial = jd.root / ".output.partial"
            shutil.rmtree(partial, ignore_errors=True)
            get_dir(self.storage, f"{key}/output", partial)
            shutil.rmtree(jd.output, ignore_errors=True)
            partial.rename(jd.output)
        # Last: the worker takes the job as finished once result.json is there. The paths in it are rank 0's.
        tmp = jd.root / ".result.remote"
        if self.storage.get_file(f"{key}/result.json", tmp):
            tmp.write_text(tmp.read_text().replace(rank0_root, str(jd.root)))
            tmp.replace(jd.result)

    # ----- control --------------------------------------------------------------------------------
    @staticmethod
    def stop(h: RayJob, jd: JobDir, reason: StopReason) -> None:
        """Ask every rank's trainer to stop at its next step."""
        jd.request_stop(reason)
        for a in h.actors:
            a.stop.remote(reason)
        h.stop_reason = reason

    @staticmethod
    def terminate(h: RayJob) -> None:
        """SIGTERM every rank's trainer."""
        h.signal_group(signal.SIGTERM)

    def kill(self, h: RayJob) -> None:
        """Kill every rank and free the placement group."""
        h.signal_group(signal.SIGKILL)
        self.release(h.job_id, len(h.actors))

    @staticmethod
    def resident_bytes(h: RayJob) -> int | None:
        """Memory the ranks hold together, as their actors measure it on their nodes."""
        import ray

        try:
            return sum(ray.get([a.resident_bytes.remote() for a in h.actors], timeout=10))
        except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
            return None
