"""What utterances cost: model time per minute of a call-like stream, windows against utterances.

    python -m bench.utterances --model models/large --dtype int8

The audio is bench.streams' call-like stream (3 s of espeak-ng speech, 3 s of quiet, repeated).
It goes through the live pipeline (engine.pipeline.plan_file), which gives the windows the VAD
passes and the utterances it cuts. Each is then timed alone through the model at batch 1, as the
server runs a live window when it keeps up and every utterance (their lengths differ, so they
never share a batch): the best of ``--repeats`` runs. The report is model seconds per minute of
stream for each, and the utterances' share on top of the windows'. Ratios measured in one run;
the absolute seconds depend on this CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import numpy as np

from bench.streams import call_like
from engine import SAMPLE_RATE
from engine.model import load_model
from engine.pipeline import PipelineConfig, plan_file


def model_seconds(model: Any, clips: list[np.ndarray], repeats: int) -> float:
    """Seconds the model takes for every clip, one at a time: the best of ``repeats``."""
    model.predict(clips[0][None, :])  # warm-up
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for clip in clips:
            model.predict(clip[None, :])
        best = min(best, time.perf_counter() - started)
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--model", required=True, help="checkpoint directory (random-model --size large)"
    )
    p.add_argument("--dtype", default="int8", help="fp32, fp16, bf16 or int8 (the CPU's best path)")
    p.add_argument("--seconds", type=float, default=120.0, help="stream length")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    audio = call_like(args.seconds, 0.0)
    model = load_model(args.model, device="cpu", dtype=args.dtype, threads=args.threads)
    _, windows, utterances = plan_file(audio, tuple(model.labels), PipelineConfig(utterances=True))
    minutes = audio.size / SAMPLE_RATE / 60
    window_s = model_seconds(model, [w.samples for w in windows], args.repeats)
    utterance_s = model_seconds(model, [u.samples for u in utterances], args.repeats)
    report = {
        "dtype": args.dtype,
        "threads": args.threads,
        "stream_s": round(audio.size / SAMPLE_RATE, 1),
        "windows_per_min": round(len(windows) / minutes, 1),
        "utterances_per_min": round(len(utterances) / minutes, 1),
        "utterance_mean_s": round(
            float(np.mean([u.end_s - u.start_s for u in utterances])) if utterances else 0.0, 2
        ),
        "window_model_s_per_min": round(window_s / minutes, 2),
        "utterance_model_s_per_min": round(utterance_s / minutes, 2),
        "utterance_over_window_time": round(utterance_s / window_s, 3) if window_s else None,
    }
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key:>28}: {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
