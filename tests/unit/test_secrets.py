"""Stored secrets: encrypted at rest, scoped to their organisation, values never listed."""

from __future__ import annotations

import pytest

from tuneyard.domain.errors import Conflict, InvalidRequest, NotFound
from tuneyard.service import Services
from tuneyard.service.auth import Principal, ensure_org
from tuneyard.service.secrets import SecretUnavailable, _create_key_file, fernet
from tuneyard.settings import Settings

ACME = Principal(org_id="acme", key_id="k1", role="admin")
GLOBEX = Principal(org_id="globex", key_id="k2", role="admin")
VALUE = {"access_key_id": "AKIAPLANTEDPLANTED", "secret_access_key": "planted-secret-Zq8w"}


@pytest.fixture()
def svc(tmp_path):
    s = Services.build(Settings(home=tmp_path / "home"))
    ensure_org(s.store, "acme")
    ensure_org(s.store, "globex")
    yield s
    s.store.dispose()


def test_encrypted_at_rest_and_scoped(svc, tmp_path):
    row = svc.secrets.create(ACME, "aws-prod", "aws", VALUE)
    assert svc.secrets.resolve("acme", "aws-prod") == ("aws", VALUE)
    assert svc.secrets.resolve("acme", row.id) == ("aws", VALUE)
    db = (tmp_path / "home" / "tuneyard.db").read_bytes() + b"".join(
        p.read_bytes() for p in (tmp_path / "home").glob("tuneyard.db-*"))
    assert b"planted-secret-Zq8w" not in db and b"AKIAPLANTEDPLANTED" not in db
    key = tmp_path / "home" / "secret.key"
    assert key.stat().st_mode & 0o777 == 0o600
    with pytest.raises(SecretUnavailable):
        svc.secrets.resolve("globex", "aws-prod")
    with pytest.raises(InvalidRequest, match="not found"):
        svc.secrets.check(GLOBEX, "aws-prod", param="secret_id")
    assert [s.name for s in svc.secrets.list(GLOBEX)] == []
    listed = svc.secrets.list(ACME)
    assert [(s.name, s.type, s.id) for s in listed] == [("aws-prod", "aws", row.id)]
    assert not hasattr(listed[0], "ciphertext")
    with pytest.raises(Conflict):
        svc.secrets.create(ACME, "aws-prod", "aws", VALUE)
    with pytest.raises(NotFound):
        svc.secrets.delete(GLOBEX, "aws-prod")
    svc.secrets.delete(ACME, "aws-prod")
    with pytest.raises(SecretUnavailable, match="not found") as e:
        svc.secrets.resolve("acme", "aws-prod", param="model_secret_id")
    assert e.value.param == "model_secret_id"


@pytest.mark.parametrize("name,type_,value,param", [
    ("bad name!", "aws", VALUE, "name"), ("x", "gcp", VALUE, "type"),
    ("x", "aws", {"access_key_id": "a"}, "value"), ("x", "hf", {"token": "t", "extra": "e"}, "value"),
    ("x", "hf", {"token": ""}, "value"), ("x", "hf", ["token"], "value"), ("secret-abc", "hf", {"token": "t"}, "name"),
])
def test_bad_secrets_are_refused(svc, name, type_, value, param):
    with pytest.raises(InvalidRequest) as e:
        svc.secrets.create(ACME, name, type_, value)
    assert e.value.param == param
    assert "planted" not in e.value.message


