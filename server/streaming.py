"""Sessions at work: chunks in, results out, in order, without blocking the hub.

Each session has one worker greenthread that takes its inbox in order: a chunk is decoded and
run through VAD and windowing on a native thread (``offload``); each window that comes due goes
to the batcher, unless the same track already has one in flight (then it is skipped and counted:
the newest result matters most). While the model runs, the window's prosody is measured on
another native thread. The result gets the session's next ``seq``, is kept for resume, emitted to
the session's room, stored and counted. ``finish`` drains the stream, analyses its final window
and emits the session summary.
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from engine.batcher import InferenceBatcher
from engine.prosody import Prosody
from engine.windowing import Window
from server.concurrency import offload
from server.metrics import Metrics
from server.protocol import ProtocolError
from server.sessions import Session, SessionRegistry, Track
from server.store import Store

log = logging.getLogger(__name__)

Emit = Callable[..., None]
MONITOR_ROOM = "monitor"
RESULT_TIMEOUT_S = 60.0  # a window not answered in this long is reported as INFERENCE_TIMEOUT
COALESCE_CHUNKS = 200  # chunks taken from a session's inbox in one go


class Streams:
    def __init__(
        self,
        *,
        registry: SessionRegistry,
        batcher: InferenceBatcher,
        store: Store,
        metrics: Metrics,
        model_info: dict[str, Any],
        emit: Emit,
        spawn: Callable[..., Any],
        sleep: Callable[[float], None],
        measure: Callable[[np.ndarray, bool], Prosody],
    ) -> None:
        self.registry = registry
        self.batcher = batcher
        self.store = store
        self.metrics = metrics
        self.model_info = model_info
        self.random_weights = bool(model_info.get("random_weights"))
        self._emit = emit
        self._spawn = spawn
        self._sleep = sleep
        self._measure = measure

    # --- called from handlers (on the hub) -----------------------------------------------------

    def open(self, session: Session, config: dict[str, Any]) -> None:
        self.registry.add(session)
        self.store.open_session(
            session.id,
            source=session.source,
            config=config,
            model=self.model_info,
            meta=session.meta,
            started_at=session.started_wall,
        )
        self.metrics.active_sessions.labels(session.source).inc()
        self._spawn(self._worker, session)
        self._emit("session_update", {"event": "started", **session.state()}, to=MONITOR_ROOM)

    def push_audio(self, session: Session, track: str | None, data: bytes) -> None:
        try:
            session.inbox.put_nowait(("audio", track, data, time.monotonic()))
        except Exception:  # queue.Full
            raise ProtocolError(
                "RATE_LIMITED",
                "the server is behind on this session's audio; slow down",
                session.id,
            ) from None

    def end(self, session: Session, reason: str) -> None:
        if not session.ended:
            session.ended = True
            session.inbox.put(("finish", reason))

    def error(self, session: Session, code: str, message: str) -> None:
        self.metrics.errors.labels(code).inc()
        self._emit(
            "error", {"code": code, "message": message, "session_id": session.id}, to=session.room
        )

    def replay(self, session: Session, sid: str, since_seq: int) -> int:
        """Send ``sid`` every kept result after ``since_seq``; older ones come from the store."""
        with session.lock:
            kept = [r for r in session.results if r["seq"] > since_seq]
            oldest_kept = kept[0]["seq"] if kept else session.seq + 1
            older: list[dict[str, Any]] = []
            if since_seq + 1 < oldest_kept:
                offload(self.store.flush)
                stored = offload(self.store.get_session, session.id, since_seq=since_seq) or {}
                older = [r for r in stored.get("frames", []) if r["seq"] < oldest_kept]
            for result in older + kept:
                self._emit("emotion_result", result, to=sid)
        return len(older) + len(kept)

    # --- the session's worker ------------------------------------------------------------------

    def _worker(self, session: Session) -> None:
        while True:
            # Take everything already waiting: one native-thread call per track, not per chunk
            # (telephony sends 50 chunks a second per party).
            batch = [session.inbox.get()]
            while batch[-1][0] != "finish" and len(batch) < COALESCE_CHUNKS:
                try:
                    batch.append(session.inbox.get_nowait())
                except queue.Empty:
                    break
            per_track: dict[str | None, tuple[list[bytes], float]] = {}
            for item in batch:
                if item[0] == "audio":
                    _, name, data, received_at = item
                    per_track.setdefault(name, ([], received_at))[0].append(data)
            for name, (parts, received_at) in per_track.items():
                self._feed(session, session.tracks[name], parts, received_at)
            if batch[-1][0] == "finish":
                self._finish(session, batch[-1][1])
                return

    def _feed(self, session: Session, track: Track, parts: list[bytes], received_at: float) -> None:
        try:
            fed, errors = offload(track.pipeline.feed_chunks, parts)
        except Exception as exc:
            log.exception("feeding audio failed", extra={"session_id": session.id})
            self.error(session, "INVALID_AUDIO", f"could not process audio: {exc}")
            return
        for bad in errors:
            self.error(session, bad.code, str(bad))
        self._after_feed(session, track, fed.vad_events, fed.skipped_silence)
        for window in fed.windows:
            if track.inflight:
                track.skipped_busy += 1
                self.metrics.windows_skipped.labels("busy").inc()
                continue
            track.inflight = True
            # Latency counts from the first chunk of the batch: never understated.
            self._spawn(self._analyse, session, track, window, received_at)

    def _after_feed(self, session: Session, track: Track, events: list[Any], silent: int) -> None:
        if silent:
            self.metrics.windows_skipped.labels("silence").inc(silent)
        for event in events:
            payload: dict[str, Any] = {
                "session_id": session.id,
                "speech": event.speech,
                "at_s": round(event.at_s, 3),
            }
            if track.name:
                payload["track"] = track.name
            self._emit("vad", payload, to=session.room)

    def _analyse(self, session: Session, track: Track, window: Window, received_at: float) -> None:
        try:
            future = self.batcher.submit(window.samples, embeddings=session.embeddings)
            # Measured (in another process) while the model runs.
            try:
                prosody = self._measure(window.samples, track.pipeline.narrowband)
            except Exception:
                log.exception(
                    "measuring prosody failed: this window's stress uses the emotions only",
                    extra={"session_id": session.id},
                )
                prosody = Prosody.unmeasured()
            try:
                inference = future.result(timeout=RESULT_TIMEOUT_S)
            except TimeoutError:
                self.error(session, "INFERENCE_TIMEOUT", f"no result within {RESULT_TIMEOUT_S} s")
                return
            except Exception as exc:
                self.error(session, "INFERENCE_FAILED", f"inference failed: {exc}")
                return
            frame = track.pipeline.complete(
                window,
                inference.probs,
                prosody,
                device=inference.device,
                fallback_reason=inference.fallback_reason,
                embedding=inference.embedding,
            )
            payload = frame.as_dict()
            payload["latency_ms"] = round((time.monotonic() - received_at) * 1000, 1)
            if track.name:
                payload["track"] = track.name
            if self.random_weights:
                payload["random_weights"] = True
            self._deliver(session, payload, received_at)
        finally:
            track.inflight = False

    def _deliver(self, session: Session, payload: dict[str, Any], received_at: float) -> None:
        with session.lock:
            session.seq += 1
            result = {"session_id": session.id, "seq": session.seq, **payload}
            session.results.append(result)
            self._emit("emotion_result", result, to=session.room)
        self._emit("session_update", {"event": "result", **session.state()}, to=MONITOR_ROOM)
        self.store.add_result(session.id, result["seq"], result)
        self.metrics.end_to_end_seconds.observe(time.monotonic() - received_at)
        self.metrics.emotion_results.labels(result["emotion"]).inc()
        self.metrics.stress_index.observe(result["stress"]["index"])

    def _finish(self, session: Session, reason: str) -> None:
        for track in session.tracks.values():
            while track.inflight:  # the last window must see the stress state of the one before
                self._sleep(0.01)
            try:
                fed = offload(track.pipeline.finish)
            except Exception:
                log.exception("finishing a stream failed", extra={"session_id": session.id})
                continue
            for window in fed.windows:
                track.inflight = True
                self._analyse(session, track, window, time.monotonic())
        summary = self.summary(session, reason)
        self._emit("session_summary", summary, to=session.room)
        self._emit("session_update", {"event": "ended", **session.state()}, to=MONITOR_ROOM)
        self.store.close_session(session.id, summary)
        self.registry.remove(session)
        self.metrics.active_sessions.labels(session.source).dec()
        log.info(
            "session ended",
            extra={"session_id": session.id, "reason": reason, "results": session.seq},
        )

    def summary(self, session: Session, reason: str) -> dict[str, Any]:
        tracks = {
            (name or "main"): {
                **t.pipeline.summary_dict(),
                "skipped_busy": t.skipped_busy,
                "narrowband": t.pipeline.narrowband,
            }
            for name, t in session.tracks.items()
        }
        out: dict[str, Any] = {
            "session_id": session.id,
            "reason": reason,
            "results": session.seq,
            "audio_received_s": round(session.audio_s, 3),
            "random_weights": self.random_weights,
        }
        if list(tracks) == ["main"]:
            out.update(tracks["main"])
        else:
            out["tracks"] = tracks
        return out

    def reap(self, resume_ttl_s: float, idle_timeout_s: float) -> None:
        for session, reason in self.registry.expired(resume_ttl_s, idle_timeout_s):
            self.end(session, reason)
