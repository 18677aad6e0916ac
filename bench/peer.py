"""A minimal seed-style peer: what published Flask-SocketIO + FunASR examples do. Not a product.

    python -m bench.peer --model models/large --port 5091

Flask-SocketIO with its default settings (eventlet when installed), FunASR ``AutoModel`` with its
defaults, and ``generate()`` called inside the audio handler for every due window (2 s windows
every 1 s, no VAD), on the event loop. It speaks enough of voxaffect's protocol for
``bench.streams`` to measure it with the same client and audio: ``start_session`` (ack with a
session id), ``audio_stream`` (PCM16 at 16 kHz, base64 or bytes), ``end_session`` (then a
``session_summary``), ``ping``; it emits ``emotion_result`` with ``seq``, ``start_s``, ``end_s``,
``emotion`` and ``scores``.
"""

from __future__ import annotations

import argparse
import base64
import uuid
from typing import Any

import eventlet

eventlet.monkey_patch()

import numpy as np  # noqa: E402
from flask import Flask, request  # noqa: E402
from flask_socketio import SocketIO, emit  # noqa: E402

from engine.funasr_compat import english_label, import_funasr, quiet_funasr  # noqa: E402

WINDOW = 32000  # 2 s at 16 kHz
HOP = 16000  # 1 s


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--port", type=int, default=5091)
    args = p.parse_args(argv)

    import_funasr()
    from funasr import AutoModel

    with quiet_funasr():
        model = AutoModel(model=args.model, device="cpu", disable_update=True)
    app = Flask(__name__)
    socketio = SocketIO(app, cors_allowed_origins="*")
    sessions: dict[str, dict[str, Any]] = {}

    @socketio.on("start_session")
    def start_session(data: Any = None) -> dict[str, Any]:
        sid = uuid.uuid4().hex
        sessions[sid] = {"audio": np.zeros(0, np.float32), "next_end": WINDOW, "seq": 0}
        return {"session_id": sid, "resume_token": sid, "config": {}}

    @socketio.on("audio_stream")
    def audio_stream(data: dict[str, Any]) -> None:
        s = sessions[data["session_id"]]
        chunk = data["chunk"]
        raw = base64.b64decode(chunk) if isinstance(chunk, str) else chunk
        pcm = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
        s["audio"] = np.concatenate([s["audio"], pcm])  # as published examples grow buffers
        while s["audio"].shape[0] >= s["next_end"]:
            end = s["next_end"]
            window = s["audio"][end - WINDOW : end]
            with quiet_funasr():
                res = model.generate(window, granularity="utterance", extract_embedding=False)[0]
            scores = {
                english_label(k): float(v)
                for k, v in zip(res["labels"], res["scores"], strict=True)
            }
            s["seq"] += 1
            emit(
                "emotion_result",
                {
                    "session_id": data["session_id"],
                    "seq": s["seq"],
                    "start_s": (end - WINDOW) / 16000,
                    "end_s": end / 16000,
                    "emotion": max(scores, key=scores.__getitem__),
                    "scores": scores,
                },
                to=request.sid,  # type: ignore[attr-defined]
            )
            s["next_end"] += HOP

    @socketio.on("end_session")
    def end_session(data: dict[str, Any]) -> dict[str, Any]:
        s = sessions.pop(data["session_id"], {"seq": 0})
        emit("session_summary", {"session_id": data["session_id"], "results": s["seq"]})
        return {"ending": True}

    @socketio.on("ping")
    def ping(data: Any = None) -> dict[str, Any]:
        return {"pong": True}

    @app.get("/readyz")
    def readyz() -> dict[str, Any]:
        return {"ready": True}

    socketio.run(app, host="127.0.0.1", port=args.port, log_output=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
