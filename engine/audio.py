"""Decode client audio chunks and files into mono float32 at 16 kHz.

Encodings: ``pcm_s16le``, ``pcm_f32le``, ``mulaw``, ``alaw`` (G.711, decoded by libsndfile) and
``wav`` (a whole RIFF file in one chunk). Any rate from 8 to 48 kHz is resampled with soxr, keeping
the resampler's state across chunks so a stream resamples exactly as one long signal would.
Every problem with the input raises :class:`AudioFormatError`.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from engine import SAMPLE_RATE

ENCODINGS = ("pcm_s16le", "pcm_f32le", "mulaw", "alaw", "wav")
MIN_RATE = 8_000
MAX_RATE = 48_000
MAX_CHANNELS = 8

RAW_BYTES_PER_SAMPLE = {"pcm_s16le": 2, "pcm_f32le": 4, "mulaw": 1, "alaw": 1}
_G711_SUBTYPE = {"mulaw": "ULAW", "alaw": "ALAW"}


class AudioFormatError(ValueError):
    """Audio that cannot be decoded. ``code`` is the protocol error code to report."""

    def __init__(self, message: str, code: str = "INVALID_AUDIO") -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class AudioFormat:
    """What a stream's chunks hold; validated on construction."""

    encoding: str = "pcm_s16le"
    sample_rate: int = SAMPLE_RATE
    channels: int = 1

    def __post_init__(self) -> None:
        if self.encoding not in ENCODINGS:
            raise AudioFormatError(
                f"unsupported encoding {self.encoding!r}; use one of {', '.join(ENCODINGS)}",
                code="UNSUPPORTED_ENCODING",
            )
        _check_rate(self.sample_rate)
        if (
            isinstance(self.channels, bool)
            or not isinstance(self.channels, int)
            or not 1 <= self.channels <= MAX_CHANNELS
        ):
            raise AudioFormatError(f"channels must be 1 to {MAX_CHANNELS}, got {self.channels!r}")


def _check_rate(rate: object) -> None:
    if isinstance(rate, bool) or not isinstance(rate, int) or not MIN_RATE <= rate <= MAX_RATE:
        raise AudioFormatError(
            f"sample rate must be an integer from {MIN_RATE} to {MAX_RATE} Hz, got {rate!r}"
        )


def decode_chunk(data: bytes, fmt: AudioFormat) -> tuple[np.ndarray, int]:
    """Decode one chunk to float32 of shape (frames, channels) and return it with its rate."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise AudioFormatError(f"audio must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if not data:
        raise AudioFormatError("empty audio chunk")
    if fmt.encoding == "wav":
        return _decode_wav(data)
    frame_bytes = RAW_BYTES_PER_SAMPLE[fmt.encoding] * fmt.channels
    if len(data) % frame_bytes:
        raise AudioFormatError(
            f"{len(data)} bytes is not a whole number of {fmt.encoding} frames "
            f"({frame_bytes} bytes each for {fmt.channels} channel(s))"
        )
    if fmt.encoding == "pcm_s16le":
        samples = np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
    elif fmt.encoding == "pcm_f32le":
        samples = _full_scale(np.frombuffer(data, dtype="<f4").astype(np.float32))
    else:
        samples, _ = sf.read(
            io.BytesIO(data),
            format="RAW",
            subtype=_G711_SUBTYPE[fmt.encoding],
            samplerate=fmt.sample_rate,
            channels=fmt.channels,
            dtype="float32",
            always_2d=True,
        )
        return samples, fmt.sample_rate
    return samples.reshape(-1, fmt.channels), fmt.sample_rate


def _decode_wav(data: bytes) -> tuple[np.ndarray, int]:
    if data[:4] not in (b"RIFF", b"RF64") or data[8:12] != b"WAVE":
        raise AudioFormatError("a wav chunk must be a whole RIFF/WAVE file, header included")
    try:
        samples, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as exc:
        raise AudioFormatError(f"unreadable wav chunk: {exc}") from exc
    _check_rate(rate)
    if samples.shape[0] == 0:
        raise AudioFormatError("wav chunk holds no samples")
    if samples.shape[1] > MAX_CHANNELS:
        raise AudioFormatError(f"wav chunk has {samples.shape[1]} channels; at most {MAX_CHANNELS}")
    return _full_scale(samples), int(rate)


def _check_finite(samples: np.ndarray) -> None:
    if not np.isfinite(samples).all():
        raise AudioFormatError("audio holds NaN or infinite samples")


def _full_scale(samples: np.ndarray) -> np.ndarray:
    """Float audio clipped to full scale [-1, 1], as any recording chain would clip it.
    Finite but huge values (1e30) would otherwise overflow float32 in the model's layer norm."""
    _check_finite(samples)
    return np.clip(samples, -1.0, 1.0, out=samples)


