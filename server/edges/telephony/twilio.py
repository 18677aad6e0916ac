"""Twilio Media Streams (also Telnyx, SignalWire, Fonoster) at ``/telephony/twilio``.

JSON text messages: ``connected``, ``start``, ``media`` (base64 µ-law at 8 kHz, ~20 ms each,
``track`` inbound = the caller = customer, outbound = the agent), ``dtmf``, ``mark``, ``stop``.
Media is put back in ``chunk`` order (frame order is not guaranteed): a chunk still missing once
``twilio_reorder_chunks`` later ones are here is replaced by silence, so the timeline keeps its
length. A jump further ahead than that is a counted fault; the silence put in for it never
exceeds the time that really passed (nor ``MAX_GAP_FILL_S``): a chunk number chosen by the client
never decides how much memory or time the server spends.

The upgrade is authenticated by ``X-Twilio-Signature`` (with ``twilio_auth_token``; see
``signatures.py``), by a token, or — since a <Stream> URL takes no query string — by a
``<Parameter name="token">`` that arrives in ``start.customParameters`` (never stored).
"""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from engine.audio import AudioFormat, AudioFormatError
from server.edges.protocol import valid_id
from server.edges.telephony.base import (
    SILENCE,
    Audio,
    Fault,
    Message,
    Note,
    Parser,
    Start,
    Stop,
    json_object,
)

PARTIES = {"inbound": "customer", "outbound": "agent"}
CHUNK_S = 0.02  # Twilio sends 20 ms of audio per media message
MAX_GAP_FILL_S = 10.0  # silence put in for one gap in the chunk numbers, at most
ENCODINGS = {"audio/x-mulaw": "mulaw", "audio/x-alaw": "alaw"}


class Reorderer:
    """Releases one track's chunks in ``chunk`` order; fills a stale gap with silence. What
    went wrong is in ``faults`` until the caller takes it."""

    def __init__(
        self,
        window: int,
        clock: Callable[[], float] = time.monotonic,
        silence: bytes = SILENCE["mulaw"],
    ) -> None:
        self.window = window
        self.faults: list[Fault] = []
        self._clock = clock
        self._silence = silence
        self.next = 1
        self.pending: dict[int, bytes] = {}
        self.filled = 0
        self._last_at: float | None = None

    def push(self, chunk: int, payload: bytes) -> list[bytes]:
        now = self._clock()
        last_at, self._last_at = self._last_at, now
        if chunk < self.next or chunk in self.pending:
            self.faults.append(
                Fault("late_chunk", f"chunk {chunk} is a duplicate or came too late")
            )
            return []
        out: list[bytes] = []
        if chunk - self.next > self.window:
            # Far ahead: a jump, not reordering. Release what is held, put in silence for at
            # most the time that passed since the last chunk, and carry on from this one.
            gap = chunk - self.next
            self.faults.append(Fault("chunk_gap", f"chunk {chunk} is {gap} ahead of {self.next}"))
            elapsed = 0.0 if last_at is None else now - last_at
            fill = int(min(gap, min(elapsed, MAX_GAP_FILL_S) / CHUNK_S))
            out += [self.pending[k] for k in sorted(self.pending)]
            if fill:
                out.append(self._silence * (len(payload) * fill))
                self.filled += fill
            self.pending.clear()
            self.next = chunk
        self.pending[chunk] = payload
        while True:
            if self.next in self.pending:
                out.append(self.pending.pop(self.next))
                self.next += 1
            elif self.pending and max(self.pending) - self.next >= self.window:
                out.append(self._silence * len(self.pending[min(self.pending)]))
                self.filled += 1
                self.next += 1
            else:
                return out


@dataclass(frozen=True, slots=True)
class Media:
    party: str
    chunk: int  # 0: the stream numbers no chunks
    payload: bytes


def parse_event(frame: str | bytes) -> tuple[str, dict[str, Any]]:
    data = json_object(frame, "bad_json", "a JSON event")
    event = data.get("event")
    if not isinstance(event, str):
        raise Fault("bad_json", f"event is {type(event).__name__}, not a name")
    return event, data


