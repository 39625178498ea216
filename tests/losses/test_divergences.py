"""Token-level divergences: values against hand computations (numpy) and POT's exact solver,
identities between them, the top-k coarse-graining, and finiteness at the extremes."""

from __future__ import annotations

import math

import numpy as np
import ot
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from raypo.losses.batch import TopKLogits
from raypo.losses.divergences import DIVERGENCES, LOG_FLOOR, Divergence, divergence

LN2 = math.log(2.0)
F_NAMES = ["kl", "reverse_kl", "chi2", "tv", "js", "hellinger"]


# Plain numpy definitions, written from the textbook formulas (p, q strictly positive).
def np_kl(p, q):
    return float(np.sum(p * np.log(p / q)))


def np_js(p, q):
    m = (p + q) / 2
    return 0.5 * np_kl(p, m) + 0.5 * np_kl(q, m)


def np_renyi(alpha):
    return lambda p, q: float(np.log(np.sum(p**alpha * q ** (1 - alpha))) / (alpha - 1))


NUMPY = {
    ("kl", ()): np_kl,
    ("js", ()): np_js,
    ("hellinger", ()): lambda p, q: float(1 - np.sum(np.sqrt(p * q))),
    ("renyi", ()): np_renyi(2.0),
    ("renyi", (("alpha", 1.01),)): np_renyi(1.01),
    ("renyi", (("alpha", 0.5),)): np_renyi(0.5),
    ("renyi", (("alpha", 3.0),)): np_renyi(3.0),
    ("bhattacharyya", ()): lambda p, q: float(-np.log(np.sum(np.sqrt(p * q)))),
    ("fdiv", ()): lambda p, q: np_kl(q, p),
    ("fdiv", (("f", "kl"),)): np_kl,
    ("fdiv", (("f", "reverse_kl"),)): lambda p, q: np_kl(q, p),
    ("fdiv", (("f", "chi2"),)): lambda p, q: float(np.sum((p - q) ** 2 / q)),
    ("fdiv", (("f", "tv"),)): lambda p, q: float(0.5 * np.sum(np.abs(p - q))),
    ("fdiv", (("f", "js"),)): np_js,
    ("fdiv", (("f", "hellinger"),)): lambda p, q: float(np.sum(q * (np.sqrt(p / q) - 1) ** 2) / 2),
}
CASES = [pytest.param(name, dict(params), fn, id=f"{name}{dict(params) or ''}")
         for (name, params), fn in NUMPY.items()]
# Every registered divergence, with the variants the property tests also cover.
EMBEDDINGS = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
ALL = [(name, dict(params)) for name, params in NUMPY] + [
    ("wasserstein", {}),
    ("wasserstein", {"token_embeddings": EMBEDDINGS}),
]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Every tensor here is tiny: splitting an op over threads costs more than it saves, and
    # far more when another process holds a core (a thread waits on a descheduled peer).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_every_registered_divergence_is_covered():
    assert {name for name, _ in ALL} == set(DIVERGENCES)


def logits_of(probs) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float64).log()


def random_pair(seed: int, shape=(3, 7), dtype=torch.float64, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=dtype) * scale,
            torch.randn(shape, generator=g, dtype=dtype) * scale)


@pytest.mark.parametrize("name, params, fn", CASES)
@pytest.mark.parametrize("p, q", [([0.5, 0.5], [0.9, 0.1]), ([0.2, 0.5, 0.3], [0.1, 0.6, 0.3])])
def test_value_matches_the_hand_computation(name, params, fn, p, q):
    got = divergence(name, **params)(logits_of(p), logits_of(q))
    assert got.item() == pytest.approx(fn(np.array(p), np.array(q)), rel=1e-9, abs=1e-12)


def test_kl_of_a_fair_coin_from_a_biased_one_by_hand():
    # 0.5 log(0.5 / 0.9) + 0.5 log(0.5 / 0.1) = 0.5 log(25 / 9)
    got = divergence("kl")(logits_of([0.5, 0.5]), logits_of([0.9, 0.1]))
    assert got.item() == pytest.approx(0.5 * math.log(25 / 9), rel=1e-12)


