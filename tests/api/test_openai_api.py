"""The OpenAI dialect against a real server process, driven by the unchanged `openai` SDK.

This server runs without a worker, so jobs stay where the API put them; training end to end is in
tests/integration.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.conftest import Server


@pytest.fixture(scope="module")
def api(tmp_path_factory, tiny_model_dir):
    import shutil

    home = tmp_path_factory.mktemp("api-home")
    srv = Server(home, {"TUNEYARD_RUN_WORKER": "false", "TUNEYARD_MAX_UPLOAD_BYTES": str(200_000),
                        "TUNEYARD_BASE_MODELS": f"{home / 'local' / 'tiny-llama'},org/configured-base"})
    shutil.copytree(tiny_model_dir, srv.local / "tiny-llama")
    srv.model_dir = str(srv.local / "tiny-llama")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def acme(api):
    return api.openai(api.key("acme"))


@pytest.fixture(scope="module")
def train_file(acme, tmp_path_factory):
    from tuneyard.demo.tiny import write_sample_jsonl

    p = write_sample_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl")
    return acme.files.create(file=p.open("rb"), purpose="fine-tune")


def _create(client, api, train_file, **kw):
    args = {"model": api.model_dir, "training_file": train_file.id}
    args.update(kw)
    return client.fine_tuning.jobs.create(**args)


# ----- files -----------------------------------------------------------------------------------------
def test_upload_list_retrieve_content_delete(acme, tmp_path):
    from tuneyard.demo.tiny import write_sample_jsonl

    p = write_sample_jsonl(tmp_path / "mine.jsonl")
    f = acme.files.create(file=p.open("rb"), purpose="fine-tune")
    assert f.id.startswith("file-") and f.object == "file" and f.status == "processed"
    assert f.bytes == p.stat().st_size and f.filename == "mine.jsonl" and f.purpose == "fine-tune"
    assert acme.files.retrieve(f.id).id == f.id
    assert f.id in [x.id for x in acme.files.list(purpose="fine-tune")]
    assert acme.files.content(f.id).read() == p.read_bytes()
    deleted = acme.files.delete(f.id)
    assert deleted.deleted and deleted.id == f.id
    with pytest.raises(openai.NotFoundError):
        acme.files.retrieve(f.id)


def test_non_jsonl_upload_is_rejected_with_the_line(acme, tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                 "this is not json\n")
    before = len(list(acme.files.list()))
    with pytest.raises(openai.BadRequestError) as e:
        acme.files.create(file=p.open("rb"), purpose="fine-tune")
    err = e.value.body
    assert e.value.status_code == 400 and err["param"] == "file"
    assert "Example 2" in err["message"]
    assert len(list(acme.files.list())) == before  # nothing was kept


def test_unknown_role_and_missing_assistant(acme, tmp_path):
    p = tmp_path / "roles.jsonl"
    p.write_text(json.dumps({"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]})
                 + "\n" + json.dumps({"messages": [{"role": "user", "content": "only a question"}]}) + "\n")
    with pytest.raises(openai.BadRequestError) as e:
        acme.files.create(file=p.open("rb"), purpose="fine-tune")
    msg = e.value.body["message"]
    assert "Example 1" in msg and "bot" in msg and "Example 2" in msg


@pytest.mark.parametrize("purpose,param", [("nonsense", "purpose")])
def test_bad_purpose(acme, tmp_path, purpose, param):
    p = tmp_path / "x.jsonl"
    p.write_text("{}\n")
    with pytest.raises(openai.BadRequestError) as e:
        acme.files.create(file=p.open("rb"), purpose=purpose)
    assert e.value.body["param"] == param


def test_missing_file_field_and_empty_file(api):
    key = api.key("acme")
    r = httpx.post(f"{api.base_url}/v1/files", headers={"Authorization": f"Bearer {key}"},
                   data={"purpose": "fine-tune"}, files={"other": ("a", b"x")})
    assert r.status_code == 400 and r.json()["error"]["param"] == "file"
    r = httpx.post(f"{api.base_url}/v1/files", headers={"Authorization": f"Bearer {key}"},
                   data={"purpose": "fine-tune"}, files={"file": ("a.jsonl", b"")})
    assert r.status_code == 400 and "empty" in r.json()["error"]["message"]


def test_oversized_upload_is_413(acme, tmp_path):
    p = tmp_path / "big.jsonl"
    row = json.dumps({"messages": [{"role": "user", "content": "q" * 1000}, {"role": "assistant", "content": "a"}]})
    p.write_text((row + "\n") * 250)
    with pytest.raises(openai.APIStatusError) as e:
        acme.files.create(file=p.open("rb"), purpose="fine-tune")
    assert e.value.status_code == 413


# ----- jobs ------------------------------------------------------------------------------------------
def test_create_and_retrieve_job(acme, api, train_file):
    job = _create(acme, api, train_file, suffix="demo", seed=123, metadata={"team": "nlp"},
                  method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}},
                  integrations=[])
    assert job.id.startswith("ftjob-") and job.object == "fine_tuning.job"
    assert job.status == "validating_files" and job.seed == 123 and job.organization_id == "acme"
    assert job.training_file == train_file.id and job.model == api.model_dir
    assert job.hyperparameters.n_epochs == 2 and job.hyperparameters.batch_size == "auto"
    assert job.method.type == "supervised" and job.metadata == {"team": "nlp"}
    assert not job.integrations
    again = acme.fine_tuning.jobs.retrieve(job.id)
    assert again.id == job.id and again.suffix == "demo"
    events = list(acme.fine_tuning.jobs.list_events(job.id))
    assert any("Created fine-tuning job" in e.message for e in events)


def test_seed_generated_when_absent_and_nulls_accepted(acme, api, train_file):
    job = _create(acme, api, train_file, suffix=None, seed=None)
    assert isinstance(job.seed, int) and 0 <= job.seed < 2**31


def test_pagination_over_many_jobs(api, train_file, tmp_path):
    client = api.openai(api.key("pager"))
    from tuneyard.demo.tiny import write_sample_jsonl

    f = client.files.create(file=write_sample_jsonl(tmp_path / "t.jsonl").open("rb"), purpose="fine-tune")
    ids = [client.fine_tuning.jobs.create(model=api.model_dir, training_file=f.id,
                                          metadata={"batch": "odd" if i % 2 else "even"}).id for i in range(25)]
    first = client.fine_tuning.jobs.list(limit=10)
    assert len(first.data) == 10 and first.has_more
    assert [j.id for j in first.data] == ids[::-1][:10]  # newest first
    seen = [j.id for j in client.fine_tuning.jobs.list(limit=10)]  # the SDK follows `after` pages
    assert seen == ids[::-1]
    odd = [j.id for j in client.fine_tuning.jobs.list(metadata={"batch": "odd"})]
    assert sorted(odd) == sorted(ids[1::2])


@pytest.mark.parametrize("kwargs,param", [
    ({"method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 0}}}},
     "method.supervised.hyperparameters.n_epochs"),
    ({"hyperparameters": {"n_epochs": 51}}, "hyperparameters.n_epochs"),
    ({"hyperparameters": {"batch_size": "big"}}, "hyperparameters.batch_size"),
    ({"hyperparameters": {"learning_rate_multiplier": -1}}, "hyperparameters.learning_rate_multiplier"),
    ({"suffix": "x" * 65}, "suffix"),
    ({"suffix": "bad suffix!"}, "suffix"),
    ({"seed": -1}, "seed"),
    ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
    ({"model": "/etc"}, "model"),
    ({"model": "../../etc/passwd"}, "model"),
    ({"model": "not a model id"}, "model"),
    ({"training_file": "file-doesnotexist"}, "training_file"),
    ({"validation_file": "file-doesnotexist"}, "validation_file"),
    ({"method": {"type": "reinforcement", "reinforcement": {}}}, "method.type"),
    ({"method": {"type": "supervised", "supervised": {"hyperparameters": {"lora": False, "lora_r": 8}}}},
     "hyperparameters.lora"),
    ({"extra_body": {"unknown_field": 1}}, "unknown_field"),
])
def test_bad_job_requests(acme, api, train_file, kwargs, param):
    before = len(list(acme.fine_tuning.jobs.list(limit=100)))
    with pytest.raises(openai.BadRequestError) as e:
        _create(acme, api, train_file, **kwargs)
    body = e.value.body
    assert e.value.status_code == 400 and body["param"] == param, body
    assert body["message"] and body["type"] == "invalid_request_error"
    assert len(list(acme.fine_tuning.jobs.list(limit=100))) == before


@pytest.mark.parametrize("kwargs,param,code,says,never", [
    # W&B without a key would log nowhere: refused at submission (this organisation stores no 'wandb' secret).
    ({"integrations": [{"type": "wandb", "wandb": {"project": "p", "entity": "me"}}]}, "integrations",
     "integration_secret_missing", "no stored 'wandb' secret", None),
    # Each refusal of a method offers only what this installation runs.
    ({"method": {"type": "reinforcement", "reinforcement": {}}}, "method.type", "unsupported_method",
     "use 'supervised' or 'dpo'", None),
    # DPO runs; what it does not take is refused from the capabilities table.
    ({"method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.1, "packing": True}}}},
     "packing", "unsupported", "not available for preference optimisation", None),
])
def test_what_cannot_run_is_refused_with_what_can(acme, api, train_file, kwargs, param, code, says, never):
    before = len(list(acme.fine_tuning.jobs.list(limit=100)))
    with pytest.raises(openai.BadRequestError) as e:
        _create(acme, api, train_file, **kwargs)
    body = e.value.body
    assert body["param"] == param and body["code"] == code and says in body["message"], body
    assert never is None or never not in body["message"], body
    assert len(list(acme.fine_tuning.jobs.list(limit=100))) == before


def test_trackers_are_checked_together_and_honoured_when_complete(api, tmp_path):
    from tuneyard.demo.tiny import write_sample_jsonl

    client = api.openai(api.key("tracked"))
    f = client.files.create(file=write_sample_jsonl(tmp_path / "t.jsonl").open("rb"), purpose="fine-tune")
    wandb = {"type": "wandb", "wandb": {"project": "p", "name": "run", "tags": ["a"]}}
    mlflow = {"type": "mlflow", "mlflow": {"tracking_uri": "http://127.0.0.1:5000", "experiment": "e"}}
    # Every problem at once: no W&B key stored yet, a tracking URI that is no server's, a named secret of another type.
    with pytest.raises(openai.BadRequestError) as e:
        _create(client, api, f, integrations=[wandb, {"type": "mlflow", "mlflow": {"tracking_uri": "file:///tmp/x"}}])
    text = json.dumps(e.value.body)
    assert e.value.body["param"] == "integrations" and "no stored 'wandb' secret" in text and "http://" in text, text
    with pytest.raises(openai.BadRequestError) as e:
        _create(client, api, f, integrations=[{"type": "wandb", "wandb": {"project": "p", "secret_id": "nope"}}])
    assert e.value.body["param"] == "integrations" and "'nope' not found" in e.value.body["message"]
    # A block that is not the type's would be ignored: refused.
    with pytest.raises(openai.BadRequestError) as e:
        _create(client, api, f, integrations=[{**mlflow, "wandb": {"project": "p"}}])
    assert e.value.body["param"].startswith("integrations"), e.value.body
    assert not list(client.fine_tuning.jobs.list())

    made = httpx.post(f"{api.base_url}/v1/secrets", headers={"authorization": f"Bearer {client.api_key}"},
                      json={"name": "wb", "type": "wandb", "value": {"api_key": "wandb-planted-key"}})
    assert made.status_code == 200, made.text
    job = _create(client, api, f, integrations=[wandb, mlflow])
    assert job.status == "validating_files"
    assert [i.model_dump(exclude_none=True) for i in client.fine_tuning.jobs.retrieve(job.id).integrations] == \
        [wandb, mlflow]
    assert "wandb-planted-key" not in client.fine_tuning.jobs.retrieve(job.id).model_dump_json()


def test_empty_integrations_are_fine(acme, api, train_file):
    for empty in ([], None):
        assert _create(acme, api, train_file, integrations=empty).status == "validating_files"


def test_training_file_with_wrong_purpose(acme, api, tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"x": 1}\n')
    f = acme.files.create(file=p.open("rb"), purpose="assistants")
    with pytest.raises(openai.BadRequestError) as e:
        _create(acme, api, f, training_file=f.id)
    assert e.value.body["param"] == "training_file" and "purpose" in e.value.body["message"]


def test_unknown_job_is_404(acme):
    for call in (lambda: acme.fine_tuning.jobs.retrieve("ftjob-nope"),
                 lambda: acme.fine_tuning.jobs.cancel("ftjob-nope"),
                 lambda: acme.fine_tuning.jobs.list_events("ftjob-nope"),
                 lambda: acme.fine_tuning.jobs.checkpoints.list("ftjob-nope")):
        with pytest.raises(openai.NotFoundError):
            call()


def test_other_org_sees_nothing(api, acme, train_file):
    job = _create(acme, api, train_file)
    other = api.openai(api.key("globex"))
    with pytest.raises(openai.NotFoundError):
        other.fine_tuning.jobs.retrieve(job.id)
    with pytest.raises(openai.NotFoundError):
        other.files.retrieve(train_file.id)
    assert job.id not in [j.id for j in other.fine_tuning.jobs.list()]
    with pytest.raises(openai.BadRequestError):  # someone else's file cannot be trained on
        other.fine_tuning.jobs.create(model=api.model_dir, training_file=train_file.id)


def test_cancel_pause_resume_states(acme, api, train_file):
    job = _create(acme, api, train_file)
    with pytest.raises(openai.ConflictError):
        acme.fine_tuning.jobs.pause(job.id)  # still validating
    cancelled = acme.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled" and cancelled.finished_at
    with pytest.raises(openai.ConflictError):
        acme.fine_tuning.jobs.cancel(job.id)
    with pytest.raises(openai.ConflictError):
        acme.fine_tuning.jobs.resume(job.id)


def test_idempotency_key_returns_the_same_job(acme, api, train_file):
    a = _create(acme, api, train_file, extra_headers={"Idempotency-Key": "abc-123"})
    b = _create(acme, api, train_file, extra_headers={"Idempotency-Key": "abc-123"})
    assert a.id == b.id


def test_auth_errors(api):
    bad = api.openai("ty-AAAAAAAAAAAA-" + "x" * 43)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.fine_tuning.jobs.list()
    assert e.value.body["code"] == "invalid_api_key"
    r = httpx.get(f"{api.base_url}/v1/fine_tuning/jobs")
    assert r.status_code == 401 and "error" in r.json()


def test_models_health_and_openapi(api, acme, train_file):
    _create(acme, api, train_file)
    _create(acme, api, train_file, model="gpt-4o-mini")
    listed = [m.id for m in acme.models.list()]
    assert listed[:2] == [api.model_dir, "org/configured-base"]
    assert acme.models.retrieve("org/configured-base").owned_by == "tuneyard"
    # A model a job only named is not a model: listed and retrievable are the configured and trained ones.
    assert "gpt-4o-mini" not in listed
    with pytest.raises(openai.NotFoundError) as e:
        acme.models.retrieve("gpt-4o-mini")
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    h = httpx.get(f"{api.base_url}/healthz").json()
    assert h["status"] == "ok"
    spec = httpx.get(f"{api.base_url}/openapi.json").json()
    assert "/v1/fine_tuning/jobs" in spec["paths"] and "/v1/files" in spec["paths"]


def test_unknown_endpoint_and_bad_json(api):
    key = api.key("acme")
    h = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    r = httpx.get(f"{api.base_url}/v1/nothing-here", headers=h)
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.post(f"{api.base_url}/v1/fine_tuning/jobs", headers=h, content=b"{not json")
    assert r.status_code == 400 and "error" in r.json()
    r = httpx.post(f"{api.base_url}/v1/fine_tuning/jobs", headers=h, content=b'["a list"]')
    assert r.status_code == 400


def test_truefoundry_prefix_serves_the_same_api(api, acme, train_file):
    """TrueFoundry serves this API at /api/llm: the SDK pointed there sees the same jobs and files."""
    from openai import OpenAI

    tf = OpenAI(base_url=f"{api.base_url}/api/llm", api_key=acme.api_key, max_retries=0)
    job = _create(tf, api, train_file, suffix="tf")
    assert acme.fine_tuning.jobs.retrieve(job.id).suffix == "tf"
    assert tf.fine_tuning.jobs.retrieve(job.id).status == "validating_files"
    assert train_file.id in [f.id for f in tf.files.list()]
    with pytest.raises(openai.NotFoundError):
        tf.fine_tuning.jobs.retrieve("ftjob-nope")
    spec = httpx.get(f"{api.base_url}/openapi.json").json()
    assert not any(p.startswith("/api/llm") for p in spec["paths"])  # one schema entry per operation


def test_several_bad_fields_are_one_400_listing_them_all(acme, api, train_file):
    before = len(list(acme.fine_tuning.jobs.list(limit=100)))
    with pytest.raises(openai.BadRequestError) as e:
        acme.fine_tuning.jobs.create(
            model="not a model id", training_file="file-doesnotexist", validation_file="file-nope",
            method={"type": "supervised", "supervised": {"hyperparameters": {"lora": False, "lora_r": 8}}})
    body = e.value.body
    # The first problem is param; the message names every one (translation's and the service's).
    assert e.value.status_code == 400 and body["param"] == "hyperparameters.lora", body
    assert body["message"].startswith("4 problems:"), body
    for part in ("hyperparameters.lora", "model 'not a model id'", "file-doesnotexist", "file-nope"):
        assert part in body["message"], (part, body)
    # pydantic's own errors: every one, the same way.
    with pytest.raises(openai.BadRequestError) as e:
        acme.fine_tuning.jobs.create(model=api.model_dir, training_file=train_file.id, suffix="x" * 65, seed=-1,
                                     hyperparameters={"n_epochs": 0, "batch_size": "big"})
    body = e.value.body
    assert body["message"].startswith("4 problems:") and body["param"] in ("suffix", "seed"), body
    for part in ("suffix", "seed", "hyperparameters.n_epochs", "hyperparameters.batch_size"):
        assert part in body["message"], (part, body)
    # A refused method does not hide a bad file, and a free-form reinforcement body is no 500.
    with pytest.raises(openai.BadRequestError) as e:
        acme.fine_tuning.jobs.create(model=api.model_dir, training_file="file-doesnotexist",
                                     method={"type": "reinforcement", "reinforcement": {"grader": {}}})
    assert e.value.body["param"] == "method.type" and "file-doesnotexist" in e.value.body["message"]
    assert len(list(acme.fine_tuning.jobs.list(limit=100))) == before


def test_integer_fields_take_integral_floats_and_nothing_else(acme, api, train_file):
    """JSON Schema's integer (OpenAI's document) includes 47.0; a bool, a string or 2.5 is still refused."""
    job = _create(acme, api, train_file, seed=5.0, hyperparameters={"n_epochs": 2.0, "batch_size": 4.0})
    assert job.seed == 5 and job.hyperparameters.n_epochs == 2 and job.hyperparameters.batch_size == 4
    for bad in (True, "2", 2.5):
        with pytest.raises(openai.BadRequestError) as e:
            _create(acme, api, train_file, hyperparameters={"n_epochs": bad})
        assert e.value.body["param"] == "hyperparameters.n_epochs", e.value.body
