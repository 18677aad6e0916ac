"""FreeSWITCH ``mod_audio_fork`` / ``mod_audio_stream`` at ``/telephony/audiofork``.

A JSON metadata text frame, then binary L16 frames at 8 or 16 kHz (or the rate in the metadata
or the URL's ``rate``); ``mix`` (metadata or URL) is ``mono`` (the caller), ``stereo`` (the caller
left, the callee right) or ``mixed`` (both voices in one channel: analysed only when agent
analysis is enabled). The caller is the customer unless the metadata says
``"caller_party": "agent"``. The fork ends the call by closing its socket.

``ForkParser`` is the shape every "JSON first, then raw L16" provider shares (jambonz too).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from engine.audio import AudioFormat, AudioFormatError
from server.edges.telephony.base import Audio, Fault, Message, Note, Parser, Start, json_object

MIXES = ("mono", "mixed", "stereo")


def fork_parties(mix: str, caller_party: Any) -> list[str]:
    """The parties of a fork's channels: the caller first, then the callee."""
    caller = "agent" if caller_party == "agent" else "customer"
    callee = "agent" if caller == "customer" else "customer"
    return {"mono": [caller], "mixed": ["mixed"], "stereo": [caller, callee]}[mix]


def fork_format(rate: Any, mix: Any) -> tuple[AudioFormat, str]:
    try:
        mix = str(mix or "mono")
        if mix not in MIXES:
            raise ValueError(f"mix must be mono, mixed or stereo, got {mix[:20]!r}")
        return AudioFormat("pcm_s16le", int(rate or 8000), 1), mix
    except (ValueError, TypeError, OverflowError, AudioFormatError) as exc:
        raise Fault("bad_metadata", str(exc)[:200], fatal=True) from None


@dataclass
class ForkParser(Parser):
    """A JSON metadata frame, then binary L16 audio (interleaved when stereo)."""

    args: dict[str, str] = field(default_factory=dict)  # the upgrade URL's query

    def start(self, meta: dict[str, Any]) -> Start:
        raise NotImplementedError

    def text(self, frame: str) -> list[Message]:
        """A text frame after the metadata."""
        return [Fault("text_frame", "a text frame after the metadata")]

    def feed(self, frame: str | bytes) -> list[Message]:
        if not self.started:
            self.started = True
            if isinstance(frame, bytes):
                fault = Fault("bad_metadata", "the first frame was audio, not JSON metadata")
                return [fault, self.start({}), *self.feed(frame)]  # the frame is audio
            try:
                meta = json_object(frame, "bad_metadata", "the metadata frame") if frame else {}
            except Fault as fault:
                return [fault, self.start({})]
            return [self.start(meta)]
        if isinstance(frame, str):
            return self.text(frame)
        if not frame:
            return []
        if len(frame) > self.max_frame_bytes:
            raise Fault("oversized", f"a {len(frame)}-byte frame")
        return [Note("media"), Audio(frame)]


@dataclass
class AudioForkParser(ForkParser):
    name = "audiofork"

    def start(self, meta: dict[str, Any]) -> Start:
        args = self.args
        fmt, mix = fork_format(
            meta.get("sample_rate") or args.get("rate") or args.get("sample_rate"),
            meta.get("mix") or args.get("mix"),
        )
        call_id = meta.get("call_id") or meta.get("uuid") or meta.get("callSid")
        return Start(
            call_id or args.get("call_id"),
            fmt,
            fork_parties(mix, meta.get("caller_party")),
            {"protocol": "audiofork", "mix": mix, "metadata": meta},
        )
