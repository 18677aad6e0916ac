from __future__ import annotations

import hashlib
import sqlite3
import time

import numpy as np
import pytest
import socketio

from tests.protocol.conftest import TOKEN
from tests.support.client import Recorder, wait_for
from tests.support.harness import ServerProcess
from tests.support.speech import silence, speech, to_pcm16

pytestmark = pytest.mark.protocol


def speech_pcm(repeat: int = 1) -> bytes:
    return to_pcm16(np.concatenate([silence(0.3)] + [speech()] * repeat + [silence(0.3)]))


def test_another_connection_can_neither_send_to_nor_hear_a_session(server):
    owner, other = Recorder(server.url), Recorder(server.url)
    sid = owner.start()["session_id"]
    other_sid = other.start()["session_id"]
    ack = other.call("end_session", {"session_id": sid})
    assert ack["error"]["code"] == "UNAUTHORIZED"
    other.send(sid, speech_pcm()[:3200])
    wait_for(lambda: len(other.errors("UNAUTHORIZED")) >= 2, 10, "two UNAUTHORIZED errors")
    owner.stream(sid, speech_pcm(), speed=4)
    owner.end(sid)
    assert owner.of("emotion_result")
    assert [r for r in other.of("emotion_result") if r["session_id"] == sid] == []
    # taking a session's id without its token is refused too
    third = Recorder(server.url)
    refused = third.call("start_session", {"session_id": other_sid})["error"]
    assert refused["code"] == "SESSION_EXISTS" and "resume_token" in refused["message"]
    for c in (owner, other, third):
        c.close()


def test_resume_after_a_drop_loses_and_duplicates_nothing(server):
    first = Recorder(server.url)
    ack = first.start()
    sid, token = ack["session_id"], ack["resume_token"]
    pcm = speech_pcm(repeat=2)  # ~15 s of audio
    half = len(pcm) // 2 // 3200 * 3200
    first.stream(sid, pcm[:half], speed=3.0)
    got = wait_for(lambda: first.of("emotion_result"), 30, "results before the drop")
    since = got[-1]["seq"]
    first.close()  # the connection drops; the session carries on with what it has

    second = Recorder(server.url)
    resumed = second.start(resume_token=token, since_seq=since)
    assert resumed["session_id"] == sid and resumed["resumed"] is True
    second.stream(sid, pcm[half:], speed=3.0)
    second.end(sid)
    before = {r["seq"] for r in first.of("emotion_result") if r["seq"] <= since}
    after = [r["seq"] for r in second.of("emotion_result")]
    assert len(after) == len(set(after)), "no result twice"
    assert min(after) == since + 1
    assert sorted(before | set(after)) == list(range(1, max(after) + 1)), "none lost"
    _status, stored = server.get(f"/api/sessions/{sid}")
    assert [f["seq"] for f in stored["frames"]] == list(range(1, max(after) + 1))
    second.close()


def test_results_made_while_away_are_replayed_on_resume(gated):
    """The model is held until the client has gone: the result is made while it is away."""
    server, gate = gated
    gate.hold()
    first = Recorder(server.url)
    ack = first.start()
    sid, token = ack["session_id"], ack["resume_token"]
    first.stream(sid, to_pcm16(speech()[: int(2.5 * 16000)]), speed=4)  # one window: [0, 2]
    first.sio.call("ping", {})  # every chunk has reached the server
    first.close()
    assert first.of("emotion_result") == []
    gate.release()
    stored = wait_for(
        lambda: server.get(f"/api/sessions/{sid}")[1]["frames"],
        30,
        "the result made while the client was away",
    )
    second = Recorder(server.url)
    resumed = second.start(resume_token=token, since_seq=0)
    assert resumed["replayed"] == len(stored) == 1
    second.end(sid)
    seqs = [r["seq"] for r in second.of("emotion_result")]
    assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) >= 2  # + the final window
    assert second.of("emotion_result")[0]["scores"] == stored[0]["scores"]
    second.close()


def test_a_bad_resume_token_is_refused(server):
    client = Recorder(server.url)
    ack = client.call("start_session", {"resume_token": "not-a-token"})
    assert ack["error"]["code"] == "UNKNOWN_SESSION"
    client.close()


