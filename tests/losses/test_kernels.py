"""Kernels (raypo.losses.kernels) against hand-computed formulas, numpy and sklearn."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from raypo.losses.kernels import (
    KERNELS,
    HierarchicalMixtureKernel,
    Kernel,
    MahalanobisKernel,
    PolynomialKernel,
    RBFKernel,
    SpectralKernel,
    kernel,
    ledoit_wolf_shrinkage,
    shrunk_covariance,
)

A = [[1.0, 2.0, -0.5], [0.0, 0.3, 0.7], [-1.0, 1.0, 2.0]]
B = [[0.5, -1.0, 1.5], [0.0, 0.3, 0.7], [2.0, 0.0, -1.0]]


def t(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


def whitened(n: int, d: int, seed: int) -> np.ndarray:
    """n samples whose empirical (1/n) covariance is exactly I and mean exactly 0."""
    z = np.random.default_rng(seed).standard_normal((n, d))
    z -= z.mean(0)
    return z @ np.linalg.inv(np.linalg.cholesky(z.T @ z / n)).T


def with_covariance(cov: np.ndarray, n: int = 200, seed: int = 0) -> np.ndarray:
    mean = np.arange(cov.shape[0], dtype=float)
    return whitened(n, cov.shape[0], seed) @ np.linalg.cholesky(cov).T + mean


COV = np.array([[2.0, 0.3, 0.1], [0.3, 1.0, -0.2], [0.1, -0.2, 0.5]])


# Each kernel against its formula, evaluated by hand.

def test_polynomial_is_degree_times_log_of_dot_plus_c():
    expected = [math.log((np.dot(a, b) + 1.0) ** 2) for a, b in zip(A, B, strict=True)]
    torch.testing.assert_close(kernel("polynomial")(t(A), t(B)), t(expected))
    k = PolynomialKernel(degree=3, c=0.5)
    a, b = [[1.0, 2.0]], [[0.5, 0.25]]
    torch.testing.assert_close(k(t(a), t(b)), t([math.log((0.5 + 0.5 + 0.5) ** 3)]))


def test_polynomial_even_degree_is_exact_for_negative_base_and_odd_degree_is_floored():
    a, b = t([[2.0, 1.0]]), t([[-1.0, -1.0]])  # a.b + 1 = -2
    torch.testing.assert_close(PolynomialKernel(degree=2)(a, b), t([math.log(4.0)]))
    floored = PolynomialKernel(degree=3)(a, b)
    torch.testing.assert_close(floored, t([3 * math.log(PolynomialKernel.floor)]))


def test_rbf_is_minus_squared_distance_over_two_sigma_squared():
    expected = [-np.sum((np.array(a) - b) ** 2) / (2 * 0.7**2) for a, b in zip(A, B, strict=True)]
    torch.testing.assert_close(kernel("rbf", sigma=0.7)(t(A), t(B)), t(expected))


def test_mahalanobis_fitted_without_shrinkage_uses_the_inverse_covariance():
    k = MahalanobisKernel(shrinkage=0.0).fit(t(with_covariance(COV))).double()
    precision = np.linalg.inv(COV)
    expected = [-0.5 * (np.array(a) - b) @ precision @ (np.array(a) - b)
                for a, b in zip(A, B, strict=True)]
    torch.testing.assert_close(k(t(A), t(B)), t(expected), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(k.precision(), t(precision), rtol=1e-5, atol=1e-6)
    assert k.fitted_shrinkage == 0.0


def test_mahalanobis_fixed_shrinkage_pulls_toward_mean_variance_times_identity():
    k = MahalanobisKernel(shrinkage=0.25).fit(t(with_covariance(COV))).double()
    target = np.trace(COV) / 3 * np.eye(3)
    expected = np.linalg.inv(0.75 * COV + 0.25 * target)
    torch.testing.assert_close(k.precision(), t(expected), rtol=1e-5, atol=1e-6)


def test_mahalanobis_is_the_identity_before_fit():
    expected = [-0.5 * np.sum((np.array(a) - b) ** 2) for a, b in zip(A, B, strict=True)]
    torch.testing.assert_close(MahalanobisKernel()(t(A), t(B)), t(expected))
    torch.testing.assert_close(MahalanobisKernel(dim=3, learnable=True)(t(A), t(B)),
                               t(expected))


def test_spectral_mixture_is_log_of_weighted_sum_of_exponentials():
    k = SpectralKernel(scales=(0.5, 2.0), weights=(1.0, 3.0))  # lambda = (1/4, 3/4)
    expected = []
    for a, b in zip(A, B, strict=True):
        r2 = np.sum((np.array(a) - b) ** 2)
        expected.append(math.log(0.25 * math.exp(-0.5 * r2) + 0.75 * math.exp(-2.0 * r2)))
    torch.testing.assert_close(k(t(A), t(B)), t(expected))


def test_spectral_eigen_projects_on_the_top_eigenvectors_of_the_covariance():
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.standard_normal((4, 4)))
    spectrum = np.array([4.0, 2.0, 1.0, 0.5])
    x = whitened(300, 4, seed=2) @ np.diag(np.sqrt(spectrum)) @ q.T  # covariance q diag q^T
    k = SpectralKernel(form="eigen", rank=2, temperature=2.0).fit(t(x)).double()
    a, b = rng.standard_normal((5, 4)), rng.standard_normal((5, 4))
    lam = spectrum[:2] / spectrum[:2].sum()
    expected = ((a @ q[:, :2]) * (b @ q[:, :2]) * lam).sum(1) / 2.0
    torch.testing.assert_close(k(t(a), t(b)), t(expected), rtol=1e-5, atol=1e-6)
    # The same against numpy's own eigendecomposition, at full rank.
    full = SpectralKernel(form="eigen").fit(t(x)).double()
    values, vectors = np.linalg.eigh(np.cov(x.T, bias=True))
    expected = ((a @ vectors) * (b @ vectors) * values / values.sum()).sum(1)
    torch.testing.assert_close(full(t(a), t(b)), t(expected), rtol=1e-5, atol=1e-6)


def test_spectral_eigen_before_fit_is_dot_product_over_dimension():
    expected = [np.dot(a, b) / 3 / 0.5 for a, b in zip(A, B, strict=True)]
    k = SpectralKernel(form="eigen", temperature=0.5)
    torch.testing.assert_close(k(t(A), t(B)), t(expected))


@pytest.mark.parametrize("k", [
    RBFKernel(sigma=0.3),
    MahalanobisKernel(),
    MahalanobisKernel(shrinkage=0.0).fit(t(with_covariance(COV))),
    SpectralKernel(scales=(0.1, 5.0), weights=(2.0, 7.0)),
], ids=["rbf", "mahalanobis", "mahalanobis_fitted", "spectral"])
def test_log_kernel_of_a_point_with_itself_is_zero(k):
    torch.testing.assert_close(k(t(A), t(A)), torch.zeros(3, dtype=torch.float64))


def test_bfloat16_inputs_are_computed_in_float32():
    a = t(A).to(torch.bfloat16)
    out = RBFKernel()(a, a)
    assert out.dtype == torch.float32


# Ledoit-Wolf shrinkage.

def ledoit_wolf_by_hand(x: np.ndarray) -> float:
    """The 2004 paper's formula, summing over samples (the kernel uses a closed form)."""
    x = x - x.mean(0)
    n, d = x.shape
    s = x.T @ x / n
    mu = np.trace(s) / d
    delta2 = np.sum((s - mu * np.eye(d)) ** 2) / d
    beta2 = sum(np.sum((np.outer(xk, xk) - s) ** 2) for xk in x) / (d * n**2)
    return min(beta2, delta2) / delta2


