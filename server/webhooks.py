"""Alert webhooks: each alert POSTed as JSON to every configured URL, signed, off the hub's path.

``submit`` never blocks: it puts the delivery on a bounded queue (full: the delivery is dropped
and counted). One worker per URL sends them in order with urllib3, whose ``Retry`` does the
retries with exponential backoff (connection errors, 429 and 5xx; ``Retry-After`` honoured).
Under eventlet the sockets and the backoff sleeps are green: a dead receiver never slows
analysis. Deliveries that fail for good are counted in ``voxaffect_webhook_failures_total``.

The receiver checks ``X-Voxaffect-Signature-256: sha256=<hex>``, the HMAC-SHA256 of the raw body
under the shared secret (``--alert-webhook-secret``); the body's ``sent_at`` lets it refuse
replays.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import queue
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import urllib3
from urllib3.util import Retry, Timeout

from server.runtime import ThreadRuntime

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Voxaffect-Signature-256"
RETRY_STATUSES = (408, 425, 429, 500, 502, 503, 504)


def signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class WebhookSender:
    def __init__(
        self,
        urls: Sequence[str],
        *,
        secret: str,
        runtime: ThreadRuntime,
        on_failure: Callable[[str], None] = lambda reason: None,
        queue_size: int = 1000,
        timeout_s: float = 5.0,
        retries: int = 4,
        backoff_s: float = 0.5,
    ) -> None:
        self.urls = list(urls)
        self._secret = secret
        self._on_failure = on_failure
        self._http = urllib3.PoolManager(
            retries=Retry(
                total=retries,
                backoff_factor=backoff_s,
                status_forcelist=RETRY_STATUSES,
                allowed_methods=None,  # POST too: receivers dedupe on X-Voxaffect-Delivery
                raise_on_status=False,
            ),
            timeout=Timeout(total=timeout_s),
            headers={"Content-Type": "application/json", "User-Agent": "voxaffect-webhook"},
        )
        self._queues: list[queue.Queue[bytes | None]] = []
        for url in self.urls:
            q: queue.Queue[bytes | None] = queue.Queue(maxsize=queue_size)
            self._queues.append(q)
            runtime.spawn(self._run, url, q)

    def pending(self) -> int:
        return sum(q.qsize() for q in self._queues)

    def submit(self, event: str, payload: dict[str, Any]) -> None:
        body = json.dumps(
            {"event": event, "sent_at": time.time(), "delivery": uuid.uuid4().hex, **payload},
            separators=(",", ":"),
        ).encode()
        for q in self._queues:
            try:
                q.put_nowait(body)
            except queue.Full:
                self._on_failure("queue_full")

    def close(self) -> None:
        for q in self._queues:
            with contextlib.suppress(queue.Full):
                q.put_nowait(None)

    def _run(self, url: str, q: queue.Queue[bytes | None]) -> None:
        while (body := q.get()) is not None:
            try:
                self._deliver(url, body)
            except Exception:  # never let one delivery stop the worker
                log.exception("webhook delivery failed", extra={"url": _safe(url)})
                self._on_failure("error")

    def _deliver(self, url: str, body: bytes) -> None:
        delivery = json.loads(body)["delivery"]
        headers = {
            SIGNATURE_HEADER: signature(self._secret, body),
            "X-Voxaffect-Delivery": delivery,
        }
        try:
            response = self._http.request("POST", url, body=body, headers=headers)
        except urllib3.exceptions.HTTPError as exc:  # unreachable after every retry
            log.warning("webhook unreachable", extra={"url": _safe(url), "error": str(exc)[:200]})
            self._on_failure("unreachable")
            return
        if response.status >= 300:
            log.warning("webhook refused", extra={"url": _safe(url), "status": response.status})
            self._on_failure("status")


def _safe(url: str) -> str:
    """A URL for the log: no credentials, no query (tokens live there)."""
    parsed = urllib3.util.parse_url(url)
    port = f":{parsed.port}" if parsed.port else ""
    return f"{parsed.scheme}://{parsed.host}{port}{parsed.path or ''}"
