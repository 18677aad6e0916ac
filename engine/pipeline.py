"""One stream's path from audio chunks to analysed windows, and whole-file analysis on top of it.

``StreamPipeline`` holds a stream's state — decoder, ring buffer, VAD gate, window scheduler and
stress scorer — and does no inference itself: ``feed`` returns the windows that came due, the
caller gets their emotion probabilities (directly, or through the batcher) and ``complete`` turns
probabilities plus the window's prosody into a :class:`FrameResult`. ``analyze`` runs a whole
signal through the same pipeline.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine import SAMPLE_RATE, circumplex
from engine.audio import AudioFormat, AudioFormatError, StreamDecoder
from engine.model import WindowAnswer
from engine.prosody import Prosody, measure
from engine.ring_buffer import RingBuffer
from engine.stress import StressResult, StressScorer
from engine.utterances import Utterance, UtteranceCutter
from engine.vad import VadEvent, VadGate
from engine.windowing import Window, WindowScheduler

MIN_FINAL_WINDOW_S = 0.25


@dataclass(frozen=True, slots=True)
class PipelineConfig:
    window_s: float = 2.0
    hop_s: float = 1.0
    min_speech_ratio: float = 0.3
    vad_aggressiveness: int = 2
    vad_frame_ms: int = 30
    buffer_s: float = 10.0
    baseline_windows: int = 3
    stress_smoothing: float = 0.7  # weight of the newest window in the smoothed index
    utterances: bool = False  # cut utterances (engine/utterances.py) besides the windows
    max_utterance_s: float = 30.0
    min_utterance_s: float = 0.5

    def __post_init__(self) -> None:
        if not 0.25 <= self.window_s <= 30.0:
            raise ValueError(f"window_s must be within 0.25-30 s, got {self.window_s}")
        if not 0.1 <= self.hop_s <= self.window_s:
            raise ValueError(f"hop_s must be within 0.1 s and window_s, got {self.hop_s}")
        if not 1.0 <= self.max_utterance_s <= 60.0:
            raise ValueError(f"max_utterance_s must be within 1-60 s, got {self.max_utterance_s}")
        if self.buffer_s < self.window_s + self.hop_s:
            raise ValueError(
                f"buffer_s ({self.buffer_s}) must hold at least window_s + hop_s "
                f"({self.window_s + self.hop_s})"
            )

    def as_dict(self) -> dict[str, Any]:
        return {
            "window_s": self.window_s,
            "hop_s": self.hop_s,
            "min_speech_ratio": self.min_speech_ratio,
            "vad_aggressiveness": self.vad_aggressiveness,
            "vad_frame_ms": self.vad_frame_ms,
            "buffer_s": self.buffer_s,
            "baseline_windows": self.baseline_windows,
        }


@dataclass(slots=True)
class Fed:
    """What one ``feed`` or ``finish`` produced."""

    windows: list[Window] = field(default_factory=list)
    vad_events: list[VadEvent] = field(default_factory=list)
    skipped_silence: int = 0
    utterances: list[Utterance] = field(default_factory=list)


def _classified(
    start_s: float,
    end_s: float,
    emotion: str,
    confidence: float,
    scores: dict[str, float],
    stress: StressResult,
) -> dict[str, Any]:
    """The fields a window's and an utterance's results share, as the wire carries them."""
    return {
        "start_s": round(start_s, 3),
        "end_s": round(end_s, 3),
        "emotion": emotion,
        "confidence": round(confidence, 4),
        "scores": {k: round(v, 4) for k, v in scores.items()},
        "circumplex": circumplex.project(scores),  # derived from the scores, not a model's own
        "stress": stress.as_dict(),
    }


@dataclass(slots=True)
class FrameResult:
    start_s: float
    end_s: float
    emotion: str
    confidence: float
    scores: dict[str, float]
    stress: StressResult
    speech_ratio: float
    answer: WindowAnswer
    narrowband: bool = False

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            **_classified(
                self.start_s, self.end_s, self.emotion, self.confidence, self.scores, self.stress
            ),
            "speech_ratio": round(self.speech_ratio, 3),
            **self.answer.as_dict(),
        }
        if self.narrowband:
            out["narrowband"] = True
        return out


@dataclass(slots=True)
class UtteranceResult:
    """An utterance classified as one clip, its stress against the speaker's same baseline."""

    seq: int
    start_s: float
    end_s: float
    emotion: str
    confidence: float
    scores: dict[str, float]
    stress: StressResult
    voiced_s: float  # voiced speech inside it (openSMILE's voicing)
    split: bool  # cut at max_utterance_s, not at a pause
    answer: WindowAnswer

    def as_dict(self) -> dict[str, Any]:
        return {
            "utterance_seq": self.seq,
            **_classified(
                self.start_s, self.end_s, self.emotion, self.confidence, self.scores, self.stress
            ),
            "speech_s": round(self.end_s - self.start_s, 3),
            "voiced_s": round(self.voiced_s, 3),
            "split": self.split,
            **self.answer.as_dict(),
        }


