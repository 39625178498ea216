"""Each loss pinned to its formula evaluated by hand, and to the limits where it must equal
another loss."""

from __future__ import annotations

import math

import pytest
import torch

from raypo.losses import LOSSES, PreferenceBatch, build

from .batches import epsilon_batch, full_batch, sequence_batch


def nls(x: float) -> float:
    """-log sigma(x), by hand."""
    return math.log1p(math.exp(-x))


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# One pair: h_w = -1 - (-1.5) = 0.5, h_l = -2 - (-1.5) = -0.5, delta = 1, |y_w| = 2, |y_l| = 4.
def one_pair() -> PreferenceBatch:
    return sequence_batch(-1.0, -2.0, -1.5, -1.5, len_w=[2], len_l=[4])


HAND_VALUES = {
    ("dpo", ()): nls(0.1),
    ("ipo", ()): (0.5 / 2 + 0.5 / 4 - 1 / 0.2) ** 2,
    ("hinge", ()): 0.9,
    ("cdpo", ()): 0.9 * nls(0.1) + 0.1 * nls(-0.1),
    ("robust", ()): (0.9 * nls(0.1) - 0.1 * nls(-0.1)) / 0.8,
    ("simpo", ()): nls(2.0 * (-1.0 / 2 - -2.0 / 4) - 1.0),
    ("rdpo", ()): nls(0.1 + 0.01 * (2 - 4)),
    ("fdpo", (("divergence", "reverse_kl"),)): nls(0.1),
    ("fdpo", (("divergence", "forward_kl"),)): nls(0.1 * (-math.exp(-0.5) + math.exp(0.5))),
    ("fdpo", (("divergence", "js"),)): nls(
        0.1 * (math.log(2 * math.exp(0.5) / (1 + math.exp(0.5)))
               - math.log(2 * math.exp(-0.5) / (1 + math.exp(-0.5))))),
    ("fdpo", (("divergence", "alpha"), ("alpha", 0.3))): nls(
        0.1 * ((1 - math.exp(0.5) ** -0.3) / 0.3 - (1 - math.exp(-0.5) ** -0.3) / 0.3)),
    ("cal_dpo", ()): nls(1.0) + 0.5 * ((0.5 - 5) ** 2 + (-0.5 + 5) ** 2),
    ("cal_dpo", (("length_normalize", True),)): nls(0.25 + 0.125)
    + 0.5 * ((0.25 - 5) ** 2 + (-0.125 + 5) ** 2),
    ("mi_dpo", ()): nls(0.1),
    ("beta_dpo", ()): nls(0.1),  # one pair: M_sel = M0, so beta_b = beta0
    # TRL's loss types (beta 0.1: beta h_w = 0.05, beta h_l = -0.05, beta delta = 0.1)
    ("exo_pair", ()): sig(0.1) * (math.log(sig(0.1)) - math.log(0.999))
    + sig(-0.1) * (math.log(sig(-0.1)) - math.log(0.001)),
    ("exo_pair", (("eps", 0.2),)): sig(0.1) * (math.log(sig(0.1)) - math.log(0.8))
    + sig(-0.1) * (math.log(sig(-0.1)) - math.log(0.2)),
    ("nca_pair", ()): nls(0.05) + 0.5 * nls(-0.05) + 0.5 * nls(0.05),
    ("bco_pair", ()): nls(0.05) + nls(0.05),
    ("sppo_hard", ()): (0.5 - 5) ** 2 + (-0.5 + 5) ** 2,
    ("apo_zero", ()): (1 - sig(0.05)) + sig(-0.05),
    ("apo_down", ()): sig(0.05) + (1 - sig(0.1)),
    ("discopop", ()): (1 - sig(0.1 / 0.05)) * nls(0.1) + sig(0.1 / 0.05) * math.exp(-0.1),
    ("sigmoid_norm", ()): nls(0.1 * (0.5 / 2 + 0.5 / 4)),
    # one pair: sorting the batch changes nothing, AOT is cDPO
    ("aot", (("eps", 0.2),)): 0.8 * nls(0.1) + 0.2 * nls(-0.1),
    ("aot_unpaired", ()): nls(0.1),
}


