"""Asterisk AudioSocket over TCP (``--audiosocket-port``): the dialplan's ``AudioSocket()``.

Every frame is a 1-byte type, a 2-byte big-endian payload length, then the payload:

- ``0x00`` hangup; ``0x01`` the call's UUID (16 bytes, first); ``0x03`` a DTMF digit;
- ``0x10`` signed linear 16-bit little-endian mono at 8 kHz, and in newer Asterisk ``0x11``-``0x16``
  at 12, 16, 24, 32, 44.1 and 48 kHz (``0x17``/``0x18``, 96 and 192 kHz, are refused: the engine
  takes 48 kHz at most);
- ``0xff`` an error (its payload: 1 hangup, 2 frame forwarding, 4 memory).

The call is the customer's channel (``telephony_tracks`` must hold customer). AudioSocket has no
authentication at all: the listener binds ``audiosocket_host`` (127.0.0.1 by default) and must
stay on a private network the PBX shares. The call ends on hangup or when the socket closes.
``AudioSocketConnection`` gives the shared call loop a WebSocket's receive/send/close.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from simple_websocket import ConnectionClosed

from engine.audio import AudioFormat
from server.edges.telephony.base import Audio, Fault, Message, Note, Parser, Start, Stop

HEADER = struct.Struct(">BH")
HANGUP, UUID, DTMF, ERROR = 0x00, 0x01, 0x03, 0xFF
RATES = {0x10: 8000, 0x11: 12000, 0x12: 16000, 0x13: 24000, 0x14: 32000, 0x15: 44100, 0x16: 48000}
TOO_FAST = {0x17: 96000, 0x18: 192000}
ERRORS = {0x01: "hangup", 0x02: "frame forwarding", 0x04: "memory"}


def frame(kind: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(kind, len(payload)) + payload


@dataclass
class AudioSocketParser(Parser):
    name = "audiosocket"
    call_id: str | None = field(default=None, init=False)
    rate: int | None = field(default=None, init=False)

    def feed(self, data: str | bytes) -> list[Message]:
        if isinstance(data, str) or len(data) < HEADER.size:
            raise Fault("bad_frame", "a frame shorter than its header", fatal=True)
        kind, length = HEADER.unpack_from(data)
        payload = data[HEADER.size :]
        if len(payload) != length:
            raise Fault("bad_frame", f"a {length}-byte frame holding {len(payload)}", fatal=True)
        if kind == UUID:
            if self.call_id is not None or length != 16:
                raise Fault("bad_uuid", "a second UUID, or one not 16 bytes", fatal=True)
            self.call_id = str(uuid.UUID(bytes=payload))
            return [Note("uuid")]
        if kind == HANGUP:
            return [Note("hangup"), Stop("call ended")]
        if kind == DTMF:
            return [Note("dtmf")]
        if kind == ERROR:
            code = payload[0] if payload else 0
            return [Fault("client_error", f"Asterisk error: {ERRORS.get(code, hex(code))}")]
        if kind in TOO_FAST:
            detail = f"{TOO_FAST[kind]} Hz audio; the engine takes 48000 Hz at most"
            raise Fault("unsupported_rate", detail, fatal=True)
        if kind not in RATES:
            return [Fault("unknown_frame", f"frame type {kind:#04x}")]
        return self._audio(RATES[kind], payload)

    def _audio(self, rate: int, payload: bytes) -> list[Message]:
        if self.call_id is None:
            raise Fault("audio_before_uuid", "audio before the UUID frame", fatal=True)
        if len(payload) % 2 or not payload:
            return [Fault("bad_payload", f"{len(payload)} bytes is not whole samples")]
        out: list[Message] = [Note("media")]
        if self.rate is None:
            self.rate, self.started = rate, True
            fmt = AudioFormat("pcm_s16le", rate, 1)
            out.append(Start(self.call_id, fmt, ["customer"], {"protocol": "audiosocket"}))
        elif rate != self.rate:
            return [Fault("rate_change", f"{rate} Hz audio in a {self.rate} Hz call; dropped")]
        return [*out, Audio(payload, "customer")]


class AudioSocketConnection:
    """A TCP connection from Asterisk as the call loop sees a WebSocket: ``receive`` gives one
    whole frame (or None after ``timeout``), ``close`` hangs up. A frame is 65,538 bytes at most
    by its header, so nothing a client sends grows the buffer beyond that."""

    max_message_size = 0  # (the loop asks; AudioSocket frames are bounded by their header)

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = bytearray()
        self.closed = False

    def _frame(self) -> bytes | None:
        if len(self._buffer) < HEADER.size:
            return None
        _, length = HEADER.unpack_from(self._buffer)
        end = HEADER.size + length
        if len(self._buffer) < end:
            return None
        out = bytes(self._buffer[:end])
        del self._buffer[:end]
        return out

    def receive(self, timeout: float | None = None) -> bytes | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (ready := self._frame()) is None:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return None
            self._sock.settimeout(remaining)
            try:
                data = self._sock.recv(HEADER.size + 0xFFFF - len(self._buffer))
            except TimeoutError:
                return None
            except OSError as exc:
                raise ConnectionClosed(1006, str(exc)) from None
            if not data:
                raise ConnectionClosed(1000, "the PBX closed the socket")
            self._buffer += data
        return ready

    def send(self, data: str | bytes) -> None:
        if isinstance(data, bytes):
            self._sock.sendall(data)

    def close(self, reason: Any = None, message: Any = None) -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(OSError):
            self._sock.settimeout(1.0)
            self._sock.sendall(frame(HANGUP))
        with contextlib.suppress(OSError):
            self._sock.close()