def test_a_burst_on_an_idle_server_is_analysed_whole_in_stream_order(server):
    before = server.metric("voxaffect_windows_skipped_total", reason="expired")
    client = Recorder(server.url)
    sid = client.start()["session_id"]
    pcm = to_pcm16(speech())[: int(16000 * 2 * 4.9)]
    client.send(sid, pcm)  # 4.9 s in one chunk: [0, 2], [1, 3] and [2, 4] come due at once
    client.end(sid)
    results = client.of("emotion_result")
    assert [(r["start_s"], r["end_s"]) for r in results] == [
        (0.0, 2.0),
        (1.0, 3.0),
        (2.0, 4.0),
        (2.9, 4.9),
    ]
    assert [r["hop_s"] for r in results] == [None, 1.0, 1.0, 0.9]
    assert [r["expired"] for r in results] == [0, 0, 0, 0]
    assert server.metric("voxaffect_windows_skipped_total", reason="expired") == before
    assert client.of("session_summary")[-1]["expired"] == 0
    client.close()


def test_windows_that_cannot_be_answered_in_time_expire_and_the_next_result_says_so(gated):
    """The model is held past the 1.5 s latency budget: windows waiting meanwhile are dropped
    unanalysed, counted, and the next result of the track says how many; none comes late."""
    server, gate = gated
    before = server.metric("voxaffect_windows_skipped_total", reason="expired")
    client = Recorder(server.url)
    # windows only: the speech's pauses would also queue utterances, counted in the same depth
    sid = client.start(options={"utterances": False})["session_id"]
    pcm = to_pcm16(np.tile(speech(), 2))
    lanes = server.get("/api/info")[1]["model"]["lanes"]
    gate.hold()
    second = 16000 * 2
    client.send(sid, pcm[: 2 * second])  # [0, 2] is due: a lane takes it, and the gate holds it
    wait_for(lambda: gate.entered() == 1, 30, "the model to hold [0, 2]")
    for lane in range(1, lanes):  # every other lane gets one window to hold too
        client.send(sid, pcm[(1 + lane) * second : (2 + lane) * second])
        wait_for(lambda n=lane + 1: gate.entered() == n, 30, "every lane to hold a window")
    sent = 1 + lanes
    time.sleep(1.0)  # the rate limit lets a client run 5 s ahead of 4x real time, no more
    client.send(sid, pcm[sent * second : (sent + 3) * second])  # three more: they must wait
    wait_for(lambda: server.metric("voxaffect_queue_depth") == 3, 30, "three windows waiting")
    time.sleep(2.0)  # past every waiting window's deadline: held, not timed (the gate decides)
    gate.release()
    wait_for(lambda: len(client.of("emotion_result")) == lanes, 30, "the held windows' results")
    # The held batches took seconds: the model's expected time is now too long for any window.
    # After PROBE_AFTER_S (1 s) with nothing run, the next window is tried, and what it really
    # takes resets the estimate (engine/batcher.py); the new audio comes a window at a time.
    time.sleep(1.5)
    for k in range(2):
        start = (sent + 3 + k) * second
        client.send(sid, pcm[start : start + second])  # [sent + 2 + k, sent + 4 + k]
        wait_for(lambda n=lanes + 1 + k: len(client.of("emotion_result")) == n, 30, "a result")
    client.end(sid)
    results = client.of("emotion_result")
    summary = client.of("session_summary")[-1]
    expired = server.metric("voxaffect_windows_skipped_total", reason="expired") - before
    assert client.errors() == []
    assert expired == 3 and summary["expired"] == 3
    after_gap = [r for r in results if r["expired"]]
    assert [r["expired"] for r in after_gap] == [3]  # told once, on the next result
    assert after_gap[0]["start_s"] == float(sent + 2)  # the first window of the new audio
    assert [r["start_s"] for r in results][:lanes] == [float(i) for i in range(lanes)]
    client.close()


