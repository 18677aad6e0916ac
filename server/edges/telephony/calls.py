"""Call-center ingestion over plain WebSockets: one session per call, one track per party.

``/telephony/twilio`` speaks Twilio Media Streams (also Telnyx, SignalWire, Fonoster): JSON text
messages ``connected``, ``start``, ``media`` (base64 µ-law at 8 kHz, ~20 ms each, ``track``
inbound = the caller = customer, outbound = the agent), ``dtmf``, ``mark``, ``stop``. Media is
put back in ``chunk`` order (frame order is not guaranteed): a chunk still missing once
``twilio_reorder_chunks`` later ones are here is replaced by silence, so the timeline keeps its
length. A jump further ahead than that is a counted fault; the silence put in for it never
exceeds the time that really passed (nor ``MAX_GAP_FILL_S``): a chunk number chosen by the client
never decides how much memory or time the server spends.

``/telephony/audiofork`` takes FreeSWITCH ``mod_audio_fork`` / ``mod_audio_stream``: a JSON
metadata text frame, then binary L16 frames at 8 or 16 kHz; mono is the caller, stereo holds the
caller (left) and the callee (right), de-interleaved here. ``mixed`` holds both voices in one
channel and is analysed only when agent analysis is enabled.

A call id follows the same rule as every session id. A new authenticated connection for a live
call of the same protocol takes the call over: the old connection is closed with a reason and
its close ends nothing. The call ends on ``stop`` (Twilio), when the fork closes its socket
(FreeSWITCH), or ``call_rejoin_s`` after its last connection dropped. A call id that is live for
the other protocol, or already stored, is refused. Only the parties in ``telephony_tracks`` are
analysed (customer only by default). Every fault is logged, counted in
``voxaffect_telephony_events_total`` and ends nothing but the offending stream's own input.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import logging
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from flask import Flask, Response, jsonify, request
from flask_sock import Sock
from simple_websocket import ConnectionClosed

from engine.audio import AudioFormat, AudioFormatError
from server.edges.auth import origin_allowed, request_token, token_ok
from server.edges.protocol import MessageRate, ProtocolError, chunk_seconds, describe_id, valid_id
from server.runtime import ThreadRuntime
from server.sessions.factory import SessionFactory
from server.sessions.registry import SessionRegistry
from server.sessions.runner import InboxFull, SessionClosed, SessionRunner
from server.settings import Settings
from server.sinks.metrics import Metrics

log = logging.getLogger(__name__)

MULAW_SILENCE = b"\xff"
TWILIO_PARTIES = {"inbound": "customer", "outbound": "agent"}
TWILIO_CHUNK_S = 0.02  # Twilio sends 20 ms of audio per media message
MAX_GAP_FILL_S = 10.0  # silence put in for one gap in the chunk numbers, at most
FAULTS_LOGGED_PER_KIND = 3
# A phone number however it is written (+1 555 0100, (555) 010-0100, tel:+15550100,
# sip:+15550100@pbx): 7 to 15 digits (E.164's longest), separators allowed, a date not.
_PHONE = re.compile(r"(?:tel:|sips?:)?\+?[\d\s().\-/]{7,}(?:@[\w.\-:\[\]]*)?", re.IGNORECASE)
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
RECEIVE_POLL_S = 1.0  # how often a connection waiting for a frame checks it was taken over
OPENING_WAIT_S = 10.0  # how long a connection waits for another to finish opening its call


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


class Reorderer:
    """Releases Twilio chunks in ``chunk`` order; fills a stale gap with silence."""

    def __init__(
        self,
        window: int,
        on_fault: Callable[[str, str], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window = window
        self._on_fault = on_fault
        self._clock = clock
        self.next = 1
        self.pending: dict[int, bytes] = {}
        self.filled = 0
        self._last_at: float | None = None

    def push(self, chunk: int, payload: bytes) -> list[bytes]:
        now = self._clock()
        last_at, self._last_at = self._last_at, now
        if chunk < self.next or chunk in self.pending:
            self._on_fault("late_chunk", f"chunk {chunk} is a duplicate or came too late")
            return []
        out: list[bytes] = []
        if chunk - self.next > self.window:
            # Far ahead: a jump, not reordering. Release what is held, put in silence for at
            # most the time that passed since the last chunk, and carry on from this one.
            gap = chunk - self.next
            self._on_fault("chunk_gap", f"chunk {chunk} is {gap} ahead of {self.next}")
            elapsed = 0.0 if last_at is None else now - last_at
            fill = int(min(gap, min(elapsed, MAX_GAP_FILL_S) / TWILIO_CHUNK_S))
            out += [self.pending[k] for k in sorted(self.pending)]
            if fill:
                out.append(MULAW_SILENCE * (len(payload) * fill))
                self.filled += fill
            self.pending.clear()
            self.next = chunk
        self.pending[chunk] = payload
        while True:
            if self.next in self.pending:
                out.append(self.pending.pop(self.next))
                self.next += 1
            elif self.pending and max(self.pending) - self.next >= self.window:
                out.append(MULAW_SILENCE * len(self.pending[min(self.pending)]))
                self.filled += 1
                self.next += 1
            else:
                return out


class Fault(Exception):
    """A malformed message from a media server; ``kind`` is counted as a telephony event."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