@pytest.mark.parametrize("name,params", list(HAND_VALUES), ids=lambda x: str(x))
def test_loss_matches_formula_by_hand(name, params):
    out = build(name, **dict(params))(one_pair())
    assert out.loss.item() == pytest.approx(HAND_VALUES[(name, params)], rel=1e-9)


def test_rewards_are_beta_times_log_ratios():
    out = build("dpo", beta=0.2)(one_pair())
    assert out.chosen_rewards.item() == pytest.approx(0.2 * 0.5)
    assert out.rejected_rewards.item() == pytest.approx(0.2 * -0.5)
    assert out.metrics["reward_accuracy"].item() == 1.0
    simpo = build("simpo", beta=2.0)(one_pair())
    assert simpo.chosen_rewards.item() == pytest.approx(2.0 * -1.0 / 2)


def test_loss_is_batch_mean():
    batch = sequence_batch([-1.0, -3.0, -2.0], [-2.0, -1.0, -2.5], [-1.5, -2.0, -2.0],
                           [-1.5, -2.0, -1.0])
    delta = [1.0, -2.0, 1.5]
    expected = sum(nls(0.1 * d) for d in delta) / 3
    assert build("dpo").forward(batch).loss.item() == pytest.approx(expected)


def test_cal_dpo_targets_are_plus_minus_half_over_beta():
    beta = 0.25
    # h_w = +2 = 1/(2 beta), h_l = -2: the calibration term vanishes.
    at_target = build("cal_dpo", beta=beta)(sequence_batch(0.0, -4.0, -2.0, -2.0))
    assert at_target.metrics["calibration"].item() == pytest.approx(0.0, abs=1e-12)
    for h_w, h_l in [(2.1, -2.0), (1.9, -2.0), (2.0, -1.5), (0.0, 0.0)]:
        off = build("cal_dpo", beta=beta)(sequence_batch(h_w, h_l, 0.0, 0.0))
        assert off.metrics["calibration"].item() > 0
    # and its gradient in h is zero there (a minimum, not just a zero)
    batch = sequence_batch(0.0, -4.0, -2.0, -2.0)
    loss_fn = build("cal_dpo", beta=beta)
    calib = lambda b: 0.5 * ((b.chosen_logratios - 2) ** 2 + (b.rejected_logratios + 2) ** 2)  # noqa: E731
    calib(batch).sum().backward()
    assert batch.policy_chosen_logps.grad.abs().item() == 0.0
    assert loss_fn(batch).loss.item() == pytest.approx(nls(4.0))


# --- limits where one loss equals another -------------------------------------------------

def _same_loss_and_grads(a, b, batch_fn, params_a=None):
    batch_a, batch_b = batch_fn(), batch_fn()
    out_a, out_b = a(batch_a), b(batch_b)
    torch.testing.assert_close(out_a.loss, out_b.loss, rtol=1e-10, atol=1e-12)
    out_a.loss.backward()
    out_b.loss.backward()
    for x, y in zip(_leaves(batch_a), _leaves(batch_b), strict=True):
        # a field one loss ignores gets no gradient (None) where the other may get zeros
        ga = torch.zeros_like(x) if x.grad is None else x.grad
        gb = torch.zeros_like(y) if y.grad is None else y.grad
        torch.testing.assert_close(ga, gb, rtol=1e-9, atol=1e-12)


def _leaves(batch):
    return [v for v in vars(batch).values()
            if isinstance(v, torch.Tensor) and v.requires_grad and v.is_leaf]


