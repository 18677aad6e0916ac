"""A thin recording wrapper around a real python-socketio client, for protocol tests."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import socketio


def wait_for(predicate: Callable[[], Any], timeout_s: float = 30.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


class Recorder:
    """Connects and records every event the server sends."""

    def __init__(self, url: str, token: str | None = None, headers: dict[str, str] | None = None):
        self.url = url
        self.events: list[tuple[str, Any]] = []
        self.times: list[float] = []  # time.monotonic() each event arrived
        self.lock = threading.Lock()
        self.sio = socketio.Client(reconnection=False)
        for name in (
            "emotion_result",
            "utterance_result",
            "vad",
            "error",
            "session_summary",
            "session_update",
            "alert",
        ):
            self.sio.on(name, self._recorder(name))
        auth = {"token": token} if token else None
        self.sio.connect(
            url, auth=auth, transports=["websocket"], wait_timeout=10, headers=headers or {}
        )

    def _recorder(self, name: str) -> Callable[[Any], None]:
        def record(data: Any = None) -> None:
            with self.lock:
                self.events.append((name, data))
                self.times.append(time.monotonic())

        return record

    def of(self, name: str) -> list[Any]:
        with self.lock:
            return [d for n, d in self.events if n == name]

    def received_at(self, name: str) -> list[float]:
        with self.lock:
            return [t for (n, _), t in zip(self.events, self.times, strict=True) if n == name]

    def call(self, event: str, data: Any = None) -> Any:
        return self.sio.call(event, data, timeout=30)

    def start(self, **kwargs: Any) -> dict[str, Any]:
        ack = self.call("start_session", kwargs)
        assert "error" not in ack, ack
        return ack

    def send(self, session_id: str, chunk: bytes | str) -> None:
        self.sio.emit("audio_stream", {"session_id": session_id, "chunk": chunk})

    def stream(
        self, session_id: str, pcm: bytes, *, speed: float = 2.0, chunk_bytes: int = 3200
    ) -> None:
        """Send PCM16 at 16 kHz in 100 ms chunks, ``speed`` times real time."""
        started = time.monotonic()
        for i, at in enumerate(range(0, len(pcm), chunk_bytes)):
            self.send(session_id, pcm[at : at + chunk_bytes])
            due = started + (i + 1) * (chunk_bytes / 32000) / speed
            time.sleep(max(0.0, due - time.monotonic()))

    def end(self, session_id: str, timeout_s: float = 60.0) -> dict[str, Any]:
        ack = self.call("end_session", {"session_id": session_id})
        assert "error" not in ack, ack
        return wait_for(
            lambda: self.of("session_summary") and self.of("session_summary")[-1],
            timeout_s,
            "session_summary",
        )

    def errors(self, code: str | None = None) -> list[dict[str, Any]]:
        return [e for e in self.of("error") if code is None or e["code"] == code]

    def close(self) -> None:
        if self.sio.connected:
            self.sio.disconnect()


def start_streams(
    url: str, pcm: bytes, count: int, speed: float = 2.0
) -> tuple[list[Recorder], list[str], list[threading.Thread]]:
    """``count`` clients, each with a session streaming ``pcm`` on a thread of its own."""
    clients = [Recorder(url) for _ in range(count)]
    sids = [c.start()["session_id"] for c in clients]
    threads = [
        threading.Thread(target=c.stream, args=(s, pcm), kwargs={"speed": speed})
        for c, s in zip(clients, sids, strict=True)
    ]
    for t in threads:
        t.start()
    return clients, sids, threads
