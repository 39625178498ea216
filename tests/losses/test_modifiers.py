"""WPO weighting and LD-DPO, the options of the sequence-level losses, against their formulas by
hand and their limits (TRL's own implementations are compared in test_trl.py)."""

from __future__ import annotations

import math

import pytest
import torch

from raypo.losses import LOSSES, build

from .batches import full_batch, leaves, sequence_batch


def nls(x: float) -> float:
    return math.log1p(math.exp(-x))


def token_pair(dtype=torch.float64):
    """One pair: chosen tokens (-1, -2, -3), rejected (-0.5), reference (-1.5, -1, -1) and
    (-1); log sum_v p_v^2 per token for WPO."""
    t = lambda rows: torch.tensor(rows, dtype=dtype)  # noqa: E731
    pw, pl = t([[-1.0, -2.0, -3.0]]).requires_grad_(), t([[-0.5, 0.0, 0.0]]).requires_grad_()
    rw, rl = t([[-1.5, -1.0, -1.0]]), t([[-1.0, 0.0, 0.0]])
    mw, ml = t([[1.0, 1.0, 1.0]]), t([[1.0, 0.0, 0.0]])
    batch = sequence_batch(0.0, 0.0, 0.0, 0.0, len_w=[3], len_l=[1], dtype=dtype)
    batch.policy_chosen_logps, batch.policy_rejected_logps = pw.sum(-1), (pl * ml).sum(-1)
    batch.ref_chosen_logps, batch.ref_rejected_logps = rw.sum(-1), rl.sum(-1)
    batch.policy_chosen_token_logps, batch.policy_rejected_token_logps = pw, pl * ml
    batch.ref_chosen_token_logps, batch.ref_rejected_token_logps = rw, rl
    batch.chosen_mask, batch.rejected_mask = mw, ml
    batch.policy_chosen_log_sum_sq_probs = t([[-0.5, -1.0, -2.0]])
    batch.policy_rejected_log_sum_sq_probs = t([[-0.25, 0.0, 0.0]])
    return batch, (pw, pl)


def test_ld_dpo_weighs_the_tokens_past_the_shared_length_by_hand():
    # shared length 1: chosen logp = -1 + a(-2 - 3), ref -1.5 + a(-1 - 1); rejected untouched.
    a = 0.3
    batch, _ = token_pair()
    out = build("dpo", ld_alpha=a)(batch)
    h_w = (-1 + a * -5) - (-1.5 + a * -2)
    h_l = -0.5 - -1.0
    assert out.loss.item() == pytest.approx(nls(0.1 * (h_w - h_l)), rel=1e-12)
    assert out.chosen_rewards.item() == pytest.approx(0.1 * h_w, rel=1e-12)


def test_ld_dpo_gradient_on_tail_tokens_is_ld_alpha_times_the_shared_ones():
    batch, (pw, _) = token_pair()
    build("dpo", ld_alpha=0.3)(batch).loss.backward()
    assert pw.grad[0, 1].item() == pytest.approx(0.3 * pw.grad[0, 0].item(), rel=1e-12)
    assert pw.grad[0, 2].item() == pytest.approx(0.3 * pw.grad[0, 0].item(), rel=1e-12)


@pytest.mark.parametrize("name", ["dpo", "ipo", "sigmoid_norm", "bco_pair", "fdpo"])
def test_ld_alpha_one_is_the_plain_loss(name):
    plain, ld = full_batch(seed=3), full_batch(seed=3)
    a, b = build(name)(plain), build(name, ld_alpha=1.0)(ld)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-12, atol=1e-14)


def test_ld_dpo_with_equal_lengths_is_the_plain_loss():
    plain, ld = full_batch(seed=4), full_batch(seed=4)
    for b in (plain, ld):  # the rejected responses cut or padded to the chosen lengths
        b.rejected_mask = b.chosen_mask.clone()
        for model in ("policy", "ref"):
            tokens = getattr(b, f"{model}_rejected_token_logps") * b.rejected_mask
            setattr(b, f"{model}_rejected_token_logps", tokens)
            setattr(b, f"{model}_rejected_logps", tokens.sum(-1))
    torch.testing.assert_close(build("dpo")(plain).loss, build("dpo", ld_alpha=0.0)(ld).loss,
                               rtol=1e-12, atol=1e-14)


