"""Call-center ingestion: one call loop for every media-server protocol.

A provider is a parser (``twilio``, ``audiofork``, ``jambonz``, ``audiohook``, ``audiosocket``:
frames in, typed messages out, see ``base.py``) and a route. What they share is here, once:

- before the upgrade: the Origin check and the provider's authentication (a token, Twilio's
  signature, AudioHook's API key and signature, jambonz's basic auth), refused with a JSON 401
  and counted;
- one session per call, one track per party (customer, agent, or a mixed channel; only the
  parties in ``telephony_tracks`` are analysed, customer only by default), interleaved channels
  split here;
- the call id follows the same rule as every session id. A new authenticated connection for a
  live call of the same protocol takes the call over: the old connection is closed with a reason
  and its close ends nothing. A call id live for another protocol, or already stored, is refused;
- the call ends when the protocol says so (Twilio ``stop``, AudioHook ``close``, AudioSocket
  hangup), when a fork closes its socket, or ``call_rejoin_s`` after the last connection of a
  protocol that says when it stops dropped;
- call metadata is stored with every phone-number-shaped value pseudonymised (with
  ``hash_caller_ids``);
- every fault is logged (the first few of a kind), counted in
  ``voxaffect_telephony_events_total`` and ends nothing but the offending stream's own input; a
  fatal one (or a refusal) sends the protocol's own refusal (AudioHook ``disconnect``) and closes.

A call must start within ``auth_timeout_s`` of its connection, or the connection is closed.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import numpy as np
from flask import Flask, Request, Response, jsonify, request
from flask_sock import Sock
from simple_websocket import ConnectionClosed

from engine.audio import RAW_BYTES_PER_SAMPLE
from server.edges.auth import origin_allowed, public_origin, request_token, token_ok
from server.edges.protocol import MessageRate, ProtocolError, chunk_seconds, describe_id, valid_id
from server.edges.telephony import signatures
from server.edges.telephony.audiofork import AudioForkParser
from server.edges.telephony.audiohook import AudioHookParser
from server.edges.telephony.audiosocket import AudioSocketConnection, AudioSocketParser
from server.edges.telephony.base import (
    SILENCE,
    Audio,
    Fault,
    Gap,
    Message,
    Note,
    Parser,
    Refused,
    Start,
    Stop,
)
from server.edges.telephony.jambonz import SUBPROTOCOL, JambonzParser
from server.edges.telephony.twilio import TwilioParser
from server.runtime import ThreadRuntime
from server.sessions.factory import SessionFactory
from server.sessions.registry import SessionRegistry
from server.sessions.runner import InboxFull, SessionClosed, SessionRunner
from server.settings import Settings
from server.sinks.metrics import Metrics

log = logging.getLogger(__name__)

FAULTS_LOGGED_PER_KIND = 3
# A phone number however it is written (+1 555 0100, (555) 010-0100, tel:+15550100,
# sip:+15550100@pbx): 7 to 15 digits (E.164's longest), separators allowed, a date not.
_PHONE = re.compile(r"(?:tel:|sips?:)?\+?[\d\s().\-/]{7,}(?:@[\w.\-:\[\]]*)?", re.IGNORECASE)
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
RECEIVE_POLL_S = 1.0  # how often a connection waiting for a frame checks it was taken over
OPENING_WAIT_S = 10.0  # how long a connection waits for another to finish opening its call
SUMMARY_WAIT_S = 10.0  # how long a protocol's close waits for the summary to be committed
GAP_PIECE_BYTES = 16_000  # silence for a pause goes in, in pieces of at most this
GAP_SLACK_S = 1.0  # a pause's silence may bring the timeline this far ahead of the wall clock
PROTOCOLS = ("twilio", "audiofork", "jambonz", "audiohook", "audiosocket")
PARTIES = ("customer", "agent", "mixed")


def is_phone_number(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return 7 <= len(str(abs(value))) <= 15
    if not isinstance(value, str) or len(value) > 64 or _DATE.search(value):
        return False
    digits = sum(c.isdigit() for c in value)
    return 7 <= digits <= 15 and _PHONE.fullmatch(value.strip()) is not None


def pseudonymise(value: Any, key: bytes) -> Any:
    """``value`` with every phone-number-shaped value in it replaced by its pseudonym."""
    if isinstance(value, dict):
        return {k: pseudonymise(v, key) for k, v in value.items()}
    if isinstance(value, list):
        return [pseudonymise(v, key) for v in value]
    if is_phone_number(value):
        number = re.sub(r"\D", "", str(value).split("@", 1)[0])  # one number, one pseudonym
        return "hmac:" + hmac.new(key, number.encode(), hashlib.sha256).hexdigest()[:32]
    return value


class CallStream:
    """One connection from a media server, feeding a call's session through its parser."""

    def __init__(
        self, ws: Any, edge: TelephonyEdge, parser: Parser, *, token_pending: bool = False
    ) -> None:
        self.ws = ws
        self.edge = edge
        self.parser = parser
        self.protocol = parser.name
        self.token_pending = token_pending  # the call's start must carry the token (Twilio)
        self.runner: SessionRunner | None = None
        self.parties: list[str] = []
        self.faults: Counter[str] = Counter()
        self.taken_over = False
        self.handed_off = False  # this node drains: another node continues the call
        self.rate = MessageRate(edge.settings.max_messages_per_s, edge.clock)
        self.connected_at = edge.clock()
        self.timeline_s: dict[str, float] = dict.fromkeys(PARTIES, 0.0)  # audio this stream
        self._remainder = b""  # the part of an interleaved frame that split a sample
        self._send_lock = threading.Lock()

    @property
    def session_id(self) -> str | None:
        return self.runner.session.id if self.runner else None

    # --- counting ------------------------------------------------------------------------------

    def count(self, kind: str) -> None:
        self.edge.metrics.telephony_events.labels(self.protocol, kind).inc()

    def fault(self, kind: str, detail: str) -> None:
        self.count(kind)
        self.faults[kind] += 1
        if self.faults[kind] <= FAULTS_LOGGED_PER_KIND:
            log.warning(
                "telephony fault",
                extra={
                    "protocol": self.protocol,
                    "kind": kind,
                    "detail": detail[:200],
                    "session_id": self.session_id,
                },
            )

    # --- the loop ------------------------------------------------------------------------------

    def run(self) -> None:
        reason, ends_call = "connection dropped", False
        try:
            while True:
                try:
                    messages = self.parser.feed(self.receive())
                except Fault as fault:
                    self.fault(fault.kind, fault.detail)
                    if fault.fatal:
                        raise Refused(fault.detail) from None
                    continue
                stop = next((m for m in messages if isinstance(m, Stop)), None)
                for message in messages:
                    self.handle(message)
                if stop is not None:
                    reason, ends_call = stop.reason, True
                    self.finish(stop)
                    break
        except Refused as refused:
            self.send(*self.parser.refusal(str(refused), refused.reason))
            _close(self.ws, 1008, str(refused))
        except ConnectionClosed as exc:
            if self.taken_over:
                _close(self.ws, 1000, "another connection took this call over")
            elif self.handed_off:
                self.count("handed_off")
            elif _closed_for_size(self.ws):
                self.fault("oversized", "a frame beyond the frame limit; connection closed")
            elif self.parser.ends_on_close:
                reason, ends_call = "call ended", True
                self.count("closed")
            else:
                self.fault("dropped", f"closed without a stop ({exc.reason})")
        finally:
            self.close(reason, ends_call=ends_call)
            report = self.parser.report()
            if report:
                log.info("call stream report", extra={"session_id": self.session_id, **report})

    def receive(self) -> str | bytes:
        """The next frame; ConnectionClosed once closed, or taken over by another connection.
        Frames beyond max_messages_per_s are dropped (a fault once a second); a flood, or no
        start within auth_timeout_s, closes the connection (Refused)."""
        while True:
            message = self.ws.receive(timeout=RECEIVE_POLL_S)
            if self.taken_over:
                raise ConnectionClosed(1000, "taken over")
            if self.runner is None and (
                self.edge.clock() - self.connected_at > self.edge.settings.auth_timeout_s
            ):
                self.fault("no_start", "no call started within auth_timeout_s")
                raise Refused("no call started in time")
            if message is None:
                continue
            verdict = self.rate.take()
            if verdict == "ok":
                return message
            self.edge.metrics.messages_dropped.labels("telephony").inc()
            if verdict == "cut":
                raise Refused("messages arrive far faster than max_messages_per_s")
            if verdict == "tell":
                self.fault("rate_limited", "more messages than max_messages_per_s; dropped")

    def handle(self, message: Message) -> None:
        if isinstance(message, Fault):
            self.fault(message.kind, message.detail)
        elif isinstance(message, Note):
            self.count(message.kind)
            self.send(*message.answer)
        elif isinstance(message, Start):
            self.open(message)
            self.send(*message.answer)
        elif self.runner is None:
            if self.token_pending:
                self.fault("unauthorized", "media before an authenticated start")
                raise Refused("a call must start with a valid token", "unauthorized")
            if isinstance(message, Stop):
                self.fault("stop_without_media", "stop before any start or media")
            else:
                self.fault("media_before_start", "media arrived before start")
        elif isinstance(message, Audio):
            self.audio(message)
        elif isinstance(message, Gap):
            self.fill(message.seconds)

    def finish(self, stop: Stop) -> None:
        """The protocol said the call is over: end it, and answer once its summary is in."""
        if self.runner is None or not stop.answer:
            return
        self.runner.end(stop.reason)
        if not self.runner.session.summarised.wait(SUMMARY_WAIT_S):
            log.warning("a call's summary took too long", extra={"session_id": self.session_id})
        self.send(*stop.answer)
        _close(self.ws, 1000, "closed")

    # --- the call ------------------------------------------------------------------------------

    def open(self, start: Start) -> None:
        edge = self.edge
        if self.token_pending and not token_ok(edge.settings, start.token):
            self.fault("unauthorized", "start without a valid token parameter")
            raise Refused("a valid token parameter is required", "unauthorized")
        call_id = start.call_id or edge.registry.new_id()
        if not valid_id(call_id):
            self.fault("bad_call_id", f"call id {describe_id(call_id)}")
            raise Refused("a call id is 1-128 letters, digits or ._:-")
        self.parties = list(start.parties)
        existing = edge.live_call(call_id)
        if existing is not None and not existing.session.ended:
            if existing.session.source != self.protocol:
                self.fault("duplicate_call", f"call {call_id} is live as {existing.session.source}")
                raise Refused(f"call {call_id} is live on another protocol")
            self._take_over(existing)
            return
        for earlier in filter(valid_id, start.continues):  # AudioHook's continuedSessions
            if self._continue(earlier, start):
                return
        analysed = edge.analysed_parties(self.parties)
        meta = {**edge.private(start.meta), "parties": self.parties, "analysed": sorted(analysed)}
        try:
            self.runner = edge.factory.open(
                source=self.protocol,
                fmt=start.fmt,
                session_id=call_id,
                parties=list(analysed),
                meta=meta,
                connection=self,
            )
        except ProtocolError as exc:
            # the store holds the id: a call another node handed off (it drained) continues here
            if exc.code == "SESSION_EXISTS" and self._continue(call_id, start):
                return
            self.fault("duplicate_call" if exc.code == "SESSION_EXISTS" else "refused", exc.message)
            raise Refused(exc.message) from None
        log.info(
            "call started",
            extra={"session_id": call_id, "protocol": self.protocol, "analysed": sorted(analysed)},
        )

    def _continue(self, call_id: str, start: Start) -> bool:
        """Continue ``call_id`` if another node handed it off: its tracks, baselines and seq."""
        try:
            runner = self.edge.factory.reopen(
                session_id=call_id, source=self.protocol, fmt=start.fmt, connection=self
            )
        except ProtocolError as exc:  # this node drains too, or is full
            self.fault("refused", exc.message)
            raise Refused(exc.message) from None
        if runner is None:
            return False
        self.runner = runner
        self.count("continued")
        log.info("a call continues from another node", extra={"session_id": call_id})
        return True

    def _take_over(self, runner: SessionRunner) -> None:
        session = runner.session
        old = session.connect_call(self)
        self.runner = runner
        self.count("takeover")
        log.info("a new connection took the call over", extra={"session_id": session.id})
        if isinstance(old, CallStream) and old is not self:
            old.taken_over = True

    def audio(self, message: Audio) -> None:
        if message.party is not None or len(self.parties) == 1:
            self.party_audio(message.party or self.parties[0], message.data)
            return
        # Interleaved: one sample of every party per frame. A frame may split a sample.
        assert self.runner is not None
        width = RAW_BYTES_PER_SAMPLE[self.runner.session.format.encoding]
        frame_bytes = width * len(self.parties)
        data = self._remainder + message.data
        usable = len(data) - len(data) % frame_bytes
        data, self._remainder = data[:usable], data[usable:]
        if not data:
            return
        samples = np.frombuffer(data, dtype=f"V{width}").reshape(-1, len(self.parties))
        for index, party in enumerate(self.parties):
            self.party_audio(party, samples[:, index].tobytes())

    def party_audio(self, party: str, data: bytes, *, block: bool = False) -> None:
        assert self.runner is not None
        session = self.runner.session
        seconds = chunk_seconds(data, session.format)
        self.timeline_s[party] = self.timeline_s.get(party, 0.0) + seconds
        self.edge.metrics.audio_seconds.labels(self.protocol).inc(seconds)
        if party not in self.runner.tracks:
            return  # a party that is not analysed (the agent, by default)
        if self.runner.handing_off:  # in flight as the node handed the call off: not analysed
            self.edge.metrics.messages_dropped.labels("handoff").inc()
            return
        session.record_audio(seconds, self.edge.clock())  # media servers pace in real time
        try:
            self.runner.push(party, data, block=block)
        except InboxFull:
            self.fault("overloaded", "the session's inbox is full; audio dropped")
        except SessionClosed:
            raise Refused("the call has ended") from None

    def fill(self, seconds: float) -> None:
        """Silence for ``seconds`` of the call Genesys paused or discarded; never more than the
        time that passed since this connection started, so a claimed span costs nothing more."""
        assert self.runner is not None
        fmt = self.runner.session.format
        elapsed = self.edge.clock() - self.connected_at + GAP_SLACK_S
        for party in self.parties:
            room_s = max(0.0, elapsed - self.timeline_s.get(party, 0.0))
            samples = int(min(seconds, room_s) * fmt.sample_rate)
            piece = SILENCE[fmt.encoding] * (GAP_PIECE_BYTES // len(SILENCE[fmt.encoding]))
            while samples > 0:
                take = min(samples, len(piece) // len(SILENCE[fmt.encoding]))
                self.party_audio(party, piece[: take * len(SILENCE[fmt.encoding])], block=True)
                samples -= take
        self.count("gap_filled")

    # --- answers -------------------------------------------------------------------------------

    def send(self, *answers: Any) -> None:
        for answer in answers:
            with self._send_lock:
                try:
                    self.ws.send(self.parser.encode(answer))
                except (ConnectionClosed, OSError):
                    return

    def result(self, result: dict[str, Any]) -> None:
        """A window's result, as the room has it (called by the room publisher)."""
        answer = self.parser.result(result)
        if answer is not None and not self.taken_over:
            self.send(answer)

    def hand_off(self) -> None:
        """The call was handed off (called by the room publisher once it is stored): ask the
        media server to reconnect where the protocol can, or close with 1012 (service restart);
        a reconnect to any node continues the call."""
        self.handed_off = True
        asks = self.parser.hand_off()
        if asks:
            self.send(*asks)
        else:
            _close(self.ws, 1012, "this node is restarting; reconnect to continue the call")

    def close(self, reason: str, *, ends_call: bool) -> None:
        """The connection is gone: end the call (``ends_call``), or let it wait to be rejoined."""
        runner = self.runner
        if runner is None or not runner.session.drop_call(self, self.edge.clock()):
            return  # never opened one, or another connection took the call over
        if ends_call:
            runner.end(reason)


class Unauthorized(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


class TelephonyEdge:
    def __init__(
        self,
        settings: Settings,
        *,
        factory: SessionFactory,
        registry: SessionRegistry,
        metrics: Metrics,
        runtime: ThreadRuntime,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.runtime = runtime
        self.factory = factory
        self.registry = registry
        self.metrics = metrics
        self.clock = clock
        self.wall_clock = wall_clock
        self.nonces = signatures.NonceCache(clock)

    def live_call(self, call_id: str) -> SessionRunner | None:
        """The live session of ``call_id``; if another connection is opening it right now,
        the session once it is open."""
        deadline = self.clock() + OPENING_WAIT_S
        while self.registry.opening(call_id) and self.clock() < deadline:
            self.runtime.sleep(0.01)
        return self.registry.get(call_id)

    def analysed_parties(self, parties: list[str]) -> list[str]:
        wanted = set(self.settings.telephony_tracks)
        return [
            p for p in parties if p in wanted or (p == "mixed" and {"customer", "agent"} <= wanted)
        ]

    def private(self, meta: dict[str, Any]) -> dict[str, Any]:
        """With ``hash_caller_ids``, every value in the metadata that is shaped like a phone
        number — whatever its key, in lists and nested objects too — becomes an HMAC-SHA256
        pseudonym under ``caller_id_key`` (the same number, the same pseudonym)."""
        if not self.settings.hash_caller_ids:
            return meta
        hidden = pseudonymise(meta, self.settings.caller_id_key.encode())
        assert isinstance(hidden, dict)
        return hidden

    def parser(self, protocol: str, req: Request | None = None) -> Parser:
        """A new connection's parser for ``protocol`` (its request, for what the URL says)."""
        s = self.settings
        args = {k: v[:64] for k, v in req.args.items()} if req is not None else {}
        size = s.telephony_max_frame_bytes
        if protocol == "twilio":
            return TwilioParser(size, reorder_chunks=s.twilio_reorder_chunks, clock=self.clock)
        if protocol == "audiofork":
            return AudioForkParser(size, args=args)
        if protocol == "jambonz":
            return JambonzParser(size, args=args)
        if protocol == "audiohook":
            header = req.headers.get if req is not None else (lambda name, default: default)
            return AudioHookParser(
                size,
                session_id=str(header("Audiohook-Session-Id", ""))[:128],
                headers={"correlation_id": str(header("Audiohook-Correlation-Id", ""))[:128]},
            )
        if protocol == "audiosocket":
            return AudioSocketParser(size)
        raise ValueError(f"no telephony protocol {protocol!r}")

    def serve(self, ws: Any, protocol: str, req: Request | None = None, **kw: Any) -> None:
        self.metrics.connections.labels("telephony").inc()
        try:
            CallStream(ws, self, self.parser(protocol, req), **kw).run()
        finally:
            self.metrics.connections.labels("telephony").dec()

    # --- who is calling --------------------------------------------------------------------

    def authenticate(self, protocol: str, req: Request) -> bool:
        """Raises Unauthorized; True if the call's start must still carry the token."""
        s = self.settings
        if protocol == "twilio" and s.twilio_auth_token:
            scheme, host = public_origin(s, req.environ)
            try:
                signatures.check_twilio(
                    s.twilio_auth_token,
                    req.headers.get("X-Twilio-Signature"),
                    signatures.twilio_urls(scheme, host, _request_target(req)),
                )
            except signatures.SignatureError as exc:
                raise Unauthorized("bad_signature", str(exc)) from None
            return False
        if protocol == "twilio" and not request_token(req):
            return s.auth_required  # Twilio can send its token only inside the start message
        if protocol == "audiohook":
            key = req.headers.get("X-API-KEY")
            if not token_ok(s, key):
                raise Unauthorized("unauthorized", "X-API-KEY is not a valid API key")
            if s.audiohook_client_secret:
                self._check_audiohook_signature(req, key)
            return False
        token = request_token(req)
        if protocol == "jambonz" and token is None and req.authorization is not None:
            token = req.authorization.password  # the listen verb's wsAuth (basic auth)
        if not token_ok(s, token):
            raise Unauthorized("unauthorized", "a valid API token is required")
        return False

    def _check_audiohook_signature(self, req: Request, key: str | None) -> None:
        _, host = public_origin(self.settings, req.environ)
        headers = {name.lower(): value for name, value in req.headers.items()}
        headers["host"] = host
        try:
            signatures.check_audiohook(
                self.settings.audiohook_client_secret,
                key,
                _request_target(req),
                headers,
                self.nonces,
                self.wall_clock(),
            )
        except signatures.SignatureError as exc:
            raise Unauthorized("bad_signature", str(exc)) from None

    # --- Asterisk AudioSocket (TCP) --------------------------------------------------------

    def serve_audiosocket(self, listening: socket.socket) -> None:
        """Accept AudioSocket connections on ``listening`` until the process ends; each call
        runs in a thread of the runtime. At most ``max_connections`` at once."""
        open_now = [0]
        while True:
            conn, _ = listening.accept()
            if open_now[0] >= self.settings.max_connections:
                self.metrics.connections_refused.labels("full").inc()
                conn.close()
                continue
            open_now[0] += 1

            def run(conn: socket.socket = conn) -> None:
                try:
                    self.serve(AudioSocketConnection(conn), "audiosocket")
                finally:
                    open_now[0] -= 1
                    with contextlib.suppress(OSError):
                        conn.close()

            self.runtime.spawn(run)


def listen_audiosocket(host: str, port: int) -> socket.socket:
    family = socket.getaddrinfo(host, port)[0][0]
    listening = socket.socket(family, socket.SOCK_STREAM)
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listening.bind((host, port))
    listening.listen(128)
    return listening


def _request_target(req: Request) -> str:
    """The path and query as the client sent them (what a signature covers)."""
    raw = req.environ.get("RAW_PATH_INFO") or req.environ.get("RAW_URI") or quote(req.path)
    raw = str(raw).split("?", 1)[0]
    query = req.environ.get("QUERY_STRING", "")
    return raw + (f"?{query}" if query else "")


def _closed_for_size(ws: Any) -> bool:
    """simple-websocket closed the connection because a message outgrew max_message_size (it
    says so only through the length it had counted when it stopped)."""
    limit = getattr(ws, "max_message_size", None) or 0
    return bool(limit) and int(getattr(ws, "incoming_message_len", 0)) > limit


def _close(ws: Any, code: int, message: str) -> None:
    with contextlib.suppress(ConnectionClosed, OSError):
        ws.close(reason=code, message=message[:120])


def _unauthorized(message: str) -> tuple[Response, int]:
    return jsonify({"error": {"code": "UNAUTHORIZED", "message": message}}), 401


def register(app: Flask, edge: TelephonyEdge) -> None:
    settings = edge.settings
    # A frame far beyond the per-frame cap closes the connection before it is buffered whole
    # (base64 and JSON make a Twilio payload's message about 4/3 larger). jambonz asks for its
    # subprotocol; a client that offers none gets none.
    app.config["SOCK_SERVER_OPTIONS"] = {
        "max_message_size": 2 * settings.telephony_max_frame_bytes + 4096,
        "subprotocols": [SUBPROTOCOL],
    }
    sock = Sock(app)

    @app.before_request
    def telephony_checks() -> tuple[Response, int] | None:
        if not request.path.startswith("/telephony/"):
            return None
        protocol = request.path.rsplit("/", 1)[-1]
        if protocol not in PROTOCOLS:
            return None  # a 404
        origin = request.headers.get("Origin")
        if origin is not None and not origin_allowed(settings, origin, request.environ):
            edge.metrics.telephony_events.labels(protocol, "foreign_origin").inc()
            return jsonify(
                {"error": {"code": "UNAUTHORIZED", "message": f"origin {origin[:80]} not allowed"}}
            ), 403
        try:
            request.environ["voxaffect.token_pending"] = edge.authenticate(protocol, request)
        except Unauthorized as exc:
            edge.metrics.telephony_events.labels(protocol, exc.kind).inc()
            return _unauthorized(exc.message)
        return None

    def route(protocol: str) -> None:
        def serve(ws: Any) -> None:
            pending = bool(request.environ.get("voxaffect.token_pending"))
            edge.serve(ws, protocol, request, token_pending=pending)

        sock.route(f"/telephony/{protocol}", endpoint=f"telephony_{protocol}")(serve)

    for protocol in ("twilio", "audiofork", "jambonz", "audiohook"):
        route(protocol)
