"""HT-SR alpha against matrices whose spectrum is known: a planted Pareto tail is recovered,
a Gaussian (Marchenko-Pastur) matrix reads as not heavy-tailed, the vectorised default fit is
the `powerlaw` package's fit, and the summary is the arithmetic done by hand."""

from __future__ import annotations

import math
import warnings

import numpy as np
import powerlaw
import pytest
import torch
from torch import nn

from raypo.models.tiny import tiny_model, tiny_tokenizer
from raypo.selection.htsr import ALPHA_RANGE, esd, fit_power_law, layer_alphas, summarize


def orthonormal_columns(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    """A Haar-random rows x cols matrix with orthonormal columns (QR of a Gaussian)."""
    q, r = torch.linalg.qr(torch.randn(rows, cols, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def pareto_matrix(n: int, m: int, alpha: float, seed: int) -> torch.Tensor:
    """W = U diag(sqrt(lambda)) V^T: the eigenvalues of W^T W are exactly lambda.

    lambda = 1 + numpy's Pareto(alpha - 1) (a Lomax variate) has density
    (alpha - 1) * lambda^-alpha on [1, inf): a pure power law with exponent alpha.
    """
    gen = torch.Generator().manual_seed(seed)
    lam = 1.0 + np.random.default_rng(seed).pareto(alpha - 1.0, size=m)
    u, v = orthonormal_columns(n, m, gen), orthonormal_columns(m, m, gen)
    return u @ torch.diag(torch.from_numpy(np.sqrt(lam))) @ v.T


def gaussian_matrix(n: int, m: int, seed: int) -> torch.Tensor:
    return torch.randn(n, m, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


class OneMatrix(nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight.float())


def test_esd_is_squared_singular_values_over_the_larger_side():
    w = pareto_matrix(64, 32, alpha=3.0, seed=0)
    expected = np.sort(np.linalg.eigvalsh((w.T @ w).numpy())) / 64
    np.testing.assert_allclose(esd(w), expected, rtol=1e-9)
    np.testing.assert_allclose(esd(w.T), expected, rtol=1e-9)  # same ESD either way round


def test_esd_drops_zero_eigenvalues_of_a_rank_deficient_matrix():
    w = gaussian_matrix(40, 3, seed=0) @ gaussian_matrix(3, 20, seed=1)
    assert len(esd(w)) == 3


def test_planted_pareto_tail_recovers_alpha_3():
    w = pareto_matrix(2048, 1024, alpha=3.0, seed=0)
    fit = fit_power_law(esd(w))
    assert fit["alpha"] == pytest.approx(3.0, abs=0.3)
    assert fit["ks_distance"] < 0.05  # a good fit, over most of the spectrum
    assert fit["num_tail"] > 500


def test_gaussian_matrix_is_not_heavy_tailed():
    # Marchenko-Pastur bulk with a hard edge: the best power law is steep and fits badly
    fit = fit_power_law(esd(gaussian_matrix(512, 256, seed=0)))
    assert fit["alpha"] > 4.0
    assert fit["ks_distance"] > 0.1


def test_truncating_at_the_largest_eigenvalue_makes_gaussian_look_heavy_tailed():
    # why the default fit has no xmax: a bounded power law describes the MP edge "well"
    eigs = esd(gaussian_matrix(512, 256, seed=0))
    truncated = fit_power_law(eigs, truncated=True)
    assert truncated["alpha"] < 3.0
    assert truncated["ks_distance"] < 0.05
    assert truncated["alpha"] < fit_power_law(eigs)["alpha"] - 2


def test_too_few_eigenvalues_give_nan_not_an_error():
    for eigs in (np.array([]), np.array([1.0]), np.array([1.0, 2.0]), np.ones(50)):
        fit = fit_power_law(eigs)
        assert math.isnan(fit["alpha"]) and math.isnan(fit["xmin"]) and fit["num_tail"] == 0


def powerlaw_fit(eigs: np.ndarray) -> dict[str, float] | None:
    """The reference: the untruncated fit the `powerlaw` package computes (None: no valid fit)."""
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        fit = powerlaw.Fit(eigs, xmin_distance="D", parameter_ranges=ALPHA_RANGE, verbose=False)
        if not np.isfinite(fit.xmin) or fit.noise_flag:
            return None
        return {"alpha": fit.power_law.alpha, "xmin": fit.xmin, "num_tail": fit.n_tail,
                "ks_distance": fit.power_law.D}


def assert_matches_powerlaw(eigs: np.ndarray) -> dict[str, float]:
    fit, reference = fit_power_law(eigs), powerlaw_fit(eigs)
    assert reference is not None
    assert fit["xmin"] == reference["xmin"]  # the same candidate, so exactly the same value
    assert fit["num_tail"] == reference["num_tail"]
    assert fit["alpha"] == pytest.approx(reference["alpha"], rel=1e-9)
    assert fit["ks_distance"] == pytest.approx(reference["ks_distance"], rel=1e-9)
    return fit


@pytest.fixture(scope="module")
def tiny_model_spectra() -> dict[str, np.ndarray]:
    model = tiny_model(tiny_tokenizer(), seed=0)
    return {name: esd(p) for name, p in model.named_parameters() if p.ndim == 2}


def test_vectorised_fit_is_powerlaws_fit_on_the_tiny_models_matrices(tiny_model_spectra):
    assert len(tiny_model_spectra) > 10
    for eigs in tiny_model_spectra.values():
        assert_matches_powerlaw(eigs)


@pytest.mark.parametrize("alpha", [2.5, 4.0])  # powerlaw: closed form, then Nelder-Mead
def test_vectorised_fit_is_powerlaws_fit_on_a_pareto_sample(alpha):
    sample = 1.0 + np.random.default_rng(0).pareto(alpha - 1.0, size=1000)  # density ~ x^-alpha
    fit = assert_matches_powerlaw(sample)
    assert fit["alpha"] == pytest.approx(alpha, abs=0.2)
    assert fit["num_tail"] > 300


def test_vectorised_fit_is_powerlaws_fit_on_a_marchenko_pastur_spectrum():
    fit = assert_matches_powerlaw(esd(gaussian_matrix(400, 200, seed=3)))
    assert fit["alpha"] > 4.0


def test_vectorised_fit_is_powerlaws_fit_on_a_spectrum_with_ties():
    # values rounded to 0.1 (and a repeated lognormal): many equal eigenvalues, the
    # empirical CDF steps by more than 1/n, and a tie may sit at the chosen xmin
    rng = np.random.default_rng(1)
    rounded = np.round(1.0 + rng.pareto(2.0, size=400), 1)
    assert len(np.unique(rounded)) < len(rounded) / 2
    assert_matches_powerlaw(rounded)
    assert_matches_powerlaw(np.repeat(np.round(rng.lognormal(size=100), 2), 3))


def test_vectorised_fit_skips_xmin_whose_alpha_is_at_the_lower_bound_as_powerlaw_does():
    # geometric spectrum with a huge ratio: alpha of every tail is within 0.01 of 1 (powerlaw
    # flags those) except the last three, whose D are larger than the flagged ones'
    eigs = 10.0 ** (20.0 * np.arange(12))
    fit = assert_matches_powerlaw(eigs)
    assert fit["alpha"] >= 1.01 and fit["num_tail"] == 5
    # a still larger ratio leaves no valid xmin: nan, and powerlaw flags the fit as noise too
    eigs = 10.0 ** (50.0 * np.arange(6))
    assert math.isnan(fit_power_law(eigs)["alpha"]) and powerlaw_fit(eigs) is None


def test_fewer_than_four_distinct_values_give_nan_like_powerlaw():
    # powerlaw's candidates are the distinct values but the two largest, and it needs two
    for eigs in (np.array([1.0, 2.0, 3.0]), np.tile([1.0, 2.0, 3.0], 10), np.full(20, 0.5)):
        fit = fit_power_law(eigs)
        assert math.isnan(fit["alpha"]) and math.isnan(fit["ks_distance"])
        assert fit["num_tail"] == 0
    assert powerlaw_fit(np.tile([1.0, 2.0, 3.0], 10)) is None
    assert math.isfinite(fit_power_law(np.array([1.0, 2.0, 3.0, 4.0]))["alpha"])


def test_layer_alphas_reports_each_large_enough_matrix_by_name():
    model = nn.Sequential(nn.Linear(64, 128), nn.Linear(128, 8), nn.LayerNorm(8))
    rows = layer_alphas(model, min_dim=16)
    assert [(r["name"], r["shape"], r["num_eigs"]) for r in rows] == [("0.weight", (128, 64), 64)]
    assert set(rows[0]) == {"name", "shape", "alpha", "xmin", "num_eigs", "num_tail",
                            "ks_distance"}
    assert [r["name"] for r in layer_alphas(model, min_dim=8)] == ["0.weight", "1.weight"]


def test_layer_alphas_matches_the_direct_fit():
    w = pareto_matrix(512, 256, alpha=3.0, seed=1)
    (row,) = layer_alphas(OneMatrix(w))
    direct = fit_power_law(esd(w.float()))
    assert row["alpha"] == pytest.approx(direct["alpha"], rel=1e-9)


def test_tiny_model_end_to_end_gives_finite_alphas():
    model = tiny_model(tiny_tokenizer(), seed=0)
    rows = layer_alphas(model)
    matrices = [n for n, p in model.named_parameters() if p.ndim == 2]
    assert [r["name"] for r in rows] == matrices  # tied LM head appears once, as the embedding
    assert all(math.isfinite(r["alpha"]) and r["alpha"] > 1 for r in rows)
    summary = summarize(rows)
    assert summary["layers"] == len(rows)
    # freshly initialised (random) weights: no heavy tails, so alpha is well above 2
    assert summary["alpha_median"] > 3


def test_summary_by_hand():
    alphas = [{"alpha": a} for a in (1.5, 2.0, 4.0, 6.0, 7.5, math.nan)]
    assert summarize(alphas) == {
        "alpha_mean": pytest.approx(21.0 / 5),
        "alpha_median": 4.0,
        "alpha_min": 1.5,
        "alpha_max": 7.5,
        "share_in_2_6": pytest.approx(3 / 5),  # 2.0, 4.0 and 6.0: both ends count
        "layers": 5,  # the nan matrix is left out
    }
    assert summarize([3.0, 5.0])["alpha_median"] == 4.0  # plain numbers work too


def test_summary_of_nothing_fitted_is_nan_not_an_error():
    summary = summarize([{"alpha": math.nan}])
    assert summary["layers"] == 0
    assert all(math.isnan(v) for k, v in summary.items() if k != "layers")