class Summary:
    """Running totals of a timeline: emotion mix, stress mean and peaks. Memory stays flat."""

    PEAKS = 5

    def __init__(self, labels: tuple[str, ...]) -> None:
        self.labels = labels
        self.windows = 0
        self._scores = np.zeros(len(labels))
        self._dominant = dict.fromkeys(labels, 0)
        self._stress_sum = 0.0
        self._stress_max = 0.0
        self._peaks: list[tuple[float, float, float]] = []  # heap of (index, start_s, end_s)

    def add(self, result: FrameResult) -> None:
        self.add_values(
            result.scores, result.emotion, result.stress.index, result.start_s, result.end_s
        )

    def add_values(
        self, scores: dict[str, float], emotion: str, index: float, start_s: float, end_s: float
    ) -> None:
        self.windows += 1
        self._scores += [scores.get(label, 0.0) for label in self.labels]
        self._dominant[emotion] = self._dominant.get(emotion, 0) + 1
        self._stress_sum += index
        self._stress_max = max(self._stress_max, index)
        item = (index, start_s, end_s)
        if len(self._peaks) < self.PEAKS:
            heapq.heappush(self._peaks, item)
        else:
            heapq.heappushpop(self._peaks, item)

    def state(self) -> dict[str, Any]:
        """The running totals as JSON values, for :meth:`restore` in another process."""
        return {
            "windows": self.windows,
            "scores": [float(v) for v in self._scores],
            "dominant": dict(self._dominant),
            "stress_sum": self._stress_sum,
            "stress_max": self._stress_max,
            "peaks": [list(p) for p in self._peaks],
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (:meth:`state` of the same labels)."""
        scores = [float(v) for v in state["scores"]]
        if len(scores) != len(self.labels):
            raise ValueError("a summary state of other labels")
        self.windows = int(state["windows"])
        self._scores = np.asarray(scores, dtype=np.float64)
        self._dominant.update({str(k): int(v) for k, v in state["dominant"].items()})
        self._stress_sum = float(state["stress_sum"])
        self._stress_max = float(state["stress_max"])
        peaks = [(float(i), float(s), float(e)) for i, s, e in state["peaks"]][: self.PEAKS]
        heapq.heapify(peaks)
        self._peaks = peaks

    def as_dict(self) -> dict[str, Any]:
        n = max(self.windows, 1)
        mix = {
            label: round(float(s / n), 4)
            for label, s in zip(self.labels, self._scores, strict=True)
        }
        peaks = sorted(self._peaks, key=lambda p: p[1])
        return {
            "windows": self.windows,
            "emotion_mix": mix,
            "dominant_emotion": max(mix, key=mix.__getitem__) if self.windows else None,
            "windows_by_emotion": {k: v for k, v in self._dominant.items() if v},
            "stress": {
                "mean": round(self._stress_sum / n, 1) if self.windows else None,
                "max": round(self._stress_max, 1) if self.windows else None,
                "peaks": [{"start_s": s, "end_s": e, "index": i} for i, s, e in peaks],
            },
        }


class StreamPipeline:
    """Decoder, ring buffer, VAD, window scheduler and stress scorer of one stream (one track).

    A finished pipeline's :meth:`checkpoint` lets another process continue the stream (a
    session handed over by a draining node): ``StreamPipeline(..., resume=state)`` starts at the
    position the first one reached, with its speaker baseline, smoothed index and totals."""

    def __init__(
        self,
        config: PipelineConfig,
        fmt: AudioFormat | None = None,
        *,
        labels: tuple[str, ...],
        narrowband: bool | None = None,
        resume: dict[str, Any] | None = None,
    ) -> None:
        self.config = config
        self.format = fmt or AudioFormat()
        self.labels = labels
        self.narrowband = (
            self.format.sample_rate < SAMPLE_RATE if narrowband is None else narrowband
        )
        frame = SAMPLE_RATE * config.vad_frame_ms // 1000
        # a continued stream starts on the VAD's frame grid (at most one frame past the position
        # the first process reached; that much audio had never made a whole frame there)
        start = -(-int(resume["position"]) // frame) * frame if resume else 0
        self._decoder = StreamDecoder(self.format)
        self._ring = RingBuffer(int(config.buffer_s * SAMPLE_RATE), start=start)
        self._vad = VadGate(
            frame_ms=config.vad_frame_ms,
            aggressiveness=config.vad_aggressiveness,
            capacity_s=config.buffer_s,
            start_frame=start // frame,
        )
        self._scheduler = WindowScheduler(
            window_s=config.window_s,
            hop_s=config.hop_s,
            min_speech_ratio=config.min_speech_ratio,
            start=start,
        )
        self.scorer = StressScorer(
            warmup=config.baseline_windows,
            smoothing=config.stress_smoothing,
            narrowband=self.narrowband,
        )
        self.summary = Summary(labels)
        self.utterance_summary = Summary(labels)  # of complete_utterance: each counts once
        self._cutter = (
            UtteranceCutter(
                max_s=config.max_utterance_s,
                min_s=config.min_utterance_s,
                seq=int(resume.get("utterances", 0)) if resume else 0,
            )
            if config.utterances
            else None
        )
        self.skipped_silence = 0
        self._speech_before = 0.0  # speech seconds of the process this stream continues
        self.finished = False
        if resume:
            self.summary.restore(resume["summary"])
            if "utterance_summary" in resume:
                self.utterance_summary.restore(resume["utterance_summary"])
            self.scorer.restore(resume["scorer"])
            self.skipped_silence = int(resume["skipped_silence"])
            self._speech_before = float(resume["speech_s"])

    def checkpoint(self) -> dict[str, Any]:
        """What another process needs to continue this stream (JSON values); after finish()."""
        return {
            "position": self._ring.end,
            "speech_s": self.speech_s,
            "skipped_silence": self.skipped_silence,
            "summary": self.summary.state(),
            "scorer": self.scorer.state(),
            "utterances": self._cutter.seq if self._cutter else 0,
            "utterance_summary": self.utterance_summary.state(),
        }

    @property
    def audio_s(self) -> float:
        return self._ring.end / SAMPLE_RATE

    @property
    def speech_s(self) -> float:
        return self._speech_before + self._vad.speech_frames * self._vad.frame_samples / SAMPLE_RATE

    @property
    def in_speech(self) -> bool:
        return self._vad.in_speech

    def feed(self, data: bytes) -> Fed:
        """Decode a chunk in the stream's format and advance the stream."""
        return self.feed_samples(self._decoder.feed(data))

    def feed_chunks(self, chunks: list[bytes]) -> tuple[Fed, list[AudioFormatError]]:
        """Several chunks at once (cheaper than one by one); bad ones are skipped and returned."""
        samples, errors = self._decoder.feed_many(chunks)
        return self.feed_samples(samples), errors

    def feed_samples(self, samples: np.ndarray) -> Fed:
        """Advance the stream by mono float32 samples at 16 kHz, of any length.

        Windows are cut as the audio arrives: a feed longer than the ring buffer can hold is
        taken in slices, each window read out before later audio overwrites it.
        """
        if self.finished:
            raise RuntimeError("the stream has finished")
        fed = Fed()
        step = self._ring.capacity - self._scheduler.window_samples
        for at in range(0, samples.shape[0], step):
            part = samples[at : at + step]
            self._ring.write(part)
            events = self._vad.process(part)
            fed.vad_events += events
            if self._cutter is not None:
                fed.utterances += self._cutter.feed(self._ring, self._ring.end, part, events)
            due = self._scheduler.due(self._ring.end, self._vad)
            fed.windows += [self._window(w) for w in due.windows]
            fed.skipped_silence += due.skipped_silence
        self.skipped_silence += fed.skipped_silence
        return fed

    def finish(self) -> Fed:
        """End of stream: the resampler's tail, then a final window if speech is uncovered."""
        fed = self.feed_samples(self._decoder.flush())
        self.finished = True
        plan = self._scheduler.finish(self._ring.end, self._vad)
        if plan is not None and plan.end - plan.start >= MIN_FINAL_WINDOW_S * SAMPLE_RATE:
            fed.windows.append(self._window(plan))
        if self._cutter is not None:
            fed.utterances += self._cutter.finish(self._ring.end)
        return fed

    def _window(self, window: Window) -> Window:
        window.samples = self._ring.read(window.start, window.end)
        return window

    def measure(self, window: Window | Utterance) -> Prosody:
        return measure(window.samples, narrowband=self.narrowband)

    def complete(
        self,
        window: Window,
        answer: WindowAnswer,
        prosody: Prosody,
        *,
        prosody_missing: str | None = None,
    ) -> FrameResult:
        """Combine what the model said of a window and its prosody into its result; windows in
        stream order. ``prosody_missing`` says why the window has no prosody (its stress then
        rests on the emotions alone, with lower confidence)."""
        scores = self._scores(answer)
        best = max(scores, key=scores.__getitem__)
        result = FrameResult(
            start_s=window.start_s,
            end_s=window.end_s,
            emotion=best,
            confidence=scores[best],
            scores=scores,
            stress=self.scorer.update(
                prosody, scores, window.speech_ratio, prosody_missing=prosody_missing
            ),
            speech_ratio=window.speech_ratio,
            answer=answer,
            narrowband=self.narrowband,
        )
        self.summary.add(result)
        return result

    def complete_utterance(
        self,
        utterance: Utterance,
        answer: WindowAnswer,
        prosody: Prosody,
        *,
        prosody_missing: str | None = None,
    ) -> UtteranceResult:
        """What the model said of a whole utterance, and its stress: the same speaker baseline
        as the windows, neither learnt from nor smoothed. Added to ``utterance_summary``."""
        scores = self._scores(answer)
        best = max(scores, key=scores.__getitem__)
        result = UtteranceResult(
            seq=utterance.seq,
            start_s=utterance.start_s,
            end_s=utterance.end_s,
            emotion=best,
            confidence=scores[best],
            scores=scores,
            stress=self.scorer.assess(prosody, scores, 1.0, prosody_missing=prosody_missing),
            voiced_s=prosody.voiced_fraction * (utterance.end_s - utterance.start_s),
            split=utterance.split,
            answer=answer,
        )
        self.utterance_summary.add_values(
            result.scores, result.emotion, result.stress.index, result.start_s, result.end_s
        )
        return result

    def _scores(self, answer: WindowAnswer) -> dict[str, float]:
        if not np.isfinite(answer.probs).all():
            raise ValueError("the model's probabilities are not finite")
        return {label: float(p) for label, p in zip(self.labels, answer.probs, strict=True)}

    def summary_dict(self) -> dict[str, Any]:
        out = self.summary.as_dict()
        out.update(
            duration_s=round(self.audio_s, 3),
            speech_s=round(self.speech_s, 3),
            skipped_silence=self.skipped_silence,
            narrowband=self.narrowband,
        )
        if self.config.utterances:  # the emotion mix by utterance: each counts once
            u = self.utterance_summary.as_dict()
            out["utterances"] = {
                "count": u.pop("windows"),
                "by_emotion": u.pop("windows_by_emotion"),
                **u,
            }
        return out


