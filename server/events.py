"""Socket.IO event handlers: the protocol edge.

Handlers validate each message, check that the connection owns the session, and hand work to
``Streams``; they never decode, infer or touch the disk themselves. Every failure becomes an
``error`` event with a code (and, for events with an acknowledgement, the same error as the ack),
and never ends the session or the connection.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any

from flask import request
from flask_socketio import SocketIO, join_room, leave_room
from socketio.exceptions import ConnectionRefusedError

from engine.pipeline import StreamPipeline
from server.auth import request_token, token_ok
from server.protocol import ProtocolError, chunk_seconds, parse_chunk, parse_start, session_id_of
from server.sessions import Session, Track
from server.settings import Settings
from server.streaming import MONITOR_ROOM, Streams

log = logging.getLogger(__name__)


def register(socketio: SocketIO, settings: Settings, streams: Streams) -> None:
    metrics = streams.metrics
    registry = streams.registry
    authorised: set[str] = set()  # sids that presented a valid API token (monitor access)

    def report(exc: ProtocolError) -> dict[str, Any]:
        metrics.errors.labels(exc.code).inc()
        payload = exc.payload()
        socketio.emit("error", payload, to=request.sid)  # type: ignore[attr-defined]
        return {"error": payload}

    def guarded(handler: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(handler)
        def wrapper(data: Any = None) -> Any:
            try:
                return handler(data)
            except ProtocolError as exc:
                return report(exc)
            except Exception:
                log.exception("handler failed", extra={"event": handler.__name__})
                return report(ProtocolError("INVALID_MESSAGE", "the server could not handle this"))

        return wrapper

    @socketio.on("connect")
    def connect(auth: Any = None) -> None:
        token = auth.get("token") if isinstance(auth, dict) else None
        if settings.auth_required:
            if not token_ok(settings, token or request_token(request)):
                metrics.errors.labels("UNAUTHORIZED").inc()
                # The client's connect_error gets {"message": ..., "data": {"code": ...}}.
                raise ConnectionRefusedError(
                    "a valid API token is required", {"code": "UNAUTHORIZED"}
                )
            authorised.add(request.sid)  # type: ignore[attr-defined]
        metrics.connections.labels("socketio").inc()

    @socketio.on("disconnect")
    def disconnect(*_: Any) -> None:
        sid = request.sid  # type: ignore[attr-defined]
        authorised.discard(sid)
        metrics.connections.labels("socketio").dec()
        for session in registry.detach(sid):
            log.info("client gone; session awaits resume", extra={"session_id": session.id})
            socketio.emit(
                "session_update", {"event": "disconnected", **session.state()}, to=MONITOR_ROOM
            )

    @socketio.on("start_session")
    @guarded
    def start_session(data: Any) -> dict[str, Any]:
        sid = request.sid  # type: ignore[attr-defined]
        start = parse_start(data)
        config = {
            **settings.pipeline_config().as_dict(),
            "sample_rate": start.format.sample_rate,
            "encoding": start.format.encoding,
            "channels": start.format.channels,
            "max_chunk_bytes": settings.max_chunk_bytes,
            "max_realtime_factor": settings.max_realtime_factor,
            "resume_ttl_s": settings.resume_ttl_s,
            "model": streams.model_info,
        }
        if start.resume_token is not None:
            session = registry.by_token(start.resume_token)
            if session is None or session.ended:
                raise ProtocolError(
                    "UNKNOWN_SESSION", "no session to resume with that token (expired or ended)"
                )
            if start.session_id not in (None, session.id):
                raise ProtocolError("UNAUTHORIZED", "the resume_token is for another session")
            previous = session.owner
            if previous and previous != sid:
                leave_room(session.room, sid=previous)
            session.owner, session.disconnected_at = sid, None
            join_room(session.room)
            replayed = streams.replay(session, sid, start.since_seq)
            log.info("session resumed", extra={"session_id": session.id, "replayed": replayed})
            return {
                "session_id": session.id,
                "resume_token": session.token,
                "config": config,
                "resumed": True,
                "replayed": replayed,
                "last_seq": session.seq,
            }
        session_id = start.session_id or registry.new_id()
        pipeline = StreamPipeline(
            settings.pipeline_config(), start.format, labels=tuple(streams.model_info["labels"])
        )
        session = Session(
            id=session_id,
            source="socketio",
            format=start.format,
            tracks={None: Track(None, pipeline)},
            results_kept=settings.results_kept,
            embeddings=start.embeddings or settings.embeddings,
            owner=sid,
        )
        streams.open(session, config)
        join_room(session.room)
        log.info("session started", extra={"session_id": session.id, "format": start.format})
        return {
            "session_id": session.id,
            "resume_token": session.token,
            "config": config,
            "resumed": False,
        }

    @socketio.on("audio_stream")
    @guarded
    def audio_stream(data: Any) -> None:
        session_id, raw = parse_chunk(data, settings.max_chunk_bytes)
        session = registry.owned(session_id, request.sid)  # type: ignore[attr-defined]
        seconds = chunk_seconds(raw, session.format)
        if not session.allow_audio(seconds, settings.max_realtime_factor):
            raise ProtocolError(
                "RATE_LIMITED",
                f"audio arrives faster than {settings.max_realtime_factor}x real time; "
                "this chunk was dropped",
                session_id,
            )
        metrics.audio_seconds.labels("socketio").inc(seconds)
        streams.push_audio(session, None, raw)

    @socketio.on("end_session")
    @guarded
    def end_session(data: Any) -> dict[str, Any]:
        session_id = session_id_of(data, "end_session")
        assert session_id is not None
        session = registry.owned(session_id, request.sid)  # type: ignore[attr-defined]
        streams.end(session, "ended by client")
        return {"session_id": session_id, "ending": True}

    @socketio.on("ping")
    def ping(data: Any = None) -> dict[str, Any]:
        """Latency probe: answered at once, from the hub."""
        return {"server_time": time.time(), "echo": data}

    @socketio.on("subscribe")
    @guarded
    def subscribe(data: Any) -> dict[str, Any]:
        """Monitor access (for API token holders when tokens are set): live updates of every
        session, or the results of one session."""
        sid = request.sid  # type: ignore[attr-defined]
        if sid not in authorised:  # secure by default: no tokens configured, no monitoring
            raise ProtocolError(
                "UNAUTHORIZED",
                "monitoring needs an API token (start the server with VOXAFFECT_API_TOKENS)",
            )
        session_id = session_id_of(data or {}, "subscribe", required=False)
        if session_id is None:
            join_room(MONITOR_ROOM)
            return {"sessions": [s.state() for s in registry.all() if not s.ended]}
        session = registry.get(session_id)
        join_room(f"session:{session_id}")
        recent = list(session.results) if session else []
        return {"session_id": session_id, "recent": recent[-120:]}

    @socketio.on("unsubscribe")
    @guarded
    def unsubscribe(data: Any) -> dict[str, Any]:
        session_id = session_id_of(data or {}, "unsubscribe", required=False)
        if session_id is None:
            leave_room(MONITOR_ROOM)
            return {"ok": True}
        session = registry.get(session_id)
        if session is None or session.owner != request.sid:  # type: ignore[attr-defined]
            leave_room(f"session:{session_id}")  # an owner keeps its own results
        return {"ok": True}
