"""Choose the serving configuration by timing the loaded model on this device.

CPU flags do not predict speed: one 2-core Xeon ran bf16 at half its fp32 matmul speed, an EPYC
with AVX512-BF16 ran it 4x faster than fp32, and an AVX2-only EPYC emulates bf16 and fp16 in
software. So ``tune`` measures: every dtype the device can run, on the same windows, then batch
sizes and CPU lanes for the fastest one, a few windows each (seconds, not minutes), through the
batcher exactly as the server runs it: every lane busy, each with its share of the threads, on
the traced pass the server compiles for that batch size. It keeps the fastest candidate whose
probabilities stay within ``max_drift`` of fp32 on those windows and whose batch takes no longer
than ``batch_budget_s`` (a window's latency includes its batch).
A dtype clearly slower than the best so far after one warm-up batch is not timed further.

It measures the machine as it serves, not as it idles: while serving, prosody, VAD, decoding and
the event loop take part of the cores from the model, and a configuration whose ops are split
over every core loses far more to that than one lane per core does. So every candidate runs
beside ``background_share`` of one core kept busy by another process.

The choice is cached on disk, keyed by the machine (CPU or GPU model, cores), torch's version
and the checkpoint, so a restart is instant; ``retune`` measures again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine import SAMPLE_RATE
from engine.batcher import InferenceBatcher
from engine.lanes import Lane, Offload, Predictor, call_directly

log = logging.getLogger(__name__)

CPU_DTYPES = ("fp32", "bf16", "fp16", "int8")
GPU_DTYPES = ("fp16", "bf16", "fp32")
CACHE_VERSION = 3  # 3: candidates timed on the traced pass
# The rest of the server at full load here — prosody workers, VAD, decoding, the event loop —
# took about 0.4 of a core beside the model (BENCHMARKS.md, where the time goes).
SERVING_LOAD_SHARE = 0.4


@dataclass
class Choice:
    dtype: str
    max_batch: int
    lanes: int  # batcher workers, one batch each at a time, with cpu threads / lanes each
    ms_per_window: float  # wall time per window at that batch size, every lane busy
    windows_per_s: float
    drift: float  # largest probability difference from fp32 on the tuning windows
    measured_s: float = 0.0  # how long tuning took (0 when the choice came from the cache)
    from_cache: bool = False
    candidates: list[dict[str, Any]] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("candidates")
        return out


def tuning_windows(n: int = 8, window_s: float = 2.0, seed: int = 0) -> np.ndarray:
    """Deterministic speech-like windows: voiced harmonics with a moving pitch, noise bursts and
    pauses (no test audio needed on a server)."""
    rng = np.random.default_rng(seed)
    samples = int(window_s * SAMPLE_RATE)
    t = np.arange(samples) / SAMPLE_RATE
    out = np.zeros((n, samples), dtype=np.float32)
    for i in range(n):
        f0 = 100 + 120 * rng.random() + 30 * np.sin(2 * np.pi * rng.uniform(0.5, 3) * t)
        phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
        voiced = sum(np.sin(k * phase) / k for k in range(1, 12))
        envelope = (np.sin(2 * np.pi * rng.uniform(2, 5) * t) > -0.3).astype(np.float32)
        noise = rng.standard_normal(samples) * 0.3 * (1 - envelope)
        out[i] = (0.2 * voiced * envelope + 0.05 * noise).astype(np.float32)
    return out


def machine_key(device: str, threads: int) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(device)} (cuda)"
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"{name} x{threads}"


def fingerprint(checkpoint: Path) -> str:
    """Config and weights file identity: a changed checkpoint is tuned again."""
    digest = hashlib.sha256()
    for name in ("config.yaml", "model.pt"):
        path = checkpoint / name
        if path.exists():
            stat = path.stat()
            digest.update(f"{name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    digest.update(
        (checkpoint / "config.yaml").read_bytes() if (checkpoint / "config.yaml").exists() else b""
    )
    return digest.hexdigest()[:16]


class ChoiceCache:
    def __init__(self, path: Path) -> None:
        self.path = path

    def _all(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) and data.get("version") == CACHE_VERSION else {}

    def get(self, key: str) -> Choice | None:
        entry = self._all().get("choices", {}).get(key)
        if not isinstance(entry, dict):
            return None
        try:
            return Choice(**{**entry, "from_cache": True, "measured_s": 0.0, "candidates": []})
        except TypeError:
            return None

    def put(self, key: str, choice: Choice) -> None:
        data = self._all() or {"version": CACHE_VERSION, "choices": {}}
        data["choices"][key] = choice.describe()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(data, indent=1))
            tmp.replace(self.path)
        except OSError as exc:  # a read-only home: tune again next time
            log.warning(
                "could not cache the tuning choice",
                extra={"path": str(self.path), "error": str(exc)},
            )


@contextlib.contextmanager
def background_load(share: float) -> Iterator[None]:
    """Keep ``share`` of one core busy in another process meanwhile (10 ms duty cycles)."""
    if share <= 0:
        yield
        return
    busy_s, idle_s = 0.01 * min(share, 1.0), 0.01 * (1.0 - min(share, 1.0))
    code = (
        "import time\n"
        "while True:\n"
        "    t = time.perf_counter()\n"
        f"    while time.perf_counter() - t < {busy_s}: pass\n"
        f"    time.sleep({idle_s})\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        yield
    finally:
        proc.kill()
        proc.wait()


def tune(
    convert: Callable[[str], Predictor],
    *,
    device: str,
    dtypes: tuple[str, ...] | None = None,
    batches: tuple[int, ...] = (1, 2, 4, 8),
    lanes: tuple[int, ...] = (1, 2),
    cpu_threads: int | None = None,
    windows: np.ndarray | None = None,
    max_drift: float = 0.01,
    batch_budget_s: float = 0.75,
    slow_factor: float = 2.0,
    background_share: float = 0.0,
    offload: Offload = call_directly,
    clock: Callable[[], float] = time.perf_counter,
) -> Choice:
    """The fastest (dtype, batch, lanes) for the model ``convert(dtype)`` returns, within
    ``max_drift`` of fp32 and ``batch_budget_s`` per batch, beside ``background_share`` of a
    core's load. ``offload`` runs each lane's calls as the server does (engine/lanes.py)."""
    with background_load(background_share if not device.startswith("cuda") else 0.0):
        return _tune(
            convert,
            device=device,
            dtypes=dtypes,
            batches=batches,
            lanes=lanes,
            cpu_threads=cpu_threads,
            windows=windows,
            max_drift=max_drift,
            batch_budget_s=batch_budget_s,
            slow_factor=slow_factor,
            offload=offload,
            clock=clock,
        )


def _served(
    model: Predictor,
    batch: int,
    lanes: int,
    threads: int,
    x: np.ndarray,
    offload: Offload,
    clock: Callable[[], float],
) -> tuple[float, float]:
    """(seconds per window, slowest batch in seconds) of the batcher running ``lanes`` lanes
    of ``threads // lanes`` threads at ``batch``, every lane busy for two batches (eight windows
    at least), on the pass the server compiles for that batch."""
    _compile(model, batch, max(1, threads // lanes), x.shape[1])
    batcher = InferenceBatcher(
        Lane(model, threads=max(1, threads // lanes), offload=offload),
        max_batch=batch,
        max_wait_ms=0,
        lanes=lanes,
        clock=clock,
    )
    try:
        count = max(2 * batch * lanes, 8)
        todo = np.concatenate([x] * -(-count // x.shape[0]))[:count]
        for f in [batcher.submit(w, priority="bulk") for w in todo[: batch * lanes]]:
            f.result()  # warm-up: every lane's first call sets up its kernels
        t0 = clock()
        results = [f.result() for f in [batcher.submit(w) for w in todo]]
        seconds = (clock() - t0) / count
    finally:
        batcher.close()
    return seconds, max(r.inference_s for r in results)


def _compile(model: Predictor, batch: int, threads: int, samples: int) -> None:
    """Trace ``model``'s pass for this batch size (``EmotionModel.trace``) with a lane's torch
    threads, as the server will run it: the traced pass ranks candidates differently from the
    eager one (beside a busy core, eager batch 2 beat batch 1; traced, batch 1 was faster)."""
    trace = getattr(model, "trace", None)
    if trace is None:  # a predictor without a compiled pass runs as it is
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        trace([batch], samples)
    finally:
        torch.set_num_threads(before)


def _tune(
    convert: Callable[[str], Predictor],
    *,
    device: str,
    dtypes: tuple[str, ...] | None,
    batches: tuple[int, ...],
    lanes: tuple[int, ...],
    cpu_threads: int | None,
    windows: np.ndarray | None,
    max_drift: float,
    batch_budget_s: float,
    slow_factor: float,
    offload: Offload,
    clock: Callable[[], float],
) -> Choice:
    started = clock()
    cpu = not device.startswith("cuda")
    dtypes = dtypes or (CPU_DTYPES if cpu else GPU_DTYPES)
    threads = cpu_threads or os.cpu_count() or 1
    lanes = (tuple(n for n in lanes if n <= threads) or (1,)) if cpu else (1,)
    x = tuning_windows() if windows is None else windows
    probe = min(4, x.shape[0])  # windows per dtype probe: one batch
    candidates: list[dict[str, Any]] = []

    def timed(predictor: Predictor, batch: int, count: int) -> tuple[float, np.ndarray]:
        """(seconds per window, probabilities) over ``count`` windows."""
        probs, t0 = [], clock()
        for at in range(0, count, batch):
            probs.append(predictor.predict(x[at : at + batch]).probs)
        return (clock() - t0) / count, np.concatenate(probs)

    reference = convert("fp32").predict(x[:probe]).probs  # fp32 is what drift is measured from
    per_dtype: dict[str, tuple[Predictor, float, float]] = {}  # model, drift, s/window
    best_s = float("inf")
    for dtype in dtypes:
        try:
            model = convert(dtype)
            predictor = Lane(model, threads=threads, offload=offload)
            warm_s, _ = timed(predictor, probe, probe)  # one-off kernel setup happens here
        except Exception as exc:  # a dtype this device cannot run at all
            candidates.append({"dtype": dtype, "rejected": f"fails: {exc}"[:200]})
            continue
        if warm_s > slow_factor * 3 * best_s:  # warm-up costs more, but not this much more
            candidates.append({"dtype": dtype, "ms_per_window": warm_s * 1000, "rejected": "slow"})
            continue
        drift = float(np.abs(predictor.predict(x[:probe]).probs - reference).max())
        # Timed as the server would run it at its most parallel: a dtype's speed in one eager lane
        # beside a busy core says little about its traced pass in several (here int8 was half as
        # fast as bf16 eager in one lane, and 1.27x as fast traced in two).
        seconds, _ = _served(model, 1, max(lanes), threads, x, offload, clock)
        row = {
            "dtype": dtype,
            "batch": 1,
            "lanes": max(lanes),
            "ms_per_window": seconds * 1000,
            "drift": drift,
        }
        if drift > max_drift:
            row["rejected"] = f"drift {drift:.4f} > {max_drift}"
        elif seconds > slow_factor * best_s:
            row["rejected"] = "slow"
        else:
            per_dtype[dtype] = (model, drift, seconds)
            best_s = min(best_s, seconds)
        candidates.append(row)
        del model, predictor  # a rejected copy of the model is freed before the next is made
    if not per_dtype:
        raise RuntimeError(f"no dtype ran within {max_drift} of fp32: {candidates}")
    best: Choice | None = None
    finalists = {d: v for d, v in per_dtype.items() if v[2] <= 1.25 * best_s}
    for dtype, (model, drift, _) in finalists.items():
        for n in lanes:
            for batch in sorted(batches):
                seconds, slowest = _served(model, batch, n, threads, x, offload, clock)
                row = {
                    "dtype": dtype,
                    "batch": batch,
                    "lanes": n,
                    "ms_per_window": seconds * 1000,
                    "batch_s": slowest,
                }
                candidates.append(row)
                if slowest > batch_budget_s and batch > min(batches):
                    row["rejected"] = f"batch takes {slowest:.2f} s > {batch_budget_s} s"
                    break  # larger batches take longer still
                # A larger batch must be clearly faster (5 %) to be worth the latency of waiting
                # for, and computing, more windows at once.
                if best is None or seconds * 1000 < best.ms_per_window * (
                    0.95 if batch > best.max_batch else 1.0
                ):
                    best = Choice(dtype, batch, n, seconds * 1000, 1.0 / seconds, drift)
    assert best is not None  # the smallest batch is never rejected
    best.candidates = candidates
    best.measured_s = clock() - started
    return best
