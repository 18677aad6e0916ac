"""Alert webhooks: each alert POSTed as JSON to every configured URL, signed, off the hub's path.

``submit`` never blocks: it puts the delivery on a bounded queue (full: the delivery is dropped
and counted). One worker per URL sends them in order with urllib3: each attempt has a total
deadline of ``timeout_s`` (a receiver trickling its answer a byte a second is cut off, not
waited for), redirects are not followed (a 3xx is a failure: the body and its signature go
nowhere else), and connection errors, timeouts, 408, 425, 429 and 5xx are retried with
exponential backoff. A URL whose host resolves to a private, loopback or link-local address is
refused unless ``allow_private`` (the server must not be turned into a probe of its own network).
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
import ipaddress
import json
import logging
import queue
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import urllib3
from urllib3.util import Timeout

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
        allow_private: bool = False,
    ) -> None:
        self.urls = list(urls)
        self._secret = secret
        self._on_failure = on_failure
        self._runtime = runtime
        self._timeout_s = timeout_s
        self._retries = retries
        self._backoff_s = backoff_s
        self._allow_private = allow_private
        self._http = urllib3.PoolManager(
            retries=False,  # retried here, each attempt within its own total deadline
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
        if not self._allow_private and _private(url):
            log.warning("webhook refused: a private address", extra={"url": _safe(url)})
            self._on_failure("forbidden")
            return
        for attempt in range(self._retries + 1):
            if attempt:
                self._runtime.sleep(self._backoff_s * 2 ** (attempt - 1))
            try:
                with self._runtime.deadline(self._timeout_s):
                    response = self._http.request(
                        "POST", url, body=body, headers=headers, redirect=False
                    )
            except (urllib3.exceptions.HTTPError, OSError, TimeoutError) as exc:
                failure, detail = "unreachable", str(exc)[:200]
            else:
                if response.status < 300:
                    return
                failure, detail = "status", str(response.status)
                if response.status not in RETRY_STATUSES:
                    break  # a refusal or a redirect: trying again changes nothing
        log.warning("webhook delivery failed", extra={"url": _safe(url), "error": detail})
        self._on_failure(failure)


def _private(url: str) -> bool:
    """The URL's host resolves to an address no webhook should reach from here by default."""
    host = urllib3.util.parse_url(url).host or ""
    try:
        infos = socket.getaddrinfo(host.strip("[]"), None)
    except OSError:
        return False  # unresolvable: the attempt fails as unreachable
    for info in infos:
        ip = ipaddress.ip_address(info[4][0])
        if ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_reserved:
            return True
    return False


def _safe(url: str) -> str:
    """A URL for the log: no credentials, no query (tokens live there)."""
    parsed = urllib3.util.parse_url(url)
    port = f":{parsed.port}" if parsed.port else ""
    return f"{parsed.scheme}://{parsed.host}{port}{parsed.path or ''}"