def test_a_disconnected_session_expires_after_the_resume_ttl(strict_server):
    client = Recorder(strict_server.url, token=TOKEN)
    ack = client.start()
    client.stream(ack["session_id"], speech_pcm(), speed=2)
    client.close()
    wait_for(
        lambda: strict_server.get(f"/api/sessions/{ack['session_id']}", token=TOKEN)[1].get(
            "summary"
        ),
        15,
        "the expired session's stored summary",
    )
    _status, stored = strict_server.get(f"/api/sessions/{ack['session_id']}", token=TOKEN)
    assert stored["summary"]["reason"] == "not resumed"
    again = Recorder(strict_server.url, token=TOKEN)
    assert (
        again.call("start_session", {"resume_token": ack["resume_token"]})["error"]["code"]
        == "UNKNOWN_SESSION"
    )
    again.close()


def test_an_idle_session_is_closed(strict_server):
    client = Recorder(strict_server.url, token=TOKEN)
    sid = client.start()["session_id"]
    summary = wait_for(lambda: client.of("session_summary"), 15, "the idle session's summary")[0]
    assert summary["session_id"] == sid and summary["reason"] == "idle"
    client.send(sid, b"\x00\x00" * 160)
    wait_for(lambda: client.errors("UNKNOWN_SESSION"), 10, "UNKNOWN_SESSION after close")
    client.close()


def test_session_limit(strict_server):
    clients = [Recorder(strict_server.url, token=TOKEN) for _ in range(4)]
    acks = [c.call("start_session", {}) for c in clients]
    assert [("error" in a) for a in acks].count(False) <= 3
    refused = [a for a in acks if "error" in a]
    assert refused and refused[0]["error"]["code"] == "SESSION_LIMIT"
    assert clients[-1].errors("SESSION_LIMIT")
    for c, a in zip(clients, acks, strict=True):
        if "error" not in a:
            c.call("end_session", {"session_id": a["session_id"]})
        c.close()


def refusal(url: str, token: str | None) -> object:
    """What the server says when it refuses a Socket.IO connection."""
    sio = socketio.Client(reconnection=False)
    said: list[object] = []
    sio.on("connect_error", said.append)
    with pytest.raises(socketio.exceptions.ConnectionError):
        sio.connect(url, auth={"token": token} if token else None, transports=["websocket"])
    return said[0]


def test_tokens_are_required_on_connect_and_rest(strict_server):
    said = refusal(strict_server.url, None)
    assert said == {"message": "a valid token is required", "data": {"code": "UNAUTHORIZED"}}
    assert refusal(strict_server.url, "wrong")["data"]["code"] == "UNAUTHORIZED"
    assert strict_server.get("/api/sessions")[0] == 401
    assert strict_server.get("/api/sessions", token="wrong")[0] == 401
    assert strict_server.get("/api/sessions", token=TOKEN)[0] == 200
    assert strict_server.get("/api/sessions?token=second-token-7654321")[0] == 200
    assert strict_server.get("/healthz")[0] == 200 and strict_server.get("/readyz")[0] == 200
    ok = Recorder(strict_server.url, token="second-token-7654321")
    ok.close()


def test_cors_allows_same_origin_and_the_allow_list_only(strict_server):
    def handshake(origin: str | None) -> int:
        headers = {"Origin": origin} if origin else {}
        status, _, _ = strict_server.request(
            f"/socket.io/?EIO=4&transport=polling&token={TOKEN}", headers=headers
        )
        return status

    assert handshake(None) == 200
    assert handshake(strict_server.url) == 200
    assert handshake("http://allowed.example") == 200
    assert handshake("http://evil.example") == 400


def test_a_crash_loses_no_result_a_client_has_seen(tiny_model_dir, tmp_path):
    """Results reach their client only once they are committed: SIGKILL loses none of them."""
    proc = ServerProcess(tiny_model_dir, tmp_path / "crash").start()
    client = Recorder(proc.url)
    sid = client.start()["session_id"]
    client.stream(sid, speech_pcm(repeat=2), speed=2.0)
    wait_for(lambda: len(client.of("emotion_result")) >= 6, 30, "results")
    proc.kill()  # SIGKILL: no shutdown, no flush
    seen = {r["seq"] for r in client.of("emotion_result")}
    client.close()
    with sqlite3.connect(proc.db) as conn:
        stored = {
            seq for (seq,) in conn.execute("SELECT seq FROM results WHERE session_id = ?", (sid,))
        }
    assert seen and seen <= stored
    # the next process on the same store closes the session it left open, as interrupted
    proc2 = ServerProcess(tiny_model_dir, tmp_path / "crash", db=proc.db, port=proc.port).start()
    status, timeline = proc2.get(f"/api/sessions/{sid}")
    proc2.stop()
    assert status == 200 and {f["seq"] for f in timeline["frames"]} == stored
    assert timeline["summary"]["reason"] == "interrupted"
    assert timeline["summary"]["results"] == len(timeline["frames"])
    assert timeline["ended_at"] is not None


