"""Request limits (body size, rate) and JWT bearer tokens, against a real server, in each dialect's format."""

from __future__ import annotations

import time

import httpx
import jwt
import openai
import pytest

from tests.conftest import Server

SECRET = "test-jwt-secret-at-least-32-bytes-long!"


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("limits-home"), {
        "TUNEYARD_RUN_WORKER": "false", "TUNEYARD_RATE_LIMIT_PER_SECOND": "0.5", "TUNEYARD_RATE_LIMIT_BURST": "5",
        "TUNEYARD_MAX_REQUEST_BYTES": "20000", "TUNEYARD_MAX_UPLOAD_BYTES": "50000",
        "TUNEYARD_JWT_SECRET": SECRET, "TUNEYARD_JWT_AUDIENCE": "tuneyard"})
    yield s
    s.stop()


def token(**claims) -> str:
    body = {"org": "jwtorg", "sub": "alice", "aud": "tuneyard", "exp": int(time.time()) + 600, **claims}
    return jwt.encode({k: v for k, v in body.items() if v is not None}, SECRET, algorithm="HS256")


def test_rate_limit_is_a_429_with_retry_after_per_key(srv):
    a, b = srv.key("ratea"), srv.key("rateb")
    codes = [httpx.get(f"{srv.base_url}/v1/fine_tuning/jobs", headers={"Authorization": f"Bearer {a}"}).status_code
             for _ in range(8)]
    assert codes[:5] == [200] * 5 and 429 in codes[5:]
    r = httpx.get(f"{srv.base_url}/v1/fine_tuning/jobs", headers={"Authorization": f"Bearer {a}"})
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    assert r.json()["error"]["code"] == "rate_limit_exceeded"
    # Simplismart's format for the same limit; another key has its own bucket.
    r = httpx.get(f"{srv.base_url}/job/list/", params={"org_id": "ratea"}, headers={"Authorization": f"Bearer {a}"})
    assert r.status_code == 429 and r.json()["code"] == "rate_limit_exceeded" and r.headers["retry-after"]
    assert httpx.get(f"{srv.base_url}/v1/fine_tuning/jobs",
                     headers={"Authorization": f"Bearer {b}"}).status_code == 200
    with pytest.raises(openai.RateLimitError):
        client = srv.openai(a)
        for _ in range(3):
            client.fine_tuning.jobs.list()
    time.sleep(2.2)  # one token every two seconds: the bucket refills
    assert httpx.get(f"{srv.base_url}/v1/fine_tuning/jobs",
                     headers={"Authorization": f"Bearer {a}"}).status_code == 200


def test_oversized_bodies_are_413_before_they_are_read(srv):
    key = srv.key("big")
    h = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    body = b'{"model": "x", "training_file": "file-1", "metadata": {"k": "' + b"v" * 30000 + b'"}}'
    r = httpx.post(f"{srv.base_url}/v1/fine_tuning/jobs", headers=h, content=body)
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"

    def chunks():  # no Content-Length: the count is enforced while reading
        for _ in range(30):
            yield b"x" * 1000

    r = httpx.post(f"{srv.base_url}/v1/fine_tuning/jobs", headers=h, content=chunks())
    assert r.status_code == 413
    upload = {"file": ("t.jsonl", b"{}\n" * 600_000)}
    r = httpx.post(f"{srv.base_url}/v1/files", headers={"Authorization": f"Bearer {key}"}, files=upload,
                   data={"purpose": "fine-tune"})
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
    r = httpx.post(f"{srv.base_url}/job/", headers={"Authorization": f"Bearer {key}"},
                   data={"org": "big", "experiment_name": "x", "dataset_config": "{" + " " * 30000 + "}"})
    assert r.status_code == 413 and r.json()["code"] == "payload_too_large"


def test_jwt_bearer_tokens_map_to_an_organisation(srv):
    h = {"Authorization": f"Bearer {token()}"}
    r = httpx.get(f"{srv.base_url}/v1/fine_tuning/jobs", headers=h)
    assert r.status_code == 200, r.text
    r = httpx.get(f"{srv.base_url}/job/list/", params={"org_id": "jwtorg"}, headers=h)
    assert r.status_code == 200 and r.json()["total_count"] == 0
    assert httpx.get(f"{srv.base_url}/job/list/", params={"org_id": "other"}, headers=h).status_code == 404
    cases = [
        (token(exp=int(time.time()) - 10), "expired"),
        (jwt.encode({"org": "jwtorg", "aud": "tuneyard", "exp": int(time.time()) + 60}, "wrong-secret-" * 3,
                    algorithm="HS256"), "Signature verification failed"),
        (token(aud="someone-else"), "Audience"),
        (token(org=None), "'org' claim"),
        (token(org="Not A Slug"), "'org' claim"),
        (jwt.encode({"org": "jwtorg", "aud": "tuneyard"}, SECRET, algorithm="HS256"), "exp"),
        (jwt.encode({"org": "jwtorg", "aud": "tuneyard", "exp": int(time.time()) + 60}, None, algorithm="none"),
         "not allowed"),
    ]
    for bad, fragment in cases:
        r = httpx.get(f"{srv.base_url}/v1/fine_tuning/jobs", headers={"Authorization": f"Bearer {bad}"})
        assert r.status_code == 401, (fragment, r.text)
        assert fragment in r.json()["error"]["message"], r.json()
