"""Reads and deletions of stored sessions, results and alerts (blocking: call them through
``runtime.offload``); mixed into :class:`~server.sinks.store.writer.Store`, whose database lock
and engine they use."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

# rows keyed by session_id, deleted with their session
DEPENDENT_TABLES = ("results", "utterances", "alerts")


class Queries:
    _engine: Engine
    _db_lock: Any
    node: str

    @contextlib.contextmanager
    def _read(self) -> Iterator[Connection]:
        with self._db_lock, self._engine.connect() as conn:
            yield conn

    def list_sessions(self, limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
        with self._read() as conn:
            rows = conn.execute(
                sa.text(
                    "SELECT s.*, (SELECT COUNT(*) FROM results r WHERE r.session_id = s.id) "
                    "AS results FROM sessions s ORDER BY started_at DESC LIMIT :l OFFSET :o"
                ),
                {"l": limit, "o": offset},
            ).mappings()
            return [self._session(row) for row in rows]

    def get_session(self, session_id: str, *, since_seq: int = -1) -> dict[str, Any] | None:
        with self._read() as conn:
            row = (
                conn.execute(
                    sa.text(
                        "SELECT s.*, (SELECT COUNT(*) FROM results r WHERE r.session_id = s.id) "
                        "AS results FROM sessions s WHERE id = :id"
                    ),
                    {"id": session_id},
                )
                .mappings()
                .first()
            )
            if row is None:
                return None
            payloads = conn.execute(
                sa.text(
                    "SELECT payload FROM results WHERE session_id = :id AND seq > :since "
                    "ORDER BY seq"
                ),
                {"id": session_id, "since": since_seq},
            ).scalars()
            out = self._session(row)
            out["frames"] = [json.loads(p) for p in payloads]
            utterances = conn.execute(
                sa.text(
                    "SELECT payload FROM utterances WHERE session_id = :id ORDER BY start_s, track"
                ),
                {"id": session_id},
            ).scalars()
            out["utterances"] = [json.loads(p) for p in utterances]
            alerts = conn.execute(
                sa.text("SELECT payload FROM alerts WHERE session_id = :id ORDER BY fired_at"),
                {"id": session_id},
            ).scalars()
            out["alerts"] = [json.loads(p) for p in alerts]
        return out

    def list_alerts(
        self, *, since: float = 0.0, severities: tuple[str, ...] = (), limit: int = 100
    ) -> list[dict[str, Any]]:
        """Alerts fired since ``since`` (epoch s), newest first."""
        where = "fired_at >= :since"
        params: dict[str, Any] = {"since": since, "l": limit}
        if severities:
            names = [f":sev{i}" for i in range(len(severities))]
            where += f" AND severity IN ({', '.join(names)})"
            params.update({n[1:]: s for n, s in zip(names, severities, strict=True)})
        with self._read() as conn:
            rows = conn.execute(
                sa.text(
                    f"SELECT payload FROM alerts WHERE {where} ORDER BY fired_at DESC LIMIT :l"
                ),
                params,
            ).scalars()
            return [json.loads(p) for p in rows]

    def reader_sha256(self, session_id: str) -> str | None:
        """The hash of the resume token that may read this session (None: none may)."""
        with self._read() as conn:
            value = conn.execute(
                sa.text("SELECT reader_sha256 FROM sessions WHERE id = :id"), {"id": session_id}
            ).scalar()
            return str(value) if value else None

    def exists(self, session_id: str) -> bool:
        with self._read() as conn:
            return (
                conn.execute(
                    sa.text("SELECT 1 FROM sessions WHERE id = :id"), {"id": session_id}
                ).first()
                is not None
            )

    def delete_session(self, session_id: str) -> bool:
        """Remove a session and everything stored with it; False if there was none."""
        with self._db_lock, self._engine.begin() as conn:
            return bool(self._delete(conn, "id = :id", {"id": session_id}))

    def purge(self, before: float, *, abandoned: bool = False) -> int:
        """Remove every session that ended before ``before`` (epoch s); how many. A session that
        has not ended is never removed, except with ``abandoned`` (retention): one still open a
        day after ``before`` (its node died and never came back)."""
        where = "ended_at IS NOT NULL AND ended_at < :before"
        if abandoned:
            where = f"({where}) OR (ended_at IS NULL AND started_at < :stale)"
        with self._db_lock, self._engine.begin() as conn:
            return self._delete(conn, where, {"before": before, "stale": before - 86_400.0})

    @staticmethod
    def _delete(conn: Connection, where: str, params: dict[str, Any]) -> int:
        ids = f"SELECT id FROM sessions WHERE {where}"
        for table in DEPENDENT_TABLES:
            conn.execute(sa.text(f"DELETE FROM {table} WHERE session_id IN ({ids})"), params)
        return int(conn.execute(sa.text(f"DELETE FROM sessions WHERE {where}"), params).rowcount)

    def open_sessions_of_this_node(self) -> list[str]:
        """Sessions this node started and never closed (it was killed)."""
        with self._read() as conn:
            return list(
                conn.execute(
                    sa.text("SELECT id FROM sessions WHERE node = :node AND ended_at IS NULL"),
                    {"node": self.node},
                ).scalars()
            )

    def stale_handoffs(self, before: float) -> list[str]:
        """Sessions handed off before ``before`` (epoch s) that no node continued."""
        with self._read() as conn:
            return list(
                conn.execute(
                    sa.text(
                        "SELECT id FROM sessions WHERE handoff IS NOT NULL AND ended_at IS NULL "
                        "AND handed_off_at < :before"
                    ),
                    {"before": before},
                ).scalars()
            )

    def ping(self) -> bool:
        try:
            with self._read() as conn:
                conn.execute(sa.text("SELECT 1"))
            return True
        except sa.exc.OperationalError:
            return False

    @staticmethod
    def _session(row: Any) -> dict[str, Any]:
        return {
            "session_id": row["id"],
            "source": row["source"],
            "started_at": row["started_at"],
            "ended_at": row["ended_at"],
            "config": json.loads(row["config"] or "{}"),
            "model": json.loads(row["model"] or "{}"),
            "meta": json.loads(row["meta"] or "{}"),
            "summary": json.loads(row["summary"]) if row["summary"] else None,
            "results": row["results"],
        }