EQUAL_PAIRS = [
    (("fdpo", {"divergence": "reverse_kl", "beta": 0.3}), ("dpo", {"beta": 0.3})),
    (("mi_dpo", {"prior": "reference", "beta": 0.3}), ("dpo", {"beta": 0.3})),
    (("mi_dpo", {"prior": "simpo", "beta": 2.0, "gamma": 0.7}),
     ("simpo", {"beta": 2.0, "gamma": 0.7})),
    (("mi_dpo", {"prior": "rdpo", "beta": 0.2, "alpha": 0.03}),
     ("rdpo", {"beta": 0.2, "alpha": 0.03})),
    (("mi_dpo", {"prior": "tdpo1", "beta": 0.2}), ("tdpo", {"beta": 0.2, "version": 1})),
    (("mi_dpo", {"prior": "tdpo2", "beta": 0.2, "alpha": 0.4}),
     ("tdpo", {"beta": 0.2, "version": 2, "alpha": 0.4})),
    (("kernel_dpo", {"gamma": 0.0, "beta": 0.2}), ("dpo", {"beta": 0.2})),
    (("epsilon_dpo", {"eps": 0.0, "beta": 0.2}), ("dpo", {"beta": 0.2})),
    (("cdpo", {"eps": 0.0}), ("dpo", {})),
    (("robust", {"eps": 0.0}), ("dpo", {})),
    (("rdpo", {"alpha": 0.0}), ("dpo", {})),
    (("tdpo", {"version": 2, "alpha": 1.0}), ("tdpo", {"version": 1})),  # values, not grads
]


@pytest.mark.parametrize("a,b", EQUAL_PAIRS, ids=lambda p: f"{p[0]}{p[1]}")
def test_limit_losses_are_equal(a, b):
    loss_a, loss_b = build(a[0], **a[1]), build(b[0], **b[1])
    if a[0] == "tdpo":
        torch.testing.assert_close(loss_a(full_batch()).loss, loss_b(full_batch()).loss)
        return
    _same_loss_and_grads(loss_a, loss_b, lambda: full_batch(seed=3))


def test_tdpo2_stops_the_gradient_of_the_chosen_sequential_kl():
    # Same value as TDPO1 with alpha = 1, but y_w's SeqKL sends no gradient to its logits.
    b1, b2 = full_batch(seed=1), full_batch(seed=1)
    tdpo1, tdpo2 = build("tdpo", version=1), build("tdpo", version=2, alpha=1.0)
    out1, out2 = tdpo1(b1), tdpo2(b2)
    out1.loss.backward()
    out2.loss.backward()
    assert not torch.allclose(b1.policy_chosen_logits.grad, b2.policy_chosen_logits.grad)
    torch.testing.assert_close(b1.policy_rejected_logits.grad, b2.policy_rejected_logits.grad)


def test_sparsepo_prior_equals_sparsepo_written_directly():
    direct = build("sparsepo", beta=0.2, hidden_size=6)
    via_prior = build("mi_dpo", prior="sparsepo", beta=0.2, hidden_size=6)
    with torch.no_grad():  # a non-trivial mask head, the same in both
        g = torch.Generator().manual_seed(5)
        w, b = torch.randn(2, 6, generator=g), torch.randn(2, generator=g)
        for head in (direct.head, via_prior.prior.head):
            head.proj.weight.copy_(w)
            head.proj.bias.copy_(b)
    direct.double()
    via_prior.double()
    _same_loss_and_grads(direct, via_prior, lambda: full_batch(seed=4))


def test_sparsepo_with_unit_masks_and_no_l1_is_tdpo1():
    # The mask head starts at m_u = m_d = 1 on every token: SparsePO is then TDPO1.
    sparse = build("sparsepo", beta=0.2, l1=0.0, hidden_size=6).double()
    tdpo1 = build("tdpo", beta=0.2, version=1)
    torch.testing.assert_close(sparse(full_batch(seed=2)).loss, tdpo1(full_batch(seed=2)).loss)


def test_learnable_prior_starts_as_dpo_and_learns():
    learn = build("mi_dpo", prior="learnable", beta=0.3).double()
    _same_loss_and_grads(learn, build("dpo", beta=0.3), lambda: full_batch(seed=6))
    learn(full_batch(seed=6)).loss.backward()
    assert learn.prior.theta.grad is not None and learn.prior.theta.grad.abs() > 0


