"""raypo's losses against TRL's own: `DPOTrainer._compute_loss` of the installed TRL (1.16) runs
on the same random per-token log-probs as raypo's loss, and values and gradients must agree to
1e-8 in float64, for every loss type the two share, mixtures with `loss_weights`, WPO
(`use_weighting`) and LD-DPO (`ld_alpha`).

What runs is TRL's real loss code, called unbound with a stand-in `self`: the trainer
attributes it reads (its config: beta, loss_types, ...; an accelerator on one process whose
gathers return their input; the metric stores) and a stand-in model whose output is TRL's
`FusedCausalLMOutput` carrying log-probs we choose, zero off the completion as TRL's fused LM
head gives them. `precompute_ref_logps` is off, so TRL also reads the reference's per-token
log-probs (from a second stand-in) and applies LD-DPO to them itself.

Layout: every row has a prompt of P tokens, then its completion, right-padded; TRL's column
P - 1 + t predicts completion token t, which is raypo's position t.

Conventions that differ, tested as such below: TRL's alpha-divergence coefficient is 1 - alpha
of raypo's f-DPO (and TRL 1.16's alpha-divergence only runs in float16/bfloat16/float32: its
clamp table has no float64 entry, so that case is compared in float32); TRL writes forward KL's
f'(u) as 1 - 1/u, raypo as -1/u (the constant cancels in the margin); TRL's sigmoid ignores
label_smoothing since TRL 0.29, so raypo's cdpo has no TRL counterpart.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from raypo.losses import PreferenceBatch, build

dpo_trainer = pytest.importorskip("trl.trainer.dpo_trainer")
trl_utils = pytest.importorskip("trl.trainer.utils")

B, P, T = 6, 3, 7  # pairs, prompt length, longest completion
TOL = {"rtol": 1e-8, "atol": 1e-8}


class StandInModel(torch.nn.Module):
    """What `_compute_loss` calls as `model(...)` and `self.ref_model(...)`: TRL's fused-head
    output with the given per-token log-probs (and log sum_v p_v^2 for WPO); the entropy,
    mean-logit and top-1 fields only feed TRL's metrics. An nn.Module (in training mode)
    because accelerate's PEFT check walks its submodules."""

    is_gradient_checkpointing = False

    def __init__(self, log_probs, log_sum_sq_probs):
        super().__init__()
        self.log_probs, self.log_sum_sq_probs = log_probs, log_sum_sq_probs

    def forward(self, *, input_ids, attention_mask, labels, fused_lm_head, use_cache):
        assert fused_lm_head
        # the fused head's output is 0, with no gradient, where the label is -100
        mask = labels[:, 1:] != -100
        zeros = torch.zeros_like(self.log_probs).detach()
        off = lambda x: None if x is None else x.masked_fill(~mask, 0)  # noqa: E731
        return trl_utils.FusedCausalLMOutput(
            log_probs=off(self.log_probs), entropy=zeros,
            log_sum_sq_probs=off(self.log_sum_sq_probs), mean_logits=zeros,
            is_top1=zeros.bool(), label_mask=mask)


class OneProcessAccelerator:
    device = torch.device("cpu")

    @staticmethod
    def gather(x):
        return x

    gather_for_metrics = gather


@contextlib.contextmanager
def default_dtype(dtype):
    # TRL makes some constants with torch.tensor(python float) (exo_pair's epsilon): in the
    # default dtype, which must be the batch's for a float64 comparison.
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def random_inputs(seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (2 * B,), generator=g)
    lengths[0], lengths[B] = T, T  # one pair of equal, full lengths
    lengths[1], lengths[B + 1] = 1, T  # and a one-token chosen response beside a long one
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(dtype)
    rand = lambda lo, hi: lo + (hi - lo) * torch.rand(2 * B, T, generator=g, dtype=dtype)  # noqa: E731
    tok = (-rand(0.05, 3.0) * mask).requires_grad_()  # policy per-token log-probs, leaf
    ref_tok = -rand(0.05, 3.0) * mask
    log_sum_sq = rand(-3.0, -0.01) * mask  # log sum_v p_v^2 is in [-log V, 0]
    return tok, ref_tok, log_sum_sq, mask