@dataclass(frozen=True, slots=True)
class TwilioStart:
    call_id: Any  # checked by the one session-id rule when the call opens
    fmt: AudioFormat
    parties: list[str]
    token: str | None
    meta: dict[str, Any]


@dataclass(frozen=True, slots=True)
class TwilioMedia:
    party: str
    chunk: int  # 0: the stream numbers no chunks
    payload: bytes


def parse_twilio_event(message: str | bytes) -> tuple[str, dict[str, Any]]:
    if isinstance(message, bytes):
        raise Fault("binary_frame", f"{len(message)} bytes where JSON text was expected")
    try:
        data = json.loads(message)
        event = data["event"]
    except (TypeError, ValueError, KeyError, RecursionError):
        raise Fault("bad_json", f"not a JSON event: {message[:80]!r}") from None
    if not isinstance(event, str):
        raise Fault("bad_json", f"event is {type(event).__name__}, not a name")
    return event, data


def parse_twilio_start(data: dict[str, Any]) -> TwilioStart:
    start = data.get("start")
    if not isinstance(start, dict):
        raise Fault("bad_start", "start without a start object")
    fmt_info = start.get("mediaFormat") or {}
    if not isinstance(fmt_info, dict):
        raise Fault("bad_start", "mediaFormat is not an object")
    encoding = {"audio/x-mulaw": "mulaw", "audio/x-alaw": "alaw"}.get(
        str(fmt_info.get("encoding", "audio/x-mulaw"))
    )
    try:
        if encoding is None:
            raise AudioFormatError(f"unsupported encoding {str(fmt_info.get('encoding'))[:40]!r}")
        fmt = AudioFormat(encoding, int(fmt_info.get("sampleRate", 8000)), 1)
    except (AudioFormatError, ValueError, TypeError, OverflowError) as exc:
        raise Fault("bad_start", str(exc)[:200]) from None
    stream_sid = data.get("streamSid") or start.get("streamSid")
    call_id = start.get("callSid") or stream_sid
    if not call_id:
        raise Fault("bad_start", "start carries neither callSid nor streamSid")
    custom = start.get("customParameters") or {}
    if not isinstance(custom, dict):
        raise Fault("bad_start", "customParameters is not an object")
    custom = dict(custom)
    token = custom.pop("token", None)  # never stored
    tracks = start.get("tracks") or ["inbound"]
    if not isinstance(tracks, list):
        raise Fault("bad_start", "tracks is not a list")
    parties = list(dict.fromkeys(TWILIO_PARTIES.get(str(t), str(t)[:32]) for t in tracks[:4]))
    meta = {
        "protocol": "twilio",
        "call_sid": start.get("callSid") if valid_id(start.get("callSid")) else None,
        "stream_sid": stream_sid if valid_id(stream_sid) else None,
        "custom": custom,
    }
    return TwilioStart(call_id, fmt, parties, token if isinstance(token, str) else None, meta)


def parse_twilio_media(data: dict[str, Any], max_bytes: int) -> TwilioMedia:
    media = data.get("media")
    if not isinstance(media, dict):
        raise Fault("bad_payload", "media is not an object")
    payload_text = media.get("payload")
    if not isinstance(payload_text, str) or len(payload_text) > max_bytes * 4 // 3 + 4:
        raise Fault(
            "oversized" if isinstance(payload_text, str) else "bad_payload",
            "the payload is missing or larger than the frame limit",
        )
    try:
        payload = base64.b64decode(payload_text, validate=True)
        chunk = int(media.get("chunk", 0))
    except (TypeError, ValueError, binascii.Error):
        raise Fault("bad_payload", "media without a valid base64 payload or chunk") from None
    if not payload:
        raise Fault("bad_payload", "an empty payload")
    if chunk < 0:
        raise Fault("bad_chunk", f"chunk number {chunk}")
    party = TWILIO_PARTIES.get(str(media.get("track", "inbound")), "customer")
    return TwilioMedia(party, chunk, payload)


