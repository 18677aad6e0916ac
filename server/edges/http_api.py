"""HTTP endpoints: probes, metrics, stored timelines and whole-file analysis.

``/healthz``, ``/readyz`` and ``/metrics`` are open (probes and scrapers); everything under
``/api/`` needs a token when tokens are configured, except ``/api/info``: ``POST /api/analyze``
an ingest or supervisor token, every read and delete a supervisor token (server/edges/auth.py). A
request that changes state (POST, DELETE) from a browser page of another origin is refused, so a
page cannot use a server without tokens. Every error is JSON: ``{"error": {"code", "message"}}``.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import logging
import math
import secrets
import threading
import time
from typing import Any

from flask import Blueprint, Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from engine.audio import AudioFormatError, file_blocks
from server.edges.auth import allowed, client_address, origin_allowed, request_token
from server.edges.protocol import ProtocolError, describe_id, valid_id
from server.edges.scoped_tokens import ScopedTokens
from server.service import Service
from server.sessions import wire
from server.sessions.factory import SessionFactory, reader_hash
from server.sinks.alerts import SEVERITIES

log = logging.getLogger(__name__)


def error(status: int, code: str, message: str) -> tuple[Response, int]:
    return jsonify({"error": {"code": code, "message": message}}), status


def register_error_handlers(app: Flask, service: Service) -> None:
    settings = service.settings

    @app.errorhandler(RequestEntityTooLarge)
    def too_large(_: HTTPException) -> tuple[Response, int]:
        service.metrics.errors.labels("PAYLOAD_TOO_LARGE").inc()
        return error(
            413, "PAYLOAD_TOO_LARGE", f"uploads are limited to {settings.max_upload_mb:g} MB"
        )

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> tuple[Response, int]:
        code = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED"}.get(exc.code or 0, "INVALID_MESSAGE")
        return error(exc.code or 500, code, exc.description or exc.name)

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> tuple[Response, int]:
        log.exception("request failed", extra={"path": request.path})
        return error(500, "INTERNAL", "the server failed on this request")


def _epoch(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = datetime.datetime.fromisoformat(value).timestamp()
    if not math.isfinite(seconds):
        raise ValueError(value)
    return seconds


_AUDIT_KEY = secrets.token_bytes(32)  # fingerprints compare within one run of the server


def token_fingerprint(token: str | None) -> str:
    """A keyed hash of a token for an audit log: comparable between lines of one run, useless
    for guessing the token offline."""
    if not token:
        return "none"
    return hmac.new(_AUDIT_KEY, token.encode(), hashlib.sha256).hexdigest()[:16]


def _reader_token(req: Any) -> str | None:
    return req.headers.get("X-Resume-Token") or None


def blueprint(service: Service, factory: SessionFactory, tokens: ScopedTokens) -> Blueprint:
    bp = Blueprint("api", __name__)
    settings = service.settings
    store = service.store
    offload = service.runtime.offload

    @bp.before_request
    def check_token() -> tuple[Response, int] | None:
        if not request.path.startswith("/api/") or request.path == "/api/info":
            return None
        if request.method in ("POST", "PUT", "PATCH", "DELETE"):
            origin = request.headers.get("Origin")
            if origin is not None and not origin_allowed(settings, origin, request.environ):
                service.metrics.errors.labels("UNAUTHORIZED").inc()
                return error(403, "UNAUTHORIZED", f"origin {origin[:80]} may not change state")
        need = "ingest" if request.path in ("/api/analyze", "/api/csv") else "supervisor"
        if need == "supervisor" and request.method == "GET" and _reader_token(request):
            return None  # a session's own client, with its resume token: checked by the route
        if not allowed(settings, request_token(request), need):
            service.metrics.errors.labels("UNAUTHORIZED").inc()
            return error(401, "UNAUTHORIZED", f"a valid {need} token is required")
        return None

    @bp.get("/healthz")
    def healthz() -> Response:
        return jsonify({"status": "ok"})

    @bp.get("/readyz")
    def readyz() -> tuple[Response, int]:
        """200 while new sessions are welcome here; 503 while the model is not serving yet, or
        while live demand exceeds capacity by the saturation margin (sessions already running
        carry on: a load balancer should send new ones elsewhere)."""
        load = service.current_load()
        ready = service.ready and not service.draining and not load.saturated
        if not service.ready:
            status = "starting"
        elif service.draining:
            status = "draining"
        elif load.saturated:
            status = "saturated"
        else:
            status = "degraded" if store.degraded else "ready"
        body = {
            "ready": ready,
            "status": status,
            "model": service.model_info,
            "store": service.describe_store(),
            "sessions": len(service.registry),
            "load": load.as_dict(),
        }
        return jsonify(body), 200 if ready else 503

    @bp.get("/metrics")
    def metrics() -> Response:
        service.metrics.sample_gpu()
        service.metrics.sample_load(service.current_load())
        return Response(service.metrics.render(), mimetype="text/plain; version=0.0.4")

    @bp.get("/api/info")
    def info() -> Response:
        return jsonify(
            {
                "model": service.model_info,
                "auth_required": settings.auth_required,
                "config": settings.pipeline_config().as_dict(),
                "max_upload_mb": settings.max_upload_mb,
            }
        )

    @bp.get("/api/sessions")
    def sessions() -> Response:
        limit = min(max(request.args.get("limit", 100, type=int) or 100, 1), 1000)
        offset = max(request.args.get("offset", 0, type=int) or 0, 0)
        stored = offload(store.list_sessions, limit, offset)
        live = {r.session.id for r in service.registry.all()}
        for s in stored:
            s["live"] = s["session_id"] in live
        return jsonify({"sessions": stored, "limit": limit, "offset": offset})

    @bp.get("/api/sessions/<session_id>")
    def session(session_id: str) -> Response | tuple[Response, int]:
        """A stored timeline, for a supervisor, or for the session's own client presenting its
        resume token (``X-Resume-Token``): the page exports its session with it."""
        if not valid_id(session_id):
            return error(400, "INVALID_MESSAGE", f"bad session id {describe_id(session_id)}")
        reader = _reader_token(request)
        if not allowed(settings, request_token(request), "supervisor"):
            kept = offload(store.reader_sha256, session_id) if reader else None
            if not (reader and kept and hmac.compare_digest(kept, reader_hash(reader))):
                service.metrics.errors.labels("UNAUTHORIZED").inc()
                return error(
                    401, "UNAUTHORIZED", "a supervisor token or the session's resume token"
                )
        stored = offload(store.get_session, session_id)
        if stored is None:
            return error(404, "UNKNOWN_SESSION", f"no stored session {session_id}")
        fmt = request.args.get("format", "json")
        rows = request.args.get("rows", "frames")
        if rows not in ("frames", "utterances"):
            return error(
                400, "INVALID_MESSAGE", f"rows must be frames or utterances, got {rows[:20]!r}"
            )
        if fmt == "csv":
            name = session_id if rows == "frames" else f"{session_id}-utterances"
            return Response(
                wire.timeline_csv(stored, rows),
                mimetype="text/csv",
                headers={"Content-Disposition": f'attachment; filename="{name}.csv"'},
            )
        if fmt != "json":
            return error(400, "INVALID_MESSAGE", f"format must be json or csv, got {fmt[:20]!r}")
        return jsonify(stored)

    @bp.post("/api/csv")
    def csv_of_timeline() -> Response | tuple[Response, int]:
        """A timeline (JSON, as /api/analyze gives it) as CSV: the page's export of a file it
        had analysed, written by the same code as a stored session's CSV."""
        timeline = request.get_json(silent=True)
        frames = timeline.get("frames") if isinstance(timeline, dict) else None
        if (
            not isinstance(timeline, dict)
            or not isinstance(frames, list)
            or not all(isinstance(f, dict) for f in frames)
        ):
            return error(400, "INVALID_MESSAGE", "send a timeline: {model, frames: [...]}")
        try:
            text = wire.timeline_csv(timeline)
        except (KeyError, TypeError, AttributeError) as exc:
            return error(400, "INVALID_MESSAGE", f"a frame lacks a field of a result: {exc}")
        return Response(text, mimetype="text/csv")

    @bp.post("/api/tokens")
    def mint_token() -> Response | tuple[Response, int]:
        """A short-lived scoped token for a browser (server/edges/scoped_tokens.py); the
        request itself needs a supervisor token."""
        try:
            minted = tokens.mint(request.get_json(silent=True))
        except ProtocolError as exc:
            return error(400, exc.code, exc.message)
        service.metrics.scoped_tokens_minted.labels(minted["scope"]).inc()
        return jsonify(minted)

    @bp.get("/api/alerts")
    def alerts() -> Response | tuple[Response, int]:
        """Recent alerts, newest first: ``since`` (epoch seconds or ISO 8601), ``severity``
        (comma-separated), ``limit`` (1-1000)."""
        since_arg = request.args.get("since", "")
        try:
            since = _epoch(since_arg) if since_arg else time.time() - 86_400.0
        except (ValueError, OverflowError):
            return error(400, "INVALID_MESSAGE", f"since: {since_arg[:40]!r} is not a time")
        severities = tuple(s for s in request.args.get("severity", "").split(",") if s)
        bad = set(severities) - set(SEVERITIES)
        if bad:
            return error(400, "INVALID_MESSAGE", f"severity: one of {', '.join(SEVERITIES)}")
        limit = min(max(request.args.get("limit", 100, type=int) or 100, 1), 1000)
        found = offload(store.list_alerts, since=since, severities=severities, limit=limit)
        return jsonify({"alerts": found, "since": since})

    @bp.delete("/api/sessions/<session_id>")
    def delete_session(session_id: str) -> Response | tuple[Response, int]:
        """Erase a session and its results (a data subject's request, say); logged with who
        asked. A session still open is refused: end it first (a dead node's are closed when it
        restarts, or purged a day past retention)."""
        if not valid_id(session_id):
            return error(400, "INVALID_MESSAGE", f"bad session id {describe_id(session_id)}")
        stored = offload(store.get_session, session_id, since_seq=1 << 62)
        if stored is None:
            return error(404, "UNKNOWN_SESSION", f"no stored session {session_id}")
        if stored["ended_at"] is None or service.registry.get(session_id) is not None:
            return error(409, "SESSION_OPEN", f"session {session_id} is still open; end it first")
        offload(store.delete_session, session_id)
        log.warning(
            "session deleted on request",
            extra={
                "session_id": session_id,
                "remote": client_address(settings, request.environ),
                "token": token_fingerprint(request_token(request)),
            },
        )
        return Response(status=204)

    analyses = threading.BoundedSemaphore(settings.max_concurrent_analyses)

    @bp.post("/api/analyze")
    def analyze() -> Response | tuple[Response, int]:
        if request.content_length is None:
            return error(411, "INVALID_MESSAGE", "send the upload with a Content-Length")
        upload = request.files.get("file")
        if upload is None:
            return error(400, "INVALID_MESSAGE", "send the audio as multipart field 'file'")
        if service.draining:
            service.metrics.errors.labels("DRAINING").inc()
            response, status = error(503, "DRAINING", "this node is shutting down; retry")
            response.headers["Retry-After"] = "1"
            return response, status
        if not analyses.acquire(blocking=False):
            service.metrics.errors.labels("OVERLOADED").inc()
            response, status = error(
                503,
                "OVERLOADED",
                f"{settings.max_concurrent_analyses} files are being analysed; retry shortly",
            )
            response.headers["Retry-After"] = "10"
            return response, status
        try:
            data = upload.read()
            try:
                info, blocks = offload(file_blocks, data, max_seconds=settings.max_upload_s)
                timeline: dict[str, Any] = factory.analyse_file(
                    blocks, narrowband=info.sample_rate < 16000
                )
            except AudioFormatError as exc:
                service.metrics.errors.labels(exc.code).inc()
                return error(400, exc.code, str(exc))
            except ProtocolError as exc:
                service.metrics.errors.labels(exc.code).inc()
                return error(500, exc.code, exc.message)
        finally:
            analyses.release()
        timeline["file"] = (upload.filename or "")[:255]
        return jsonify(timeline)

    return bp