@pytest.mark.parametrize(("n", "d"), [(5, 8), (40, 4), (500, 3)])
def test_ledoit_wolf_shrinkage_matches_the_per_sample_formula_and_is_in_unit_interval(n, d):
    x = np.random.default_rng(n).standard_normal((n, d)) * np.linspace(0.5, 3.0, d)
    s = float(ledoit_wolf_shrinkage(t(x)))
    assert 0.0 <= s <= 1.0
    assert s == pytest.approx(ledoit_wolf_by_hand(x), rel=1e-9)


def test_ledoit_wolf_matches_sklearn():
    covariance = pytest.importorskip("sklearn.covariance")
    x = np.random.default_rng(3).standard_normal((30, 6)) @ np.diag([1, 2, 3, 1, 0.5, 4.0])
    expected_cov, expected_s = covariance.ledoit_wolf(x)
    cov, s = shrunk_covariance(t(x))
    assert s == pytest.approx(expected_s, rel=1e-9)
    torch.testing.assert_close(cov, t(expected_cov))


def test_mahalanobis_with_singular_covariance_and_no_shrinkage_raises():
    x = t(np.random.default_rng(0).standard_normal((3, 4)))  # rank 2
    with pytest.raises(ValueError, match="mahalanobis.*singular"):
        MahalanobisKernel(shrinkage=0.0).fit(x)
    MahalanobisKernel().fit(x)  # Ledoit-Wolf makes it invertible


# Hierarchical mixture.

ONE_HOT = {
    "rbf": {"tau": (0.0, -math.inf), "local": (0.0, -math.inf)},
    "polynomial": {"tau": (0.0, -math.inf), "local": (-math.inf, 0.0)},
    "spectral": {"tau": (-math.inf, 0.0), "global": (0.0, -math.inf)},
    "mahalanobis": {"tau": (-math.inf, 0.0), "global": (-math.inf, 0.0)},
}


