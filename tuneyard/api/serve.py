"""Running ``tuneyard serve``: one process, or several HTTP processes sharing one listening socket.

With ``api_workers`` = 1 the HTTP server and the job worker share one process (the worker a thread of it).
With N > 1 this process binds the socket, runs migrations once, starts N HTTP processes that accept on
that socket (``python -m tuneyard.api.serve --fd F``; the kernel spreads connections between them) and
runs the one job worker itself. SIGTERM or SIGINT stops the HTTP processes and drains the worker, as in
one process. An HTTP process that dies is started again; one that outlives this process (kill -9) is
told by the kernel to stop (PR_SET_PDEATHSIG), and checks its parent every second where that is missing.

This module imports no web framework until it starts an HTTP server: the supervising process needs none.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

from tuneyard.settings import Settings, get_settings

# prometheus-client's multiprocess mode (api/metrics.py): set for the HTTP processes before they import it.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
log = logging.getLogger("tuneyard.serve")
# An HTTP process that dies sooner than this after its start counts as failing to start.
QUICK_EXIT_SECONDS = 5.0
MAX_QUICK_EXITS = 5
STOP_TIMEOUT_SECONDS = 15.0


def api_worker_count(n: int) -> int:
    """How many HTTP processes ``n`` asks for (TUNEYARD_API_WORKERS, --api-workers): 0 means one per core, at most 4."""
    if n <= 0:
        n = min(4, os.cpu_count() or 1)
    return n


def configure_logging(settings: Settings) -> None:
    """The log format every tuneyard process uses."""
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)


def serve(settings: Settings | None = None, *, host: str | None = None, port: int | None = None,
          run_worker: bool | None = None, api_workers: int | None = None) -> int:
    """Serve the API (and run the job worker unless told not to) until SIGTERM or SIGINT; the exit status."""
    settings = settings or get_settings()
    host = host or settings.host
    port = port or settings.port
    run_worker = settings.run_worker if run_worker is None else run_worker
    n = api_worker_count(settings.api_workers if api_workers is None else api_workers)
    if n <= 1:
        import uvicorn

        from tuneyard.api.app import create_app

        uvicorn.run(create_app(settings, run_worker=run_worker), host=host, port=port,
                    log_level=settings.log_level.lower(), timeout_graceful_shutdown=5)
        return 0
    return _Supervisor(settings, host, port, run_worker, n).run()


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    # Listening before any HTTP process is up: early connections wait in the backlog instead of being refused.
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class _Supervisor:
    def __init__(self, settings: Settings, host: str, port: int, run_worker: bool, n: int) -> None:
        self.settings = settings
        self.host = host
        self.port = port
        self.run_worker = run_worker
        self.n = n
        self.stop = threading.Event()
        self.procs: list[tuple[subprocess.Popen, float]] = []
        self.quick_exits = 0
        self.metrics_dir = settings.home / "run" / "prometheus"

    def _spawn(self, sock: socket.socket) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "tuneyard.api.serve", "--fd", str(sock.fileno()), "--parent", str(os.getpid())]
        # One multiprocess directory for all of them: GET /metrics in any of them sums every process's HTTP figures.
        env = {**os.environ, MULTIPROC_ENV: str(self.metrics_dir)}
        return subprocess.Popen(cmd, pass_fds=[sock.fileno()], env=env)

    def run(self) -> int:
        from tuneyard.service import Services

        sock = _bind(self.host, self.port)
        # Figures of an earlier run's processes would be summed in: start from an empty directory.
        shutil.rmtree(self.metrics_dir, ignore_errors=True)
        self.metrics_dir.mkdir(parents=True)
        # Migrations once, here: the HTTP processes find the schema at its head and skip them.
        services = Services.build(self.settings)
        self.procs = [(self._spawn(sock), time.monotonic()) for _ in range(self.n)]
        log.info("tuneyard serving on %s:%d with %d HTTP processes", self.host, self.port, self.n)
        worker = None
        if self.run_worker:
            from tuneyard.scheduler.worker import Worker

            worker = Worker(services.store, self.settings, services.files)
            worker.start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop.set())
        status = 0
        try:
            while not self.stop.wait(0.5):
                if not self._keep_up(sock):
                    status = 1
                    break
        finally:
            for proc, _ in self.procs:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
            # The HTTP processes finish their requests meanwhile.
            if worker is not None:
                worker.shutdown()
            deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
            for proc, _ in self.procs:
                try:
                    proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            sock.close()
            services.store.dispose()
        return status

    def _keep_up(self, sock: socket.socket) -> bool:
        """Start again each HTTP process that ended; False when they keep failing to start."""
        for i, (proc, started) in enumerate(self.procs):
            code = proc.poll()
            if code is None:
                continue
            if time.monotonic() - started < QUICK_EXIT_SECONDS:
                self.quick_exits += 1
                if self.quick_exits >= MAX_QUICK_EXITS:
                    log.error("HTTP processes keep exiting at start (last status %s); stopping", code)
                    return False
            else:
                self.quick_exits = 0
            log.warning("HTTP process %d exited with status %s; starting another", proc.pid, code)
            self.procs[i] = (self._spawn(sock), time.monotonic())
        return True


def _follow_parent(parent: int) -> None:
    """Stop this process when the supervising one is gone, even if it was killed with SIGKILL."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    # The parent may have died before prctl took effect; where prctl is missing this is the only check.
    threading.Thread(target=watch, name="tuneyard-parent-watch", daemon=True).start()


def _http_process(fd: int, parent: int) -> None:
    """One HTTP process of several: serve on the inherited socket, with no job worker."""
    _follow_parent(parent)
    import uvicorn

    from tuneyard.api.app import create_app

    settings = get_settings()
    configure_logging(settings)
    sock = socket.socket(fileno=fd)
    config = uvicorn.Config(create_app(settings, run_worker=False), log_level=settings.log_level.lower(),
                            timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="One HTTP process of `tuneyard serve --api-workers N` (started by it).")
    ap.add_argument("--fd", type=int, required=True)
    ap.add_argument("--parent", type=int, required=True)
    args = ap.parse_args()
    _http_process(args.fd, args.parent)
