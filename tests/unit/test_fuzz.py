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
from server.edges.telephony import audiosocket, twilio
from server.edges.telephony.audiofork import AudioForkParser
from server.edges.telephony.audiohook import AudioHookParser
from server.edges.telephony.base import Audio, Fault, Gap, Note, Start, Stop
from server.edges.telephony.jambonz import JambonzParser
from server.edges.telephony.twilio import CHUNK_S, MAX_GAP_FILL_S, Reorderer, TwilioParser

pytestmark = pytest.mark.unit
FUZZ = settings(
    max_examples=300,
    deadline=None,  # CI machines differ in speed: no per-example time limit
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,  # the same examples on every run and every machine
)
FAULT_KINDS = {"binary_frame", "bad_json", "bad_start", "bad_payload", "oversized", "bad_chunk"}
FAULT_KINDS |= {"bad_metadata", "second_start", "unknown_event", "media_before_start"}
FAULT_KINDS |= {"late_chunk", "chunk_gap", "text_frame", "bad_message", "seq_gap", "no_media"}
FAULT_KINDS |= {"unknown_message", "audio_out_of_turn", "client_error", "bad_frame", "bad_uuid"}
FAULT_KINDS |= {"unsupported_rate", "unknown_frame", "audio_before_uuid", "rate_change"}

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
        event, data = twilio.parse_event(message)
        if event == "start":
            start = twilio.parse_start(data)
            assert start.fmt.sample_rate in range(8000, 48001) and len(start.parties) <= 4
            assert "token" not in start.meta["custom"]
        elif event == "media":
            media = twilio.parse_media(data, max_bytes=320)
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
        messages = AudioForkParser(args=args).feed(first)
    except Fault as fault:
        assert fault.kind == "bad_metadata" and fault.fatal
        return
    (start,) = [m for m in messages if isinstance(m, Start)]
    assert start.meta["mix"] in ("mono", "mixed", "stereo") and 1 <= len(start.parties) <= 2


def audiohook_frames() -> st.SearchStrategy[str | bytes]:
    """AudioHook client messages near the protocol (right and wrong seq, types, parameters)."""
    media = st.fixed_dictionaries(
        {
            "type": st.just("audio") | json_scalars,
            "format": st.sampled_from(["PCMU", "L16", "opus"]) | json_scalars,
            "channels": st.lists(st.sampled_from(["external", "internal", "x"]), max_size=3)
            | json_values,
            "rate": st.sampled_from([8000, 16000]) | json_scalars,
        }
    )
    params = st.fixed_dictionaries(
        {},
        optional={
            "media": st.lists(media, max_size=3) | json_values,
            "discarded": st.sampled_from(["PT0.5S", "PT2S", "PT99999999S", "P1D", "PT"])
            | json_scalars,
            "customConfig": json_values,
            "reason": st.sampled_from(["end", "error"]) | json_scalars,
        },
    )
    kinds = ["open", "ping", "paused", "resumed", "discarded", "update", "error", "close", "x"]
    message = st.fixed_dictionaries(
        {
            "version": st.just("2") | json_scalars,
            "id": st.just("s-1") | json_scalars,
            "type": st.sampled_from(kinds) | json_scalars,
            "seq": st.integers(min_value=-1, max_value=12) | json_scalars,
            "serverseq": st.integers(min_value=0, max_value=3) | json_scalars,
            "position": st.just("PT1S"),
            "parameters": params | json_values,
        }
    )
    return message.map(json.dumps) | st.binary(max_size=400) | st.text(max_size=80)


def jambonz_frames() -> st.SearchStrategy[str | bytes]:
    meta = st.fixed_dictionaries(
        {},
        optional={
            "callSid": st.text(max_size=20) | json_values,
            "sampleRate": rates | json_values,
            "mixType": st.sampled_from(["mono", "stereo", "mixed", "x"]) | json_values,
            "metadata": json_values,
        },
    )
    dtmf = st.fixed_dictionaries({"event": st.just("dtmf"), "dtmf": st.text(max_size=2)})
    return (meta | dtmf).map(json.dumps) | st.binary(max_size=400) | st.text(max_size=80)


def audiosocket_frames() -> st.SearchStrategy[bytes]:
    kinds = st.sampled_from([0x00, 0x01, 0x03, 0x10, 0x12, 0x16, 0x17, 0x18, 0xFF, 0x42])
    framed = st.tuples(kinds, st.binary(max_size=320)).map(lambda kp: audiosocket.frame(*kp))
    return framed | st.binary(max_size=40)


def twilio_stream() -> st.SearchStrategy[str | bytes]:
    return twilio_messages()


PARSERS = {
    "twilio": (lambda: TwilioParser(320, clock=lambda: 0.0), twilio_stream),
    "audiofork": (lambda: AudioForkParser(320), jambonz_frames),
    "jambonz": (lambda: JambonzParser(320), jambonz_frames),
    "audiohook": (lambda: AudioHookParser(320, session_id="s-1"), audiohook_frames),
    "audiosocket": (lambda: audiosocket.AudioSocketParser(320), audiosocket_frames),
}


@pytest.mark.parametrize("protocol", sorted(PARSERS))
@FUZZ
@given(data=st.data())
def test_every_parser_gives_typed_messages_or_a_counted_fault(protocol, data):
    make, frames = PARSERS[protocol]
    parser = make()
    starts = 0
    for frame in data.draw(st.lists(frames(), max_size=12)):
        try:
            messages = parser.feed(frame)
        except Fault as fault:
            assert fault.kind in FAULT_KINDS
            if fault.fatal:
                return  # the loop closes the connection
            continue
        for m in messages:
            assert isinstance(m, Start | Audio | Gap | Note | Stop | Fault)
            if isinstance(m, Fault):
                assert m.kind in FAULT_KINDS
            if isinstance(m, Start):
                starts += 1
                assert 8000 <= m.fmt.sample_rate <= 48000 and 1 <= len(m.parties) <= 4
                named = set(m.parties) <= {"customer", "agent", "mixed"}
                assert named or protocol == "twilio"  # Twilio names its own tracks
                for answer in m.answer:
                    parser.encode(answer)
            if isinstance(m, Audio):
                # as much audio as the frame held: a frame never grows into more
                assert 0 < len(m.data) <= max(len(frame), 320)
            if isinstance(m, Gap):
                assert m.seconds >= 0
            if isinstance(m, Note):
                for answer in m.answer:
                    assert json.loads(parser.encode(answer))["version"] == "2"
    assert starts <= 1


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
    reorder = Reorderer(window, clock=lambda: now[0])
    given_bytes = out_bytes = 0
    elapsed = 0.0
    for chunk, size, dt in pushes:
        now[0] += dt
        elapsed += dt
        given_bytes += size
        out_bytes += sum(len(p) for p in reorder.push(chunk, b"\x01" * size))
        faults += [f.kind for f in reorder.faults]
        reorder.faults.clear()
        assert len(reorder.pending) <= window + 1
    silence = out_bytes - given_bytes
    jumps = faults.count("chunk_gap")
    # stale gaps: at most `window` chunks a push; jumps: at most the time that passed, capped
    bound = 160 * (window * len(pushes) + min(elapsed / CHUNK_S, jumps * MAX_GAP_FILL_S / CHUNK_S))
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
