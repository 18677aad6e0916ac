"""jambonz ``listen`` at ``/telephony/jambonz`` (and SIPREC, with jambonz as the SIPREC server).

The WebSocket subprotocol is ``audio.jambonz.org``. The first text frame is JSON: the call's
attributes as jambonz sends them on a webhook (``callSid``, ``from``, ``to``, ``direction``,
``callId``, ``accountSid``, …), ``sampleRate`` and ``mixType``, plus the verb's ``metadata``. Then
binary frames of 16-bit little-endian PCM: ``mono`` (the caller), ``stereo`` (both legs of the
bridge: the caller left, the callee right) or ``mixed``. With ``passDtmf``, digits arrive as text
frames ``{"event": "dtmf", "dtmf": "5", "duration": …}``; they are counted. The caller is the
customer unless the verb's metadata says ``"caller_party": "agent"`` (an outbound campaign).
The call ends when jambonz closes the socket.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from server.edges.telephony.audiofork import ForkParser, fork_format, fork_parties
from server.edges.telephony.base import Fault, Message, Note, Start

SUBPROTOCOL = "audio.jambonz.org"


@dataclass
class JambonzParser(ForkParser):
    name = "jambonz"

    def start(self, meta: dict[str, Any]) -> Start:
        fmt, mix = fork_format(meta.get("sampleRate"), meta.get("mixType"))
        extra = meta.get("metadata")
        extra = extra if isinstance(extra, dict) else {}
        return Start(
            meta.get("callSid") or self.args.get("call_id"),
            fmt,
            fork_parties(mix, extra.get("caller_party")),
            {"protocol": "jambonz", "mix": mix, "metadata": meta},
        )

    def text(self, frame: str) -> list[Message]:
        try:
            event = json.loads(frame).get("event")
        except (ValueError, RecursionError, AttributeError):
            event = None
        if event == "dtmf":
            return [Note("dtmf")]
        return [Fault("text_frame", f"a text frame after the metadata: {frame[:60]!r}")]
