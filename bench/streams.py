"""End-to-end benchmark: call-like streams, measured at the client, against voxaffect and against
the seed-style peer (bench/peer.py), in one run with the same client and audio.

    python -m bench.streams --model models/large --streams 8              # voxaffect serve
    python -m bench.streams --model models/large --find-capacity --peer   # both, largest N
    python -m bench.streams --url http://127.0.0.1:5000 --streams 8       # a running server

Every stream is call-like audio: 3 s of speech (espeak-ng, several voices), then 3 s of quiet,
sent in real time in 100 ms PCM16 chunks; stream i starts i/N of the way into the cycle, so the
load is staggered. For each server it reports, measured at the client:

- latency: from the moment the chunk holding a window's last sample was sent, to the moment the
  window's result arrived;
- coverage: results ÷ the windows that an unloaded server analyses for the same audio
  (voxaffect: the windows its VAD and scheduler pass, computed with the same pipeline; the peer:
  every window, as it has no VAD);
- hub round-trip: a separate client pings every 100 ms.

``--find-capacity`` looks for the largest N with coverage ≥ 0.95, p95 latency ≤ 1.5 s and ping
p95 ≤ 50 ms (the peer's ping is reported but not held against it: it blocks its event loop by
design). Servers are started here with their default settings (voxaffect: ``voxaffect serve
--model M``, so dtype, batch and lanes are what it measures, or its cache holds).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np

from engine import SAMPLE_RATE
from engine.pipeline import PipelineConfig, plan_file
from server.client import StreamClient

CHUNK = 1600  # samples: 100 ms
SPEECH_S, QUIET_S = 3.0, 3.0
TARGETS = {"coverage": 0.95, "latency_p95_s": 1.5, "ping_p95_ms": 50.0}


@functools.cache
def speech_pcm(seconds: float) -> bytes:
    """Continuous espeak-ng speech as PCM16 (kept for bench.soak)."""
    from bench.engine import speech_windows

    windows = speech_windows(int(seconds))  # 2 s windows, 1 s apart: their first halves tile
    audio = np.concatenate([w[:SAMPLE_RATE] for w in windows])
    return (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()


def call_like(seconds: float, offset_s: float) -> np.ndarray:
    """3 s of speech, 3 s of quiet (faint noise), repeated; starting ``offset_s`` into a cycle."""
    speech = np.frombuffer(speech_pcm(40.0), dtype="<i2").astype(np.float32) / 32768.0
    rng = np.random.default_rng(int(offset_s * 1000))
    cycle = int((SPEECH_S + QUIET_S) * SAMPLE_RATE)
    total = int((seconds + offset_s) * SAMPLE_RATE)
    out = (rng.standard_normal(total) * 0.002).astype(np.float32)
    at, taken = 0, 0
    while at < total:
        n = min(int(SPEECH_S * SAMPLE_RATE), total - at)
        piece = speech[taken % (speech.size - n) :][:n]
        out[at : at + n] += piece
        taken += n
        at += cycle
    return out[int(offset_s * SAMPLE_RATE) :]


def reference_windows(audio: np.ndarray, peer: bool) -> int:
    if peer:
        return max(0, (audio.size - 2 * SAMPLE_RATE) // SAMPLE_RATE + 1)
    labels = ("x",)
    _, windows = plan_file(audio, labels, PipelineConfig())
    return len(windows)


class Stream:
    def __init__(self, url: str, audio: np.ndarray, peer: bool) -> None:
        self.audio = audio
        self.pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
        self.expected = reference_windows(audio, peer)
        self.sent_at: list[float] = []
        self.latencies: list[float] = []
        self.results = 0
        self.client = StreamClient(url, on_result=self._result, timeout_s=60)

    def _result(self, r: dict[str, Any]) -> None:
        now = time.monotonic()
        last_chunk = min(int(np.ceil(r["end_s"] * SAMPLE_RATE / CHUNK)) - 1, len(self.sent_at) - 1)
        if last_chunk >= 0:
            self.latencies.append(now - self.sent_at[last_chunk])
        self.results += 1

    def run(self) -> None:
        started = time.monotonic()
        for i, at in enumerate(range(0, len(self.pcm), 2 * CHUNK)):
            self.sent_at.append(time.monotonic())
            self.client.send(self.pcm[at : at + 2 * CHUNK])
            time.sleep(max(0.0, started + (i + 1) * CHUNK / SAMPLE_RATE - time.monotonic()))


def trial(url: str, streams: int, seconds: float, peer: bool) -> dict[str, Any]:
    runs = [
        Stream(url, call_like(seconds, i * (SPEECH_S + QUIET_S) / streams), peer)
        for i in range(streams)
    ]
    for s in runs:
        s.client.start()
    pinger = StreamClient(url, timeout_s=60)
    pinger.connect()
    pings: list[float] = []
    stop = threading.Event()

    def ping_loop() -> None:
        while not stop.is_set():
            try:
                pings.append(pinger.ping_ms())
            except Exception:  # a timed-out ping counts as a minute
                pings.append(60_000.0)
            time.sleep(0.1)

    threads = [threading.Thread(target=s.run) for s in runs]
    ping_thread = threading.Thread(target=ping_loop)
    began = time.monotonic()
    ping_thread.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sending_s = time.monotonic() - began
    for s in runs:
        with contextlib.suppress(Exception):  # not ending in time: results not delivered
            s.client.end(timeout_s=120)
    stop.set()
    ping_thread.join()
    for s in runs:
        s.client.close()
    pinger.close()
    latencies = sorted(x for s in runs for x in s.latencies)
    results = sum(s.results for s in runs)
    expected = sum(s.expected for s in runs)
    pings.sort()

    def pct(values: list[float], q: float) -> float:
        return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")

    return {
        "streams": streams,
        "seconds": seconds,
        "coverage": round(min(1.0, results / expected) if expected else 0.0, 3),
        "results": results,
        "windows_expected": expected,
        "results_per_s": round(results / sending_s, 2),
        "latency_p50_s": round(pct(latencies, 0.5), 3),
        "latency_p95_s": round(pct(latencies, 0.95), 3),
        "ping_p50_ms": round(statistics.median(pings), 1) if pings else None,
        "ping_p95_ms": round(pct(pings, 0.95), 1),
        "ping_max_ms": round(pings[-1], 1) if pings else None,
    }


def passes(row: dict[str, Any], peer: bool) -> bool:
    ok = row["coverage"] >= TARGETS["coverage"] and row["latency_p95_s"] <= TARGETS["latency_p95_s"]
    return ok and (peer or row["ping_p95_ms"] <= TARGETS["ping_p95_ms"])


def find_capacity(url: str, seconds: float, peer: bool, most: int, log: list) -> int:
    """The largest N that meets the targets: doubling, then bisecting."""
    good, bad, n = 0, None, 1
    while bad is None and n <= most:
        row = trial(url, n, seconds, peer)
        log.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        if passes(row, peer):
            good, n = n, n * 2
        else:
            bad = n
    if bad is None:
        return good
    while bad - good > 1:
        n = (good + bad) // 2
        row = trial(url, n, seconds, peer)
        log.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        good, bad = (n, bad) if passes(row, peer) else (good, n)
    return good


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def started(command: list[str], port: int, work: Path) -> Iterator[str]:
    log = open(work / f"server-{port}.log", "wb")  # noqa: SIM115  (the server writes to it)
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(1200):
            if proc.poll() is not None:
                raise RuntimeError(f"{command[2:4]} exited: see {log.name}")
            try:
                with urllib.request.urlopen(url + "/readyz", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="checkpoint directory: start the servers here")
    p.add_argument("--url", help="measure an already running voxaffect server instead")
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--seconds", type=float, default=30.0, help="audio per stream")
    p.add_argument("--find-capacity", action="store_true")
    p.add_argument("--peer", action="store_true", help="also the seed-style peer, same run")
    p.add_argument("--most", type=int, default=64, help="largest N --find-capacity tries")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if not args.url and not args.model:
        p.error("give --model (servers started here) or --url")
    work = Path(tempfile.mkdtemp(prefix="voxaffect-bench-"))
    report: dict[str, Any] = {"targets": TARGETS, "servers": {}}
    servers: list[tuple[str, bool, Any]] = []
    if args.url:
        servers.append(("voxaffect", False, args.url))
    else:
        port = free_port()
        servers.append(
            (
                "voxaffect",
                False,
                [
                    sys.executable,
                    "-m",
                    "server.cli",
                    "serve",
                    "--model",
                    args.model,
                    "--port",
                    str(port),
                    "--db",
                    str(work / "bench.db"),
                ],
            )
        )
        if args.peer:
            servers.append(
                (
                    "peer",
                    True,
                    [
                        sys.executable,
                        "-m",
                        "bench.peer",
                        "--model",
                        args.model,
                        "--port",
                        str(free_port()),
                    ],
                )
            )
    for name, peer, target in servers:
        log: list[dict[str, Any]] = []
        if isinstance(target, str):
            url_cm: Any = nullcontext(target)
        else:
            url_cm = started(target, int(target[target.index("--port") + 1]), work)
        with url_cm as url:
            if args.find_capacity:
                capacity = find_capacity(url, args.seconds, peer, args.most, log)
            else:
                log.append(trial(url, args.streams, args.seconds, peer))
                capacity = None
        report["servers"][name] = {"trials": log, "capacity": capacity}
    if "peer" in report["servers"] and args.find_capacity:
        ours = report["servers"]["voxaffect"]["capacity"]
        theirs = report["servers"]["peer"]["capacity"]
        report["capacity_ratio"] = round(ours / theirs, 2) if theirs else None
    shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(report))
        return 0
    print("| server | streams | coverage | latency p50 / p95 | ping p50 / p95 / max | results/s |")
    print("|---|---|---|---|---|---|")
    for name, data in report["servers"].items():
        for r in data["trials"]:
            print(
                f"| {name} | {r['streams']} | {r['coverage']:.2f} | {r['latency_p50_s']:.2f} / "
                f"{r['latency_p95_s']:.2f} s | {r['ping_p50_ms']} / {r['ping_p95_ms']} / "
                f"{r['ping_max_ms']} ms | {r['results_per_s']} |"
            )
    for name, data in report["servers"].items():
        if data["capacity"] is not None:
            print(f"\n{name}: capacity {data['capacity']} streams")
    if report.get("capacity_ratio"):
        print(f"voxaffect / peer capacity: {report['capacity_ratio']}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
