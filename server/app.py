"""The Flask + Flask-SocketIO application, assembled from a Service: ``create_app`` and ``serve``.

``create_app`` builds the network edge — the Socket.IO namespace, the telephony WebSockets, the
HTTP API — and the subscribers that carry session events to rooms, the store, the monitor and
the metrics. ``serve`` is ``voxaffect serve``: it loads the Service (the model first), then opens
the port, and on SIGTERM ends every session (summaries stored) before it exits.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flask import Flask, Response, send_from_directory
from flask_socketio import SocketIO

from server import logs
from server.edges import http_api as api
from server.edges import listener
from server.edges.auth import origin_check
from server.edges.edge_guard import EdgeGuard
from server.edges.listener import ListenerLimits
from server.edges.scoped_tokens import ScopedTokens
from server.edges.socketio import MessageLimiter, PacketJson, StreamNamespace
from server.edges.telephony import calls as telephony
from server.edges.telephony.calls import TelephonyEdge
from server.runtime import ThreadRuntime
from server.service import Service, WrapPredictor
from server.sessions import wire
from server.sessions.claims import RedisClaims
from server.sessions.events import EventBus
from server.sessions.factory import SessionFactory
from server.settings import Settings
from server.sinks.alerts import AlertEngine, load_rules
from server.sinks.subscribers import (
    AlertPublisher,
    MetricsRecorder,
    MonitorPublisher,
    RoomPublisher,
    StoreRecorder,
)
from server.sinks.webhooks import WebhookSender

log = logging.getLogger(__name__)
RETENTION_EVERY_S = 3600.0
CLAIM_RENEW_S = 3600.0  # running sessions' cross-node id claims are renewed this often
HUB_TICK_S = 0.05
HANDOFF_SWEEP_S = 30.0  # how often a node closes handed-off sessions nobody continued
HAND_ON_S = 0.3  # a stopping node's last emits and disconnects go out meanwhile


@dataclass
class App:
    flask: Flask
    socketio: SocketIO
    service: Service
    factory: SessionFactory
    bus: EventBus
    telephony: TelephonyEdge

    def end_all(self, reason: str, timeout_s: float = 5.0, *, hand_off: bool = False) -> None:
        """End every session (their summaries are stored) and wait for them, up to a limit;
        with ``hand_off``, leave each for another node to continue instead."""
        runners = self.service.registry.all()
        for runner in runners:
            owner = runner.session.owner
            if hand_off and owner is not None:  # hold your audio: reconnect and resume next
                self.socketio.emit("error", wire.hand_off_notice(runner.session.id), to=owner)
            runner.end(reason, hand_off=hand_off)
        deadline = time.monotonic() + timeout_s
        while any(not r.done.is_set() for r in runners) and time.monotonic() < deadline:
            self.socketio.sleep(0.05)


def _alerting(
    settings: Settings, service: Service, emit: Any, runtime: ThreadRuntime
) -> list[AlertPublisher]:
    """The alert rules' subscriber, when there are rules (RuleError names a bad one)."""
    if not settings.alert_rules:
        return []
    rules = load_rules(settings.alert_rules, service.model_info["labels"])
    service.metrics.watch_rules([(r.name, r.severity) for r in rules])
    webhooks = None
    if settings.alert_webhook:
        webhooks = WebhookSender(
            settings.alert_webhook,
            secret=settings.alert_webhook_secret,
            runtime=runtime,
            on_failure=lambda reason: service.metrics.webhook_failures.labels(reason).inc(),
            queue_size=settings.alert_webhook_queue,
            timeout_s=settings.alert_webhook_timeout_s,
            allow_private=settings.alert_webhook_allow_private,
        )
    engine = AlertEngine(
        rules, random_weights=bool(service.model_info.get("random_weights")), hop_s=settings.hop_s
    )
    log.info("alert rules loaded", extra={"rules": [r.name for r in rules]})
    return [AlertPublisher(engine, service.store, emit, service.metrics, webhooks)]


