"""The selection rule: a deterministic permutation of 1..28 that moves in the documented
direction when one metric changes."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from raypo.losses import divergence_candidates, kernel_candidates
from raypo.selection.rule import rank_pairs, tail_heaviness

LIGHT_TAILS = {"kurtosis": 3.0, "tail_mass": 0.0027}  # a Gaussian sample's
HEAVY_TAILS = {"kurtosis": 30.0, "tail_mass": 0.2}
LAPLACE_TAILS = {"kurtosis": 6.0, "tail_mass": 0.046}  # heaviness 0.5: the tail term is 0


def _kernels(**override) -> dict[str, dict[str, float]]:
    base = {"polynomial": 0.55, "rbf": 0.6, "mahalanobis": 0.7, "spectral": 0.5}
    base.update(override)
    return {k: {"margin_mean": 1.0, "margin_std": 2.0, "accuracy": acc, "snr": 0.5}
            for k, acc in base.items()}


def _divergences(**data) -> dict[str, dict[str, float]]:
    metrics = {"coverage": 0.95, "entropy": 0.5, "drift": 0.1, **LIGHT_TAILS, **data}
    return {d: dict(metrics) for d in divergence_candidates()}


def _rank(table: pd.DataFrame, kernel: str, divergence: str) -> int:
    row = table[(table["kernel"] == kernel) & (table["divergence"] == divergence)]
    return int(row["predicted_rank"].iloc[0])


def _score(table: pd.DataFrame, kernel: str, divergence: str) -> float:
    row = table[(table["kernel"] == kernel) & (table["divergence"] == divergence)]
    return float(row["score"].iloc[0])


def test_ranking_is_a_deterministic_permutation_of_1_to_28():
    table = rank_pairs(_kernels(), _divergences())
    assert len(table) == 28
    assert sorted(table["predicted_rank"]) == list(range(1, 29))
    assert list(table["predicted_rank"]) == list(range(1, 29))  # sorted by rank
    assert table["predicted_rank"].dtype.kind == "i"
    assert table["score"].is_monotonic_decreasing
    assert table.equals(rank_pairs(_kernels(), _divergences()))
    assert {"kernel_accuracy", "kernel_snr", "divergence_coverage", "divergence_kurtosis",
            "divergence_tail_mass", "divergence_drift", "divergence_entropy"} <= set(table)


def test_heavier_tails_rank_bounded_divergences_above_the_kl_family():
    light = rank_pairs(_kernels(), _divergences(**LIGHT_TAILS))
    heavy = rank_pairs(_kernels(), _divergences(**HEAVY_TAILS))
    for bounded in ("js", "hellinger"):
        assert _rank(light, "rbf", bounded) > _rank(light, "rbf", "kl")
        assert _rank(heavy, "rbf", bounded) < _rank(heavy, "rbf", "kl")
        assert _rank(heavy, "rbf", bounded) < _rank(light, "rbf", bounded)


def test_tail_heaviness_is_half_for_a_laplace_sample_and_near_zero_for_a_gaussian():
    assert tail_heaviness(6.0, 0.046) == pytest.approx(0.5)
    assert tail_heaviness(3.0, 0.0027) == pytest.approx(0.5 * 0.0027 / 0.0487)
    assert tail_heaviness(100.0, 0.5) > tail_heaviness(10.0, 0.1)


def test_low_coverage_demotes_support_hungry_divergences():
    full = rank_pairs(_kernels(), _divergences(coverage=1.0, **LAPLACE_TAILS))
    poor = rank_pairs(_kernels(), _divergences(coverage=0.3, **LAPLACE_TAILS))
    assert _rank(poor, "rbf", "kl") > _rank(full, "rbf", "kl")
    assert _rank(poor, "rbf", "wasserstein") > _rank(full, "rbf", "wasserstein")
    # js relies on the support less: it loses less score than kl does
    assert (_score(full, "rbf", "js") - _score(poor, "rbf", "js")
            < _score(full, "rbf", "kl") - _score(poor, "rbf", "kl"))


def test_drift_promotes_wasserstein_and_demotes_kl():
    still = rank_pairs(_kernels(), _divergences(drift=0.0, **LAPLACE_TAILS))
    moved = rank_pairs(_kernels(), _divergences(drift=0.9, **LAPLACE_TAILS))
    assert _rank(moved, "rbf", "wasserstein") < _rank(still, "rbf", "wasserstein")
    assert _rank(moved, "rbf", "kl") > _rank(still, "rbf", "kl")


def test_a_more_accurate_kernel_ranks_first():
    table = rank_pairs(_kernels(), _divergences())
    assert table["kernel"].iloc[0] == "mahalanobis"  # the highest accuracy in _kernels()
    flipped = rank_pairs(_kernels(polynomial=0.95), _divergences())
    assert flipped["kernel"].iloc[0] == "polynomial"
    assert _rank(flipped, "polynomial", "js") < _rank(table, "polynomial", "js")


def test_ties_follow_the_fixed_kernel_then_divergence_order():
    # every kernel scores the same, and kl, renyi and fdiv share a profile: with light tails
    # those twelve pairs tie for the top, and the fixed order (kernel first) decides
    same = {k: {"accuracy": 0.6, "snr": 0.2, "margin_std": 1.0}
            for k in reversed(kernel_candidates())}
    divergences = dict(reversed(list(_divergences(**LIGHT_TAILS).items())))
    table = rank_pairs(same, divergences)
    top = table[table["predicted_rank"] <= 12]
    assert top["score"].nunique() == 1
    assert list(zip(top["kernel"], top["divergence"], strict=True)) == [
        (k, d) for k in kernel_candidates() for d in ("kl", "renyi", "fdiv")]


def test_nan_metrics_take_neutral_values():
    kernels = _kernels()
    kernels["rbf"] = {"accuracy": math.nan, "snr": math.nan, "margin_std": math.nan}
    divergences = _divergences(kurtosis=math.nan, tail_mass=math.nan)
    table = rank_pairs(kernels, divergences)
    assert table["score"].notna().all()
    rbf = table[table["kernel"] == "rbf"]["kernel_score"].iloc[0]
    assert rbf == 0.0  # chance accuracy, zero snr
    assert math.isnan(table["kernel_accuracy"][table["kernel"] == "rbf"].iloc[0])  # as given


def test_unknown_names_and_missing_metrics_are_errors():
    with pytest.raises(ValueError, match="'chi2'"):
        rank_pairs(_kernels(), {"chi2": _divergences()["kl"]})
    with pytest.raises(ValueError, match="unknown kernel 'linear'"):
        rank_pairs({"linear": {"accuracy": 0.5, "snr": 0.0, "margin_std": 0.0}},
                   _divergences())
    with pytest.raises(ValueError, match="'coverage'"):
        rank_pairs(_kernels(), {"kl": {"entropy": 0.5}})


def test_a_kernel_margin_too_wide_for_the_default_gamma_ranks_lower():
    # same ordering statistics; spreads of 1 and 50 at gamma 0.1: tanh(0.05) vs tanh(2.5)
    kernels = {k: {"margin_mean": 0.1, "margin_std": 1.0, "accuracy": 0.55, "snr": 0.1}
               for k in kernel_candidates()}
    kernels["mahalanobis"] = {**kernels["mahalanobis"], "margin_std": 50.0}
    table = rank_pairs(kernels, _divergences())
    score = table.groupby("kernel")["kernel_score"].first()
    assert score["rbf"] == pytest.approx(0.1 + math.tanh(0.1) - math.tanh(0.05))
    assert score["mahalanobis"] == pytest.approx(0.1 + math.tanh(0.1) - math.tanh(2.5))
    assert _rank(table, "mahalanobis", "kl") > _rank(table, "spectral", "kl")
