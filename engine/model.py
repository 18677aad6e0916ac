"""Emotion2Vec+ built through FunASR, predicting a batch of equal-length windows in one pass.

``load_model`` resolves a checkpoint (``hub.py``), has FunASR build the architecture from its
config.yaml (``funasr_compat.py``), loads model.pt itself — every weight inference uses must be in
it — and wraps the module in :class:`EmotionModel`. ``predict`` runs the same computation as
FunASR's ``generate()`` (layer norm over the window, features, mean over time, linear head,
softmax) on a whole batch at once; the convolutional front end runs channels-last as unfold +
matmul, which gives the same numbers and lets ``int8`` quantise it with the transformer's linear
layers.
"""

from __future__ import annotations

import copy
import logging
import os
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine import DEFAULT_MODEL
from engine.checkpoint import is_random_checkpoint
from engine.funasr_compat import build_module, english_label, strip_prefix
from engine.hub import ModelLoadError, load_state, resolve_checkpoint

log = logging.getLogger(__name__)

DTYPES = ("fp32", "fp16", "bf16", "int8")
MIN_WINDOW_SAMPLES = 400  # one 25 ms frame of the convolutional front end
_TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

__all__ = [
    "DTYPES",
    "EmotionModel",
    "ModelLoadError",
    "Prediction",
    "WindowAnswer",
    "load_model",
    "traced_batch_sizes",
]


@dataclass(slots=True)
class Prediction:
    probs: np.ndarray  # (batch, labels) float32, each row sums to 1
    embeddings: np.ndarray | None = None  # (batch, embed_dim) float32 utterance embeddings
    device: str = "cpu"  # where it was computed
    fallback_reason: str | None = None  # why a fallback device answered (engine/fallback.py)

    def answer(self, i: int) -> WindowAnswer:
        """Window ``i``'s part of the batch."""
        return WindowAnswer(
            probs=self.probs[i],
            embedding=None if self.embeddings is None else self.embeddings[i],
            device=self.device,
            fallback_reason=self.fallback_reason,
        )