def trl_layout(x):
    """(2B, T) response-aligned -> (2B, P + T - 1), TRL's shifted full-sequence columns."""
    return torch.cat([torch.zeros(x.shape[0], P - 1, dtype=x.dtype), x], dim=1)


def trl_loss(tok, ref_tok, log_sum_sq, mask, types, weights=None, **config):
    """TRL 1.16's DPOTrainer._compute_loss on these log-probs, and its metrics."""
    completion = torch.cat([torch.zeros(2 * B, P), mask.float()], dim=1).long()
    inputs = {"input_ids": torch.arange(P + T).repeat(2 * B, 1),
              "attention_mask": torch.ones(2 * B, P + T, dtype=torch.long),
              "completion_mask": completion}
    policy = StandInModel(trl_layout(tok), trl_layout(log_sum_sq))
    stand_in = SimpleNamespace(
        beta=config.get("beta", 0.1), loss_types=types, loss_weights=weights or [1.0] * len(types),
        ld_alpha=config.get("ld_alpha"),
        f_divergence_type=config.get("f_divergence_type", "reverse_kl"),
        f_alpha_divergence_coef=config.get("f_alpha_divergence_coef", 0.5),
        label_smoothing=config.get("label_smoothing", 0.0),
        use_weighting=config.get("use_weighting", False),
        args=SimpleNamespace(discopop_tau=config.get("discopop_tau", 0.05),
                             gradient_checkpointing_kwargs=None),
        precompute_ref_logps=False, model=policy,
        ref_model=StandInModel(trl_layout(ref_tok), None),
        accelerator=OneProcessAccelerator(), aux_loss_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1)
    with default_dtype(tok.dtype):
        loss = dpo_trainer.DPOTrainer._compute_loss(stand_in, policy, inputs,
                                                     return_outputs=False)
    return loss, stand_in._metrics["train"]


def raypo_batch(tok, ref_tok, log_sum_sq, mask) -> PreferenceBatch:
    """The fields as raypo's trainer makes them: per-token values 0 at padding (no gradient
    there), sequence log-probs their sums."""
    w, l = slice(0, B), slice(B, 2 * B)
    tok = tok * mask
    return PreferenceBatch(
        policy_chosen_logps=tok[w].sum(-1), policy_rejected_logps=tok[l].sum(-1),
        ref_chosen_logps=ref_tok[w].sum(-1), ref_rejected_logps=ref_tok[l].sum(-1),
        chosen_lengths=mask[w].sum(-1), rejected_lengths=mask[l].sum(-1),
        chosen_mask=mask[w], rejected_mask=mask[l],
        policy_chosen_token_logps=tok[w], policy_rejected_token_logps=tok[l],
        ref_chosen_token_logps=ref_tok[w], ref_rejected_token_logps=ref_tok[l],
        policy_chosen_log_sum_sq_probs=log_sum_sq[w],
        policy_rejected_log_sum_sq_probs=log_sum_sq[l])


def compare(trl_case: dict, raypo_case: tuple[str, dict], seed=0, dtype=torch.float64, tol=TOL,
            rewards=True) -> tuple[float, float]:
    """Values and gradients (in the policy's per-token log-probs) of both; returns the largest
    absolute differences."""
    name, params = raypo_case
    tok, ref_tok, log_sum_sq, mask = random_inputs(seed, dtype)
    expected, trl_metrics = trl_loss(tok, ref_tok, log_sum_sq, mask, **trl_case)
    (expected_grad,) = torch.autograd.grad(expected, tok)
    loss_fn = build(name, **params)
    batch = raypo_batch(tok, ref_tok, log_sum_sq, mask)
    out = loss_fn(PreferenceBatch(**{k: v for k, v in vars(batch).items()
                                     if k in loss_fn.requires}))
    (grad,) = torch.autograd.grad(out.loss, tok)
    assert out.loss.dtype == expected.dtype == dtype
    torch.testing.assert_close(out.loss, expected, **tol)
    torch.testing.assert_close(grad, expected_grad, **tol)
    if rewards:  # TRL logs beta * h (with LD-DPO's log-probs when ld_alpha is set)
        for ours, theirs in (("chosen_reward", "rewards/chosen"),
                             ("rejected_reward", "rewards/rejected")):
            assert out.metrics[ours].item() == pytest.approx(trl_metrics[theirs][0],
                                                             rel=tol["rtol"], abs=tol["atol"])
    return abs(out.loss - expected).item(), (grad - expected_grad).abs().max().item()