def test_learnable_prior_at_rho_zero_is_simpo_without_margin():
    learn = build("mi_dpo", prior="learnable", beta=2.0, rho=0.0).double()
    simpo = build("simpo", beta=2.0, gamma=0.0)
    torch.testing.assert_close(learn(full_batch(seed=7)).loss, simpo(full_batch(seed=7)).loss)


@pytest.mark.parametrize("component", ["rbf", "polynomial", "spectral", "mahalanobis"])
def test_hmk_with_all_weight_on_one_kernel_equals_kernel_dpo(component):
    is_local = component in ("rbf", "polynomial")
    local, other = ("local", "global") if is_local else ("global", "local")
    first = component in ("rbf", "spectral")
    one_hot = (0.0, float("-inf")) if first else (float("-inf"), 0.0)
    logits = {"tau": (0.0, float("-inf")) if local == "local" else (float("-inf"), 0.0),
              local: one_hot, other: (0.0, float("-inf"))}
    hmk = build("hmk_dpo", beta=0.2, gamma=0.5, weight_logits=logits, dim=3).double()
    single = build("kernel_dpo", beta=0.2, gamma=0.5, kernel=component).double()
    a, b = hmk(full_batch(seed=8)), single(full_batch(seed=8))
    torch.testing.assert_close(a.loss, b.loss)
    assert a.metrics["kernel_entropy"].item() == 0.0


def test_kernel_dpo_embedding_term_by_hand():
    batch = sequence_batch(-1.0, -2.0, -1.5, -1.5)
    batch.prompt_embeddings = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    batch.chosen_embeddings = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    batch.rejected_embeddings = torch.tensor([[2.0, 1.0]], dtype=torch.float64)
    out = build("kernel_dpo", kernel="rbf", sigma=1.0, gamma=0.5, beta=0.1)(batch)
    log_k_w, log_k_l = -1.0 / 2, -5.0 / 2
    assert out.loss.item() == pytest.approx(nls(0.1 * 1.0 + 0.5 * (log_k_w - log_k_l)))


def test_kernel_dpo_penalty_is_alpha_times_mean_token_divergence():
    from raypo.losses import divergence
    batch = full_batch(seed=9)
    plain = build("kernel_dpo", gamma=0.3).double()(full_batch(seed=9)).loss
    with_pen = build("kernel_dpo", gamma=0.3, divergence="js", alpha_div=0.5).double()(batch)
    js = divergence("js")
    per_pair = []
    for i in range(batch.chosen_mask.shape[0]):
        values = []
        for logits, ref, mask in ((batch.policy_chosen_logits, batch.ref_chosen_logits,
                                   batch.chosen_mask),
                                  (batch.policy_rejected_logits, batch.ref_rejected_logits,
                                   batch.rejected_mask)):
            for t in range(mask.shape[1]):
                if mask[i, t]:
                    values.append(js(logits[i, t], ref[i, t]).item())
        per_pair.append(sum(values) / len(values))
    expected = plain.item() + 0.5 * sum(per_pair) / len(per_pair)
    assert with_pen.loss.item() == pytest.approx(expected, rel=1e-9)
    assert with_pen.metrics["divergence_penalty"].item() == pytest.approx(
        sum(per_pair) / len(per_pair))


def test_kernel_dpo_routes_parameters_and_rejects_unknown_ones():
    loss = build("kernel_dpo", kernel="polynomial", degree=3, c=0.5, divergence="renyi",
                 alpha=1.5)
    assert loss.penalty.divergence.alpha == 1.5
    with pytest.raises(ValueError, match="unknown parameter 'sigmaa'"):
        build("kernel_dpo", kernel="rbf", sigmaa=1.0)


# --- epsilon-DPO ----------------------------------------------------------------------------

