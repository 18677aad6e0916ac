"""End-to-end benchmark: call-like streams, measured at the client, against voxaffect and against
the seed-style peer (bench/peer.py), in one run with the same client and audio.

    python -m bench.streams --model models/large --streams 8              # voxaffect serve
    python -m bench.streams --model models/large --find-capacity --peer   # both, largest N
    python -m bench.streams --model models/large --overload --peer --burst --engine-bound
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
design). ``--overload`` finds it, then runs 1.5x and 2x that many streams and reports, per load,
every stream's coverage (lowest and mean), p95 and max latency, and the share of due windows the
server dropped as expired. ``--burst`` runs one stream on the idle server that stalls 4.5 s after
10 s, then sends the next 15 s at once: how many of the windows due in that burst are analysed.
``--engine-bound`` times the engine alone, on this machine in this run, in the configuration the
server chose (dtype, batch, lanes; traced, as the server runs it) with every lane busy, kept
busy for 20 s like a load trial, twice: before the load trials (the server started, idle) and
after them (every server stopped).
This machine's speed drifts between minutes (a short best-of run measured 12.4-16.6 windows/s
within one hour here), so the bound is the mean of the two and both are reported. Engine
windows/s ÷ due windows/s per stream is the most streams any server could carry here, so
capacity ÷ that is the server's efficiency. Servers are started here with their default settings
(voxaffect: ``voxaffect serve --model M``, so dtype, batch and lanes are what it measures, or its
cache holds).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
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

from client.stream import StreamClient
from engine import SAMPLE_RATE
from engine.pipeline import PipelineConfig, plan_file

CHUNK = 1600  # samples: 100 ms
SPEECH_S, QUIET_S = 3.0, 3.0
TARGETS = {"coverage": 0.95, "latency_p95_s": 1.5, "ping_p95_ms": 50.0}


@functools.cache
def speech_pcm(seconds: float) -> bytes:
    """Continuous espeak-ng speech as PCM16 (kept for bench.soak)."""
    from bench.engine import speech_windows

    if shutil.which("espeak-ng") is None:  # bench.engine's noise stand-in is no speech to a VAD
        raise SystemExit("bench.streams needs espeak-ng for its speech: run `make system`")
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
    _, windows, _ = plan_file(audio, labels, PipelineConfig())
    return len(windows)


class Stream:
    def __init__(self, url: str, audio: np.ndarray, peer: bool) -> None:
        self.audio = audio
        self.pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
        self.expected = reference_windows(audio, peer)
        self.sent_at: list[float] = []
        self.latencies: list[float] = []
        self.results = 0
        self.summary: dict[str, Any] = {}
        self.sent_all_at = math.nan
        self.client = StreamClient(url, on_result=self._result, timeout_s=60)

    @property
    def coverage(self) -> float:
        return min(1.0, self.results / self.expected) if self.expected else 1.0

    def _result(self, r: dict[str, Any]) -> None:
        now = time.monotonic()
        last_chunk = min(int(np.ceil(r["end_s"] * SAMPLE_RATE / CHUNK)) - 1, len(self.sent_at) - 1)
        if last_chunk >= 0:
            self.latencies.append(now - self.sent_at[last_chunk])
        self.results += 1

    def run(self) -> None:
        """Stream the audio in real time, then end the session at once, as a call ends (the
        last windows come due then: ending every stream after all had sent, one at a time,
        measured the last ones' results from a chunk sent tens of seconds before)."""
        started = time.monotonic()
        for i, at in enumerate(range(0, len(self.pcm), 2 * CHUNK)):
            self.sent_at.append(time.monotonic())
            self.client.send(self.pcm[at : at + 2 * CHUNK])
            time.sleep(max(0.0, started + (i + 1) * CHUNK / SAMPLE_RATE - time.monotonic()))
        self.sent_all_at = time.monotonic()
        with contextlib.suppress(Exception):  # not ending in time: results not delivered
            self.summary = self.client.end(timeout_s=120)


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
    sending_s = max(s.sent_all_at for s in runs) - began
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

    coverages = [s.coverage for s in runs]
    expired = sum(int(s.summary.get("expired", 0)) for s in runs)
    return {
        "streams": streams,
        "seconds": seconds,
        "coverage": round(min(1.0, results / expected) if expected else 0.0, 3),
        "coverage_min": round(min(coverages), 3),
        "coverages": [round(c, 2) for c in coverages],
        "coverage_mean": round(statistics.mean(coverages), 3),
        "results": results,
        "windows_expected": expected,
        "expired": expired,
        "expired_share": round(expired / (results + expired), 3) if results + expired else 0.0,
        "results_per_s": round(results / sending_s, 2),
        "latency_p50_s": round(pct(latencies, 0.5), 3),
        "latency_p95_s": round(pct(latencies, 0.95), 3),
        "latency_max_s": round(latencies[-1], 3) if latencies else float("nan"),
        "ping_p50_ms": round(statistics.median(pings), 1) if pings else None,
        "ping_p95_ms": round(pct(pings, 0.95), 1),
        "ping_max_ms": round(pings[-1], 1) if pings else None,
    }


def burst_trial(
    url: str,
    before_s: float = 10.0,
    stall_s: float = 4.5,
    burst_s: float = 15.0,
    after_s: float = 5.0,
) -> dict[str, Any]:
    """One stream of continuous speech: ``before_s`` in real time, nothing for ``stall_s``, then
    the next ``burst_s`` at once, then ``after_s`` in real time. How many of the windows that the
    burst made due (those an unloaded server analyses) are analysed."""
    total = before_s + burst_s + after_s
    audio = (
        np.frombuffer(speech_pcm(total + 1), dtype="<i2").astype(np.float32)[
            : int(total * SAMPLE_RATE)
        ]
        / 32768.0
    )
    _, planned, _ = plan_file(audio, ("x",), PipelineConfig())
    due = {round(w.end_s, 3) for w in planned if before_s < w.end_s <= before_s + burst_s}
    got: list[float] = []
    client = StreamClient(url, on_result=lambda r: got.append(round(r["end_s"], 3)), timeout_s=60)
    client.start()
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
    step = 2 * CHUNK  # bytes of 100 ms

    def send(first_s: float, last_s: float, paced: bool) -> None:
        began = time.monotonic()
        for i, at in enumerate(
            range(int(first_s * SAMPLE_RATE) * 2, int(last_s * SAMPLE_RATE) * 2, step)
        ):
            client.send(pcm[at : at + step])
            if paced:
                time.sleep(max(0.0, began + (i + 1) * 0.1 - time.monotonic()))

    send(0.0, before_s, paced=True)
    time.sleep(stall_s)
    send(before_s, before_s + burst_s, paced=False)
    send(before_s + burst_s, total, paced=True)
    summary = client.end(timeout_s=120)
    client.close()
    analysed = len(due & set(got))
    return {
        "burst_windows_due": len(due),
        "burst_windows_analysed": analysed,
        "expired": int(summary.get("expired", 0)),
        "all_analysed": analysed == len(due),
    }


def due_per_stream_s(seconds: float) -> float:
    """Windows an unloaded server analyses a second of a call-like stream (the mean of the
    staggered phases one trial uses)."""
    phases = 6
    counts = [
        reference_windows(call_like(seconds, i * (SPEECH_S + QUIET_S) / phases), False)
        for i in range(phases)
    ]
    return statistics.mean(counts) / seconds


ENGINE_SECONDS = 20.0  # each engine-alone measurement: sustained, like a load trial


def engine_bound(model: str, tuning: dict[str, Any]) -> float:
    """Windows/s of the engine alone in the server's configuration, every lane busy, sustained
    for ENGINE_SECONDS (bench/engine.py's serving path), in a process of its own."""
    code = (
        "import json\n"
        "from bench.engine import speech_windows, sustained\n"
        f"wps = sustained({model!r}, {tuning['dtype']!r}, {tuning['max_batch']}, "
        f"{tuning['lanes']}, speech_windows(16), {ENGINE_SECONDS})\n"
        "print(json.dumps({'windows_per_s': wps}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout
    return float(json.loads(out.strip().splitlines()[-1])["windows_per_s"])


def overload(url: str, seconds: float, capacity: int, log: list) -> list[dict[str, Any]]:
    """1x, 1.5x and 2x the capacity found."""
    rows = []
    for factor in (1.0, 1.5, 2.0):
        row = trial(url, max(1, round(capacity * factor)), seconds, False)
        row["load"] = factor
        rows.append(row)
        log.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def passes(row: dict[str, Any], peer: bool) -> bool:
    ok = row["coverage"] >= TARGETS["coverage"] and row["latency_p95_s"] <= TARGETS["latency_p95_s"]
    return ok and (peer or row["ping_p95_ms"] <= TARGETS["ping_p95_ms"])


def find_capacity(url: str, seconds: float, peer: bool, most: int, log: list) -> int:
    """The largest N up to ``most`` that meets the targets: doubling (the last step is ``most``
    itself), then bisecting."""
    good, bad = 0, None
    while bad is None and good < most:
        n = min(max(1, 2 * good), most)
        row = trial(url, n, seconds, peer)
        log.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        if passes(row, peer):
            good = n
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


def _info(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url + "/api/info", timeout=10) as resp:
        return dict(json.loads(resp.read()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="checkpoint directory: start the servers here")
    p.add_argument("--url", help="measure an already running voxaffect server instead")
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--seconds", type=float, default=30.0, help="audio per stream")
    p.add_argument("--find-capacity", action="store_true")
    p.add_argument("--overload", action="store_true", help="capacity, then 1.5x and 2x it")
    p.add_argument("--burst", action="store_true", help="a burst after a stall, idle server")
    p.add_argument("--engine-bound", action="store_true", help="the engine alone, same run")
    p.add_argument("--peer", action="store_true", help="also the seed-style peer, same run")
    p.add_argument("--most", type=int, default=64, help="largest N --find-capacity tries")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if not args.url and not args.model:
        p.error("give --model (servers started here) or --url")
    if args.engine_bound and not args.model:
        p.error("--engine-bound needs --model")
    work = Path(tempfile.mkdtemp(prefix="voxaffect-bench-"))
    report: dict[str, Any] = {"targets": TARGETS, "servers": {}}
    servers: list[tuple[str, bool, Any]] = []
    if args.url:
        servers.append(("voxaffect", False, args.url))
    else:
        port = free_port()
        command = [sys.executable, "-m", "server.cli", "serve", "--model", args.model]
        command += ["--port", str(port), "--db", str(work / "bench.db")]
        servers.append(("voxaffect", False, command))
        if args.peer:
            peer_port = str(free_port())
            command = [sys.executable, "-m", "bench.peer", "--model", args.model]
            servers.append(("peer", True, [*command, "--port", peer_port]))
    tuning: dict[str, Any] = {}
    engine_runs: list[float] = []  # engine-alone windows/s, before and after the load trials
    for name, peer, target in servers:
        log: list[dict[str, Any]] = []
        entry: dict[str, Any] = {"trials": log, "capacity": None}
        if isinstance(target, str):
            url_cm: Any = nullcontext(target)
        else:
            url_cm = started(target, int(target[target.index("--port") + 1]), work)
        with url_cm as url:
            if not peer:
                tuning = _info(url)["model"].get("tuning", {})
                entry["tuning"] = tuning
                if args.engine_bound and tuning:
                    engine_runs.append(engine_bound(args.model, tuning))
                if args.burst:
                    entry["burst"] = burst_trial(url)
                    print(json.dumps(entry["burst"]), file=sys.stderr, flush=True)
            if args.find_capacity or args.overload:
                entry["capacity"] = find_capacity(url, args.seconds, peer, args.most, log)
                if args.overload and not peer:
                    entry["overload"] = overload(url, args.seconds, entry["capacity"], [])
            else:
                log.append(trial(url, args.streams, args.seconds, peer))
        report["servers"][name] = entry
    if engine_runs:
        engine_runs.append(engine_bound(args.model, tuning))
        wps = statistics.mean(engine_runs)
        per_stream = due_per_stream_s(args.seconds)
        bound = wps / per_stream
        report["engine"] = {
            "windows_per_s": round(wps, 2),
            "runs_windows_per_s": [round(r, 2) for r in engine_runs],
            "due_windows_per_s_per_stream": round(per_stream, 3),
            "bound_streams": round(bound, 1),
        }
        ours = report["servers"]["voxaffect"]["capacity"]
        if ours:
            report["engine"]["efficiency"] = round(ours / bound, 3)
    if "peer" in report["servers"] and report["servers"]["peer"]["capacity"] is not None:
        ours = report["servers"]["voxaffect"]["capacity"]
        theirs = report["servers"]["peer"]["capacity"]
        report["capacity_ratio"] = round(ours / theirs, 2) if theirs else None
    shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(report))
        return 0
    print(format_report(report))
    return 0


def format_report(report: dict[str, Any]) -> str:
    lines = [
        "| server | streams | coverage (min / mean) | latency p50 / p95 / max | expired "
        "| ping p50 / p95 / max | results/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, data in report["servers"].items():
        for r in data["trials"] + data.get("overload", []):
            load = f" ({r['load']:g}x)" if "load" in r else ""
            lines.append(
                f"| {name} | {r['streams']}{load} | {r['coverage']:.2f} ({r['coverage_min']:.2f}"
                f" / {r['coverage_mean']:.2f}) | {r['latency_p50_s']:.2f} / "
                f"{r['latency_p95_s']:.2f} / {r['latency_max_s']:.2f} s | "
                f"{r['expired_share']:.0%} | {r['ping_p50_ms']} / {r['ping_p95_ms']} / "
                f"{r['ping_max_ms']} ms | {r['results_per_s']} |"
            )
    for name, data in report["servers"].items():
        if data["capacity"] is not None:
            lines.append(f"\n{name}: capacity {data['capacity']} streams")
        if data.get("tuning"):
            t = data["tuning"]
            lines.append(
                f"{name}: tuned {t['dtype']}, batch {t['max_batch']}, {t['lanes']} lanes, "
                f"{t['windows_per_s']:.2f} windows/s at start"
            )
        if data.get("burst"):
            b = data["burst"]
            lines.append(
                f"{name}: burst after a stall: {b['burst_windows_analysed']} of "
                f"{b['burst_windows_due']} windows due analysed ({b['expired']} expired)"
            )
    if report.get("engine"):
        e = report["engine"]
        runs = " and ".join(str(r) for r in e.get("runs_windows_per_s", []))
        lines.append(
            f"engine alone: {e['windows_per_s']} windows/s (mean of {runs}, before and after) "
            f"÷ {e['due_windows_per_s_per_stream']} due windows/s per stream = "
            f"{e['bound_streams']} streams at most"
        )
        if "efficiency" in e:
            lines.append(f"voxaffect capacity ÷ engine bound: {e['efficiency']:.0%}")
    if report.get("capacity_ratio"):
        lines.append(f"voxaffect / peer capacity: {report['capacity_ratio']}x")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
