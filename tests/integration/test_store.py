"""The store on SQLite and on PostgreSQL (127.0.0.1:5432): migrations, scoping, races, idempotent events."""

from __future__ import annotations

import json
import threading
import time
import uuid

import pytest
from sqlalchemy import func, select

from tuneyard.domain.jobs import JobStatus
from tuneyard.service.auth import authenticate, create_key
from tuneyard.store.db import Store
from tuneyard.store.models import Job, JobEvent
from tuneyard.store.repo import add_event, page, transition

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


def _pg_available() -> bool:
    try:
        import psycopg

        with psycopg.connect(PG_ADMIN, connect_timeout=3):
            return True
    except Exception:
        return False


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request, tmp_path):
    if request.param == "sqlite":
        st = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
        yield st
        st.dispose()
        return
    if not _pg_available():
        pytest.skip("PostgreSQL is not running at 127.0.0.1:5432")
    import psycopg

    name = f"tuneyard_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    st = Store(f"postgresql://postgres@127.0.0.1:5432/{name}")
    yield st
    st.dispose()
    with psycopg.connect(PG_ADMIN, autocommit=True) as c:
        c.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


def _job(store: Store, org: str, i: int = 0, status: JobStatus = JobStatus.QUEUED) -> str:
    jid = f"ftjob-{uuid.uuid4().hex[:12]}"
    now = time.time()
    with store.session() as s:
        s.add(Job(id=jid, org_id=org, dialect="openai", status=status.value, created_at=now, updated_at=now,
                  model="m", seed=i, request={}, spec={}, result_files=[], attempt=0, events_seq=0,
                  metadata_={"i": str(i)}))
    return jid


def test_keys_authenticate_and_revoke(store):
    key = create_key(store, "acme")
    who = authenticate(store, f"Bearer {key}")
    assert who.org_id == "acme"
    from tuneyard.domain.errors import Unauthorized
    from tuneyard.service.auth import revoke_key

    assert revoke_key(store, "acme", who.key_id)
    with pytest.raises(Unauthorized):
        authenticate(store, f"Bearer {key}")