def downmix(samples: np.ndarray) -> np.ndarray:
    """(frames, channels) -> (frames,) float32, averaging the channels."""
    if samples.shape[1] == 1:
        return np.ascontiguousarray(samples[:, 0], dtype=np.float32)
    return samples.mean(axis=1, dtype=np.float32)


class StreamDecoder:
    """Per-stream decoder: chunks in any supported format -> mono float32 at 16 kHz.

    The resampler keeps its filter state between chunks; ``flush()`` returns its tail at the end.
    """

    def __init__(self, fmt: AudioFormat) -> None:
        self.format = fmt
        self.input_seconds = 0.0
        self._rate = 0
        self._resampler: soxr.ResampleStream | None = None

    def feed(self, data: bytes) -> np.ndarray:
        out, errors = self.feed_many([data])
        if errors:
            raise errors[0]
        return out

    def feed_many(self, chunks: list[bytes]) -> tuple[np.ndarray, list[AudioFormatError]]:
        """Decode chunks in order and resample them as one signal; a bad chunk is skipped and
        its error returned, the others are kept."""
        pieces: list[np.ndarray] = []
        errors: list[AudioFormatError] = []
        run: list[np.ndarray] = []
        run_rate = 0
        for data in chunks:
            try:
                samples, rate = decode_chunk(data, self.format)
            except AudioFormatError as exc:
                errors.append(exc)
                continue
            self.input_seconds += samples.shape[0] / rate
            if run and rate != run_rate:
                pieces.append(self._resample(np.concatenate(run), run_rate))
                run = []
            run.append(downmix(samples))
            run_rate = rate
        if run:
            pieces.append(self._resample(np.concatenate(run), run_rate))
        out = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)
        return out, errors

    def _resample(self, mono: np.ndarray, rate: int) -> np.ndarray:
        if rate == SAMPLE_RATE:
            return mono
        if rate != self._rate:
            # A wav chunk may declare a new rate; the old resampler's tail belongs to the old rate.
            self._rate = rate
            self._resampler = soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="float32")
        assert self._resampler is not None
        return np.asarray(self._resampler.resample_chunk(mono), dtype=np.float32)

    def flush(self) -> np.ndarray:
        if self._resampler is None:
            return np.zeros(0, dtype=np.float32)
        tail = np.asarray(self._resampler.resample_chunk(np.zeros(0, np.float32), last=True))
        self._resampler = None
        self._rate = 0
        return tail.astype(np.float32)


