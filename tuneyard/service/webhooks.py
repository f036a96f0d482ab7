"""Webhook endpoints of an organisation and the delivery of their queued events.

Endpoints are registered through ``/v1/webhooks`` or ``tuneyard webhooks`` (URL, events, a signing secret shown
once). A job's status change queues one delivery per subscribed endpoint in the same transaction
(``store.repo.transition``); ``WebhookSender`` (a thread of the job worker) posts them with the Standard Webhooks
headers, retrying with exponential backoff (``TUNEYARD_WEBHOOK_RETRY_SECONDS`` doubling, at most
``TUNEYARD_WEBHOOK_MAX_ATTEMPTS`` tries). The queue is in the database, so a restart loses nothing; a delivery is
claimed with a conditional UPDATE before it is sent, so several workers never send one twice at once. An endpoint
on a private address is refused like a dataset URL (``data.sources.check_host``; loopback allowed), at registration
and again at every delivery.
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.parse
from dataclasses import dataclass

import httpx
from sqlalchemy import select, update

from tuneyard.data.sources import SourceError, check_host
from tuneyard.domain import webhooks
from tuneyard.domain.errors import InvalidRequest, NotFound, Problems
from tuneyard.ids import new_id
from tuneyard.service.audit import record_by
from tuneyard.service.auth import Principal, require_admin
from tuneyard.service.secrets import fernet
from tuneyard.settings import Settings
from tuneyard.store.db import Store
from tuneyard.store.models import WebhookDelivery, WebhookEndpoint

log = logging.getLogger("tuneyard.webhooks")
# A claimed delivery whose sender died is tried again after this long.
CLAIM_SECONDS = 60.0
SEND_TIMEOUT_SECONDS = 10.0
MAX_BACKOFF_SECONDS = 3600.0


@dataclass
class EndpointInfo:
    """An endpoint as the API shows it (never its secret, except ``secret`` once at creation)."""

    id: str
    url: str
    events: list[str]
    created_at: float
    secret: str | None = None


class WebhookService:
    """Register, list and delete an organisation's endpoints; read their delivery logs."""

    def __init__(self, store: Store, settings: Settings) -> None:
        self.store = store
        self.settings = settings

    def create(self, who: Principal, url: str, events: list[str] | None) -> EndpointInfo:
        """Register an endpoint; the answer holds its signing secret, which is never shown again. Admins only."""
        require_admin(who, "Registering a webhook endpoint")
        events = list(dict.fromkeys(events)) if events else list(webhooks.OPENAI_EVENTS)
        problems = Problems()
        with problems.check():
            check_url(url, self.settings)
        unknown = [e for e in events if e not in webhooks.EVENTS]
        if unknown:
            problems.add(InvalidRequest(f"events: {unknown} are not events of this installation; choose from "
                                        f"{list(webhooks.EVENTS)}", param="events"))
        problems.raise_if_any()
        secret = webhooks.new_secret()
        row = WebhookEndpoint(id=new_id("whep"), org_id=who.org_id, url=url, events=events,
                              secret_ciphertext=fernet(self.settings).encrypt(secret.encode()).decode(),
                              created_by=who.key_id, created_at=time.time())
        with self.store.session(write=True) as s:
            s.add(row)
            record_by(s, who, "webhook.create", row.id, {"url": url, "events": events})
        return EndpointInfo(id=row.id, url=url, events=events, created_at=row.created_at, secret=secret)

    def list(self, who: Principal) -> list[EndpointInfo]:
        """The organisation's endpoints, oldest first."""
        with self.store.session() as s:
            rows = s.scalars(select(WebhookEndpoint).where(WebhookEndpoint.org_id == who.org_id)
                             .order_by(WebhookEndpoint.pk)).all()
            return [EndpointInfo(id=r.id, url=r.url, events=list(r.events), created_at=r.created_at) for r in rows]

    def _get(self, who: Principal, endpoint_id: str) -> WebhookEndpoint:
        with self.store.session() as s:
            row = s.scalar(select(WebhookEndpoint).where(WebhookEndpoint.id == endpoint_id,
                                                         WebhookEndpoint.org_id == who.org_id))
        if row is None:
            raise NotFound(f"webhook endpoint {endpoint_id} not found", param="webhook_id",
                           code="webhook_not_found")
        return row

    def delete(self, who: Principal, endpoint_id: str) -> EndpointInfo:
        """Delete an endpoint and its queued deliveries. Admins only."""
        require_admin(who, "Deleting a webhook endpoint")
        row = self._get(who, endpoint_id)
        with self.store.session(write=True) as s:
            s.execute(WebhookDelivery.__table__.delete().where(WebhookDelivery.endpoint_id == row.id))
            s.execute(WebhookEndpoint.__table__.delete().where(WebhookEndpoint.id == row.id))
            record_by(s, who, "webhook.delete", row.id, {"url": row.url})
        return EndpointInfo(id=row.id, url=row.url, events=list(row.events), created_at=row.created_at)

    def deliveries(self, who: Principal, endpoint_id: str, limit: int = 100) -> list[WebhookDelivery]:
        """An endpoint's delivery log, newest first."""
        row = self._get(who, endpoint_id)
        with self.store.session() as s:
            return list(s.scalars(select(WebhookDelivery).where(WebhookDelivery.endpoint_id == row.id)
                                  .order_by(WebhookDelivery.pk.desc()).limit(max(1, min(limit, 1000)))))


