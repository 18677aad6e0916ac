"""The Socket.IO edge in-process: store-then-send, resume without loss or duplicates, a resume
that reads the store while other sessions' results keep flowing, roles and error codes."""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import pytest

from server.sinks.store import writer as store_writer
from tests.edges.conftest import INGEST, SUPERVISOR, WAIT_S, Edge
from tests.support.speech import speech, to_pcm16

pytestmark = pytest.mark.edges
PCM = to_pcm16(np.tile(speech(), 2))  # 14 s with pauses


class Seen:
    """A Socket.IO test client and everything it has received so far."""

    def __init__(self, edge: Edge, token: str | None = SUPERVISOR) -> None:
        self.client = edge.client(token)
        self.events: list[tuple[str, Any]] = []

    def _take(self) -> None:
        if self.client.is_connected():
            self.events += [(p["name"], p["args"][0]) for p in self.client.get_received()]

    def of(self, name: str) -> list[Any]:
        self._take()
        return [data for n, data in self.events if n == name]

    def wait(self, name: str, count: int) -> list[Any]:
        deadline = time.monotonic() + WAIT_S
        while len(self.of(name)) < count:
            assert time.monotonic() < deadline, f"{count} {name} never came: {self.events}"
            time.sleep(0.01)
        return self.of(name)

    def call(self, event: str, data: Any = None) -> Any:
        return self.client.emit(event, data, callback=True)

    def start(self, **data: Any) -> dict[str, Any]:
        ack = self.call("start_session", data)
        assert "error" not in ack, ack
        return dict(ack)

    def send(self, sid: str, pcm: bytes) -> None:
        self.client.emit("audio_stream", {"session_id": sid, "chunk": pcm})


def seconds(first: float, last: float) -> bytes:
    return PCM[int(first * 32000) : int(last * 32000)]


def test_a_result_reaches_its_client_only_once_the_store_has_it(edge, monkeypatch):
    monkeypatch.setattr(store_writer, "HAND_ON_AFTER_S", 60.0)  # no hand-on: order only
    store = edge.app.service.store
    commits = threading.Event()
    real_commit = store._commit

    def held_commit(writes):
        assert commits.wait(WAIT_S)
        real_commit(writes)

    monkeypatch.setattr(store, "_commit", held_commit)
    client = Seen(edge)
    sid = client.start()["session_id"]
    runner = edge.app.service.registry.get(sid)
    client.send(sid, seconds(0, 2.2))
    deadline = time.monotonic() + WAIT_S
    while runner.session.seq < 1:  # the window is analysed and numbered...
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert client.of("emotion_result") == []  # ...but not sent while its commit waits
    commits.set()
    assert client.wait("emotion_result", 1)[0]["seq"] == 1
    client.call("end_session", {"session_id": sid})
    client.wait("session_summary", 1)
    client.client.disconnect()


def test_a_resumed_session_gets_every_result_after_since_seq_once(edge):
    first = Seen(edge)
    ack = first.start()
    sid, token = ack["session_id"], ack["resume_token"]
    first.send(sid, seconds(0, 4.0))
    got = first.wait("emotion_result", 3)
    first.client.disconnect()
    second = Seen(edge)
    resumed = second.call("start_session", {"resume_token": token, "since_seq": 1})
    assert resumed["resumed"] and resumed["session_id"] == sid
    replayed = second.wait("emotion_result", len(got) - 1)
    assert [r["seq"] for r in replayed] == [r["seq"] for r in got][1:]
    second.send(sid, seconds(4.0, 6.0))
    second.call("end_session", {"session_id": sid})
    second.wait("session_summary", 1)
    seqs = [r["seq"] for r in second.of("emotion_result")]
    assert seqs == list(range(2, seqs[-1] + 1))  # from since_seq on: none lost, none twice
    second.client.disconnect()


def test_a_resume_that_reads_the_store_holds_no_other_sessions_results(edge, monkeypatch):
    """Memory keeps 4 results a session here: a resume from 0 after 6 reads the store. While
    that read is held, the resumed session gets a new result, and another session's result
    comes after it: both reach their rooms (the read is not made under the session's lock,
    which the room publisher needs; it delivers every session's events in order, so under that
    lock one slow read would hold up everyone's results), and the resume is lossless after."""
    owner = Seen(edge)
    ack = owner.start()
    sid, token = ack["session_id"], ack["resume_token"]
    owner.send(sid, seconds(0, 7.0))
    made = owner.wait("emotion_result", 6)
    edge.held.hold()
    owner.send(sid, seconds(7.0, 8.2))  # one more window: the model holds it
    assert edge.held.entered.acquire(timeout=WAIT_S)
    reading, release = threading.Event(), threading.Event()
    store = edge.app.service.store
    real_get = store.get_session

    def held_get(session_id, **kwargs):
        reading.set()
        assert release.wait(WAIT_S)
        return real_get(session_id, **kwargs)

    monkeypatch.setattr(store, "get_session", held_get)
    supervisor = Seen(edge)
    supervisor.call("subscribe", {"session_id": sid})
    resumer = Seen(edge)
    outcome: list[Any] = []
    thread = threading.Thread(
        target=lambda: outcome.append(
            resumer.call("start_session", {"resume_token": token, "since_seq": 0})
        )
    )
    thread.start()
    assert reading.wait(WAIT_S)  # the resume is inside its store read now
    edge.held.release()  # the resumed session's window completes and is published meanwhile
    assert supervisor.wait("emotion_result", 1)[-1]["seq"] == len(made) + 1
    other = Seen(edge)
    other_sid = other.start()["session_id"]
    other.send(other_sid, seconds(0, 2.5))
    assert other.wait("emotion_result", 1)  # delivered while the read is still held
    release.set()
    thread.join(WAIT_S)
    everything = len(made) + 1
    assert outcome and outcome[0]["replayed"] == everything
    replayed = resumer.wait("emotion_result", everything)
    assert [r["seq"] for r in replayed] == list(range(1, everything + 1))
    for client, session_id in ((resumer, sid), (other, other_sid)):
        client.call("end_session", {"session_id": session_id})
    for client in (resumer, other, supervisor, owner):
        client.client.disconnect()


