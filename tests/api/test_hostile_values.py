"""Values no store or encoder can keep, sent into every JSON-bearing field of the three dialects and the uploads.

Each class (an integer of thousands of digits, a lone UTF-16 surrogate, bytes that are not UTF-8, nesting past
the limit, NaN and a float that overflows) must be a 4xx that names the field or the line, and afterwards every
list and get endpoint of the organisation must still answer 200: nothing that was refused was stored, and
nothing stored fails to read back.
"""

from __future__ import annotations

import json

import httpx
import pytest

from tests.conftest import Server

PLACEHOLDER = '"__HOSTILE__"'
# name -> (raw JSON fragment, what the refusal must say)
CLASSES: dict[str, tuple[bytes, str]] = {
    "huge_int": (b"1" + b"0" * 5000, "digits"),
    "lone_surrogate": (b'"ab\\ud800cd"', "surrogate"),
    "invalid_utf8": (b'"ab\xff\xfecd"', "UTF-8"),
    "deep": (b"[" * 150 + b"]" * 150, "nested"),
    "nan": (b"NaN", "NaN"),
    "overflow": (b"1e999", "too large"),
}


def _body(template: dict, path: tuple, fragment: bytes) -> bytes:
    """``template`` as JSON with ``fragment`` (raw, possibly invalid) at ``path``."""
    doc = json.loads(json.dumps(template))
    cur = doc
    for k in path[:-1]:
        cur = cur.setdefault(k, {}) if isinstance(k, str) else cur[k]
    cur[path[-1]] = "__HOSTILE__"
    text = json.dumps(doc).encode()
    assert text.count(PLACEHOLDER.encode()) == 1
    return text.replace(PLACEHOLDER.encode(), fragment)


def _dotted(path: tuple) -> str:
    out = ""
    for k in path:
        out += f"[{k}]" if isinstance(k, int) else (f".{k}" if out else k)
    return out