def create_app(settings: Settings, service: Service, runtime: ThreadRuntime) -> App:
    static = Path(settings.static_dir)
    flask = Flask(__name__, static_folder=str(static), static_url_path="/static")
    flask.config["MAX_CONTENT_LENGTH"] = int(settings.max_upload_mb * 1024 * 1024)
    socketio = SocketIO(
        flask,
        async_mode=runtime.async_mode,
        # None = same origin only; with an allow-list, a check that keeps same origin too.
        # Never pass an empty list: python-engineio treats it as "no check at all".
        cors_allowed_origins=origin_check(settings) if settings.cors_origins else None,
        # Engine.IO drops a connection whose message exceeds this; keep it above the chunk
        # limit so an oversized chunk gets a PAYLOAD_TOO_LARGE error instead.
        max_http_buffer_size=settings.max_chunk_bytes * 2 + 65_536,
        message_queue=settings.message_queue or None,
        json=PacketJson,
        # a client's events run in order on its own connection, not each in a greenthread of
        # its own: a flood cannot fill the hub with tasks, it only slows its own connection
        async_handlers=False,
        logger=False,
        engineio_logger=False,
    )
    logs.own_library_loggers()
    metrics = service.metrics
    # outermost: in front of Engine.IO's middleware too (Host, malformed upgrades)
    flask.wsgi_app = EdgeGuard(  # type: ignore[method-assign]
        flask.wsgi_app, settings, lambda reason: metrics.connections_refused.labels(reason).inc()
    )
    room = RoomPublisher(socketio.emit, socketio.close_room, socketio.server.disconnect)
    bus = EventBus(
        runtime,
        [
            StoreRecorder(service.store, room),
            MonitorPublisher(socketio.emit),
            MetricsRecorder(metrics, service.clock),
            *_alerting(settings, service, socketio.emit, runtime),
        ],
        queue_size=settings.subscriber_queue,
        on_drop=lambda name: metrics.events_dropped.labels(name).inc(),
    )
    # several nodes on one message queue, each with a store of its own: ids claimed in Redis
    claims = (
        RedisClaims(settings.message_queue, settings.node_name)
        if settings.message_queue and service.store.backend == "sqlite"
        else None
    )
    factory = SessionFactory(
        settings,
        registry=service.registry,
        store=service.store,
        analyser=service.analyser,
        publish=bus.publish,
        runtime=runtime,
        model_info=service.model_info,
        load=service.current_load,
        draining=lambda: service.draining,
        claims=claims,
        clock=service.clock,
    )
    tokens = ScopedTokens(
        settings.token_signing_key,
        settings.scoped_token_max_s,
        on_refused=lambda reason: metrics.scoped_tokens_refused.labels(reason).inc(),
    )
    if tokens.node_local:
        log.info("no token_signing_key: short-lived tokens hold on this process only")
    namespace = StreamNamespace(
        socketio,
        settings=settings,
        factory=factory,
        registry=service.registry,
        store=service.store,
        metrics=metrics,
        publish=bus.publish,
        runtime=runtime,
        tokens=tokens,
        clock=service.clock,
    )
    socketio.on_namespace(namespace)
    MessageLimiter(
        socketio.server, settings.max_messages_per_s, metrics, service.clock, runtime.sleep
    ).install()
    calls = TelephonyEdge(
        settings,
        factory=factory,
        registry=service.registry,
        metrics=metrics,
        runtime=runtime,
        clock=service.clock,
    )
    telephony.register(flask, calls)
    api.register_error_handlers(flask, service)
    flask.register_blueprint(api.blueprint(service, factory, tokens))

    @flask.get("/")
    def index() -> Response:
        return send_from_directory(static, "index.html")

    @flask.get("/monitor")
    def monitor() -> Response:
        return send_from_directory(static, "monitor.html")

    sdk = static.parent / "clients/js/src"  # the voxaffect-client package, which the page uses

    @flask.get("/sdk/<path:name>")
    def sdk_module(name: str) -> Response:
        return send_from_directory(sdk, name, mimetype="text/javascript")

    @flask.get("/favicon.ico")
    def favicon() -> Response:
        return send_from_directory(static, "favicon.svg", mimetype="image/svg+xml")

    renewed = [time.monotonic()]
    swept = [time.monotonic()]
    abandoned_after_s = max(settings.resume_ttl_s, settings.call_rejoin_s) + HANDOFF_SWEEP_S

    def housekeeping() -> None:
        while True:
            socketio.sleep(1.0)
            try:
                if claims is not None and time.monotonic() - renewed[0] > CLAIM_RENEW_S:
                    renewed[0] = time.monotonic()
                    claims.renew(r.session.id for r in service.registry.all())
                if time.monotonic() - swept[0] > HANDOFF_SWEEP_S:
                    swept[0] = time.monotonic()
                    runtime.offload(service.close_abandoned_handoffs, abandoned_after_s)
                for runner, reason in service.registry.expired(
                    resume_ttl_s=settings.resume_ttl_s,
                    idle_timeout_s=settings.idle_timeout_s,
                    call_rejoin_s=settings.call_rejoin_s,
                ):
                    runner.end(reason)
                closed = namespace.close_unconnected(settings.auth_timeout_s)
                if closed:
                    metrics.connections_refused.labels("auth_timeout").inc(closed)
                metrics.store_degraded.set(int(service.store.degraded))
            except Exception:
                log.exception("housekeeping failed")

    def watch_hub() -> None:
        while True:
            start = time.monotonic()
            socketio.sleep(HUB_TICK_S)
            metrics.hub_lag_seconds.observe(max(0.0, time.monotonic() - start - HUB_TICK_S))

    def retention() -> None:
        while settings.retention_days > 0:
            try:
                before = time.time() - settings.retention_days * 86_400.0
                deleted = runtime.offload(service.store.purge, before, abandoned=True)
                if deleted:
                    log.info("retention: old sessions deleted", extra={"sessions": deleted})
            except Exception as exc:  # the database is down: next hour
                log.warning("retention purge failed", extra={"error": str(exc)[:200]})
            socketio.sleep(RETENTION_EVERY_S)

    runtime.spawn(housekeeping)
    runtime.spawn(retention)
    runtime.spawn(watch_hub)
    return App(flask, socketio, service, factory, bus, calls)


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


