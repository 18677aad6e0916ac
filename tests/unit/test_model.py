from __future__ import annotations

import argparse
import shutil
import time

import numpy as np
import pytest
import torch

from engine.checkpoint import PLUS_TOKENS, write_random_checkpoint
from engine.funasr_compat import english_label
from engine.hub import ModelLoadError
from engine.model import load_model
from tests import LABELS
from tests.support.speech import speech

pytestmark = pytest.mark.unit


def windows(n: int = 3, seconds: float = 2.0) -> np.ndarray:
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((n, int(seconds * 16000))) * 0.1).astype(np.float32)
    s = speech()[: x.shape[1]]
    x[0, : s.size] = s
    return x


def test_labels_are_the_nine_english_names(tiny_model):
    assert tiny_model.labels == LABELS
    assert [english_label(t) for t in PLUS_TOKENS] == list(LABELS)


def test_batched_predict_matches_funasr_generate_per_window(tiny_model, funasr_generate):
    x = windows(4)
    batch = tiny_model.predict(x).probs
    for i in range(x.shape[0]):
        labels, ref = funasr_generate(x[i])
        assert [english_label(t) for t in labels] == list(LABELS)
        assert np.abs(batch[i] - ref).max() < 1e-4
    np.testing.assert_allclose(batch.sum(axis=1), 1.0, atol=1e-5)


def test_a_window_gives_the_same_answer_alone_or_in_a_batch(tiny_model):
    x = windows(3)
    alone = tiny_model.predict(x[1:2]).probs[0]
    np.testing.assert_allclose(tiny_model.predict(x).probs[1], alone, atol=1e-6)


def test_short_tail_windows_work_and_embeddings_are_optional(tiny_model):
    x = windows(2, seconds=0.7)
    p = tiny_model.predict(x, embeddings=True)
    assert p.probs.shape == (2, 9)
    assert p.embeddings is not None and p.embeddings.shape == (2, 64)
    assert tiny_model.predict(x).embeddings is None


@pytest.mark.parametrize("dtype", ["fp32", "int8"])
def test_the_traced_pass_gives_the_eager_numbers_and_other_shapes_stay_eager(tiny_model, dtype):
    model = tiny_model.converted(dtype)  # a copy: the shared fixture stays eager
    x = windows(3)
    short = windows(1, seconds=0.7)
    eager = {n: model.predict(x[:n], embeddings=True) for n in (1, 2, 3)}
    eager_short = model.predict(short).probs
    assert model.trace([1, 2], x.shape[1]) == [(1, x.shape[1]), (2, x.shape[1])]
    for n in (1, 2, 3):  # 3 was not traced: eager, as before
        got = model.predict(x[:n], embeddings=True)
        np.testing.assert_array_equal(got.probs, eager[n].probs)
        np.testing.assert_array_equal(got.embeddings, eager[n].embeddings)
    np.testing.assert_array_equal(model.predict(short).probs, eager_short)


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "int8"])
def test_reduced_precision_stays_close_to_fp32(tiny_model_dir, tiny_model, dtype):
    """Every dtype runs on every CPU (slowly where it has no native support): its numbers are
    checked everywhere; which one is fastest is measured at start (engine/tuning.py)."""
    model = load_model(str(tiny_model_dir), device="cpu", dtype=dtype, threads=2)
    x = windows(3)
    drift = np.abs(model.predict(x).probs - tiny_model.predict(x).probs).max()
    assert drift < 0.01
    assert model.describe()["dtype"] == dtype


def test_bad_inputs_are_refused(tiny_model):
    with pytest.raises(ValueError, match="at least"):
        tiny_model.predict(np.zeros((1, 100), np.float32))
    with pytest.raises(ValueError, match="batch, samples"):
        tiny_model.predict(np.zeros((0, 32000), np.float32))


def test_random_weights_are_declared(tiny_model):
    assert tiny_model.describe()["random_weights"] is True


def test_a_converted_copy_leaves_the_fp32_model_as_it_was(tiny_model):
    x = windows(2)
    before = tiny_model.predict(x).probs
    int8 = tiny_model.converted("int8")
    assert int8.dtype == "int8" and tiny_model.dtype == "fp32"
    np.testing.assert_array_equal(tiny_model.predict(x).probs, before)
    assert np.abs(int8.predict(x).probs - before).max() < 0.01


def test_a_pickled_checkpoint_is_refused_unless_trusted(tmp_path, tiny_model_dir):
    d = tmp_path / "ckpt"
    shutil.copytree(tiny_model_dir, d)
    state = torch.load(d / "model.pt", weights_only=True)
    # fairseq-style: the training arguments pickled beside the weights
    torch.save({"model": state, "args": argparse.Namespace(lr=0.1)}, d / "model.pt")
    with pytest.raises(ModelLoadError, match="trust"):
        load_model(str(d), device="cpu")
    trusted = load_model(str(d), device="cpu", trusted=True)
    assert trusted.labels == LABELS


@pytest.mark.parametrize("missing", ["model.pt", "tokens.txt", "config.yaml"])
def test_an_incomplete_directory_fails_clearly(tmp_path, tiny_model_dir, missing):
    d = tmp_path / "ckpt"
    shutil.copytree(tiny_model_dir, d)
    (d / missing).unlink()
    with pytest.raises(ModelLoadError, match=f"missing {missing}"):
        load_model(str(d), device="cpu")


def test_weights_that_do_not_fit_the_config_fail(tmp_path, tiny_model_dir):
    d = tmp_path / "ckpt"
    shutil.copytree(tiny_model_dir, d)
    state = torch.load(d / "model.pt", weights_only=True)
    del state["d2v_model.blocks.1.mlp.fc2.weight"]
    torch.save(state, d / "model.pt")
    with pytest.raises(ModelLoadError, match="lacks 1 of the model's weights"):
        load_model(str(d), device="cpu")


def test_a_hub_id_offline_fails_fast_with_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "ms"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr("engine.hub.reachable", lambda host, timeout_s=3.0: False)
    started = time.monotonic()
    with pytest.raises(ModelLoadError, match=r"cannot be reached.*--model DIR"):
        load_model("iic/emotion2vec_plus_large", device="cpu")
    assert time.monotonic() - started < 60  # a download attempt would wait minutes


def test_impossible_device_and_dtype_choices_fail(tiny_model_dir):
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="no CUDA"):
            load_model(str(tiny_model_dir), device="cuda")
    with pytest.raises(ModelLoadError, match="dtype must be"):
        load_model(str(tiny_model_dir), dtype="fp8")


def test_random_checkpoint_sizes(tmp_path):
    from engine.checkpoint import model_config

    large = model_config("large")["model_conf"]
    assert (large["embed_dim"], large["num_heads"], large["depth"]) == (1024, 16, 8)
    assert large["modalities"]["audio"]["prenet_depth"] == 4
    with pytest.raises(ValueError):
        write_random_checkpoint(tmp_path / "x", "huge")