@pytest.fixture(scope="module")
def srv(tmp_path_factory, tiny_model_dir):
    import shutil

    s = Server(tmp_path_factory.mktemp("hostile-home"), {"TUNEYARD_RUN_WORKER": "false",
                                                         "TUNEYARD_RATE_LIMIT_PER_SECOND": "0",
                                                         "TUNEYARD_MAX_ACTIVE_JOBS_PER_ORG": "0"})
    shutil.copytree(tiny_model_dir, s.local / "tiny-llama")
    s.model_dir = str(s.local / "tiny-llama")
    s.token = s.key("acme")
    s.http = httpx.Client(base_url=s.base_url, headers={"Authorization": f"Bearer {s.token}"}, timeout=60)
    good = b"".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                             {"role": "assistant", "content": f"a{i}"}]}).encode() + b"\n"
                    for i in range(12))
    (s.local / "train.jsonl").write_bytes(good)
    r = s.http.post("/v1/files", files={"file": ("good.jsonl", good)}, data={"purpose": "fine-tune"})
    assert r.status_code == 200, r.text
    s.file_id = r.json()["id"]
    rows = [{"dialog": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(12)]
    r = s.http.post("/v1/datasets", json={"purpose": "post-training/messages", "dataset_id": "good",
                                          "source": {"type": "rows", "rows": rows}})
    assert r.status_code == 200, r.text
    yield s
    s.http.close()
    s.stop()


def _openai_job(srv) -> dict:
    return {"model": srv.model_dir, "training_file": srv.file_id, "suffix": "s", "seed": 1,
            "metadata": {"team": "x"}, "hyperparameters": {"n_epochs": 1},
            "method": {"type": "supervised", "supervised": {"hyperparameters": {"batch_size": 1,
                                                                                "learning_rate_multiplier": 1}}}}


OPENAI_PATHS = [("model",), ("training_file",), ("suffix",), ("seed",), ("metadata", "team"),
                ("hyperparameters", "n_epochs"),
                ("method", "supervised", "hyperparameters", "batch_size"),
                ("method", "supervised", "hyperparameters", "learning_rate_multiplier"),
                ("integrations",)]


def _ls_job(srv) -> dict:
    return {"job_uuid": "hostile", "model": srv.model_dir, "hyperparam_search_config": {"a": 1},
            "logger_config": {"b": 2},
            "algorithm_config": {"type": "LoRA", "lora_attn_modules": ["q_proj"], "apply_lora_to_mlp": True,
                                 "apply_lora_to_output": False, "rank": 8, "alpha": 16},
            "training_config": {"n_epochs": 1, "max_steps_per_epoch": 2, "gradient_accumulation_steps": 1,
                                "data_config": {"dataset_id": "good", "batch_size": 2, "shuffle": True,
                                                "data_format": "dialog"}}}


LS_PATHS = [("job_uuid",), ("model",), ("hyperparam_search_config", "a"), ("logger_config", "b"),
            ("algorithm_config", "rank"), ("algorithm_config", "alpha"), ("algorithm_config", "lora_attn_modules", 0),
            ("training_config", "n_epochs"), ("training_config", "data_config", "dataset_id"),
            ("training_config", "data_config", "batch_size")]

LS_DATASET = {"purpose": "post-training/messages", "dataset_id": "bad",
              "source": {"type": "rows", "rows": [{"dialog": [{"role": "user", "content": "q"},
                                                              {"role": "assistant", "content": "a"}]}]},
              "metadata": {"k": "v"}}
LS_DATASET_PATHS = [("dataset_id",), ("metadata", "k"), ("source", "rows", 0, "dialog", 0, "content"),
                    ("source", "rows", 0, "extra")]


def _assert_refused(r: httpx.Response, cls: str, field: str | None, *, field_in: str = "param") -> None:
    assert 400 <= r.status_code < 500, f"{cls} at {field}: {r.status_code} {r.text[:300]}"
    text = r.text
    assert CLASSES[cls][1].lower() in text.lower(), f"{cls} at {field}: {text[:300]}"
    if field is not None:
        assert field in text, f"{cls}: the answer does not name {field}: {text[:300]}"


@pytest.mark.parametrize("cls", sorted(CLASSES))
def test_openai_job_fields(srv, cls):
    before = srv.http.get("/v1/fine_tuning/jobs", params={"limit": 100}).json()["data"]
    for path in OPENAI_PATHS:
        r = srv.http.post("/v1/fine_tuning/jobs", content=_body(_openai_job(srv), path, CLASSES[cls][0]),
                          headers={"content-type": "application/json"})
        # Nesting is named by the field it starts under; an undecodable string by the field holding it.
        _assert_refused(r, cls, _dotted(path) if cls not in ("deep",) else path[0])
        if cls not in ("invalid_utf8",) or r.json()["error"]["param"] is not None:
            assert r.json()["error"]["param"] is not None and r.json()["error"]["param"].startswith(path[0])
    assert srv.http.get("/v1/fine_tuning/jobs", params={"limit": 100}).json()["data"] == before


@pytest.mark.parametrize("cls", sorted(CLASSES))
def test_llamastack_fields(srv, cls):
    for path in LS_PATHS:
        r = srv.http.post("/v1/post-training/supervised-fine-tune", content=_body(_ls_job(srv), path,
                                                                                  CLASSES[cls][0]),
                          headers={"content-type": "application/json"})
        _assert_refused(r, cls, _dotted(path) if cls != "deep" else path[0])
        assert "detail" in r.json()
    for path in LS_DATASET_PATHS:
        r = srv.http.post("/v1/datasets", content=_body(LS_DATASET, path, CLASSES[cls][0]),
                          headers={"content-type": "application/json"})
        _assert_refused(r, cls, _dotted(path) if cls != "deep" else path[0])
    assert srv.http.get("/v1/datasets/bad").status_code == 404


SS_FORM = {"dataset_config": {"preprocessing": {"prompt": {"system": "You help.", "max_length": 256}},
                              "split": {"type": "random", "ratios": [0.9, 0.1]}},
           "model_details": {"base_model": "MODEL", "source_type": "local"},
           "train_config": {"train_type": "lora", "hyperparameters": {"num_epochs": 1, "learning_rate": 0.001},
                            "adapter_config": {"r": 8, "alpha": 16}},
           "dataset_details": {"dataset_path": "DATA", "source_type": "local"},
           "infra_config": {"gpu_type": "cpu", "gpu_count": 1}}
SS_PATHS = [("dataset_config", "preprocessing", "prompt", "system"), ("dataset_config", "preprocessing", "prompt",
                                                                      "max_length"),
            ("model_details", "base_model"), ("train_config", "hyperparameters", "num_epochs"),
            ("train_config", "hyperparameters", "learning_rate"), ("train_config", "adapter_config", "alpha"),
            ("dataset_details", "dataset_path"), ("infra_config", "gpu_count")]


@pytest.mark.parametrize("cls", sorted(CLASSES))
def test_simplismart_form_fields(srv, cls):
    before = srv.http.get("/job/list/", params={"org_id": "acme"}).json()["total_count"]
    for path in SS_PATHS:
        form = json.loads(json.dumps(SS_FORM).replace("MODEL", srv.model_dir)
                          .replace("DATA", str(srv.local / "train.jsonl")))
        files = {"org": (None, b"acme"), "experiment_name": (None, b"hostile")}
        for name, value in form.items():
            raw = _body(value, path[1:], CLASSES[cls][0]) if name == path[0] else json.dumps(value).encode()
            files[name] = (None, raw)
        r = srv.http.post("/job/", files=files)
        _assert_refused(r, cls, path[0])
        assert r.json()["field"] == path[0]
    # The plain-text fields too: a form field that is not UTF-8 is refused, not read as Latin-1.
    form = {name: (None, json.dumps(value).replace("MODEL", srv.model_dir)
                   .replace("DATA", str(srv.local / "train.jsonl")).encode()) for name, value in SS_FORM.items()}
    r = srv.http.post("/job/", files={**form, "org": (None, b"acme"), "experiment_name": (None, b"bad\xffname")})
    assert r.status_code == 400 and r.json()["field"] == "experiment_name", r.text
    assert srv.http.get("/job/list/", params={"org_id": "acme"}).json()["total_count"] == before


LINE = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                     {"role": "assistant", "content": "a", "weight": 1}]}
TOOL_LINE = {"messages": [{"role": "user", "content": "q"},
                          {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                                                                "function": {"name": "f", "arguments": "ARGS"}}]},
                          {"role": "tool", "tool_call_id": "c1", "content": "ok"},
                          {"role": "assistant", "content": "done"}]}


