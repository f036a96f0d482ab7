"""Webhooks without a server: which changes queue which deliveries, signatures the openai SDK verifies, URL checks,
and the sender's retries, backoff and giving up."""

from __future__ import annotations

import time
import uuid

import pytest
from sqlalchemy import select

from tuneyard.domain import webhooks
from tuneyard.domain.errors import InvalidRequest
from tuneyard.domain.jobs import JobStatus
from tuneyard.service.auth import Principal, ensure_org
from tuneyard.service.webhooks import WebhookSender, WebhookService, check_url
from tuneyard.settings import Settings
from tuneyard.store.db import Store
from tuneyard.store.models import Job, WebhookDelivery
from tuneyard.store.repo import transition

ADMIN = Principal(org_id="acme", key_id="k", role="admin")


@pytest.fixture()
def env(tmp_path):
    settings = Settings(home=tmp_path, webhook_retry_seconds=5, webhook_max_attempts=3)
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    ensure_org(store, "acme")
    yield store, settings, WebhookService(store, settings)
    store.dispose()


def _job(store: Store, status: JobStatus) -> str:
    jid = f"ftjob-{uuid.uuid4().hex[:12]}"
    now = time.time()
    with store.session() as s:
        s.add(Job(id=jid, org_id="acme", dialect="openai", status=status.value, created_at=now, updated_at=now,
                  model="m", seed=0, request={}, spec={}, result_files=[], attempt=0, events_seq=0))
    return jid


def _deliveries(store: Store) -> list[WebhookDelivery]:
    with store.session() as s:
        return list(s.scalars(select(WebhookDelivery).order_by(WebhookDelivery.pk)))


def test_each_change_queues_one_delivery_per_subscribed_endpoint(env):
    store, _, svc = env
    ends = svc.create(ADMIN, "http://127.0.0.1:9/a", None)  # the default: the three end events
    pauses = svc.create(ADMIN, "http://127.0.0.1:9/b", ["fine_tuning.job.paused"])
    assert ends.events == list(webhooks.OPENAI_EVENTS) and ends.secret.startswith("whsec_")
    assert all(i.secret is None for i in svc.list(ADMIN))
    jid = _job(store, JobStatus.QUEUED)
    with store.session() as s:
        assert transition(s, jid, JobStatus.PAUSED)
    with store.session() as s:
        assert transition(s, jid, JobStatus.QUEUED)
    with store.session() as s:
        assert transition(s, jid, JobStatus.PAUSED)
    with store.session() as s:
        assert transition(s, jid, JobStatus.CANCELLED)
        assert not transition(s, jid, JobStatus.CANCELLED)  # a change that did not happen announces nothing
    got = [(d.endpoint_id, d.event_type) for d in _deliveries(store)]
    assert got == [(pauses.id, "fine_tuning.job.paused")] * 2 + [(ends.id, "fine_tuning.job.cancelled")]


def test_a_change_rolled_back_queues_nothing(env):
    store, _, svc = env
    svc.create(ADMIN, "http://127.0.0.1:9/a", None)
    jid = _job(store, JobStatus.RUNNING)
    with pytest.raises(RuntimeError), store.session() as s:
        transition(s, jid, JobStatus.FAILED)
        raise RuntimeError("the rest of the change failed")
    assert _deliveries(store) == []


def test_signatures_verify_with_the_openai_sdk():
    from openai import OpenAI

    secret = webhooks.new_secret()
    body = webhooks.body("evt_1", "fine_tuning.job.succeeded", "ftjob-x", time.time())
    ts = int(time.time())
    headers = {"webhook-id": "msg_1", "webhook-timestamp": str(ts),
               "webhook-signature": webhooks.sign(secret, "msg_1", ts, body)}
    event = OpenAI(api_key="unused").webhooks.unwrap(body, headers, secret=secret)
    assert event.type == "fine_tuning.job.succeeded" and event.data.id == "ftjob-x"
    with pytest.raises(Exception, match="(?i)signature"):
        OpenAI(api_key="unused").webhooks.unwrap(body.replace("ftjob-x", "ftjob-y"), headers, secret=secret)


@pytest.mark.parametrize("url,says", [
    ("ftp://example.com/x", "http:// or https://"),
    ("http://user:pw@example.com/x", "credentials"),
    ("http://10.0.0.7/hook", "private"),
    ("http://169.254.169.254/latest", "private"),
])
def test_endpoint_urls_follow_the_dataset_rules(tmp_path, url, says):
    with pytest.raises(InvalidRequest, match=says) as e:
        check_url(url, Settings(home=tmp_path))
    assert e.value.param == "url"


def test_loopback_is_allowed_and_private_hosts_by_the_setting(tmp_path):
    check_url("http://127.0.0.1:8080/hook", Settings(home=tmp_path))
    check_url("http://10.0.0.7/hook", Settings(home=tmp_path, download_allow_private_hosts=True))


def test_failed_tries_back_off_then_give_up(env):
    store, settings, svc = env
    svc.create(ADMIN, "http://127.0.0.1:9/nobody-listens", None)
    jid = _job(store, JobStatus.RUNNING)
    with store.session() as s:
        transition(s, jid, JobStatus.FAILED)
    sender = WebhookSender(store, settings)
    try:
        waits = []
        for attempt in range(1, 4):
            assert sender.send_due() == 1
            (d,) = _deliveries(store)
            assert d.attempts == attempt and d.last_error and "Connect" in d.last_error
            if attempt < 3:
                waits.append(round(d.next_attempt_at - time.time()))
                assert sender.send_due() == 0  # not due yet
                with store.session() as s:
                    s.get(WebhookDelivery, d.pk).next_attempt_at = time.time()
        assert waits == [5, 10]
        assert d.status == "failed" and sender.send_due() == 0
    finally:
        sender.stop()