@pytest.mark.parametrize("name, params", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_divergence_is_exactly_zero_at_p_equals_q_and_positive_otherwise(name, params, dtype):
    d = divergence(name, **params)
    p, q = random_pair(1, shape=(4, 8), dtype=dtype)
    p[0, :3] = -math.inf  # exact zeros in P
    p[1, 1:] = -math.inf  # a point mass
    for pp, qq in [(p, p), (p, TopKLogits.from_logits(p, 3)), (TopKLogits.from_logits(p, 3), p)]:
        assert torch.equal(d(pp, qq), torch.zeros(4, dtype=dtype))
    assert (d(p, q) > 1e-4).all()


def test_renyi_tends_to_kl_as_alpha_tends_to_one():
    p, q = random_pair(2)
    kl = divergence("kl")(p, q)
    for alpha in (1 - 1e-4, 1 + 1e-4):
        torch.testing.assert_close(divergence("renyi", alpha=alpha)(p, q), kl, rtol=1e-3, atol=0)
    assert torch.equal(divergence("renyi", alpha=1.0)(p, q), kl)


def test_renyi_increases_with_alpha():
    p, q = random_pair(3)
    values = [divergence("renyi", alpha=a)(p, q) for a in (0.5, 0.9, 1.0, 1.01, 2.0, 5.0)]
    assert all((lo <= hi).all() for lo, hi in zip(values, values[1:], strict=False))


def test_bhattacharyya_is_minus_log_of_one_minus_hellinger():
    p, q = random_pair(4, scale=6.0)  # far apart: covers both of bhattacharyya's forms
    h2 = divergence("hellinger")(p, q)
    assert (h2 > 0.5).any() and (h2 < 0.5).any()
    torch.testing.assert_close(divergence("bhattacharyya")(p, q), -torch.log1p(-h2))


@pytest.mark.parametrize("name, params", [("js", {}), ("fdiv", {"f": "js"})])
def test_js_is_at_most_log2_and_reaches_it_on_disjoint_supports(name, params):
    d = divergence(name, **params)
    p, q = random_pair(5, scale=20.0)
    assert (d(p, q) <= LN2).all()
    disjoint_p = [[0.0, 1.0, -math.inf, -math.inf]]
    disjoint_q = [[-math.inf, -math.inf, 3.0, 0.0]]
    for dtype in (torch.float32, torch.float64):
        value = d(torch.tensor(disjoint_p, dtype=dtype), torch.tensor(disjoint_q, dtype=dtype))
        assert value.item() <= torch.tensor(LN2, dtype=dtype).item()  # log 2 in that dtype
        assert value.item() == pytest.approx(LN2, abs=1e-6)


@pytest.mark.parametrize("f, closed", [("kl", "kl"), ("js", "js"), ("hellinger", "hellinger")])
def test_f_divergence_agrees_with_the_closed_form(f, closed):
    p, q = random_pair(6, scale=4.0)
    p[0, :2] = -math.inf
    q[1, 3:] = -math.inf
    torch.testing.assert_close(divergence("fdiv", f=f)(p, q), divergence(closed)(p, q),
                               rtol=1e-9, atol=1e-12)


def test_f_divergence_tv_is_half_the_l1_distance_and_chi2_is_sum_of_squares_over_q():
    p, q = random_pair(7)
    pn, qn = p.softmax(-1).numpy(), q.softmax(-1).numpy()
    tv = divergence("fdiv", f="tv")(p, q).numpy()
    np.testing.assert_allclose(tv, 0.5 * np.abs(pn - qn).sum(-1), rtol=1e-12)
    chi2 = divergence("fdiv", f="chi2")(p, q).numpy()
    np.testing.assert_allclose(chi2, ((pn - qn) ** 2 / qn).sum(-1), rtol=1e-10)


@pytest.mark.parametrize("name, params, fn", CASES)
def test_top_k_with_every_token_kept_equals_the_full_value(name, params, fn):
    d = divergence(name, **params)
    p, q = random_pair(8)
    full = d(p, q)
    torch.testing.assert_close(d(p, TopKLogits.from_logits(q, 7)), full, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(d(TopKLogits.from_logits(p, 7), q), full, rtol=1e-9, atol=1e-12)


def coarse(probs: np.ndarray, kept: np.ndarray) -> np.ndarray:
    return np.append(probs[kept], 1 - probs[kept].sum())


@pytest.mark.parametrize("name, params, fn", CASES)
def test_top_k_is_the_divergence_of_the_k_plus_one_coarse_bins_and_a_lower_bound(
        name, params, fn):
    d = divergence(name, **params)
    p, q = random_pair(9, shape=(2, 10))
    full = d(p, q)
    for topk_side in ("p", "q"):
        cached = TopKLogits.from_logits(p if topk_side == "p" else q, 4)
        got = d(cached, q) if topk_side == "p" else d(p, cached)
        assert (got <= full + 1e-12).all()
        for row in range(2):
            kept = cached.indices[row].numpy()
            pn, qn = p[row].softmax(-1).numpy(), q[row].softmax(-1).numpy()
            assert got[row].item() == pytest.approx(fn(coarse(pn, kept), coarse(qn, kept)),
                                                    rel=1e-9)


# Wasserstein. For unit vectors the cost is in [0, 2]; the debiased Sinkhorn divergence S
# satisfies |S - W1| <= reg * (H(a) + H(b)) (each entropic OT lies in [W - reg(H(a) + H(b)), W],
# and OT(a, a) in [-2 reg H(a), 0]), so that bound, plus 1e-8 for convergence, is the tolerance.
def entropy(x: np.ndarray) -> float:
    return float(-(x * np.log(x)).sum())


def precise_wasserstein(**params):
    return divergence("wasserstein", reg=1e-3, max_iter=20000, tol=1e-12, **params)


@pytest.mark.parametrize("seed", range(4))
def test_wasserstein_matches_pot_exact_emd_on_small_cases(seed):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(6, 3, generator=g, dtype=torch.float64)
    p, q = torch.randn(2, 6, generator=g, dtype=torch.float64) * 1.5
    unit = (emb / emb.norm(dim=-1, keepdim=True)).numpy()
    cost = np.linalg.norm(unit[:, None] - unit[None], axis=-1)
    a, b = p.softmax(-1).numpy(), q.softmax(-1).numpy()
    exact = ot.emd2(a, b, cost)
    got = precise_wasserstein(token_embeddings=emb, k=6)(p, q).item()
    assert got == pytest.approx(exact, abs=1e-3 * (entropy(a) + entropy(b)) + 1e-8)
    assert got != pytest.approx(exact, abs=1e-9)  # it is the entropic value, not the exact one


def test_wasserstein_without_embeddings_is_total_variation():
    p, q = random_pair(10, shape=(3, 6))
    a, b = p.softmax(-1).numpy(), q.softmax(-1).numpy()
    tv = 0.5 * np.abs(a - b).sum(-1)
    got = precise_wasserstein(k=6)(p, q).numpy()
    bound = np.array([1e-3 * (entropy(x) + entropy(y)) for x, y in zip(a, b, strict=True)])
    assert (np.abs(got - tv) <= bound + 1e-8).all()


def test_wasserstein_top_k_cache_with_every_token_kept_equals_the_full_value():
    p, q = random_pair(11, shape=(2, 6))
    d = precise_wasserstein(k=6, token_embeddings=torch.randn(6, 3, dtype=torch.float64))
    torch.testing.assert_close(d(p, TopKLogits.from_logits(q, 6)), d(p, q), rtol=0, atol=1e-8)


def test_wasserstein_gradient_is_the_envelope_gradient():
    # The value is formed from detached potentials; at convergence its gradient must match a
    # central finite difference of the solved value along a random direction.
    g = torch.Generator().manual_seed(12)
    p = torch.randn(2, 5, generator=g, dtype=torch.float64, requires_grad=True)
    q = torch.randn(2, 5, generator=g, dtype=torch.float64)
    direction = torch.randn(2, 5, generator=g, dtype=torch.float64)
    d = divergence("wasserstein", reg=0.1, k=5, max_iter=5000, tol=1e-12,
                   token_embeddings=torch.randn(5, 3, generator=g, dtype=torch.float64))
    d(p, q).sum().backward()
    h = 1e-5
    with torch.no_grad():
        finite_difference = (d(p + h * direction, q) - d(p - h * direction, q)).sum() / (2 * h)
    assert (p.grad * direction).sum().item() == pytest.approx(finite_difference.item(), rel=1e-6)


# Property tests: extreme logits (down to -1e4, exact zeros) in float32, every divergence,
# full and top-k forms: the value is finite and >= 0, and the gradient is finite.
@st.composite
def extreme_logits(draw, rows=3, vocab=8):
    finite = st.floats(min_value=-1e4, max_value=30.0, allow_nan=False, width=32)
    values = draw(st.lists(finite, min_size=rows * vocab, max_size=rows * vocab))
    zeros = draw(st.lists(st.booleans(), min_size=rows * vocab, max_size=rows * vocab))
    keep = draw(st.lists(st.integers(0, vocab - 1), min_size=rows, max_size=rows))
    x = torch.tensor(values, dtype=torch.float32).reshape(rows, vocab)
    mask = torch.tensor(zeros).reshape(rows, vocab)
    mask[torch.arange(rows), torch.tensor(keep)] = False  # at least one finite entry per row
    return x.masked_fill(mask, -math.inf)


@pytest.mark.parametrize("name, params", ALL)
@settings(max_examples=30, deadline=None, derandomize=True)
@given(p=extreme_logits(), q=extreme_logits())
def test_values_and_gradients_are_finite_at_extreme_logits(name, params, p, q):
    d = divergence(name, **params)
    for form in ("full", "q_top_k", "p_top_k"):
        policy = p.clone().requires_grad_(True)
        if form == "full":
            value = d(policy, q)
        elif form == "q_top_k":
            value = d(policy, TopKLogits.from_logits(q, 3))
        else:  # the cached side is P: the gradient flows into the full Q side
            value = d(TopKLogits.from_logits(q, 3), policy)
        assert torch.isfinite(value).all(), (form, value)
        assert (value >= -1e-6).all(), (form, value)
        value.sum().backward()
        assert torch.isfinite(policy.grad).all(), (form, policy.grad)


def test_log_floor_is_log_of_1e_minus_20():
    assert math.exp(LOG_FLOOR) == pytest.approx(1e-20)


def test_every_divergence_is_a_divergence_module():
    assert all(issubclass(cls, Divergence) for cls in DIVERGENCES.values())


# Errors name what was wrong.
def test_unknown_name_is_rejected_with_the_known_names():
    with pytest.raises(ValueError, match=r"unknown divergence 'kll'.*bhattacharyya"):
        divergence("kll")


def test_unknown_parameter_is_rejected_with_its_name():
    with pytest.raises(ValueError, match=r"'renyi' has no parameter 'beta'.*alpha"):
        divergence("renyi", beta=2.0)


def test_unknown_f_is_rejected_with_the_allowed_names():
    with pytest.raises(ValueError, match=r"unknown f 'kl2'.*reverse_kl.*hellinger"):
        divergence("fdiv", f="kl2")


def test_nonpositive_renyi_order_is_rejected():
    with pytest.raises(ValueError, match="alpha must be > 0"):
        divergence("renyi", alpha=0.0)


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_two_top_k_sides_are_rejected(name):
    p, q = random_pair(13)
    with pytest.raises(ValueError, match="at least one side must be full logits"):
        divergence(name)(TopKLogits.from_logits(p, 3), TopKLogits.from_logits(q, 3))


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_mismatched_shapes_are_rejected_naming_both(name):
    p, q = torch.zeros(2, 5), torch.zeros(3, 5)
    with pytest.raises(ValueError, match=r"\(2, 5\).*\(3, 5\)"):
        divergence(name)(p, q)
    with pytest.raises(ValueError, match=r"\(2, 5\).*\(3, 2\)"):
        divergence(name)(p, TopKLogits.from_logits(q, 2))