@pytest.mark.parametrize("cls", sorted(CLASSES))
def test_upload_lines(srv, cls):
    ok = json.dumps(LINE).encode()
    files_before = srv.http.get("/v1/files").json()["data"]
    for path in [("messages", 1, "content"), ("messages", 2, "weight"), ("messages", 0, "extra")]:
        bad = _body(LINE, path, CLASSES[cls][0])
        for fmt, content in (("jsonl", ok + b"\n" + bad + b"\n" + ok + b"\n"),
                             ("json", b"[" + ok + b",\n" + bad + b"]")):
            r = srv.http.post("/v1/files", files={"file": (f"t.{fmt}", content)}, data={"purpose": "fine-tune"})
            assert r.status_code == 400, f"{cls} {path} {fmt}: {r.text[:300]}"
            msg = r.json()["error"]["message"]
            assert ("Example 2" in msg or "line 2" in msg), msg
            assert CLASSES[cls][1].lower() in msg.lower(), msg
    if cls != "invalid_utf8":
        # Inside a tool call's arguments, a JSON string itself: the number or text within it.
        args = _body({"a": 1}, ("a",), CLASSES[cls][0]).decode()
        line = json.dumps(TOOL_LINE).replace('"ARGS"', json.dumps(args)).encode()
        r = srv.http.post("/v1/files", files={"file": ("t.jsonl", ok + b"\n" + line + b"\n")},
                          data={"purpose": "fine-tune"})
        if cls == "lone_surrogate":
            # json.dumps escaped the surrogate inside the arguments string: the line itself holds it.
            assert r.status_code == 400 and "surrogate" in r.text, r.text
        else:
            assert r.status_code == 400 and "Example 2" in r.text and "arguments" in r.text, r.text
    assert srv.http.get("/v1/files").json()["data"] == files_before