@dataclass(frozen=True, slots=True)
class ForkStart:
    call_id: Any
    fmt: AudioFormat
    mix: str
    parties: list[str]
    meta: dict[str, Any]


def parse_fork_metadata(first: str) -> dict[str, Any]:
    """The first text frame of an audio fork: JSON metadata (may be empty)."""
    try:
        meta = json.loads(first) if first.strip() else {}
    except (ValueError, RecursionError):
        raise Fault("bad_metadata", "the metadata frame is not JSON") from None
    if not isinstance(meta, dict):
        raise Fault("bad_metadata", "metadata must be a JSON object")
    return meta


def parse_fork_start(meta: dict[str, Any], args: dict[str, str]) -> ForkStart:
    try:
        rate = int(meta.get("sample_rate") or args.get("rate") or args.get("sample_rate") or 8000)
        mix = str(meta.get("mix") or args.get("mix") or "mono")
        if mix not in ("mono", "mixed", "stereo"):
            raise ValueError(f"mix must be mono, mixed or stereo, got {mix[:20]!r}")
        fmt = AudioFormat("pcm_s16le", rate, 1)
    except (ValueError, TypeError, OverflowError, AudioFormatError) as exc:
        raise Fault("bad_metadata", str(exc)[:200]) from None
    caller = "agent" if meta.get("caller_party") == "agent" else "customer"
    callee = "agent" if caller == "customer" else "customer"
    parties = {"mono": [caller], "mixed": ["mixed"], "stereo": [caller, callee]}[mix]
    call_id = meta.get("call_id") or meta.get("uuid") or meta.get("callSid") or args.get("call_id")
    return ForkStart(call_id, fmt, mix, parties, {"protocol": "audiofork", "mix": mix})


class Refused(Exception):
    """The stream cannot go on (bad start, a duplicate call, no token); it is closed."""


