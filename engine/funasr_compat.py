"""FunASR's quirks, kept in one place: its import, its logging, and building emotion2vec from a
checkpoint directory without letting FunASR touch the weights.

``import funasr`` prints to stdout, logs on the root logger and calls ``logging.basicConfig``;
``quiet_funasr`` keeps the host's logging as it was. ``build_module`` hands config.yaml to
FunASR's own ``AutoModel`` with ``model_conf`` given, which builds the architecture through
FunASR's registry but skips its hub lookup and its weight loading: FunASR loads weights with a
plain ``torch.load`` (refused for pickles by torch >= 2.6) and, when model.pt is missing, leaves
random weights in place without an error. The caller loads the weights itself (``model.py``).

``import funasr`` also imports every module FunASR has — all its models and what they need
(scikit-learn, transformers, pandas, torch.distributed ...): 6 s of CPU and most of a 12 s server
start here. Building emotion2vec needs its registry, ``AutoModel`` and the classes config.yaml
names, so ``import_for`` imports those alone (2 s) and completes the package's own import only
when config.yaml names a class they did not register.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import logging
import sys
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


# (config.yaml key, its value) -> the module that registers that class
REGISTERING_MODULES = {
    ("model", "Emotion2vec"): "funasr.models.emotion2vec.model",
    ("tokenizer", "CharTokenizer"): "funasr.tokenizer.char_tokenizer",
}
# config.yaml key -> the registry table AutoModel looks its value up in
CONFIG_TABLES = {
    "model": "model_classes",
    "tokenizer": "tokenizer_classes",
    "frontend": "frontend_classes",
}
_PARTIAL = "_imported_in_part"  # set on the funasr package while its __init__ has not run


def import_funasr() -> None:
    """FunASR as its users import it: the package's ``__init__``, which imports every module."""
    with quiet_funasr():
        package = sys.modules.get("funasr")
        if package is not None and getattr(package, _PARTIAL, False):
            package.__spec__.loader.exec_module(package)  # type: ignore[union-attr]
            setattr(package, _PARTIAL, False)
        import funasr
        import funasr.models.emotion2vec.model  # noqa: F401  (registers Emotion2vec)


def import_for(config: dict[str, Any]) -> None:
    """What ``AutoModel`` needs to build ``config``: FunASR's package without its ``__init__``
    (which would import every module), the modules that register the classes ``config``
    names, and ``AutoModel``'s own module. A class they do not register: the full import."""
    with quiet_funasr():
        if "funasr" not in sys.modules:
            spec = importlib.util.find_spec("funasr")
            if spec is None or spec.loader is None or not spec.submodule_search_locations:
                raise ModuleNotFoundError("FunASR is not installed", name="funasr")
            package = importlib.util.module_from_spec(spec)
            version = Path(spec.submodule_search_locations[0]) / "version.txt"
            package.__version__ = version.read_text().strip()  # type: ignore[attr-defined]
            setattr(package, _PARTIAL, True)
            sys.modules["funasr"] = package
        try:
            for (key, name), module in REGISTERING_MODULES.items():
                if config.get(key) == name:
                    importlib.import_module(module)
            importlib.import_module("funasr.auto.auto_model")
        except ImportError:  # a FunASR laid out otherwise: as its users import it
            import_funasr()
    from funasr.register import tables

    named = [(t, config[k]) for k, t in CONFIG_TABLES.items() if config.get(k)]
    if any(getattr(tables, t).get(name) is None for t, name in named):
        import_funasr()


def english_label(token: str) -> str:
    """'生气/angry' -> 'angry'; '<unk>' -> 'unknown'."""
    if token == "<unk>":
        return "unknown"
    return token.rsplit("/", 1)[-1].strip()


def emotion2vec_class() -> Any:
    """FunASR's registered Emotion2vec module class."""
    import_for({"model": "Emotion2vec"})
    from funasr.register import tables

    return tables.model_classes.get("Emotion2vec")


def build_module(directory: Path, *, device: str, threads: int) -> tuple[Any, list[str]]:
    """The untrained architecture config.yaml describes, built by FunASR, and its tokens."""
    config = yaml.safe_load((directory / "config.yaml").read_text())
    import_for(config)
    from funasr.auto.auto_model import AutoModel

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