@pytest.mark.parametrize("direction,sign", [(1.0, 1.0), (-1.0, -1.0)])
def test_epsilon_dpo_sign_rule(direction, sign):
    loss = build("epsilon_dpo", beta=0.1, eps=0.05)
    batch = epsilon_batch(direction)
    s = loss.perturbation_signs(batch)
    assert torch.all(s == sign)
    out = loss(batch)
    assert out.metrics["beta_pair_mean"].item() == pytest.approx(0.1 / (1 + 0.05 * sign))
    loss.on_step_end()
    assert loss.beta.item() == pytest.approx(0.1 / (1 + 0.05 * sign))


def test_epsilon_dpo_sign_zero_when_policy_equals_reference():
    loss = build("epsilon_dpo", eps=0.05)
    assert torch.all(loss.perturbation_signs(epsilon_batch(0.0)) == 0)


def test_epsilon_dpo_beta_update_uses_the_mean_over_the_whole_step():
    loss = build("epsilon_dpo", beta=0.1, eps=0.1)
    loss(epsilon_batch(1.0))   # micro-batch 1: s = +1 on 4 pairs
    loss(epsilon_batch(1.0))   # micro-batch 2: +1 on 4 more
    loss(epsilon_batch(-1.0))  # micro-batch 3: -1 on 4
    loss.on_step_end()
    assert loss.beta.item() == pytest.approx(0.1 / (1 + 0.1 * (4 / 12)))
    loss.on_step_end()  # nothing gathered since: beta stays
    assert loss.beta.item() == pytest.approx(0.1 / (1 + 0.1 * (4 / 12)))
    state = loss.state_dict()
    resumed = build("epsilon_dpo", beta=0.1, eps=0.1)
    resumed.load_state_dict(state)
    assert resumed.beta.item() == pytest.approx(loss.beta.item())


def test_epsilon_dpo_in_eval_mode_gathers_nothing():
    loss = build("epsilon_dpo", beta=0.1, eps=0.1).eval()
    loss(epsilon_batch(1.0))
    loss.on_step_end()
    assert loss.beta.item() == pytest.approx(0.1)


# --- beta-DPO -------------------------------------------------------------------------------

def test_beta_dpo_batch_beta_and_filter_by_hand():
    # margins delta = [0, 1, 2, 10, 3]; h_l = 0 so delta = h_w.
    deltas = [0.0, 1.0, 2.0, 10.0, 3.0]
    batch = sequence_batch(deltas, [0.0] * 5, [0.0] * 5, [0.0] * 5)
    loss = build("beta_dpo", beta=0.1, a=0.3, keep=0.8)
    out = loss(batch)
    m0 = sum(deltas) / 5  # first step: M0 is the batch mean, 3.2
    # Gaussian weights around 3.2 keep the 4 closest margins: 3, 2, 1, 0 (10 is dropped)
    kept = [0.0, 1.0, 2.0, 3.0]
    beta_b = 0.1 * (1 + 0.3 * (sum(kept) / 4 - m0))
    assert out.metrics["beta_batch"].item() == pytest.approx(beta_b)
    expected = sum(nls(beta_b * d) for d in kept) / 4
    assert out.loss.item() == pytest.approx(expected)
    loss.on_step_end()
    assert loss.m0.item() == pytest.approx(m0)
    loss(sequence_batch([5.0] * 5, [0.0] * 5, [0.0] * 5, [0.0] * 5))
    loss.on_step_end()
    assert loss.m0.item() == pytest.approx(0.9 * m0 + 0.1 * 5.0)
    resumed = build("beta_dpo", beta=0.1)
    resumed.load_state_dict(loss.state_dict())
    assert resumed.m0.item() == pytest.approx(loss.m0.item()) and bool(resumed.m0_initialized)


def test_beta_dpo_beta_never_below_floor():
    batch = sequence_batch([0.0, -50.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0])
    loss = build("beta_dpo", beta=0.1, a=0.6, keep=0.5)
    loss.m0.fill_(100.0)
    loss.m0_initialized.fill_(True)
    assert loss(batch).metrics["beta_batch"].item() == pytest.approx(1e-3)



