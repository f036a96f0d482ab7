"""Every documented setting and `tuneyard serve` flag changes what it says it does (docs/operations.md, "Settings").

Each test shows a behaviour against a real `tuneyard serve` process, several settings per server where they
can share one. Settings guarded elsewhere are listed with their test in the table in docs/operations.md.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import Server, free_port
from tuneyard.demo.tiny import write_sample_jsonl
from tuneyard.scheduler.local import job_processes

# Long enough for a worker ticking every 0.2 s (the test servers' TUNEYARD_POLL_INTERVAL) to have claimed a job
# many times over.
SETTLE_SECONDS = 2.0


def start(tmp_path_factory, tiny_model_dir, name: str, env: dict[str, str], args: tuple[str, ...] = (),
          port: int | None = None) -> Server:
    """A server (env and command-line args) whose local roots hold the tiny model."""
    srv = Server(tmp_path_factory.mktemp(name), env, args, port)
    shutil.copytree(tiny_model_dir, srv.local / "tiny-llama")
    srv.model_dir = str(srv.local / "tiny-llama")
    return srv


def submit(srv: Server, client, tmp_path: Path, **hyperparameters) -> str:
    """Upload the sample data and create an OpenAI job on the tiny model; the job's id."""
    f = client.files.create(file=write_sample_jsonl(tmp_path / f"train-{time.monotonic_ns()}.jsonl").open("rb"),
                            purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model=srv.model_dir, training_file=f.id,
                                         hyperparameters=hyperparameters or None)
    return job.id


def job_row(srv: Server, job_id: str) -> tuple[str, str | None]:
    """(status, worker_id) of a job, read from the server's database: the worker that claimed it, if any."""
    with sqlite3.connect(f"file:{srv.home / 'tuneyard.db'}?mode=ro", uri=True) as db:
        return db.execute("SELECT status, worker_id FROM jobs WHERE id = ?", (job_id,)).fetchone()


def health(srv: Server) -> dict:
    return httpx.get(f"{srv.base_url}/healthz").json()


def assert_never_claimed(srv: Server, job_id: str) -> None:
    """No worker takes the job: it stays in validating_files, unclaimed, with no process started for it."""
    time.sleep(SETTLE_SECONDS)
    assert job_row(srv, job_id) == ("validating_files", None)
    assert not list((srv.home / "jobs").glob(f"*/{job_id}/logs/*"))


# ----- TUNEYARD_RUN_WORKER, --worker/--no-worker, --api-workers, TUNEYARD_POLL_INTERVAL ------------------------
@pytest.mark.parametrize("args", [(), ("--api-workers", "2")], ids=["one-process", "api-workers-2"])
def test_run_worker_false_starts_no_worker(tmp_path_factory, tmp_path, tiny_model_dir, args):
    srv = start(tmp_path_factory, tiny_model_dir, "no-worker", {"TUNEYARD_RUN_WORKER": "false"}, args)
    try:
        # With several HTTP processes /healthz always answers from one of them (no worker there): only the job
        # staying unclaimed shows that the serving process runs none either.
        assert health(srv)["worker"] is None
        assert_never_claimed(srv, submit(srv, srv.openai(srv.key()), tmp_path))
    finally:
        srv.stop()


def test_the_worker_flags_override_the_setting(tmp_path_factory, tmp_path, tiny_model_dir):
    srv = start(tmp_path_factory, tiny_model_dir, "flag-no-worker", {"TUNEYARD_RUN_WORKER": "true"}, ("--no-worker",))
    try:
        assert health(srv)["worker"] is None
        assert_never_claimed(srv, submit(srv, srv.openai(srv.key()), tmp_path))
    finally:
        srv.stop()
    # --worker wins over TUNEYARD_RUN_WORKER=false. A worker ticking every 60 s (TUNEYARD_POLL_INTERVAL) made its
    # first pass at start-up, before the job existed, and leaves it alone until its next one.
    srv = start(tmp_path_factory, tiny_model_dir, "flag-worker", {"TUNEYARD_RUN_WORKER": "false",
                                                                  "TUNEYARD_POLL_INTERVAL": "60",
                                                                  "TUNEYARD_PREPARE_STANDBY": "false"}, ("--worker",))
    try:
        assert health(srv)["worker"]["id"].startswith("local:")
        assert_never_claimed(srv, submit(srv, srv.openai(srv.key()), tmp_path))
    finally:
        srv.stop()


