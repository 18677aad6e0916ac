"""HTTP endpoints: probes, metrics, stored timelines and whole-file analysis.

``/healthz``, ``/readyz`` and ``/metrics`` are open (probes and scrapers); everything under
``/api/`` needs an API token when tokens are configured.
"""

from __future__ import annotations

import csv
import io
import logging
from typing import Any

from flask import Blueprint, Response, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from engine.audio import AudioFormatError, load_file
from engine.pipeline import complete_file, plan_file
from server.auth import request_token, token_ok
from server.concurrency import offload
from server.service import Service

log = logging.getLogger(__name__)


def _error(status: int, code: str, message: str) -> tuple[Response, int]:
    return jsonify({"error": {"code": code, "message": message}}), status


def timeline_csv(session: dict[str, Any]) -> str:
    frames = session["frames"]
    labels = list(session.get("model", {}).get("labels") or (frames[0]["scores"] if frames else []))
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(
        [
            "seq",
            "track",
            "start_s",
            "end_s",
            "emotion",
            "confidence",
            "stress_index",
            "stress_level",
            "stress_confidence",
            "speech_ratio",
            "device",
            *labels,
        ]
    )
    for f in frames:
        writer.writerow(
            [
                f.get("seq"),
                f.get("track", ""),
                f["start_s"],
                f["end_s"],
                f["emotion"],
                f["confidence"],
                f["stress"]["index"],
                f["stress"]["level"],
                f["stress"]["confidence"],
                f["speech_ratio"],
                f["device"],
                *[f["scores"].get(label, "") for label in labels],
            ]
        )
    return out.getvalue()


def blueprint(service: Service) -> Blueprint:
    bp = Blueprint("api", __name__)
    settings = service.settings

    @bp.before_request
    def check_token() -> tuple[Response, int] | None:
        protected = request.path.startswith("/api/") and request.path != "/api/info"
        if protected and not token_ok(settings, request_token(request)):
            service.metrics.errors.labels("UNAUTHORIZED").inc()
            return _error(401, "UNAUTHORIZED", "a valid API token is required")
        return None

    @bp.app_errorhandler(RequestEntityTooLarge)
    def too_large(_: HTTPException) -> tuple[Response, int]:
        service.metrics.errors.labels("PAYLOAD_TOO_LARGE").inc()
        return _error(
            413, "PAYLOAD_TOO_LARGE", f"uploads are limited to {settings.max_upload_mb:g} MB"
        )

    @bp.get("/healthz")
    def healthz() -> Response:
        return jsonify({"status": "ok"})

    @bp.get("/readyz")
    def readyz() -> tuple[Response, int]:
        ready = service.ready
        body = {"ready": ready, "model": service.model_info, "sessions": len(service.registry)}
        return jsonify(body), 200 if ready else 503

    @bp.get("/metrics")
    def metrics() -> Response:
        service.metrics.sample_gpu()
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
        limit = min(max(request.args.get("limit", 100, type=int), 1), 1000)
        offset = max(request.args.get("offset", 0, type=int), 0)
        stored = offload(service.store.list_sessions, limit, offset)
        live = {s.id for s in service.registry.all()}
        for s in stored:
            s["live"] = s["session_id"] in live
        return jsonify({"sessions": stored, "limit": limit, "offset": offset})

    @bp.get("/api/sessions/<session_id>")
    def session(session_id: str) -> Response | tuple[Response, int]:
        offload(service.store.flush)
        stored = offload(service.store.get_session, session_id)
        if stored is None:
            return _error(404, "UNKNOWN_SESSION", f"no stored session {session_id}")
        fmt = request.args.get("format", "json")
        if fmt == "csv":
            return Response(
                timeline_csv(stored),
                mimetype="text/csv",
                headers={"Content-Disposition": f'attachment; filename="{session_id}.csv"'},
            )
        if fmt != "json":
            return _error(400, "INVALID_MESSAGE", f"format must be json or csv, got {fmt!r}")
        return jsonify(stored)

    @bp.post("/api/analyze")
    def analyze() -> Response | tuple[Response, int]:
        upload = request.files.get("file")
        if upload is None:
            return _error(400, "INVALID_MESSAGE", "send the audio as multipart field 'file'")
        data = upload.read()
        try:
            samples, rate = offload(load_file, data)
        except AudioFormatError as exc:
            service.metrics.errors.labels(exc.code).inc()
            return _error(400, exc.code, str(exc))
        labels = tuple(service.model_info["labels"])
        pipeline, windows = offload(
            plan_file, samples, labels, settings.pipeline_config(), narrowband=rate < 16000
        )
        futures = [service.batcher.submit(w.samples) for w in windows]
        try:
            results = [f.result(timeout=300) for f in futures]
        except Exception as exc:
            service.metrics.errors.labels("INFERENCE_FAILED").inc()
            return _error(500, "INFERENCE_FAILED", f"inference failed: {exc}")
        answers = [(r.probs, r.device, r.embedding) for r in results]
        narrowband = pipeline.narrowband
        prosody = [service.measure(w.samples, narrowband) for w in windows]
        timeline = offload(complete_file, pipeline, windows, answers, service.model_info, prosody)
        timeline["file"] = upload.filename
        return jsonify(timeline)

    return bp