class CallStream:
    """One WebSocket from a media server, feeding a call's session."""

    def __init__(self, ws: Any, edge: TelephonyEdge, protocol: str) -> None:
        self.ws = ws
        self.edge = edge
        self.protocol = protocol
        self.runner: SessionRunner | None = None
        self.faults: Counter[str] = Counter()
        self.taken_over = False
        self.rate = MessageRate(edge.settings.max_messages_per_s, edge.clock)

    @property
    def session_id(self) -> str | None:
        return self.runner.session.id if self.runner else None

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

    def receive(self) -> str | bytes:
        """The next frame; ConnectionClosed once closed, or taken over by another connection.
        Frames beyond max_messages_per_s are dropped (a fault once a second); a flood closes
        the connection (Refused)."""
        while True:
            message = self.ws.receive(timeout=RECEIVE_POLL_S)
            if self.taken_over:
                raise ConnectionClosed(1000, "taken over")
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

    def open(self, call_id: str, fmt: AudioFormat, parties: list[str], meta: dict) -> None:
        edge = self.edge
        if not valid_id(call_id):
            self.fault("bad_call_id", f"call id {describe_id(call_id)}")
            raise Refused("a call id is 1-128 letters, digits or ._:-")
        existing = edge.live_call(call_id)
        if existing is not None and not existing.session.ended:
            if existing.session.source != self.protocol:
                self.fault("duplicate_call", f"call {call_id} is live as {existing.session.source}")
                raise Refused(f"call {call_id} is live on another protocol")
            self._take_over(existing)
            return
        analysed = edge.analysed_parties(parties)
        meta = {**meta, "parties": parties, "analysed": sorted(analysed)}
        try:
            runner = edge.factory.open(
                source=self.protocol,
                fmt=fmt,
                session_id=call_id,
                parties=list(analysed),
                meta=meta,
                connection=self,
            )
        except ProtocolError as exc:
            self.fault("duplicate_call" if exc.code == "SESSION_EXISTS" else "refused", exc.message)
            raise Refused(exc.message) from None
        self.runner = runner
        log.info(
            "call started",
            extra={"session_id": call_id, "protocol": self.protocol, "analysed": sorted(analysed)},
        )

    def _take_over(self, runner: SessionRunner) -> None:
        session = runner.session
        old = session.connect_call(self)
        self.runner = runner
        self.count("takeover")
        log.info("a new connection took the call over", extra={"session_id": session.id})
        if isinstance(old, CallStream) and old is not self:
            old.taken_over = True

    def audio(self, party: str, data: bytes) -> None:
        assert self.runner is not None
        session = self.runner.session
        seconds = chunk_seconds(data, session.format)
        self.edge.metrics.audio_seconds.labels(self.protocol).inc(seconds)
        if party not in self.runner.tracks:
            return  # a party that is not analysed (the agent, by default)
        session.record_audio(seconds, self.edge.clock())  # media servers pace in real time
        try:
            self.runner.push(party, data)
        except InboxFull:
            self.fault("overloaded", "the session's inbox is full; audio dropped")
        except SessionClosed:
            raise Refused("the call has ended") from None

    def close(self, reason: str, *, ends_call: bool) -> None:
        """The connection is gone: end the call (``ends_call``), or let it wait to be rejoined."""
        runner = self.runner
        if runner is None or not runner.session.drop_call(self, self.edge.clock()):
            return  # never opened one, or another connection took the call over
        if ends_call:
            runner.end(reason)


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
    ) -> None:
        self.settings = settings
        self.runtime = runtime
        self.factory = factory
        self.registry = registry
        self.metrics = metrics
        self.clock = clock

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

    # --- Twilio Media Streams ----------------------------------------------------------------

    def twilio(self, ws: Any, token_pending: bool) -> None:
        """``token_pending``: the upgrade carried no token, so ``start`` must (Twilio's
        <Stream> URL takes no query string; a <Parameter name="token"> arrives in
        ``customParameters``)."""
        call = CallStream(ws, self, "twilio")
        reorderers: dict[str, Reorderer] = {}
        reason, ends_call = "connection dropped", False
        try:
            while True:
                try:
                    event, data = parse_twilio_event(call.receive())
                    if event == "connected":
                        call.count("connected")
                    elif event == "start":
                        call.count("start")
                        if call.runner is not None:  # one call per media connection
                            raise Fault("second_start", "a second start on this connection")
                        self._twilio_start(call, parse_twilio_start(data), token_pending)
                    elif call.runner is None and token_pending:
                        call.fault("unauthorized", f"{event[:40]!r} before an authenticated start")
                        break
                    elif event == "media":
                        call.count("media")
                        if call.runner is None:
                            raise Fault("media_before_start", "media arrived before start")
                        media = parse_twilio_media(data, self.settings.telephony_max_frame_bytes)
                        self._twilio_media(call, media, reorderers)
                    elif event in ("dtmf", "mark"):
                        call.count(event)
                    elif event == "stop":
                        call.count("stop")
                        if call.runner is None:
                            call.fault("stop_without_media", "stop before any start or media")
                        reason, ends_call = "call ended", True
                        break
                    else:
                        call.fault("unknown_event", f"event {event[:40]!r}")
                except Fault as fault:
                    call.fault(fault.kind, fault.detail)
                    if fault.kind == "bad_start":
                        raise Refused(fault.detail) from None
        except Refused as exc:
            _close(ws, 1008, str(exc))
        except ConnectionClosed as exc:
            if call.taken_over:
                _close(ws, 1000, "another connection took this call over")
            elif _closed_for_size(ws):
                call.fault("oversized", "a message beyond the frame limit; connection closed")
            else:
                call.fault("dropped", f"closed without stop ({exc.reason})")
        finally:
            call.close(reason, ends_call=ends_call)
            filled = {p: r.filled for p, r in reorderers.items() if r.filled}
            if filled:
                log.info(
                    "filled missing chunks with silence",
                    extra={"session_id": call.session_id, "filled": filled},
                )

    def _twilio_start(self, call: CallStream, start: TwilioStart, token_pending: bool) -> None:
        if token_pending and not token_ok(self.settings, start.token):
            call.fault("unauthorized", "start without a valid token parameter")
            raise Refused("a valid token parameter is required")
        meta = {**start.meta, "custom": self.private(start.meta["custom"])}
        call.open(start.call_id, start.fmt, start.parties, meta)

    def _twilio_media(
        self, call: CallStream, media: TwilioMedia, reorderers: dict[str, Reorderer]
    ) -> None:
        if media.chunk == 0:  # no chunk numbers: in arrival order
            call.audio(media.party, media.payload)
            return
        reorder = reorderers.get(media.party)
        if reorder is None:
            reorder = reorderers[media.party] = Reorderer(
                self.settings.twilio_reorder_chunks, call.fault, self.clock
            )
        for ordered in reorder.push(media.chunk, media.payload):
            call.audio(media.party, ordered)

    # --- FreeSWITCH audio fork ---------------------------------------------------------------

    def audiofork(self, ws: Any, args: dict[str, str]) -> None:
        call = CallStream(ws, self, "audiofork")
        reason, ends_call = "connection dropped", False
        try:
            first = call.receive()
            meta: dict[str, Any] = {}
            pending: bytes | str | None = None
            if isinstance(first, bytes):
                call.fault("bad_metadata", "the first frame was audio, not JSON metadata")
                pending = first
            else:
                try:
                    meta = parse_fork_metadata(first)
                except Fault as fault:
                    call.fault(fault.kind, fault.detail)
            try:
                fork = parse_fork_start(meta, args)
            except Fault as fault:
                call.fault(fault.kind, fault.detail)
                raise Refused(fault.detail) from None
            call_id = fork.call_id or self.registry.new_id()
            call.open(
                call_id, fork.fmt, fork.parties, {**fork.meta, "metadata": self.private(meta)}
            )
            self._fork_media(call, fork.parties, 2 if fork.mix == "stereo" else 1, pending)
        except Refused as exc:
            _close(ws, 1008, str(exc))
        except ConnectionClosed:
            if call.taken_over:
                _close(ws, 1000, "another connection took this call over")
            elif _closed_for_size(ws):
                call.fault("oversized", "a frame beyond the frame limit; connection closed")
            else:
                reason, ends_call = "call ended", True  # the fork ends by closing the socket
                call.count("closed")
        finally:
            call.close(reason, ends_call=ends_call)

    def _fork_media(
        self, call: CallStream, parties: list[str], channels: int, pending: bytes | str | None
    ) -> None:
        frame_bytes = 2 * channels
        remainder = b""
        while True:
            message = pending if pending is not None else call.receive()
            pending = None
            if isinstance(message, str):
                call.fault("text_frame", "a text frame after the metadata")
                continue
            if len(message) > self.settings.telephony_max_frame_bytes:
                call.fault("oversized", f"a {len(message)}-byte frame")
                continue
            call.count("media")
            data = remainder + message
            usable = len(data) - len(data) % frame_bytes
            data, remainder = data[:usable], data[usable:]
            if not data:
                continue
            if channels == 1:
                call.audio(parties[0], data)
            else:
                pcm = np.frombuffer(data, dtype="<i2").reshape(-1, 2)
                for index, party in enumerate(parties):
                    call.audio(party, pcm[:, index].tobytes())


