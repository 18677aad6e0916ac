from __future__ import annotations

import base64
import contextlib
import http.client
import os
import signal
from pathlib import Path

import numpy as np
import pytest

from tests.protocol.conftest import TOKEN
from tests.support.client import Recorder, wait_for
from tests.support.harness import multipart
from tests.support.speech import speech, to_pcm16

pytestmark = pytest.mark.protocol


@pytest.fixture
def live(server):
    """A client with an open session and another client streaming beside it."""
    client, bystander = Recorder(server.url), Recorder(server.url)
    sid = client.start()["session_id"]
    other = bystander.start()["session_id"]
    yield client, sid, bystander, other
    client.close()
    bystander.close()


@pytest.mark.parametrize(
    ("event", "payload", "code", "names"),
    [
        ("audio_stream", "just a string", "INVALID_MESSAGE", "JSON object"),
        ("audio_stream", ["a", "list"], "INVALID_MESSAGE", "JSON object"),
        ("audio_stream", {"chunk": "AAAA"}, "INVALID_MESSAGE", "session_id"),
        ("audio_stream", {"session_id": "{sid}"}, "INVALID_MESSAGE", "chunk"),
        ("audio_stream", {"session_id": "{sid}", "chunk": 42}, "INVALID_MESSAGE", "int"),
        (
            "audio_stream",
            {"session_id": "{sid}", "chunk": "not base64!!"},
            "INVALID_AUDIO",
            "base64",
        ),
        ("audio_stream", {"session_id": "{sid}", "chunk": ""}, "INVALID_AUDIO", "empty"),
        (
            "audio_stream",
            {"session_id": "no-such-session", "chunk": "AAAA"},
            "UNKNOWN_SESSION",
            "no-such-session",
        ),
        (
            "audio_stream",
            {"session_id": "bad id with spaces", "chunk": "AAAA"},
            "INVALID_MESSAGE",
            "session_id",
        ),
        ("end_session", {"session_id": "no-such-session"}, "UNKNOWN_SESSION", "no-such-session"),
        ("end_session", 7, "INVALID_MESSAGE", "JSON object"),
        ("start_session", {"encoding": "opus"}, "UNSUPPORTED_ENCODING", "opus"),
        ("start_session", {"sample_rate": 96000}, "INVALID_AUDIO", "96000"),
        ("start_session", {"channels": "two"}, "INVALID_AUDIO", "two"),
        ("start_session", {"since_seq": -1}, "INVALID_MESSAGE", "since_seq"),
        ("start_session", "text", "INVALID_MESSAGE", "JSON object"),
    ],
)
def test_every_malformed_message_gets_a_coded_error_and_nothing_else_breaks(
    live, event, payload, code, names
):
    client, sid, bystander, other = live
    if isinstance(payload, dict):
        payload = {k: (v.format(sid=sid) if isinstance(v, str) else v) for k, v in payload.items()}
    client.sio.emit(event, payload)
    error = wait_for(lambda: client.errors(code), 10, f"{code} error")[0]
    assert names in error["message"]
    # the session, the other session and the server carry on
    pcm = to_pcm16(speech())[: 16000 * 2 * 3]
    for c, s in ((client, sid), (bystander, other)):
        c.stream(s, pcm, speed=4)
        c.end(s)
        assert c.of("emotion_result"), "results keep coming after a bad message"


def test_nan_audio_and_odd_bytes_are_reported_and_the_session_goes_on(server):
    client = Recorder(server.url)
    sid = client.start(encoding="pcm_f32le")["session_id"]
    client.send(sid, np.array([0.1, np.nan, 0.2], "<f4").tobytes())
    client.send(sid, b"\x00\x01\x02")  # 3 bytes is not a float32 sample
    wait_for(lambda: len(client.errors("INVALID_AUDIO")) >= 2, 10, "two INVALID_AUDIO errors")
    errors = client.errors("INVALID_AUDIO")
    assert "NaN" in errors[0]["message"] and "whole number" in errors[1]["message"]
    assert errors[0]["session_id"] == sid
    x = speech()[: 16000 * 3].astype("<f4").tobytes()
    for at in range(0, len(x), 6400):
        client.send(sid, x[at : at + 6400])
    client.end(sid)
    assert client.of("emotion_result")
    client.close()


def test_oversized_chunks_and_fast_senders_are_refused_but_the_session_survives(strict_server):
    before = strict_server.metric("voxaffect_errors_total", code="RATE_LIMITED")
    client = Recorder(strict_server.url, token=TOKEN)
    sid = client.start()["session_id"]
    client.send(sid, b"\x00\x00" * 20000)  # 40 000 bytes > max_chunk_bytes 32 000
    client.send(sid, base64.b64encode(b"\x00\x00" * 20000).decode())
    wait_for(lambda: len(client.errors("PAYLOAD_TOO_LARGE")) >= 2, 10, "PAYLOAD_TOO_LARGE twice")
    pcm = to_pcm16(speech())
    for at in range(0, len(pcm), 16000):  # 0.5 s chunks, as fast as possible: > 2x real time
        client.send(sid, pcm[at : at + 16000])
    wait_for(lambda: client.errors("RATE_LIMITED"), 10, "RATE_LIMITED")
    assert strict_server.metric("voxaffect_errors_total", code="RATE_LIMITED") > before
    client.stream(sid, pcm[: 16000 * 2 * 3], speed=1.5)  # a well-behaved sender is served
    client.end(sid)
    assert client.of("emotion_result")
    client.close()


