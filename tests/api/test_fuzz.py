"""Hostile input: schemathesis-generated requests (valid and invalid) against every served operation.

A bounded number of examples per operation keeps this in CI; a longer run is the same test with
``TUNEYARD_FUZZ_EXAMPLES`` raised. The server must answer every request with a non-5xx status.
"""

from __future__ import annotations

import os

import httpx
import pytest

from tests.conftest import Server

EXAMPLES = int(os.environ.get("TUNEYARD_FUZZ_EXAMPLES", "12"))


@pytest.fixture(scope="module")
def srv(tmp_path_factory, tiny_model_dir):
    import shutil

    s = Server(tmp_path_factory.mktemp("fuzz-home"), {"TUNEYARD_RUN_WORKER": "false",
                                                      "TUNEYARD_RATE_LIMIT_PER_SECOND": "0",
                                                      "TUNEYARD_MAX_UPLOAD_BYTES": "100000"})
    shutil.copytree(tiny_model_dir, s.local / "tiny-llama")
    yield s
    s.stop()


def operations(srv):
    import schemathesis

    schema = schemathesis.openapi.from_dict(httpx.get(f"{srv.base_url}/openapi.json").json())
    return [r.ok() for r in schema.get_all_operations()]


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_no_request_makes_the_server_fail(srv, mode):
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable

    key = srv.key("fuzz")
    headers = {"Authorization": f"Bearer {key}"}
    failures: list[str] = []
    ops = operations(srv)
    assert len(ops) >= 20  # every dialect's operations are in the schema
    for op in ops:
        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy(generation_mode=schemathesis.GenerationMode(mode)))
        def run(case):
            response = case.call(base_url=srv.base_url, headers=headers, timeout=30)
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.formatted_path} -> {response.status_code}: "
                                f"{response.text[:300]} (query={case.query!r}, body={case.body!r:.300})")

        try:
            run()
        except Unsatisfiable:
            assert mode == "negative"  # an operation without parameters has no invalid form to generate
    assert not failures, "\n".join(failures[:20])
    assert httpx.get(f"{srv.base_url}/healthz").status_code == 200


def _jsonl_bodies():
    """Hypothesis strategy: JSONL-ish files, mostly broken: random JSON values, chat rows with odd fields,
    truncated lines, raw bytes (invalid UTF-8 included), deep nesting."""
    from hypothesis import strategies as st

    scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20))
    values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                           st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                          max_leaves=12)
    role = st.sampled_from(["user", "assistant", "system", "tool", "human", "gpt", "bogus", "", None, 3])
    message = st.fixed_dictionaries({"role": role}, optional={"content": st.one_of(st.text(max_size=30), values),
                                                             "weight": values, "tool_calls": values})
    chat = st.fixed_dictionaries({"messages": st.lists(message, max_size=4)}, optional={"tools": values})
    import json

    line = st.one_of(chat.map(json.dumps), values.map(json.dumps), st.text(max_size=40),
                     st.integers(1, 200).map(lambda n: "[" * n + "]" * n),
                     st.integers(1000, 3000).map(lambda n: '{"a":' * n + "1" + "}" * n)).map(str.encode)
    raw = st.binary(max_size=64)
    return st.lists(st.one_of(line, line, line, raw), min_size=0, max_size=8).map(lambda ls: b"\n".join(ls))


def test_generated_training_files_never_fail_the_server(srv):
    """Uploads of generated JSONL (OpenAI files, Simplismart multipart jobs): 200 or a 4xx, never a 5xx."""
    from hypothesis import HealthCheck, given, settings

    key = srv.key("fuzz-files")
    headers = {"Authorization": f"Bearer {key}"}
    failures: list[str] = []

    @settings(max_examples=max(EXAMPLES * 4, 40), deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(body=_jsonl_bodies())
    def run(body: bytes):
        r = httpx.post(f"{srv.base_url}/v1/files", headers=headers, files={"file": ("t.jsonl", body)},
                       data={"purpose": "fine-tune"}, timeout=30)
        if r.status_code >= 500 or r.status_code == 200 and r.json()["status"] != "processed":
            failures.append(f"/v1/files -> {r.status_code}: {r.text[:300]} (body={body[:200]!r})")
        elif r.status_code == 400:
            err = r.json()["error"]
            assert err["param"] == "file" and err["message"]
        # The same rows as a Simplismart multipart job with a data: URI dataset.
        import base64

        form = {"org": "fuzz-files", "experiment_name": "fuzz", "model_details": '{"base_model": "x"}',
                "dataset_details": '{"dataset_name": "d", "dataset_path": "data:application/jsonl;base64,'
                                   + base64.b64encode(body).decode() + '", "source_type": "local"}'}
        r = httpx.post(f"{srv.base_url}/job/", headers=headers, data=form, timeout=30)
        if r.status_code >= 500:
            failures.append(f"/job/ -> {r.status_code}: {r.text[:300]}")

    run()
    assert not failures, "\n".join(failures[:20])
    assert httpx.get(f"{srv.base_url}/healthz").status_code == 200


@pytest.mark.parametrize("body,ctype", [
    (b'{"model": "x", "training_file": "' + b"\xff\xfe\xfd" + b'"}', "application/json"),
    (b"[" * 100_000 + b"]" * 100_000, "application/json"),
    (b'{"a": ' * 50_000 + b"1" + b"}" * 50_000, "application/json"),
    (b"\x00\x01\x02" * 1000, "application/json"),
    (b'--x\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\n' + b"a" * 100,
     "multipart/form-data"),
    (b"--b\r\n\r\n--b--", "multipart/form-data; boundary=b"),
])
def test_hostile_bodies_get_a_4xx(srv, body, ctype):
    headers = {"Authorization": f"Bearer {srv.key('fuzz-bodies')}", "Content-Type": ctype}
    for path in ("/v1/fine_tuning/jobs", "/v1/files", "/job/", "/v1/post-training/supervised-fine-tune",
                 "/v1/secrets"):
        r = httpx.post(f"{srv.base_url}{path}", content=body, headers=headers, timeout=30)
        assert 400 <= r.status_code < 500, (path, r.status_code, r.text[:300])
    assert httpx.get(f"{srv.base_url}/healthz").status_code == 200