def check_url(url: str, settings: Settings) -> None:
    """An endpoint URL must be http(s), carry no credentials and, like a dataset URL, not be on a private network."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidRequest("url must be an http:// or https:// URL", param="url")
    if parts.username or parts.password:
        raise InvalidRequest("url must not hold credentials", param="url")
    try:
        check_host(url, settings.download_allow_private_hosts, url, "url")
    except SourceError as e:
        raise InvalidRequest(e.message.replace("downloads from", "webhooks to"), param="url",
                             code="webhook_url_private") from None


class WebhookSender:
    """Posts due deliveries, one thread; started and stopped by the job worker."""

    def __init__(self, store: Store, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client = httpx.Client(timeout=SEND_TIMEOUT_SECONDS, follow_redirects=False)

    def start(self) -> None:
        """Start the sending thread."""
        self._thread = threading.Thread(target=self._loop, name="tuneyard-webhooks", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop after the delivery in flight, if any."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(SEND_TIMEOUT_SECONDS + 5)
        self._client.close()

    def _loop(self) -> None:
        while not self._stop.wait(self.settings.poll_interval):
            try:
                self.send_due()
            except Exception:  # a database hiccup must not end the thread: the queue is retried next time
                log.exception("webhook delivery round failed")

    def send_due(self) -> int:
        """Send every delivery that is due; the number sent (successfully or not)."""
        now = time.time()
        with self.store.session() as s:
            due = s.execute(select(WebhookDelivery.id, WebhookDelivery.next_attempt_at).where(
                WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= now)
                .order_by(WebhookDelivery.next_attempt_at).limit(50)).all()
        sent = 0
        for msg_id, due_at in due:
            if self._stop.is_set():
                break
            with self.store.session(write=True) as s:
                won = s.execute(update(WebhookDelivery).where(
                    WebhookDelivery.id == msg_id, WebhookDelivery.status == "pending",
                    WebhookDelivery.next_attempt_at == due_at).values(next_attempt_at=now + CLAIM_SECONDS)).rowcount
                if won != 1:
                    continue
                d = s.scalar(select(WebhookDelivery).where(WebhookDelivery.id == msg_id))
                ep = s.scalar(select(WebhookEndpoint).where(WebhookEndpoint.id == d.endpoint_id))
            if ep is None:
                continue
            self._send(d, ep)
            sent += 1
        return sent

    def _send(self, d: WebhookDelivery, ep: WebhookEndpoint) -> None:
        code, error = None, None
        try:
            check_url(ep.url, self.settings)  # again: the name may resolve elsewhere by now
            secret = fernet(self.settings).decrypt(ep.secret_ciphertext.encode()).decode()
            ts = int(time.time())
            headers = {"content-type": "application/json", "webhook-id": d.id, "webhook-timestamp": str(ts),
                       "webhook-signature": webhooks.sign(secret, d.id, ts, d.payload),
                       "user-agent": "tuneyard-webhooks"}
            r = self._client.post(ep.url, content=d.payload.encode(), headers=headers)
            code = r.status_code
            if not 200 <= code < 300:
                error = f"the endpoint answered HTTP {code}"
        except InvalidRequest as e:
            error = e.message
        except Exception as e:  # connection refused, timeout, TLS...: a failed try, retried
            error = f"{type(e).__name__}: {e}"[:500]
        now = time.time()
        attempts = d.attempts + 1
        values: dict = {"attempts": attempts, "last_status_code": code, "last_error": error}
        if error is None:
            values.update(status="delivered", delivered_at=now)
        elif attempts >= self.settings.webhook_max_attempts:
            values.update(status="failed")
        else:
            values.update(next_attempt_at=now + min(MAX_BACKOFF_SECONDS,
                                                    self.settings.webhook_retry_seconds * 2 ** (attempts - 1)))
        with self.store.session(write=True) as s:
            s.execute(update(WebhookDelivery).where(WebhookDelivery.id == d.id).values(**values))
        log.info("webhook %s (%s) to %s: try %d %s", d.id, d.event_type, ep.url, attempts, error or "delivered")
