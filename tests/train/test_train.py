"""The training engine end to end on the built-in task: every loss trains, DPO learns the task,
a stopped run resumes exactly."""

from __future__ import annotations

import math

import pytest

from raypo.losses import LOSSES
from raypo.train.config import load_config
from raypo.train.loop import train
from raypo.train.setup import prepare
from tests.train.own_data import own_data

SMALL = ["task.train_pairs=64", "task.eval_pairs=16", "task.base_steps=50", "batch_size=8",
         "eval_samples=8"]

LOSS_CONFIGS = [[f"loss={name}"] for name in sorted(LOSSES)] + [
    ["loss=kernel_dpo", "loss.divergence=js"],
    ["loss=kernel_dpo", "loss.divergence=wasserstein"],
    ["loss=kernel_dpo", "loss.kernel=mahalanobis", "embedding_source=reference"],
    ["loss=mi_dpo", "loss.prior=sparsepo"],
    ["loss=mi_dpo", "loss.prior=learnable"],
    ["loss=dpo", "beta_schedule=cosine"],
    # WPO (log sum_v p_v^2 from the policy's forward) and LD-DPO (cached reference per-token
    # log-probs); a mixture with both, a beta schedule and an adaptive term
    ["loss=dpo", "loss.use_weighting=true", "loss.ld_alpha=0.5"],
    ["loss=mixture", "beta_schedule=linear",
     'loss.terms=[{name: epsilon_dpo, weight: 1, use_weighting: true}, '
     '{name: aot, weight: 0.5, ld_alpha: 0.3}, {name: sft, weight: 1}]'],
]


@pytest.mark.parametrize("overrides", LOSS_CONFIGS, ids=lambda o: " ".join(o))
def test_every_loss_trains_on_the_builtin_task(overrides):
    cfg = load_config(None, [*SMALL, "steps=3", "eval_every=3", *overrides])
    metrics = train(prepare(cfg, log=lambda m: None))
    for key in ("pref_accuracy", "reward_margin", "true_reward", "kl", "tokens_per_s",
                "eval_loss"):
        assert math.isfinite(metrics[key]), (key, metrics)
    assert metrics["steps"] == 3
    # HT-SR by default over the blocks' matrices: 3 blocks of 7 in the tiny model
    assert metrics["htsr_cover"] == "layers" and metrics["htsr_matrices"] == 21


def test_stopped_run_resumes_from_its_checkpoint(tmp_path):
    common = [*SMALL, "eval_every=2", "checkpoint_every=2", "loss=beta_dpo"]
    straight = train(prepare(load_config(None, [*common, "steps=6"]), log=lambda m: None))
    ckpt = tmp_path / "ckpt"
    first = load_config(None, [*common, "steps=4"])
    train(prepare(first, log=lambda m: None), checkpoint_dir=ckpt)  # "stopped" after step 4
    resumed = train(prepare(load_config(None, [*common, "steps=6"]), log=lambda m: None),
                    checkpoint_dir=ckpt)
    assert resumed["steps"] == 6
    for key in ("train_loss", "eval_loss", "pref_accuracy", "current_beta", "margin_ema"):
        assert resumed[key] == pytest.approx(straight[key], rel=1e-5, abs=1e-7), key


@pytest.mark.timeout(120)
def test_a_lora_checkpoint_holds_the_adapter_not_the_frozen_base_and_restores_it():
    pytest.importorskip("peft")
    import torch

    from raypo.models.load import load_policy
    from raypo.models.tiny import tiny_tokenizer
    from raypo.train.parallel import load_model_state, model_state

    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}
    policy = load_policy(None, tokenizer=tiny_tokenizer(), seed=1, lora=lora)
    saved = {k: v.clone() for k, v in model_state(policy, policy).items()}
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert set(saved) == trainable and all("lora_" in n for n in saved)
    frozen = sum(p.numel() for p in policy.parameters() if not p.requires_grad)
    assert sum(t.numel() for t in saved.values()) < frozen / 4
    base = {n: p.clone() for n, p in policy.named_parameters() if not p.requires_grad}
    with torch.no_grad():  # training moves the adapters; the checkpoint brings them back
        for p in policy.parameters():
            if p.requires_grad:
                p.add_(1.0)
    load_model_state(policy, policy, saved)
    for name, p in policy.named_parameters():
        expected = saved[name] if p.requires_grad else base[name]
        assert torch.equal(p, expected), name


@pytest.mark.timeout(120)
def test_lora_on_the_builtin_task_trains_the_adapters_of_the_fitted_base(tmp_path):
    """`lora:` on the built-in task wraps the fitted base model (it was silently full
    fine-tuning): only the adapters train, the weights under them are the fitted base's, and
    the checkpoint holds the adapters."""
    pytest.importorskip("peft")
    import torch

    from raypo.train import checkpoint

    base = prepare(load_config(None, [*SMALL, "steps=2"]), log=lambda m: None).policy
    setup = prepare(load_config(None, [*SMALL, "steps=2", "eval_every=2",
                                       "lora={r: 4, alpha: 8, target_modules: all-linear}"]),
                    log=lambda m: None)
    trained = {n for n, p in setup.policy.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    frozen = {n.replace("base_model.model.", "").replace(".base_layer", ""): p
              for n, p in setup.policy.named_parameters() if not p.requires_grad}
    for name, weight in base.named_parameters():  # the fitted base under the adapters
        assert torch.equal(frozen[name], weight), name
    metrics = train(setup, checkpoint_dir=tmp_path)
    assert math.isfinite(metrics["train_loss"]) and metrics["steps"] == 2
    assert set(checkpoint.load(tmp_path)["policy"]) == trained


def test_a_lora_runs_reference_samples_are_the_fitted_bases_not_the_trained_policys():
    """The reference of a LoRA policy is the policy with its adapters off, for sampling too:
    its true reward is the one a frozen copy of the fitted base gives (same prompts, same
    seed), however far the adapters have moved by the first evaluation."""
    pytest.importorskip("peft")
    common = [*SMALL, "steps=3", "eval_every=3", "lr=0.05", "htsr=off"]
    plain = train(prepare(load_config(None, common), log=lambda m: None))
    lora = train(prepare(load_config(None, [*common, "lora={r: 8, alpha: 16, target_modules: "
                                                     "all-linear}"]), log=lambda m: None))
    assert lora["true_reward"] != pytest.approx(lora["ref_true_reward"])  # the policy moved
    assert lora["ref_true_reward"] == pytest.approx(plain["ref_true_reward"], abs=1e-12)


@pytest.mark.slow
def test_dpo_learns_the_graded_task():
    cfg = load_config("search_spaces/builtin_dpo.yaml")
    metrics = train(prepare(cfg, log=lambda m: None))
    assert metrics["pref_accuracy"] > 0.8
    assert metrics["true_reward"] > metrics["ref_true_reward"]


def test_own_data_and_model_train_and_evaluate(tmp_path):
    """A local model folder and a JSONL of pairs (no built-in task: no sampling, held-out
    accuracy only), through the same reference precompute and loop; `htsr: off` reports no
    HT-SR values."""
    cfg = load_config(None, [*own_data(tmp_path), "steps=2", "eval_every=2"])
    metrics = train(prepare(cfg, log=lambda m: None))
    assert metrics["steps"] == 2
    assert math.isfinite(metrics["eval_loss"]) and "true_reward" not in metrics
    assert not [k for k in metrics if k.startswith("htsr")]  # htsr: off computes nothing