# ----- one server without a worker: API, authentication and logging settings ----------------------------------
ISSUER = "https://idp.example"


@pytest.fixture(scope="module")
def rsa_key(tmp_path_factory) -> tuple[bytes, Path]:
    """An RSA private key (PEM) and the path of its public key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = tmp_path_factory.mktemp("jwt") / "public.pem"
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                      serialization.PublicFormat.SubjectPublicKeyInfo))
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()), public


@pytest.fixture(scope="module")
def api(tmp_path_factory, tiny_model_dir, rsa_key):
    """No worker; --host and --port given on the command line, the settings pointing elsewhere."""
    port = free_port()
    srv = start(tmp_path_factory, tiny_model_dir, "api", {
        "TUNEYARD_RUN_WORKER": "false", "TUNEYARD_HOST": "203.0.113.7", "TUNEYARD_PORT": "1",
        "TUNEYARD_LOG_LEVEL": "info", "TUNEYARD_BASE_MODELS": "org/base-a, org/base-b",
        "TUNEYARD_MAX_ERROR_REPORT": "3", "TUNEYARD_AUTH_CACHE_SECONDS": "0", "TUNEYARD_RATE_LIMIT_PER_SECOND": "0",
        "TUNEYARD_JWT_PUBLIC_KEY": str(rsa_key[1]), "TUNEYARD_JWT_ALGORITHMS": "RS256", "TUNEYARD_JWT_ISSUER": ISSUER,
        "TUNEYARD_JWT_ORG_CLAIM": "tenant", "TUNEYARD_JWT_ROLE_CLAIM": "perm"},
        ("--host", "127.0.0.1", "--port", str(port)), port=port)
    yield srv
    srv.stop()


def test_host_and_port_flags_win_over_the_settings_and_state_lives_under_home(api, tmp_path):
    # The server answers on --host/--port (TUNEYARD_HOST is not even an address of this machine).
    assert health(api)["status"] == "ok"
    client = api.openai(api.key())
    job_id = submit(api, client, tmp_path)
    # TUNEYARD_HOME: the SQLite database, the uploaded bytes and the job's directory are under it.
    assert job_row(api, job_id)[0] == "validating_files"
    assert len(list((api.home / "files").rglob("*"))) >= 1
    assert (api.home / "jobs" / "acme" / job_id / "spec.json").is_file()


def test_log_level_info_logs_start_up_and_requests(api):
    httpx.get(f"{api.base_url}/healthz")
    log = (api.home / "server.log").read_text()
    assert " INFO tuneyard.api: tuneyard " in log and "GET /healthz" in log


def test_base_models_are_listed(api):
    ids = [m.id for m in api.openai(api.key()).models.list()]
    assert ids[:2] == ["org/base-a", "org/base-b"] or {"org/base-a", "org/base-b"} <= set(ids)


def test_max_error_report_caps_the_problems_listed(api, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(f'{{"messages": {i}}}\n' for i in range(10)))
    r = httpx.post(f"{api.base_url}/v1/files", headers={"Authorization": f"Bearer {api.key()}"},
                   files={"file": ("bad.jsonl", bad.read_bytes())}, data={"purpose": "fine-tune"})
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert message.count("Example ") == 3 and "(and 7 more)" in message, message


def test_auth_cache_zero_refuses_a_revoked_key_at_once(api):
    key = api.key("revokers")
    h = {"Authorization": f"Bearer {key}"}
    assert httpx.get(f"{api.base_url}/v1/fine_tuning/jobs", headers=h).status_code == 200
    subprocess.run([sys.executable, "-m", "tuneyard.cli", "keys", "revoke", key.split("-")[1], "--org", "revokers"],
                   env=api.env, check=True, capture_output=True)
    # No cached verification (the default keeps one for 5 s): the very next request is refused.
    assert httpx.get(f"{api.base_url}/v1/fine_tuning/jobs", headers=h).status_code == 401


def test_rate_limit_zero_switches_it_off(api):
    # More requests than the default bucket (a burst of 200, refilled at 50/s) would let through; with a limit
    # the rest get 429 (tests/api/test_limits_and_auth.py).
    statuses: set[int] = set()
    with httpx.Client(base_url=api.base_url, headers={"Authorization": f"Bearer {api.key('busy')}"}) as c:
        started, sent = time.monotonic(), 0
        while sent <= 200 + 50 * (time.monotonic() - started) + 10:
            assert sent < 3000, "requests too slow to exceed the default rate"
            statuses.add(c.get("/v1/fine_tuning/jobs").status_code)
            sent += 1
    assert statuses == {200}


def test_the_jobs_commands_use_api_key_and_base_url(api, tmp_path):
    key = api.key("cli")
    job_id = submit(api, api.openai(key), tmp_path)
    env = {**api.env, "TUNEYARD_API_KEY": key, "TUNEYARD_BASE_URL": api.base_url}
    out = subprocess.run([sys.executable, "-m", "tuneyard.cli", "jobs", "get", job_id], env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0 and job_id in out.stdout, out.stderr
    env["TUNEYARD_BASE_URL"] = f"http://127.0.0.1:{free_port()}"
    assert subprocess.run([sys.executable, "-m", "tuneyard.cli", "jobs", "get", job_id], env=env,
                          capture_output=True).returncode != 0


def _jwt(private: bytes, **claims) -> str:
    import jwt

    body = {"tenant": "jwtorg", "sub": "alice", "iss": ISSUER, "exp": int(time.time()) + 600, **claims}
    return jwt.encode({k: v for k, v in body.items() if v is not None}, private, algorithm="RS256")


def test_jwt_public_key_algorithms_issuer_and_claims(api, rsa_key):
    import jwt

    private = rsa_key[0]

    def get(path: str, token: str) -> httpx.Response:
        return httpx.get(f"{api.base_url}{path}", headers={"Authorization": f"Bearer {token}"})

    # TUNEYARD_JWT_PUBLIC_KEY (a path), RS256, the issuer, the organisation in the "tenant" claim.
    r = get("/job/list/?org_id=jwtorg", _jwt(private))
    assert r.status_code == 200, r.text
    # The role is read from the "perm" claim: an admin there may read the audit log, a "role" claim is ignored.
    assert get("/v1/audit", _jwt(private, perm="admin")).status_code == 200
    assert get("/v1/audit", _jwt(private, role="admin")).status_code == 403
    cases = [
        (_jwt(private, iss="https://elsewhere.example"), "issuer"),
        (_jwt(private, tenant=None, org="jwtorg"), "'tenant' claim"),
        # HS256 is not among TUNEYARD_JWT_ALGORITHMS, even signed with the public key's text.
        (jwt.encode({"tenant": "jwtorg", "iss": ISSUER, "exp": int(time.time()) + 60}, "x" * 32, algorithm="HS256"),
         "alg value is not allowed"),
    ]
    for token, fragment in cases:
        r = get("/v1/fine_tuning/jobs", token)
        assert r.status_code == 401 and fragment in r.json()["error"]["message"].lower(), (fragment, r.text)


# ----- one server with a worker: scheduling and job-process settings ------------------------------------------
def wait_for(cond, timeout: float, what: str):
    deadline = time.time() + timeout
    while not (value := cond()):
        assert time.time() < deadline, what
        time.sleep(0.1)
    return value


def sigterm_pending(pid: int) -> bool:
    """True when a SIGTERM waits to be delivered to the (stopped) process ``pid``."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    pending = {k: int(v, 16) for k, v in (line.split(":\t") for line in status.splitlines()
                                          if line.startswith(("SigPnd", "ShdPnd")))}
    return any(mask & (1 << (signal.SIGTERM - 1)) for mask in pending.values())


