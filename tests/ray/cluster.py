"""A real Ray cluster of separate nodes on loopback, each node one ``ray start --block`` process with its own
temp dir, so that one node can be killed (its whole process tree) without ``ray stop``, which ends every Ray
process on the machine."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.conftest import free_port


class RayNode:
    """One ``ray start --block`` (head or worker) and the processes it started."""

    def __init__(self, args: list[str], env: dict[str, str], name: str) -> None:
        # Short: Ray's unix socket paths live under the temp dir and must stay within 107 bytes.
        self.temp_dir = Path(tempfile.mkdtemp(prefix=f"tyray-{name}-", dir="/tmp"))
        self.log = (self.temp_dir / "start.log").open("ab")
        # Every agent port given: with port 0 the raylet waits a fixed time for the agent to write its port to a
        # file, which a slow (busy) machine misses, and two nodes on one machine must not share the defaults.
        ports = [f"--{name}={free_port()}" for name in ("dashboard-agent-grpc-port", "dashboard-agent-listen-port",
                                                        "metrics-export-port", "runtime-env-agent-port",
                                                        "node-manager-port", "object-manager-port")]
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.ray.ray_start", "start", "--block",
                                      "--node-ip-address", "127.0.0.1",
                                      "--temp-dir", str(self.temp_dir), "--disable-usage-stats", *ports, *args],
                                     env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def pids(self) -> list[int]:
        """The ``ray start`` process and every process under it (raylet, GCS, workers and their children)."""
        import psutil

        try:
            root = psutil.Process(self.proc.pid)
            return [root.pid, *(c.pid for c in root.children(recursive=True))]
        except psutil.NoSuchProcess:
            return []

    def kill(self) -> None:
        """SIGKILL the node's whole process tree: the machine is gone, as far as the cluster can tell."""
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        """End the node as ``ray stop`` would, for this node only."""
        if self.proc.poll() is None:
            pids = self.pids()
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(20)
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
        self.log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


class RayCluster:
    """A head node and worker nodes on 127.0.0.1, one CPU each, the dashboard off."""

    def __init__(self, env: dict[str, str]) -> None:
        # A busy machine (the tests share two cores) starts a node's agents slowly: give the raylet longer than
        # its default 30 s to see them.
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_raylet_start_wait_time_s": "120",
                    "RAY_agent_register_timeout_ms": "120000", **env}
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.workers: list[RayNode] = []
        for attempt in range(3):
            self.head = RayNode(["--head", "--port", str(self.port), "--num-cpus", "1", "--include-dashboard",
                                 "false", "--resources", json.dumps({"head": 1})], self.env, "head")
            try:
                self.wait_nodes(1)
                break
            except RuntimeError:
                self.head.stop()
                if attempt == 2:
                    raise

    def add_node(self, resources: dict[str, float] | None = None) -> RayNode:
        """Start a worker node that joins the cluster, and wait until the cluster counts it (on a busy machine a
        raylet can miss ``ray start``'s fixed 30 s registration window: then it is started again)."""
        for _ in range(3):
            node = RayNode(["--address", self.address, "--num-cpus", "1",
                            "--resources", json.dumps(resources or {"second": 1})], self.env, "node")
            want = 1 + sum(1 for w in self.workers if w.proc.poll() is None) + 1
            try:
                self.wait_nodes(want, until_exit=node)
            except RuntimeError:
                node.stop()
                continue
            self.workers.append(node)
            return node
        raise RuntimeError("a Ray worker node did not join the cluster in three tries")

    def alive_nodes(self) -> int:
        """Nodes the cluster's GCS reports alive (this process is a driver of the cluster for that)."""
        import ray

        if not ray.is_initialized():
            try:
                ray.init(address=self.address, logging_level="ERROR", log_to_driver=False)
            except (ConnectionError, RuntimeError, TimeoutError):
                ray.shutdown()  # the head's GCS is not answering yet (a busy machine): ask again later
                return 0
        return sum(1 for n in ray.nodes() if n["Alive"])

    def wait_nodes(self, n: int, timeout: float = 600, until_exit: RayNode | None = None) -> None:
        """Wait until ``n`` nodes are alive (RuntimeError if the head, or ``until_exit``, exits first)."""
        deadline = time.time() + timeout
        while self.alive_nodes() != n:
            for node in (self.head, until_exit):
                if node is not None and node.proc.poll() is not None:
                    raise RuntimeError(f"ray start exited: {(node.temp_dir / 'start.log').read_text()[-1500:]}")
            if time.time() > deadline:
                raise TimeoutError(f"the Ray cluster did not reach {n} nodes")
            time.sleep(1)

    def stop(self) -> None:
        """Stop every node, workers first."""
        import ray

        ray.shutdown()
        for node in self.workers:
            node.stop()
        self.head.stop()
