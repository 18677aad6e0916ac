"""Scripted fakes for server tests without sockets (in the spirit of livekit's fake_stt and
fake_vad): a window analysis the test holds and releases, a publisher that records every event,
and a runtime whose decoding waits for the test."""

from __future__ import annotations

import threading

import numpy as np

from engine.batcher import WindowExpired
from engine.model import WindowAnswer
from engine.prosody import MEASURES, Prosody
from engine.stress import default_model
from server.runtime import ThreadRuntime
from server.sessions.analysis import Analysis, AnalysisError
from server.sessions.events import Ended
from tests import LABELS

WAIT_S = 30


def calm_prosody() -> Prosody:
    """A lower voice at the centre of the shipped stress model's population prior."""
    prior = default_model().prior["lower"]
    return Prosody(**{name: prior[name][0] for name in MEASURES}, voiced_fraction=0.6)


class FakeAnalyse:
    """Answers each window with fixed probabilities. ``held``: each call waits for a permit.
    Call indexes in ``fail`` fail, those in ``expire`` expire (as the batcher drops a window
    that cannot make its deadline)."""

    def __init__(self, held: bool = False) -> None:
        self.cond = threading.Condition()
        self.calls: list[str] = []
        self.deadlines: list[float | None] = []
        self.keys: list[object] = []
        self.permits = threading.Semaphore(0) if held else None
        self.fail: set[int] = set()
        self.expire: set[int] = set()
        self.prosody_missing: str | None = None
        self.utterances_open = threading.Event()  # utterance calls wait for it (set: at once)
        self.utterances_open.set()
        self.late_utterances: set[int] = set()  # utterance calls (0, 1, ...) the batcher drops
        self.utterance_calls: list[int] = []  # the length of each utterance, in samples

    def __call__(
        self, samples, *, narrowband, embeddings, priority, deadline=None, key=None
    ) -> Analysis:
        with self.cond:
            index = len(self.calls)
            self.calls.append(priority)
            self.deadlines.append(deadline)
            self.keys.append(key)
            self.cond.notify_all()
        if priority == "utterance":
            return self._utterance(samples)
        if self.permits is not None:
            assert self.permits.acquire(timeout=WAIT_S), "the test never released a window"
        if index in self.fail:
            raise AnalysisError("INFERENCE_FAILED", f"call {index} failed")
        if index in self.expire:
            raise WindowExpired("the window could not be analysed by its deadline")
        probs = np.full(len(LABELS), 1 / len(LABELS), dtype=np.float32)
        probs[4] += 0.05  # neutral on top
        prosody = calm_prosody() if self.prosody_missing is None else Prosody.unmeasured()
        return Analysis(WindowAnswer(probs / probs.sum()), prosody, self.prosody_missing)

    def _utterance(self, samples: np.ndarray) -> Analysis:
        with self.cond:
            index = len(self.utterance_calls)
            self.utterance_calls.append(samples.shape[0])
            self.cond.notify_all()
        if not self.utterances_open.wait(WAIT_S):  # as a batcher the runner told to forget it
            raise WindowExpired("the session ended", "forgotten")
        if index in self.late_utterances:
            raise WindowExpired("no idle time in time", "late")
        probs = np.full(len(LABELS), 1 / len(LABELS), dtype=np.float32)
        probs[index % len(LABELS)] += 0.3  # each utterance its own top emotion
        return Analysis(WindowAnswer(probs / probs.sum()), calm_prosody())

    def utterances_started(self, n: int) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.utterance_calls) >= n, WAIT_S)

    def started(self, n: int) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.calls) >= n, WAIT_S), self.calls

    def release(self, n: int = 1) -> None:
        assert self.permits is not None
        for _ in range(n):
            self.permits.release()


class Recorder:
    def __init__(self) -> None:
        self.events: list[object] = []
        self.cond = threading.Condition()

    def __call__(self, event: object) -> None:
        with self.cond:
            self.events.append(event)
            self.cond.notify_all()

    def of(self, kind: type) -> list:
        with self.cond:
            return [e for e in self.events if isinstance(e, kind)]

    def wait(self, kind: type, count: int) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.of(kind)) >= count, WAIT_S), self.events

    def ended(self) -> Ended:
        with self.cond:
            assert self.cond.wait_for(lambda: self.of(Ended), WAIT_S)
        return self.of(Ended)[0]


class HeldFeed(ThreadRuntime):
    """Decoding (the runner's offloaded feed) waits until the test releases it."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def offload(self, fn, *args, **kwargs):
        self.entered.set()
        assert self.release.wait(WAIT_S)
        return fn(*args, **kwargs)