def test_tokens_roles_and_error_codes(edge):
    stranger = edge.client(token=None)
    assert not stranger.is_connected()
    ingest = Seen(edge, token=INGEST)
    assert ingest.call("subscribe", {})["error"]["code"] == "UNAUTHORIZED"
    assert ingest.call("start_session", {"encoding": "mp9"})["error"]["code"] == (
        "UNSUPPORTED_ENCODING"
    )
    ingest.client.emit("audio_stream", {"session_id": "nope", "chunk": b"\x00\x00"})
    assert ingest.wait("error", 2)[-1]["code"] == "UNKNOWN_SESSION"
    ingest.client.emit("audio_stream", "not an object")
    assert ingest.wait("error", 3)[-1]["code"] == "INVALID_MESSAGE"
    ack = ingest.start()
    sid = ack["session_id"]
    ingest.send(sid, seconds(0, 2.2))
    ingest.call("end_session", {"session_id": sid})
    ingest.wait("session_summary", 1)
    ingest.client.disconnect()
    http = edge.http
    path = f"/api/sessions/{sid}"
    deadline = time.monotonic() + WAIT_S
    while http.get(path, headers={"Authorization": f"Bearer {SUPERVISOR}"}).status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert http.get(path, headers={"Authorization": f"Bearer {INGEST}"}).status_code == 401
    own = http.get(f"{path}?format=csv", headers={"X-Resume-Token": ack["resume_token"]})
    assert own.status_code == 200 and own.data.startswith(b"seq,track,start_s")
    wrong = http.get(path, headers={"X-Resume-Token": "not-its-token"})
    assert (wrong.status_code, wrong.json["error"]["code"]) == (401, "UNAUTHORIZED")
    timeline = http.get(path, headers={"Authorization": f"Bearer {SUPERVISOR}"}).json
    csv = http.post("/api/csv", json=timeline, headers={"Authorization": f"Bearer {INGEST}"})
    assert csv.status_code == 200 and csv.data == own.data
    assert http.get("/no/such").json["error"]["code"] == "NOT_FOUND"


def test_short_lived_tokens_do_what_their_scope_says_and_nothing_else(edge):
    metrics = edge.app.service.metrics.registry

    def refused(reason: str) -> float:
        labels = {"reason": reason}
        return metrics.get_sample_value("voxaffect_scoped_tokens_refused_total", labels) or 0.0

    def mint(token: str = SUPERVISOR, **body: Any) -> Any:
        return edge.http.post(
            "/api/tokens", json=body, headers={"Authorization": f"Bearer {token}"}
        )

    before = {r: refused(r) for r in ("scope", "reused", "bad_signature", "expired")}
    assert mint(INGEST, scope="start").status_code == 401  # minting needs a supervisor token
    assert mint(scope="resume").json["error"]["code"] == "INVALID_MESSAGE"  # names no session
    start = mint(scope="start", session_id="browser-call-1").json
    assert start["expires_at"] > time.time() and start["scope"] == "start"

    browser = Seen(edge, token=start["token"])
    assert browser.call("subscribe", {})["error"]["code"] == "UNAUTHORIZED"
    assert browser.call("start_session", {"session_id": "x"})["error"]["code"] == "UNAUTHORIZED"
    ack = browser.start()
    assert ack["session_id"] == "browser-call-1"
    again = Seen(edge, token=start["token"])  # once used, the token starts nothing more
    assert again.call("start_session", {})["error"]["code"] == "UNAUTHORIZED"
    browser.send("browser-call-1", seconds(0, 2.2))

    watch = mint(scope="subscribe", session_id="browser-call-1").json["token"]
    watcher = Seen(edge, token=watch)
    assert "error" not in watcher.call("subscribe", {"session_id": "browser-call-1"})
    assert watcher.call("subscribe", {"session_id": "another"})["error"]["code"] == "UNAUTHORIZED"
    assert watcher.call("subscribe", {})["error"]["code"] == "UNAUTHORIZED"
    assert watcher.call("start_session", {})["error"]["code"] == "UNAUTHORIZED"

    browser.client.disconnect()  # a page reload: it comes back with a resume token of its own
    comeback = mint(scope="resume", session_id="browser-call-1").json["token"]
    back = Seen(edge, token=comeback)
    resumed = back.call(
        "start_session", {"session_id": "browser-call-1", "resume_token": ack["resume_token"]}
    )
    assert resumed["resumed"] is True
    back.call("end_session", {"session_id": "browser-call-1"})
    back.wait("session_summary", 1)
    assert watcher.wait("session_summary", 1)  # the watcher heard the session it may hear

    cut = len(watch) - 10
    tampered = watch[:cut] + ("A" if watch[cut] != "A" else "B") + watch[cut + 1 :]
    assert not edge.client(token=tampered).is_connected()
    short = mint(scope="start", ttl_s=1).json["token"]
    time.sleep(1.6)
    assert not edge.client(token=short).is_connected()
    # no HTTP route takes them
    assert (
        edge.http.get("/api/sessions", headers={"Authorization": f"Bearer {watch}"}).status_code
        == 401
    )
    assert refused("scope") - before["scope"] == 5
    assert refused("reused") - before["reused"] == 1
    assert refused("bad_signature") - before["bad_signature"] == 1
    assert refused("expired") - before["expired"] == 1