def trl(types: str | list[str], weights: list[float] | None = None, **config) -> dict:
    return {"types": [types] if isinstance(types, str) else types, "weights": weights, **config}


def mixture(types: list[str], weights: list[float], **term_params) -> tuple[str, dict]:
    """The raypo mixture of TRL's loss_type list: the same terms and weights, TRL's global
    options on every term but sft (no beta; TRL's sft ignores ld_alpha)."""
    terms = []
    for t, w in zip(types, weights, strict=True):
        params = term_params if t != "sft" else {}
        terms.append({"name": {"sigmoid": "dpo"}.get(t, t), "weight": w, **params})
    return "mixture", {"terms": terms}


MPO = (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0])
RPO = (["sigmoid", "sft"], [1.0, 0.5])
# name: (TRL's configuration, raypo's loss and parameters)
SHARED = {
    "sigmoid=dpo": (trl("sigmoid"), ("dpo", {})),
    "sigmoid=dpo beta 0.5": (trl("sigmoid", beta=0.5), ("dpo", {"beta": 0.5})),
    "hinge": (trl("hinge", beta=0.3), ("hinge", {"beta": 0.3})),
    "ipo": (trl("ipo"), ("ipo", {})),
    "robust": (trl("robust", label_smoothing=0.2), ("robust", {"eps": 0.2})),
    "exo_pair": (trl("exo_pair", label_smoothing=1e-3), ("exo_pair", {})),
    "exo_pair eps 0.2": (trl("exo_pair", label_smoothing=0.2, beta=0.5),
                         ("exo_pair", {"eps": 0.2, "beta": 0.5})),
    "nca_pair": (trl("nca_pair", beta=0.4), ("nca_pair", {"beta": 0.4})),
    "bco_pair": (trl("bco_pair"), ("bco_pair", {})),
    "sppo_hard": (trl("sppo_hard", beta=0.3), ("sppo_hard", {"beta": 0.3})),
    "aot": (trl("aot"), ("aot", {})),
    "aot label_smoothing": (trl("aot", label_smoothing=0.1), ("aot", {"eps": 0.1})),
    "aot_unpaired": (trl("aot_unpaired", label_smoothing=0.2, beta=0.5),
                     ("aot_unpaired", {"eps": 0.2, "beta": 0.5})),
    "apo_zero": (trl("apo_zero", beta=0.5), ("apo_zero", {"beta": 0.5})),
    "apo_down": (trl("apo_down", beta=0.5), ("apo_down", {"beta": 0.5})),
    "discopop": (trl("discopop", beta=0.5), ("discopop", {"beta": 0.5})),
    "discopop tau 0.3": (trl("discopop", discopop_tau=0.3), ("discopop", {"tau": 0.3})),
    "sigmoid_norm": (trl("sigmoid_norm", beta=2.0), ("sigmoid_norm", {"beta": 2.0})),
    "sft": (trl("sft"), ("sft", {})),
    "fdpo forward_kl": (trl("sigmoid", f_divergence_type="forward_kl"),
                        ("fdpo", {"divergence": "forward_kl"})),
    "fdpo js": (trl("sigmoid", f_divergence_type="js_divergence", beta=0.5),
                ("fdpo", {"divergence": "js", "beta": 0.5})),
    "mixture mpo": (trl(*MPO), mixture(*MPO)),
    "mixture mpo is the default": (trl(*MPO), ("mixture", {})),
    "mixture rpo": (trl(*RPO, beta=0.3), mixture(*RPO, beta=0.3)),
    "mixture with a zero weight": (trl(["ipo", "hinge", "apo_zero"], [0.3, 0.0, 2.0]),
                                   mixture(["ipo", "hinge", "apo_zero"], [0.3, 0.0, 2.0])),
    "use_weighting": (trl("sigmoid", use_weighting=True), ("dpo", {"use_weighting": True})),
    "use_weighting ipo": (trl("ipo", use_weighting=True), ("ipo", {"use_weighting": True})),
    "ld_alpha": (trl("sigmoid", ld_alpha=0.5), ("dpo", {"ld_alpha": 0.5})),
    "ld_alpha 0 ipo": (trl("ipo", ld_alpha=0.0), ("ipo", {"ld_alpha": 0.0})),
    "ld_alpha aot": (trl("aot", ld_alpha=0.3), ("aot", {"ld_alpha": 0.3})),
    "ld_alpha fdpo js": (trl("sigmoid", f_divergence_type="js_divergence", ld_alpha=0.6),
                         ("fdpo", {"divergence": "js", "ld_alpha": 0.6})),
    "ld_alpha and use_weighting apo_down": (
        trl("apo_down", ld_alpha=0.7, use_weighting=True),
        ("apo_down", {"ld_alpha": 0.7, "use_weighting": True})),
    # (TRL 1.16's sft with use_weighting fails, so WPO mixtures leave sft out)
    "mixture mpo with LD-DPO": (trl(*MPO, ld_alpha=0.4, beta=0.2),
                                mixture(*MPO, ld_alpha=0.4, beta=0.2)),
    "mixture with WPO and LD-DPO": (
        trl(["sigmoid", "bco_pair", "nca_pair"], [1.0, 0.5, 0.25], use_weighting=True,
            ld_alpha=0.4, beta=0.2),
        mixture(["sigmoid", "bco_pair", "nca_pair"], [1.0, 0.5, 0.25], use_weighting=True,
                ld_alpha=0.4, beta=0.2)),
}


