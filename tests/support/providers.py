"""Clients that talk like the contact-center platforms: a Genesys AudioHook client (open, audio,
ping, pause/resume, close, as the protocol specification and its reference client do, with the
request signature Genesys puts on the upgrade), jambonz ``listen`` and Asterisk AudioSocket."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import socket
import struct
import time
import uuid
from typing import Any

import numpy as np
import websocket

from tests.support.calls import at_8k, l16, mulaw

AUDIOHOOK_KEY = "audiohook-api-key-0123456789"
AUDIOHOOK_SECRET = base64.b64encode(b"the integration's client secret!").decode()
ORG_ID = "d7934305-0972-4844-938e-9060eef73d05"


def sign_audiohook(
    path: str,
    host: str,
    headers: dict[str, str],
    secret_b64: str = AUDIOHOOK_SECRET,
    *,
    created: int | None = None,
    nonce: str | None = None,
    expires_in: int = 60,
) -> dict[str, str]:
    """``Signature-Input`` and ``Signature`` as RFC 9421 §2.5 builds them for Genesys' six
    components (written here from the RFC, not from the server's verifier)."""
    created = int(time.time()) if created is None else created
    nonce = nonce or secrets.token_urlsafe(16)
    names = [
        "@request-target",
        "@authority",
        "audiohook-organization-id",
        "audiohook-session-id",
        "audiohook-correlation-id",
        "x-api-key",
    ]
    values = {"@request-target": path, "@authority": host}
    values.update({k.lower(): v for k, v in headers.items()})
    params = (
        "(" + " ".join(f'"{n}"' for n in names) + ")"
        f';keyid="{headers["X-API-KEY"]}";nonce="{nonce}";alg="hmac-sha256"'
        f";created={created};expires={created + expires_in}"
    )
    base = "\n".join([*(f'"{n}": {values[n]}' for n in names), f'"@signature-params": {params}'])
    mac = hmac.new(base64.b64decode(secret_b64), base.encode(), hashlib.sha256).digest()
    return {
        "Signature-Input": f"sig1={params}",
        "Signature": f"sig1=:{base64.b64encode(mac).decode()}:",
    }


def audiohook_headers(
    server: Any, session_id: str, *, signed: bool = True, **sign: Any
) -> dict[str, str]:
    headers = {
        "Audiohook-Organization-Id": ORG_ID,
        "Audiohook-Session-Id": session_id,
        "Audiohook-Correlation-Id": str(uuid.uuid4()),
        "X-API-KEY": AUDIOHOOK_KEY,
    }
    if signed:
        headers.update(
            sign_audiohook("/telephony/audiohook", f"127.0.0.1:{server.port}", headers, **sign)
        )
    return headers


def open_parameters(
    conversation: str, *, events: bool = False, offer: list[dict] | None = None
) -> dict[str, Any]:
    """An ``open`` as Genesys sends it (the protocol specification's example, our ids)."""
    return {
        "organizationId": ORG_ID,
        "conversationId": conversation,
        "participant": {
            "id": "883efee8-3d6c-4537-b500-6d7ca4b92fa0",
            "ani": "+1-555-555-1234",
            "aniName": "John Doe",
            "dnis": "+1-800-555-6789",
        },
        "media": offer
        or [
            {"type": "audio", "format": "PCMU", "channels": ["external", "internal"], "rate": 8000},
            {"type": "audio", "format": "PCMU", "channels": ["external"], "rate": 8000},
            {"type": "audio", "format": "PCMU", "channels": ["internal"], "rate": 8000},
        ],
        "language": "en-US",
        "customConfig": {"voxaffect": {"events": events}} if events else {},
    }


class AudioHookClient:
    """Genesys' side of one AudioHook session: numbered messages, positions, and every server
    message it received."""

    def __init__(self, server: Any, session_id: str | None = None, **kw: Any) -> None:
        self.id = session_id or str(uuid.uuid4())
        url = server.url.replace("http://", "ws://") + "/telephony/audiohook"
        headers = audiohook_headers(server, self.id, **kw)
        self.ws = websocket.create_connection(
            url, header=[f"{k}: {v}" for k, v in headers.items()], timeout=30
        )
        self.seq = 0
        self.serverseq = 0
        self.position_s = 0.0
        self.received: list[dict] = []

    def send(self, kind: str, parameters: dict | None = None, *, seq: int | None = None) -> None:
        self.seq = self.seq + 1 if seq is None else seq
        self.ws.send(
            json.dumps(
                {
                    "version": "2",
                    "id": self.id,
                    "type": kind,
                    "seq": self.seq,
                    "serverseq": self.serverseq,
                    "position": f"PT{self.position_s:.3f}S",
                    "parameters": parameters or {},
                }
            )
        )

    def audio(self, stereo_mulaw: bytes, channels: int = 2, frame_s: float = 0.2) -> None:
        step = int(8000 * frame_s) * channels
        for i in range(0, len(stereo_mulaw), step):
            self.ws.send_binary(stereo_mulaw[i : i + step])
        self.position_s += len(stereo_mulaw) / channels / 8000

    def expect(self, kind: str, timeout_s: float = 30.0) -> dict:
        """The next server message of ``kind`` (results' events and others are kept)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.ws.settimeout(max(0.1, deadline - time.monotonic()))
            message = json.loads(self.ws.recv())
            self.received.append(message)
            self.serverseq = message["seq"]
            if message["type"] == kind:
                return message
        raise AssertionError(f"no {kind} within {timeout_s} s")

    def close(self) -> None:
        self.ws.close()


def stereo_mulaw(external: np.ndarray, internal: np.ndarray) -> bytes:
    """Two 16 kHz voices as AudioHook's stereo PCMU: interleaved, external first."""
    a, b = np.frombuffer(mulaw(at_8k(external)), "u1"), np.frombuffer(mulaw(at_8k(internal)), "u1")
    n = min(a.size, b.size)
    return np.stack([a[:n], b[:n]], axis=1).tobytes()


def stereo_l16(left: np.ndarray, right: np.ndarray) -> bytes:
    return l16(np.stack([left, right], axis=1).reshape(-1))


# --- Asterisk AudioSocket ----------------------------------------------------------------------


def audiosocket_frame(kind: int, payload: bytes = b"") -> bytes:
    """Byte by byte as Asterisk's res_audiosocket writes a frame: type, length (big-endian)."""
    return struct.pack(">BH", kind, len(payload)) + payload


class AsteriskCall:
    """An Asterisk channel running ``AudioSocket(uuid, host:port)``."""

    def __init__(self, port: int, call_uuid: uuid.UUID | None = None) -> None:
        self.uuid = call_uuid or uuid.uuid4()
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.sendall(audiosocket_frame(0x01, self.uuid.bytes))

    def slin(self, pcm: bytes, kind: int = 0x10, rate: int = 8000, pace_s: float = 0.0) -> None:
        step = rate // 50 * 2  # 20 ms frames, as Asterisk sends them
        for i in range(0, len(pcm), step):
            self.sock.sendall(audiosocket_frame(kind, pcm[i : i + step]))
            if pace_s:
                time.sleep(pace_s)

    def hangup(self) -> bytes:
        """Hang up; what the server sent back before closing."""
        self.sock.sendall(audiosocket_frame(0x00))
        return self.read_until_closed()

    def read_until_closed(self, timeout_s: float = 30.0) -> bytes:
        self.sock.settimeout(timeout_s)
        out = b""
        try:
            while chunk := self.sock.recv(4096):
                out += chunk
        except (ConnectionResetError, TimeoutError):
            pass
        self.sock.close()
        return out
