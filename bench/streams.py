"""End-to-end benchmark: N concurrent real-time streams against a running server.

    voxaffect serve --model models/tiny &        # or any model
    python -m bench.streams --url http://127.0.0.1:5000 --streams 8 [--speed 1] [--json]

Each stream sends espeak-ng speech as 16 kHz PCM16 in 100 ms chunks at ``speed`` x real time
through the same client class as ``voxaffect stream``; one more client pings every 50 ms. It
reports results per second over all streams, per-result latency (the server's ``latency_ms``:
chunk received to result emitted) and the ping round-trip under that load.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from typing import Any

import numpy as np

from server.client import StreamClient


def speech_pcm(seconds: float) -> bytes:
    from bench.engine import speech_windows

    windows = speech_windows(int(seconds))  # 2 s windows, 1 s apart: their first halves tile
    audio = np.concatenate([w[:16000] for w in windows])
    return (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()


def run(url: str, streams: int, seconds: float, speed: float, token: str | None) -> dict[str, Any]:
    pcm = speech_pcm(seconds)
    clients = [StreamClient(url, token=token) for _ in range(streams)]
    for c in clients:
        c.start()
    pinger = StreamClient(url, token=token)
    pinger.connect()
    pings: list[float] = []
    stop = threading.Event()

    def ping_loop() -> None:
        while not stop.is_set():
            pings.append(pinger.ping_ms())
            time.sleep(0.05)

    def send(client: StreamClient) -> None:
        started = time.monotonic()
        for i, at in enumerate(range(0, len(pcm), 3200)):
            client.send(pcm[at : at + 3200])
            time.sleep(max(0.0, started + (i + 1) * 0.1 / speed - time.monotonic()))

    threads = [threading.Thread(target=send, args=(c,)) for c in clients]
    ping_thread = threading.Thread(target=ping_loop)
    started = time.monotonic()
    ping_thread.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for c in clients:
        c.end()
    elapsed = time.monotonic() - started
    stop.set()
    ping_thread.join()
    latencies = sorted(r["latency_ms"] for c in clients for r in c.results)
    results = len(latencies)
    for c in clients:
        c.close()
    pinger.close()
    pings.sort()
    return {
        "streams": streams,
        "audio_s_per_stream": len(pcm) / 32000,
        "speed": speed,
        "elapsed_s": round(elapsed, 2),
        "results": results,
        "results_per_s": round(results / elapsed, 2),
        "latency_ms_median": round(statistics.median(latencies), 1),
        "latency_ms_p95": round(latencies[int(0.95 * (results - 1))], 1),
        "ping_ms_median": round(statistics.median(pings), 2),
        "ping_ms_p95": round(pings[int(0.95 * (len(pings) - 1))], 2),
        "ping_ms_max": round(pings[-1], 2),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:5000")
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--speed", type=float, default=1.0)
    p.add_argument("--token")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    report = run(args.url, args.streams, args.seconds, args.speed, args.token)
    print(json.dumps(report, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
