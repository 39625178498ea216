"""The statistics of a verdict against values computed by hand: t-intervals with tabulated
quantiles, the paired t-test against the closed-form t distribution of 3 degrees of freedom,
Holm's step-down adjustment and the one-way ANOVA / ICC of small hand-made groups."""

from __future__ import annotations

import math

import numpy as np
import pytest

from raypo.reports.stats import holm, one_way, paired, summary

T_975_3 = 3.182446305284263  # the 97.5% quantile of Student's t with 3 degrees of freedom


def t3_cdf(t: float) -> float:
    """Student's t CDF with 3 degrees of freedom, in closed form."""
    r3 = math.sqrt(3.0)
    return 0.5 + (t / (r3 * (1 + t * t / 3)) + math.atan(t / r3)) / math.pi


def test_summary_is_the_mean_the_sample_std_and_the_t_interval():
    out = summary([1.0, 2.0, 3.0, 4.0])
    sd = math.sqrt(5 / 3)  # sample std (ddof 1)
    half = T_975_3 * sd / 2
    assert out["n"] == 4 and out["mean"] == 2.5 and out["std"] == pytest.approx(sd)
    assert out["ci_low"] == pytest.approx(2.5 - half) and out["ci_high"] == pytest.approx(
        2.5 + half)


def test_an_interval_past_a_metrics_bounds_is_clipped_to_them_and_says_so():
    """A share near 1 over four seeds: the t-interval (by hand, as above) reaches past 1;
    with the metric's bounds it stops at 1, the low end unchanged; an interval inside the
    bounds is left as it is. A difference of two shares is clipped to [-1, 1]."""
    from raypo.reports.schema import metric_bounds

    values = [0.90, 0.95, 1.0, 1.0]
    mean, sd = float(np.mean(values)), float(np.std(values, ddof=1))
    half = T_975_3 * sd / 2
    assert mean + half > 1.0  # past the bound: what the page showed before
    bounds = metric_bounds("pref_accuracy")
    assert bounds == (0.0, 1.0) and metric_bounds("final_true_reward") == (0.0, 1.0)
    assert metric_bounds("kl") is None
    out = summary(values, bounds=bounds)
    assert out["ci_high"] == 1.0 and out["ci_low"] == pytest.approx(mean - half)
    assert out["ci_clipped"] is True
    assert summary(values)["ci_high"] == pytest.approx(mean + half)  # no bounds: as before
    inside = summary([0.4, 0.5, 0.6], bounds=bounds)
    assert inside["ci_clipped"] is False and inside["ci_low"] > 0 and inside["ci_high"] < 1
    diff = paired([1.0, 0.1, 1.0], [0.0, 0.9, 0.0], bounds=bounds)  # spread: a wide interval
    assert diff["diff_ci_clipped"] is True
    assert diff["diff_ci_low"] >= -1.0 and diff["diff_ci_high"] == 1.0


def test_summary_of_one_value_has_no_interval_and_missing_values_are_dropped():
    assert math.isnan(summary([0.7])["ci_low"]) and summary([0.7])["mean"] == 0.7
    assert summary([1.0, float("nan"), 3.0])["n"] == 2


def test_paired_t_test_matches_the_closed_form_t_distribution():
    a, b = [1.0, 2.0, 3.0, 4.0], [0.0, 1.5, 2.0, 3.2]
    d = np.array(a) - np.array(b)  # 1, 0.5, 1, 0.8
    sd = d.std(ddof=1)
    t = d.mean() / (sd / 2)
    out = paired(a, b)
    assert out["diff_mean"] == pytest.approx(0.825) and out["t"] == pytest.approx(t)
    assert out["p"] == pytest.approx(2 * (1 - t3_cdf(t)), rel=1e-9)
    assert out["diff_ci_low"] == pytest.approx(0.825 - T_975_3 * sd / 2)
    assert out["diff_ci_high"] == pytest.approx(0.825 + T_975_3 * sd / 2)
    assert out["effect_size"] == pytest.approx(0.825 / sd)  # Cohen's d_z


def test_pairing_is_by_position_so_it_removes_shared_noise():
    rng = np.random.default_rng(0)
    seed_noise = rng.normal(0, 1.0, 8)  # large, shared by both runs of a seed
    base = 0.5 + seed_noise
    better = base + 0.1 + rng.normal(0, 0.01, 8)
    assert paired(better, base)["p"] < 1e-6  # paired: the shared noise cancels
    shuffled = paired(better, base[::-1])["p"]  # mispaired, the difference drowns
    assert shuffled > 0.05


def test_identical_runs_give_no_evidence_of_a_difference():
    out = paired([0.3, 0.4, 0.5], [0.3, 0.4, 0.5])
    assert out["p"] == 1.0 and out["diff_ci_low"] == 0.0 == out["diff_ci_high"]
    assert out["effect_size"] == 0.0


def test_a_pair_with_a_missing_side_is_dropped():
    out = paired([1.0, 2.0, float("nan"), 4.0], [0.5, 1.0, 3.0, float("nan")])
    assert out["n"] == 2 and out["diff_mean"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="different lengths"):
        paired([1.0], [1.0, 2.0])


def test_holm_step_down_adjustment():
    # sorted: 0.005 x 4, 0.01 x 3, 0.03 x 2, 0.04 x 1, then the running maximum
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, float("nan")]) == pytest.approx([1.0, 1.0])
    assert holm([0.2]) == [0.2] and holm([]) == []


def test_one_way_anova_and_intraclass_correlation_by_hand():
    out = one_way([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    # MSB = 3 * ((2 - 3.5)^2 + (5 - 3.5)^2) / 1 = 13.5, MSW = (2 + 2) / 4 = 1
    assert out["F"] == pytest.approx(13.5)
    assert out["icc"] == pytest.approx((13.5 - 1) / (13.5 + 2 * 1))
    same = one_way([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    assert same["F"] == pytest.approx(0.0) and same["p"] == pytest.approx(1.0)
