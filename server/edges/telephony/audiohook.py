"""Genesys Cloud AudioHook (protocol version 2) at ``/telephony/audiohook``.

Genesys Cloud is the client. Its upgrade carries ``X-API-KEY`` (one of the configured tokens),
``Audiohook-Organization-Id``, ``-Session-Id`` and ``-Correlation-Id``, and, when the integration
has a client secret, an RFC 9421 signature over them (``signatures.py``). Then:

- text frames are JSON messages ``{version: "2", id, type, seq, serverseq, position,
  parameters}``; the server's are ``{version: "2", id, type, seq, clientseq, parameters}``;
- ``open`` offers media; the server answers ``opened`` with the one it chose: stereo PCMU at
  8 kHz first (channel ``external`` = the customer, ``internal`` = the agent), then mono, then L16;
- binary frames carry audio, interleaved by channel, only while the session is open and not
  paused;
- ``ping`` → ``pong``; ``update`` → ``updated``; ``paused`` then ``resumed`` (its ``discarded``
  span) and ``discarded`` put silence in the timeline for audio Genesys did not send (a secure
  pause, a hold) — never more than the time that really passed; ``error`` is counted;
- ``close`` is answered by ``closed`` once the session's summary is committed.

Every message's ``seq`` must be the previous one + 1, its ``serverseq`` no later than the
server's, its ``id`` the session's. A violation — or a frame beyond the limits, or audio out of
turn — is answered with ``disconnect`` (reason ``error``, ``info`` saying why), counted, and the
connection closed; a refused upgrade or open gets reason ``unauthorized`` or ``error``.

With ``customConfig: {"voxaffect": {"events": true}}`` in the integration's configuration,
each window's result goes back to Genesys as an ``event`` whose entity type is
``voxaffect.emotion`` (with ``random_weights`` set when the model has random weights). Genesys
Cloud itself shows only the entity types it knows; the events are for an AudioHook client of
your own or a Genesys-side consumer. Off by default.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, field
from typing import Any

from engine.audio import AudioFormat
from server.edges.telephony.base import Audio, Fault, Gap, Message, Note, Parser, Start, Stop

VERSION = "2"
MAX_TEXT_CHARS = 65_535  # as the reference server: a longer text message is a violation
CHANNEL_PARTIES = {"external": "customer", "internal": "agent"}
ENCODINGS = {"PCMU": "mulaw", "L16": "pcm_s16le"}
EVENT_ENTITY = "voxaffect.emotion"
MAX_CONTINUED = 4  # continuedSessions read at most: each is one store lookup
_DURATION = re.compile(r"PT(?:(\d{1,6})H)?(?:(\d{1,6})M)?(?:(\d{1,9}(?:\.\d{1,9})?)S)?")


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _object(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def duration_s(value: Any) -> float:
    """An ISO 8601 duration as AudioHook writes them (``PT1.25S``), in seconds."""
    match = _DURATION.fullmatch(value) if isinstance(value, str) and value != "PT" else None
    if match is None:
        raise Fault("bad_message", f"{str(value)[:40]!r} is not a duration", fatal=True)
    hours, minutes, seconds = (float(g) if g else 0.0 for g in match.groups())
    return hours * 3600 + minutes * 60 + seconds


def choose_media(offered: Any) -> dict[str, Any] | None:
    """The offered media entry to take: stereo PCMU 8 kHz first, then mono, then L16."""
    if not isinstance(offered, list):
        return None
    usable = []
    for entry in offered[:16]:
        if not isinstance(entry, dict) or entry.get("type") != "audio":
            continue
        channels = entry.get("channels")
        if (
            entry.get("format") not in ENCODINGS
            or entry.get("rate") != 8000
            or not isinstance(channels, list)
            or not 1 <= len(channels) <= 2
            or len(set(map(str, channels))) != len(channels)
            or not set(map(str, channels)) <= set(CHANNEL_PARTIES)
        ):
            continue
        usable.append(entry)
    rank = lambda e: (e["format"] != "PCMU", -len(e["channels"]))  # noqa: E731
    return min(usable, key=rank) if usable else None


@dataclass
class AudioHookParser(Parser):
    name = "audiohook"
    ends_on_close = False  # Genesys says ``close``; a dropped socket waits call_rejoin_s
    session_id: str = ""  # the Audiohook-Session-Id header: every message's id
    headers: dict[str, str] = field(default_factory=dict)  # organization, correlation ids
    state: str = field(default="connecting", init=False)  # open, paused, closing
    events: bool = field(default=False, init=False)  # results go back as ``event`` messages
    frame_bytes: int = field(default=1, init=False)  # one sample of every channel
    _clientseq: int = field(default=0, init=False)
    _seq: int = field(default=0, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    # --- in ------------------------------------------------------------------------------------

    def feed(self, frame: str | bytes) -> list[Message]:
        if isinstance(frame, bytes):
            return self._audio(frame)
        if len(frame) > MAX_TEXT_CHARS:
            raise Fault("oversized", "Text message too large", fatal=True)
        try:
            message = json.loads(frame)
        except (ValueError, RecursionError):
            raise Fault("bad_json", "a text message that is not JSON", fatal=True) from None
        if not isinstance(message, dict):
            raise Fault("bad_json", "a message must be a JSON object", fatal=True)
        kind, params = self._check(message)
        handler = getattr(self, f"_on_{kind}", None)
        if handler is None:
            raise Fault("unknown_message", f"message type {kind[:40]!r}", fatal=True)
        out: list[Message] = handler(params)
        return out

    def _check(self, message: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        kind, seq, serverseq = message.get("type"), message.get("seq"), message.get("serverseq")
        params = message.get("parameters", {})
        if message.get("version") != VERSION or not isinstance(kind, str):
            raise Fault("bad_message", "not an AudioHook version 2 message", fatal=True)
        if not isinstance(params, dict):
            raise Fault("bad_message", "parameters must be an object", fatal=True)
        if not _integer(seq) or not _integer(serverseq):
            raise Fault("bad_message", "seq and serverseq must be integers", fatal=True)
        assert isinstance(seq, int) and isinstance(serverseq, int)
        if seq != self._clientseq + 1:
            raise Fault("seq_gap", f"seq {seq} after {self._clientseq}", fatal=True)
        if serverseq > self._seq:
            raise Fault("seq_gap", f"serverseq {serverseq} is ahead of {self._seq}", fatal=True)
        if not self.session_id:
            self.session_id = str(message.get("id"))[:128]
        if message.get("id") != self.session_id:
            raise Fault("bad_message", "the message's id is not this session's", fatal=True)
        self._clientseq = seq
        return kind, params

    def _audio(self, frame: bytes) -> list[Message]:
        if self.state != "open":
            raise Fault("audio_out_of_turn", f"audio while the session is {self.state}", fatal=True)
        if len(frame) > self.max_frame_bytes:
            raise Fault("oversized", f"a {len(frame)}-byte audio frame", fatal=True)
        if len(frame) % self.frame_bytes:
            raise Fault("bad_payload", f"{len(frame)} bytes is not whole samples", fatal=True)
        return [Note("media"), Audio(frame)] if frame else []

    def _on_open(self, params: dict[str, Any]) -> list[Message]:
        if self.state != "connecting":
            raise Fault("bad_message", "a second open", fatal=True)
        media = choose_media(params.get("media"))
        if media is None:
            raise Fault("no_media", "no offered media is PCMU or L16 at 8 kHz", fatal=True)
        channels = [str(c) for c in media["channels"]]
        encoding = ENCODINGS[media["format"]]
        fmt = AudioFormat(encoding, 8000, 1)
        self.frame_bytes = len(channels) * (2 if encoding == "pcm_s16le" else 1)
        custom = _object(params.get("customConfig"))
        self.events = _object(custom.get("voxaffect")).get("events") is True
        self.state = "open"
        meta = {
            "protocol": "audiohook",
            "organization_id": params.get("organizationId"),
            "conversation_id": params.get("conversationId"),
            "participant": params.get("participant"),
            "language": params.get("language"),
            "custom_config": custom,
            "continued_sessions": params.get("continuedSessions"),
            "correlation_id": self.headers.get("correlation_id"),
            "media": media,
            "events": self.events,
        }
        opened = {"type": "opened", "parameters": {"startPaused": False, "media": [media]}}
        continued = params.get("continuedSessions")
        continues = tuple(
            str(c["id"])[:128]
            for c in (continued if isinstance(continued, list) else [])[:MAX_CONTINUED]
            if isinstance(c, dict) and "id" in c
        )
        parties = [CHANNEL_PARTIES[c] for c in channels]
        return [
            Note("open"),
            Start(self.session_id, fmt, parties, meta, answer=(opened,), continues=continues),
        ]

    def _on_ping(self, params: dict[str, Any]) -> list[Message]:
        return [Note("ping", answer=({"type": "pong", "parameters": {}},))]

    def _on_update(self, params: dict[str, Any]) -> list[Message]:
        return [Note("update", answer=({"type": "updated", "parameters": {}},))]

    def _on_paused(self, params: dict[str, Any]) -> list[Message]:
        self._require("open", "paused")
        self.state = "paused"
        return [Note("paused")]

    def _on_resumed(self, params: dict[str, Any]) -> list[Message]:
        self._require("paused", "resumed")
        self.state = "open"
        return [Note("resumed"), Gap(duration_s(params.get("discarded", "PT0S")))]

    def _on_discarded(self, params: dict[str, Any]) -> list[Message]:
        self._require("open", "discarded")
        return [Note("discarded"), Gap(duration_s(params.get("discarded", "PT0S")))]

    def _on_error(self, params: dict[str, Any]) -> list[Message]:
        detail = f"client error {str(params.get('code'))[:8]}: {str(params.get('message'))[:120]}"
        return [Fault("client_error", detail)]

    def _on_close(self, params: dict[str, Any]) -> list[Message]:
        if self.state == "connecting":
            raise Fault("bad_message", "close before open", fatal=True)
        self.state = "closing"
        reason = str(params.get("reason", "end"))[:20]
        return [
            Note("close"),
            Stop(
                "call ended" if reason == "end" else f"closed: {reason}",
                answer=({"type": "closed", "parameters": {}},),
            ),
        ]

    def _require(self, state: str, kind: str) -> None:
        if self.state != state:
            raise Fault("bad_message", f"{kind} while the session is {self.state}", fatal=True)

    # --- out -----------------------------------------------------------------------------------

    def encode(self, message: dict[str, Any] | str | bytes) -> str | bytes:
        """A server message as sent: numbered here, so that frames go out in ``seq`` order
        (the caller holds its send lock)."""
        if not isinstance(message, dict):
            return message
        with self._lock:
            self._seq += 1
            return json.dumps(
                {
                    "version": VERSION,
                    "type": message["type"],
                    "seq": self._seq,
                    "clientseq": self._clientseq,
                    "id": self.session_id,
                    "parameters": message["parameters"],
                }
            )

    def hand_off(self) -> list[Any]:
        """``reconnect``: Genesys closes this session (reason ``reconnect``) and opens a new
        one whose ``continuedSessions`` names this one; any node then continues the call."""
        info = "this server is restarting; reconnect to continue"
        return [{"type": "reconnect", "parameters": {"info": info}}]

    def refusal(self, detail: str, reason: str) -> list[Any]:
        why = "unauthorized" if reason == "unauthorized" else "error"
        return [{"type": "disconnect", "parameters": {"reason": why, "info": detail[:200]}}]

    def result(self, result: dict[str, Any]) -> Any:
        if not self.events or self.state == "connecting":  # (until closed: the last windows)
            return None
        data = {k: v for k, v in result.items() if k != "session_id"}
        entity = {"type": EVENT_ENTITY, "data": data}
        return {"type": "event", "parameters": {"entities": [entity]}}
