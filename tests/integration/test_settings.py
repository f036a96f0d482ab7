"""Every documented setting and `tuneyard serve` flag changes what it says it does (docs/operations.md, "Settings").

Each test shows a behaviour against a real `tuneyard serve` process, several settings per server where they
can share one. Settings guarded elsewhere are listed with their test in the table in docs/operations.md.
"""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import Server, free_port
from tuneyard.demo.tiny import write_sample_jsonl

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
        "TUNEYARD_MAX_ERROR_REPORT": "3", "TUNEYARD_AUTH_CACHE_SECONDS": "0",
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