def test_upload_size_limit_gives_a_clear_413(strict_server):
    body, ctype = multipart("file", "big.wav", b"\x00" * 700_000)
    conn = http.client.HTTPConnection("127.0.0.1", strict_server.port, timeout=30)
    headers = {"Content-Type": ctype, "Authorization": f"Bearer {TOKEN}"}
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        # the server answers from the headers alone and may close before the body is sent
        conn.request("POST", "/api/analyze", body=body, headers=headers)
    response = conn.getresponse()
    raw = response.read()
    conn.close()
    assert response.status == 413
    assert b"PAYLOAD_TOO_LARGE" in raw and b"0.5 MB" in raw


def test_metrics_count_what_clients_saw(server):
    names = ("voxaffect_inferences_total", "voxaffect_emotion_results_total")
    before_inf = server.metric(names[0], device="cpu", outcome="ok")
    before_audio = server.metric("voxaffect_audio_received_seconds_total", source="socketio")
    before_err = server.metric("voxaffect_errors_total", code="UNKNOWN_SESSION")
    client = Recorder(server.url)
    sid = client.start()["session_id"]
    audio = speech()
    client.stream(sid, to_pcm16(audio), speed=4)
    client.send("no-such-session", b"\x00\x00")
    client.sio.emit("audio_stream", {"session_id": "no-such-session", "chunk": "AAAA"})
    client.end(sid)
    wait_for(lambda: client.errors("UNKNOWN_SESSION"), 10, "UNKNOWN_SESSION")
    results = client.of("emotion_result")
    assert server.metric(names[0], device="cpu", outcome="ok") - before_inf >= len(results)
    assert server.metric(
        "voxaffect_audio_received_seconds_total", source="socketio"
    ) - before_audio == pytest.approx(audio.size / 16000, abs=0.01)
    assert server.metric("voxaffect_errors_total", code="UNKNOWN_SESSION") - before_err >= 1
    emotions = {r["emotion"] for r in results}
    assert sum(server.metric(names[1], emotion=e) for e in emotions) >= len(results)
    assert server.metric("voxaffect_end_to_end_seconds_count") >= len(results)
    assert server.metric("voxaffect_ready") == 1.0
    assert server.metric("voxaffect_hub_lag_seconds_count") > 10  # the loop is watched
    assert server.metric("voxaffect_model_info", random_weights="True", device="cpu") == 1.0
    client.close()
    wait_for(lambda: server.metric("voxaffect_connections", transport="socketio") >= 0, 5, "gauge")


def _prosody_worker(server_pid: int) -> int:
    """The pid of the server's prosody worker process."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
            if int(fields[1]) == server_pid and b"server.sessions.prosody_pool" in cmdline:
                return int(stat.parent.name)
    raise AssertionError("the server has no prosody worker")


def _state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def _run_speech(server, token: str | None = None) -> tuple[list[dict], dict]:
    """14 s of speech at the strict server's --max-realtime-factor: faster, how many chunks
    are RATE_LIMITED would depend on this CPU's timing, and so would the windows due."""
    audio = to_pcm16(np.concatenate([speech(), speech(pitch=70)]))
    client = Recorder(server.url, token=token)
    sid = client.start()["session_id"]
    client.stream(sid, audio, speed=2)
    summary = client.end(sid)
    client.close()
    assert not client.errors(), client.errors()
    return client.of("emotion_result"), summary


def _windows_due(summary: dict) -> int:  # each one analysed, or expired and counted
    return int(summary["results"] + summary["expired"])


@pytest.mark.parametrize(("how", "reason"), [(signal.SIGKILL, "died"), (signal.SIGSTOP, "timeout")])
def test_a_dead_or_hung_prosody_worker_costs_no_window_and_is_replaced(strict_server, how, reason):
    """The strict server gives a prosody worker 2 s per window (--prosody-timeout-s)."""
    _, reference = _run_speech(strict_server, TOKEN)
    failures = strict_server.metric("voxaffect_prosody_failures_total", reason=reason)
    worker = _prosody_worker(strict_server.proc.pid)
    os.kill(worker, how)
    if how == signal.SIGKILL:
        wait_for(lambda: _state(worker) in ("Z", None), what="the worker to die")  # Z: unreaped
    else:
        wait_for(lambda: _state(worker) == "T", what="the worker to stop")

    results, summary = _run_speech(strict_server, TOKEN)
    assert _windows_due(summary) == _windows_due(reference)
    assert summary["failed"] == 0
    assert [r["seq"] for r in results] == list(range(1, len(results) + 1))
    missing = [r for r in results if "prosody" in r["stress"]["components"]]
    assert missing and missing[0]["stress"]["components"]["prosody"]["reason"] == reason
    assert strict_server.metric("voxaffect_prosody_failures_total", reason=reason) > failures
    assert "prosody worker replaced" in strict_server.log()
    wait_for(lambda: _state(worker) is None, what="the old worker to be gone")
    replacement = wait_for(
        lambda: _prosody_worker_or_none(strict_server.proc.pid), what="a new worker"
    )
    assert replacement != worker
    results, _ = _run_speech(strict_server, TOKEN)
    assert "f0_mean_st" in results[-1]["stress"]["components"]  # the new worker measures


def _prosody_worker_or_none(server_pid: int) -> int | None:
    try:
        return _prosody_worker(server_pid)
    except AssertionError:
        return None
