"""Property-based fuzzing of everything that reads client input: the Socket.IO payload parsers,
the audio decoder (every encoding, any bytes, rate and channel count), the telephony message
parsers and the Twilio reorder buffer.

The invariant everywhere: a documented error (ProtocolError / AudioFormatError with a documented
code, or a counted telephony fault) or valid output — never another exception, and never memory
proportional to a number the client chose.
"""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.audio import ENCODINGS, AudioFormat, AudioFormatError, StreamDecoder, decode_chunk
from server.edges.protocol import (
    ERROR_CODES,
    ProtocolError,
    chunk_seconds,
    parse_chunk,
    parse_start,
)
from server.edges.telephony.calls import (
    MAX_GAP_FILL_S,
    TWILIO_CHUNK_S,
    Fault,
    Reorderer,
    parse_fork_metadata,
    parse_fork_start,
    parse_twilio_event,
    parse_twilio_media,
    parse_twilio_start,
)

pytestmark = pytest.mark.unit
FUZZ = settings(
    max_examples=300,
    deadline=None,  # CI machines differ in speed: no per-example time limit
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,  # the same examples on every run and every machine
)
FAULT_KINDS = {"binary_frame", "bad_json", "bad_start", "bad_payload", "oversized", "bad_chunk"}
FAULT_KINDS |= {"bad_metadata"}

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=12,
)
rates = st.integers(min_value=-10, max_value=200_000) | st.sampled_from([8000, 16000, 44100, 48000])


def documented(exc: ProtocolError) -> None:
    assert exc.code in ERROR_CODES and exc.message


@FUZZ
@given(
    st.dictionaries(
        st.sampled_from(
            [
                "session_id",
                "sample_rate",
                "encoding",
                "channels",
                "resume_token",
                "since_seq",
                "options",
            ]
        ),
        json_values,
    )
    | json_values
)
def test_parse_start_gives_a_start_or_a_documented_error(data):
    try:
        start = parse_start(data)
    except ProtocolError as exc:
        documented(exc)
        return
    assert start.format.encoding in ENCODINGS and 8000 <= start.format.sample_rate <= 48000
    assert start.since_seq >= 0


@FUZZ
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "session_id": json_scalars | st.text(min_size=1, max_size=200),
            "chunk": st.binary(max_size=3000) | st.text(max_size=3000) | json_values,
        },
    )
    | json_values
)
def test_parse_chunk_gives_bounded_bytes_or_a_documented_error(data):
    try:
        session_id, raw = parse_chunk(data, max_bytes=2000)
    except ProtocolError as exc:
        documented(exc)
        return
    assert 0 < len(raw) <= 2000 and 1 <= len(session_id) <= 128


@FUZZ
@given(
    encoding=st.sampled_from(ENCODINGS) | st.text(max_size=10),
    rate=rates,
    channels=st.integers(min_value=-2, max_value=12) | st.none(),
    data=st.binary(max_size=4096),
)
def test_the_decoder_gives_bounded_audio_or_an_audio_error(encoding, rate, channels, data):
    try:
        fmt = AudioFormat(encoding, rate, channels)  # type: ignore[arg-type]
    except AudioFormatError as exc:
        assert exc.code in ERROR_CODES
        return
    try:
        samples, out_rate = decode_chunk(data, fmt)
    except AudioFormatError as exc:
        assert exc.code in ERROR_CODES
        return
    assert samples.dtype == np.float32 and samples.ndim == 2
    assert np.isfinite(samples).all() and np.abs(samples).max(initial=0) <= 1.0
    assert 8000 <= out_rate <= 48000
    assert samples.nbytes <= 32 * len(data) + 4096  # never more than the bytes could hold


@FUZZ
@given(
    data=st.binary(max_size=2048),
    header=st.sampled_from([b"", b"RIFF\xff\xff\xff\xffWAVEfmt ", b"RIFF\x24\x00\x00\x00WAVE"]),
)
def test_wav_chunks_and_their_claimed_duration_are_checked(data, header):
    fmt = AudioFormat("wav", 16000, 1)
    try:
        seconds = chunk_seconds(header + data, fmt)
    except ProtocolError as exc:
        assert exc.code == "INVALID_AUDIO"
        return
    assert 0 <= seconds <= len(data) + 64  # at least 8000 samples a second, 1 byte each


@FUZZ
@given(
    chunks=st.lists(st.binary(max_size=640), max_size=8),
    encoding=st.sampled_from(["pcm_s16le", "pcm_f32le", "mulaw", "alaw"]),
    rate=st.sampled_from([8000, 11025, 16000, 22050, 48000]),
)
def test_a_stream_decoder_never_fails_on_bad_chunks_it_skips_them(chunks, encoding, rate):
    decoder = StreamDecoder(AudioFormat(encoding, rate, 1))
    out, errors = decoder.feed_many(chunks)
    assert all(isinstance(e, AudioFormatError) and e.code in ERROR_CODES for e in errors)
    assert out.dtype == np.float32 and np.isfinite(out).all()
    assert out.size <= 2 * sum(len(c) for c in chunks) + 1024