# --- R-DPO: the sign of the length term, from the paper's objective ---------------------------

@pytest.mark.parametrize("loss", [("rdpo", {}), ("mi_dpo", {"prior": "rdpo"})], ids=str)
@pytest.mark.parametrize("len_w,len_l", [(100, 20), (20, 100)])
def test_rdpo_length_penalty_follows_the_papers_objective(loss, len_w, len_l):
    # Park et al. 2024 maximise E[r(x, y)] - alpha |y| under the KL constraint: the reward the
    # policy carries is r - alpha |y|, so Bradley-Terry on it gives
    # -log sigma(beta delta + alpha (|y_w| - |y_l|)). With delta = 0, beta 0.1, alpha 0.01 and
    # the chosen response longer: 0.371 (gradient on log pi(y_w) -0.031) against DPO's 0.693
    # (-0.050); the rejected longer: 1.171 (-0.069).
    name, params = loss
    beta, alpha = 0.1, 0.01
    runs = {}
    for label, (n, p) in {"rdpo": (name, {**params, "beta": beta, "alpha": alpha}),
                          "dpo": ("dpo", {"beta": beta})}.items():
        batch = sequence_batch(-30.0, -40.0, -30.0, -40.0, len_w=[len_w], len_l=[len_l])
        out = build(n, **p)(batch)
        out.loss.backward()
        runs[label] = (out.loss.item(), batch.policy_chosen_logps.grad.item())
    gap = alpha * (len_w - len_l)
    assert runs["rdpo"][0] == pytest.approx(nls(gap), rel=1e-12)
    assert runs["rdpo"][1] == pytest.approx(-beta * sig(-gap), rel=1e-12)
    assert runs["dpo"] == pytest.approx((math.log(2), -beta / 2), rel=1e-12)
    chosen_longer = len_w > len_l
    assert (runs["rdpo"][0] < runs["dpo"][0]) == chosen_longer
    assert (abs(runs["rdpo"][1]) < abs(runs["dpo"][1])) == chosen_longer
    if chosen_longer:  # the issue's numbers
        assert (round(runs["rdpo"][0], 3), round(runs["rdpo"][1], 3)) == (0.371, -0.031)


# --- fdpo far below the clamp ------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("divergence", ["forward_kl", "alpha"])
def test_fdpo_keeps_the_chosen_gradient_where_its_log_ratio_falls_past_minus_50(divergence,
                                                                               dtype):
    # The loss keeps growing as h(y_w) falls, so descent must keep raising log pi(y_w): the
    # gradient on it stays negative (and finite) at h = -60 and with log-probs of -1e4, where a
    # clamp of h at -50 gave exactly 0.
    loss_fn = build("fdpo", divergence=divergence, alpha=0.5)
    values = []
    for policy_w, ref_w in [(-49.0, 0.0), (-50.0, 0.0), (-60.0, 0.0), (-1e4, -5.0)]:
        batch = sequence_batch(policy_w, -3.0, ref_w, -3.0, dtype=dtype)
        out = loss_fn(batch)
        out.loss.backward()
        grad = batch.policy_chosen_logps.grad.item()
        assert math.isfinite(out.loss.item()) and math.isfinite(grad)
        assert grad < 0, (policy_w, grad)
        values.append(out.loss.item())
    assert values == sorted(values)  # the loss grows as h(y_w) falls


def test_fdpo_continuation_is_the_tangent_at_minus_50():
    from raypo.losses.fdpo import _exp_neg
    for a in (1.0, 0.3):
        h = torch.tensor([-50.0, -60.0, -1e4, 3.0], dtype=torch.float64, requires_grad=True)
        values = _exp_neg(h, a)
        values.sum().backward()
        e50 = math.exp(50 * a)
        assert values[0].item() == pytest.approx(e50, rel=1e-12)
        assert values[1].item() == pytest.approx(e50 * (1 + a * 10), rel=1e-12)
        assert values[3].item() == pytest.approx(math.exp(-3 * a), rel=1e-12)
        assert h.grad[1].item() == pytest.approx(-a * e50, rel=1e-12)  # the slope at -50
        assert h.grad[3].item() == pytest.approx(-a * math.exp(-3 * a), rel=1e-12)


