"""HTTP endpoints: probes, metrics, stored timelines and whole-file analysis.

``/healthz``, ``/readyz`` and ``/metrics`` are open (probes and scrapers); everything under
``/api/`` needs an API token when tokens are configured, except ``/api/info``. Every error is
JSON: ``{"error": {"code", "message"}}``.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import time
from typing import Any

from flask import Blueprint, Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from engine.audio import AudioFormatError, load_file
from server import wire
from server.alerts import SEVERITIES
from server.auth import request_token, token_ok
from server.factory import SessionFactory
from server.protocol import ProtocolError, describe_id, valid_id
from server.service import Service

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
        code = "UNKNOWN_SESSION" if exc.code == 404 else "INVALID_MESSAGE"
        return error(exc.code or 500, code, exc.description or exc.name)

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> tuple[Response, int]:
        log.exception("request failed", extra={"path": request.path})
        return error(500, "INTERNAL", "the server failed on this request")


def _epoch(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        return datetime.datetime.fromisoformat(value).timestamp()


def _who(req: Any) -> dict[str, str]:
    """Who made a request, for an audit log: the client's address (as the proxy saw it) and a
    fingerprint of its token (never the token)."""
    token = request_token(req)
    return {
        "remote": req.headers.get("X-Forwarded-For", req.remote_addr or "").split(",")[0].strip(),
        "token_sha256": hashlib.sha256(token.encode()).hexdigest()[:12] if token else "none",
    }


def blueprint(service: Service, factory: SessionFactory) -> Blueprint:
    bp = Blueprint("api", __name__)
    settings = service.settings
    store = service.store
    offload = service.runtime.offload

    @bp.before_request
    def check_token() -> tuple[Response, int] | None:
        protected = request.path.startswith("/api/") and request.path != "/api/info"
        if protected and not token_ok(settings, request_token(request)):
            service.metrics.errors.labels("UNAUTHORIZED").inc()
            return error(401, "UNAUTHORIZED", "a valid API token is required")
        return None

    @bp.get("/healthz")
    def healthz() -> Response:
        return jsonify({"status": "ok"})

    @bp.get("/readyz")
    def readyz() -> tuple[Response, int]:
        ready = service.ready
        body = {
            "ready": ready,
            "status": "degraded" if store.degraded else ("ready" if ready else "starting"),
            "model": service.model_info,
            "store": service.describe_store(),
            "sessions": len(service.registry),
        }
        return jsonify(body), 200 if ready else 503

    @bp.get("/metrics")
    def metrics() -> Response:
        service.metrics.sample_gpu()
        service.metrics.sample_load()
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
        if not valid_id(session_id):
            return error(400, "INVALID_MESSAGE", f"bad session id {describe_id(session_id)}")
        stored = offload(store.get_session, session_id)
        if stored is None:
            return error(404, "UNKNOWN_SESSION", f"no stored session {session_id}")
        fmt = request.args.get("format", "json")
        if fmt == "csv":
            return Response(
                wire.timeline_csv(stored),
                mimetype="text/csv",
                headers={"Content-Disposition": f'attachment; filename="{session_id}.csv"'},
            )
        if fmt != "json":
            return error(400, "INVALID_MESSAGE", f"format must be json or csv, got {fmt[:20]!r}")
        return jsonify(stored)

    @bp.get("/api/alerts")
    def alerts() -> Response | tuple[Response, int]:
        """Recent alerts, newest first: ``since`` (epoch seconds or ISO 8601), ``severity``
        (comma-separated), ``limit`` (1-1000)."""
        since_arg = request.args.get("since", "")
        try:
            since = _epoch(since_arg) if since_arg else time.time() - 86_400.0
        except ValueError:
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
            extra={"session_id": session_id, **_who(request)},
        )
        return Response(status=204)

    @bp.post("/api/analyze")
    def analyze() -> Response | tuple[Response, int]:
        upload = request.files.get("file")
        if upload is None:
            return error(400, "INVALID_MESSAGE", "send the audio as multipart field 'file'")
        data = upload.read()
        try:
            samples, rate = offload(load_file, data)
        except AudioFormatError as exc:
            service.metrics.errors.labels(exc.code).inc()
            return error(400, exc.code, str(exc))
        try:
            timeline: dict[str, Any] = factory.analyse_file(samples, narrowband=rate < 16000)
        except ProtocolError as exc:
            service.metrics.errors.labels(exc.code).inc()
            return error(500, exc.code, exc.message)
        timeline["file"] = (upload.filename or "")[:255]
        return jsonify(timeline)

    return bp
