"""Each defect found by hostile testing, replayed while a healthy stream runs beside it (see
conftest.py): the attack fails cleanly and costs the healthy stream nothing."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time

import numpy as np
import pytest
import soundfile as sf
import websocket

from tests.hostile.conftest import rss_mb, stream_once
from tests.support.calls import at_8k, mulaw, replay, stored_call, twilio_messages, ws_url
from tests.support.client import Recorder, wait_for
from tests.support.harness import ServerProcess, multipart
from tests.support.speech import silence, speech, to_pcm16

pytestmark = pytest.mark.hostile


def twilio_start(call_sid: str) -> list[str]:
    return twilio_messages(call_sid, {"inbound": mulaw(at_8k(speech()[:8000]))})[:2]


def media(chunk: int, payload: bytes = b"\xff" * 160, track: str = "inbound") -> str:
    return json.dumps(
        {
            "event": "media",
            "media": {
                "track": track,
                "chunk": str(chunk),
                "payload": base64.b64encode(payload).decode(),
            },
        }
    )


def count(server: ServerProcess, kind: str, protocol: str = "twilio") -> float:
    return server.metric("voxaffect_telephony_events_total", protocol=protocol, kind=kind)


def test_twilio_chunk_numbers_far_ahead_cost_no_time_and_no_memory(hostile, healthy):
    server, _ = hostile
    before_rss, before_gaps = rss_mb(server.proc.pid), count(server, "chunk_gap")
    with healthy:
        ws = websocket.create_connection(ws_url(server, "/telephony/twilio"), timeout=30)
        for message in twilio_start("CAfarahead"):
            ws.send(message)
        ws.send(media(1))
        for ahead in (1 + 10**6, 1 + 5 * 10**6, 10**9, 10**18):
            ws.send(media(ahead))
        ws.send(json.dumps({"event": "stop"}))
        ws.close()
        call = stored_call(server, "CAfarahead")
    assert count(server, "chunk_gap") - before_gaps == 4
    assert rss_mb(server.proc.pid) - before_rss < 100
    # the silence put in for the jumps is bounded by the time that passed (well under a minute)
    assert call["summary"]["tracks"]["customer"]["duration_s"] < 60


def test_a_session_id_is_never_reused_and_an_ended_room_hears_nothing(hostile, healthy):
    server, _ = hostile
    with healthy:
        a = Recorder(server.url)
        a.start(session_id="reused-id")
        a.stream("reused-id", to_pcm16(speech()[:48000]), speed=4)
        a.end("reused-id")
        kept = [r["seq"] for r in a.of("emotion_result")]
        b = Recorder(server.url)
        refused = b.call("start_session", {"session_id": "reused-id"})["error"]
        assert refused["code"] == "SESSION_EXISTS"
        sid = b.start()["session_id"]
        b.stream(sid, to_pcm16(speech()[:48000]), speed=4)
        b.end(sid)
        before = count(server, "duplicate_call")
        replay(
            ws_url(server, "/telephony/twilio"),
            twilio_messages("reused-id", {"inbound": mulaw(at_8k(speech()))})[:40],
        )
        wait_for(lambda: count(server, "duplicate_call") > before, 10, "a refused duplicate call")
    assert {r["session_id"] for r in a.of("emotion_result")} == {"reused-id"}
    assert a.of("session_summary")[-1]["session_id"] == "reused-id"
    stored = server.get("/api/sessions/reused-id")[1]
    assert stored["source"] == "socketio" and [f["seq"] for f in stored["frames"]] == kept
    a.close()
    b.close()


def test_a_client_cannot_speak_for_another_connection_by_naming_its_sid(hostile, healthy):
    """Audio skips Flask's request context on a fast path that takes the sid from
    python-socketio: a second argument a client adds (another connection's sid) is never
    taken for it, nor made the address of an error."""
    server, _ = hostile
    with healthy:
        owner = Recorder(server.url)
        session_id = owner.start()["session_id"]
        intruder = Recorder(server.url)
        victim = owner.sio.get_sid("/")
        chunk = to_pcm16(speech()[:16000])
        for event in ("audio_stream", "subscribe", "end_session"):
            intruder.sio.emit(event, ({"session_id": session_id, "chunk": chunk}, victim))
        intruder.send(session_id, chunk)  # the usual form: someone else's session
        wait_for(lambda: intruder.errors(), 10, "the intruder's own error")
        summary = owner.end(session_id)
    assert summary["duration_s"] == 0.0  # not one sample of the intruder's reached it
    assert owner.errors() == []
    assert {e["code"] for e in intruder.errors()} <= {"UNAUTHORIZED", "INVALID_MESSAGE"}
    owner.close()
    intruder.close()


def test_a_catch_up_burst_loses_no_window_to_the_ring_buffer(hostile, healthy):
    server, _ = hostile
    pcm = to_pcm16(np.tile(speech(), 3)[: 16 * 16000])
    with healthy:
        client = Recorder(server.url)
        sid = client.start()["session_id"]
        client.stream(sid, pcm[:32000], speed=1)  # 1 s, then a 4.5 s stall
        time.sleep(4.5)
        for at in range(32000, len(pcm), 3200):  # 150 chunks of 100 ms at once
            client.send(sid, pcm[at : at + 3200])
        summary = client.end(sid)
        single = Recorder(server.url)
        sid2 = single.start()["session_id"]
        time.sleep(3.0)  # the rate allowance for 12 s at once
        single.send(sid2, pcm[:384_000])  # one 384 KB chunk: 12 s
        summary2 = single.end(sid2)
    for c, s, seconds in ((client, summary, 16.0), (single, summary2, 12.0)):
        assert c.errors() == []
        results = c.of("emotion_result")
        assert results[-1]["end_s"] == pytest.approx(seconds, abs=0.05)  # the newest is analysed
        assert s["windows"] + s["expired"] + s["skipped_silence"] >= seconds - 2
        c.close()


def test_oversized_audio_fork_frames_are_refused_and_counted(hostile, healthy):
    server, _ = hostile
    before_rss, before = rss_mb(server.proc.pid), count(server, "oversized", "audiofork")
    with healthy:
        for size in (70_000, 8 << 20):
            ws = websocket.create_connection(ws_url(server, "/telephony/audiofork"), timeout=30)
            ws.send(json.dumps({"call_id": f"fork-big-{size}"}))
            try:
                for _ in range(8):
                    ws.send_binary(b"\x00" * size)
            except (BrokenPipeError, ConnectionResetError, websocket.WebSocketException):
                pass  # the server closed it
            finally:
                ws.shutdown()
        wait_for(lambda: count(server, "oversized", "audiofork") >= before + 2, 10, "faults")
    assert rss_mb(server.proc.pid) - before_rss < 200


def test_a_second_connection_for_a_live_call_takes_it_over(hostile, healthy):
    server, _ = hostile
    first_audio = mulaw(at_8k(speech()[: 3 * 16000]))
    second_audio = mulaw(at_8k(np.concatenate([speech(pitch=70), silence(0.3)])))
    before = count(server, "takeover")
    with healthy:
        first = websocket.create_connection(ws_url(server, "/telephony/twilio"), timeout=30)
        msgs = twilio_messages("CAtwice", {"inbound": first_audio})
        for m in msgs[:-2]:  # start and 3 s of media; no stop
            first.send(m)
        second_msgs = twilio_messages("CAtwice", {"inbound": second_audio})
        replay(ws_url(server, "/telephony/twilio"), second_msgs[1:])  # start, media, stop
        first.settimeout(10)
        closed = first.recv_data()  # the server closed the first connection, with a reason
        first.shutdown()
        call = stored_call(server, "CAtwice")
        # the audio fork must not merge into a live Twilio call either
        fork_before = count(server, "duplicate_call", "audiofork")
        live = websocket.create_connection(ws_url(server, "/telephony/twilio"), timeout=30)
        for m in twilio_messages("CAlive", {"inbound": first_audio})[:20]:
            live.send(m)
        replay(
            ws_url(server, "/telephony/audiofork"),
            [json.dumps({"call_id": "CAlive"}), b"\x00" * 640],
        )
        wait_for(lambda: count(server, "duplicate_call", "audiofork") > fork_before, 10, "refusal")
        live.send(json.dumps({"event": "stop"}))
        live.close()
        live.shutdown()
    assert closed[0] == websocket.ABNF.OPCODE_CLOSE and b"took this call over" in closed[1]
    assert count(server, "takeover") - before == 1
    summary = call["summary"]
    assert summary["reason"] == "call ended"
    spoken = (len(first_audio) + len(second_audio)) / 8000
    assert summary["tracks"]["customer"]["duration_s"] == pytest.approx(spoken, abs=0.3)
    assert "Traceback" not in server.log()


def test_telephony_refuses_a_foreign_browser_origin(hostile, healthy):
    server, _ = hostile
    with healthy:
        with pytest.raises(websocket.WebSocketBadStatusException) as info:
            websocket.create_connection(
                ws_url(server, "/telephony/twilio"), origin="http://evil.example", timeout=10
            )
        assert info.value.status_code == 403
        same = websocket.create_connection(
            ws_url(server, "/telephony/twilio"), origin=server.url, timeout=10
        )
        same.close()
        none = websocket.create_connection(
            ws_url(server, "/telephony/twilio"), suppress_origin=True, timeout=10
        )
        none.close()
    assert count(server, "foreign_origin") >= 1


def test_huge_float_samples_are_clipped_and_the_session_goes_on(hostile, healthy):
    server, _ = hostile
    with healthy:
        client = Recorder(server.url)
        sid = client.start(encoding="pcm_f32le")["session_id"]
        loud = np.full(2 * 16000, 1e30, dtype="<f4").tobytes()
        for at in range(0, len(loud), 6400):
            client.send(sid, loud[at : at + 6400])
        normal = np.tile(speech(), 2)[: 12 * 16000].astype("<f4").tobytes()
        for at in range(0, len(normal), 6400):
            client.send(sid, normal[at : at + 6400])
            time.sleep(0.02)
        summary = client.end(sid)
        wav = io.BytesIO()
        sf.write(wav, np.full(3 * 16000, 1e30, np.float32), 16000, format="WAV", subtype="FLOAT")
        body, ctype = multipart("file", "loud.wav", wav.getvalue())
        status, _raw, headers = server.request(
            "/api/analyze", data=body, headers={"Content-Type": ctype}
        )
    results = client.of("emotion_result")
    assert client.errors() == [] and summary["failed"] == 0
    assert [r for r in results if r["start_s"] >= 2.0], "the normal speech after it was analysed"
    assert all(np.isfinite(r["stress"]["index"]) for r in results)
    assert status == 200 and headers["Content-Type"] == "application/json"
    client.close()


def test_a_long_upload_does_not_starve_live_streams(hostile, healthy_audio, reference):
    """With the model made slow (every batch 0.2 s), a live stream beside a 2.5-minute upload
    gets every result while the upload is still being analysed (its windows take 15 s at least
    with two lanes, the live stream 9 s; short audio, so a loaded CPU adds little to that).
    Queued behind the upload, its windows would be superseded (one in flight, one pending) and
    its summary would come after the upload's end; how many milliseconds each result took
    depends on the CPU and is not asserted (the batcher's order is: tests/unit/test_batcher.py)."""
    server, gate = hostile
    gate.slow(0.2)
    wav = io.BytesIO()
    long_talk = np.tile(np.concatenate([speech(), silence(0.5)]), 45)[: 150 * 16000]
    sf.write(wav, long_talk, 16000, format="WAV", subtype="PCM_16")
    body, ctype = multipart("file", "long.wav", wav.getvalue())
    upload: dict = {}
    thread = threading.Thread(
        target=lambda: upload.update(
            zip(
                ("status", "raw", "headers"),
                server.request("/api/analyze", data=body, headers={"Content-Type": ctype}),
                strict=False,
            )
        )
    )
    thread.start()
    wait_for(lambda: server.metric("voxaffect_queue_depth") > 0, 30, "the upload in the queue")
    busy, summary, errors = stream_once(server.url, healthy_audio, speed=1.0)
    assert thread.is_alive(), "the upload must still be running while the live stream is measured"
    thread.join(600)
    gate.reset()
    assert errors == [] and summary["expired"] == 0
    assert [(r["start_s"], r["end_s"]) for r in busy] == reference
    assert upload["status"] == 200 and json.loads(upload["raw"])["summary"]["windows"] > 100


@pytest.mark.parametrize(
    "call_sid", ['CA"quote', "CA\r\nX-Injected: 1", "CA/../slash", "C" * 200_000, "x" * 129]
)
def test_call_ids_follow_the_one_session_id_rule(hostile, healthy, call_sid):
    server, _ = hostile
    before = count(server, "bad_call_id") + count(server, "oversized")
    with healthy:
        msgs = twilio_messages("CAplaceholder", {"inbound": mulaw(at_8k(speech()[:16000]))})
        start = json.loads(msgs[1])
        start["start"]["callSid"] = call_sid
        replay(ws_url(server, "/telephony/twilio"), [msgs[0], json.dumps(start), *msgs[2:12]])
        wait_for(
            lambda: count(server, "bad_call_id") + count(server, "oversized") > before, 10, "fault"
        )
    listed = [s["session_id"] for s in server.get("/api/sessions?limit=1000")[1]["sessions"]]
    assert call_sid not in listed and not any(sid.startswith("CA/") for sid in listed)


def test_a_connection_that_never_sends_a_request_is_closed(hostile, healthy):
    server, _ = hostile
    with healthy:
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        started = time.monotonic()
        answer = sock.recv(4096)  # 408, then closed (handshake_timeout_s is 2 here)
        assert answer == b"" or answer.startswith(b"HTTP/1.1 408")
        waited = time.monotonic() - started
        sock.close()
    assert waited < 20


def test_a_wav_chunk_claiming_1_hz_is_invalid_audio(hostile, healthy):
    server, _ = hostile
    wav = io.BytesIO()
    sf.write(wav, np.zeros(100, np.float32), 1, format="WAV", subtype="PCM_16")
    with healthy:
        client = Recorder(server.url)
        sid = client.start(encoding="wav")["session_id"]
        client.send(sid, wav.getvalue())
        error = wait_for(lambda: client.errors(), 10, "an error")[0]
        client.call("end_session", {"session_id": sid})
        client.close()
    assert error["code"] == "INVALID_AUDIO" and "1 Hz" in error["message"]


def test_negative_twilio_chunk_numbers_are_counted(hostile, healthy):
    server, _ = hostile
    before = count(server, "bad_chunk")
    with healthy:
        replay(
            ws_url(server, "/telephony/twilio"),
            [*twilio_start("CAnegative"), media(-5), media(-1), json.dumps({"event": "stop"})],
        )
        wait_for(lambda: count(server, "bad_chunk") >= before + 2, 10, "two counted faults")
