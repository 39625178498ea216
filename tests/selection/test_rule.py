"""The selection rule: a deterministic permutation of the candidate pairs, its score computed
by hand, moving in the documented direction when one metric changes, honest about having
nothing to go on."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from raypo.losses import DIVERGENCES, divergence_candidates, kernel_candidates
from raypo.selection.rule import (
    RESIDUAL_SD,
    W_SATURATION,
    W_STRENGTH,
    confidence,
    rank_pairs,
    zscore,
)

SPREADS = {"polynomial": 0.2, "rbf": 5.0, "mahalanobis": 80.0, "spectral": 1.0}
STRENGTHS = {"kl": 0.008, "js": 0.002, "hellinger": 0.002, "renyi": 0.02,
             "bhattacharyya": 0.002, "fdiv": 0.008, "wasserstein": 0.02}
# every candidate of the registries has metrics: one this file does not name gets a middling
# value, so a new kernel or divergence leaves these tests as they are
PAIRS = len(kernel_candidates()) * len(divergence_candidates())


def _kernels(**spreads):
    given = {**{k: SPREADS.get(k, 1.0) for k in kernel_candidates()}, **spreads}
    return {k: {"margin_mean": 0.0, "margin_std": s, "accuracy": 0.5, "snr": 0.0}
            for k, s in given.items()}


def _divergences(**strengths):
    given = {**{d: STRENGTHS.get(d, 0.008) for d in divergence_candidates()}, **strengths}
    return {d: {"coverage": 0.99, "entropy": 0.5, "kurtosis": 4.0, "tail_mass": 0.02,
                "drift": 0.01, "strength": s} for d, s in given.items()}


def _rank(table, kernel, divergence) -> int:
    row = table[(table["kernel"] == kernel) & (table["divergence"] == divergence)]
    return int(row["predicted_rank"].iloc[0])


def test_the_ranking_is_a_deterministic_permutation_of_the_candidates():
    table = rank_pairs(_kernels(), _divergences())
    assert len(table) == PAIRS and sorted(table["predicted_rank"]) == list(range(1, PAIRS + 1))
    assert set(zip(table["kernel"], table["divergence"], strict=True)) == {
        (k, d) for k in kernel_candidates() for d in divergence_candidates()}
    assert table.equals(rank_pairs(_kernels(), _divergences()))
    assert table["score"].is_monotonic_decreasing


def test_the_score_is_the_weighted_sum_of_standardised_features():
    table = rank_pairs(_kernels(), _divergences(), gamma=0.1)
    keys = list(zip(table["kernel"], table["divergence"], strict=True))
    saturation = np.array([math.tanh(0.1 * SPREADS[k] / 2) for k, _ in keys])
    strength = np.log([STRENGTHS[d] for _, d in keys])
    z = lambda x: (x - x.mean()) / x.std()  # noqa: E731
    expected = W_SATURATION * z(saturation) + W_STRENGTH * z(strength)
    assert np.allclose(table["score"], expected)
    assert np.allclose(table["kernel_score"] + table["divergence_score"], table["score"])


def test_a_kernel_margin_too_wide_for_the_loss_gamma_ranks_lower():
    table = rank_pairs(_kernels(), _divergences(), gamma=0.1)
    assert table["kernel"].iloc[-1] == "mahalanobis"  # margin spread 80: saturated
    assert _rank(table, "mahalanobis", "renyi") > _rank(table, "spectral", "renyi")
    # at a gamma of 1 the rbf kernel's spread of 5 saturates too, at 0.01 it does not
    wide = rank_pairs(_kernels(), _divergences(), gamma=1.0)
    narrow = rank_pairs(_kernels(), _divergences(), gamma=0.01)
    assert _rank(wide, "rbf", "kl") > _rank(narrow, "rbf", "kl")


def test_a_stronger_penalty_ranks_higher():
    table = rank_pairs(_kernels(), _divergences())
    assert _rank(table, "spectral", "renyi") < _rank(table, "spectral", "kl") < _rank(
        table, "spectral", "js")
    stronger = rank_pairs(_kernels(), _divergences(js=0.05))
    assert _rank(stronger, "spectral", "js") < _rank(table, "spectral", "js")


def test_with_nothing_to_go_on_the_rule_says_so_and_keeps_the_registry_order():
    same = rank_pairs(_kernels(**{k: 1.0 for k in kernel_candidates()}),
                      _divergences(**{d: 0.01 for d in divergence_candidates()}))
    assert (same["score"] == 0).all()
    assert same["confidence"].iloc[0] == pytest.approx(0.5)
    assert list(zip(same["kernel"], same["divergence"], strict=True)) == [
        (k, d) for k in kernel_candidates() for d in divergence_candidates()]
    sure = rank_pairs(_kernels(), _divergences())["confidence"].iloc[0]
    assert 0.5 < sure < 1.0


def test_confidence_is_the_normal_probability_of_the_gap_to_the_fourth():
    scores = [2.0, 1.0, 0.5, 0.2, -1.0]
    expected = stats.norm.cdf((2.0 - 0.2) / (math.sqrt(2) * RESIDUAL_SD))
    assert confidence(scores) == pytest.approx(expected)
    assert confidence([1.0, 0.0]) == pytest.approx(stats.norm.cdf(1 / (math.sqrt(2)
                                                                        * RESIDUAL_SD)))


def test_nan_metrics_make_their_feature_neutral():
    table = rank_pairs(_kernels(rbf=math.nan), _divergences(kl=math.nan))
    assert table["score"].notna().all()
    assert np.allclose(zscore([1.0, math.nan, 3.0]), [-1.0, 0.0, 1.0])
    assert (zscore([2.0, 2.0]) == 0).all()


def test_a_divergence_that_is_not_a_candidate_is_neither_ranked_nor_accepted(monkeypatch):
    monkeypatch.setattr(DIVERGENCES.get_class("js"), "candidate", False)
    assert "js" not in divergence_candidates()
    with pytest.raises(ValueError, match="'js' is not a selection candidate"):
        rank_pairs(_kernels(), _divergences(js=0.002))
    table = rank_pairs(_kernels(), _divergences())
    assert len(table) == len(kernel_candidates()) * len(divergence_candidates())
    # the measured metrics are all a divergence brings: no hand-set profile columns
    assert not {"divergence_boundedness", "divergence_support",
                "divergence_geometry"} & set(table.columns)


def test_unknown_names_and_missing_metrics_are_errors():
    with pytest.raises(ValueError, match="'chi2'"):
        rank_pairs(_kernels(), {"chi2": _divergences()["kl"]})
    with pytest.raises(ValueError, match="unknown kernel 'linear'"):
        rank_pairs({"linear": {"margin_std": 1.0}}, _divergences())
    with pytest.raises(ValueError, match="'strength'"):
        rank_pairs(_kernels(), {"kl": {"entropy": 0.5}})
    with pytest.raises(ValueError, match="'margin_std'"):
        rank_pairs({"rbf": {"accuracy": 0.5}}, _divergences())
