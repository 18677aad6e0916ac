"""Prosody benchmark: what one analysis window's openSMILE measures cost, three ways, in one run.

    python -m bench.prosody [--seconds 30] [--repeats 3] [--json]

The stream is espeak-ng speech (several voices, short pauses), cut into the server's windows
(2 s every 1 s). Per window, in CPU milliseconds of this process (``time.process_time``):

- ``new instance``: ``opensmile.Smile.process_signal`` per window, a new openSMILE instance each
  time (what the server did before);
- ``reused, full set``: one instance of the full eGeMAPS v02 set, reset between windows (what the
  server did before ``prosody.conf``);
- ``reused instance``: ``engine.prosody.measure``, one instance per thread reset between windows,
  running ``prosody.conf`` (what the server does: the same functionals, bit for bit);
- ``once per stream``: one pass over the whole stream with openSMILE's own fixed-frame functionals
  (2 s, 1 s step), so each second's low-level descriptors are computed once rather than twice.
  This is the design option, not what the server does: it needs a streaming openSMILE per track.
  Its values differ from per-window ones at the windows' edges (the descriptors there have
  context); the table gives |difference| / the measure's spread across windows.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from engine import SAMPLE_RATE
from engine.prosody import MEASURES, Extractor, measure
from tests.support.speech import silence, speech

TEXTS = [
    "This is a test sentence for measuring what prosody costs.",
    "And it goes on for a while longer, still speaking, still measured.",
    "Another voice, a little higher, says something else entirely.",
]


def stream(seconds: float) -> np.ndarray:
    parts: list[np.ndarray] = []
    i = 0
    while sum(p.size for p in parts) < seconds * SAMPLE_RATE:
        text = TEXTS[i % len(TEXTS)]
        parts += [speech(text, pitch=30 + 7 * (i % 6), speed=140 + 12 * (i % 5)), silence(0.25)]
        i += 1
    return np.concatenate(parts)[: int(seconds * SAMPLE_RATE)]


def cpu_ms(fn: Any, *args: Any) -> tuple[float, Any]:
    start = time.process_time()
    value = fn(*args)
    return (time.process_time() - start) * 1000.0, value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    import opensmile

    x = np.clip(stream(args.seconds), -1.0, 32767 / 32768)
    starts = range(0, int(args.seconds) - 1)
    windows = [x[s * SAMPLE_RATE : (s + 2) * SAMPLE_RATE] for s in starts]
    columns = [column for column, *_ in MEASURES.values()]
    new = opensmile.Smile(
        feature_set=opensmile.FeatureSet.eGeMAPSv02,
        feature_level=opensmile.FeatureLevel.Functionals,
    )
    with tempfile.TemporaryDirectory() as tmp:
        frames = Path(tmp) / "frames.conf.inc"
        frames.write_text(
            "frameMode = fixed\nframeSize = 2.0\nframeStep = 1.0\nframeCenterSpecial = left\n"
        )
        sliding = opensmile.Smile(
            feature_set=opensmile.FeatureSet.eGeMAPSv02,
            feature_level=opensmile.FeatureLevel.Functionals,
            options={"frameModeFunctionalsConf": str(frames)},
        )
        measure(windows[0])  # the reused instances are built outside the timing
        full = Extractor(opensmile.FeatureSet.eGeMAPSv02)
        rows: list[dict[str, float]] = []
        per_window: list[Any] = []
        once = None
        for _ in range(args.repeats):
            t_new, per_window = cpu_ms(
                lambda: [new.process_signal(w, SAMPLE_RATE) for w in windows]
            )
            t_full, _ = cpu_ms(lambda: [full(w) for w in windows])
            t_reused, _ = cpu_ms(lambda: [measure(w) for w in windows])
            t_once, once = cpu_ms(sliding.process_signal, x, SAMPLE_RATE)
            n = len(windows)
            rows.append(
                {
                    "new_ms": t_new / n,
                    "full_ms": t_full / n,
                    "reused_ms": t_reused / n,
                    "once_ms": t_once / len(once),
                }
            )
    assert once is not None
    standalone = np.array([df.iloc[0][columns].to_numpy(float) for df in per_window])
    streamed = once[columns].to_numpy(float)[: len(windows)]
    standalone = standalone[: len(streamed)]  # the stream's pass may end a window early
    spread = np.nanstd(standalone, axis=0)
    diff = np.abs(streamed - standalone) / np.where(spread > 0, spread, np.nan)
    tolerance = {
        name: {"median": float(np.nanmedian(d)), "p90": float(np.nanpercentile(d, 90))}
        for name, d in zip(MEASURES, diff.T, strict=True)
    }
    report = {"windows": len(windows), "runs": rows, "tolerance_sd": tolerance}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{len(windows)} windows of 2 s (1 s hop) over {args.seconds:.0f} s of espeak-ng speech")
    print(
        "| run | new instance | reused, full set | reused instance | once per stream "
        "| reused / full set | once / new |"
    )
    print("|---|---|---|---|---|---|---|")
    for i, r in enumerate(rows, 1):
        print(
            f"| {i} | {r['new_ms']:.1f} ms | {r['full_ms']:.1f} ms | {r['reused_ms']:.1f} ms | "
            f"{r['once_ms']:.1f} ms | {r['reused_ms'] / r['full_ms']:.2f} | "
            f"{r['once_ms'] / r['new_ms']:.2f} |"
        )
    print("\nonce per stream against per window, |difference| / spread across windows:")
    print("| measure | median | p90 |")
    print("|---|---|---|")
    for name, t in tolerance.items():
        print(f"| {name} | {t['median']:.3f} | {t['p90']:.3f} |")


if __name__ == "__main__":
    main()