def _closed_for_size(ws: Any) -> bool:
    """simple-websocket closed the connection because a message outgrew max_message_size (it
    says so only through the length it had counted when it stopped)."""
    limit = getattr(ws, "max_message_size", None) or 0
    return bool(limit) and int(getattr(ws, "incoming_message_len", 0)) > limit


def _close(ws: Any, code: int, message: str) -> None:
    with contextlib.suppress(ConnectionClosed, OSError):
        ws.close(reason=code, message=message[:120])


def register(app: Flask, edge: TelephonyEdge) -> None:
    settings = edge.settings
    # A frame far beyond the per-frame cap closes the connection before it is buffered whole
    # (base64 and JSON make a Twilio payload's message about 4/3 larger).
    app.config["SOCK_SERVER_OPTIONS"] = {
        "max_message_size": 2 * settings.telephony_max_frame_bytes + 4096
    }
    sock = Sock(app)

    @app.before_request
    def telephony_checks() -> tuple[Response, int] | None:
        if not request.path.startswith("/telephony/"):
            return None
        protocol = request.path.rsplit("/", 1)[-1][:20]
        origin = request.headers.get("Origin")
        if origin is not None and not origin_allowed(settings, origin, request.environ):
            edge.metrics.telephony_events.labels(protocol, "foreign_origin").inc()
            return jsonify(
                {"error": {"code": "UNAUTHORIZED", "message": f"origin {origin[:80]} not allowed"}}
            ), 403
        if request.path == "/telephony/twilio" and not request_token(request):
            request.environ["voxaffect.token_pending"] = settings.auth_required
            return None  # Twilio can send its token only inside the start message
        if not token_ok(settings, request_token(request)):
            edge.metrics.telephony_events.labels(protocol, "unauthorized").inc()
            return jsonify(
                {"error": {"code": "UNAUTHORIZED", "message": "a valid API token is required"}}
            ), 401
        return None

    @sock.route("/telephony/twilio")
    def twilio(ws: Any) -> None:
        edge.metrics.connections.labels("telephony").inc()
        try:
            edge.twilio(ws, bool(request.environ.get("voxaffect.token_pending")))
        finally:
            edge.metrics.connections.labels("telephony").dec()

    @sock.route("/telephony/audiofork")
    def audiofork(ws: Any) -> None:
        args = {k: v[:64] for k, v in request.args.items()}
        edge.metrics.connections.labels("telephony").inc()
        try:
            edge.audiofork(ws, args)
        finally:
            edge.metrics.connections.labels("telephony").dec()
