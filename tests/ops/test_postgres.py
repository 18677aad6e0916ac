"""One PostgreSQL store for every node: two servers on Redis and a real, throwaway PostgreSQL
cluster (Debian's postgresql, started with initdb/pg_ctl in a temp dir as a non-root user)."""

from __future__ import annotations

import csv
import glob
import io
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.support.client import Recorder, wait_for
from tests.support.harness import ServerProcess, free_port, redis_server
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
                env={"VOXAFFECT_API_TOKENS": TOKEN},
            )
            for i in (1, 2)
        ]
        try:
            for node in nodes:
                node.start()
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
