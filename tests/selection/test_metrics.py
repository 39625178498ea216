"""Selection metrics against facts computed independently: hand-computed kernel margins,
moments of known distributions, coverage and entropy of distributions whose values are known,
and the whole path (reference model -> metrics -> ranking) on the tiny built-in task, from
Python and from `raypo metrics`."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from raypo.cli import app
from raypo.losses import TopKLogits, divergence_candidates, kernel_candidates
from raypo.selection.metrics import (
    aligned_logratios,
    distribution_drift,
    divergence_metrics,
    kernel_metrics,
    kurtosis,
    penalty_strength,
    tail_mass,
    topk_coverage,
    topk_entropy,
)

# The metrics need a reference model, not a good one: two base-model steps keep the fit (once
# per session, cached) to about a second, where the 50 steps of the training tests take ten.
SMALL_TASK = {"train_pairs": 64, "eval_pairs": 16, "base_steps": 2}
SMALL_SET = ["--set", "task.train_pairs=64", "--set", "task.eval_pairs=16",
             "--set", "task.base_steps=2"]


# ----------------------------------------------------------------------------- kernels


def _orthogonal_triplets(n: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """chosen = prompt, rejected orthogonal to the prompt: every kernel prefers the chosen
    (RBF, spectral, Mahalanobis: distance 0 against > 0; polynomial: (|x|^2 + 1)^2 against 1)."""
    g = torch.Generator().manual_seed(0)
    prompt = torch.randn(n, 2, generator=g) + torch.tensor([3.0, 0.0])
    rejected = 2.0 * torch.stack([-prompt[:, 1], prompt[:, 0]], dim=1)
    return prompt, prompt.clone(), rejected


def test_every_kernel_orders_constructed_triplets_with_accuracy_one():
    prompt, chosen, rejected = _orthogonal_triplets()
    metrics = kernel_metrics(prompt, chosen, rejected)
    assert tuple(metrics) == kernel_candidates()
    for name, m in metrics.items():
        assert m["accuracy"] == 1.0, name
        assert m["margin_mean"] > 0 and m["snr"] > 0, name
    swapped = kernel_metrics(prompt, rejected, chosen)
    assert all(m["accuracy"] == 0.0 and m["snr"] < 0 for m in swapped.values())


def test_identical_responses_score_chance_accuracy_and_zero_snr():
    prompt, chosen, _ = _orthogonal_triplets()
    m = kernel_metrics(prompt, chosen, chosen.clone(), names=("rbf",))["rbf"]
    assert m == {"margin_mean": 0.0, "margin_std": 0.0, "accuracy": 0.5, "snr": 0.0}


def test_rbf_log_kernel_margin_matches_hand_computation_on_2d_points():
    # sigma 2: log K = -|a - b|^2 / 8.
    # triplet 1: |x - w|^2 = 1, |x - l|^2 = 4 -> margin -1/8 + 4/8 = 0.375
    # triplet 2: |x - w|^2 = 9, |x - l|^2 = 1 -> margin -9/8 + 1/8 = -1.0
    prompt = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    chosen = torch.tensor([[1.0, 0.0], [1.0, 4.0]])
    rejected = torch.tensor([[0.0, 2.0], [2.0, 1.0]])
    m = kernel_metrics(prompt, chosen, rejected, names=("rbf",),
                       params={"rbf": {"sigma": 2.0}})["rbf"]
    assert m["margin_mean"] == pytest.approx((0.375 - 1.0) / 2)
    assert m["margin_std"] == pytest.approx(0.6875)
    assert m["accuracy"] == 0.5
    assert m["snr"] == pytest.approx(-0.3125 / 0.6875)


def test_kernel_metrics_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="three"):
        kernel_metrics(torch.zeros(4, 2), torch.zeros(4, 3), torch.zeros(4, 2))


# ----------------------------------------------------------------------------- moments


def test_kurtosis_is_three_for_a_gaussian_and_larger_for_heavy_tails():
    rng = np.random.default_rng(0)
    n = 200_000
    assert kurtosis(torch.from_numpy(rng.standard_normal(n))) == pytest.approx(3.0, abs=0.06)
    assert kurtosis(torch.from_numpy(rng.uniform(size=n))) == pytest.approx(1.8, abs=0.02)
    assert kurtosis(torch.from_numpy(rng.laplace(size=n))) == pytest.approx(6.0, abs=0.3)
    assert kurtosis(torch.from_numpy(rng.standard_t(5, size=n))) > 6.0  # 9 in theory
    assert math.isnan(kurtosis(torch.ones(10)))


def test_tail_mass_beyond_three_robust_sigmas():
    rng = np.random.default_rng(1)
    n = 200_000
    gaussian = tail_mass(torch.from_numpy(rng.standard_normal(n)))
    assert gaussian == pytest.approx(2 * (1 - 0.99865), abs=0.0006)  # 2 (1 - Phi(3))
    laplace = tail_mass(torch.from_numpy(rng.laplace(size=n)))
    assert laplace == pytest.approx(math.exp(-3 * 1.4826 * math.log(2)), abs=0.003)


# ----------------------------------------------------------------------------- distributions


def test_topk_coverage_is_one_when_k_is_the_vocabulary():
    logits = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(topk_coverage(TopKLogits.from_logits(logits, 7)),
                          torch.ones(5, dtype=torch.float64))


def test_topk_coverage_sums_the_kept_probabilities():
    logits = torch.tensor([[0.5, 0.3, 0.2]]).log()
    top2 = TopKLogits.from_logits(logits, 2)
    assert topk_coverage(top2).item() == pytest.approx(0.8)
    assert topk_coverage(top2, k=1).item() == pytest.approx(0.5)
    # an unnormalised cache: values are logits, the log_normalizer makes them probabilities
    raw = TopKLogits(torch.tensor([[3.0]]), torch.tensor([[0]]), torch.tensor([math.log(40.0)]))
    assert topk_coverage(raw).item() == pytest.approx(math.exp(3.0) / 40.0)


def test_entropy_of_a_uniform_distribution_is_one_with_or_without_truncation():
    uniform = torch.zeros(3, 10)
    assert torch.allclose(topk_entropy(TopKLogits.from_logits(uniform, 10), 10),
                          torch.ones(3, dtype=torch.float64))
    # the rest mass spread evenly over the unseen tokens is exactly what the uniform has
    assert torch.allclose(topk_entropy(TopKLogits.from_logits(uniform, 4), 10),
                          torch.ones(3, dtype=torch.float64))
    peaked = torch.tensor([[50.0, 0.0, 0.0, 0.0]])
    assert topk_entropy(TopKLogits.from_logits(peaked, 4), 4).item() < 1e-15


def test_drift_is_zero_for_equal_distributions_and_one_for_disjoint_supports():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, generator=g)
    same = TopKLogits.from_logits(logits, 3)
    assert distribution_drift(same, same, 5) == pytest.approx(0.0, abs=1e-12)
    on_0 = TopKLogits.from_logits(torch.tensor([[60.0, 0, 0, 0], [60.0, 0, 0, 0]]), 4)
    on_1 = TopKLogits.from_logits(torch.tensor([[0, 60.0, 0, 0]]), 4)
    assert distribution_drift(on_0, on_1, 4) == pytest.approx(1.0, abs=1e-6)


def test_aligned_logratios_pairs_positions_up_to_the_shorter_response():
    chosen = torch.tensor([-1.0, -2.0, -3.0, -4.0, -5.0])  # pair 0: 2 tokens, pair 1: 3
    rejected = torch.tensor([-0.5, -0.5, -0.5, -9.0])  # pair 0: 3 tokens, pair 1: 1
    d = aligned_logratios(chosen, torch.tensor([2, 3]), rejected, torch.tensor([3, 1]))
    assert d.tolist() == [-0.5, -1.5, -3.0 + 9.0]
    with pytest.raises(ValueError, match="lengths"):
        aligned_logratios(chosen, torch.tensor([2, 2]), rejected, torch.tensor([3, 1]))


def test_penalty_strength_is_the_divergence_of_a_tempered_reference_by_hand():
    q = np.array([0.5, 0.3])  # the kept tokens; 0.2 of mass outside them
    topk = TopKLogits(torch.tensor([np.log(q)]), torch.tensor([[0, 1]]), torch.zeros(1))
    bins = np.array([0.5, 0.3, 0.2])
    expected = []
    for t in (0.8, 1.25):
        p = bins ** (1 / t) / (bins ** (1 / t)).sum()
        expected.append(float(np.sum(p * np.log(p / bins))))
    assert penalty_strength("kl", topk) == pytest.approx(np.mean(expected), rel=1e-6)
    uniform = TopKLogits(torch.full((1, 3), np.log(0.25)), torch.tensor([[0, 1, 2]]),
                         torch.zeros(1))  # 4 equal bins: tempering leaves them equal
    for name in divergence_candidates():
        assert penalty_strength(name, uniform) == pytest.approx(0.0, abs=1e-6), name


def test_divergence_metrics_give_wasserstein_the_coverage_of_its_top_8():
    g = torch.Generator().manual_seed(0)
    vocab, k = 40, 16
    logits = torch.randn(12, vocab, generator=g)
    chosen, rejected = TopKLogits.from_logits(logits[:5], k), TopKLogits.from_logits(logits[5:], k)
    lengths_w, lengths_l = torch.tensor([2, 3]), torch.tensor([4, 3])
    token_w = torch.randn(5, generator=g)
    token_l = torch.randn(7, generator=g)
    metrics = divergence_metrics(chosen_token_logps=token_w, chosen_lengths=lengths_w,
                                 rejected_token_logps=token_l, rejected_lengths=lengths_l,
                                 chosen_topk=chosen, rejected_topk=rejected, vocab_size=vocab)
    assert tuple(metrics) == divergence_candidates()
    both = torch.cat([logits.softmax(-1).topk(k).values])
    assert metrics["kl"]["coverage"] == pytest.approx(float(both.sum(-1).mean()), rel=1e-5)
    top8 = float(both[:, :8].sum(-1).mean())
    assert metrics["wasserstein"]["coverage"] == pytest.approx(top8, rel=1e-5)
    for name in divergence_candidates():
        assert metrics[name]["drift"] == metrics["kl"]["drift"]
        assert all(math.isfinite(v) for v in metrics[name].values())


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def builtin_table():
    from raypo.search.evidence import selection_table
    from raypo.train.config import TrainConfig

    cfg = TrainConfig(task=SMALL_TASK)
    messages: list[str] = []
    table = selection_table(cfg, max_pairs=48, log=messages.append)
    return cfg, table


def test_selection_table_on_the_builtin_task_ranks_every_pair_with_finite_scores(builtin_table):
    _, table = builtin_table
    pairs = len(kernel_candidates()) * len(divergence_candidates())
    assert len(table) == pairs
    assert list(table["predicted_rank"]) == list(range(1, pairs + 1))
    assert set(zip(table["kernel"], table["divergence"], strict=True)) == {
        (k, d) for k in kernel_candidates() for d in divergence_candidates()}
    assert np.isfinite(table["score"]).all()
    assert table["score"].is_monotonic_decreasing
    for column in ("kernel_accuracy", "kernel_snr", "divergence_coverage",
                   "divergence_kurtosis", "divergence_drift", "divergence_entropy"):
        assert table[column].dtype == float and np.isfinite(table[column]).all(), column
    assert (table["model"] == "builtin:tiny").all() and (table["data"] == "builtin:graded").all()
    assert (table["metric_pairs"] == 48).all()


def test_selection_table_reads_the_reference_outputs_from_cache_the_second_time(builtin_table):
    from raypo.search.evidence import selection_table

    cfg, first = builtin_table
    messages: list[str] = []
    again = selection_table(cfg, max_pairs=48, log=messages.append)
    assert any("read from cache" in m for m in messages), messages
    assert again.drop(columns=["model", "data"]).equals(first.drop(columns=["model", "data"]))


def test_cli_metrics_json_prints_one_row_per_pair(builtin_table):
    result = CliRunner().invoke(app, ["metrics", *SMALL_SET, "--max-pairs", "48", "--json"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    rows = json.loads(lines[-1])
    pairs = len(kernel_candidates()) * len(divergence_candidates())
    assert isinstance(rows, list) and len(rows) == pairs
    assert [r["predicted_rank"] for r in rows] == list(range(1, pairs + 1))
    assert {"kernel", "divergence", "score", "kernel_accuracy", "divergence_kurtosis"} <= set(
        rows[0])
    assert "ranking (1 = predicted best;" in result.stdout  # the readable table comes first
    _, table = builtin_table
    assert [r["kernel"] + "/" + r["divergence"] for r in rows] == list(
        table["kernel"] + "/" + table["divergence"])


def test_cli_metrics_with_missing_data_exits_nonzero_naming_the_path(tmp_path):
    missing = tmp_path / "nonexistent"
    result = CliRunner().invoke(app, ["metrics", "--data", str(missing)])
    assert result.exit_code != 0
    assert str(missing) in result.output


def test_cli_metrics_with_a_model_that_cannot_load_names_it(tmp_path):
    data = tmp_path / "prefs.jsonl"
    data.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n")
    missing = tmp_path / "no-model"
    result = CliRunner().invoke(app, ["metrics", "--model", str(missing), "--data", str(data)])
    assert result.exit_code != 0
    assert str(missing) in result.output


def test_cli_metrics_reads_a_config_and_ignores_search_ranges(tmp_path):
    from raypo.search.evidence import metrics_config

    space = tmp_path / "space.yaml"
    space.write_text("task: {train_pairs: 64, eval_pairs: 16}\ntopk: 8\n"
                     "loss: {name: kernel_dpo, kernel: {choice: [rbf, polynomial]}}\n"
                     "lr: {low: 0.0001, high: 0.01, log: true}\nbudget: {trials: 4}\n")
    cfg = metrics_config(space)
    assert cfg.task.train_pairs == 64 and cfg.topk == 8 and cfg.loss.name == "dpo"
    bad = tmp_path / "bad.yaml"
    bad.write_text("topk: 0\n")
    result = CliRunner().invoke(app, ["metrics", "--config", str(bad)])
    assert result.exit_code == 2 and "bad.yaml" in result.output and "topk" in result.output
