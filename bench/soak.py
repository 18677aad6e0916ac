"""Soak benchmark: many concurrent streams with session churn, watching the server for leaks.

    python -m bench.soak --streams 50 --minutes 10 [--model models/tiny] [--json]

It starts ``voxaffect serve`` itself (so it can watch the process) on a free port. Each of
``--streams`` clients loops for ``--minutes``: a session of 4-20 s of espeak-ng speech sent in
real time in 100 ms chunks, then, by turns, a normal end, a dropped connection that resumes with
its token, or a dropped connection that is left to expire. It reports the server's resident
memory (with its prosody workers) and open file descriptors at start, middle and end, and the
results lost: for every session, results the server counted in its summary (or stored) that the
client never received. Not a test: run it by hand and record the numbers in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from client.stream import StreamClient

CHUNK_S = 0.1


def speech_pcm() -> bytes:
    from bench.streams import speech_pcm as make

    return make(30.0) * 2  # 60 s: sessions start at random places in it


def process_stats(pid: int) -> dict[str, float]:
    """RSS (MiB) of the server and its children, and the server's open descriptors."""
    pids = [pid]
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                pids.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    rss = 0.0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss += int(line.split()[1]) / 1024
        except OSError:
            continue
    return {"rss_mb": round(rss, 1), "fds": len(os.listdir(f"/proc/{pid}/fd"))}


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sessions = 0
        self.results = 0
        self.lost = 0
        self.failures: list[str] = []
        self.kinds: dict[str, int] = {"ended": 0, "resumed": 0, "abandoned": 0}

    def add(self, kind: str, received: int, counted: int) -> None:
        with self.lock:
            self.sessions += 1
            self.kinds[kind] += 1
            self.results += received
            self.lost += max(0, counted - received)


def one_session(url: str, pcm: bytes, rng: random.Random, tally: Tally, kind: str) -> None:
    size = int(rng.uniform(4.0, 20.0) * 16000) * 2
    start = rng.randrange(0, len(pcm) - size) // 2 * 2
    audio = pcm[start : start + size]
    client = StreamClient(url, timeout_s=30)
    client.start()
    step = int(16000 * CHUNK_S) * 2
    began = time.monotonic()
    cut = len(audio) // 2 // step * step
    for i, at in enumerate(range(0, len(audio), step)):
        if kind != "ended" and at == cut:
            if kind == "abandoned":
                client.sio.reconnection = False  # gone for good: the session must expire
            # The connection drops mid-stream: its socket dies under the client's feet.
            client.sio.eio.ws.sock.shutdown(socket.SHUT_RDWR)
            if kind == "abandoned":
                tally.add(kind, len(client.results), 0)
                return
            time.sleep(rng.uniform(0.2, 1.5))  # the client reconnects and resumes by itself
        client.send(audio[at : at + step])
        time.sleep(max(0.0, began + (i + 1) * CHUNK_S - time.monotonic()))
    summary = client.end(timeout_s=120)
    seqs = {r["seq"] for r in client.results}
    tally.add(kind, len(seqs), int(summary["results"]))
    client.close()


def worker(url: str, pcm: bytes, until: float, seed: int, tally: Tally) -> None:
    rng = random.Random(seed)
    while time.monotonic() < until:
        kind = rng.choices(["ended", "resumed", "abandoned"], weights=[6, 2, 1])[0]
        try:
            one_session(url, pcm, rng, tally, kind)
        except Exception as exc:  # a failed session is counted, the soak goes on
            with tally.lock:
                tally.failures.append(repr(exc)[:200])
            time.sleep(1.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(model: str, work: Path, args: list[str]) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    log = open(work / "server.log", "wb")  # noqa: SIM115  (the server keeps writing to it)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "server.cli",
            "serve",
            "--model",
            model,
            "--port",
            str(port),
            "--db",
            str(work / "soak.db"),
            "--max-sessions",
            "400",
            *args,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=2) as resp:
                if resp.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("the server did not become ready")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--streams", type=int, default=50)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--model", help="checkpoint dir (default: a tiny random-weight one)")
    p.add_argument("--server-arg", action="append", default=[], help="extra `serve` argument")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="voxaffect-soak-"))
    model = args.model
    if model is None:
        from engine.checkpoint import write_random_checkpoint

        model = str(write_random_checkpoint(work / "tiny", "tiny"))
    proc, url = start_server(model, work, ["--resume-ttl-s", "5", *args.server_arg])
    try:
        return _soak(args, proc, url)
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(30)


def _soak(args: argparse.Namespace, proc: subprocess.Popen[bytes], url: str) -> int:
    pcm = speech_pcm()
    tally = Tally()
    samples: dict[str, Any] = {"start": process_stats(proc.pid)}
    until = time.monotonic() + args.minutes * 60
    threads = [
        threading.Thread(target=worker, args=(url, pcm, until, i, tally), daemon=True)
        for i in range(args.streams)
    ]
    for t in threads:
        t.start()
        time.sleep(0.05)
    timeline = []
    for minute in range(1, int(args.minutes) + 1):
        time.sleep(max(0.0, until - args.minutes * 60 + minute * 60 - time.monotonic()))
        timeline.append(process_stats(proc.pid)["rss_mb"])
        if minute == max(1, int(args.minutes) // 2):
            samples["middle"] = process_stats(proc.pid)
    samples.setdefault("middle", process_stats(proc.pid))
    for t in threads:
        t.join()
    time.sleep(8)  # abandoned sessions expire (resume_ttl_s 5)
    samples["end"] = process_stats(proc.pid)
    with urllib.request.urlopen(url + "/readyz", timeout=10) as resp:
        live = json.loads(resp.read())["sessions"]
    report = {
        "streams": args.streams,
        "minutes": args.minutes,
        "sessions": tally.sessions,
        "kinds": tally.kinds,
        "results": tally.results,
        "results_lost": tally.lost,
        "failed_sessions": len(tally.failures),
        "failures": tally.failures[:5],
        "sessions_left_open": live,
        "rss_mb_each_minute": timeline,
        **{f"{k}_{m}": v for k, s in samples.items() for m, v in s.items()},
    }
    if args.json:
        print(json.dumps(report))
    else:
        print(json.dumps(report, indent=2))
        print(
            f"\n| streams | minutes | sessions (ended/resumed/abandoned) | results | lost | "
            f"RSS MiB start/middle/end | fds start/middle/end |\n|---|---|---|---|---|---|---|\n"
            f"| {args.streams} | {args.minutes:g} | {tally.sessions} "
            f"({tally.kinds['ended']}/{tally.kinds['resumed']}/{tally.kinds['abandoned']}) | "
            f"{tally.results} | {tally.lost} | {samples['start']['rss_mb']:.0f} / "
            f"{samples['middle']['rss_mb']:.0f} / {samples['end']['rss_mb']:.0f} | "
            f"{samples['start']['fds']} / {samples['middle']['fds']} / {samples['end']['fds']} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