def test_a_token_holder_deletes_an_ended_session_and_the_deletion_is_logged(strict_server):
    client = Recorder(strict_server.url, token=TOKEN)
    ack = client.start()
    path = f"/api/sessions/{ack['session_id']}"
    client.send(ack["session_id"], to_pcm16(speech()[:16000]))
    assert strict_server.request(path, token=TOKEN, method="DELETE")[0] == 409  # still open
    assert strict_server.get(path, token=TOKEN)[0] == 200
    client.end(ack["session_id"])
    client.close()
    assert strict_server.request(path, method="DELETE")[0] == 401  # no token: nothing happens
    assert strict_server.get(path, token=TOKEN)[0] == 200
    status, body, _ = strict_server.request(path, token=TOKEN, method="DELETE")
    assert (status, body) == (204, b"")
    assert strict_server.get(path, token=TOKEN)[1]["error"]["code"] == "UNKNOWN_SESSION"
    assert strict_server.request(path, token=TOKEN, method="DELETE")[0] == 404
    assert all(s["session_id"] != ack["session_id"] for s in _stored(strict_server))
    deletions = [line for line in strict_server.log().splitlines() if "deleted on request" in line]
    assert len(deletions) == 1 and ack["session_id"] in deletions[0]
    fields = dict(part.split("=", 1) for part in deletions[0].split() if "=" in part)
    assert fields["remote"] == "127.0.0.1"
    # a keyed fingerprint of 16 hex digits: not the token, not its plain hash
    assert len(fields["token"]) == 16 and int(fields["token"], 16) >= 0
    assert TOKEN not in deletions[0]
    assert hashlib.sha256(TOKEN.encode()).hexdigest()[:12] not in deletions[0]


def _stored(server: ServerProcess) -> list[dict]:
    return server.get("/api/sessions?limit=1000", token=TOKEN)[1]["sessions"]


def test_a_summary_waits_for_its_utterances_within_a_bound_and_never_hangs(
    tiny_model_dir, tmp_path
):
    """The model is held for good: the session's windows time out or expire, its utterances
    never get a turn. The summary still comes, once ``inference_timeout_s`` and then
    ``utterance_wait_s`` have passed, and says which utterances ended unanalysed; the server
    carries on once the model is back."""
    from tests.support.gates import GATE_ENV, Gate

    gate = Gate(tmp_path / "gate")
    server = ServerProcess(
        tiny_model_dir,
        tmp_path / "server",
        "--inference-timeout-s=2",
        "--utterance-wait-s=2",
        env={"VOXAFFECT_TEST_WRAP_PREDICTOR": "tests.support.gates:wrap", GATE_ENV: str(gate.dir)},
    ).start()
    try:
        gate.hold()
        client = Recorder(server.url)
        sid = client.start()["session_id"]
        client.stream(sid, to_pcm16(np.concatenate([speech(), silence(0.6)])), speed=4)
        started = time.monotonic()
        summary = client.end(sid)
        waited = time.monotonic() - started
        assert waited < 2 + 2 + 8  # the two bounds, and room for a slow machine
        assert client.of("utterance_result") == []
        said = summary["utterances"]
        assert said["count"] == 0 and said["dropped"].get("ended", 0) >= 1
        assert server.metric("voxaffect_utterances_total", outcome="ended") >= 1
        client.close()

        gate.release()  # the held batch finishes; its late answer finds nothing waiting
        again = Recorder(server.url)
        sid = again.start()["session_id"]
        again.stream(sid, to_pcm16(np.concatenate([speech(), silence(0.6)])), speed=4)
        # utterances wait out DEMAND_WINDOW_S after the shed windows above, then run
        wait_for(lambda: again.of("utterance_result"), 60, "an utterance of the new session")
        summary = again.end(sid)
        assert again.of("emotion_result") and summary["utterances"]["count"] >= 1
        again.close()
    finally:
        gate.release()
        server.stop()
