"""Hardening round 3, replayed against a real server with both token roles, a healthy stream
beside each attack: floods of tiny chunks, upload bombs, one client taking every session slot,
a second start on one media socket, an ingest token reaching for supervisor rights, a rebound
Host, tokens of the wrong type, deeply nested packets, protocol hygiene, a store locked by
another process, and a purge while a session runs."""

from __future__ import annotations

import io
import json
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import socketio
import soundfile as sf
import websocket

from tests.hostile.conftest import Healthy, rss_mb, stall_limit_ms, stream_once
from tests.support.calls import at_8k, mulaw, stored_call, twilio_messages, ws_url
from tests.support.client import Recorder, wait_for
from tests.support.harness import ROOT, ServerProcess, multipart
from tests.support.speech import speech, to_pcm16

pytestmark = pytest.mark.hostile

SUPERVISOR = "limits-supervisor-token-0123"
INGEST = "limits-ingest-token-012345678"


@pytest.fixture(scope="module")
def limited(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    proc = ServerProcess(
        tiny_model_dir,
        tmp_path_factory.mktemp("limits"),
        "--max-upload-s=600",
        "--max-messages-per-s=100",
        env={"VOXAFFECT_API_TOKENS": SUPERVISOR, "VOXAFFECT_INGEST_TOKENS": INGEST},
    ).start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def limited_reference(limited: ServerProcess, healthy_audio: bytes) -> list[tuple[float, float]]:
    results, _, _ = stream_once(limited.url, healthy_audio, speed=4.0, token=INGEST)
    return [(r["start_s"], r["end_s"]) for r in results]


@pytest.fixture(scope="module")
def limited_stall_ms(limited, healthy_audio, limited_reference) -> float:
    return stall_limit_ms(limited, healthy_audio, limited_reference, token=INGEST)


@pytest.fixture
def beside(limited, healthy_audio, limited_reference, limited_stall_ms) -> Healthy:
    return Healthy(
        limited, healthy_audio, limited_reference, token=INGEST, stall_ms=limited_stall_ms
    )


def test_a_flood_of_tiny_chunks_is_dropped_then_cut_and_costs_the_healthy_stream_nothing(
    limited, beside
):
    before_rss = rss_mb(limited.proc.pid)
    before = limited.metric("voxaffect_messages_dropped_total", transport="socketio")
    with beside:
        flood = Recorder(limited.url, token=INGEST)
        sid = flood.start()["session_id"]
        sent = 0
        try:
            while flood.sio.connected and sent < 50_000:  # unpaced 2-byte chunks
                flood.sio.emit("audio_stream", {"session_id": sid, "chunk": b"\x00\x00"})
                sent += 1
        except socketio.exceptions.SocketIOError:
            pass  # the server cut the connection
        wait_for(lambda: not flood.sio.connected, 30, "the flooding connection to be cut")
        assert flood.errors("RATE_LIMITED")  # told, once a second at most
        assert len(flood.errors("RATE_LIMITED")) <= 1 + 30
        flood.close()
    dropped = limited.metric("voxaffect_messages_dropped_total", transport="socketio") - before
    assert dropped >= 5 * 100  # a flood, dropped unread
    assert rss_mb(limited.proc.pid) - before_rss < 100


def _flac(seconds: float, rate: int = 16000) -> bytes:
    out = io.BytesIO()
    sf.write(out, np.zeros(int(seconds * rate), np.int16), rate, format="FLAC")
    return out.getvalue()


def _upload(server: ServerProcess, content: bytes, **headers: str) -> tuple[int, dict]:
    body, kind = multipart("file", "bomb.flac", content)
    status, data, _ = server.request(
        "/api/analyze",
        data=body,
        method="POST",
        headers={"Content-Type": kind, "Authorization": f"Bearer {INGEST}", **headers},
    )
    return status, json.loads(data)


def test_an_upload_bomb_is_refused_from_its_header_and_a_foreign_page_cannot_post(limited, beside):
    before_rss = rss_mb(limited.proc.pid)
    with beside:
        started = time.monotonic()
        status, body = _upload(limited, _flac(4 * 3600.0))  # four hours of silence, small file
        assert (status, body["error"]["code"]) == (400, "INVALID_AUDIO")
        assert "14400 s of audio; at most 600" in body["error"]["message"]
        assert time.monotonic() - started < 10  # refused, not decoded
        status, body = _upload(limited, _flac(5.0, rate=384_000))
        assert status == 400 and "384000 Hz" in body["error"]["message"]
        status, body = _upload(limited, _flac(3.0), Origin="https://evil.example")
        assert (status, body["error"]["code"]) == (403, "UNAUTHORIZED")
    assert rss_mb(limited.proc.pid) - before_rss < 100


def test_one_connection_cannot_take_every_session_slot(limited, beside):
    with beside:
        greedy = Recorder(limited.url, token=INGEST)
        acks = [greedy.call("start_session", {}) for _ in range(6)]
        refused = [a for a in acks if "error" in a]
        assert len(refused) == 2 and refused[0]["error"]["code"] == "SESSION_LIMIT"
        assert "max_sessions_per_connection" in refused[0]["error"]["message"]
        other = Recorder(limited.url, token=INGEST)
        assert "error" not in other.call("start_session", {})  # everyone else still gets in
        greedy.close()
        other.close()


def test_a_second_start_on_one_media_socket_opens_no_second_call(limited, beside):
    before = limited.metric(
        "voxaffect_telephony_events_total", protocol="twilio", kind="second_start"
    )
    with beside:
        ws = websocket.create_connection(
            ws_url(limited, "/telephony/twilio"),
            timeout=30,
            header=[f"Authorization: Bearer {INGEST}"],
        )
        messages = twilio_messages("CAonce", {"inbound": mulaw(at_8k(speech()[:16000]))})
        start = messages[1]
        for n, sid in enumerate(("CAsecond", "CAthird")):
            other = json.loads(start)
            other["start"]["callSid"] = sid
            messages.insert(2 + n, json.dumps(other))
        for m in messages:
            ws.send(m)
        ws.shutdown()
        call = stored_call(limited, "CAonce", token=SUPERVISOR)
    assert call["summary"] is not None
    for sid in ("CAsecond", "CAthird"):
        assert limited.get(f"/api/sessions/{sid}", token=SUPERVISOR)[0] == 404
    after = limited.metric(
        "voxaffect_telephony_events_total", protocol="twilio", kind="second_start"
    )
    assert after - before == 2


def test_an_ingest_token_streams_its_own_sessions_and_reads_nothing(limited, beside):
    with beside:
        client = Recorder(limited.url, token=INGEST)
        sid = client.start()["session_id"]
        client.stream(sid, to_pcm16(speech()[:48000]), speed=4)
        client.end(sid)
        assert client.of("emotion_result")
        assert client.call("subscribe", {})["error"]["code"] == "UNAUTHORIZED"
        client.close()
        path = f"/api/sessions/{sid}"
        assert limited.get(path, token=INGEST)[0] == 401
        assert limited.get("/api/sessions", token=INGEST)[0] == 401
        assert limited.get("/api/alerts", token=INGEST)[0] == 401
        assert limited.request(path, token=INGEST, method="DELETE")[0] == 401
        assert limited.get(path, token=SUPERVISOR)[0] == 200
        supervisor = Recorder(limited.url, token=SUPERVISOR)
        assert "sessions" in supervisor.call("subscribe", {})
        supervisor.close()


def _raw(server: ServerProcess, request: bytes) -> bytes:
    """The whole answer to ``request``: a refusal closes its connection at once, well before
    the 10 s an idle keep-alive connection is given."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        return data


def test_a_rebound_host_name_gets_no_data_and_no_websocket(limited, beside):
    host = f"rebind.attacker.example:{limited.port}"
    with beside:
        answer = _raw(
            limited,
            f"GET /api/sessions?token={SUPERVISOR} HTTP/1.1\r\nHost: {host}\r\n"
            "Connection: close\r\n\r\n".encode(),
        )
        assert (
            answer.startswith(b"HTTP/1.1 421") and b"sessions" not in answer.split(b"\r\n\r\n")[1]
        )
        upgrade = _raw(
            limited,
            f"GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\nHost: {host}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode(),
        )
        assert upgrade.startswith(b"HTTP/1.1 421")


def test_a_token_of_the_wrong_type_is_refused_at_once_without_a_traceback(limited, beside):
    with beside:
        for token in ([SUPERVISOR], 12345, {"t": SUPERVISOR}, True):
            client = socketio.Client(reconnection=False)
            started = time.monotonic()
            with pytest.raises(socketio.exceptions.ConnectionError):  # refused, cleanly
                client.connect(
                    limited.url, auth={"token": token}, transports=["websocket"], wait_timeout=10
                )
            assert time.monotonic() - started < 5
    assert "AttributeError" not in limited.log()


def test_deeply_nested_packets_are_refused_and_do_not_flood_the_log(limited, beside):
    before = len(limited.log())
    url = f"ws://127.0.0.1:{limited.port}/socket.io/?EIO=4&transport=websocket&token={INGEST}"
    with beside:
        ws = websocket.create_connection(url, timeout=10)
        ws.recv()  # Engine.IO open
        ws.send("40")  # connect (the token is in the query string)
        ws.recv()
        nested = "42" + "[" * 5000 + "]" * 5000
        for _ in range(200):
            ws.send(nested)
        ws.send('42["ping",{}]')
        ws.shutdown()
        healthz = urllib.request.urlopen(limited.url + "/healthz", timeout=10).status
    assert healthz == 200
    grown = limited.log()[before:]
    assert "RecursionError" not in grown and grown.count("Traceback") <= 1
    assert len(grown) < 20_000  # 200 bad packets: a line or two, not 400 tracebacks


def test_protocol_errors_are_clear_json(limited, beside):
    with beside:
        status, body = limited.get("/api/alerts?since=nan", token=SUPERVISOR)
        assert (status, body["error"]["code"]) == (400, "INVALID_MESSAGE")
        status, body = limited.get("/no/such/route")
        assert (status, body["error"]["code"]) == (404, "NOT_FOUND")
        answer = _raw(limited, b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert answer.startswith(b"HTTP/1.") and b" 414 " in answer.split(b"\r\n")[0]
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "INVALID_MESSAGE"
        status, _, _ = limited.request(
            "/api/sessions", headers={"Authorization": f"bearer {SUPERVISOR}"}
        )
        assert status == 200  # the scheme in any case
        chunked = _raw(
            limited,
            f"POST /api/analyze HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {INGEST}\r\n"
            "Transfer-Encoding: chunked\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            "Connection: close\r\n\r\n0\r\n\r\n".encode(),
        )
        assert chunked.startswith(b"HTTP/1.1 411") and b"Content-Length" in chunked
        client = Recorder(limited.url, token=INGEST)
        client.start(session_id="used-once-id")
        client.end("used-once-id")
        again = client.call("start_session", {"session_id": "used-once-id"})["error"]
        assert again["code"] == "SESSION_EXISTS" and "has ended" in again["message"]
        assert "resume" not in again["message"]
        client.close()


def test_a_store_locked_by_another_process_holds_live_results_back_briefly_not_for_its_lock(
    limited,
):
    client = Recorder(limited.url, token=INGEST)
    sid = client.start()["session_id"]
    lock = sqlite3.connect(limited.db, timeout=10, isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")
    try:
        client.stream(sid, to_pcm16(speech()[: 4 * 16000]), speed=1)
        # results still come while the lock is held (a commit waits 2 s at most, then they
        # go on, degraded), not 10 s later in a clump
        wait_for(lambda: client.of("emotion_result"), 8, "a result while the store is locked")
        assert limited.metric("voxaffect_store_errors_total", kind="slow") >= 1
    finally:
        lock.execute("COMMIT")
        lock.close()
    summary = client.end(sid)
    client.close()
    wait_for(
        lambda: limited.get(f"/api/sessions/{sid}", token=SUPERVISOR)[1].get("summary"),
        30,
        "the session's writes after the lock",
    )
    stored = limited.get(f"/api/sessions/{sid}", token=SUPERVISOR)[1]
    assert [f["seq"] for f in stored["frames"]] == list(range(1, summary["results"] + 1))


def test_a_purge_while_a_session_runs_leaves_it_and_its_results_whole(limited):
    client = Recorder(limited.url, token=INGEST)
    sid = client.start()["session_id"]
    client.stream(sid, to_pcm16(speech()[: 3 * 16000]), speed=4)
    purge = subprocess.run(
        [
            sys.executable,
            "-m",
            "server.cli",
            "purge",
            "--before",
            "2999-01-01",
            "--db",
            str(limited.db),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert purge.returncode == 0, purge.stderr
    client.stream(sid, to_pcm16(speech()[3 * 16000 : 5 * 16000]), speed=4)
    summary = client.end(sid)
    client.close()
    wait_for(
        lambda: (limited.get(f"/api/sessions/{sid}", token=SUPERVISOR)[1] or {}).get("summary"),
        30,
        "the session stored whole",
    )
    stored = limited.get(f"/api/sessions/{sid}", token=SUPERVISOR)[1]
    assert [f["seq"] for f in stored["frames"]] == list(range(1, summary["results"] + 1))
