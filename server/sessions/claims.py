"""Session ids claimed across nodes that share a message queue (Redis) but not a store.

Nodes on one Redis share Socket.IO rooms, which are named by session id: two nodes each holding a
session of the same id would each send its results to the other's owner. A shared PostgreSQL
store refuses a taken id by itself (its primary key); with a store per node, a client-chosen id
(and a call's id) is claimed in Redis first, ``SET NX`` with a day's expiry that housekeeping
renews while the session runs. An id the server generates is random (uuid4) and needs no claim.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

log = logging.getLogger(__name__)

CLAIM_TTL_S = 86_400  # an ended session's id stays taken this long on every node
KEY = "voxaffect:session:{}"


class ClaimsUnavailable(RuntimeError):
    """Redis could not be asked: a client-chosen id cannot be checked across nodes now."""


class RedisClaims:
    def __init__(self, url: str, node: str, client: Any = None) -> None:
        import redis

        self.node = node
        self._redis = client or redis.Redis.from_url(
            url, socket_timeout=2, socket_connect_timeout=2
        )
        self._error = redis.RedisError

    def claim(self, session_id: str) -> bool:
        """True if this node now holds ``session_id``; False if another node (or an earlier
        session anywhere) has it."""
        try:
            return bool(self._redis.set(KEY.format(session_id), self.node, nx=True, ex=CLAIM_TTL_S))
        except self._error as exc:
            raise ClaimsUnavailable(str(exc)[:200]) from exc

    def renew(self, session_ids: Iterable[str]) -> None:
        try:
            pipe = self._redis.pipeline()
            for session_id in session_ids:
                pipe.expire(KEY.format(session_id), CLAIM_TTL_S)
            pipe.execute()
        except self._error as exc:
            log.warning("renewing session claims failed", extra={"error": str(exc)[:200]})