@pytest.mark.parametrize("member", list(ONE_HOT))
@pytest.mark.parametrize("learnable_weights", [False, True])
def test_hmk_with_all_weight_on_one_kernel_equals_that_kernel_exactly(member, learnable_weights):
    hmk = HierarchicalMixtureKernel(weight_logits=ONE_HOT[member],
                                    learnable_weights=learnable_weights, sigma=0.8, c=2.0)
    hmk.fit(t(with_covariance(COV)))
    a, b = t(A), t(B)
    log_k = hmk(a, b)
    assert torch.equal(log_k, getattr(hmk, member)(a, b))
    if learnable_weights:  # -inf logits: zero gradient, not NaN
        log_k.sum().backward()
        assert torch.isfinite(hmk.weight_logits.grad).all()


def test_hmk_default_weights_are_halves_and_entropy_is_three_log_two():
    hmk = kernel("hmk", dim=3)
    for name, w in hmk.weights().items():
        assert w.item() == pytest.approx(0.5), name
    assert hmk.entropy().item() == pytest.approx(3 * math.log(2))
    # Equal weights: K is the mean of the four kernels.
    a, b = t(A), t(B)
    components = [getattr(hmk, m)(a, b).exp() for m in ONE_HOT]
    torch.testing.assert_close(hmk(a, b).exp(), sum(components) / 4)


def test_hmk_entropy_and_its_gradient_are_finite_for_one_hot_logits():
    hmk = HierarchicalMixtureKernel(dim=3, weight_logits={"tau": (0.0, -math.inf),
                                                          "local": (-math.inf, 0.0)})
    entropy = hmk.entropy()
    assert entropy.item() == pytest.approx(math.log(2))  # only the "global" pair is uniform
    entropy.backward()
    assert torch.isfinite(hmk.weight_logits.grad).all()
    assert hmk.weights()["tau_global"].item() == 0.0


def test_hmk_fit_fits_the_mahalanobis_component():
    hmk = HierarchicalMixtureKernel().fit(t(with_covariance(COV)))
    assert hmk.mahalanobis.fitted_shrinkage is not None
    assert isinstance(hmk.mahalanobis.raw_factor, torch.nn.Parameter)


# Learnable parameters.

@pytest.mark.parametrize("make", [
    lambda: RBFKernel(learnable=True),
    lambda: PolynomialKernel(learnable=True),
    lambda: SpectralKernel(learnable=True),
    lambda: MahalanobisKernel(dim=3, learnable=True),
    lambda: MahalanobisKernel(learnable=True).fit(t(with_covariance(COV))),
    lambda: HierarchicalMixtureKernel(dim=3),
], ids=["rbf", "polynomial", "spectral", "mahalanobis", "mahalanobis_fitted", "hmk"])
def test_learnable_parameters_receive_finite_nonzero_gradients(make):
    k = make()
    params = dict(k.named_parameters())
    assert params
    k(t(A), t(B)).sum().backward()
    for name, p in params.items():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_fixed_kernels_have_no_parameters():
    for name in KERNELS:
        if name != "hmk":
            assert not list(kernel(name).parameters()), name
    assert not list(HierarchicalMixtureKernel(learnable_weights=False, learnable_kernels=False,
                                              dim=3).parameters())


def test_learnable_mahalanobis_stays_positive_definite_under_large_steps():
    torch.manual_seed(0)
    k = MahalanobisKernel(dim=4, learnable=True)
    opt = torch.optim.Adam(k.parameters(), lr=1.0)
    for _ in range(10):
        x, w, l = torch.randn(3, 16, 4).unbind(0)
        w = x + 0.3 * w  # chosen near the prompt: the margin grows with the precision
        opt.zero_grad()
        (-torch.nn.functional.logsigmoid(k(x, w) - k(x, l)).mean()).backward()
        opt.step()
        diagonal = k.precision_factor().diagonal()
        assert torch.isfinite(diagonal).all() and (diagonal > 0).all()
        eigenvalues = torch.linalg.eigvalsh(k.precision().double())
        assert torch.isfinite(eigenvalues).all() and (eigenvalues > 0).all()


def test_fit_keeps_the_parameter_an_optimizer_already_holds():
    k = MahalanobisKernel(dim=3, learnable=True)
    before = k.raw_factor
    k.fit(t(with_covariance(COV)))
    assert k.raw_factor is before
    torch.testing.assert_close(k.precision().double(), t(np.linalg.inv(k_cov(COV))),
                               rtol=1e-5, atol=1e-6)


