"""The Socket.IO protocol edge (default namespace): one handler per client event.

Handlers validate each message, check that the connection owns the session, and hand audio to
the session's runner; they never decode, infer or touch the disk themselves. Every failure
becomes an ``error`` event with a code (and, for events with an acknowledgement, the same error
in the ack), and never ends the session or the connection.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from flask import request
from flask_socketio import Namespace, SocketIO, join_room, leave_room
from socketio.exceptions import ConnectionRefusedError

from server.edges.auth import client_address, request_token, token_role
from server.edges.protocol import (
    MessageRate,
    ProtocolError,
    chunk_seconds,
    parse_chunk,
    parse_start,
    session_id_of,
)
from server.edges.scoped_tokens import Scope, ScopedTokens
from server.runtime import ThreadRuntime
from server.sessions import wire
from server.sessions.events import Disconnected, Event
from server.sessions.factory import SessionFactory
from server.sessions.registry import SessionRegistry
from server.sessions.runner import InboxFull, SessionClosed, SessionRunner
from server.settings import Settings
from server.sinks.metrics import Metrics
from server.sinks.store import Store
from server.sinks.subscribers import MONITOR_ROOM

log = logging.getLogger(__name__)
RECENT_FOR_SUPERVISORS = 120  # results a supervisor gets when it starts watching a session


class PacketJson:
    """JSON for Socket.IO packets: nesting past Python's recursion limit is a malformed message
    (ValueError, which the library reports once), not a RecursionError with tracebacks."""

    @staticmethod
    def dumps(obj: Any, **kwargs: Any) -> str:
        return json.dumps(obj, **kwargs)

    @staticmethod
    def loads(text: str | bytes, **kwargs: Any) -> Any:
        try:
            return json.loads(text, **kwargs)
        except RecursionError:
            raise ValueError("the message is nested too deeply") from None


class MessageLimiter:
    """Engine.IO messages per connection, counted before python-socketio decodes them (a flood
    of tiny packets costs the hub its parsing even when every one is refused afterwards):
    ``max_messages_per_s`` a second and twice that at once; beyond, the message is dropped
    whole — a binary event's attachments with it — and counted, the client is told
    RATE_LIMITED once a second, and a connection that floods is disconnected. Installed in
    front of python-socketio's message handler (``install``).

    Each message first yields the hub (``pause(0)``): a connection's messages run in order on
    its reader, which does not yield while its socket has data, so without it a flood held the
    hub — /healthz and every other connection — until it was cut (0.3-0.5 s on a loaded
    machine, over a second on a slower one). With it, a flood only slows its own connection."""

    def __init__(
        self,
        server: Any,
        per_s: float,
        metrics: Metrics,
        clock: Callable[[], float],
        pause: Callable[[float], None],
    ):
        self.server = server
        self.per_s = per_s
        self.metrics = metrics
        self.clock = clock
        self.pause = pause
        self._rates: dict[str, MessageRate] = {}
        self._skip_attachments: dict[str, int] = {}

    def install(self) -> None:
        eio = self.server.eio
        inner = eio.handlers["message"]
        inner_disconnect = eio.handlers.get("disconnect")

        def on_message(eio_sid: str, data: Any) -> Any:
            self.pause(0)
            if self.allow(eio_sid, data):
                return inner(eio_sid, data)
            return None

        def on_disconnect(eio_sid: str, *args: Any) -> Any:
            self._rates.pop(eio_sid, None)
            self._skip_attachments.pop(eio_sid, None)
            return inner_disconnect(eio_sid, *args) if inner_disconnect else None

        eio.on("message", on_message)
        if inner_disconnect is not None:
            eio.on("disconnect", on_disconnect)

    def allow(self, eio_sid: str, data: Any) -> bool:
        if not isinstance(data, str):  # an attachment: it goes with its packet's verdict
            skip = self._skip_attachments.get(eio_sid, 0)
            if skip:
                self._skip_attachments[eio_sid] = skip - 1
                return False
            return True
        rate = self._rates.get(eio_sid)
        if rate is None:
            rate = self._rates[eio_sid] = MessageRate(self.per_s, self.clock)
        verdict = rate.take()
        if verdict == "ok":
            return True
        self.metrics.messages_dropped.labels("socketio").inc()
        attachments = _attachments(data)
        if attachments:
            self._skip_attachments[eio_sid] = self._skip_attachments.get(eio_sid, 0) + attachments
        if verdict == "cut":
            log.warning("a connection flooded messages; disconnected")
            self.server.eio.disconnect(eio_sid)
        elif verdict == "tell":
            sid = self.server.manager.sid_from_eio_sid(eio_sid, "/")
            if sid is not None:
                self.metrics.errors.labels("RATE_LIMITED").inc()
                message = f"more than {self.per_s:g} messages a second; those beyond are dropped"
                self.server.emit("error", {"code": "RATE_LIMITED", "message": message}, to=sid)
        return False


def _attachments(packet: str) -> int:
    """How many binary attachments follow a Socket.IO packet (``51-["audio_stream",...``)."""
    if packet[:1] not in ("5", "6"):
        return 0
    digits = packet[1:].split("-", 1)[0]
    return int(digits) if digits.isdigit() and len(digits) < 6 else 0


def _sid() -> str:
    return request.sid  # type: ignore[attr-defined]


def guarded(handler: Callable[..., Any]) -> Callable[..., Any]:
    """ProtocolError (or any failure) -> an ``error`` event and the same error in the ack."""

    @functools.wraps(handler)
    def wrapper(self: StreamNamespace, data: Any = None) -> Any:
        return self.answered(handler.__name__, lambda: handler(self, data), _sid())

    return wrapper


class StreamNamespace(Namespace):
    def __init__(
        self,
        socketio: SocketIO,
        *,
        settings: Settings,
        factory: SessionFactory,
        registry: SessionRegistry,
        store: Store,
        metrics: Metrics,
        publish: Callable[[Event], None],
        runtime: ThreadRuntime,
        tokens: ScopedTokens,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__("/")
        self.sio = socketio
        self.settings = settings
        self.factory = factory
        self.registry = registry
        self.store = store
        self.metrics = metrics
        self.publish = publish
        self.runtime = runtime
        self.clock = clock
        self.tokens = tokens
        self.supervisors: set[str] = set()  # sids that presented a valid API token
        self.scoped: dict[str, Scope] = {}  # sids that presented a short-lived scoped token
        self._transport_seen: dict[str, float] = {}  # Engine.IO sids not yet connected, since

    def close_unconnected(self, timeout_s: float) -> int:
        """Close Engine.IO transports that have not connected to the namespace (a token server:
        authenticated) within ``timeout_s`` of opening, refused ones included; how many. A
        transport that only answers pings must not hold a connection for ever."""
        server = self.sio.server
        eio = server.eio
        now = self.clock()
        open_sids = set(eio.sockets)
        for sid in list(self._transport_seen):
            if sid not in open_sids:
                del self._transport_seen[sid]
        closed = 0
        for sid in open_sids:
            if server.manager.sid_from_eio_sid(sid, "/") is not None:
                self._transport_seen.pop(sid, None)
                continue
            since = self._transport_seen.setdefault(sid, now)
            if now - since > timeout_s:
                del self._transport_seen[sid]
                eio.disconnect(sid)
                closed += 1
        return closed

    def report(self, exc: ProtocolError, sid: str) -> dict[str, Any]:
        self.metrics.errors.labels(exc.code).inc()
        payload = exc.payload()
        self.sio.emit("error", payload, to=sid)
        return {"error": payload}

    def answered(self, event: str, run: Callable[[], Any], sid: str) -> Any:
        """``run()``'s answer, or its failure as an ``error`` event to ``sid`` and in the ack."""
        try:
            return run()
        except ProtocolError as exc:
            return self.report(exc, sid)
        except Exception:
            log.exception("handler failed", extra={"event": event})
            failure = ProtocolError("INVALID_MESSAGE", "the server could not handle this")
            return self.report(failure, sid)

    def trigger_event(self, event: str, *args: Any) -> Any:
        """Audio chunks, nearly every message, go straight to their handler: Flask-SocketIO
        builds a Flask request context around every event (routing the URL, the session), a
        tenth of the event loop's work at load (py-spy, 20 streams). The sid is python-socketio's,
        never the client's. Every other event, and an ``audio_stream`` without exactly one
        argument, goes the usual way."""
        if event == "audio_stream" and len(args) == 2:
            sid, data = args
            return self.answered(event, lambda: self.audio_stream(sid, data), sid)
        return super().trigger_event(event, *args)

    # --- connections -------------------------------------------------------------------------

    def on_connect(self, auth: Any = None) -> None:
        # auth is whatever the client sent: a token that is not a string is no token
        token = auth.get("token") if isinstance(auth, dict) else None
        if ScopedTokens.looks_scoped(token):
            try:
                self.scoped[_sid()] = self.tokens.verify(token)
            except ProtocolError as exc:
                self.metrics.errors.labels("UNAUTHORIZED").inc()
                raise ConnectionRefusedError(exc.message, {"code": "UNAUTHORIZED"}) from None
        elif self.settings.auth_required:
            role = token_role(self.settings, token or request_token(request))
            if role is None:
                self.metrics.errors.labels("UNAUTHORIZED").inc()
                # The client's connect_error gets {"message": ..., "data": {"code": ...}}.
                raise ConnectionRefusedError("a valid token is required", {"code": "UNAUTHORIZED"})
            if role == "supervisor":
                self.supervisors.add(_sid())
        self.metrics.connections.labels("socketio").inc()

    def on_disconnect(self, *_: Any) -> None:
        sid = _sid()
        self.supervisors.discard(sid)
        self.scoped.pop(sid, None)
        self.metrics.connections.labels("socketio").dec()
        for runner in self.registry.detach(sid):
            log.info("client gone; session awaits resume", extra={"session_id": runner.session.id})
            self.publish(Disconnected(runner.session))

    def on_ping(self, data: Any = None) -> dict[str, Any]:
        """Latency probe: answered at once, from the hub."""
        return {"server_time": time.time(), "echo": data}

    # --- sessions ----------------------------------------------------------------------------

    @guarded
    def on_start_session(self, data: Any) -> dict[str, Any]:
        start = parse_start(data)
        scope = self.scoped.get(_sid())
        if start.resume_token is not None:
            return self._resume(start.resume_token, start.session_id, start.since_seq, scope)
        if scope is not None:
            if scope.scope != "start" or start.session_id not in (None, scope.session_id):
                raise self.tokens.out_of_scope(scope, "start this session")
            self.tokens.use_once(scope)
            start = dataclasses.replace(start, session_id=scope.session_id or start.session_id)
        s = self.settings
        client = client_address(s, request.environ)
        if self.registry.held_by(owner=_sid()) >= s.max_sessions_per_connection:
            raise ProtocolError(
                "SESSION_LIMIT",
                f"this connection holds {s.max_sessions_per_connection} sessions already "
                "(max_sessions_per_connection); end one first",
            )
        if self.registry.held_by(client=client) >= s.max_sessions_per_ip:
            raise ProtocolError(
                "SESSION_LIMIT",
                f"this address holds {s.max_sessions_per_ip} sessions already "
                "(max_sessions_per_ip)",
            )
        runner = self.factory.open(
            source="socketio",
            fmt=start.format,
            session_id=start.session_id,
            owner=_sid(),
            client=client,
            embeddings=start.embeddings or self.settings.embeddings,
            utterances=start.utterances,
        )
        join_room(runner.session.room)
        return {
            "session_id": runner.session.id,
            "resume_token": runner.session.token,
            "config": {**self.factory.config(start.format), "model": self.factory.model_info},
            "resumed": False,
        }

    def _resume(
        self, token: str, session_id: str | None, since_seq: int, scope: Scope | None = None
    ) -> dict[str, Any]:
        if scope is not None and scope.scope != "resume":
            raise self.tokens.out_of_scope(scope, "resume a session")
        runner = self.registry.by_token(token)
        if runner is None:  # handed off by a draining node? Then it continues here
            runner = self.factory.reopen(
                resume_token=token,
                session_id=scope.session_id if scope is not None else session_id,
                owner=_sid(),
                client=client_address(self.settings, request.environ),
            )
        if runner is None or runner.session.ended:
            raise ProtocolError(
                "UNKNOWN_SESSION", "no session to resume with that token (expired or ended)"
            )
        session = runner.session
        if scope is not None and (scope.scope != "resume" or scope.session_id != session.id):
            raise self.tokens.out_of_scope(scope, "resume this session")
        if session_id not in (None, session.id):
            raise ProtocolError("UNAUTHORIZED", "the resume_token is for another session")
        sid = _sid()
        previous = session.attach(sid)
        if previous:
            leave_room(session.room, sid=previous)
        replayed = self._replay(runner, sid, since_seq)
        log.info("session resumed", extra={"session_id": session.id, "replayed": replayed})
        return {
            "session_id": session.id,
            "resume_token": session.token,
            "config": {**self.factory.config(session.format), "model": self.factory.model_info},
            "resumed": True,
            "replayed": replayed,
            "last_seq": session.seq,
        }

    def _replay(self, runner: SessionRunner, sid: str, since_seq: int) -> int:
        """Send ``sid`` every result after ``since_seq`` that the room has had, then let it into
        the room: later results reach it from there, none twice, none lost. What memory no
        longer holds is read from the store first, without the session's lock."""
        session = runner.session
        stored: list[dict[str, Any]] = []
        if session.needs_store(since_seq):
            found = self.runtime.offload(self.store.get_session, session.id, since_seq=since_seq)
            stored = (found or {}).get("frames", [])
        return session.catch_up(
            since_seq,
            stored,
            send=lambda result: self.sio.emit("emotion_result", result, to=sid),
            join=lambda: join_room(session.room, sid=sid),
        )

    @guarded
    def on_audio_stream(self, data: Any) -> None:
        """An ``audio_stream`` the fast path (``trigger_event``) did not take."""
        self.audio_stream(_sid(), data)

    def audio_stream(self, sid: str, data: Any) -> None:
        s = self.settings
        session_id, raw = parse_chunk(data, s.max_chunk_bytes)
        handing_off = self.registry.get(session_id)
        if handing_off is not None and handing_off.handing_off and handing_off.session.owner == sid:
            # sent before its client heard to hold (a round trip): the node that continues the
            # session never gets it; counted, not answered (the client is being moved)
            self.metrics.messages_dropped.labels("handoff").inc()
            return
        runner = self.registry.owned(session_id, sid)
        session = runner.session
        seconds = chunk_seconds(raw, session.format)
        if not session.allow_audio(seconds, s.max_realtime_factor, s.rate_burst_s, self.clock()):
            raise ProtocolError(
                "RATE_LIMITED",
                f"audio arrives faster than {s.max_realtime_factor:g}x real time; "
                "this chunk was dropped",
                session_id,
            )
        self.metrics.audio_seconds.labels("socketio").inc(seconds)
        try:
            runner.push(None, raw)
        except InboxFull:
            raise ProtocolError(
                "RATE_LIMITED",
                "the server is behind on this session's audio; slow down",
                session_id,
            ) from None
        except SessionClosed:
            raise ProtocolError(
                "UNKNOWN_SESSION", f"session {session_id} has ended", session_id
            ) from None

    @guarded
    def on_end_session(self, data: Any) -> dict[str, Any]:
        session_id = session_id_of(data, "end_session")
        assert session_id is not None
        runner = self.registry.owned(session_id, _sid())
        runner.end("ended by client")
        return {"session_id": session_id, "ending": True}

    # --- supervisors -------------------------------------------------------------------------

    @guarded
    def on_subscribe(self, data: Any) -> dict[str, Any]:
        """Monitor access (for API token holders when tokens are set): live updates of every
        session, or the results of one session."""
        sid = _sid()
        session_id = session_id_of(data or {}, "subscribe", required=False)
        scope = self.scoped.get(sid)
        if scope is not None:
            if scope.scope != "subscribe" or session_id != scope.session_id:
                raise self.tokens.out_of_scope(scope, "subscribe to this")
        elif sid not in self.supervisors:  # secure by default: no tokens configured, none
            raise ProtocolError(
                "UNAUTHORIZED",
                "monitoring needs a supervisor token (VOXAFFECT_API_TOKENS; ingest tokens may not)",
            )
        if session_id is None:
            join_room(MONITOR_ROOM)
            states = [wire.session_state(r.session) for r in self.registry.all()]
            return {
                "sessions": [
                    s
                    for r, s in zip(self.registry.all(), states, strict=True)
                    if not r.session.ended
                ]
            }
        runner = self.registry.get(session_id)
        if runner is None:  # a session on another node: its results arrive through the room
            join_room(f"session:{session_id}")
            return {"session_id": session_id, "recent": []}
        session = runner.session
        recent = session.recent_then(RECENT_FOR_SUPERVISORS, lambda: join_room(session.room))
        return {"session_id": session_id, "recent": recent}

    @guarded
    def on_unsubscribe(self, data: Any) -> dict[str, Any]:
        session_id = session_id_of(data or {}, "unsubscribe", required=False)
        if session_id is None:
            leave_room(MONITOR_ROOM)
            return {"ok": True}
        runner = self.registry.get(session_id)
        if runner is None or runner.session.owner != _sid():
            leave_room(f"session:{session_id}")  # an owner keeps its own results
        return {"ok": True}
