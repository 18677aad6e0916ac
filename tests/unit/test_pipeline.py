from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from engine.audio import AudioFormat
from engine.pipeline import PipelineConfig, StreamPipeline, analyze
from tests import LABELS
from tests.support.speech import noise, silence, speech, to_pcm16

pytestmark = pytest.mark.unit


def test_file_timeline_has_file_times_labels_and_summary(tiny_model):
    s = speech()
    audio = np.concatenate([silence(3.0), s, silence(3.0)])
    timeline = analyze(audio, tiny_model)
    frames = timeline["frames"]
    assert frames, "speech must produce windows"
    assert frames[0]["start_s"] >= 1.0  # the leading silence is skipped
    assert frames[-1]["end_s"] <= audio.size / 16000
    for f in frames:
        assert f["end_s"] - f["start_s"] == pytest.approx(2.0)
        assert set(f["scores"]) == set(LABELS)
        assert f["emotion"] == max(f["scores"], key=f["scores"].get)
        assert 0 <= f["stress"]["index"] <= 100
        assert f["device"] == "cpu"
        assert f["speech_ratio"] >= 0.3
    summary = timeline["summary"]
    assert summary["windows"] == len(frames)
    assert summary["skipped_silence"] >= 4
    assert summary["duration_s"] == pytest.approx(audio.size / 16000, abs=0.01)
    assert sum(summary["emotion_mix"].values()) == pytest.approx(1.0, abs=1e-3)
    assert timeline["model"]["random_weights"] is True


def test_noise_and_silence_never_reach_the_model(tiny_model):
    calls = []

    class Counting:
        labels, device = tiny_model.labels, "cpu"

        def describe(self):
            return {}

        def predict(self, windows, *, embeddings=False):
            calls.append(windows.shape[0])
            return tiny_model.predict(windows)

    audio = np.concatenate([silence(3.0), noise(3.0, "white", 0.1), noise(3.0, "pink", 0.1)])
    timeline = analyze(audio, Counting())
    assert calls == [] and timeline["frames"] == []
    assert timeline["summary"]["skipped_silence"] == 8


def test_streaming_pcm_chunks_gives_the_same_windows_as_the_file(tiny_model):
    audio = np.concatenate([silence(0.5), speech(), silence(0.5)])
    config = PipelineConfig()
    pipe = StreamPipeline(config, AudioFormat("pcm_s16le", 16000, 1), labels=tiny_model.labels)
    pcm = to_pcm16(audio)
    spans = []
    for i in range(0, len(pcm), 3200):  # 100 ms chunks
        spans += [(w.start_s, w.end_s) for w in pipe.feed(pcm[i : i + 3200]).windows]
    spans += [(w.start_s, w.end_s) for w in pipe.finish().windows]
    file_spans = [(f["start_s"], f["end_s"]) for f in analyze(audio, tiny_model, config)["frames"]]
    assert spans == file_spans


def test_an_8khz_stream_is_narrowband(tiny_model):
    pipe = StreamPipeline(PipelineConfig(), AudioFormat("mulaw", 8000, 1), labels=tiny_model.labels)
    assert pipe.narrowband and pipe.scorer.narrowband


def test_cli_analyze_prints_json_with_a_random_weight_warning(tmp_path, tiny_model_dir):
    path = tmp_path / "talk.wav"
    sf.write(path, np.concatenate([silence(0.5), speech(), silence(0.5)]), 16000, subtype="PCM_16")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "server.cli",
            "analyze",
            str(path),
            "--model",
            str(tiny_model_dir),
            "--json",
            "--window-s",
            "1.5",
            "--hop-s",
            "0.5",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    timeline = json.loads(out.stdout)
    assert "RANDOM WEIGHTS" in timeline["warning"]
    assert timeline["frames"][0]["end_s"] - timeline["frames"][0]["start_s"] == pytest.approx(1.5)
    assert {
        "start_s",
        "end_s",
        "emotion",
        "confidence",
        "scores",
        "stress",
        "speech_ratio",
        "device",
    } <= set(timeline["frames"][0])
    text = subprocess.run(
        [sys.executable, "-m", "server.cli", "analyze", str(path), "--model", str(tiny_model_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert text.startswith("WARNING: this model has RANDOM WEIGHTS")


def test_cli_analyze_reports_bad_input_without_a_traceback(tmp_path, tiny_model_dir):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio")
    out = subprocess.run(
        [sys.executable, "-m", "server.cli", "analyze", str(bad), "--model", str(tiny_model_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert "unreadable" in out.stderr and "Traceback" not in out.stderr


def _run(pipeline: StreamPipeline, samples: np.ndarray, model, *, finish: bool) -> list:
    """Feed ``samples`` in 100 ms chunks and complete every window with ``model``."""
    windows = []
    for at in range(0, samples.size, 1600):
        windows += pipeline.feed_samples(samples[at : at + 1600]).windows
    if finish:
        windows += pipeline.finish().windows
    frames = []
    for w in windows:
        answer = model.predict(w.samples[None, :]).answer(0)
        frames.append(pipeline.complete(w, answer, pipeline.measure(w)))
    return frames


def test_a_checkpointed_stream_continues_in_another_pipeline_where_it_stopped(tiny_model):
    """A draining node's handoff: the second pipeline starts at the first one's position (on
    the VAD's frame grid), with its speaker baseline, smoothed index and totals — so stress is
    not learnt again and the summary covers both parts."""
    config = PipelineConfig()
    labels = tuple(tiny_model.labels)
    first_audio = np.concatenate([speech(), silence(0.5), speech(pitch=70)])
    first = StreamPipeline(config, labels=labels)
    before = _run(first, first_audio, tiny_model, finish=True)
    assert len(before) >= 4 and not first.scorer.calibrating
    state = json.loads(json.dumps(first.checkpoint()))  # what the store keeps
    assert state["position"] == first_audio.size

    second = StreamPipeline(config, labels=labels, resume=state)
    after = _run(second, speech(pitch=40), tiny_model, finish=True)
    assert after, "speech after the handoff gives windows"
    assert after[0].start_s >= first_audio.size / 16000  # times go on from the position
    assert after[0].start_s - first_audio.size / 16000 < 0.03  # within one VAD frame
    assert not after[0].stress.calibrating  # the baseline came along, not relearnt
    assert after[0].stress.baseline["windows"] == first.scorer.baseline.windows
    fresh = StreamPipeline(config, labels=labels)
    assert _run(fresh, speech(pitch=40), tiny_model, finish=True)[0].stress.calibrating
    summary = second.summary_dict()
    assert summary["windows"] == len(before) + len(after)
    assert summary["speech_s"] > first.speech_s
    assert summary["duration_s"] == pytest.approx(second.audio_s, abs=1e-3)
    mix = summary["emotion_mix"]
    expected = {
        k: round(sum(f.scores[k] for f in before + after) / (len(before) + len(after)), 4)
        for k in labels
    }
    assert mix == pytest.approx(expected, abs=1e-4)


def test_a_checkpoint_of_other_labels_is_refused(tiny_model):
    labels = tuple(tiny_model.labels)
    first = StreamPipeline(PipelineConfig(), labels=labels)
    _run(first, speech(), tiny_model, finish=True)
    state = first.checkpoint()
    with pytest.raises(ValueError, match="other labels"):
        StreamPipeline(PipelineConfig(), labels=labels[:3], resume=state)