def chunks(samples: np.ndarray, chunk_s: float = 0.1) -> Iterator[np.ndarray]:
    step = max(1, int(chunk_s * SAMPLE_RATE))
    for start in range(0, samples.shape[0], step):
        yield samples[start : start + step]


def plan_file(
    samples: np.ndarray,
    labels: tuple[str, ...],
    config: PipelineConfig | None = None,
    *,
    narrowband: bool = False,
) -> tuple[StreamPipeline, list[Window], list[Utterance]]:
    """Run a whole mono 16 kHz signal through the live pipeline in 100 ms chunks: its windows,
    and its utterances (none unless ``config.utterances``)."""
    pipeline = StreamPipeline(config or PipelineConfig(), labels=labels, narrowband=narrowband)
    windows: list[Window] = []
    utterances: list[Utterance] = []
    for fed in (*map(pipeline.feed_samples, chunks(samples)), pipeline.finish()):
        windows.extend(fed.windows)
        utterances.extend(fed.utterances)
    return pipeline, windows, utterances


def timeline(
    model_info: dict[str, Any],
    config: PipelineConfig,
    frames: list[FrameResult],
    summary: dict[str, Any],
    utterances: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A whole file's timeline, the one shape ``voxaffect analyze`` and ``POST /api/analyze``
    both give: the model, the analysis settings, each window's result, the summary, and each
    utterance's result when ``config.utterances``."""
    out = {
        "model": model_info,
        "config": config.as_dict(),
        "frames": [f.as_dict() for f in frames],
        "summary": summary,
    }
    if config.utterances:
        out["utterances"] = utterances or []
    return out


def complete_file(
    pipeline: StreamPipeline,
    windows: list[Window],
    answers: list[WindowAnswer],
    model_info: dict[str, Any],
    prosody: list[Prosody] | None = None,
    utterances: Sequence[tuple[Utterance, WindowAnswer]] = (),
) -> dict[str, Any]:
    """The timeline from what the model said of each window, in window order, and of each
    utterance; ``prosody`` (of the windows) if already measured, else measured here."""
    prosody = prosody or [pipeline.measure(w) for w in windows]
    frames = [
        pipeline.complete(w, answer, p)
        for w, answer, p in zip(windows, answers, prosody, strict=True)
    ]
    said = [pipeline.complete_utterance(u, a, pipeline.measure(u)) for u, a in utterances]
    return timeline(
        model_info,
        pipeline.config,
        frames,
        pipeline.summary_dict(),
        [u.as_dict() for u in said],
    )


def analyze(
    samples: np.ndarray,
    model: Any,
    config: PipelineConfig | None = None,
    *,
    narrowband: bool = False,
    embeddings: bool = False,
    max_batch: int = 8,
) -> dict[str, Any]:
    """Timeline of a whole mono 16 kHz signal with ``model`` (an :class:`EmotionModel`)."""
    pipeline, windows, utterances = plan_file(
        samples, tuple(model.labels), config, narrowband=narrowband
    )
    answers: list[Any] = [None] * len(windows)
    by_length: dict[int, list[int]] = {}
    for i, w in enumerate(windows):
        by_length.setdefault(w.samples.shape[0], []).append(i)
    for indices in by_length.values():  # equal lengths stack exactly
        for at in range(0, len(indices), max_batch):
            part = indices[at : at + max_batch]
            batch = np.stack([windows[i].samples for i in part])
            prediction = model.predict(batch, embeddings=embeddings)
            for j, i in enumerate(part):
                answers[i] = prediction.answer(j)
    said = [  # each alone: lengths differ, and a clip is classified as generate() would
        (u, model.predict(u.samples[None, :], embeddings=embeddings).answer(0)) for u in utterances
    ]
    return complete_file(pipeline, windows, answers, model.describe(), utterances=said)
