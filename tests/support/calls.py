"""Media-server traffic for tests: Twilio Media Streams conversations and FreeSWITCH audio-fork
frames made from espeak-ng speech, and a client that replays them like a media server."""

from __future__ import annotations

import base64
import io
import json
import random
import time

import numpy as np
import soundfile as sf
import websocket

from engine.audio import resample
from tests.support.client import wait_for
from tests.support.speech import silence, speech

CUSTOMER = dict(pitch=70, speed=170, amplitude=120)  # a different voice for each party
AGENT = dict(pitch=30, speed=140, amplitude=100)


def at_8k(x: np.ndarray) -> np.ndarray:
    return resample(x, 16000, 8000)


def mulaw(x8k: np.ndarray) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x8k, 8000, format="RAW", subtype="ULAW")
    return buf.getvalue()


def l16(x: np.ndarray) -> bytes:
    return (np.clip(x, -1, 1) * 32767).astype("<i2").tobytes()


def party_audio() -> tuple[np.ndarray, np.ndarray]:
    """The customer speaks first; the agent answers after a pause (one channel each)."""
    customer = np.concatenate([silence(0.3), speech(**CUSTOMER), silence(1.0)])
    agent = np.concatenate([silence(customer.size / 16000), speech(**AGENT), silence(0.5)])
    return np.pad(customer, (0, agent.size - customer.size)), agent


def twilio_messages(
    call_sid: str, tracks: dict[str, bytes], *, shuffle: bool = False, duplicate: bool = False
) -> list[str]:
    """A realistic Media Streams conversation: connected, start, 20 ms media per track, stop."""
    stream_sid = "MZ" + call_sid[2:]
    msgs = [json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"})]
    msgs.append(
        json.dumps(
            {
                "event": "start",
                "sequenceNumber": "1",
                "streamSid": stream_sid,
                "start": {
                    "accountSid": "AC123",
                    "streamSid": stream_sid,
                    "callSid": call_sid,
                    "tracks": list(tracks),
                    "customParameters": {"queue": "billing"},
                    "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                },
            }
        )
    )
    media = []
    n = max(len(p) for p in tracks.values()) // 160
    for i in range(n):
        for track, payload in tracks.items():
            media.append(
                {
                    "event": "media",
                    "streamSid": stream_sid,
                    "media": {
                        "track": track,
                        "chunk": str(i + 1),
                        "timestamp": str(i * 20),
                        "payload": base64.b64encode(payload[i * 160 : (i + 1) * 160]).decode(),
                    },
                }
            )
    if shuffle:  # frame order is not guaranteed: swap neighbours within a few chunks
        rng = random.Random(1)
        for i in range(0, len(media) - 4, 7):
            j = i + rng.randint(1, 3)
            media[i], media[j] = media[j], media[i]
    if duplicate:
        media.insert(50, media[40])
    seq = 2
    for m in media:
        m["sequenceNumber"] = str(seq)
        seq += 1
        msgs.append(json.dumps(m))
    msgs.append(
        json.dumps(
            {
                "event": "dtmf",
                "streamSid": stream_sid,
                "sequenceNumber": str(seq),
                "dtmf": {"track": "inbound_track", "digit": "5"},
            }
        )
    )
    msgs.append(
        json.dumps(
            {
                "event": "stop",
                "sequenceNumber": str(seq + 1),
                "streamSid": stream_sid,
                "stop": {"accountSid": "AC123", "callSid": call_sid},
            }
        )
    )
    return msgs


def ws_url(server, path: str, **query: str) -> str:
    q = "&".join(f"{k}={v}" for k, v in query.items())
    return server.url.replace("http://", "ws://") + path + (f"?{q}" if q else "")


def replay(url: str, messages: list, pace_s: float = 0.006) -> None:
    """Send like a media server, faster than real time but under the server's default
    max_messages_per_s (200: at 250 a second a loaded run lost messages to the limit); stop
    quietly if the server closes the connection."""
    ws = websocket.create_connection(url, timeout=30)
    try:
        for m in messages:
            if isinstance(m, bytes):
                ws.send_binary(m)
            else:
                ws.send(m)
            time.sleep(pace_s)
        ws.close()
    except (BrokenPipeError, ConnectionResetError, websocket.WebSocketException):
        pass
    finally:
        ws.shutdown()


def stored_call(server, call_id: str, token: str | None = None) -> dict:
    return wait_for(
        lambda: (s := server.get(f"/api/sessions/{call_id}", token=token)[1]).get("summary") and s,
        60,
        f"the stored timeline of {call_id}",
    )
