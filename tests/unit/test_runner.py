"""The session runner with scripted fakes: a window analysis the test holds and releases, and a
publisher that records every event. Nothing here depends on how fast this machine is."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from engine.audio import AudioFormat
from engine.batcher import InferenceBatcher, WindowExpired
from engine.model import Prediction
from engine.pipeline import PipelineConfig, StreamPipeline
from server.runtime import ThreadRuntime
from server.sessions.analysis import AnalysisError, WindowAnalyser
from server.sessions.events import Ended, Error, Result, Skipped, UtteranceDone, VadChange
from server.sessions.prosody_pool import ProsodyUnavailable
from server.sessions.runner import (
    FILE,
    LIVE,
    InboxFull,
    SessionClosed,
    SessionRunner,
    Track,
    WindowPolicy,
)
from server.sessions.session import Session
from tests import LABELS
from tests.support.fakes import WAIT_S, FakeAnalyse, HeldFeed, Recorder, calm_prosody
from tests.support.speech import silence, speech, to_pcm16

pytestmark = pytest.mark.unit


def runner_for(
    analyse: FakeAnalyse,
    *,
    policy=LIVE,
    inbox_max_bytes: int = 4 << 20,
    runtime: ThreadRuntime | None = None,
    utterances: bool = False,
    forget=None,
    clock=time.monotonic,
) -> tuple[SessionRunner, Recorder]:
    recorder = Recorder()
    fmt = AudioFormat()
    pipeline = StreamPipeline(PipelineConfig(utterances=utterances), fmt, labels=LABELS)
    runner = SessionRunner(
        Session(id="s1", source="socketio", format=fmt),
        {None: Track(None, pipeline)},
        analyse=analyse,
        publish=recorder,
        runtime=runtime or ThreadRuntime(),
        policy=policy,
        inbox_max_bytes=inbox_max_bytes,
        feed_max_bytes=1 << 20,
        forget=forget,
        clock=clock,
    )
    threading.Thread(target=runner.run, daemon=True).start()
    return runner, recorder


def talk(seconds: float) -> np.ndarray:
    """Continuous espeak-ng speech of at least ``seconds``."""
    s = speech()
    return np.tile(s, int(np.ceil(seconds * 16000 / s.size)))[: int(seconds * 16000)]


def spans(recorder: Recorder) -> list[tuple[float, float]]:
    return [(r.result["start_s"], r.result["end_s"]) for r in recorder.of(Result)]


def test_every_due_window_is_submitted_at_once_and_results_come_in_stream_order():
    analyse = FakeAnalyse(held=True)
    runner, rec = runner_for(analyse)
    pcm = to_pcm16(talk(4.0))
    runner.push(None, pcm[: 2 * 32000])  # [0, 2] comes due
    analyse.started(1)
    runner.push(None, pcm[2 * 32000 : 3 * 32000])  # [1, 3] comes due while [0, 2] is analysed
    analyse.started(2)  # submitted at once: the batcher, not the runner, decides what waits
    analyse.release(10)
    runner.end("done")
    summary = rec.ended().summary
    assert spans(rec)[:2] == [(0.0, 2.0), (1.0, 3.0)]
    assert [r.result["hop_s"] for r in rec.of(Result)][:2] == [None, 1.0]
    assert summary["expired"] == 0


def test_each_window_carries_its_deadline_and_its_track_as_the_fairness_key():
    now = [100.0]
    analyse = FakeAnalyse()
    fmt = AudioFormat()
    track = Track(None, StreamPipeline(PipelineConfig(), fmt, labels=LABELS))
    recorder = Recorder()
    runner = SessionRunner(
        Session(id="s1", source="socketio", format=fmt),
        {None: track},
        analyse=analyse,
        publish=recorder,
        runtime=ThreadRuntime(),
        policy=WindowPolicy(latency_budget_s=1.25),
        clock=lambda: now[0],
    )
    threading.Thread(target=runner.run, daemon=True).start()
    runner.push(None, to_pcm16(talk(2.0)))  # arrives at 100.0
    analyse.started(1)
    runner.end("done")
    recorder.ended()
    assert analyse.deadlines[0] == 101.25 and analyse.keys[0] is track


def test_an_expired_window_is_counted_and_the_next_result_says_how_many():
    analyse = FakeAnalyse()
    analyse.expire = {1, 2}
    runner, rec = runner_for(analyse)
    runner.push(None, to_pcm16(talk(5.0)))  # [0, 2], [1, 3], [2, 4], [3, 5] come due
    runner.end("done")
    summary = rec.ended().summary
    assert spans(rec)[:2] == [(0.0, 2.0), (3.0, 5.0)]
    assert [r.result["expired"] for r in rec.of(Result)][:2] == [0, 2]
    assert [r.result["hop_s"] for r in rec.of(Result)][:2] == [None, 3.0]
    assert summary["expired"] == 2
    assert [(s.reason, s.count) for s in rec.of(Skipped)] == [("expired", 1)] * 2
    assert [r.result["seq"] for r in rec.of(Result)][:2] == [1, 2]


def test_ending_while_a_window_is_in_flight_waits_for_it_then_summarises():
    analyse = FakeAnalyse(held=True)
    runner, rec = runner_for(analyse)
    runner.push(None, to_pcm16(np.concatenate([talk(2.5), silence(0.5)])))
    analyse.started(1)
    runner.end("ended by client")
    with pytest.raises(SessionClosed):
        runner.push(None, b"\x00\x00" * 160)
    assert rec.of(Ended) == []  # not before the window in flight is done
    analyse.release(10)
    ended = rec.ended()
    results = rec.of(Result)
    assert ended.reason == "ended by client" and ended.summary["results"] == len(results) >= 1
    assert rec.events.index(ended) > rec.events.index(results[-1])
    assert runner.done.wait(WAIT_S)


def test_a_failed_window_is_reported_and_the_session_goes_on():
    analyse = FakeAnalyse()
    analyse.fail = {0}
    runner, rec = runner_for(analyse)
    runner.push(None, to_pcm16(talk(4.0)))
    runner.end("done")
    summary = rec.ended().summary
    assert [e.code for e in rec.of(Error)] == ["INFERENCE_FAILED"]
    assert rec.of(Result) and summary["failed"] == 1
    assert [r.result["seq"] for r in rec.of(Result)] == list(range(1, len(rec.of(Result)) + 1))


def test_a_window_without_prosody_says_so_and_scores_lower_confidence():
    stress = {}
    for missing in (None, "timeout"):
        analyse = FakeAnalyse()
        analyse.prosody_missing = missing
        runner, rec = runner_for(analyse)
        runner.push(None, to_pcm16(talk(2.0)))
        runner.end("done")
        rec.ended()
        stress[missing] = rec.of(Result)[0].result["stress"]
    assert "prosody" not in stress[None]["components"]
    assert stress["timeout"]["components"]["prosody"] == {
        "available": False,
        "reason": "timeout",
        "points": 0.0,
    }
    assert stress["timeout"]["confidence"] < stress[None]["confidence"]


def test_a_catch_up_burst_longer_than_the_ring_buffer_loses_no_window():
    """15 s of audio at once (the ring holds 10 s): windows are cut as the audio is fed."""
    analyse = FakeAnalyse()
    runner, rec = runner_for(analyse, policy=FILE)
    runner.push(None, to_pcm16(talk(15.0)))
    runner.end("done")
    summary = rec.ended().summary
    assert rec.of(Error) == []
    assert spans(rec)[:14] == [(float(i), float(i + 2)) for i in range(14)]
    assert summary["windows"] == len(rec.of(Result))


def test_a_live_burst_that_the_model_can_answer_in_time_is_analysed_whole():
    analyse = FakeAnalyse()
    runner, rec = runner_for(analyse)
    runner.push(None, to_pcm16(talk(15.0)))
    runner.end("done")
    summary = rec.ended().summary
    assert rec.of(Error) == [] and summary["expired"] == 0
    assert spans(rec)[:14] == [(float(i), float(i + 2)) for i in range(14)]
    assert set(analyse.calls) == {"live"}


def test_file_analysis_waits_for_room_instead_of_dropping_windows():
    analyse = FakeAnalyse(held=True)
    runner, rec = runner_for(analyse, policy=FILE)
    runner.push(None, talk(12.0), block=True)
    runner.end("file")
    analyse.started(FILE.max_inflight)
    analyse.release(100)
    summary = rec.ended().summary
    assert summary["expired"] == 0 and analyse.deadlines[0] is None
    assert spans(rec)[:10] == [(float(i), float(i + 2)) for i in range(10)]
    assert set(analyse.calls) == {"bulk"}


def test_a_full_inbox_refuses_more_audio_until_it_drains():
    runtime = HeldFeed()
    runner, rec = runner_for(FakeAnalyse(), inbox_max_bytes=64_000, runtime=runtime)
    runner.push(None, to_pcm16(talk(1.0)))  # over INLINE_FEED_BYTES: offloaded
    assert runtime.entered.wait(WAIT_S)  # the worker is decoding it, held
    chunk = to_pcm16(talk(0.1))
    accepted = 0
    with pytest.raises(InboxFull):
        for _ in range(1000):
            runner.push(None, chunk)
            accepted += 1
    assert accepted * len(chunk) <= 64_000
    runtime.release.set()
    runner.push(None, chunk, block=True)  # room again once the worker has taken the inbox
    runner.end("done")
    assert rec.ended().summary["audio_received_s"] == 0.0  # the edge counts audio, not the runner


def test_vad_changes_are_published_with_their_times():
    analyse = FakeAnalyse()
    runner, rec = runner_for(analyse)
    runner.push(None, to_pcm16(np.concatenate([silence(1.0), talk(3.0), silence(1.0)])))
    runner.end("done")
    rec.ended()
    changes = [v.payload for v in rec.of(VadChange)]
    assert changes[0]["speech"] is True and changes[0]["at_s"] == pytest.approx(1.0, abs=0.2)
    assert changes[-1]["speech"] is False


# --- utterances ----------------------------------------------------------------------------


def two_utterances() -> np.ndarray:
    """Speech 0.5-3.5 s and 4.5-6.5 s, silence around: two utterances."""
    return np.concatenate([silence(0.5), talk(3.0), silence(1.0), talk(2.0), silence(1.0)])


def test_each_utterance_is_analysed_at_utterance_priority_and_published_in_order():
    analyse = FakeAnalyse()
    runner, rec = runner_for(analyse, utterances=True)
    runner.push(None, to_pcm16(two_utterances()))
    runner.end("done")
    summary = rec.ended().summary
    done = rec.of(UtteranceDone)
    assert [d.outcome for d in done] == ["analysed", "analysed"]
    payloads = [d.payload for d in done]
    assert [p["utterance_seq"] for p in payloads] == [0, 1]
    assert payloads[0]["start_s"] == pytest.approx(0.5, abs=0.2)
    assert payloads[1]["end_s"] == pytest.approx(6.5, abs=0.5)
    assert payloads[0]["session_id"] == "s1" and "track" not in payloads[0]
    assert {"emotion", "confidence", "scores", "stress", "speech_s", "voiced_s"} <= set(payloads[0])
    assert [p["emotion"] for p in payloads] == [LABELS[0], LABELS[1]]
    assert analyse.utterance_calls[0] == pytest.approx(3.0 * 16000, rel=0.15)
    assert summary["utterances"] == {
        "count": 2,
        "emotion_mix": summary["utterances"]["emotion_mix"],
        "dominant_emotion": summary["utterances"]["dominant_emotion"],
        "by_emotion": {LABELS[0]: 1, LABELS[1]: 1},
        "stress": summary["utterances"]["stress"],
        "dropped": {},
    }
    assert rec.events.index(rec.ended()) > rec.events.index(done[-1])


def test_a_track_s_utterances_complete_in_order_whatever_order_the_model_answers_in():
    analyse = FakeAnalyse()
    analyse.utterances_open.clear()
    runner, rec = runner_for(analyse, utterances=True)
    runner.push(None, to_pcm16(two_utterances()))
    analyse.utterances_started(2)
    analyse.utterances_open.set()  # both answer at once; either may finish first
    runner.end("done")
    rec.ended()
    assert [d.payload["utterance_seq"] for d in rec.of(UtteranceDone)] == [0, 1]


def test_an_utterance_the_batcher_dropped_as_late_is_counted_and_the_next_goes_on():
    analyse = FakeAnalyse()
    analyse.late_utterances = {0}
    runner, rec = runner_for(analyse, utterances=True)
    runner.push(None, to_pcm16(two_utterances()))
    runner.end("done")
    summary = rec.ended().summary
    assert [(d.outcome, d.payload is None) for d in rec.of(UtteranceDone)] == [
        ("late", True),
        ("analysed", False),
    ]
    assert summary["utterances"]["count"] == 1 and summary["utterances"]["dropped"] == {"late": 1}
    assert rec.of(Error) == []


def test_the_summary_waits_for_the_last_utterances_within_a_bound_then_drops_them():
    """A held model: the utterances never come back. The summary waits utterance_wait_s, not
    for ever; what is still out is dropped as ended, and the batcher is told to forget it."""
    analyse = FakeAnalyse()
    analyse.utterances_open.clear()
    forgotten: list[object] = []
    policy = WindowPolicy(utterance_wait_s=0.5)
    runner, rec = runner_for(analyse, utterances=True, policy=policy, forget=forgotten.append)
    runner.push(None, to_pcm16(two_utterances()))
    analyse.utterances_started(2)
    runner.end("done")
    summary = rec.ended().summary
    assert summary["utterances"]["count"] == 0
    assert summary["utterances"]["dropped"] == {"ended": 2}
    assert [d.outcome for d in rec.of(UtteranceDone)] == ["ended", "ended"]
    assert forgotten == [runner.tracks[None]]
    analyse.utterances_open.set()  # a late answer finds its slot gone: nothing more published
    assert runner.done.wait(WAIT_S)
    assert len(rec.of(UtteranceDone)) == 2


def test_an_utterance_carries_the_late_limit_as_its_deadline_and_a_file_s_are_bulk():
    now = [50.0]
    for policy, priority, deadline in (
        (WindowPolicy(utterance_delay_s=20.0), "utterance", 70.0),
        (FILE, "bulk", None),
    ):
        analyse = FakeAnalyse()
        runner, recorder = runner_for(analyse, policy=policy, utterances=True, clock=lambda: now[0])
        track = runner.tracks[None]
        runner.push(None, to_pcm16(two_utterances()))
        runner.end("done")
        recorder.ended()
        assert len(recorder.of(UtteranceDone)) == 2
        if priority == "bulk":
            assert analyse.utterance_calls == [] and set(analyse.calls) == {"bulk"}
        else:
            i = analyse.calls.index("utterance")
            assert analyse.deadlines[i] == deadline and analyse.keys[i] is track


# --- the analysis step -----------------------------------------------------------------------


class FakeModel:
    device = "cpu"

    def predict(self, windows, *, embeddings=False):
        probs = np.full((windows.shape[0], len(LABELS)), 1 / len(LABELS), dtype=np.float32)
        return Prediction(probs, device="cpu")


def test_a_window_whose_prosody_times_out_is_analysed_without_it_and_counted():
    failures: list[str] = []

    def hung(samples, narrowband):
        raise ProsodyUnavailable("timeout", "no answer within 5 s")

    batcher = InferenceBatcher(FakeModel(), max_wait_ms=0)
    analyser = WindowAnalyser(
        batcher, hung, inference_timeout_s=WAIT_S, on_prosody_failure=failures.append
    )
    analysis = analyser(
        np.zeros(32000, np.float32), narrowband=False, embeddings=False, priority="live"
    )
    assert analysis.prosody_missing == "timeout" and np.isnan(analysis.prosody.f0_mean_st)
    assert analysis.answer.probs.shape == (len(LABELS),) and failures == ["timeout"]
    batcher.close()


def test_a_window_the_model_does_not_answer_in_time_is_an_inference_timeout():
    class Stuck(FakeModel):
        release = threading.Event()

        def predict(self, windows, *, embeddings=False):
            self.release.wait(WAIT_S)
            return super().predict(windows)

    batcher = InferenceBatcher(Stuck(), max_wait_ms=0)
    analyser = WindowAnalyser(batcher, lambda s, n: calm_prosody(), inference_timeout_s=0.05)
    with pytest.raises(AnalysisError) as info:
        analyser(np.zeros(32000, np.float32), narrowband=False, embeddings=False, priority="live")
    assert info.value.code == "INFERENCE_TIMEOUT"
    Stuck.release.set()
    batcher.close()


def test_a_window_that_expires_in_the_queue_costs_no_prosody_and_says_it_expired():
    class Held(FakeModel):
        entered, release = threading.Event(), threading.Event()

        def predict(self, windows, *, embeddings=False):
            self.entered.set()
            assert self.release.wait(WAIT_S)
            return super().predict(windows)

    now = [0.0]
    measured: list[int] = []
    batcher = InferenceBatcher(
        Held(), max_batch=1, max_wait_ms=0, seconds_per_window=0.5, clock=lambda: now[0]
    )
    analyser = WindowAnalyser(
        batcher, lambda s, n: measured.append(1) or calm_prosody(), inference_timeout_s=WAIT_S
    )
    x = np.zeros(32000, np.float32)
    args = {"narrowband": False, "embeddings": False, "priority": "live"}
    first = threading.Thread(target=analyser, args=(x,), kwargs={**args, "deadline": 10.0})
    first.start()
    assert Held.entered.wait(WAIT_S)  # the model is busy with the first window
    outcome: list[str] = []

    def late() -> None:
        try:
            analyser(x, **args, deadline=1.0)
            outcome.append("analysed")
        except WindowExpired:
            outcome.append("expired")

    second = threading.Thread(target=late)
    second.start()
    now[0] = 0.8  # 0.8 + 0.5 > 1.0: it can no longer make its deadline
    Held.release.set()
    first.join(WAIT_S)
    second.join(WAIT_S)
    assert outcome == ["expired"] and measured == [1]  # prosody for the first window only
    batcher.close()