def parse_start(data: dict[str, Any]) -> Start:
    start = data.get("start")
    if not isinstance(start, dict):
        raise Fault("bad_start", "start without a start object", fatal=True)
    fmt_info = start.get("mediaFormat") or {}
    if not isinstance(fmt_info, dict):
        raise Fault("bad_start", "mediaFormat is not an object", fatal=True)
    encoding = ENCODINGS.get(str(fmt_info.get("encoding", "audio/x-mulaw")))
    try:
        if encoding is None:
            raise AudioFormatError(f"unsupported encoding {str(fmt_info.get('encoding'))[:40]!r}")
        fmt = AudioFormat(encoding, int(fmt_info.get("sampleRate", 8000)), 1)
    except (AudioFormatError, ValueError, TypeError, OverflowError) as exc:
        raise Fault("bad_start", str(exc)[:200], fatal=True) from None
    stream_sid = data.get("streamSid") or start.get("streamSid")
    call_id = start.get("callSid") or stream_sid
    if not call_id:
        raise Fault("bad_start", "start carries neither callSid nor streamSid", fatal=True)
    custom = start.get("customParameters") or {}
    if not isinstance(custom, dict):
        raise Fault("bad_start", "customParameters is not an object", fatal=True)
    custom = dict(custom)
    token = custom.pop("token", None)  # never stored
    tracks = start.get("tracks") or ["inbound"]
    if not isinstance(tracks, list):
        raise Fault("bad_start", "tracks is not a list", fatal=True)
    parties = list(dict.fromkeys(PARTIES.get(str(t), str(t)[:32]) for t in tracks[:4]))
    meta = {
        "protocol": "twilio",
        "call_sid": start.get("callSid") if valid_id(start.get("callSid")) else None,
        "stream_sid": stream_sid if valid_id(stream_sid) else None,
        "custom": custom,
    }
    return Start(call_id, fmt, parties, meta, token if isinstance(token, str) else None)


def parse_media(data: dict[str, Any], max_bytes: int) -> Media:
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
    party = PARTIES.get(str(media.get("track", "inbound")), "customer")
    return Media(party, chunk, payload)


@dataclass
class TwilioParser(Parser):
    name = "twilio"
    ends_on_close = False  # Twilio says ``stop``; a dropped socket may be a network blip
    reorder_chunks: int = 5
    clock: Callable[[], float] = time.monotonic
    _reorderers: dict[str, Reorderer] = field(default_factory=dict, init=False)
    _silence: bytes = field(default=SILENCE["mulaw"], init=False)

    def feed(self, frame: str | bytes) -> list[Message]:
        event, data = parse_event(frame)
        if event == "start":
            if self.started:  # one call per media connection
                raise Fault("second_start", "a second start on this connection")
            start = parse_start(data)
            self.started = True
            self._silence = SILENCE[start.fmt.encoding]
            return [Note("start"), start]
        if event == "media":
            if not self.started:
                return [Note("media"), Fault("media_before_start", "media arrived before start")]
            media = parse_media(data, self.max_frame_bytes)
            return [Note("media"), *self._ordered(media)]
        if event in ("connected", "dtmf", "mark"):
            return [Note(event)]
        if event == "stop":
            return [Note("stop"), Stop("call ended")]
        raise Fault("unknown_event", f"event {event[:40]!r}")

    def _ordered(self, media: Media) -> list[Message]:
        if media.chunk == 0:  # no chunk numbers: in arrival order
            return [Audio(media.payload, media.party)]
        reorder = self._reorderers.get(media.party)
        if reorder is None:
            reorder = self._reorderers[media.party] = Reorderer(
                self.reorder_chunks, self.clock, self._silence
            )
        audio = [Audio(p, media.party) for p in reorder.push(media.chunk, media.payload)]
        faults, reorder.faults = reorder.faults, []
        return [*faults, *audio]

    def report(self) -> dict[str, Any]:
        filled = {p: r.filled for p, r in self._reorderers.items() if r.filled}
        return {"filled_chunks": filled} if filled else {}
