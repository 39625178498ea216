"""Own data without a model: the tiny model is first fitted to the data's responses (cached), and
that fitted model is the reference and the starting policy; `sft_steps: 0` keeps random
weights, with a warning."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from raypo.models.tiny import tiny_tokenizer
from raypo.train.config import ConfigError, load_config
from raypo.train.setup import prepare

WORDS = ("apple", "river", "stone", "cloud", "green", "quiet")


def write_pairs(path, n=80, seed=0):
    """Responses are a few words of a six-word vocabulary: text with structure to learn."""
    rng = random.Random(seed)

    def text():
        return " ".join(rng.choices(WORDS, k=rng.randint(2, 5)))

    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"say {i}:", "chosen": text(),
                                "rejected": text()}) + "\n")


def held_out_nll_per_token(setup) -> float:
    """The reference's mean negative log-likelihood per response token of the held-out pairs
    (which the fit never saw)."""
    ref = setup.ref_eval
    tokens = sum(int(ref.lengths[side].sum()) for side in ("chosen", "rejected"))
    return -float(ref.logps["chosen"].sum() + ref.logps["rejected"].sum()) / tokens


def test_own_data_without_a_model_fits_the_tiny_model_first_and_caches_it(tmp_path):
    data = tmp_path / "prefs.jsonl"
    write_pairs(data)
    common = [f"data={data}", "steps=1", "batch_size=8", "eval_fraction=0.2", "max_length=96",
              "max_prompt_length=32"]
    first, second, unfitted = [], [], []
    fitted = prepare(load_config(None, [*common, "sft_steps=60"]), log=first.append)
    assert any("fitting the tiny built-in model" in m for m in first), first
    again = prepare(load_config(None, [*common, "sft_steps=60"]), log=second.append)
    assert any("read from cache" in m for m in second), second
    assert not any("fitting" in m for m in second)
    for a, b in zip(fitted.policy.state_dict().values(), again.policy.state_dict().values(),
                    strict=True):
        assert torch.equal(a, b)

    random_start = prepare(load_config(None, [*common, "sft_steps=0"]), log=unfitted.append)
    assert any(m.startswith("warning: sft_steps: 0") for m in unfitted), unfitted
    # untrained weights give nearly uniform next-token distributions: log(vocabulary) per token
    vocabulary = len(tiny_tokenizer())
    assert held_out_nll_per_token(random_start) == pytest.approx(math.log(vocabulary), rel=0.05)
    # the fitted reference (and starting policy) has learned the responses' words
    assert held_out_nll_per_token(fitted) < 0.4 * held_out_nll_per_token(random_start)


def test_sft_steps_needs_own_data_and_no_model():
    with pytest.raises(ConfigError, match="sft_steps fits the tiny built-in model"):
        load_config(None, ["sft_steps=10"])  # the built-in task: task.base_steps
    with pytest.raises(ConfigError, match="sft_steps"):
        load_config(None, ["sft_steps=10", "data=x.jsonl", "model=some/model"])
