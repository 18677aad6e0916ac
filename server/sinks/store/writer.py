"""Session timelines in a database: SQLite (a file path, the default) or PostgreSQL (a
``postgresql://`` URL that every node shares), through SQLAlchemy Core.

The schema is created and migrated at start from the numbered SQL files in ``migrations/``.

Writes are queued and committed in batches by one writer loop (a greenthread) whose database
calls run on native threads, so the event loop never waits on the database. Each write can carry
a ``then``, called once the write is committed, in order — the server sends a result to its
client from there, so a result a client has seen is in the database. When the database is
unreachable, or a commit takes longer than ``HAND_ON_AFTER_S`` (another process holds a lock, a
disk stalls), writes wait in a bounded buffer (``buffer_max`` writes) and are retried; their
``then`` runs anyway — live results never wait more than that for the database — and the store
reports itself degraded. Reads run on a native thread: call them through ``runtime.offload``.

SQLite keeps a rollback journal, not a write-ahead log: WAL maps its ``-shm`` file into memory,
and a write to that mapping once the file cannot be written (read-only, immutable, a full disk)
kills the process with SIGBUS; a journal fails the write with an error the store survives.
Foreign keys are enforced on both backends, so no result outlives its session's row.

Every database call holds one native lock, so the libraries' own locks (green under eventlet)
are never contended between native threads.
"""

from __future__ import annotations

import json
import logging
import queue
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from server.runtime import ThreadRuntime
from server.sinks.store.migrate import migrate
from server.sinks.store.queries import Queries
from server.sinks.store.urls import database_url, redacted

log = logging.getLogger(__name__)

_INSERT_SESSION = (
    "INSERT INTO sessions (id, source, started_at, config, model, meta, node, reader_sha256) "
    "VALUES (:id, :source, :started_at, :config, :model, :meta, :node, :reader_sha256)"
)


def _engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = sa.create_engine(url, connect_args={"timeout": 10.0})

        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=TRUNCATE")  # no WAL: see the module's docstring
            cur.execute("PRAGMA synchronous=FULL")  # a commit survives a crash of the machine
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    return sa.create_engine(
        url,
        pool_size=2,
        max_overflow=2,
        pool_pre_ping=True,  # a connection the server dropped is replaced, not used
        pool_recycle=300,
        connect_args={"connect_timeout": 5},
    )


@dataclass(slots=True)
class _Write:
    sql: str | None  # None: nothing to write, only ``then`` to hand on in order
    params: dict[str, Any]
    then: Callable[[], None] | None = None
    handed_on: bool = False


class StoreUnavailable(RuntimeError):
    pass


HAND_ON_AFTER_S = 2.0  # a commit slower than this hands its results on without waiting more