def serve(
    settings: Settings, runtime: ThreadRuntime, wrap_predictor: WrapPredictor | None = None
) -> None:
    logs.configure(settings.log_level, json_logs=settings.json_logs, node=settings.node_name)
    threading.excepthook = _thread_exception
    log.info("loading model (the port opens once it is ready)", extra={"model": settings.model})
    service = Service.load(settings, runtime, wrap_predictor=wrap_predictor)
    app = create_app(settings, service, runtime)

    def shutdown() -> None:
        service.ready = False
        app.end_all("server stopping")
        app.bus.close()
        service.close()  # the store's last commits hand their events on to the clients
        runtime.sleep(HAND_ON_S)  # and those emits and disconnects go out
        log.info("stopped")
        logging.shutdown()
        os._exit(0)  # the WSGI loop has no clean way out from a background task

    def drain() -> None:
        """Not ready, new sessions refused (DRAINING); exit once the running sessions have
        ended, or after ``drain_timeout_s``: the rest are handed off, each client told to
        resume (another node continues the session from its stored state)."""
        service.drain()
        deadline = time.monotonic() + settings.drain_timeout_s
        log.info(
            "draining: new sessions go elsewhere, running ones carry on (signal again to stop now)",
            extra={"sessions": len(service.registry), "timeout_s": settings.drain_timeout_s},
        )
        while len(service.registry) and time.monotonic() < deadline:
            runtime.sleep(0.2)
        if len(service.registry):
            log.info("handing off the running sessions", extra={"sessions": len(service.registry)})
            app.end_all("handed off", hand_off=True)
        shutdown()

    def stop(signum: int, _: Any) -> None:
        # Signal handlers run inside the hub's own loop, which must not block: hand over.
        if service.draining:  # a second signal: stop now
            log.info("stopping now: ending sessions", extra={"signal": signum})
            runtime.spawn(shutdown)
            return
        service.draining = True
        runtime.spawn(drain)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    # torch and FunASR leave ~450k long-lived objects; a full collection over them takes ~220 ms
    # on the hub's thread, stalling every client. Freezing them keeps collections to what is new.
    gc.collect()
    gc.freeze()
    if settings.audiosocket_port:
        where = f"{settings.audiosocket_host}:{settings.audiosocket_port}"
        try:
            audiosocket = telephony.listen_audiosocket(
                settings.audiosocket_host, settings.audiosocket_port
            )
        except OSError as exc:
            log.error("cannot listen for AudioSocket", extra={"address": where, "error": str(exc)})
            raise SystemExit(2) from None
        runtime.spawn(app.telephony.serve_audiosocket, audiosocket)
        log.info(
            "AudioSocket listening (no authentication: keep it private)",
            extra={"address": where},
        )
    log.info("listening", extra={"url": f"http://{settings.host}:{settings.port}"})
    listener.serve(
        app.flask,
        host=settings.host,
        port=settings.port,
        limits=ListenerLimits(
            max_connections=settings.max_connections,
            max_connections_per_ip=settings.max_connections_per_ip,
            handshake_timeout_s=settings.handshake_timeout_s,
            body_timeout_s=settings.body_timeout_s,
        ),
        # a connected client's reads and writes are bounded too: Engine.IO pings every 25 s
        socket_timeout_s=max(75.0, settings.handshake_timeout_s),
        on_refused=lambda reason: service.metrics.connections_refused.labels(reason).inc(),
    )
