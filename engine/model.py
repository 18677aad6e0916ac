"""Emotion2Vec+ loaded through FunASR, predicting a batch of equal-length windows in one pass.

``load_model`` resolves a local checkpoint directory or a hub id (downloading on first use, with
progress, or failing fast offline), builds the model with FunASR's ``AutoModel`` and wraps its torch
module in :class:`EmotionModel`. ``predict`` runs the same computation as FunASR's ``generate()``
(layer norm over the window, features, mean over time, linear head, softmax) on a whole batch at
once; the convolutional front end runs channels-last as unfold + matmul, which gives the same
numbers and lets ``int8`` quantise it with the transformer's linear layers.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import pickle
import socket
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine.checkpoint import (
    CHECKPOINT_PREFIX,
    is_random_checkpoint,
    missing_files,
)

log = logging.getLogger(__name__)

DEFAULT_MODEL = "iic/emotion2vec_plus_large"
DTYPES = ("auto", "fp32", "fp16", "bf16", "int8")
HUBS = {"ms": "modelscope.cn", "hf": "huggingface.co"}
MIN_WINDOW_SAMPLES = 400  # one 25 ms frame of the convolutional front end
_TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class ModelLoadError(RuntimeError):
    """The model cannot be loaded; the message says what to do about it."""


@dataclass(slots=True)
class Prediction:
    probs: np.ndarray  # (batch, labels) float32, each row sums to 1
    embeddings: np.ndarray | None = None  # (batch, embed_dim) float32 utterance embeddings


@contextlib.contextmanager
def _quiet_funasr() -> Iterator[None]:
    """FunASR prints on import, logs chatter on the root logger and calls basicConfig(INFO);
    keep the host's logging exactly as it was."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def import_funasr() -> None:
    with _quiet_funasr():
        import funasr
        import funasr.models.emotion2vec.model  # noqa: F401  (registers Emotion2vec)


def english_label(token: str) -> str:
    """'生气/angry' -> 'angry'; '<unk>' -> 'unknown'."""
    if token == "<unk>":
        return "unknown"
    return token.rsplit("/", 1)[-1].strip()


# --- locating the checkpoint -------------------------------------------------------------------


def _default_hub(model_id: str) -> str:
    return "hf" if model_id.startswith("emotion2vec/") else "ms"


def _hub_repo(model_id: str, hub: str) -> str:
    if hub == "hf" and model_id.startswith("iic/"):
        return "emotion2vec/" + model_id.split("/", 1)[1]
    return model_id


