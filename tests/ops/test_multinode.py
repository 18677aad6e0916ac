"""Several server processes sharing clients through Redis, behind the nginx example."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.support.client import Recorder, wait_for
from tests.support.harness import ROOT, ServerProcess, free_port, redis_server
from tests.support.speech import silence, speech, to_pcm16

pytestmark = pytest.mark.ops
TOKEN = "cluster-token-0123456"


@pytest.fixture(scope="module")
def cluster(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    work = tmp_path_factory.mktemp("cluster")
    with redis_server() as queue, _nodes_behind_nginx(tiny_model_dir, work, queue) as nodes:
        yield nodes


@contextlib.contextmanager
def _nodes_behind_nginx(tiny_model_dir: Path, work: Path, queue: str) -> Iterator[dict]:
    nodes = [
        ServerProcess(
            tiny_model_dir,
            work / f"node{i}",
            f"--message-queue={queue}",
            env={"VOXAFFECT_API_TOKENS": TOKEN},
        )
        for i in (1, 2)
    ]
    for node in nodes:
        node.start()
    conf = (ROOT / "deploy/nginx.conf").read_text()
    nginx_port = free_port()
    conf = (
        conf.replace("127.0.0.1:5001", f"127.0.0.1:{nodes[0].port}")
        .replace("127.0.0.1:5002", f"127.0.0.1:{nodes[1].port}")
        .replace("listen 8080", f"listen 127.0.0.1:{nginx_port}")
        .replace("/tmp/voxaffect-nginx.pid", str(work / "nginx.pid"))
    )
    (work / "nginx.conf").write_text(conf)
    nginx = subprocess.Popen(
        [
            shutil.which("nginx") or "/usr/sbin/nginx",
            "-c",
            str(work / "nginx.conf"),
            "-g",
            "daemon off;",
        ],
        stderr=subprocess.DEVNULL,
    )
    try:
        yield {"nodes": nodes, "nginx": f"http://127.0.0.1:{nginx_port}"}
    finally:
        nginx.terminate()
        nginx.wait(10)
        for node in nodes:
            node.stop()


def test_a_supervisor_on_one_node_sees_sessions_streaming_on_another(cluster):
    node_a, node_b = cluster["nodes"]
    supervisor = Recorder(node_a.url, token=TOKEN)
    assert supervisor.call("subscribe", {})["sessions"] == []
    streamer = Recorder(node_b.url, token=TOKEN)
    sid = streamer.start()["session_id"]
    started = wait_for(
        lambda: [u for u in supervisor.of("session_update") if u["session_id"] == sid],
        20,
        "node B's session announced on node A",
    )
    assert started[0]["event"] == "started"
    supervisor.call("subscribe", {"session_id": sid})
    streamer.stream(sid, to_pcm16(np.concatenate([silence(0.3), speech(), silence(0.3)])), speed=3)
    streamer.end(sid)
    seen = wait_for(lambda: supervisor.of("emotion_result"), 20, "node B's results on node A")
    assert {r["session_id"] for r in seen} == {sid}
    assert {r["seq"] for r in seen} <= {r["seq"] for r in streamer.of("emotion_result")}
    wait_for(
        lambda: any(
            u["event"] == "ended" and u["session_id"] == sid
            for u in supervisor.of("session_update")
        ),
        20,
        "the end of the session on node A",
    )
    supervisor.close()
    streamer.close()


def test_clients_stream_through_the_nginx_example(cluster):
    client = Recorder(cluster["nginx"], token=TOKEN)  # a WebSocket upgrade through the proxy
    sid = client.start()["session_id"]
    client.stream(sid, to_pcm16(np.concatenate([silence(0.3), speech(), silence(0.3)])), speed=3)
    summary = client.end(sid)
    assert summary["results"] == len(client.of("emotion_result")) > 0
    client.close()
