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