def _reachable(host: str, timeout_s: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def _snapshot(repo: str, hub: str, local_only: bool) -> str:
    if hub == "hf":
        from huggingface_hub import snapshot_download as hf_download

        return str(hf_download(repo, local_files_only=local_only))
    from modelscope.hub.snapshot_download import snapshot_download as ms_download

    return str(ms_download(repo, local_files_only=local_only))


def resolve_checkpoint(source: str, hub: str = "auto") -> Path:
    """A local checkpoint directory for ``source`` (a directory, or a hub id to fetch)."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"model {source} is a file; pass the checkpoint directory")
        return _checked_dir(path)
    if "/" not in source or source.startswith((".", "/", "~")):
        raise ModelLoadError(f"model directory {source} does not exist")
    hub = _default_hub(source) if hub == "auto" else hub
    if hub not in HUBS:
        raise ModelLoadError(f"hub must be one of auto, {', '.join(HUBS)}; got {hub!r}")
    repo = _hub_repo(source, hub)
    with contextlib.suppress(Exception):  # not in the local cache yet
        return _checked_dir(Path(_snapshot(repo, hub, local_only=True)))
    if not _reachable(HUBS[hub]):
        raise ModelLoadError(
            f"model {repo} is not in the local cache and {HUBS[hub]} cannot be reached. "
            f"On a machine with network run `voxaffect download {source} --hub {hub} DIR` "
            "(or `modelscope download --model iic/emotion2vec_plus_large --local_dir DIR`), "
            "copy DIR here and pass --model DIR."
        )
    log.info("downloading %s from %s (first use; cached afterwards)", repo, HUBS[hub])
    try:
        return _checked_dir(Path(_snapshot(repo, hub, local_only=False)))
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"downloading {repo} from {HUBS[hub]} failed: {exc}") from exc


def _checked_dir(directory: Path) -> Path:
    missing = missing_files(directory)
    if missing:
        # FunASR would load a directory without model.pt silently with random weights.
        raise ModelLoadError(
            f"{directory} is not an emotion2vec checkpoint: missing {', '.join(missing)} "
            "(it needs config.yaml, model.pt and tokens.txt)"
        )
    return directory


TRUST_ENV = "VOXAFFECT_TRUST_CHECKPOINT"


def _trusted() -> bool:
    return os.environ.get(TRUST_ENV) == "1"


def _untrusted_pickle(path: Path) -> ModelLoadError:
    return ModelLoadError(
        f"{path} holds more than tensors, which torch refuses to unpickle by default. "
        f"If you trust this file, set {TRUST_ENV}=1 and load it again."
    )


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=not _trusted(), mmap=True)
    except pickle.UnpicklingError as exc:
        raise _untrusted_pickle(path) from exc
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state


def _check_weights(module: nn.Module, checkpoint: Path) -> None:
    """Every weight inference uses must come from the checkpoint (FunASR only prints misses)."""
    names = set()
    for key in _load_state(checkpoint / "model.pt"):
        for prefix in (CHECKPOINT_PREFIX, "module."):
            key = key.removeprefix(prefix)
        names.add(key)
    needed = [k for k in module.state_dict() if ".decoder." not in k]
    missing = [k for k in needed if k not in names]
    if missing:
        raise ModelLoadError(
            f"{checkpoint}/model.pt lacks {len(missing)} of the model's weights "
            f"(first: {', '.join(missing[:3])}); it does not match config.yaml"
        )


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


def cpu_supports(dtype: str) -> bool:
    if dtype == "bf16":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if dtype == "fp16":
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    return True


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
    ) -> None:
        self.module: Any = module
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
            if self._normalize:
                wav = F.layer_norm(wav, wav.shape[-1:])
            feats = self._features(wav)
            pooled = feats.mean(dim=1)
            logits = self.module.proj(pooled).float()
            logits = logits.index_select(1, self._keep.to(logits.device))
            probs = torch.softmax(logits, dim=-1).cpu().numpy()
            emb = pooled.float().cpu().numpy() if embeddings else None
        return Prediction(probs=probs, embeddings=emb)


def _resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device} requested but torch sees no CUDA device")
    if device != "cpu" and not device.startswith("cuda"):
        raise ModelLoadError(f"device must be auto, cpu or cuda[:N]; got {device!r}")
    return device


def _resolve_dtype(dtype: str, device: str) -> str:
    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    if dtype == "auto":
        # fp16 on CPUs with native fp16 matmul (AVX512-FP16/AMX): 1.3x fp32 here, drift 2e-4.
        return "fp16" if device.startswith("cuda") or cpu_supports("fp16") else "fp32"
    if device == "cpu" and not cpu_supports(dtype):
        raise ModelLoadError(f"this CPU has no fast {dtype} support; use fp32 or int8")
    if dtype == "int8" and device != "cpu":
        raise ModelLoadError("int8 (dynamic quantisation) runs on the CPU only")
    return dtype


def load_model(
    source: str = DEFAULT_MODEL,
    *,
    device: str = "auto",
    dtype: str = "auto",
    hub: str = "auto",
    threads: int | None = None,
) -> EmotionModel:
    """Load emotion2vec from a checkpoint directory or hub id onto ``device`` in ``dtype``."""
    started = time.perf_counter()
    device = _resolve_device(device)
    dtype = _resolve_dtype(dtype, device)
    directory = resolve_checkpoint(source, hub)
    import_funasr()
    from funasr import AutoModel

    threads = threads or os.cpu_count() or 1
    if _trusted():  # FunASR calls torch.load without weights_only; torch reads this per call
        os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with _quiet_funasr():
            auto = AutoModel(
                model=str(directory),
                device=device,
                ncpu=threads,
                disable_update=True,
                disable_log=True,
                disable_pbar=True,
                log_level="ERROR",
            )
    except pickle.UnpicklingError as exc:
        raise _untrusted_pickle(directory / "model.pt") from exc
    except Exception as exc:
        raise ModelLoadError(f"FunASR could not build the model from {directory}: {exc}") from exc
    finally:
        if _trusted():
            os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    module = auto.model
    tokens = list(auto.kwargs.get("token_list") or [])
    if not tokens or module.proj is None:
        raise ModelLoadError(f"{directory} has no classification head or tokens.txt is empty")
    _check_weights(module, directory)
    model = EmotionModel(
        module,
        tokens,
        device=device,
        dtype=dtype,
        source=str(source),
        random_weights=is_random_checkpoint(directory),
    )
    model.predict(np.zeros((1, 32000), np.float32))  # first call pays one-off kernel setup
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
