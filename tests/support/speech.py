"""Test speech made with espeak-ng (and silence and noise made with numpy)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf

from engine.audio import resample

SENTENCE = (
    "The quarterly report is ready for review. "
    "Please take a look when you have a moment and tell me what you think."
)
CACHE = Path(tempfile.gettempdir()) / "voxaffect-test-speech"


def espeak_wav(
    text: str = SENTENCE, *, pitch: int = 40, speed: int = 150, amplitude: int = 100
) -> Path:
    """A 16-bit PCM WAV (22.05 kHz, espeak-ng's rate) of ``text``; cached by its arguments."""
    if shutil.which("espeak-ng") is None:
        raise RuntimeError("espeak-ng is not installed; run `make setup` (scripts/setup-system.sh)")
    key = hashlib.sha1(f"{text}|{pitch}|{speed}|{amplitude}".encode()).hexdigest()[:16]
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"espeak-{key}.wav"
    if not path.exists():
        # one name per process: pytest-xdist workers make the same file at once on a new machine
        tmp = path.with_suffix(f".{os.getpid()}.tmp.wav")
        subprocess.run(
            [
                "espeak-ng",
                "-w",
                str(tmp),
                "-p",
                str(pitch),
                "-s",
                str(speed),
                "-a",
                str(amplitude),
                text,
            ],
            check=True,
        )
        tmp.replace(path)  # atomic: a reader sees the whole file or none
    return path


def speech(text: str = SENTENCE, **kwargs: int) -> np.ndarray:
    """espeak-ng speech as mono float32 at 16 kHz."""
    samples, rate = sf.read(espeak_wav(text, **kwargs), dtype="float32")
    return resample(samples, rate)


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * 16000), dtype=np.float32)


def noise(seconds: float, kind: str = "white", level: float = 0.05, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = int(seconds * 16000)
    white = rng.standard_normal(n)
    if kind == "white":
        x = white
    else:
        power = {"pink": 0.5, "brown": 1.0}[kind]
        spectrum = np.fft.rfft(white) / np.maximum(np.arange(n // 2 + 1), 1) ** power
        x = np.fft.irfft(spectrum, n)
    return (x / np.abs(x).max() * level).astype(np.float32)


def to_pcm16(samples: np.ndarray) -> bytes:
    return (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()
