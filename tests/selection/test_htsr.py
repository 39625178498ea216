"""HT-SR alpha against matrices whose spectrum is known: a planted Pareto tail is recovered,
a Gaussian (Marchenko-Pastur) matrix reads as not heavy-tailed, the vectorised default fit is
the `powerlaw` package's fit, a float32 SVD gives float64's alpha, `cover="layers"` reads the
transformer blocks' matrices only (a LoRA layer as its merged weight), and the summary is the
arithmetic done by hand."""

from __future__ import annotations

import math
import warnings

import numpy as np
import powerlaw
import pytest
import torch
from torch import nn

from raypo.models.tiny import tiny_model, tiny_tokenizer
from raypo.selection.htsr import (
    ALPHA_RANGE,
    esd,
    fit_power_law,
    layer_alphas,
    summarize,
    weight_matrices,
)


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


def test_float32_esd_drops_rounding_noise_of_a_rank_deficient_matrix_and_nothing_else():
    # a float32 SVD rounds singular values by up to ~sqrt(N) eps32 s_max: the zero singular
    # values of a rank-10 matrix come out at ~5-10 eps32 s_max, and with this seed one of them
    # lies above 1e-12 of the largest eigenvalue (1e-6 of s_max), the float64 floor
    w = (gaussian_matrix(2048, 10, seed=10) @ gaussian_matrix(10, 256, seed=11)).float()
    assert len(esd(w)) == 10
    assert len(esd(gaussian_matrix(2048, 256, seed=0).float())) == 256  # full rank: all kept


def student_t_matrix(n: int, m: int, seed: int) -> torch.Tensor:
    """Entries Student-t with 3 degrees of freedom: a heavy-tailed ESD, as trained layers have."""
    torch.manual_seed(seed)
    return torch.distributions.StudentT(3.0).sample((n, m)).double()


def spiked_matrix(n: int, m: int, seed: int) -> torch.Tensor:
    """Gaussian noise plus a rank-8 signal five times its size: a few outliers above the bulk."""
    signal = gaussian_matrix(n, 8, seed + 100) @ gaussian_matrix(8, m, seed + 200) / 8 ** 0.5
    return gaussian_matrix(n, m, seed) + 5 * signal


MATRICES = {  # n x m, random (Marchenko-Pastur) or trained-like (heavy-tailed, spiked)
    "gaussian": lambda n, m: gaussian_matrix(n, m, seed=0),
    "pareto": lambda n, m: pareto_matrix(max(n, m), min(n, m), alpha=3.0, seed=0),
    "student_t": lambda n, m: student_t_matrix(n, m, seed=0),
    "spiked": lambda n, m: spiked_matrix(n, m, seed=0),
}


@pytest.mark.parametrize("kind", sorted(MATRICES))
def test_float32_svd_gives_the_float64_alpha(kind):
    # The stored weight is float32; only the SVD's precision differs. Measured over five seeds
    # of these shapes and two more (alpha up to 22), the largest relative difference in alpha
    # was 3e-5 and the fit always chose the same xmin; 1e-4 leaves room for another LAPACK.
    # (The difference grows with alpha, whose tail is then narrow; a different xmin would only
    # happen where two candidates' KS distances tie to ~1e-7.)
    for n, m in [(256, 256), (128, 512), (1024, 256), (300, 700)]:
        w = MATRICES[kind](n, m).float()  # the stored weight
        single, double = esd(w), esd(w, torch.float64)
        assert len(single) == len(double) == min(n, m)
        np.testing.assert_allclose(single[-10:], double[-10:], rtol=1e-5)  # the tail's end
        f32, f64 = fit_power_law(single), fit_power_law(double)
        assert f32["num_tail"] == f64["num_tail"], (n, m)
        assert f32["alpha"] == pytest.approx(f64["alpha"], rel=1e-4), (n, m)
        assert f32["ks_distance"] == pytest.approx(f64["ks_distance"], abs=1e-4), (n, m)


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


def test_layers_cover_is_the_transformer_blocks_without_embeddings_or_head():
    tok = tiny_tokenizer()
    tied = tiny_model(tok, seed=0)  # tie_word_embeddings: the head is the embedding
    blocks = [n for n, p in tied.named_parameters() if p.ndim == 2 and ".layers." in n]
    assert len(blocks) == 3 * 7  # q, k, v, o, gate, up, down per block
    assert [n for n, _ in weight_matrices(tied, "layers")] == blocks
    assert [r["name"] for r in layer_alphas(tied, cover="layers")] == blocks
    assert [n for n, _ in weight_matrices(tied, "all")] == ["model.embed_tokens.weight", *blocks]

    from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

    from raypo.models.tiny import tiny_llama_config

    config = tiny_llama_config(len(tok))
    config.tie_word_embeddings = False  # an LM head of its own: not a block matrix
    untied = LlamaForCausalLM(config)
    assert [n for n, _ in weight_matrices(untied, "layers")] == blocks
    assert [n for n, _ in weight_matrices(untied, "all")][-1] == "lm_head.weight"
    # learned positions (an nn.Embedding) are no block matrix either; GPT-2's Conv1D weights are
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2,
                                      n_head=2, bos_token_id=1, eos_token_id=2))
    names = [n for n, _ in weight_matrices(gpt2, "layers")]
    assert len(names) == 2 * 4 and all(n.startswith("transformer.h.") for n in names)
    with pytest.raises(ValueError, match="cover='some'"):
        list(weight_matrices(tied, "some"))


def test_a_lora_layer_is_its_base_weight_plus_the_adapters_update():
    pytest.importorskip("peft")
    import copy

    from raypo.models.load import load_policy

    lora = {"r": 16, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}
    policy = load_policy(None, tokenizer=tiny_tokenizer(), seed=1, lora=lora)
    with torch.no_grad():  # "trained" adapters (lora_B starts at zero)
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(generator=torch.Generator().manual_seed(len(name)))
    matrices = dict(weight_matrices(policy, "layers"))
    # r = 16 reaches min_dim, yet the factors are no matrices of their own
    assert len(matrices) == 3 * 7 and not any("lora_" in n for n in matrices)
    assert all(n.endswith(".base_layer.weight") for n in matrices)
    merged = copy.deepcopy(policy).merge_and_unload()  # peft's own merge, as the reference
    for name, weight in merged.named_parameters():
        if ".layers." in name and weight.ndim == 2:
            ours = matrices[f"base_model.model.{name.removesuffix('weight')}base_layer.weight"]
            torch.testing.assert_close(ours, weight.detach(), rtol=1e-5, atol=1e-6)
    with policy.disable_adapter():  # the reference's view: the frozen base
        for name, weight in weight_matrices(policy, "layers"):
            assert torch.equal(weight, policy.get_parameter(name))
    assert [n for n, _ in weight_matrices(policy, "all") if ".layers." not in n] == [
        "base_model.model.model.embed_tokens.weight"]


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
