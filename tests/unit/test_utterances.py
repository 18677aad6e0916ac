"""Utterances: cut by the VAD at the speaker's pauses, split at a maximum length, classified as
whole clips exactly as FunASR's generate() classifies them, scored against the same baseline."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from engine import SAMPLE_RATE
from engine.funasr_compat import english_label
from engine.pipeline import PipelineConfig, StreamPipeline, chunks
from tests.support.speech import silence, speech

pytestmark = pytest.mark.unit

PHRASES = ("please hold the line", "I would like to speak to a manager now", "thank you")
ON = PipelineConfig(utterances=True)


def trimmed(text: str) -> np.ndarray:
    """espeak-ng's speech of ``text`` without its own leading and trailing quiet."""
    audio = speech(text)
    loud = np.flatnonzero(np.abs(audio) > 0.02)
    return audio[loud[0] : loud[-1] + 1]


def call(pauses: tuple[float, ...]) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """The phrases with ``pauses`` (seconds) before each, and where each phrase is."""
    parts, spans, at = [], [], 0
    for text, pause in zip(PHRASES, pauses, strict=True):
        parts.append(silence(pause))
        at += int(pause * SAMPLE_RATE)
        phrase = trimmed(text)
        parts.append(phrase)
        spans.append((at / SAMPLE_RATE, (at + phrase.size) / SAMPLE_RATE))
        at += phrase.size
    parts.append(silence(1.0))
    return np.concatenate(parts), spans


def utterances_of(audio: np.ndarray, config: PipelineConfig = ON) -> list:
    pipeline = StreamPipeline(config, labels=("neutral",))
    out = []
    for chunk in chunks(audio):
        out += pipeline.feed_samples(chunk).utterances
    return out + pipeline.finish().utterances


def test_each_thing_said_between_pauses_is_one_utterance_from_onset_to_the_hangover():
    audio, spans = call((0.5, 1.0, 1.2))
    found = utterances_of(audio)
    assert [u.seq for u in found] == [0, 1, 2]
    for u, (start, end) in zip(found, spans, strict=True):
        assert start - 0.15 <= u.start_s <= start + 0.15  # the VAD's onset
        assert end <= u.end_s <= end + 0.5  # the whole phrase, then the 300 ms hangover
        assert not u.split
        np.testing.assert_array_equal(
            u.samples, audio[u.start : u.end]
        )  # exactly the stream's audio


def test_a_pause_shorter_than_the_hangover_does_not_cut_and_none_at_all_cuts_nothing():
    audio, spans = call((0.5, 0.15, 0.15))
    found = utterances_of(audio)
    assert len(found) == 1 and found[0].start_s <= spans[0][0] + 0.15
    assert found[0].end_s >= spans[-1][1]
    assert utterances_of(silence(3.0)) == []
    assert utterances_of(audio, PipelineConfig()) == []  # off unless asked for


def test_a_speaker_who_never_pauses_is_split_at_the_maximum_and_nothing_is_lost():
    talk = np.concatenate([trimmed(PHRASES[1])] * 4)  # ~8 s without a pause
    audio = np.concatenate([silence(0.5), talk, silence(1.0)])
    found = utterances_of(audio, PipelineConfig(utterances=True, max_utterance_s=2.0))
    assert len(found) >= 4 and all(u.split for u in found[:-1]) and not found[-1].split
    assert all(u.end - u.start == 2 * SAMPLE_RATE for u in found[:-1])
    for before, after in itertools.pairwise(found):
        assert after.start == before.end  # contiguous: no audio between the pieces
    np.testing.assert_array_equal(
        np.concatenate([u.samples for u in found]), audio[found[0].start : found[-1].end]
    )


def test_the_audio_held_is_bounded_by_the_maximum_however_long_the_feed():
    talk = np.concatenate([trimmed(PHRASES[1])] * 10)  # ~20 s at once, one feed
    pipeline = StreamPipeline(
        PipelineConfig(utterances=True, max_utterance_s=3.0), labels=("neutral",)
    )
    found = pipeline.feed_samples(np.concatenate([silence(0.3), talk])).utterances
    assert len(found) >= 5
    held = pipeline._cutter._held  # the utterance in progress
    assert held < 3 * SAMPLE_RATE


def test_an_utterance_scores_as_funasr_generate_scores_the_same_clip(tiny_model, funasr_generate):
    audio, _ = call((0.5, 1.0, 1.2))
    found = utterances_of(audio)
    assert len({u.end - u.start for u in found}) == len(found)  # three different lengths
    for u in found:
        labels, reference = funasr_generate(u.samples)
        probs = tiny_model.predict(u.samples[None, :]).probs[0]
        assert [english_label(t) for t in labels] == list(tiny_model.labels)
        assert np.abs(probs - reference).max() < 1e-4


def test_an_utterance_is_scored_against_the_baseline_without_moving_it(tiny_model):
    audio, _ = call((0.5, 1.0, 1.2))
    pipeline = StreamPipeline(ON, labels=tiny_model.labels)
    results, utterances = [], []
    for chunk in chunks(audio):
        fed = pipeline.feed_samples(chunk)
        for w in fed.windows:
            results.append(
                pipeline.complete(
                    w, tiny_model.predict(w.samples[None]).answer(0), pipeline.measure(w)
                )
            )
        for u in fed.utterances:
            before = pipeline.scorer.state()
            answer = tiny_model.predict(u.samples[None]).answer(0)
            result = pipeline.complete_utterance(u, answer, pipeline.measure(u))
            assert pipeline.scorer.state() == before  # neither learnt nor smoothed
            assert result.stress.index == result.stress.raw_index
            utterances.append(result)
    assert utterances and results
    row = utterances[-1].as_dict()
    assert row["utterance_seq"] == utterances[-1].seq and row["end_s"] > row["start_s"]
    assert sum(row["scores"].values()) == pytest.approx(1.0, abs=1e-3)
    assert 0 < row["voiced_s"] <= row["speech_s"]


def test_a_continued_stream_numbers_its_utterances_on():
    audio, _ = call((0.5, 1.0, 1.2))
    first = StreamPipeline(ON, labels=("neutral",))
    for chunk in chunks(audio):
        first.feed_samples(chunk)
    first.finish()
    state = first.checkpoint()
    assert state["utterances"] == 3
    second = StreamPipeline(ON, labels=("neutral",), resume=state)
    found = []
    for chunk in chunks(audio):
        found += second.feed_samples(chunk).utterances
    assert [u.seq for u in found] == [3, 4, 5]