def test_worker_settings_on_one_server(tmp_path_factory, tmp_path, tiny_model_dir):
    from tests.integration.test_prepare_standby import standby_pids

    srv = start(tmp_path_factory, tiny_model_dir, "worker", {
        "TUNEYARD_GPU_COUNT": "0", "TUNEYARD_CPU_SLOTS": "1", "TUNEYARD_CPU_PROCS_PER_JOB": "2",
        "TUNEYARD_PREPARE_SLOTS": "1", "TUNEYARD_PREPARE_STANDBY": "false", "TUNEYARD_TRAINER_STANDBY": "false",
        "TUNEYARD_JOB_LOG_BYTES": "512",
        "TUNEYARD_CANCEL_GRACE_SECONDS": "0.5"})
    try:
        client = srv.openai(srv.key())
        # TUNEYARD_CPU_PROCS_PER_JOB=2: the spec is split for two processes from the submission on, so a batch of
        # one is refused naming it (it used to fail in the trainer).
        with pytest.raises(openai.BadRequestError) as e:
            submit(srv, client, tmp_path, n_epochs=50, batch_size=1)
        assert e.value.body["param"] == "batch_size" and "2 training processes" in e.value.body["message"]
        long_job = submit(srv, client, tmp_path, n_epochs=50, batch_size=2)
        other = submit(srv, client, tmp_path, n_epochs=1)
        jobs = srv.home / "jobs" / "acme"
        # TUNEYARD_POLL_INTERVAL (0.2 s here): the worker claims a new job at once.
        wait_for(lambda: job_row(srv, long_job)[1], 2.0, "the first job was not claimed")
        # TUNEYARD_PREPARE_SLOTS=1: the second job waits while the first one's prepare step runs.
        assert job_row(srv, long_job)[0] == "validating_files" and job_row(srv, other)[1] is None
        # TUNEYARD_PREPARE_STANDBY=false, TUNEYARD_TRAINER_STANDBY=false: no process kept ready beside the job's.
        assert standby_pids(srv.proc.pid) == standby_pids(srv.proc.pid, b"tuneyard.trainer") == []
        wait_for(lambda: job_row(srv, long_job)[0] == "running", 90, "the first job did not start")
        wait_for(lambda: job_row(srv, other)[0] == "queued", 90, "the second job was not prepared")
        assert standby_pids(srv.proc.pid) == []
        # TUNEYARD_CPU_PROCS_PER_JOB=2: torchrun with two ranks (a one-process job runs the trainer alone).
        procs = wait_for(lambda: len(p := job_processes(jobs / long_job)) == 3 and p, 60, "no two ranks started")
        cmdlines = [Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0") for p in procs]
        assert sum(b"--nproc_per_node=2" in c for c in cmdlines) == 1
        # TUNEYARD_JOB_LOG_BYTES=512: the job's logs are rotated (one old copy) long before 64 MiB.
        wait_for(lambda: list((jobs / long_job / "logs").glob("*.log.1")), 30, "no log rotated")
        # TUNEYARD_CPU_SLOTS=1: the prepared second job waits for the slot the first one holds.
        time.sleep(1.0)
        assert job_row(srv, other)[0] == "queued"
        # TUNEYARD_CANCEL_GRACE_SECONDS=0.5: a trainer that does not stop at a step (here: stopped outright) gets
        # SIGTERM about 0.5 s after the cancel, not after the default 3 s.
        for p in procs:
            os.kill(p, signal.SIGSTOP)
        cancelled_at = time.monotonic()
        client.fine_tuning.jobs.cancel(long_job)
        wait_for(lambda: all(sigterm_pending(p) for p in procs), 2.5, "no SIGTERM within 2.5 s of the cancel")
        assert time.monotonic() - cancelled_at >= 0.4
        wait_for(lambda: not job_processes(jobs / long_job), 15, "the stopped trainer was not killed")
        client.fine_tuning.jobs.cancel(other)
        assert client.fine_tuning.jobs.retrieve(long_job).status == "cancelled"
    finally:
        for p in job_processes(srv.home / "jobs"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        srv.stop()
    # The api server above logs at "info"; this one at the tests' default, "warning".
    assert " INFO " not in (srv.home / "server.log").read_text()


# ----- the prepare step's settings (read by the prepare process; run here in-process) -------------------------
@pytest.fixture()
def prepare_env(monkeypatch, tmp_path):
    """Set TUNEYARD_* variables for prepare runs in this process, with a home of the test's own."""
    from tuneyard.settings import reset_settings

    def setenv(**values: str) -> None:
        monkeypatch.setenv("TUNEYARD_HOME", str(tmp_path / "home"))
        for name, value in values.items():
            monkeypatch.setenv(f"TUNEYARD_{name.upper()}", value)
        reset_settings()

    yield setenv
    reset_settings()


def prepare(tmp_path: Path, name: str, model: Path, train: str | Path) -> dict:
    """Run the prepare step on one job; its prepared.json."""
    from tests.unit.test_data_prepare import make_job
    from tuneyard.data.prepare import run
    from tuneyard.jobdir import read_json

    job = make_job(tmp_path / name, model, train)
    assert run(job.root) == 0
    prepared = read_json(job.prepared)
    prepared["reused"] = any(e.message.startswith("Reused the tokenised data") for e in _events(job))
    return prepared


def _events(job) -> list:
    from tuneyard.jobdir import iter_events

    return list(iter_events(job.events))


def test_min_examples_raises_every_jobs_minimum(prepare_env, tmp_path, tiny_model_dir):
    prepare_env(min_examples="100")
    train = write_sample_jsonl(tmp_path / "train.jsonl")
    error = prepare(tmp_path, "few", tiny_model_dir, train)["error"]
    assert error["code"] == "invalid_n_examples" and error["param"] == "training_file"
    assert "must have at least 100 examples" in error["message"]


def test_tokenised_cache_zero_turns_reuse_off(prepare_env, tmp_path, tiny_model_dir):
    # With the default cache the second prepare reuses the first one's tokens (tests/unit/test_data_cache.py).
    prepare_env(tokenised_cache_bytes="0")
    train = write_sample_jsonl(tmp_path / "train.jsonl", repeat=2)
    first, second = (prepare(tmp_path, name, tiny_model_dir, train) for name in ("a", "b"))
    assert first["ok"] and second["ok"] and not first["reused"] and not second["reused"]
    assert not (tmp_path / "home" / "cache" / "tokenised").exists()


@pytest.fixture(scope="module")
def loopback_data(tmp_path_factory):
    """A loopback HTTP server serving the sample data as /train.jsonl."""
    import functools
    import http.server
    import threading

    root = tmp_path_factory.mktemp("web")
    write_sample_jsonl(root / "train.jsonl")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *a) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/train.jsonl"
    httpd.shutdown()


def test_max_download_bytes_fails_a_bigger_remote_dataset(prepare_env, tmp_path, tiny_model_dir, loopback_data):
    prepare_env(max_download_bytes="100")
    error = prepare(tmp_path, "big", tiny_model_dir, loopback_data)["error"]
    assert error["param"] == "training_file" and "over the 100 byte download limit" in error["message"], error


def _own_reserved_address() -> str | None:
    """This machine's address on its default route when it is a private or reserved one (containers, CI)."""
    import ipaddress
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("198.51.100.1", 9))  # no packet is sent: this only picks the outgoing address
        except OSError:
            return None
        address = s.getsockname()[0]
    ip = ipaddress.ip_address(address)
    return address if not ip.is_loopback and (ip.is_private or ip.is_reserved) else None


def test_download_allow_private_hosts_lifts_the_refusal(prepare_env, tmp_path, tiny_model_dir):
    address = _own_reserved_address()
    if address is None:
        pytest.skip("this machine has no private or reserved address to connect to")
    url = f"https://{address}:{free_port()}/train.jsonl"  # nothing listens there: refused at once when tried
    prepare_env()
    error = prepare(tmp_path, "refused", tiny_model_dir, url)["error"]
    assert "a private or reserved address" in error["message"], error
    prepare_env(download_allow_private_hosts="true")
    error = prepare(tmp_path, "allowed", tiny_model_dir, url)["error"]
    # Tried this time: the connection fails, not the address check.
    assert error["param"] == "training_file" and "private or reserved" not in error["message"], error
