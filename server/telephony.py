"""Call-center ingestion over plain WebSockets, one session per call and one track per party.

``/telephony/twilio`` speaks Twilio Media Streams (also Telnyx, SignalWire, Fonoster): JSON text
messages ``connected``, ``start``, ``media`` (base64 µ-law at 8 kHz, ~20 ms each, ``track``
inbound = the caller = customer, outbound = the agent), ``dtmf``, ``mark``, ``stop``. Media is
put back in ``chunk`` order — frame order is not guaranteed — and a chunk still missing after
``REORDER_WINDOW`` later ones is replaced by silence so the timeline keeps its length.

``/telephony/audiofork`` takes FreeSWITCH ``mod_audio_fork`` / ``mod_audio_stream``: a JSON
metadata text frame, then binary L16 frames at 8 or 16 kHz; mono is the caller, stereo holds the
caller (left) and the callee (right), de-interleaved here. ``mixed`` holds both voices in one
channel and is analysed only when agent analysis is enabled.

Only the parties in ``telephony_tracks`` are analysed (customer only by default). Every fault —
bad JSON, an unknown event, media before ``start``, a bad payload, a dropped connection — is
logged, counted in ``voxaffect_telephony_events_total`` and never affects another call.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from collections import Counter
from typing import Any

import numpy as np
from flask import Flask, Response, jsonify, request
from flask_sock import Sock
from simple_websocket import ConnectionClosed

from engine.audio import AudioFormat, AudioFormatError
from engine.pipeline import StreamPipeline
from server.auth import request_token, token_ok
from server.protocol import ProtocolError, chunk_seconds
from server.service import Service
from server.sessions import Session, Track

log = logging.getLogger(__name__)

REORDER_WINDOW = 5  # chunks (100 ms): how long a missing Twilio chunk is waited for
MAX_PAYLOAD_BYTES = 8000  # one second of 8 kHz µ-law; Twilio sends 160-byte (20 ms) chunks
MULAW_SILENCE = b"\xff"
TWILIO_PARTIES = {"inbound": "customer", "outbound": "agent"}
FAULTS_LOGGED_PER_KIND = 3


class Reorderer:
    """Releases Twilio chunks in ``chunk`` order; fills a gap with silence once it is stale."""

    def __init__(self, window: int = REORDER_WINDOW) -> None:
        self.window = window
        self.next = 1
        self.pending: dict[int, bytes] = {}
        self.filled = 0
        self.late = 0

    def push(self, chunk: int, payload: bytes) -> list[bytes]:
        if chunk < self.next or chunk in self.pending:
            self.late += 1  # a duplicate, or too late: its place was filled
            return []
        self.pending[chunk] = payload
        out = []
        while True:
            if self.next in self.pending:
                out.append(self.pending.pop(self.next))
                self.next += 1
            elif self.pending and max(self.pending) - self.next >= self.window:
                size = len(self.pending[min(self.pending)])
                out.append(MULAW_SILENCE * size)
                self.filled += 1
                self.next += 1
            else:
                return out


class CallConnection:
    """One WebSocket from a media server: its session, and its faults."""

    def __init__(self, service: Service, protocol: str) -> None:
        self.service = service
        self.protocol = protocol
        self.session: Session | None = None
        self.faults: Counter[str] = Counter()

    def count(self, kind: str) -> None:
        self.service.metrics.telephony_events.labels(self.protocol, kind).inc()

    def fault(self, kind: str, detail: str) -> None:
        self.count(kind)
        self.faults[kind] += 1
        if self.faults[kind] <= FAULTS_LOGGED_PER_KIND:
            session_id = self.session.id if self.session else None
            log.warning(
                "telephony fault",
                extra={
                    "protocol": self.protocol,
                    "kind": kind,
                    "detail": detail,
                    "session_id": session_id,
                },
            )

    def open(
        self,
        call_id: str,
        fmt: AudioFormat,
        parties: list[str],
        meta: dict[str, Any],
    ) -> None:
        settings = self.service.settings
        streams = self.service.streams
        assert streams is not None
        existing = self.service.registry.get(call_id)
        if existing is not None and not existing.ended and existing.source == self.protocol:
            self.session = existing  # the media server reconnected for the same call
            log.info("telephony stream rejoined its call", extra={"session_id": call_id})
            return
        labels = tuple(self.service.model_info["labels"])
        tracks: dict[str | None, Track] = {
            party: Track(party, StreamPipeline(settings.pipeline_config(), fmt, labels=labels))
            for party in parties
            if party in settings.telephony_tracks
            or (party == "mixed" and {"customer", "agent"} <= set(settings.telephony_tracks))
        }
        session = Session(
            id=call_id,
            source=self.protocol,
            format=fmt,
            tracks=tracks,
            results_kept=settings.results_kept,
            meta={**meta, "parties": parties, "analysed": sorted(str(t) for t in tracks)},
        )
        streams.open(
            session,
            {
                **settings.pipeline_config().as_dict(),
                "sample_rate": fmt.sample_rate,
                "encoding": fmt.encoding,
            },
        )
        self.session = session
        log.info(
            "call started",
            extra={
                "session_id": call_id,
                "protocol": self.protocol,
                "parties": parties,
                "analysed": sorted(session.meta["analysed"]),
            },
        )

    def audio(self, party: str, data: bytes) -> None:
        assert self.session is not None
        seconds = chunk_seconds(data, self.session.format)
        self.service.metrics.audio_seconds.labels(self.protocol).inc(seconds)
        if party not in self.session.tracks:
            return  # a party that is not analysed (the agent, by default)
        self.session.record_audio(seconds)  # media servers send in real time: no rate limit
        streams = self.service.streams
        assert streams is not None
        try:
            streams.push_audio(self.session, party, data)
        except ProtocolError:
            self.fault("overloaded", "the session's inbox is full; audio dropped")

    def close(self, reason: str) -> None:
        if self.session is not None and not self.session.ended:
            streams = self.service.streams
            assert streams is not None
            streams.end(self.session, reason)


def _twilio(ws: Any, service: Service, token_pending: bool) -> None:
    """``token_pending``: the upgrade carried no token, so ``start`` must (Twilio's <Stream> URL
    takes no query string; a <Parameter name="token"> arrives in ``customParameters``)."""
    call = CallConnection(service, "twilio")
    reorderers: dict[str, Reorderer] = {}
    reason = "connection dropped"
    try:
        while True:
            message = ws.receive()
            if isinstance(message, bytes):
                call.fault("binary_frame", f"{len(message)} bytes where JSON text was expected")
                continue
            try:
                data = json.loads(message)
                event = data["event"]
            except (TypeError, ValueError, KeyError):
                call.fault("bad_json", f"not a JSON event: {str(message)[:80]!r}")
                continue
            if event == "connected":
                call.count("connected")
            elif event == "start":
                call.count("start")
                start = data.get("start") or {}
                fmt_info = start.get("mediaFormat") or {}
                encoding = {"audio/x-mulaw": "mulaw", "audio/x-alaw": "alaw"}.get(
                    fmt_info.get("encoding", "audio/x-mulaw")
                )
                try:
                    if encoding is None:
                        raise AudioFormatError(f"unsupported encoding {fmt_info.get('encoding')}")
                    fmt = AudioFormat(encoding, int(fmt_info.get("sampleRate", 8000)), 1)
                except (AudioFormatError, ValueError) as exc:
                    call.fault("bad_start", str(exc))
                    break
                call_id = str(
                    start.get("callSid") or data.get("streamSid") or start.get("streamSid") or ""
                )
                if not call_id:
                    call.fault("bad_start", "start carries neither callSid nor streamSid")
                    break
                custom = dict(start.get("customParameters") or {})
                token = custom.pop("token", None)  # never stored
                if token_pending and not token_ok(service.settings, token):
                    call.fault("unauthorized", "start without a valid token parameter")
                    break
                tracks = start.get("tracks") or ["inbound"]
                parties = [TWILIO_PARTIES.get(t, t) for t in tracks]
                meta = {
                    "protocol": "twilio",
                    "call_sid": start.get("callSid"),
                    "stream_sid": data.get("streamSid") or start.get("streamSid"),
                    "custom": custom,
                }
                call.open(call_id, fmt, parties, meta)
            elif call.session is None and token_pending:
                call.fault("unauthorized", f"{event!r} before an authenticated start")
                break
            elif event == "media":
                call.count("media")
                media = data.get("media") or {}
                if call.session is None:
                    call.fault("media_before_start", "media arrived before start")
                    continue
                try:
                    payload = base64.b64decode(media["payload"], validate=True)
                    chunk = int(media.get("chunk", 0))
                except (KeyError, TypeError, ValueError, binascii.Error):
                    call.fault("bad_payload", "media without a valid base64 payload or chunk")
                    continue
                if not 0 < len(payload) <= MAX_PAYLOAD_BYTES:
                    call.fault("bad_payload", f"a {len(payload)}-byte payload")
                    continue
                party = TWILIO_PARTIES.get(str(media.get("track", "inbound")), "customer")
                reorder = reorderers.setdefault(party, Reorderer())
                for ordered in reorder.push(chunk, payload) if chunk else [payload]:
                    call.audio(party, ordered)
            elif event in ("dtmf", "mark"):
                call.count(event)
            elif event == "stop":
                call.count("stop")
                if call.session is None:
                    call.fault("stop_without_media", "stop before any start or media")
                reason = "call ended"
                break
            else:
                call.fault("unknown_event", f"event {event!r}")
    except ConnectionClosed:
        call.fault("dropped", "the media server closed the connection without stop")
    finally:
        call.close(reason)
        if any(r.filled for r in reorderers.values()):
            log.info(
                "filled missing chunks with silence",
                extra={
                    "session_id": call.session.id if call.session else None,
                    "filled": {p: r.filled for p, r in reorderers.items()},
                },
            )


def _audiofork(ws: Any, service: Service, args: dict[str, str]) -> None:
    call = CallConnection(service, "audiofork")
    reason = "connection dropped"
    try:
        first = ws.receive()
        meta: dict[str, Any] = {}
        if isinstance(first, str):
            try:
                meta = json.loads(first) if first.strip() else {}
                if not isinstance(meta, dict):
                    raise ValueError("metadata must be a JSON object")
            except ValueError as exc:
                call.fault("bad_metadata", str(exc))
                meta = {}
            first = None
        else:
            call.fault("bad_metadata", "the first frame was audio, not JSON metadata")
        try:
            rate = int(
                meta.get("sample_rate") or args.get("rate") or args.get("sample_rate") or 8000
            )
            mix = str(meta.get("mix") or args.get("mix") or "mono")
            if mix not in ("mono", "mixed", "stereo"):
                raise ValueError(f"mix must be mono, mixed or stereo, got {mix!r}")
            channels = 2 if mix == "stereo" else 1
            fmt = AudioFormat("pcm_s16le", rate, 1)
        except (ValueError, AudioFormatError) as exc:
            call.fault("bad_metadata", str(exc))
            return
        caller = str(meta.get("caller_party", "customer"))
        callee = "agent" if caller == "customer" else "customer"
        parties = {"mono": [caller], "mixed": ["mixed"], "stereo": [caller, callee]}[mix]
        call_id = str(
            meta.get("call_id")
            or meta.get("uuid")
            or meta.get("callSid")
            or args.get("call_id")
            or service.registry.new_id()
        )
        call.open(call_id, fmt, parties, {"protocol": "audiofork", "mix": mix, "metadata": meta})
        frame_bytes = 2 * channels
        remainder = b""
        message = first
        while True:
            if message is None:
                message = ws.receive()
            if isinstance(message, str):
                call.fault("text_frame", "a text frame after the metadata")
                message = None
                continue
            call.count("media")
            data = remainder + message
            usable = len(data) - len(data) % frame_bytes
            data, remainder = data[:usable], data[usable:]
            message = None
            if not data:
                continue
            if channels == 1:
                call.audio(parties[0], data)
            else:
                pcm = np.frombuffer(data, dtype="<i2").reshape(-1, 2)
                for index, party in enumerate(parties):
                    call.audio(party, pcm[:, index].tobytes())
    except ConnectionClosed:
        reason = "call ended"  # the fork ends by closing the socket
        call.count("closed")
    finally:
        call.close(reason)


def register(app: Flask, service: Service) -> None:
    sock = Sock(app)
    settings = service.settings

    @app.before_request
    def telephony_auth() -> tuple[Response, int] | None:
        if request.path == "/telephony/twilio" and not request_token(request):
            request.environ["voxaffect.token_pending"] = settings.auth_required
            return None  # Twilio can send its token only inside the start message
        if request.path.startswith("/telephony/") and not token_ok(
            settings, request_token(request)
        ):
            service.metrics.telephony_events.labels(
                request.path.rsplit("/", 1)[-1], "unauthorized"
            ).inc()
            return jsonify(
                {"error": {"code": "UNAUTHORIZED", "message": "a valid API token is required"}}
            ), 401
        return None

    @sock.route("/telephony/twilio")
    def twilio(ws: Any) -> None:
        service.metrics.connections.labels("telephony").inc()
        try:
            _twilio(ws, service, bool(request.environ.get("voxaffect.token_pending")))
        finally:
            service.metrics.connections.labels("telephony").dec()

    @sock.route("/telephony/audiofork")
    def audiofork(ws: Any) -> None:
        args = dict(request.args)
        service.metrics.connections.labels("telephony").inc()
        try:
            _audiofork(ws, service, args)
        finally:
            service.metrics.connections.labels("telephony").dec()
