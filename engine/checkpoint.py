"""Write and check emotion2vec checkpoint directories (config.yaml, model.pt, tokens.txt).

``write_random_checkpoint`` builds a random-weight checkpoint of the real FunASR architecture —
``large`` is the emotion2vec_plus_large shape (12 transformer blocks of width 1024, 16 heads),
``tiny`` a few small layers for tests. It marks the directory with ``RANDOM_WEIGHTS_MARKER`` so
every output made with it can say that it comes from random weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from engine.funasr_compat import CHECKPOINT_PREFIX, emotion2vec_class

RANDOM_WEIGHTS_MARKER = "voxaffect_random_weights.json"

# tokens.txt of emotion2vec_plus_large: Chinese/English pairs, then <unk>.
PLUS_TOKENS = (
    "生气/angry",
    "厌恶/disgusted",
    "恐惧/fearful",
    "开心/happy",
    "中立/neutral",
    "其他/other",
    "难过/sad",
    "吃惊/surprised",
    "<unk>",
)

_SIZES: dict[str, dict[str, Any]] = {
    "large": {"embed_dim": 1024, "num_heads": 16, "depth": 8, "prenet_depth": 4, "conv_dim": 512},
    "tiny": {"embed_dim": 64, "num_heads": 4, "depth": 2, "prenet_depth": 1, "conv_dim": 32},
}


def model_config(size: str) -> dict[str, Any]:
    """The config.yaml content FunASR builds an Emotion2vec of this size from."""
    if size not in _SIZES:
        raise ValueError(f"size must be one of {', '.join(_SIZES)}, got {size!r}")
    s = _SIZES[size]
    c = s["conv_dim"]
    conv_spec = f"[({c}, 10, 5)] + [({c}, 3, 2)] * 4 + [({c}, 2, 2)] * 2"
    audio = {
        "feature_encoder_spec": conv_spec,
        "extractor_mode": "layer_norm",
        "conv_pos_width": 95,
        "conv_pos_groups": 16,
        "conv_pos_depth": 5,
        "conv_pos_pre_ln": False,
        "prenet_depth": s["prenet_depth"],
        "prenet_layerdrop": 0.0,
        "prenet_dropout": 0.0,
        "model_depth": s["depth"],
        "num_extra_tokens": 10,
        "init_extra_token_zero": False,
        "use_alibi_encoder": True,
        "learned_alibi": False,
        "alibi_max_pos": None,
        "learned_alibi_scale": True,
        "learned_alibi_scale_per_head": True,
        "learned_alibi_scale_per_layer": True,
        "num_alibi_heads": s["num_heads"],
        "alibi_scale": 1.0,
        "local_grad_mult": 1.0,
        "start_drop_path_rate": 0.0,
        "end_drop_path_rate": 0.0,
        "decoder": None,
        "mask_prob": 0.5,
        "mask_prob_min": None,
        "mask_length": 5,
        "inverse_mask": False,
        "mask_noise_std": 0.01,
        "mask_dropout": 0.0,
        "add_masks": False,
        "keep_masked_pct": 0.0,
        "encoder_zero_mask": True,
    }
    return {
        "model": "Emotion2vec",
        "model_conf": {
            "loss_beta": 0.0,
            "loss_scale": None,
            "depth": s["depth"],
            "start_drop_path_rate": 0.0,
            "end_drop_path_rate": 0.0,
            "num_heads": s["num_heads"],
            "norm_eps": 1e-05,
            "norm_affine": True,
            "encoder_dropout": 0.1,
            "post_mlp_drop": 0.1,
            "attention_dropout": 0.1,
            "activation_dropout": 0.0,
            "dropout_input": 0.0,
            "layerdrop": 0.05,
            "embed_dim": s["embed_dim"],
            "mlp_ratio": 4.0,
            "layer_norm_first": False,
            "average_top_k_layers": 8,
            "end_of_block_targets": False,
            "clone_batch": 8,
            "normalize": True,
            "modalities": {"audio": audio},
        },
        "tokenizer": "CharTokenizer",
        "tokenizer_conf": {"unk_symbol": "<unk>", "split_with_space": True},
        "scope_map": [CHECKPOINT_PREFIX, "none"],
    }


def write_random_checkpoint(directory: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    """Write a random-weight checkpoint that FunASR's AutoModel loads like a downloaded one."""
    import torch

    config = model_config(size)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    module = emotion2vec_class()(model_conf=config["model_conf"], vocab_size=len(PLUS_TOKENS))
    state = {CHECKPOINT_PREFIX + k: v for k, v in module.state_dict().items()}
    torch.save(state, out / "model.pt")
    (out / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    (out / "tokens.txt").write_text("\n".join(PLUS_TOKENS) + "\n", encoding="utf-8")
    params = sum(p.numel() for p in module.parameters())
    marker = {"random_weights": True, "size": size, "seed": seed, "parameters": params}
    (out / RANDOM_WEIGHTS_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return out


def is_random_checkpoint(directory: str | Path) -> bool:
    return (Path(directory) / RANDOM_WEIGHTS_MARKER).exists()
