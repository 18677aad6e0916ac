from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import soundfile as sf

from engine.audio import (
    AudioFormat,
    AudioFormatError,
    StreamDecoder,
    decode_chunk,
    load_file,
    resample,
)

pytestmark = pytest.mark.unit

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop  # reference G.711 codec (stdlib until 3.13)


def tone(rate: int, seconds: float = 0.5, hz: float = 440.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def test_pcm_s16le_scales_to_unit_range():
    data = np.array([0, 16384, -32768, 32767], dtype="<i2").tobytes()
    samples, rate = decode_chunk(data, AudioFormat("pcm_s16le", 16000, 1))
    assert rate == 16000
    np.testing.assert_allclose(samples[:, 0], [0.0, 0.5, -1.0, 32767 / 32768])


def test_pcm_f32le_round_trips():
    x = tone(16000)
    samples, _ = decode_chunk(x.astype("<f4").tobytes(), AudioFormat("pcm_f32le"))
    np.testing.assert_array_equal(samples[:, 0], x)


@pytest.mark.parametrize(
    ("encoding", "reference"), [("mulaw", audioop.ulaw2lin), ("alaw", audioop.alaw2lin)]
)
def test_g711_matches_the_standard_codec(encoding, reference):
    every_code = bytes(range(256))
    samples, _ = decode_chunk(every_code, AudioFormat(encoding, 8000, 1))
    expected = np.frombuffer(reference(every_code, 2), dtype="<i2") / 32768.0
    np.testing.assert_allclose(samples[:, 0], expected, atol=1e-7)


def test_stereo_is_downmixed_by_averaging():
    left = np.full(160, 0.5, np.float32)
    right = np.full(160, -0.25, np.float32)
    interleaved = np.stack([left, right], axis=1).reshape(-1)
    decoder = StreamDecoder(AudioFormat("pcm_f32le", 16000, 2))
    out = decoder.feed(interleaved.astype("<f4").tobytes())
    np.testing.assert_allclose(out, 0.125)


def test_wav_chunk_carries_its_own_rate_and_channels():
    buf = io.BytesIO()
    sf.write(buf, np.stack([tone(8000)] * 2, axis=1), 8000, format="WAV", subtype="PCM_16")
    decoder = StreamDecoder(AudioFormat("wav"))
    out = decoder.feed(buf.getvalue())
    out = np.concatenate([out, decoder.flush()])
    assert abs(out.shape[0] - 8000) <= 2  # 0.5 s at 16 kHz


@pytest.mark.parametrize("rate", [8000, 11025, 22050, 44100, 48000])
def test_streamed_resampling_equals_one_shot(rate):
    x = tone(rate, seconds=1.0, hz=300.0)
    fmt = AudioFormat("pcm_f32le", rate, 1)
    decoder = StreamDecoder(fmt)
    step = rate // 50  # 20 ms chunks, as telephony sends them
    parts = [decoder.feed(x[i : i + step].astype("<f4").tobytes()) for i in range(0, x.size, step)]
    streamed = np.concatenate([*parts, decoder.flush()])
    whole = resample(x, rate)
    assert abs(streamed.size - whole.size) <= 2
    n = min(streamed.size, whole.size)
    np.testing.assert_allclose(streamed[100 : n - 100], whole[100 : n - 100], atol=2e-3)
    assert decoder.input_seconds == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("data", "fmt", "match", "code"),
    [
        (b"\x00\x01\x02", AudioFormat("pcm_s16le"), "not a whole number", "INVALID_AUDIO"),
        (
            b"\x00\x00" * 3,
            AudioFormat("pcm_s16le", channels=2),
            "not a whole number",
            "INVALID_AUDIO",
        ),
        (b"", AudioFormat("pcm_s16le"), "empty", "INVALID_AUDIO"),
        (
            np.array([0.1, np.nan], "<f4").tobytes(),
            AudioFormat("pcm_f32le"),
            "NaN",
            "INVALID_AUDIO",
        ),
        (
            np.array([np.inf], "<f4").tobytes(),
            AudioFormat("pcm_f32le"),
            "infinite",
            "INVALID_AUDIO",
        ),
        (b"not a riff file at all", AudioFormat("wav"), "RIFF", "INVALID_AUDIO"),
        (b"RIFF\x00\x00\x00\x00WAVEjunk", AudioFormat("wav"), "unreadable", "INVALID_AUDIO"),
        ("text", AudioFormat("pcm_s16le"), "must be bytes", "INVALID_AUDIO"),
    ],
)
def test_bad_chunks_raise_one_clear_error(data, fmt, match, code):
    with pytest.raises(AudioFormatError, match=match) as info:
        decode_chunk(data, fmt)
    assert info.value.code == code


@pytest.mark.parametrize(
    ("kwargs", "match", "code"),
    [
        ({"encoding": "opus"}, "unsupported encoding 'opus'", "UNSUPPORTED_ENCODING"),
        ({"sample_rate": 7999}, "7999", "INVALID_AUDIO"),
        ({"sample_rate": 48001}, "48001", "INVALID_AUDIO"),
        ({"sample_rate": 16000.5}, "16000.5", "INVALID_AUDIO"),
        ({"channels": 0}, "channels", "INVALID_AUDIO"),
        ({"channels": 9}, "channels", "INVALID_AUDIO"),
    ],
)
def test_bad_formats_are_refused(kwargs, match, code):
    with pytest.raises(AudioFormatError, match=match) as info:
        AudioFormat(**kwargs)
    assert info.value.code == code


@pytest.mark.parametrize(
    ("fmt", "subtype"),
    [("WAV", "PCM_16"), ("FLAC", "PCM_16"), ("OGG", "VORBIS"), ("MP3", "MPEG_LAYER_III")],
)
def test_files_of_each_container_load_at_16k(tmp_path, fmt, subtype):
    x = tone(22050, seconds=1.0)
    path = tmp_path / f"tone.{fmt.lower()}"
    sf.write(path, x, 22050, format=fmt, subtype=subtype)
    samples, rate = load_file(path)
    assert rate == 22050
    assert abs(samples.size - 16000) < 1200  # mp3 adds encoder delay and padding
    assert 0.3 < np.abs(samples).max() < 0.7


def test_unreadable_file_bytes_raise():
    with pytest.raises(AudioFormatError, match="unreadable"):
        load_file(b"this is not audio")