# --- smaller corrections ------------------------------------------------------------------------

def test_mi_dpo_simpo_prior_equals_simpo_to_float64_precision_with_integer_lengths():
    # The trainer's lengths are integer counts: 1/|y| must not be taken in float32.
    g = torch.Generator().manual_seed(0)
    n_w, n_l = torch.randint(1, 500, (64,), generator=g), torch.randint(1, 500, (64,), generator=g)

    def batch():
        gen = torch.Generator().manual_seed(1)
        b = sequence_batch((-n_w * torch.rand(64, generator=gen, dtype=torch.float64)).tolist(),
                           (-n_l * torch.rand(64, generator=gen, dtype=torch.float64)).tolist(),
                           [0.0] * 64, [0.0] * 64)
        b.chosen_lengths, b.rejected_lengths = n_w, n_l
        return b

    a, b = batch(), batch()
    via_prior = build("mi_dpo", prior="simpo", beta=2.0, gamma=0.7)(a)
    direct = build("simpo", beta=2.0, gamma=0.7)(b)
    torch.testing.assert_close(via_prior.loss, direct.loss, rtol=1e-12, atol=0)
    via_prior.loss.backward()
    direct.loss.backward()
    torch.testing.assert_close(a.policy_chosen_logps.grad, b.policy_chosen_logps.grad,
                               rtol=1e-12, atol=1e-15)


def test_kernel_dpo_takes_a_zero_penalty_weight():
    # alpha_div = 0 is an ablation point: the penalty is computed and logged, weighing nothing.
    zero = build("kernel_dpo", gamma=0.3, divergence="js", alpha_div=0.0)(full_batch(seed=9))
    plain = build("kernel_dpo", gamma=0.3)(full_batch(seed=9))
    assert zero.loss.item() == pytest.approx(plain.loss.item(), rel=1e-12)
    assert zero.metrics["divergence_penalty"].item() > 0
    assert build("hmk_dpo", alpha_div=0.0, divergence="kl").alpha_div == 0.0


def test_sft_is_the_token_mean_nll_of_the_chosen_responses_over_the_batch():
    batch = sequence_batch([-3.0, -3.0], [-1.0, -2.0], [0.0, 0.0], [0.0, 0.0],
                           len_w=[2, 1], len_l=[1, 1])
    batch.policy_chosen_token_logps = torch.tensor([[-1.0, -2.0, 0.0], [-3.0, 0.0, 0.0]],
                                                   dtype=torch.float64, requires_grad=True)
    batch.chosen_mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    out = build("sft")(batch)
    assert out.loss.item() == pytest.approx((1 + 2 + 3) / 3)  # not (1.5 + 3) / 2
    out.loss.backward()
    torch.testing.assert_close(batch.policy_chosen_token_logps.grad,
                               -batch.chosen_mask / 3)
    assert out.chosen_rewards.tolist() == [-1.5, -3.0]  # the mean log-prob per token


def test_aot_unpaired_ignores_which_rejected_response_was_paired_with_which():
    batch = full_batch(seed=12)
    shuffled = full_batch(seed=12)
    order = torch.tensor([2, 0, 3, 1])
    for f in ("policy_rejected_logps", "ref_rejected_logps"):
        setattr(shuffled, f, getattr(shuffled, f)[order])
    unpaired = build("aot_unpaired", eps=0.1)
    assert unpaired(batch).loss.item() == pytest.approx(unpaired(shuffled).loss.item(),
                                                        rel=1e-12)
    paired = build("aot", eps=0.1)
    assert paired(batch).loss.item() != pytest.approx(paired(shuffled).loss.item(), rel=1e-6)


