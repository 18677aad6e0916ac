"""The protocol's payloads, parsed once at the edge: starts, chunks, ids, the rate allowance."""

from __future__ import annotations

import base64

import pytest

from engine.audio import AudioFormat
from server.edges.protocol import ProtocolError, chunk_seconds, parse_chunk, parse_start, valid_id
from server.sessions.session import Session

pytestmark = pytest.mark.unit
LABELS = ("angry", "happy")


def test_start_session_parsing():
    start = parse_start({"sample_rate": 8000, "encoding": "mulaw", "since_seq": 4})
    assert start.format == AudioFormat("mulaw", 8000, 1) and start.since_seq == 4
    assert parse_start(None).format == AudioFormat()
    with pytest.raises(ProtocolError) as info:
        parse_start({"encoding": "flac"})
    assert info.value.code == "UNSUPPORTED_ENCODING"


def test_chunk_parsing_accepts_base64_and_bytes_and_limits_size():
    assert parse_chunk(
        {"session_id": "s1", "chunk": base64.b64encode(b"\x01\x02").decode()}, 10
    ) == ("s1", b"\x01\x02")
    assert parse_chunk({"session_id": "s1", "chunk": b"\x01\x02"}, 10) == ("s1", b"\x01\x02")
    for chunk in (b"\x00" * 11, base64.b64encode(b"\x00" * 11).decode()):
        with pytest.raises(ProtocolError) as info:
            parse_chunk({"session_id": "s1", "chunk": chunk}, 10)
        assert info.value.code == "PAYLOAD_TOO_LARGE" and info.value.session_id == "s1"


def test_chunk_seconds():
    assert chunk_seconds(b"\x00" * 3200, AudioFormat()) == pytest.approx(0.1)
    assert chunk_seconds(b"\x00" * 160, AudioFormat("mulaw", 8000)) == pytest.approx(0.02)


def test_rate_allowance():
    s = Session(id="s", source="socketio", format=AudioFormat(), started=0.0)
    assert s.allow_audio(5.0, factor=2.0, burst_s=5.0, now=0.0)  # the burst
    assert not s.allow_audio(1.0, factor=2.0, burst_s=5.0, now=0.0)
    assert s.allow_audio(1.9, factor=2.0, burst_s=5.0, now=1.0)  # a second later: two more


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("CA0123456789abcdef", True),
        ("a.b:c-d_e", True),
        ("x" * 128, True),
        ("x" * 129, False),
        ("", False),
        ('quote"id', False),
        ("crlf\r\nid", False),
        ("slash/id", False),
        ("trailing\n", False),
        (12, False),
        (None, False),
    ],
)
def test_one_rule_for_every_session_id(value, ok):
    assert valid_id(value) is ok
