"""What a media-server protocol is to the call loop: a parser of frames into typed messages.

Each provider module (``twilio``, ``audiofork``, ``jambonz``, ``audiohook``, ``audiosocket``) is a
small pure ``Parser``: frames in (text or bytes, as the WebSocket or the TCP reader gives them),
messages out, and — where the protocol answers — the frames to send back. It knows nothing of
sessions, sockets or threads; ``calls.CallStream`` does the rest once, for every provider.

A parser raises ``Fault`` for a bad frame (``fatal``: the stream cannot go on), or returns a
``Fault`` among its messages when a frame is half usable (a fork's metadata that is not JSON: the
audio still counts). A parser's state is bounded by the protocol, never by a number a client
chose.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

from engine.audio import AudioFormat

# The silence of one sample in each telephony encoding, to fill a gap or a pause with.
SILENCE = {"mulaw": b"\xff", "alaw": b"\xd5", "pcm_s16le": b"\x00\x00"}


class Fault(Exception):
    """A malformed frame from a media server; ``kind`` is counted as a telephony event."""

    def __init__(self, kind: str, detail: str, *, fatal: bool = False) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail
        self.fatal = fatal


class Refused(Exception):
    """The stream cannot go on (a bad start, a duplicate call, no token); it is closed."""

    def __init__(self, detail: str, reason: str = "error") -> None:
        super().__init__(detail)
        self.reason = reason  # what the protocol calls it (AudioHook: error or unauthorized)


@dataclass(frozen=True, slots=True)
class Start:
    """The call's first word: its id, format and parties (in channel order)."""

    call_id: Any  # checked by the one session-id rule; None: the server names the call
    fmt: AudioFormat  # one channel's format
    parties: list[str]  # customer, agent or mixed; one per channel of an interleaved Audio
    meta: dict[str, Any]  # stored with the session (phone numbers pseudonymised first)
    token: str | None = None  # a token inside the protocol (a Twilio <Parameter>); never stored
    answer: tuple[Any, ...] = ()  # sent once the session is open (AudioHook ``opened``)
    continues: tuple[str, ...] = ()  # ids of earlier connections' calls this one continues


@dataclass(frozen=True, slots=True)
class Audio:
    """Audio in the start's format: one party's (``party``), or every party's interleaved."""

    data: bytes
    party: str | None = None


@dataclass(frozen=True, slots=True)
class Gap:
    """``seconds`` of the call that carry no audio (a pause): silence in the timeline, never
    more than the time that really passed."""

    seconds: float


@dataclass(frozen=True, slots=True)
class Note:
    """Something the protocol said that only counts (connected, dtmf, mark, ping)."""

    kind: str
    answer: tuple[Any, ...] = ()  # sent back at once (AudioHook ``pong``)


@dataclass(frozen=True, slots=True)
class Stop:
    """The call is over. ``answer`` is sent once its summary is committed."""

    reason: str = "call ended"
    answer: tuple[Any, ...] = ()


Message = Start | Audio | Gap | Note | Stop | Fault


@dataclass
class Parser:
    """One connection's protocol state. Subclasses set ``name`` and implement ``feed``."""

    name: ClassVar[str] = ""
    # Whether the socket closing ends the call (a fork, jambonz, AudioSocket), or the call
    # waits ``call_rejoin_s`` for a new connection (Twilio and AudioHook say when they stop).
    ends_on_close: ClassVar[bool] = True
    max_frame_bytes: int = 65_536
    started: bool = field(default=False, init=False)

    def feed(self, frame: str | bytes) -> list[Message]:
        raise NotImplementedError

    def encode(self, answer: Any) -> str | bytes:
        """An answer (the ``answer`` of a message, a refusal, a result) as the frame sent; the
        caller holds the connection's send lock, so a numbering protocol numbers in order."""
        assert isinstance(answer, str | bytes)
        return answer

    def hand_off(self) -> list[Any]:
        """What asks the media server to reconnect (this node drains; another continues the
        call); none if the protocol has no such message: the connection is then closed with
        1012, service restart."""
        return []

    def refusal(self, detail: str, reason: str) -> list[Any]:
        """Answers to send before the connection is closed for ``detail``."""
        return []

    def result(self, result: dict[str, Any]) -> Any:
        """An answer carrying one window's result back to the media server, if it wants them."""
        return None

    def report(self) -> dict[str, Any]:
        """What the connection did that is worth a log line when it ends."""
        return {}


def json_object(frame: str | bytes, kind: str, what: str) -> dict[str, Any]:
    """``frame`` as a JSON object, or Fault(``kind``)."""
    if isinstance(frame, bytes):
        raise Fault("binary_frame", f"{len(frame)} bytes where {what} was expected")
    try:
        data = json.loads(frame)
    except (ValueError, RecursionError):
        raise Fault(kind, f"{what} is not JSON: {frame[:80]!r}") from None
    if not isinstance(data, dict):
        raise Fault(kind, f"{what} must be a JSON object")
    return data