def test_a_hub_token_reaches_the_jobs_processes_only_through_their_environment(svc):
    import io
    import json

    from tuneyard.demo.tiny import sample_rows
    from tuneyard.domain.spec import TrainingSpec
    from tuneyard.scheduler.worker import Worker
    from tuneyard.service.jobs import Submission

    svc.secrets.create(ACME, "hub", "hf", {"token": "hf_plantedTOKEN"})
    svc.secrets.create(ACME, "aws", "aws", VALUE)
    body = "".join(json.dumps(r) + "\n" for r in sample_rows()).encode()
    f = svc.files.create(ACME, io.BytesIO(body), "t.jsonl", "fine-tune")

    def spec(secret):
        return TrainingSpec.model_validate({"model": {"name": "org/private-model", "secret_id": secret},
                                            "data": {"train": {"file_id": f.id}}})

    with pytest.raises(InvalidRequest, match="needs an 'hf' secret") as e:
        svc.jobs.submit(ACME, Submission(spec=spec("aws"), dialect="test"))
    assert e.value.param == "model_secret_id"
    with pytest.raises(InvalidRequest, match="not found"):
        svc.jobs.submit(GLOBEX, Submission(spec=spec("hub"), dialect="test"))
    job = svc.jobs.submit(ACME, Submission(spec=spec("hub"), dialect="test"))
    worker = Worker(svc.store, svc.settings, svc.files, worker_id="w")
    assert worker._model_credentials(job) == {"HF_TOKEN": "hf_plantedTOKEN"}
    assert b"hf_plantedTOKEN" not in json.dumps(job.spec).encode()
    assert not any(b"hf_plantedTOKEN" in p.read_bytes() for p in svc.settings.jobs_dir.rglob("*") if p.is_file())


def test_the_key_file_is_made_once_and_a_changed_key_is_reported(svc, tmp_path):
    from cryptography.fernet import Fernet

    key_file = tmp_path / "home" / "secret.key"
    svc.secrets.create(ACME, "hub", "hf", {"token": "hf_plantedTOKEN"})
    first = key_file.read_bytes()
    # A second process racing to create the key loses quietly and uses the first one's.
    _create_key_file(key_file, Fernet.generate_key())
    assert key_file.read_bytes() == first and not list(key_file.parent.glob(".secret.key.*"))
    other = Settings(home=tmp_path / "home", secret_key=Fernet.generate_key().decode())
    svc.secrets.settings = other
    with pytest.raises(SecretUnavailable, match="cannot be decrypted with this installation's key") as e:
        svc.secrets.resolve("acme", "hub")
    assert e.value.code == "secret_unreadable" and "hf_planted" not in e.value.message
    with pytest.raises(ValueError, match="TUNEYARD_SECRET_KEY is not a Fernet key"):
        fernet(Settings(home=tmp_path / "home", secret_key="too-short"))


def test_cli_create_list_delete(tmp_path, monkeypatch):
    import json

    from typer.testing import CliRunner

    from tuneyard.cli import app
    from tuneyard.settings import get_settings

    monkeypatch.setenv("TUNEYARD_HOME", str(tmp_path / "cli-home"))
    get_settings.cache_clear()
    try:
        run = CliRunner().invoke
        r = run(app, ["secrets", "create", "--org", "acme", "--name", "aws-dev", "--type", "aws", "--value-file", "-"],
                input=json.dumps(VALUE))
        assert r.exit_code == 0, r.output
        r = run(app, ["secrets", "list", "--org", "acme"])
        assert r.exit_code == 0 and r.stdout.startswith("aws-dev\taws\tsecret-")
        assert "planted" not in r.output and "AKIA" not in r.output
        r = run(app, ["secrets", "create", "--org", "acme", "--name", "x", "--type", "aws", "--value",
                      '{"access_key_id": "AKIAPLANTEDPLANTED", "secret_access_key": planted-secret-Zq8w}'])
        assert r.exit_code != 0 and "not valid JSON" in r.output and "planted-secret" not in r.output
        r = run(app, ["secrets", "create", "--org", "acme", "--name", "x", "--type", "aws", "--value",
                      json.dumps({"access_key_id": "AKIAPLANTEDPLANTED"})])
        assert r.exit_code != 0 and "secret_access_key" in r.output and "AKIAPLANTED" not in r.output
        assert run(app, ["secrets", "delete", "--org", "acme", "--name", "aws-dev"]).exit_code == 0
        assert run(app, ["secrets", "list", "--org", "acme"]).stdout == ""
        assert run(app, ["secrets", "delete", "--org", "acme", "--name", "aws-dev"]).exit_code != 0
    finally:
        get_settings.cache_clear()


def test_the_migrations_make_the_tables_the_models_describe(svc):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from tuneyard.store.models import Base

    with svc.store.engine.connect() as c:
        assert compare_metadata(MigrationContext.configure(c, opts={"compare_type": True}), Base.metadata) == []