def resample(samples: np.ndarray, rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
    """Resample a whole mono signal (soxr, high quality)."""
    if rate == target:
        return samples.astype(np.float32, copy=False)
    return np.asarray(soxr.resample(samples, rate, target), dtype=np.float32)


MAX_FILE_RATE = 192_000
FILE_BLOCK_S = 10.0  # seconds of a file decoded at a time


@dataclass(frozen=True, slots=True)
class FileInfo:
    sample_rate: int
    channels: int
    duration_s: float  # from the header (an estimate for some compressed formats)


def _libsndfile_message(exc: Exception) -> str:
    """libsndfile's own words, without the repr of the Python object it was handed."""
    text = getattr(exc, "error_string", None) or str(exc)
    return text.split(": ", 1)[1] if text.startswith("Error opening <") else text


def file_blocks(
    source: str | Path | bytes, *, max_seconds: float | None = None
) -> tuple[FileInfo, Iterator[np.ndarray]]:
    """A WAV/FLAC/OGG/MP3 file (path or bytes): its header, checked before anything is decoded
    (rate, channels, and a duration within ``max_seconds``), and its audio as mono float32 at
    16 kHz, decoded ``FILE_BLOCK_S`` at a time — so memory does not grow with what the header
    claims, and a file whose decoded length exceeds ``max_seconds`` stops with an error."""
    handle: str | io.BytesIO = io.BytesIO(source) if isinstance(source, bytes) else str(source)
    try:
        header = sf.info(handle)
    except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
        raise AudioFormatError(f"unreadable audio file: {_libsndfile_message(exc)}") from None
    rate, channels = int(header.samplerate), int(header.channels)
    if not MIN_RATE <= rate <= MAX_FILE_RATE:
        raise AudioFormatError(f"file sample rate {rate} Hz is outside {MIN_RATE}-{MAX_FILE_RATE}")
    if not 1 <= channels <= MAX_CHANNELS:
        raise AudioFormatError(f"the file has {channels} channels; at most {MAX_CHANNELS}")
    duration = max(0, int(header.frames)) / rate
    if max_seconds is not None and duration > max_seconds:
        raise AudioFormatError(
            f"the file holds {duration:.0f} s of audio; at most {max_seconds:g} s", "INVALID_AUDIO"
        )
    if isinstance(handle, io.BytesIO):
        handle.seek(0)
    info = FileInfo(rate, channels, duration)
    return info, _decoded_blocks(handle, info, max_seconds)


def _decoded_blocks(
    handle: str | io.BytesIO, info: FileInfo, max_seconds: float | None
) -> Iterator[np.ndarray]:
    resampler = (
        None
        if info.sample_rate == SAMPLE_RATE
        else soxr.ResampleStream(info.sample_rate, SAMPLE_RATE, 1, dtype="float32")
    )
    frames = 0
    try:
        blocks = sf.blocks(
            handle, blocksize=int(FILE_BLOCK_S * info.sample_rate), dtype="float32", always_2d=True
        )
        for block in blocks:
            frames += block.shape[0]
            if max_seconds is not None and frames / info.sample_rate > max_seconds:
                raise AudioFormatError(f"the file holds more than {max_seconds:g} s of audio")
            mono = downmix(_full_scale(block))
            yield mono if resampler is None else resampler.resample_chunk(mono)
    except (sf.LibsndfileError, RuntimeError) as exc:
        raise AudioFormatError(f"unreadable audio file: {_libsndfile_message(exc)}") from None
    if resampler is not None:
        yield resampler.resample_chunk(np.zeros(0, np.float32), last=True)
    if frames == 0:
        raise AudioFormatError("audio file holds no samples")


def load_file(
    source: str | Path | bytes, *, max_seconds: float | None = None
) -> tuple[np.ndarray, int]:
    """A whole WAV/FLAC/OGG/MP3 file (path or bytes) -> (mono float32 at 16 kHz, original rate).

    libsndfile reads all four; librosa (audioread) is tried for a path it cannot read.
    """
    try:
        info, blocks = file_blocks(source, max_seconds=max_seconds)
        return np.concatenate([np.asarray(b, dtype=np.float32) for b in blocks]), info.sample_rate
    except AudioFormatError:
        if isinstance(source, bytes):
            raise
        try:
            import librosa

            mono, rate = librosa.load(str(source), sr=None, mono=True)
        except Exception as exc2:  # audioread raises several unrelated types
            raise AudioFormatError(f"unreadable audio file {source}: {exc2}") from exc2
    samples = np.asarray(mono, dtype=np.float32)[:, None]
    if samples.size == 0:
        raise AudioFormatError("audio file holds no samples")
    if not MIN_RATE <= rate <= MAX_FILE_RATE:
        raise AudioFormatError(f"file sample rate {rate} Hz is out of range")
    return resample(downmix(_full_scale(samples)), int(rate)), int(rate)
