"""The Socket.IO protocol's payloads, validated once at the edge, and its error codes.

Every malformed message becomes a :class:`ProtocolError` with a code from ``ERROR_CODES`` and a
message that names the bad value; the handlers turn it into an ``error`` event.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import soundfile as sf

from engine.audio import MAX_RATE, MIN_RATE, RAW_BYTES_PER_SAMPLE, AudioFormat, AudioFormatError

ERROR_CODES = (
    "INVALID_MESSAGE",  # not an object, a missing or mistyped field
    "INVALID_AUDIO",
    "UNSUPPORTED_ENCODING",
    "PAYLOAD_TOO_LARGE",
    "UNKNOWN_SESSION",
    "SESSION_EXISTS",  # a client-chosen id that is live or stored already
    "SESSION_OPEN",  # deleting a session that has not ended
    "RATE_LIMITED",
    "SESSION_LIMIT",
    "OVERLOADED",  # saturated, with saturation_policy=refuse: retry after retry_after_s
    "DRAINING",  # this node is shutting down: start the session on another one
    "UNAUTHORIZED",
    "INFERENCE_TIMEOUT",
    "INFERENCE_FAILED",
    "NOT_FOUND",  # HTTP: no such route
    "METHOD_NOT_ALLOWED",  # HTTP: the route takes another method
)
_SESSION_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class ProtocolError(Exception):
    def __init__(
        self,
        code: str,
        message: str,
        session_id: str | None = None,
        *,
        retry_after_s: float | None = None,
    ) -> None:
        assert code in ERROR_CODES, code
        super().__init__(message)
        self.code = code
        self.message = message
        self.session_id = session_id
        self.retry_after_s = retry_after_s

    def payload(self) -> dict[str, Any]:
        out: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.session_id:
            out["session_id"] = self.session_id
        if self.retry_after_s is not None:
            out["retry_after_s"] = self.retry_after_s
        return out


def _object(data: Any, event: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ProtocolError(
            "INVALID_MESSAGE", f"{event} takes a JSON object, got {type(data).__name__}"
        )
    return data


def valid_id(value: Any) -> bool:
    """A session id from any source (Socket.IO, a call's callSid or uuid): 1-128 letters, digits
    or ``._:-``. Ids end up in URLs, file names, headers and rooms: nothing else gets in."""
    return isinstance(value, str) and bool(_SESSION_ID.fullmatch(value))


def describe_id(value: Any) -> str:
    """A bad id, shortened for a message or a log line."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def session_id_of(data: Any, event: str, *, required: bool = True) -> str | None:
    value = _object(data, event).get("session_id")
    if value is None and not required:
        return None
    if not valid_id(value):
        raise ProtocolError(
            "INVALID_MESSAGE",
            f"{event} needs session_id: 1-128 letters, digits or ._:- (got {describe_id(value)})",
        )
    return value


@dataclass(frozen=True, slots=True)
class StartSession:
    session_id: str | None
    format: AudioFormat
    resume_token: str | None
    since_seq: int
    embeddings: bool
    utterances: bool = True  # False: this session wants no utterance_result


def parse_start(data: Any) -> StartSession:
    data = _object(data if data is not None else {}, "start_session")
    session_id = session_id_of(data, "start_session", required=False)
    token = data.get("resume_token")
    if token is not None and not isinstance(token, str):
        raise ProtocolError("INVALID_MESSAGE", "resume_token must be a string")
    since = data.get("since_seq", 0)
    if isinstance(since, bool) or not isinstance(since, int) or since < 0:
        raise ProtocolError(
            "INVALID_MESSAGE", f"since_seq must be a whole number >= 0, got {since!r}"
        )
    options = data.get("options") or {}
    if not isinstance(options, dict):
        raise ProtocolError("INVALID_MESSAGE", "options must be an object")
    rate = data.get("sample_rate", 16000)
    encoding = data.get("encoding", "pcm_s16le")
    channels = data.get("channels", 1)
    if not isinstance(encoding, str):
        raise ProtocolError("UNSUPPORTED_ENCODING", f"encoding must be a string, got {encoding!r}")
    try:
        fmt = AudioFormat(encoding, rate, channels)
    except AudioFormatError as exc:
        raise ProtocolError(exc.code, str(exc)) from None
    utterances = options.get("utterances", True)
    if not isinstance(utterances, bool):
        raise ProtocolError("INVALID_MESSAGE", "options.utterances must be true or false")
    return StartSession(
        session_id, fmt, token, since, bool(options.get("embeddings", False)), utterances
    )


def parse_chunk(data: Any, max_bytes: int) -> tuple[str, bytes]:
    """(session_id, raw audio bytes) of an audio_stream message."""
    data = _object(data, "audio_stream")
    session_id = session_id_of(data, "audio_stream")
    assert session_id is not None
    chunk = data.get("chunk")
    if isinstance(chunk, bytes | bytearray):
        raw = bytes(chunk)
    elif isinstance(chunk, str):
        if len(chunk) > max_bytes * 4 // 3 + 4:
            raise ProtocolError("PAYLOAD_TOO_LARGE", f"chunk exceeds {max_bytes} bytes", session_id)
        try:
            raw = base64.b64decode(chunk, validate=True)
        except (binascii.Error, ValueError):
            raise ProtocolError("INVALID_AUDIO", "chunk is not valid base64", session_id) from None
    elif chunk is None:
        raise ProtocolError("INVALID_MESSAGE", "audio_stream needs chunk", session_id)
    else:
        raise ProtocolError(
            "INVALID_MESSAGE",
            f"chunk must be base64 text or bytes, got {type(chunk).__name__}",
            session_id,
        )
    if len(raw) > max_bytes:
        raise ProtocolError(
            "PAYLOAD_TOO_LARGE", f"chunk of {len(raw)} bytes exceeds {max_bytes}", session_id
        )
    if not raw:
        raise ProtocolError("INVALID_AUDIO", "empty audio chunk", session_id)
    return session_id, raw


def chunk_seconds(data: bytes, fmt: AudioFormat) -> float:
    """Audio duration of a chunk, from its size (or a wav chunk's header, which must be valid:
    its rate decides how much audio the chunk claims to hold)."""
    if fmt.encoding != "wav":
        return len(data) / (RAW_BYTES_PER_SAMPLE[fmt.encoding] * fmt.channels * fmt.sample_rate)
    try:
        info = sf.info(io.BytesIO(data))
    except Exception:  # libsndfile reports several unrelated types for garbage
        raise ProtocolError("INVALID_AUDIO", "unreadable wav chunk") from None
    if not MIN_RATE <= info.samplerate <= MAX_RATE:
        raise ProtocolError(
            "INVALID_AUDIO",
            f"wav chunk sample rate {info.samplerate} Hz is outside {MIN_RATE}-{MAX_RATE} Hz",
        )
    return float(info.frames) / info.samplerate


FLOOD_FACTOR = 5.0  # dropped messages in one second, as a multiple of the rate: cut off


class MessageRate:
    """How many messages one connection may send: ``per_s`` a second, twice that at once (a
    token bucket). A message beyond is dropped, whatever it holds: ``take`` says ``drop``, or
    ``tell`` at most once a second (the sender gets one RATE_LIMITED error, not one each), or
    ``cut`` once it has had ``FLOOD_FACTOR`` times the rate dropped within one second — parsing
    a flood costs the server CPU even when its messages are dropped. A client's message count
    decides neither the server's memory nor how much of its time it takes."""

    def __init__(self, per_s: float, clock: Callable[[], float]) -> None:
        self.per_s = per_s
        self._clock = clock
        self._tokens = 2 * per_s
        self._at = clock()
        self._told_at = float("-inf")
        self._second = self._at
        self._dropped_this_second = 0

    def take(self) -> str:
        now = self._clock()
        self._tokens = min(2 * self.per_s, self._tokens + (now - self._at) * self.per_s)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return "ok"
        if now - self._second >= 1.0:
            self._second, self._dropped_this_second = now, 0
        self._dropped_this_second += 1
        if self._dropped_this_second > FLOOD_FACTOR * self.per_s:
            return "cut"
        if now - self._told_at >= 1.0:
            self._told_at = now
            return "tell"
        return "drop"
