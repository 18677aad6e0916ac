"""The Flask + Flask-SocketIO application: ``create_app(settings)`` and ``serve(settings)``."""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from flask import Flask, Response, send_from_directory
from flask_socketio import SocketIO

from server import api, events, telephony
from server.auth import origin_check
from server.concurrency import (
    eventlet_active,
    fast_websocket_unmasking,
    native_locks_for_shared_libraries,
)
from server.service import Service
from server.settings import Settings
from server.streaming import Streams

log = logging.getLogger(__name__)
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class _Formatter(logging.Formatter):
    """``time level logger: message key=value ...`` with the record's ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = {k: v for k, v in vars(record).items() if k not in _STANDARD}
        if extra:
            line += " " + " ".join(f"{k}={v}" for k, v in extra.items())
        return line


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    for noisy in ("engineio", "socketio", "werkzeug", "eventlet.wsgi"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def create_app(
    settings: Settings, service: Service | None = None
) -> tuple[Flask, SocketIO, Service]:
    native_locks_for_shared_libraries()
    fast_websocket_unmasking()
    service = service or Service.load(settings)
    static = Path(settings.static_dir)
    app = Flask(__name__, static_folder=str(static), static_url_path="/static")
    app.config["MAX_CONTENT_LENGTH"] = int(settings.max_upload_mb * 1024 * 1024)
    socketio = SocketIO(
        app,
        async_mode="eventlet" if eventlet_active() else "threading",
        # None = same origin only; with an allow-list, a check that keeps same origin too.
        # Never pass an empty list: python-engineio treats it as "no check at all".
        cors_allowed_origins=origin_check(settings) if settings.cors_origins else None,
        # Engine.IO drops a connection whose message exceeds this; keep it above the chunk
        # limit so an oversized chunk gets a PAYLOAD_TOO_LARGE error instead.
        max_http_buffer_size=settings.max_chunk_bytes * 2 + 65_536,
        message_queue=settings.message_queue or None,
        logger=False,
        engineio_logger=False,
    )
    streams = Streams(
        registry=service.registry,
        batcher=service.batcher,
        store=service.store,
        metrics=service.metrics,
        model_info=service.model_info,
        emit=socketio.emit,
        spawn=socketio.start_background_task,
        sleep=socketio.sleep,
        measure=service.measure,
    )
    service.streams = streams
    events.register(socketio, settings, streams)
    app.register_blueprint(api.blueprint(service))
    telephony.register(app, service)

    @app.get("/")
    def index() -> Response:
        return send_from_directory(static, "index.html")

    @app.get("/monitor")
    def monitor() -> Response:
        return send_from_directory(static, "monitor.html")

    @app.get("/favicon.ico")
    def favicon() -> Response:
        return send_from_directory(static, "favicon.svg", mimetype="image/svg+xml")

    def housekeeping() -> None:
        while True:
            socketio.sleep(1.0)
            try:
                streams.reap(settings.resume_ttl_s, settings.idle_timeout_s)
            except Exception:
                log.exception("reaping sessions failed")

    def watch_hub(interval_s: float = 0.05) -> None:
        while True:
            start = time.monotonic()
            socketio.sleep(interval_s)
            service.metrics.hub_lag_seconds.observe(max(0.0, time.monotonic() - start - interval_s))

    socketio.start_background_task(housekeeping)
    socketio.start_background_task(watch_hub)
    return app, socketio, service


def _thread_exception(args: threading.ExceptHookArgs) -> None:
    """simple-websocket's reader raises EOFError when its socket closes under eventlet: that is
    a closed connection, not an error. Anything else is logged as one."""
    frames = traceback.extract_tb(args.exc_traceback)
    if args.exc_type is EOFError and any("simple_websocket" in f.filename for f in frames):
        log.debug("websocket reader stopped: connection closed")
        return
    log.error(
        "uncaught exception in a thread",
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),  # type: ignore[arg-type]
    )


def serve(settings: Settings) -> None:
    configure_logging(settings.log_level)
    threading.excepthook = _thread_exception
    log.info("loading model (the port opens once it is ready)", extra={"model": settings.model})
    service = Service.load(settings)
    app, socketio, service = create_app(settings, service)

    def shutdown() -> None:
        service.ready = False
        streams = service.streams
        assert streams is not None
        for session in service.registry.all():
            streams.end(session, "server stopping")  # summaries stored
        deadline = time.monotonic() + 5.0
        while len(service.registry) and time.monotonic() < deadline:
            socketio.sleep(0.05)
        service.close()
        log.info("stopped")
        logging.shutdown()
        os._exit(0)  # the WSGI loop has no clean way out from a background task

    def stop(signum: int, _: Any) -> None:
        # Signal handlers run inside the hub's own loop, which must not block: hand over.
        log.info("stopping: ending sessions", extra={"signal": signum})
        socketio.start_background_task(shutdown)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    # torch and FunASR leave ~450k long-lived objects; a full collection over them takes ~220 ms
    # on the hub's thread, stalling every client. Freezing them keeps collections to what is new.
    gc.collect()
    gc.freeze()
    log.info("listening", extra={"url": f"http://{settings.host}:{settings.port}"})
    socketio.run(app, host=settings.host, port=settings.port, log_output=False)