@dataclass(slots=True)
class WindowAnswer:
    """What the model said of one window, carried whole to the window's result: a field that
    inference adds goes here (and in ``Prediction.answer``) and reaches every result, stored
    timeline and file analysis from this one place."""

    probs: np.ndarray  # (labels,)
    embedding: np.ndarray | None = None
    device: str = "cpu"
    fallback_reason: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The result fields that come from inference (probabilities go in as scores)."""
        out: dict[str, Any] = {"device": self.device}
        if self.fallback_reason:
            out["fallback_reason"] = self.fallback_reason
        if self.embedding is not None:
            out["embedding"] = [round(float(v), 5) for v in self.embedding]
        return out


def _load_weights(module: nn.Module, checkpoint: Path, *, trusted: bool) -> None:
    """Load model.pt into ``module``; every weight inference uses must come from it."""
    raw = load_state(checkpoint / "model.pt", trusted=trusted)
    state = {strip_prefix(k): v for k, v in raw.items()}
    own = module.state_dict()
    needed = [k for k in own if ".decoder." not in k]  # the pre-training decoder is unused
    missing = [k for k in needed if k not in state]
    if missing:
        raise ModelLoadError(
            f"{checkpoint}/model.pt lacks {len(missing)} of the model's weights "
            f"(first: {', '.join(missing[:3])}); it does not match config.yaml"
        )
    wrong = [k for k in needed if tuple(state[k].shape) != tuple(own[k].shape)]
    if wrong:
        raise ModelLoadError(
            f"{checkpoint}/model.pt has {len(wrong)} weights of the wrong shape "
            f"(first: {wrong[0]} {tuple(state[wrong[0]].shape)} != {tuple(own[wrong[0]].shape)})"
        )
    module.load_state_dict({k: state[k] for k in own if k in state}, strict=False)


# --- the forward pass ----------------------------------------------------------------------


class _ConvAsMatmul(nn.Module):
    """Conv1d (no padding) on channels-last input (B, T, Cin) -> (B, T', Cout) via unfold."""

    def __init__(self, conv: nn.Conv1d, quantizable: bool) -> None:
        super().__init__()
        self.kernel = conv.kernel_size[0]
        self.stride = conv.stride[0]
        out_ch, in_ch, k = conv.weight.shape
        weight = conv.weight.detach().permute(0, 2, 1).reshape(out_ch, k * in_ch)
        # nn.Linear gets quantised by int8; the 1-channel first layer stays a plain matmul.
        self.linear: nn.Module | None = None
        if quantizable:
            self.linear = nn.Linear(k * in_ch, out_ch, bias=conv.bias is not None)
            self.linear.weight.data.copy_(weight)
            if conv.bias is not None:
                self.linear.bias.data.copy_(conv.bias.detach())
        else:
            self.weight = nn.Parameter(weight.clone(), requires_grad=False)
            self.bias = conv.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cols = x.unfold(1, self.kernel, self.stride)  # (B, T', Cin, k)
        cols = cols.transpose(2, 3).reshape(cols.shape[0], cols.shape[1], -1)
        if self.linear is not None:
            return self.linear(cols)
        return F.linear(cols, self.weight.to(cols.dtype), self.bias)


class _ChannelsLastFrontEnd(nn.Module):
    """FunASR's layer_norm conv feature extractor, computed channels-last without transposes."""

    def __init__(self, extractor: Any) -> None:
        super().__init__()
        self.convs = nn.ModuleList()
        self.norms = nn.ModuleList()
        for i, block in enumerate(extractor.conv_layers):
            conv, norm = block[0], block[2][1]
            self.convs.append(_ConvAsMatmul(conv, quantizable=i > 0))
            self.norms.append(norm)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        x = wav.unsqueeze(-1)
        for conv, norm in zip(self.convs, self.norms, strict=True):
            x = F.gelu(norm(conv(x)))
        return x


def _is_layer_norm_extractor(extractor: Any) -> bool:
    try:
        return all(
            isinstance(b[0], nn.Conv1d)
            and b[0].padding == (0,)
            and isinstance(b[2][1], nn.LayerNorm)
            and isinstance(b[3], nn.GELU)
            for b in extractor.conv_layers
        )
    except (AttributeError, IndexError, TypeError):
        return False


class EmotionModel:
    """One loaded model on one device, owned by the batcher's worker (see batcher.py).

    ``predict`` keeps no per-call state in the module, so the worker may split a CPU batch
    across lanes that run concurrently.
    """

    def __init__(
        self,
        module: Any,  # FunASR's Emotion2vec (untyped)
        tokens: list[str],
        *,
        device: str,
        dtype: str,
        source: str,
        random_weights: bool,
        checkpoint: Path | None = None,
    ) -> None:
        self.module: Any = module
        self.checkpoint = checkpoint  # the directory it was loaded from
        self.device = device
        self.dtype = dtype
        self.source = source
        self.random_weights = random_weights
        self.tokens = tokens
        keep = [i for i, t in enumerate(tokens) if not t.startswith("unuse")]
        self._keep = torch.tensor(keep, dtype=torch.long)
        self.labels = tuple(english_label(tokens[i]) for i in keep)
        self._encoder: Any = module.modality_encoders["AUDIO"]
        self._num_extra = int(self._encoder.modality_cfg.num_extra_tokens)
        self._normalize = bool(module.cfg.get("normalize", False))
        self._compute_dtype = _TORCH_DTYPES.get(dtype, torch.float32)
        self._front: nn.Module | None = None
        if _is_layer_norm_extractor(self._encoder.local_encoder):
            self._front = _ChannelsLastFrontEnd(self._encoder.local_encoder)
        self.parameters = sum(p.numel() for p in module.parameters())
        self._traced: dict[tuple[int, int], Any] = {}  # (batch, samples) -> compiled pass
        self._place()

    def _place(self) -> None:
        modules = [self.module] + ([self._front] if self._front is not None else [])
        for m in modules:
            m.eval()
            m.to(self.device)
            if self.dtype in ("fp16", "bf16"):
                m.to(self._compute_dtype)
        if self.dtype == "int8":
            with warnings.catch_warnings():
                # torch.ao's eager dynamic quantisation (fbgemm int8 kernels) is deprecated in
                # favour of torchao, whose CPU int8 path is slower in eager mode here; torch 2.13
                # still ships it. Both deprecation notices come from this one call.
                warnings.filterwarnings("ignore", category=DeprecationWarning)
                warnings.filterwarnings(
                    "ignore", message=".*quantize_per_tensor", category=UserWarning
                )
                from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

                # Per-channel weight scales halve the drift of per-tensor ones at the same speed.
                for m in modules:
                    quantize_dynamic(m, {nn.Linear: per_channel_dynamic_qconfig}, inplace=True)

    def converted(self, dtype: str, device: str | None = None) -> EmotionModel:
        """A copy of this fp32 model in ``dtype`` on ``device``; this one stays as it is."""
        if self.dtype != "fp32":
            raise ValueError(f"only an fp32 model can be converted, not {self.dtype}")
        device = device or self.device
        return EmotionModel(
            copy.deepcopy(self.module),
            self.tokens,
            device=device,
            dtype=check_dtype(dtype, device),
            source=self.source,
            random_weights=self.random_weights,
            checkpoint=self.checkpoint,
        )

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "device": self.device,
            "dtype": self.dtype,
            "labels": list(self.labels),
            "parameters": self.parameters,
            "random_weights": self.random_weights,
        }

    def _features(self, wav: torch.Tensor) -> torch.Tensor:
        """(B, T) normalised audio -> (B, frames, dim) features, as Emotion2vec.extract_features."""
        enc = self._encoder
        wav = wav.to(self._compute_dtype)
        if self._front is not None:
            x = self._front(wav)
            x = enc.project_features[2](enc.project_features[1](x))  # skip TransposeLast
        else:
            x = enc.local_features(wav)
        ctx = enc.contextualized_features(x, None, False, False)
        x, bias, scale = ctx["x"], ctx["alibi_bias"], ctx["alibi_scale"]
        for i, block in enumerate(self.module.blocks):
            b = bias
            if b is not None and scale is not None:
                s = scale[i] if scale.size(0) > 1 else scale.squeeze(0)
                b = b * s.type_as(b)
            x, _ = block(x, padding_mask=None, alibi_bias=b)
        if self.module.norm is not None:
            x = self.module.norm(x)
        return x[:, self._num_extra :]

    def _forward(self, wav: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) audio -> (logits, pooled features): what generate() computes."""
        if self._normalize:
            wav = F.layer_norm(wav, wav.shape[-1:])
        pooled = self._features(wav).mean(dim=1)
        return self.module.proj(pooled), pooled

    def trace(self, batch_sizes: Iterable[int], samples: int) -> list[tuple[int, int]]:
        """Compile the forward pass of ``samples``-long windows for these batch sizes with
        ``torch.jit.trace`` (then frozen); the shapes it compiled.

        The traced pass runs the same kernels on the same numbers (checked here against the
        eager pass: equal, or the shape stays eager), but inside TorchScript's interpreter,
        which does not take Python's GIL back between ops. Beside a server's event loop and
        VAD threads that hold the GIL for part of the time, an eager pass waits for it before
        every op: two lanes beside a thread holding it 40 % of the time took 203 ms a window
        eager and 140 ms traced. Other shapes (a stream's shorter final window) run eagerly.
        A shape TorchScript cannot follow stays eager too, so this is only ever faster."""
        compiled: list[tuple[int, int]] = []
        rng = np.random.default_rng(0)
        for size in batch_sizes:
            x = torch.from_numpy(
                (rng.standard_normal((size, samples)) * 0.1).astype(np.float32)
            ).to(self.device)
            try:
                with torch.inference_mode(), warnings.catch_warnings():
                    # the trace records branches on sizes fixed by the checkpoint's config
                    warnings.simplefilter("ignore", torch.jit.TracerWarning)
                    # torch 2.13 marks torch.jit deprecated in favour of torch.compile, which
                    # was slower here and changed the outputs (BENCHMARKS.md); jit still ships
                    warnings.filterwarnings("ignore", "`torch.jit", DeprecationWarning)
                    traced = torch.jit.freeze(
                        torch.jit.trace(_Forward(self), x, check_trace=False).eval()
                    )
                    for _ in range(3):  # the profiling executor optimises in its first runs
                        got = traced(x)
                    want = self._forward(x)
                same = all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
            except Exception as exc:  # a module TorchScript cannot follow: eager it is
                log.warning("tracing failed; eager (%r)", exc, extra={"batch": size})
                continue
            if not same:
                log.warning(
                    "the traced pass differs from the eager one; eager", extra={"batch": size}
                )
                continue
            self._traced[(size, samples)] = traced
            compiled.append((size, samples))
        return compiled

    def predict(self, windows: np.ndarray, *, embeddings: bool = False) -> Prediction:
        """Emotion probabilities for a (batch, samples) array of equal-length 16 kHz windows."""
        batch = np.asarray(windows, dtype=np.float32)
        if batch.ndim == 1:
            batch = batch[None]
        if batch.ndim != 2 or batch.shape[0] == 0:
            raise ValueError(f"windows must be (batch, samples), got shape {batch.shape}")
        if batch.shape[1] < MIN_WINDOW_SAMPLES:
            raise ValueError(f"windows need at least {MIN_WINDOW_SAMPLES} samples")
        with torch.inference_mode():
            wav = torch.from_numpy(batch).to(self.device)
            traced = self._traced.get((batch.shape[0], batch.shape[1]))
            logits, pooled = traced(wav) if traced is not None else self._forward(wav)
            logits = logits.float().index_select(1, self._keep.to(logits.device))
            probs = torch.softmax(logits, dim=-1).cpu().numpy()
            emb = pooled.float().cpu().numpy() if embeddings else None
        if not np.isfinite(probs).all():
            raise FloatingPointError(f"the model gave non-finite probabilities in {self.dtype}")
        return Prediction(probs=probs, embeddings=emb, device=self.device)


class _Forward(nn.Module):
    """The forward pass as a module, for torch.jit.trace."""

    def __init__(self, model: EmotionModel) -> None:
        super().__init__()
        self.model = model
        self.module = model.module  # registered, so the trace finds the weights
        self.front = model._front

    def forward(self, wav: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model._forward(wav)


def traced_batch_sizes(max_batch: int) -> list[int]:
    """The batch sizes a server traces (EmotionModel.trace) for its live windows: each up to 4
    (under load, batches of every small size form) and ``max_batch``."""
    return sorted({*range(1, min(max_batch, 4) + 1), max_batch})


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device} requested but torch sees no CUDA device")
    if device != "cpu" and not device.startswith("cuda"):
        raise ModelLoadError(f"device must be auto, cpu or cuda[:N]; got {device!r}")
    return device


def check_dtype(dtype: str, device: str) -> str:
    """``dtype`` if the model can run in it on ``device``. Whether it is *fast* there is measured
    (engine/tuning.py), never guessed from CPU flags: torch computes every dtype on every CPU."""
    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    if dtype == "int8" and device != "cpu":
        raise ModelLoadError("int8 (dynamic quantisation) runs on the CPU only")
    return dtype


def load_model(
    source: str = DEFAULT_MODEL,
    *,
    device: str = "auto",
    dtype: str = "fp32",
    hub: str = "auto",
    threads: int | None = None,
    trusted: bool = False,
) -> EmotionModel:
    """Load emotion2vec from a checkpoint directory or hub id onto ``device`` in ``dtype``.

    ``trusted`` lets torch unpickle a model.pt that holds more than tensors (never by default).
    """
    started = time.perf_counter()
    device = resolve_device(device)
    dtype = check_dtype(dtype, device)
    directory = resolve_checkpoint(source, hub)
    threads = threads or os.cpu_count() or 1
    try:
        module, tokens = build_module(directory, device="cpu", threads=threads)
    except Exception as exc:
        raise ModelLoadError(f"FunASR could not build the model from {directory}: {exc}") from exc
    if not tokens or getattr(module, "proj", None) is None:
        raise ModelLoadError(f"{directory} has no classification head or tokens.txt is empty")
    _load_weights(module, directory, trusted=trusted)
    model = EmotionModel(
        module,
        tokens,
        device=device,
        dtype=dtype,
        source=str(source),
        random_weights=is_random_checkpoint(directory),
        checkpoint=directory,
    )
    log.info(
        "model loaded",
        extra={
            "source": str(source),
            "device": device,
            "dtype": dtype,
            "load_s": round(time.perf_counter() - started, 2),
            "random_weights": model.random_weights,
        },
    )
    return model
