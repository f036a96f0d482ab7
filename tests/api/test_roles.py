"""Roles within one organisation: members see only what they created, admins everything; secrets are written
by admins and never shown; the audit log records who did what and only admins read it."""

from __future__ import annotations

import subprocess
import sys

import httpx
import openai
import pytest

from tests.conftest import Server
from tuneyard.demo.tiny import write_sample_jsonl

SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYPLANTEDKEY"


@pytest.fixture(scope="module")
def org(tmp_path_factory, tiny_model_dir):
    import shutil

    srv = Server(tmp_path_factory.mktemp("roles-home"), {"TUNEYARD_RUN_WORKER": "false",
                                                         "TUNEYARD_RATE_LIMIT_PER_SECOND": "0"})
    shutil.copytree(tiny_model_dir, srv.local / "tiny-llama")

    def key(role: str) -> str:
        out = subprocess.run([sys.executable, "-m", "tuneyard.cli", "keys", "create", "--org", "acme", "--role", role],
                             env=srv.env, capture_output=True, text=True, check=True)
        return out.stdout.strip().splitlines()[-1]

    keys = {"admin": key("admin"), "ann": key("member"), "bob": key("member")}
    path = write_sample_jsonl(tmp_path_factory.mktemp("roles") / "t.jsonl")
    yield srv, keys, path
    srv.stop()


def _client(srv: Server, key: str) -> openai.OpenAI:
    return srv.openai(key)


def _http(srv: Server, key: str, method: str, path: str, **kw) -> httpx.Response:
    return httpx.request(method, f"{srv.base_url}{path}", headers={"Authorization": f"Bearer {key}"}, timeout=30,
                         **kw)


def test_members_see_their_own_jobs_and_files_admins_all(org):
    srv, keys, path = org
    ann, bob, admin = (_client(srv, keys[k]) for k in ("ann", "bob", "admin"))
    with path.open("rb") as fh:
        f = ann.files.create(file=fh, purpose="fine-tune")
    job = ann.fine_tuning.jobs.create(model=str(srv.local / "tiny-llama"), training_file=f.id)

    for call in (lambda: bob.fine_tuning.jobs.retrieve(job.id), lambda: bob.files.retrieve(f.id),
                 lambda: bob.fine_tuning.jobs.cancel(job.id), lambda: bob.files.delete(f.id),
                 lambda: bob.fine_tuning.jobs.create(model=str(srv.local / "tiny-llama"), training_file=f.id)):
        with pytest.raises((openai.NotFoundError, openai.BadRequestError)):
            call()
    assert job.id not in [j.id for j in bob.fine_tuning.jobs.list()]
    assert f.id not in [x.id for x in bob.files.list()]
    assert job.id in [j.id for j in ann.fine_tuning.jobs.list()]
    assert job.id in [j.id for j in admin.fine_tuning.jobs.list()] and admin.files.retrieve(f.id).id == f.id
    # The same Idempotency-Key from a colleague is refused, without handing over ann's job.
    h = {"Idempotency-Key": "shared-key"}
    mine = ann.fine_tuning.jobs.create(model=str(srv.local / "tiny-llama"), training_file=f.id, extra_headers=h)
    with pytest.raises(openai.ConflictError) as e:
        bob.fine_tuning.jobs.create(model=str(srv.local / "tiny-llama"), training_file=f.id, extra_headers=h)
    assert mine.id not in str(e.value.body)
    assert admin.fine_tuning.jobs.cancel(job.id).status == "cancelled"  # admins manage every job of the org


def test_secrets_are_written_by_admins_and_never_shown(org):
    srv, keys, _ = org
    body = {"name": "aws-prod", "type": "aws", "value": {"access_key_id": "AKIAPLANTED", "secret_access_key": SECRET}}
    denied = _http(srv, keys["ann"], "POST", "/v1/secrets", json=body)
    assert denied.status_code == 403 and denied.json()["error"]["code"] == "permission_denied"
    made = _http(srv, keys["admin"], "POST", "/v1/secrets", json=body)
    assert made.status_code == 200, made.text
    assert made.json()["name"] == "aws-prod" and SECRET not in made.text and "AKIAPLANTED" not in made.text
    listed = _http(srv, keys["bob"], "GET", "/v1/secrets")
    assert listed.status_code == 200 and [s["name"] for s in listed.json()["data"]] == ["aws-prod"]
    assert SECRET not in listed.text and "AKIAPLANTED" not in listed.text and "ciphertext" not in listed.text
    again = _http(srv, keys["admin"], "POST", "/v1/secrets", json=body)
    assert again.status_code == 409
    bad = _http(srv, keys["admin"], "POST", "/v1/secrets", json={**body, "name": "x", "value": {"token": "t"}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "value"
    assert _http(srv, keys["bob"], "DELETE", "/v1/secrets/aws-prod").status_code == 403
    gone = _http(srv, keys["admin"], "DELETE", "/v1/secrets/aws-prod")
    assert gone.status_code == 200 and gone.json()["deleted"] is True
    assert _http(srv, keys["admin"], "DELETE", "/v1/secrets/aws-prod").status_code == 404
    # Another organisation's admin sees none of it.
    other = subprocess.run([sys.executable, "-m", "tuneyard.cli", "keys", "create", "--org", "globex"], env=srv.env,
                           capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    assert _http(srv, other, "GET", "/v1/secrets").json()["data"] == []


def test_the_audit_log_says_who_did_what_and_only_admins_read_it(org):
    srv, keys, path = org
    ann = _client(srv, keys["ann"])
    with path.open("rb") as fh:
        f = ann.files.create(file=fh, purpose="fine-tune")
    job = ann.fine_tuning.jobs.create(model=str(srv.local / "tiny-llama"), training_file=f.id)
    ann.fine_tuning.jobs.cancel(job.id)
    assert _http(srv, keys["ann"], "GET", "/v1/audit").status_code == 403
    r = _http(srv, keys["admin"], "GET", "/v1/audit", params={"limit": 1000})
    assert r.status_code == 200
    entries = r.json()["data"]
    ann_id = keys["ann"].split("-")[1]
    mine = [(e["action"], e["object_id"]) for e in entries if e["actor"] == ann_id]
    assert ("file.create", f.id) in mine and ("job.create", job.id) in mine and ("job.cancel", job.id) in mine
    assert [e["created_at"] for e in entries] == sorted((e["created_at"] for e in entries), reverse=True)
    actions = {e["action"] for e in entries}
    assert {"key.create", "secret.create", "secret.delete"} <= actions
    assert SECRET not in r.text
    # Pages: after= walks back through it.
    first = _http(srv, keys["admin"], "GET", "/v1/audit", params={"limit": 2}).json()
    rest = _http(srv, keys["admin"], "GET", "/v1/audit", params={"limit": 1000, "after": first["last_id"]}).json()
    assert first["has_more"] and [e["id"] for e in first["data"] + rest["data"]] == [e["id"] for e in entries]
