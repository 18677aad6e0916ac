"""Where a checkpoint comes from: a local directory, or a hub id fetched on first use.

``resolve_checkpoint`` returns a directory holding config.yaml, model.pt and tokens.txt. A hub id
is looked up in the local cache first; if it is not there and the hub cannot be reached, it fails
at once with what to do instead, rather than hanging in a download. ``load_state`` reads model.pt
with torch's safe loader unless the caller trusts the file.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import socket
from pathlib import Path

import torch

from engine import DEFAULT_MODEL

log = logging.getLogger(__name__)

HUBS = {"ms": "modelscope.cn", "hf": "huggingface.co"}
REQUIRED_FILES = ("config.yaml", "model.pt", "tokens.txt")


class ModelLoadError(RuntimeError):
    """The model cannot be loaded; the message says what to do about it."""


def missing_files(directory: str | Path) -> list[str]:
    return [name for name in REQUIRED_FILES if not (Path(directory) / name).is_file()]


def _default_hub(model_id: str) -> str:
    return "hf" if model_id.startswith("emotion2vec/") else "ms"


def _hub_repo(model_id: str, hub: str) -> str:
    if hub == "hf" and model_id.startswith("iic/"):
        return "emotion2vec/" + model_id.split("/", 1)[1]
    return model_id


def reachable(host: str, timeout_s: float = 3.0) -> bool:
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


def _checked_dir(directory: Path) -> Path:
    missing = missing_files(directory)
    if missing:
        raise ModelLoadError(
            f"{directory} is not an emotion2vec checkpoint: missing {', '.join(missing)} "
            "(it needs config.yaml, model.pt and tokens.txt)"
        )
    return directory


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
    if not reachable(HUBS[hub]):
        raise ModelLoadError(
            f"model {repo} is not in the local cache and {HUBS[hub]} cannot be reached. "
            f"On a machine with network run `voxaffect download {source} --hub {hub} DIR` "
            f"(or `modelscope download --model {DEFAULT_MODEL} --local_dir DIR`), "
            "copy DIR here and pass --model DIR."
        )
    log.info("downloading %s from %s (first use; cached afterwards)", repo, HUBS[hub])
    try:
        return _checked_dir(Path(_snapshot(repo, hub, local_only=False)))
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"downloading {repo} from {HUBS[hub]} failed: {exc}") from exc


def load_state(path: Path, *, trusted: bool = False) -> dict[str, torch.Tensor]:
    """model.pt's tensors. Without ``trusted`` only tensors are unpickled (torch's safe mode)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=not trusted, mmap=True)
    except pickle.UnpicklingError as exc:
        raise ModelLoadError(
            f"{path} holds more than tensors, which torch refuses to unpickle by default. "
            "If you trust this file, load it again with --trust-checkpoint "
            "(VOXAFFECT_TRUST_CHECKPOINT=1)."
        ) from exc
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ModelLoadError(f"{path} does not hold a state dict")
    return state