@pytest.mark.parametrize("key", list(SHARED))
def test_raypo_equals_trl_values_and_gradients(key):
    trl_case, raypo_case = SHARED[key]
    # sft logs the mean log-prob as its reward, not TRL's beta * h
    rewards = raypo_case[0] != "sft"
    for seed in (0, 1):
        compare(trl_case, raypo_case, seed=seed, rewards=rewards)


def test_alpha_divergence_coefficient_is_one_minus_raypo_alpha():
    # TRL 1.16 runs its alpha-divergence only in float32 (and half types); raypo's alpha is
    # TRL's 1 - f_alpha_divergence_coef: (u^(c-1) - 1)/(c-1) = (1 - u^-alpha)/alpha.
    case = trl("sigmoid", f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3,
               beta=0.5)
    float32 = {"dtype": torch.float32, "tol": {"rtol": 1e-5, "atol": 1e-6}}
    compare(case, ("fdpo", {"divergence": "alpha", "alpha": 0.7, "beta": 0.5}), **float32)
    with pytest.raises(AssertionError):  # the same number on both sides is another loss
        compare(case, ("fdpo", {"divergence": "alpha", "alpha": 0.3, "beta": 0.5}), **float32)


def test_trl_sigmoid_ignores_label_smoothing_so_cdpo_is_not_it():
    smoothed = trl("sigmoid", label_smoothing=0.2)
    compare(smoothed, ("dpo", {}))
    with pytest.raises(AssertionError):
        compare(smoothed, ("cdpo", {"eps": 0.2}))


def test_forward_kl_constant_differs_and_cancels():
    # TRL: f'(u) = 1 - 1/u; raypo: -1/u. The losses agree (the fdpo cases above) because only
    # the difference f'(u_w) - f'(u_l) enters them.
    from raypo.losses.fdpo import _forward_kl
    h = torch.tensor([-2.0, 0.0, 3.0], dtype=torch.float64)
    torch.testing.assert_close(_forward_kl(h, 0.0), (1 - torch.exp(-h)) - 1)
