"""SIGTERM drains a node (as Kubernetes stops a pod): it stops being ready, refuses new sessions
with DRAINING, lets every running session finish with all its results, and exits once they
have ended — or once ``drain_timeout_s`` has passed, handing the rest off for another node to
continue (tests/ops/test_postgres.py continues one on a second node)."""

from __future__ import annotations

import json
import signal
import sqlite3
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tests.support.client import Recorder, wait_for
from tests.support.harness import ServerProcess
from tests.support.speech import silence, speech, to_pcm16

pytestmark = pytest.mark.ops


def test_sigterm_refuses_new_sessions_and_lets_the_running_one_finish(tiny_model_dir, tmp_path):
    pcm = to_pcm16(np.concatenate([speech(), silence(0.3), speech(pitch=60)]))
    node = ServerProcess(tiny_model_dir, tmp_path / "node", "--drain-timeout-s=60").start()
    try:
        ref = Recorder(node.url)  # the windows of this audio on an idle server
        ref_sid = ref.start()["session_id"]
        ref.stream(ref_sid, pcm, speed=4.0)
        ref.end(ref_sid)
        expected = [(r["start_s"], r["end_s"]) for r in ref.of("emotion_result")]
        ref.close()
        client = Recorder(node.url)
        sid = client.start()["session_id"]
        summary: dict = {}

        def stream() -> None:
            client.stream(sid, pcm, speed=1.0)  # in real time: the drain starts in the middle
            summary.update(client.end(sid))

        streaming = threading.Thread(target=stream)
        streaming.start()
        time.sleep(2.0)
        assert node.proc is not None
        node.proc.send_signal(signal.SIGTERM)
        _, ready = wait_for(
            lambda: (r := node.get("/readyz"))[0] == 503 and r, 10, "/readyz to say draining"
        )
        assert ready["status"] == "draining" and node.metric("voxaffect_ready") == 0
        newcomer = Recorder(node.url)
        refused = newcomer.call("start_session", {})["error"]
        assert refused["code"] == "DRAINING" and refused["retry_after_s"] >= 1
        newcomer.close()
        assert node.proc.poll() is None, "the node stopped while a session was running"
        streaming.join(120)
        assert summary.get("reason") == "ended by client"
        assert [(r["start_s"], r["end_s"]) for r in client.of("emotion_result")] == expected
        assert client.errors() == []
        client.close()
        assert node.proc.wait(15) == 0  # and it exits once the last session has ended
    finally:
        node.kill()


def test_a_drain_ends_at_its_timeout_and_a_second_signal_stops_at_once(
    tiny_model_dir: Path, tmp_path: Path
):
    node = ServerProcess(tiny_model_dir, tmp_path / "timeout", "--drain-timeout-s=3")
    again = ServerProcess(tiny_model_dir, tmp_path / "again", "--drain-timeout-s=600")
    starting = [threading.Thread(target=p.start) for p in (node, again)]  # both at once
    for t in starting:
        t.start()
    for t in starting:
        t.join()
    try:
        assert node.proc is not None and again.proc is not None
        client = Recorder(node.url)
        sid = client.start()["session_id"]
        client.stream(sid, to_pcm16(speech()[:32000]), speed=4.0)  # then it never ends
        other = Recorder(again.url)
        other.start()
        started = time.monotonic()
        node.proc.send_signal(signal.SIGTERM)
        assert node.proc.wait(30) == 0
        assert 2.5 < time.monotonic() - started < 20
        notice = client.errors("DRAINING")
        assert notice and notice[0]["resume"] is True and notice[0]["session_id"] == sid
        assert client.of("session_summary") == []  # not ended: handed off
        with sqlite3.connect(node.db) as db:
            handoff, owner = db.execute(
                "SELECT handoff, node FROM sessions WHERE id = ?", (sid,)
            ).fetchone()
        state = json.loads(handoff)  # what another node continues from, committed before exit
        assert owner is None and state["seq"] == len(client.of("emotion_result"))
        assert state["tracks"][""]["pipeline"]["position"] == 32000
        client.close()

        again.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: again.get("/readyz")[0] == 503, 10, "draining")
        started = time.monotonic()
        again.proc.send_signal(signal.SIGTERM)  # an impatient operator
        assert again.proc.wait(30) == 0 and time.monotonic() - started < 15
        other.close()
    finally:
        node.kill()
        again.kill()
