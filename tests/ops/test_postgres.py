"""One PostgreSQL store for every node: two servers on Redis and a real, throwaway PostgreSQL
cluster (Debian's postgresql, started with initdb/pg_ctl in a temp dir as a non-root user)."""

from __future__ import annotations

import csv
import glob
import io
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from client.stream import StreamClient
from tests.support.balancer import Balancer
from tests.support.calls import party_audio
from tests.support.client import Recorder, wait_for
from tests.support.harness import ServerProcess, free_port, redis_server
from tests.support.providers import (
    AUDIOHOOK_KEY,
    AUDIOHOOK_SECRET,
    AudioHookClient,
    open_parameters,
    stereo_mulaw,
)
from tests.support.speech import speech, to_pcm16

pytestmark = pytest.mark.ops
TOKEN = "pg-token-0123456789"


def _pg_bin(name: str) -> str:
    """Debian keeps PostgreSQL's server programs off PATH, in /usr/lib/postgresql/NN/bin."""
    found = shutil.which(name) or next(
        iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None
    )
    if found is None:
        pytest.fail(f"{name} not found: install Debian's postgresql (make system)")
    return found


class Postgres:
    def __init__(self) -> None:
        # not under pytest's tmp dir: that is private to this user, and PostgreSQL refuses to run
        # as root, so as root it runs as the package's own user, in a directory of its own
        self.work = Path(tempfile.mkdtemp(prefix="voxaffect-pg-"))
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        self.dir = self.work / "pgdata"
        self.log = self.work / "postgres.log"
        self.port = free_port()
        self.url = f"postgresql://voxaffect:secret@127.0.0.1:{self.port}/postgres"
        work = self.work
        (work / "pw").write_text("secret\n")
        if self.as_user:
            for path in (work, work / "pw"):
                shutil.chown(path, "postgres")
        self._run(
            _pg_bin("initdb"),
            "-D",
            str(self.dir),
            "-U",
            "voxaffect",
            "--auth=scram-sha-256",
            f"--pwfile={work / 'pw'}",
            "--no-sync",
        )

    def _run(self, *argv: str) -> None:
        subprocess.run([*self.as_user, *argv], check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.dir} -c fsync=off"
        self._run(
            _pg_bin("pg_ctl"),
            "-D",
            str(self.dir),
            "-l",
            str(self.log),
            "-o",
            options,
            "-w",
            "start",
        )

    def stop(self) -> None:
        self._run(_pg_bin("pg_ctl"), "-D", str(self.dir), "-m", "fast", "-w", "stop")

    def remove(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    work = tmp_path_factory.mktemp("pgcluster")
    pg = Postgres()
    pg.start()
    with redis_server() as queue:
        nodes = [
            ServerProcess(
                tiny_model_dir,
                work / f"node{i}",
                f"--db={pg.url}",
                f"--message-queue={queue}",
                "--telephony-tracks=customer,agent",
                env={
                    "VOXAFFECT_API_TOKENS": f"{TOKEN},{AUDIOHOOK_KEY}",
                    "VOXAFFECT_AUDIOHOOK_CLIENT_SECRET": AUDIOHOOK_SECRET,
                },
            )
            for i in (1, 2)
        ]
        try:
            starting = [threading.Thread(target=node.start) for node in nodes]  # both at once
            for t in starting:
                t.start()
            for t in starting:
                t.join()
            assert all(node.proc is not None and node.proc.poll() is None for node in nodes)
            yield {"pg": pg, "a": nodes[0], "b": nodes[1]}
        finally:
            for node in nodes:
                node.stop()
            pg.stop()
            pg.remove()


def test_node_b_serves_the_full_timeline_of_a_session_node_a_ran_until_it_was_killed(cluster):
    a, b = cluster["a"], cluster["b"]
    assert b.get("/readyz")[1]["store"]["backend"] == "postgresql"
    client = Recorder(a.url, token=TOKEN)
    sid = client.start(session_id="call-on-a")["session_id"]
    client.stream(sid, to_pcm16(np.concatenate([speech(), speech()])), speed=2.0)
    wait_for(lambda: len(client.of("emotion_result")) >= 5, 60, "results from node A")
    a.kill()  # SIGKILL: no shutdown, no flush
    seen = {r["seq"]: r for r in client.of("emotion_result")}
    client.close()

    status, timeline = b.get(f"/api/sessions/{sid}", token=TOKEN)
    assert status == 200, timeline
    stored = {f["seq"]: f for f in timeline["frames"]}
    assert seen.keys() <= stored.keys(), "a result the client saw is not in the database"
    for seq, result in seen.items():
        assert stored[seq]["stress"]["index"] == result["stress"]["index"]
    status, body, _ = b.request(f"/api/sessions/{sid}?format=csv", token=TOKEN)
    rows = list(csv.DictReader(io.StringIO(body.decode())))
    assert status == 200 and [int(r["seq"]) for r in rows] == sorted(stored)
    # the id is taken for every node, not only the one that ran it
    again = Recorder(b.url, token=TOKEN)
    assert again.call("start_session", {"session_id": sid})["error"]["code"] == "SESSION_EXISTS"
    again.close()
    # node A, back on its feet, closes the session it was running as interrupted
    a.start()  # same port: the same node; ready once that is committed
    status, timeline = b.get(f"/api/sessions/{sid}", token=TOKEN)
    assert timeline["summary"] is not None, "node A said it was ready with the call still open"
    assert timeline["summary"]["reason"] == "interrupted"
    assert {f["seq"] for f in timeline["frames"]} == stored.keys()


def test_a_database_outage_degrades_the_store_and_loses_no_result(cluster):
    pg, b = cluster["pg"], cluster["b"]
    client = Recorder(b.url, token=TOKEN)
    sid = client.start()["session_id"]
    pg.stop()
    try:
        client.stream(sid, to_pcm16(speech()), speed=2.0)
        wait_for(lambda: b.get("/readyz")[1]["status"] == "degraded", 30, "readyz degraded")
        assert b.get("/readyz")[0] == 200  # degraded, not dead: live analysis goes on
        wait_for(lambda: client.of("emotion_result"), 30, "results during the outage")
        assert b.metric("voxaffect_store_errors_total", kind="unreachable") >= 1
    finally:
        pg.start()
    summary = client.end(sid)
    client.close()
    wait_for(lambda: b.get("/readyz")[1]["status"] == "ready", 60, "readyz ready again")
    status, timeline = b.get(f"/api/sessions/{sid}", token=TOKEN)
    assert status == 200
    assert [f["seq"] for f in timeline["frames"]] == [r["seq"] for r in client.of("emotion_result")]
    assert timeline["summary"]["results"] == summary["results"] > 0


def test_deleting_on_one_node_deletes_for_every_node(cluster):
    a, b = cluster["a"], cluster["b"]
    client = Recorder(b.url, token=TOKEN)
    sid = client.start()["session_id"]
    client.stream(sid, to_pcm16(speech()), speed=4.0)
    client.end(sid)
    client.close()
    assert b.request(f"/api/sessions/{sid}", token=TOKEN, method="DELETE")[0] == 204
    assert a.get(f"/api/sessions/{sid}", token=TOKEN)[0] == 404


def test_sessions_cut_by_a_drain_continue_on_the_other_node_with_their_full_timelines(cluster):
    """SIGTERM node A in the middle of a stream and of a call (its drain_timeout_s is 0: both
    are cut at once).

    - The product's client, behind a balancer that sends connections to a ready node, holds its
      audio, reconnects to B and resumes: the same session, seq going on, the speaker's
      baseline restored rather than relearnt, a full timeline and summary on B.
    - The Genesys AudioHook call is asked to ``reconnect``; its new session names the old one
      in ``continuedSessions`` and B continues that call, both parties where they stopped.

    Runs last: it leaves node A stopped."""
    a, b = cluster["a"], cluster["b"]
    balancer = Balancer([a.url, b.url])  # A while it is ready, then B
    client = StreamClient(balancer.url, token=TOKEN)
    customer, agent = party_audio()
    call = stereo_mulaw(customer, agent)
    half = len(call) // 4 * 2  # whole stereo frames
    try:
        hook = AudioHookClient(balancer)
        hook.send("open", open_parameters("conversation-on-a"))
        hook.expect("opened")
        hook.audio(call[:half])
        sid = client.start()["session_id"]
        pcm = to_pcm16(np.concatenate([speech(), speech(pitch=70)]))
        step = 3200  # 100 ms chunks, in real time

        def stream() -> None:
            started = time.monotonic()
            for i, at in enumerate(range(0, len(pcm), step)):
                client.send(pcm[at : at + step])
                time.sleep(max(0.0, started + (i + 1) * 0.1 - time.monotonic()))

        streaming = threading.Thread(target=stream)
        streaming.start()
        wait_for(
            lambda: any(not r["stress"]["calibrating"] for r in client.results),
            30,
            "a learnt baseline on node A",
        )
        wait_for(
            lambda: (
                a.metric("voxaffect_audio_received_seconds_total", source="audiohook")
                >= half / 8000 - 0.01
            ),  # both parties' first halves
            30,
            "the call's first half on node A",
        )
        assert a.proc is not None
        a.proc.send_signal(signal.SIGTERM)
        assert hook.expect("reconnect")["parameters"]["info"]
        hook.close()  # Genesys closes (reason reconnect) and opens a session that continues it
        assert a.proc.wait(30) == 0
        on_a = len(client.results)
        again = AudioHookClient(balancer)
        continued = {"id": hook.id, "serverseq": hook.serverseq, "clientseq": hook.seq}
        again.send(
            "open", {**open_parameters("conversation-on-a"), "continuedSessions": [continued]}
        )
        again.expect("opened")
        again.audio(call[half:])
        again.send("close", {"reason": "end"})
        again.expect("closed")
        again.close()
        streaming.join(60)
        summary = client.end()
    finally:
        client.close()
        balancer.close()
    assert balancer.routed[0] == a.url and balancer.routed[-1] == b.url
    assert {e["code"] for e in client.errors} == {"DRAINING"}, client.errors
    assert b.metric("voxaffect_session_handoffs_total", event="continued") == 2
    results = client.results
    seqs = [r["seq"] for r in results]
    assert len(results) > on_a, "no result from node B"
    assert seqs == list(range(1, len(seqs) + 1)), "a result lost or sent twice"
    starts = [r["start_s"] for r in results]
    assert starts == sorted(starts) and len(set(starts)) == len(starts)
    calibrating = [r["stress"]["calibrating"] for r in results]
    learnt = calibrating.index(False)
    assert not any(calibrating[learnt:]), "node B learnt the speaker's baseline again"
    assert summary["session_id"] == sid and summary["reason"] == "ended by client"
    assert summary["results"] == summary["windows"] == len(results)
    assert summary["audio_received_s"] >= len(pcm) / 32000 - 0.5  # nothing but a round trip
    status, timeline = b.get(f"/api/sessions/{sid}", token=TOKEN)
    assert status == 200
    assert [f["seq"] for f in timeline["frames"]] == seqs
    assert timeline["summary"]["results"] == len(results)
    # the call: one session under its first id, both halves in it, each party where it stopped
    status, stored = b.get(f"/api/sessions/{hook.id}", token=TOKEN)
    assert status == 200 and stored["summary"]["reason"] == "call ended"
    assert b.get(f"/api/sessions/{again.id}", token=TOKEN)[0] == 404
    tracks = stored["summary"]["tracks"]
    assert set(tracks) == {"customer", "agent"}
    for track in tracks.values():  # the cut is on the VAD's 30 ms grid
        assert track["duration_s"] == pytest.approx(len(call) / 2 / 8000, abs=0.1)
    call_seqs = [f["seq"] for f in stored["frames"]]
    assert call_seqs == list(range(1, len(call_seqs) + 1))
    assert stored["summary"]["results"] == len(call_seqs) > 0
