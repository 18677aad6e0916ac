from __future__ import annotations

import itertools

import numpy as np
import pytest

from engine.vad import VadGate
from tests.support.speech import noise, silence, speech

pytestmark = pytest.mark.unit


def run(gate: VadGate, samples: np.ndarray, chunk: int = 1600):
    events = []
    for i in range(0, samples.size, chunk):
        events += gate.process(samples[i : i + chunk])
    return events


@pytest.mark.parametrize("frame_ms", [10, 20, 30])
def test_speech_is_speech_and_silence_is_not(frame_ms):
    x = np.concatenate([silence(1.0), speech(), silence(1.0)])
    gate = VadGate(frame_ms=frame_ms)
    run(gate, x)
    n_speech = speech().size
    assert gate.speech_ratio(16000, 16000 + n_speech) > 0.75
    assert gate.speech_ratio(0, 16000) == 0.0
    assert gate.speech_ratio(x.size - 8000, x.size) == 0.0


@pytest.mark.parametrize("kind", ["white", "pink", "brown"])
@pytest.mark.parametrize("aggressiveness", [0, 2, 3])
def test_noise_alone_is_not_speech(kind, aggressiveness):
    # webrtcvad alone calls white noise speech at every aggressiveness; the voicing check must not
    gate = VadGate(aggressiveness=aggressiveness)
    x = noise(5.0, kind, level=0.1)
    run(gate, x)
    assert gate.speech_ratio(0, x.size) < 0.05


def test_events_mark_speech_start_and_end_in_stream_time():
    s = speech()
    x = np.concatenate([silence(1.5), s, silence(2.0)])
    gate = VadGate()
    events = run(gate, x)
    assert events[0].speech is True
    assert events[0].at_s == pytest.approx(1.5, abs=0.25)
    assert events[-1].speech is False
    assert events[-1].at_s == pytest.approx(1.5 + s.size / 16000, abs=0.5)
    assert all(a.speech != b.speech for a, b in itertools.pairwise(events))  # alternating


def test_chunking_does_not_change_decisions():
    x = np.concatenate([silence(0.5), speech(), silence(0.5)])
    a, b = VadGate(), VadGate()
    run(a, x, chunk=160)
    run(b, x, chunk=4801)
    assert a.frames == b.frames
    assert a.speech_ratio(0, x.size) == b.speech_ratio(0, x.size)


def test_decisions_older_than_capacity_are_forgotten():
    gate = VadGate(capacity_s=2.0)
    run(gate, np.concatenate([speech(), silence(3.0)]))
    assert gate.speech_ratio(0, 16000) == 0.0  # evicted, not remembered as speech
    assert gate.speech_frames > 0  # the running total is kept


@pytest.mark.parametrize(
    "kwargs", [{"frame_ms": 25}, {"aggressiveness": 4}, {"aggressiveness": -1}]
)
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        VadGate(**kwargs)