# --- telephony -----------------------------------------------------------------------------


def twilio_messages() -> st.SearchStrategy[str | bytes]:
    media = st.fixed_dictionaries(
        {"event": st.just("media")},
        optional={
            "media": st.fixed_dictionaries(
                {},
                optional={
                    "payload": st.binary(max_size=400).map(lambda b: base64.b64encode(b).decode())
                    | json_values,
                    "chunk": st.integers(min_value=-(2**70), max_value=2**70).map(str)
                    | json_values,
                    "track": st.sampled_from(["inbound", "outbound", "x"]) | json_values,
                },
            )
            | json_values
        },
    )
    start = st.fixed_dictionaries(
        {"event": st.just("start")},
        optional={
            "streamSid": json_values,
            "start": st.fixed_dictionaries(
                {},
                optional={
                    "callSid": st.text(max_size=300) | json_values,
                    "tracks": st.lists(json_scalars, max_size=6) | json_values,
                    "customParameters": st.dictionaries(
                        st.text(max_size=8), json_values, max_size=3
                    )
                    | json_values,
                    "mediaFormat": st.fixed_dictionaries(
                        {},
                        optional={
                            "encoding": st.sampled_from(
                                ["audio/x-mulaw", "audio/x-alaw", "audio/opus"]
                            )
                            | json_values,
                            "sampleRate": rates | json_values,
                        },
                    )
                    | json_values,
                },
            )
            | json_values,
        },
    )
    return (
        st.one_of(media, start, st.dictionaries(st.text(max_size=8), json_values, max_size=3)).map(
            json.dumps
        )
        | st.text(max_size=200)
        | st.binary(max_size=64)
    )


@FUZZ
@given(twilio_messages())
def test_twilio_messages_parse_or_fault(message):
    try:
        event, data = parse_twilio_event(message)
        if event == "start":
            start = parse_twilio_start(data)
            assert start.fmt.sample_rate in range(8000, 48001) and len(start.parties) <= 4
            assert "token" not in start.meta["custom"]
        elif event == "media":
            media = parse_twilio_media(data, max_bytes=320)
            assert 0 < len(media.payload) <= 320 and media.chunk >= 0
    except Fault as fault:
        assert fault.kind in FAULT_KINDS


@FUZZ
@given(
    first=st.dictionaries(st.text(max_size=12), json_values, max_size=4).map(json.dumps)
    | st.text(max_size=100),
    args=st.dictionaries(
        st.sampled_from(["rate", "sample_rate", "mix", "call_id"]), st.text(max_size=12)
    ),
)
def test_audio_fork_metadata_parses_or_faults(first, args):
    try:
        fork = parse_fork_start(parse_fork_metadata(first), args)
    except Fault as fault:
        assert fault.kind == "bad_metadata"
        return
    assert fork.mix in ("mono", "mixed", "stereo") and 1 <= len(fork.parties) <= 2


@FUZZ
@given(
    st.lists(
        st.tuples(
            st.integers(min_value=1, max_value=2**63),  # chunk numbers: the client's choice
            st.integers(min_value=1, max_value=160),  # payload size
            st.floats(min_value=0.0, max_value=120.0),  # seconds since the previous message
        ),
        max_size=60,
    )
)
def test_the_reorder_buffer_holds_little_and_fills_no_more_silence_than_time_passed(pushes):
    now = [0.0]
    faults: list[str] = []
    window = 5
    reorder = Reorderer(window, lambda kind, detail: faults.append(kind), clock=lambda: now[0])
    given_bytes = out_bytes = 0
    elapsed = 0.0
    for chunk, size, dt in pushes:
        now[0] += dt
        elapsed += dt
        given_bytes += size
        out_bytes += sum(len(p) for p in reorder.push(chunk, b"\x01" * size))
        assert len(reorder.pending) <= window + 1
    silence = out_bytes - given_bytes
    jumps = faults.count("chunk_gap")
    # stale gaps: at most `window` chunks a push; jumps: at most the time that passed, capped
    bound = 160 * (
        window * len(pushes)
        + min(elapsed / TWILIO_CHUNK_S, jumps * MAX_GAP_FILL_S / TWILIO_CHUNK_S)
    )
    assert silence <= bound + 160 * jumps


@FUZZ
@given(
    st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True), min_size=1, max_size=256),
    st.integers(min_value=1, max_value=2),
)
def test_float_audio_is_clipped_to_full_scale_or_refused(values, channels):
    values = values[: len(values) // channels * channels] or [0.0] * channels
    data = np.array(values, dtype="<f4").tobytes()
    try:
        samples, _ = decode_chunk(data, AudioFormat("pcm_f32le", 16000, channels))
    except AudioFormatError as exc:
        assert exc.code == "INVALID_AUDIO" and "NaN" in str(exc)
        assert not np.isfinite(np.array(values, dtype=np.float32)).all()
        return
    assert np.isfinite(samples).all() and np.abs(samples).max() <= 1.0