def test_upload_csv_not_utf8(srv):
    r = srv.http.post("/v1/files", files={"file": ("t.csv", b"prompt,completion\nq,a\nq\xff,a\n")},
                      data={"purpose": "fine-tune"})
    assert r.status_code == 400 and "UTF-8" in r.text, r.text


@pytest.mark.parametrize("value", [10**30, -(10**30), 2**63, 1e300])
def test_numbers_out_of_range(srv, value):
    """Parseable numbers too large for what they count: a 400 naming the field, in every dialect."""
    for path in [("seed",), ("hyperparameters", "n_epochs"), ("hyperparameters", "lora_alpha"),
                 ("hyperparameters", "max_grad_norm"), ("method", "supervised", "hyperparameters", "batch_size")]:
        body = _body(_openai_job(srv), path, json.dumps(value).encode())
        r = srv.http.post("/v1/fine_tuning/jobs", content=body, headers={"content-type": "application/json"})
        if value < 0 and path[-1] in ("max_grad_norm",):
            assert r.status_code == 400
        else:
            assert r.status_code == 400, f"{path} {value}: {r.text[:200]}"
        assert r.json()["error"]["param"].endswith(path[-1]), r.text
    for path in LS_PATHS:
        if path[-1] in ("rank", "alpha", "n_epochs", "batch_size"):
            body = _body(_ls_job(srv), path, json.dumps(value).encode())
            r = srv.http.post("/v1/post-training/supervised-fine-tune", content=body,
                              headers={"content-type": "application/json"})
            assert r.status_code == 400 and path[-1] in r.text, f"{path} {value}: {r.text[:200]}"
    for name, path in [("train_config", ("hyperparameters", "save_steps")),
                       ("train_config", ("hyperparameters", "logging_steps")),
                       ("train_config", ("adapter_config", "alpha")), ("infra_config", ("node_count",))]:
        form = {k: json.dumps(v).replace("MODEL", srv.model_dir).replace("DATA", str(srv.local / "train.jsonl"))
                for k, v in SS_FORM.items()}
        form[name] = _body(json.loads(form[name]), path, json.dumps(value).encode()).decode()
        r = srv.http.post("/job/", data={**form, "org": "acme", "experiment_name": "big"})
        assert r.status_code == 400 and path[-1] in r.text, f"{name} {path} {value}: {r.text[:200]}"


def test_every_list_and_get_still_answers(srv):
    """After all of the above, every read of the organisation answers 200 (run last in this module)."""
    body = _openai_job(srv)
    del body["hyperparameters"]
    good = srv.http.post("/v1/fine_tuning/jobs", json=body)
    assert good.status_code == 200, good.text
    job_id = good.json()["id"]
    for path in ["/v1/fine_tuning/jobs", f"/v1/fine_tuning/jobs/{job_id}", f"/v1/fine_tuning/jobs/{job_id}/events",
                 f"/v1/fine_tuning/jobs/{job_id}/checkpoints", "/v1/files", f"/v1/files/{srv.file_id}",
                 "/v1/models", "/v1/secrets", "/v1/audit", "/job/list/?org_id=acme",
                 f"/job/get/?org_id=acme&request_id={job_id}", "/v1/datasets", "/v1/datasets/good",
                 "/v1/post-training/jobs", f"/v1/post-training/job/status?job_uuid={job_id}"]:
        r = srv.http.get(path)
        assert r.status_code == 200, f"{path}: {r.status_code} {r.text[:300]}"
