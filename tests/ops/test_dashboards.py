"""Dashboards, alerts and Prometheus config, checked against a real Prometheus scraping a live
server under a short streaming load (Grafana itself cannot run here)."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.support.client import start_streams, wait_for
from tests.support.harness import ROOT, ServerProcess, free_port
from tests.support.speech import silence, speech, to_pcm16

pytestmark = pytest.mark.ops
GRAFANA = ROOT / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
PROMTOOL = shutil.which("promtool") or "promtool"


def panels() -> list[tuple[str, dict]]:
    out = []
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text())["panels"]:
            out.append((f"{path.stem}: {panel['title']}", panel))
    return out


def test_promtool_checks_config_rules_and_rule_unit_tests():
    for args in (
        ["check", "config", "prometheus.yml"],
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts.test.yml"],
    ):
        result = subprocess.run([PROMTOOL, *args], cwd=GRAFANA, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "SUCCESS" in result.stdout + result.stderr


def test_provisioning_points_grafana_at_prometheus_and_the_dashboards():
    ds = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())
    assert ds["datasources"][0]["type"] == "prometheus"
    uid = ds["datasources"][0]["uid"]
    provider = yaml.safe_load((GRAFANA / "provisioning/dashboards/voxaffect.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    assert {p.stem for p in DASHBOARDS} == {"overview", "emotions"}
    for name, panel in panels():
        assert panel["datasource"]["uid"] == uid, name
        assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"]), name
    for path in DASHBOARDS:
        board = json.loads(path.read_text())["panels"]
        ids = [p["id"] for p in board]
        assert len(ids) == len(set(ids)), f"{path.name} repeats a panel id"
        cells = [
            (p["title"], (x, y))
            for p in board
            for x in range(p["gridPos"]["x"], p["gridPos"]["x"] + p["gridPos"]["w"])
            for y in range(p["gridPos"]["y"], p["gridPos"]["y"] + p["gridPos"]["h"])
        ]
        taken: dict[tuple[int, int], str] = {}
        for title, cell in cells:
            assert cell not in taken, f"{path.name}: {title!r} overlaps {taken[cell]!r}"
            assert cell[0] < 24, f"{path.name}: {title!r} is wider than the grid"
            taken[cell] = title


@pytest.fixture(scope="module")
def prometheus(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, ServerProcess]]:
    """A live server, and Debian's Prometheus scraping it every second."""
    work = tmp_path_factory.mktemp("prom")
    server = ServerProcess(
        tiny_model_dir, work / "server", f"--alert-rules={ROOT / 'deploy/alert-rules.yml'}"
    ).start()
    config = yaml.safe_load((GRAFANA / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(GRAFANA / "alerts.yml")]
    config["scrape_configs"][0]["static_configs"] = [{"targets": [f"127.0.0.1:{server.port}"]}]
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = open(work / "prometheus.log", "wb")  # noqa: SIM115 (closed below)
    prom = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={work / 'prometheus.yml'}",
            f"--storage.tsdb.path={work / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _get(url, "/-/ready") == 200, 60, "Prometheus ready")
        # a scrape before the load: on a fast machine the whole load fits between two scrapes,
        # and a counter first seen at its final value never has a rate
        wait_for(lambda: _series(url, "voxaffect_ready == 1") > 0, 30, "a scrape before the load")
        _load(server)
        wait_for(
            lambda: _series(url, "voxaffect_end_to_end_seconds_count") > 0, 30, "scraped results"
        )
        wait_for(  # scrapes on both sides of the load, so the panels' rates span it
            lambda: _series(url, "rate(voxaffect_audio_received_seconds_total[20s]) > 0") > 0,
            30,
            "a rate over the load",
        )
        yield url, server
    finally:
        prom.terminate()
        prom.wait(10)
        log.close()
        server.stop()


def _get(url: str, path: str) -> int:
    try:
        with urllib.request.urlopen(url + path, timeout=5) as r:
            return r.status
    except OSError:
        return 0


def _query(url: str, expr: str) -> dict:
    params = urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(f"{url}/api/v1/query?{params}", timeout=10) as r:
        return json.loads(r.read())


def _series(url: str, expr: str) -> int:
    return len(_query(url, expr)["data"]["result"])


def _load(server: ServerProcess) -> None:
    """Two streams, a telephony call and a bad message: every panel has something to show."""
    pcm = to_pcm16(np.concatenate([silence(0.5), speech(), silence(0.5)]))
    clients, sids, threads = start_streams(server.url, pcm, 2)
    from tests.support.calls import at_8k, mulaw, replay, twilio_messages, ws_url

    replay(
        ws_url(server, "/telephony/twilio"),
        twilio_messages("CAops", {"inbound": mulaw(at_8k(speech()))}),
        pace_s=0.01,
    )
    clients[0].sio.emit("audio_stream", {"session_id": "nope", "chunk": "AAAA"})
    for t in threads:
        t.join()
    for c, s in zip(clients, sids, strict=True):
        c.end(s)
        c.close()


def _expand(expr: str) -> str:
    """Grafana's macros, as Grafana would expand them for a 1 s scrape and a 2 minute range."""
    return (
        expr.replace("$__rate_interval", "20s")
        .replace("$__interval", "5s")
        .replace("$__range", "2m")
    )


@pytest.mark.parametrize(("name", "panel"), panels(), ids=[n for n, _ in panels()])
def test_every_panel_query_returns_data_from_a_live_server(prometheus, name, panel):
    url, _ = prometheus
    for target in panel["targets"]:
        answer = _query(url, _expand(target["expr"]))
        assert answer["status"] == "success", (name, answer)
        if "gpu" in panel.get("tags", []):
            # no CUDA here: the GPU gauges are absent (not zero), so the panel is empty
            assert answer["data"]["result"] == [], name
        else:
            assert answer["data"]["result"], f"{name}: {target['expr']} returned no data"


def test_the_loaded_rules_evaluate_on_live_data(prometheus):
    url, _ = prometheus
    with urllib.request.urlopen(f"{url}/api/v1/rules", timeout=10) as r:
        groups = json.loads(r.read())["data"]["groups"]
    rules = {rule["name"]: rule for g in groups for rule in g["rules"]}
    assert {
        "VoxaffectEndToEndLatencyHigh",
        "VoxaffectFallbackRateHigh",
        "VoxaffectErrorRateHigh",
        "VoxaffectNoReadyInstance",
        "VoxaffectEventLoopBlocked",
    } <= set(rules)
    assert all(rule["health"] == "ok" for rule in rules.values()), rules
    assert rules["VoxaffectNoReadyInstance"]["state"] == "inactive"  # the server is ready
    assert _series(url, "voxaffect:end_to_end_seconds:p95_5m") == 1
