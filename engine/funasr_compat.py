"""FunASR's quirks, kept in one place: its import, its logging, and building emotion2vec from a
checkpoint directory without letting FunASR touch the weights.

``import funasr`` prints to stdout, logs on the root logger and calls ``logging.basicConfig``;
``quiet_funasr`` keeps the host's logging as it was. ``build_module`` hands config.yaml to
FunASR's own ``AutoModel`` with ``model_conf`` given, which builds the architecture through
FunASR's registry but skips its hub lookup and its weight loading: FunASR loads weights with a
plain ``torch.load`` (refused for pickles by torch >= 2.6) and, when model.pt is missing, leaves
random weights in place without an error. The caller loads the weights itself (``model.py``).
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

CHECKPOINT_PREFIX = "d2v_model."  # emotion2vec's model.pt keys start with this (config scope_map)


@contextlib.contextmanager
def quiet_funasr() -> Iterator[None]:
    """Keep FunASR's prints, chatter and ``basicConfig(INFO)`` out of the host's logging."""
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
    with quiet_funasr():
        import funasr
        import funasr.models.emotion2vec.model  # noqa: F401  (registers Emotion2vec)


def english_label(token: str) -> str:
    """'生气/angry' -> 'angry'; '<unk>' -> 'unknown'."""
    if token == "<unk>":
        return "unknown"
    return token.rsplit("/", 1)[-1].strip()


def emotion2vec_class() -> Any:
    """FunASR's registered Emotion2vec module class."""
    import_funasr()
    from funasr.register import tables

    return tables.model_classes.get("Emotion2vec")


def build_module(directory: Path, *, device: str, threads: int) -> tuple[Any, list[str]]:
    """The untrained architecture config.yaml describes, built by FunASR, and its tokens."""
    import_funasr()
    from funasr import AutoModel

    config = yaml.safe_load((directory / "config.yaml").read_text())
    tokenizer_conf = dict(config.get("tokenizer_conf") or {})
    tokenizer_conf["token_list"] = str(directory / "tokens.txt")
    with quiet_funasr():
        auto = AutoModel(
            **{**config, "tokenizer_conf": tokenizer_conf},
            model_path=str(directory),
            device=device,
            ncpu=threads,
            disable_update=True,
            disable_log=True,
            disable_pbar=True,
            log_level="ERROR",
        )
    return auto.model, list(auto.kwargs.get("token_list") or [])


def strip_prefix(key: str) -> str:
    for prefix in (CHECKPOINT_PREFIX, "module."):
        key = key.removeprefix(prefix)
    return key