def test_wpo_multiplies_each_pair_by_its_weights_by_hand():
    batch, (pw, pl) = token_pair()
    out = build("dpo", use_weighting=True)(batch)
    w_w = math.exp(((-1 + 0.5) + (-2 + 1.0) + (-3 + 2.0)) / 3)
    w_l = math.exp(-0.5 + 0.25)
    delta = (-6 - -3.5) - (-0.5 - -1.0)
    assert out.loss.item() == pytest.approx(w_w * w_l * nls(0.1 * delta), rel=1e-12)
    assert out.metrics["wpo_weight"].item() == pytest.approx(w_w * w_l, rel=1e-12)
    # the weights carry no gradient: the per-token log-probs are reached only through the sums
    out.loss.backward()
    dpo_grad = -0.1 / (1 + math.exp(0.1 * delta))
    torch.testing.assert_close(pw.grad, torch.full_like(pw, w_w * w_l * dpo_grad))


def test_wpo_and_ld_dpo_together():
    batch, _ = token_pair()
    out = build("dpo", use_weighting=True, ld_alpha=0.5)(batch)
    # WPO's weights use the real per-token log-probs, LD-DPO rewrites only the sums
    w = math.exp(((-1 + 0.5) + (-2 + 1.0) + (-3 + 2.0)) / 3) * math.exp(-0.5 + 0.25)
    h_w = (-1 + 0.5 * -5) - (-1.5 + 0.5 * -2)
    assert out.loss.item() == pytest.approx(w * nls(0.1 * (h_w - 0.5)), rel=1e-12)


def test_modifiers_are_options_of_the_losses_that_honour_them():
    takes = {n: set(LOSSES.options(n)) for n in LOSSES}
    assert takes["dpo"] == {"use_weighting", "ld_alpha"}
    assert takes["aot"] == {"ld_alpha"}  # it sorts pairs: per-pair weights do not apply
    for name in ("tdpo", "sparsepo", "epsilon_dpo", "simpo", "mi_dpo"):
        assert takes[name] == {"use_weighting"}, name
    for name in ("beta_dpo", "sft", "mixture"):
        assert takes[name] == set(), name
    assert LOSSES.parameters("dpo") == {"beta": 0.1, "use_weighting": False, "ld_alpha": None}


@pytest.mark.parametrize("name,params,match", [
    ("tdpo", {"ld_alpha": 0.5}, "has no parameter 'ld_alpha'"),
    ("beta_dpo", {"use_weighting": True}, "has no parameter 'use_weighting'"),
    ("aot", {"use_weighting": True}, "has no parameter 'use_weighting'"),
    ("dpo", {"ld_alpha": 1.5}, r"ld_alpha must be in \[0.0, 1.0\]"),
    ("dpo", {"use_weighting": "yes"}, "use_weighting must be true or false"),
    ("kernel_dpo", {"ld_alpha": -1}, r"ld_alpha must be in \[0.0, 1.0\]"),
])
def test_bad_options_are_named(name, params, match):
    with pytest.raises(ValueError, match=match):
        build(name, **params)


def test_a_loss_with_modifiers_reads_the_fields_they_need():
    assert "policy_chosen_log_sum_sq_probs" in build("dpo", use_weighting=True).requires
    assert "policy_chosen_log_sum_sq_probs" not in build("dpo").requires
    assert "ref_rejected_token_logps" in build("ipo", ld_alpha=0.2).requires
    assert "ref_rejected_token_logps" not in build("ipo").requires
    with pytest.raises(ValueError, match="policy_chosen_log_sum_sq_probs"):
        build("dpo", use_weighting=True)(sequence_batch(-1.0, -2.0, -1.0, -1.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_modifiers_stay_finite_for_extreme_log_probs(dtype):
    batch = full_batch(seed=5, dtype=dtype, extreme=True)
    for field in ("policy_chosen_token_logps", "policy_rejected_token_logps"):
        setattr(batch, field, (getattr(batch, field) - 1e4 * batch.chosen_mask
                               if "chosen" in field else getattr(batch, field)))
    out = build("dpo", use_weighting=True, ld_alpha=0.5).to(dtype)(batch)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    for leaf in leaves(batch):
        if leaf.grad is not None:
            assert torch.isfinite(leaf.grad).all()
