"""Session timelines in SQLite (WAL): sessions, their results and summaries.

Writes are queued and committed by one native writer thread every ``flush_s`` (0.5 s), so the
eventlet hub never waits on the disk and a crash loses at most the last ``flush_s`` of results.
Reads open their own connection (WAL lets them run beside the writer); call them through
``concurrency.offload`` from the hub.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from pathlib import Path
from typing import Any

from server.concurrency import native

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    source TEXT NOT NULL,
    started_at REAL NOT NULL,
    ended_at REAL,
    config TEXT,
    model TEXT,
    meta TEXT,
    summary TEXT
);
CREATE TABLE IF NOT EXISTS results (
    session_id TEXT NOT NULL REFERENCES sessions(id),
    seq INTEGER NOT NULL,
    track TEXT,
    start_s REAL NOT NULL,
    end_s REAL NOT NULL,
    emotion TEXT NOT NULL,
    stress REAL,
    payload TEXT NOT NULL,
    PRIMARY KEY (session_id, seq)
);
CREATE INDEX IF NOT EXISTS sessions_started ON sessions(started_at);
"""


def _connect(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=10.0, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.row_factory = sqlite3.Row
    return conn


class Store:
    def __init__(self, path: str | Path, flush_s: float = 0.5) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self.flush_s = flush_s
        with _connect(self.path) as conn:
            conn.executescript(SCHEMA)
        self._queue_module = native("queue")
        self._queue = self._queue_module.Queue()
        self._pending = 0
        threading = native("threading")
        self._pending_lock = threading.Lock()
        self._closed = False
        self._writer = threading.Thread(target=self._run, name="voxaffect-store", daemon=True)
        self._writer.start()

    # --- writes (non-blocking) ---------------------------------------------------------------

    def open_session(
        self,
        session_id: str,
        *,
        source: str,
        config: dict[str, Any],
        model: dict[str, Any],
        meta: dict[str, Any] | None = None,
        started_at: float | None = None,
    ) -> None:
        self._put(
            "INSERT OR IGNORE INTO sessions (id, source, started_at, config, model, meta) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (
                session_id,
                source,
                started_at or time.time(),
                json.dumps(config),
                json.dumps(model),
                json.dumps(meta or {}),
            ),
        )

    def add_result(self, session_id: str, seq: int, result: dict[str, Any]) -> None:
        self._put(
            "INSERT OR IGNORE INTO results "
            "(session_id, seq, track, start_s, end_s, emotion, stress, payload) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                session_id,
                seq,
                result.get("track"),
                result["start_s"],
                result["end_s"],
                result["emotion"],
                result["stress"]["index"],
                json.dumps(result),
            ),
        )

    def close_session(self, session_id: str, summary: dict[str, Any]) -> None:
        self._put(
            "UPDATE sessions SET ended_at = ?, summary = ? WHERE id = ?",
            (time.time(), json.dumps(summary), session_id),
        )

    def _put(self, sql: str, params: tuple[Any, ...]) -> None:
        if self._closed:
            log.warning("store closed; dropping a write")
            return
        with self._pending_lock:
            self._pending += 1
        self._queue.put((sql, params))

    # --- the writer thread -------------------------------------------------------------------

    def _run(self) -> None:
        conn = _connect(self.path)
        while True:
            item = self._queue.get()
            if item is None:
                break
            batch = [item]
            deadline = time.monotonic() + self.flush_s
            stop = False
            while time.monotonic() < deadline:
                try:
                    nxt = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except self._queue_module.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            self._write(conn, batch)
            if stop:
                break
        conn.close()

    def _write(self, conn: sqlite3.Connection, batch: list[tuple[str, tuple[Any, ...]]]) -> None:
        try:
            with conn:
                for sql, params in batch:
                    conn.execute(sql, params)
        except sqlite3.Error:
            log.exception("store write failed", extra={"statements": len(batch)})
        finally:
            with self._pending_lock:
                self._pending -= len(batch)

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until every queued write is committed (blocking: offload it from the hub)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._pending_lock:
                if self._pending == 0:
                    return True
            native("time").sleep(0.02)
        return False

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._writer.join(5.0)

    # --- reads (blocking) --------------------------------------------------------------------

    def list_sessions(self, limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
        with _connect(self.path) as conn:
            rows = conn.execute(
                "SELECT s.*, (SELECT COUNT(*) FROM results r WHERE r.session_id = s.id) AS results "
                "FROM sessions s ORDER BY started_at DESC LIMIT ? OFFSET ?",
                (limit, offset),
            ).fetchall()
        return [self._session(row) for row in rows]

    def get_session(self, session_id: str, *, since_seq: int = -1) -> dict[str, Any] | None:
        with _connect(self.path) as conn:
            row = conn.execute(
                "SELECT s.*, (SELECT COUNT(*) FROM results r WHERE r.session_id = s.id) AS results "
                "FROM sessions s WHERE id = ?",
                (session_id,),
            ).fetchone()
            if row is None:
                return None
            results = conn.execute(
                "SELECT payload FROM results WHERE session_id = ? AND seq > ? ORDER BY seq",
                (session_id, since_seq),
            ).fetchall()
        out = self._session(row)
        out["frames"] = [json.loads(r["payload"]) for r in results]
        return out

    @staticmethod
    def _session(row: sqlite3.Row) -> dict[str, Any]:
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