def test_only_one_of_many_racers_claims_a_job(store):
    create_key(store, "acme")
    jid = _job(store, "acme")
    wins: list[int] = []
    barrier = threading.Barrier(8)

    def race(n: int) -> None:
        barrier.wait()
        with store.session() as s:
            if transition(s, jid, JobStatus.RUNNING, expect={JobStatus.QUEUED}, worker_id=f"w{n}"):
                wins.append(n)

    threads = [threading.Thread(target=race, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1
    with store.session() as s:
        job = s.scalar(select(Job).where(Job.id == jid))
    assert job.status == "running" and job.worker_id == f"w{wins[0]}"


def test_transitions_follow_the_table(store):
    create_key(store, "acme")
    jid = _job(store, "acme", status=JobStatus.SUCCEEDED)
    with store.session() as s:
        assert not transition(s, jid, JobStatus.RUNNING)
        assert not transition(s, jid, JobStatus.CANCELLED)


def test_file_events_are_recorded_once(store):
    create_key(store, "acme")
    jid = _job(store, "acme")
    for _ in range(3):
        with store.session() as s:
            add_event(s, jid, "step 1", type="metrics", file_seq=1, data={"step": 1})
            add_event(s, jid, "step 2", type="metrics", file_seq=2, data={"step": 2})
    with store.session() as s:
        n = s.scalar(select(func.count()).select_from(JobEvent).where(JobEvent.job_id == jid))
    assert n == 2


def test_pages_are_scoped_and_ordered(store):
    create_key(store, "acme")
    create_key(store, "globex")
    mine = [_job(store, "acme", i) for i in range(7)]
    _job(store, "globex")
    got: list[str] = []
    after = None
    while True:
        with store.session() as s:
            rows, more = page(s, select(Job).where(Job.org_id == "acme"), Job, after=after, limit=3)
        got += [r.id for r in rows]
        if not more:
            break
        after = rows[-1].id
    assert got == mine[::-1]
    with store.session() as s:
        q = select(Job).where(Job.org_id == "acme", Job.metadata_["i"].as_string() == "3")
        assert [j.id for j in s.scalars(q)] == [mine[3]]


def test_a_store_at_the_newest_schema_starts_without_alembic(tmp_path):
    import subprocess
    import sys

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    Store(url).dispose()  # migrates a new database
    code = f"import sys; from tuneyard.store.db import Store; Store({url!r}); sys.exit('alembic' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0, "a second start ran the migrations again"


def test_a_store_behind_the_newest_schema_is_migrated(tmp_path):
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import inspect

    from tuneyard.store.db import MIGRATIONS, head_revision, make_engine

    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0004")
    engine.dispose()
    st = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    with st.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar() == head_revision()
    assert "ix_jobs_org_status" in {ix["name"] for ix in inspect(st.engine).get_indexes("jobs")}
    st.dispose()


@pytest.mark.parametrize(("what", "index"), [
    ("member", "ix_jobs_org_owner_pk"), ("admin", "ix_jobs_org_pk"), ("quota", "ix_jobs_org_status")])
def test_list_and_quota_queries_use_an_index(tmp_path, what, index):
    from sqlalchemy import text

    from tuneyard.service.auth import Principal, visible
    from tuneyard.service.jobs import ACTIVE

    st = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    who = Principal("acme", "k1", "member" if what == "member" else "admin")
    if what == "quota":
        q = select(func.count()).select_from(Job).where(Job.org_id == "acme",
                                                          Job.status.in_([s.value for s in ACTIVE]))
    else:
        q = select(Job).where(visible(Job, who), Job.pk < 100).order_by(Job.pk.desc()).limit(21)
    sql = str(q.compile(st.engine, compile_kwargs={"literal_binds": True}))
    with st.engine.connect() as conn:
        plan = " | ".join(r[-1] for r in conn.execute(text("EXPLAIN QUERY PLAN " + sql)))
    st.dispose()
    assert f"INDEX {index} " in plan and "SCAN" not in plan, plan


def test_sqlite_writers_of_one_process_queue_instead_of_polling(tmp_path):
    """Write sessions wait on a lock in turn (SQLite's busy handler would sleep up to 100 ms a try); reads don't."""
    store = Store(f"sqlite:///{tmp_path / 'w.db'}")
    inside, order = threading.Event(), []

    def first() -> None:
        with store.session(write=True) as s:
            s.execute(select(func.count()).select_from(Job))
            inside.set()
            time.sleep(0.3)
            order.append("first")

    t = threading.Thread(target=first)
    t.start()
    inside.wait(5)
    t0 = time.monotonic()
    with store.session() as s:  # a read goes ahead
        s.execute(select(func.count()).select_from(Job))
        order.append("read")
    assert time.monotonic() - t0 < 0.25
    with store.session(write=True):
        order.append("second")
    t.join()
    assert order == ["read", "first", "second"]
    store.dispose()


def test_rows_stored_with_lone_surrogates_are_repaired_on_upgrade(store):
    """Before the API refused them, a "\\ud800" escape could be stored and then break every read of its row."""
    from tuneyard.store.db import migrate

    create_key(store, "acme")
    jid = _job(store, "acme")
    # Back to 0006 (the revisions after it undone), the rows written as that version could write them, then up
    # to the newest again, through 0007's repair.
    from alembic import command
    from alembic.config import Config

    from tuneyard.store.db import MIGRATIONS

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with store.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0006")
    with store.engine.begin() as conn:
        # JSON columns kept the escapes as json.dumps wrote them (SQLite and PostgreSQL's json alike).
        conn.exec_driver_sql("UPDATE jobs SET metadata = %s, request = %s WHERE id = %s" if
                             store.engine.dialect.name == "postgresql" else
                             "UPDATE jobs SET metadata = ?, request = ? WHERE id = ?",
                             (json.dumps({"team": "x\ud800y", "ok": "fine \U0001f600"}),
                              json.dumps({"suffix": ["\udc00"]}), jid))
    with store.session() as s:
        add_event(s, jid, "event", data={"k\ud801": 1})
    migrate(store.engine)
    with store.session() as s:
        job = s.scalar(select(Job).where(Job.id == jid))
        events = list(s.scalars(select(JobEvent).where(JobEvent.job_id == jid)))
    assert job.metadata_ == {"team": "x\ufffdy", "ok": "fine \U0001f600"}
    assert job.request == {"suffix": ["\ufffd"]}
    assert {"k\ufffd": 1} in [e.data for e in events]
    for value in (job.metadata_, job.request, *[e.data for e in events]):
        json.dumps(value, ensure_ascii=False).encode("utf-8")  # every row reads back as UTF-8


@pytest.mark.parametrize("key", ["team", "équipe", 'say "hi"', "back\\slash", "a.b", "$[0]", "日本"])
def test_a_metadata_filter_matches_any_key(store, key):
    """SQLite's JSON path cannot hold every key; the filter compares keys as values (store.repo.json_value_is)."""
    from tuneyard.store.repo import json_value_is

    create_key(store, "acme")
    wanted, other = _job(store, "acme"), _job(store, "acme", 1)
    with store.session() as s:
        s.scalar(select(Job).where(Job.id == wanted)).metadata_ = {key: "v", "x": "y"}
        s.scalar(select(Job).where(Job.id == other)).metadata_ = {key: "w"}
    with store.session() as s:
        found = s.scalars(select(Job.id).where(json_value_is(Job.metadata_, key, "v", store.engine.dialect.name)))
        assert list(found) == [wanted]
