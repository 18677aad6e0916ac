"""A Python client for the streaming protocol (python-socketio), and ``voxaffect stream``.

    client = StreamClient("http://127.0.0.1:5000", on_result=print)
    client.start(sample_rate=16000)
    client.send(pcm16_bytes)          # any number of times
    summary = client.end()

If the connection drops, the client reconnects, resumes its session with the resume token and
the last ``seq`` it holds, and sends the chunks it could not send meanwhile: the server replays
every result produced while it was away, and the client drops any it already has. A draining
node says so first (``DRAINING`` with ``resume``): the client holds its audio until it has
reconnected — through the load balancer, to another node — and resumed there.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import socketio

Handler = Callable[[dict[str, Any]], None]


class ServerError(RuntimeError):
    def __init__(self, payload: dict[str, Any]) -> None:
        super().__init__(f"{payload.get('code')}: {payload.get('message')}")
        self.code = payload.get("code")
        self.payload = payload


class StreamClient:
    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        on_result: Handler | None = None,
        on_vad: Handler | None = None,
        on_error: Handler | None = None,
        on_utterance: Handler | None = None,
        timeout_s: float = 10.0,
    ) -> None:
        """``on_utterance``: each ``utterance_result`` (a whole utterance, classified once).
        Those the server sends while this client is away are not replayed; the stored session
        (``GET /api/sessions/<id>``) has every one."""
        self.url = url
        self.token = token
        self.timeout_s = timeout_s
        self.on_result = on_result
        self.on_vad = on_vad
        self.on_error = on_error
        self.on_utterance = on_utterance
        self.session_id: str | None = None
        self.resume_token: str | None = None
        self.config: dict[str, Any] = {}
        self.results: list[dict[str, Any]] = []
        self.utterances: list[dict[str, Any]] = []
        self.errors: list[dict[str, Any]] = []
        self.summary: dict[str, Any] | None = None
        self.last_seq = 0
        self._start_args: dict[str, Any] = {}
        self._unsent: deque[bytes] = deque()
        self._lock = threading.Lock()
        self._summary_event = threading.Event()
        self._resumed = threading.Event()
        self._resumed.set()
        self._moving = False  # the node said it hands the session off (DRAINING, resume)
        self.sio = socketio.Client(reconnection=True, reconnection_delay=0.5)
        self.sio.on("emotion_result", self._result)
        self.sio.on("utterance_result", self._utterance)
        self.sio.on("vad", lambda d: self.on_vad and self.on_vad(d))
        self.sio.on("error", self._error)
        self.sio.on("session_summary", self._summary)
        self.sio.on("connect", self._connected)
        self.sio.on("disconnect", self._disconnected)

    # --- lifecycle ---------------------------------------------------------------------------

    def connect(self) -> None:
        auth = {"token": self.token} if self.token else None
        self.sio.connect(self.url, auth=auth, wait_timeout=self.timeout_s, transports=["websocket"])

    def start(
        self,
        *,
        sample_rate: int = 16000,
        encoding: str = "pcm_s16le",
        channels: int = 1,
        session_id: str | None = None,
        embeddings: bool = False,
        utterances: bool = True,
    ) -> dict[str, Any]:
        if not self.sio.connected:
            self.connect()
        self._start_args = {
            "sample_rate": sample_rate,
            "encoding": encoding,
            "channels": channels,
            "options": {"embeddings": embeddings, "utterances": utterances},
        }
        if session_id:
            self._start_args["session_id"] = session_id
        ack = self.sio.call("start_session", self._start_args, timeout=self.timeout_s)
        if "error" in ack:
            raise ServerError(ack["error"])
        self.session_id, self.resume_token = ack["session_id"], ack["resume_token"]
        self.config = ack["config"]
        return dict(ack)

    def send(self, chunk: bytes) -> None:
        """Send raw audio bytes in the session's encoding; kept for later while disconnected."""
        with self._lock:
            self._unsent.append(chunk)
        self._flush()

    def end(self, timeout_s: float = 60.0) -> dict[str, Any]:
        self._resumed.wait(timeout_s)
        self._flush()
        ack = self.sio.call("end_session", {"session_id": self.session_id}, timeout=self.timeout_s)
        if "error" in ack:
            raise ServerError(ack["error"])
        if not self._summary_event.wait(timeout_s):
            raise TimeoutError("no session_summary from the server")
        assert self.summary is not None
        return self.summary

    def close(self) -> None:
        self.sio.disconnect()

    def ping_ms(self) -> float:
        started = time.perf_counter()
        self.sio.call("ping", {}, timeout=self.timeout_s)
        return (time.perf_counter() - started) * 1000

    # --- internals ---------------------------------------------------------------------------

    def _flush(self) -> None:
        while self.sio.connected and self._resumed.is_set():
            with self._lock:
                if not self._unsent:
                    return
                chunk = self._unsent[0]
            try:
                self.sio.emit("audio_stream", {"session_id": self.session_id, "chunk": chunk})
            except socketio.exceptions.SocketIOError:
                return  # disconnected: the chunk stays queued for after the resume
            with self._lock:
                self._unsent.popleft()

    def _disconnected(self, *_: Any) -> None:
        if self.resume_token is not None:
            self._resumed.clear()  # sending and ending wait until the session is resumed
        if self._moving:  # a disconnect by the server is not retried by python-socketio
            self._moving = False
            self.sio.start_background_task(self._reconnect)

    def _reconnect(self) -> None:
        """Connect again (the load balancer picks a ready node); resuming follows on connect."""
        delay_s = 0.5
        deadline = time.monotonic() + self.timeout_s * 6
        while time.monotonic() < deadline:
            time.sleep(delay_s)  # (the disconnect that started this is still being handled)
            if self.sio.connected:
                return  # python-socketio reconnected by itself (the node exited first)
            try:
                self.connect()
                return
            except socketio.exceptions.ConnectionError:
                delay_s = min(delay_s * 2, 5.0)

    def _connected(self) -> None:
        if self.resume_token is None:
            return
        self._resumed.clear()  # a reconnect: resume before sending anything else

        def resume() -> None:
            ack = self.sio.call(
                "start_session",
                {"resume_token": self.resume_token, "since_seq": self.last_seq},
                timeout=self.timeout_s,
            )
            if "error" in ack:
                self._error(ack["error"])
            self._resumed.set()
            self._flush()

        self.sio.start_background_task(resume)

    def _result(self, data: dict[str, Any]) -> None:
        with self._lock:
            if data.get("session_id") != self.session_id or data["seq"] <= self.last_seq:
                return  # a replayed result this client already holds
            self.last_seq = data["seq"]
            self.results.append(data)
        if self.on_result:
            self.on_result(data)

    def _utterance(self, data: dict[str, Any]) -> None:
        if data.get("session_id") != self.session_id:
            return
        with self._lock:
            self.utterances.append(data)
        if self.on_utterance:
            self.on_utterance(data)

    def _error(self, data: dict[str, Any]) -> None:
        if data.get("code") == "DRAINING" and data.get("resume"):
            self._moving = True  # hold the audio: the server disconnects, we resume elsewhere
            self._resumed.clear()
        self.errors.append(data)
        if self.on_error:
            self.on_error(data)

    def _summary(self, data: dict[str, Any]) -> None:
        self.summary = data
        self._summary_event.set()


def stream_file(
    path: str,
    url: str,
    *,
    speed: float = 1.0,
    token: str | None = None,
    on_result: Handler | None = None,
    on_error: Handler | None = None,
    on_utterance: Handler | None = None,
    chunk_s: float = 0.1,
) -> tuple[StreamClient, dict[str, Any]]:
    """Stream a file as 16 kHz PCM16 in ``chunk_s`` chunks, ``speed`` times real time."""
    import numpy as np

    from engine.audio import load_file

    samples, _ = load_file(path)
    pcm = (np.clip(samples, -1.0, 1.0) * 32767).astype("<i2").tobytes()
    client = StreamClient(
        url, token=token, on_result=on_result, on_error=on_error, on_utterance=on_utterance
    )
    client.start(sample_rate=16000, encoding="pcm_s16le")
    step = int(16000 * chunk_s) * 2
    started = time.monotonic()
    for i, at in enumerate(range(0, len(pcm), step)):
        client.send(pcm[at : at + step])
        due = started + (i + 1) * chunk_s / speed
        time.sleep(max(0.0, due - time.monotonic()))
    summary = client.end()
    client.close()
    return client, summary