def k_cov(cov: np.ndarray) -> np.ndarray:
    """The Ledoit-Wolf estimate the kernel fits on with_covariance(cov)."""
    s = ledoit_wolf_by_hand(with_covariance(cov))
    return (1 - s) * cov + s * np.trace(cov) / len(cov) * np.eye(len(cov))


def test_fitted_kernels_load_into_fresh_instances():
    x = t(with_covariance(COV))
    for fitted, fresh in [(MahalanobisKernel().fit(x), MahalanobisKernel()),
                          (SpectralKernel(form="eigen").fit(x), SpectralKernel(form="eigen"))]:
        fresh.load_state_dict(fitted.state_dict())
        torch.testing.assert_close(fresh(t(A), t(B)), fitted(t(A), t(B)))


# Every registered kernel: finite values and gradients on extreme inputs.

VARIANTS = [(name, {}) for name in sorted(KERNELS)] + [
    ("spectral", {"form": "eigen"}),
    ("mahalanobis", {"learnable": True}),
    ("polynomial", {"degree": 3}),
]


@st.composite
def embedding_pairs(draw):
    rows, dim = draw(st.integers(1, 4)), draw(st.integers(1, 5))
    entries = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32)
    a = torch.tensor(draw(st.lists(entries, min_size=rows * dim, max_size=rows * dim)))
    b = torch.tensor(draw(st.lists(entries, min_size=rows * dim, max_size=rows * dim)))
    same = torch.tensor(draw(st.lists(st.booleans(), min_size=rows, max_size=rows)))
    a, b = a.view(rows, dim), b.view(rows, dim)
    return a, torch.where(same[:, None], a, b)


VARIANT_IDS = [",".join([n, *(f"{k}={v}" for k, v in p.items())]) for n, p in VARIANTS]


@pytest.mark.parametrize(("name", "params"), VARIANTS, ids=VARIANT_IDS)
@settings(max_examples=30, deadline=None)
@given(pair=embedding_pairs())
def test_log_kernel_and_input_gradients_are_finite_on_extreme_embeddings(name, params, pair):
    a, b = (x.clone().requires_grad_() for x in pair)
    if "dim" in KERNELS.parameters(name):
        params = {**params, "dim": a.shape[1]}
    log_k = kernel(name, **params)(a, b)
    assert log_k.shape == (a.shape[0],)
    assert torch.isfinite(log_k).all()
    log_k.sum().backward()
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()


def test_every_kernel_is_a_kernel_module():
    for name in KERNELS:
        assert isinstance(kernel(name), Kernel), name
        assert kernel(name).name == name


# Errors name the kernel and the parameter.

def test_unknown_kernel_name_raises():
    with pytest.raises(ValueError, match="unknown kernel 'gaussian'"):
        kernel("gaussian")


def test_unknown_parameter_raises():
    with pytest.raises(ValueError, match="kernel 'rbf' has no parameter 'bandwidth'"):
        kernel("rbf", bandwidth=1.0)


@pytest.mark.parametrize(("name", "params", "field"), [
    ("rbf", {"sigma": 0.0}, "sigma"),
    ("rbf", {"sigma": -1.0}, "sigma"),
    ("polynomial", {"degree": 0}, "degree"),
    ("polynomial", {"c": -1.0}, "c"),
    ("polynomial", {"c": 0.0, "learnable": True}, "c"),
    ("mahalanobis", {"shrinkage": 1.5}, "shrinkage"),
    ("mahalanobis", {"dim": 0}, "dim"),
    ("spectral", {"form": "fourier"}, "form"),
    ("spectral", {"scales": (1.0, 0.0)}, "scales"),
    ("spectral", {"weights": (1.0,)}, "weights"),
    ("spectral", {"form": "eigen", "rank": 0}, "rank"),
    ("spectral", {"form": "eigen", "temperature": 0.0}, "temperature"),
    ("spectral", {"form": "eigen", "learnable": True}, "learnable"),
    ("hmk", {"weight_logits": {"tau": (-math.inf, -math.inf)}}, "weight_logits"),
    ("hmk", {"weight_logits": {"locals": (0.0, 0.0)}}, "weight_logits"),
    ("hmk", {"sigma": 0.0}, "sigma"),
])
def test_bad_parameter_values_raise_naming_kernel_and_parameter(name, params, field):
    with pytest.raises(ValueError, match=rf"{name} kernel.*{field}"):
        kernel(name, **params)


def test_inputs_of_wrong_shape_or_dimension_raise():
    with pytest.raises(ValueError, match="rbf kernel.*same shape"):
        RBFKernel()(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="mahalanobis kernel.*dimension 3"):
        MahalanobisKernel(dim=3)(torch.zeros(2, 4), torch.zeros(2, 4))