class Store(Queries):
    def __init__(
        self,
        db: str,
        *,
        runtime: ThreadRuntime,
        node: str = "",
        on_error: Callable[[str], None] | None = None,
        buffer_max: int = 50_000,
        batch_max: int = 500,
    ) -> None:
        self.url = database_url(db)
        self.backend = "postgresql" if self.url.startswith("postgresql") else "sqlite"
        self.node = node
        self._runtime = runtime
        self._on_error = on_error or (lambda kind: None)
        self._buffer_max = buffer_max
        self._batch_max = batch_max
        self._engine = _engine(self.url)
        self._db_lock = runtime.native("threading").Lock()
        self._queue: queue.Queue[_Write | None] = queue.Queue()
        self._pending: deque[_Write] = deque()  # taken from the queue, not yet committed
        self._unwritten = 0  # queued + pending
        self._idle = runtime.native("threading").Event()
        self._idle.set()
        self.degraded = False
        self.dropped = 0
        self._closed = False
        self._writer: Any = None
        self._commits: Any = runtime.native("queue").Queue()  # batches for the committer thread

    # --- start and stop ----------------------------------------------------------------------

    def start(self) -> list[int]:
        """Migrate the schema and start the writer; the migrations applied (blocking)."""
        with self._db_lock, self._engine.begin() as conn:
            applied = migrate(conn)
        if applied:
            log.info("store migrated", extra={"db": redacted(self.url), "applied": applied})
        native = self._runtime.native("threading")
        native.Thread(target=self._committer, name="voxaffect-store-commit", daemon=True).start()
        self._writer = self._runtime.spawn(self._run)
        return applied

    def close(self, timeout_s: float = 5.0) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self.flush(timeout_s)
        self._engine.dispose()

    # --- writes (never block) ----------------------------------------------------------------

    def open_session(
        self,
        session_id: str,
        *,
        source: str,
        started_at: float,
        config: dict[str, Any],
        model: dict[str, Any],
        meta: dict[str, Any],
        reader_sha256: str | None = None,
        then: Callable[[], None] | None = None,
    ) -> None:
        """Record a session whose id :meth:`claim` could not reserve (database unreachable)."""
        self._put(
            _INSERT_SESSION + " ON CONFLICT (id) DO NOTHING",
            self._session_row(session_id, source, started_at, config, model, meta, reader_sha256),
            then,
        )

    def add_result(
        self, session_id: str, result: dict[str, Any], then: Callable[[], None] | None = None
    ) -> None:
        self._put(
            "INSERT INTO results "
            "(session_id, seq, track, start_s, end_s, emotion, stress, payload) "
            "VALUES (:sid, :seq, :track, :start_s, :end_s, :emotion, :stress, :payload) "
            "ON CONFLICT (session_id, seq) DO NOTHING",
            {
                "sid": session_id,
                "seq": result["seq"],
                "track": result.get("track"),
                "start_s": result["start_s"],
                "end_s": result["end_s"],
                "emotion": result["emotion"],
                "stress": result["stress"]["index"],
                "payload": json.dumps(result),
            },
            then,
        )

    def add_utterance(
        self, session_id: str, utterance: dict[str, Any], then: Callable[[], None] | None = None
    ) -> None:
        self._put(
            "INSERT INTO utterances "
            "(session_id, track, utterance_seq, start_s, end_s, emotion, stress, payload) "
            "VALUES (:sid, :track, :useq, :start_s, :end_s, :emotion, :stress, :payload) "
            "ON CONFLICT (session_id, track, utterance_seq) DO NOTHING",
            {
                "sid": session_id,
                "track": utterance.get("track") or "",
                "useq": utterance["utterance_seq"],
                "start_s": utterance["start_s"],
                "end_s": utterance["end_s"],
                "emotion": utterance["emotion"],
                "stress": utterance["stress"]["index"],
                "payload": json.dumps(utterance),
            },
            then,
        )

    def close_session(
        self,
        session_id: str,
        summary: dict[str, Any],
        *,
        ended_at: float,
        then: Callable[[], None] | None = None,
    ) -> None:
        self._put(
            "UPDATE sessions SET ended_at = :ended_at, summary = :summary WHERE id = :id",
            {"id": session_id, "ended_at": ended_at, "summary": json.dumps(summary)},
            then,
        )

    def hand_off(
        self, session_id: str, state: dict[str, Any], *, at: float, then: Callable[[], None]
    ) -> None:
        """Leave a running session for another node to continue (:meth:`take_handoff`)."""
        self._put(
            "UPDATE sessions SET handoff = :state, handed_off_at = :at, node = NULL "
            "WHERE id = :id AND ended_at IS NULL",
            {"id": session_id, "state": json.dumps(state), "at": at},
            then,
        )

    def save_alert(self, alert: dict[str, Any], then: Callable[[], None] | None = None) -> None:
        """Record an alert as it fires, and again as it resolves."""
        self._put(
            "INSERT INTO alerts "
            "(id, session_id, track, rule, severity, state, fired_at, resolved_at, payload) "
            "VALUES (:id, :sid, :track, :rule, :severity, :state, :fired_at, :resolved_at, "
            ":payload) ON CONFLICT (id) DO UPDATE SET state = excluded.state, "
            "resolved_at = excluded.resolved_at, payload = excluded.payload",
            {
                "id": alert["id"],
                "sid": alert["session_id"],
                "track": alert.get("track"),
                "rule": alert["rule"],
                "severity": alert["severity"],
                "state": alert["state"],
                "fired_at": alert["fired_at"],
                "resolved_at": alert.get("resolved_at"),
                "payload": json.dumps(alert),
            },
            then,
        )

    def hand_on(self, then: Callable[[], None]) -> None:
        """Call ``then`` once everything queued before it is written."""
        self._put(None, {}, then)

    def _put(
        self, sql: str | None, params: dict[str, Any], then: Callable[[], None] | None
    ) -> None:
        if self._closed:
            log.warning("store closed; a write is lost")
            return
        self._idle.clear()
        self._unwritten += 1
        self._queue.put(_Write(sql, params, then))

    # --- the writer --------------------------------------------------------------------------

    def _run(self) -> None:
        backoff_s = 0.5
        closing = False
        while not (closing and not self._pending):
            try:
                first = self._queue.get(timeout=backoff_s if self._pending else None)
            except queue.Empty:
                first = None  # time to retry what is buffered
            else:
                closing = closing or first is None
            taken = [first] if first is not None else []
            while len(taken) < self._batch_max:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    closing = True
                    break
                taken.append(item)
            self._pending.extend(taken)
            if self._write_pending():
                backoff_s = 0.5
            else:
                backoff_s = min(backoff_s * 2, 10.0)
                if closing:
                    break  # the database is gone and the process is stopping
            self._bound_buffer()
        self._commits.put(None)  # the writer loop was the committer's only client
        self._idle.set()

    def _write_pending(self) -> bool:
        batch = list(self._pending)
        writes = [w for w in batch if w.sql is not None]
        try:
            if writes:
                self._commit_bounded(writes, batch)
        except sa.exc.OperationalError as exc:  # unreachable, or a lost connection
            self._failed("unreachable", exc)
            self._hand_on(batch)  # live analysis does not wait for the database
            return False
        except sa.exc.DBAPIError as exc:  # a bad row: write the others one by one
            log.error("a batch of store writes failed; writing one by one", extra={"error": exc})
            for write in writes:
                try:
                    self._runtime.offload(self._commit, [write])
                except sa.exc.OperationalError as exc2:
                    self._failed("unreachable", exc2)
                    self._hand_on(batch)
                    return False
                except sa.exc.DBAPIError as exc2:
                    self._on_error("rejected")
                    log.error("store write rejected", extra={"error": str(exc2)[:200]})
        for _ in batch:
            self._pending.popleft()
        self._unwritten -= len(batch)
        if self.degraded:
            log.info("store writes resumed")
        self.degraded = False
        self._hand_on(batch)
        if not self._unwritten:
            self._idle.set()
        return True

    def _commit_bounded(self, writes: list[_Write], batch: list[_Write]) -> None:
        """Commit ``writes``; if that takes longer than HAND_ON_AFTER_S, hand the batch on first
        (degraded) and then wait for the commit's outcome, which is raised as usual."""
        done = self._runtime.native("threading").Event()
        outcome: dict[str, BaseException] = {}
        self._commits.put((writes, done, outcome))
        if not self._runtime.offload(done.wait, HAND_ON_AFTER_S):
            self._on_error("slow")
            if not self.degraded:
                log.error(
                    "store commit is slow; results go on before their commit",
                    extra={"db": redacted(self.url)},
                )
            self.degraded = True
            self._hand_on(batch)
            self._runtime.offload(done.wait)
        if "error" in outcome:
            raise outcome["error"]

    def _committer(self) -> None:
        """The native thread that runs the writer's commits, one batch at a time (a thread
        started per batch cost the event loop a thread start per result)."""
        while (job := self._commits.get()) is not None:
            writes, done, outcome = job
            try:
                self._commit(writes)
            except BaseException as exc:  # raised by the writer, in _commit_bounded
                outcome["error"] = exc
            finally:
                done.set()

    def _commit(self, writes: list[_Write]) -> None:
        with self._db_lock, self._engine.begin() as conn:
            for write in writes:
                conn.execute(sa.text(write.sql or ""), write.params)

    def _failed(self, kind: str, exc: Exception) -> None:
        self._on_error(kind)
        if not self.degraded:
            log.error(
                "store unreachable; buffering writes",
                extra={"db": redacted(self.url), "error": str(exc).splitlines()[0][:200]},
            )
        self.degraded = True

    def _hand_on(self, batch: list[_Write]) -> None:
        for write in batch:
            if write.then is not None and not write.handed_on:
                write.handed_on = True
                try:
                    write.then()
                except Exception:
                    log.exception("handing on a written event failed")

    def _bound_buffer(self) -> None:
        while len(self._pending) > self._buffer_max:
            self._pending.popleft()
            self._unwritten -= 1
            self.dropped += 1
            self._on_error("dropped")

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until every queued write is committed; False if that took longer than
        ``timeout_s``. The wait is offloaded: on the hub, the writer must run meanwhile."""
        return bool(self._runtime.offload(self._idle.wait, timeout_s))

    # --- claims and reads (blocking) ---------------------------------------------------------

    def _session_row(
        self,
        session_id: str,
        source: str,
        started_at: float,
        config: dict[str, Any],
        model: dict[str, Any],
        meta: dict[str, Any],
        reader_sha256: str | None = None,
    ) -> dict[str, Any]:
        return {
            "id": session_id,
            "source": source,
            "started_at": started_at,
            "config": json.dumps(config),
            "model": json.dumps(model),
            "meta": json.dumps(meta),
            "node": self.node,
            "reader_sha256": reader_sha256,
        }

    def take_handoff(
        self,
        *,
        session_id: str | None = None,
        reader_sha256: str | None = None,
        source: str | None = None,
    ) -> dict[str, Any] | None:
        """A handed-off session, now this node's: matched by id, by its resume token's hash,
        or by both (and by ``source``, when given); its stored row with ``handoff`` (the
        state). None if there is none, or another node took it first. Raises StoreUnavailable
        when the database is unreachable."""
        keys = {"id": session_id, "reader_sha256": reader_sha256}
        if all(value is None for value in keys.values()):
            return None
        match = {c: v for c, v in {**keys, "source": source}.items() if v is not None}
        where = " AND ".join(f"{column} = :{column}" for column in match)
        try:
            with self._db_lock, self._engine.begin() as conn:
                row = (
                    conn.execute(
                        sa.text(
                            f"SELECT * FROM sessions WHERE {where} AND handoff IS NOT NULL "
                            "AND ended_at IS NULL"
                        ),
                        match,
                    )
                    .mappings()
                    .first()
                )
                if row is None:
                    return None
                taken = conn.execute(  # one node wins: the row it read is no longer a handoff
                    sa.text(
                        "UPDATE sessions SET node = :node, handoff = NULL, handed_off_at = NULL "
                        "WHERE id = :id AND handoff IS NOT NULL"
                    ),
                    {"node": self.node, "id": row["id"]},
                ).rowcount
        except sa.exc.OperationalError as exc:
            self._on_error("unreachable")
            raise StoreUnavailable(str(exc).splitlines()[0]) from exc
        if taken != 1:
            return None
        return {**self._session({**row, "results": 0}), "handoff": json.loads(row["handoff"])}

    def claim(
        self,
        session_id: str,
        *,
        source: str,
        started_at: float,
        config: dict[str, Any],
        model: dict[str, Any],
        meta: dict[str, Any],
        reader_sha256: str | None = None,
    ) -> bool:
        """Record a new session at once; False if the id is taken (every node shares it).
        Raises StoreUnavailable when the database cannot be reached."""
        row = self._session_row(session_id, source, started_at, config, model, meta, reader_sha256)
        try:
            with self._db_lock, self._engine.begin() as conn:
                conn.execute(
                    sa.text(_INSERT_SESSION),
                    row,
                )
        except sa.exc.IntegrityError:
            return False
        except sa.exc.OperationalError as exc:
            self._on_error("unreachable")
            raise StoreUnavailable(str(exc).splitlines()[0]) from exc
        return True