def test_aot_sorts_the_margins_across_the_batch():
    # two pairs: policy gaps logp_w - logp_l = (3, -1), reference gaps (0, 2); sorted:
    # (-1, 3) - (0, 2) = (-1, 1)
    batch = sequence_batch([1.0, -1.0], [-2.0, 0.0], [0.0, 1.0], [0.0, -1.0])
    expected = (nls(0.5 * -1) + nls(0.5 * 1)) / 2
    assert build("aot", beta=0.5)(batch).loss.item() == pytest.approx(expected, rel=1e-12)

# --- the interface ------------------------------------------------------------------------

def test_every_issue_loss_is_registered_and_documented():
    names = {"dpo", "ipo", "hinge", "cdpo", "robust", "simpo", "fdpo", "kernel_dpo", "hmk_dpo",
             "epsilon_dpo", "cal_dpo", "mi_dpo", "tdpo", "sparsepo", "rdpo", "beta_dpo",
             # every TRL 1.16 loss_type (sigmoid is dpo), and its list of them
             "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot", "aot_unpaired", "apo_zero",
             "apo_down", "discopop", "sigmoid_norm", "sft", "mixture"}
    assert names <= set(LOSSES)
    for name in LOSSES:
        doc = LOSSES[name].__doc__ or ""
        assert "arXiv" in doc or "Mitchell" in doc, f"{name}: docstring must cite its paper"
        assert "default" in doc.lower(), f"{name}: docstring must give defaults"


def test_missing_batch_fields_are_named():
    batch = sequence_batch(-1.0, -2.0, -1.5, -1.5)
    with pytest.raises(ValueError, match="policy_chosen_logits"):
        build("tdpo")(batch)
    with pytest.raises(ValueError, match="prompt_embeddings"):
        build("kernel_dpo")(batch)


@pytest.mark.parametrize("name,params,match", [
    ("dpoo", {}, "unknown loss 'dpoo'"),
    ("dpo", {"bta": 0.1}, "has no parameter 'bta'"),
    ("dpo", {"beta": -1.0}, "beta must be > 0"),
    ("cdpo", {"eps": 0.5}, r"eps must be in \[0.0, 0.5\)"),
    ("fdpo", {"divergence": "chi"}, "divergence must be one of"),
    ("mi_dpo", {"prior": "nope"}, "unknown prior 'nope'"),
    ("mi_dpo", {"prior": "simpo", "alpha": 1.0}, "prior 'simpo' has no parameter 'alpha'"),
    ("tdpo", {"version": 3}, "version must be 1 or 2"),
    ("kernel_dpo", {"kernel": "gauss"}, "unknown kernel 'gauss'"),
    ("kernel_dpo", {"divergence": "tv"}, "unknown divergence 'tv'"),
    ("kernel_dpo", {"alpha_div": -0.1}, "alpha_div must be >= 0"),
    ("exo_pair", {"eps": 0.0}, r"eps must be in \(0.0, 0.5\)"),
    ("discopop", {"tau": 0.0}, "tau must be > 0"),
    ("aot", {"eps": 0.5}, r"eps must be in \[0.0, 0.5\)"),
    ("sft", {"beta": 0.1}, "has no parameter 'beta'"),
])
def test_bad_parameters_name_the_field(name, params, match):
    with pytest.raises(ValueError, match=match):
        build(name, **params)


def test_requires_lists_only_what_the_loss_reads():
    assert "policy_chosen_logits" not in build("dpo").requires
    assert "prompt_embeddings" in build("kernel_dpo").requires
    assert "policy_chosen_logits" not in build("kernel_dpo").requires
    assert "policy_chosen_logits" in build("kernel_dpo", divergence="kl").requires
    assert "ref_chosen_logps" not in build("simpo").requires
    assert "ref_chosen_logps" not in build("mi_dpo", prior="simpo").requires
    assert "ref_chosen_hidden" in build("mi_dpo", prior="sparsepo").requires
