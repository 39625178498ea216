"""Property tests: every loss stays finite, with finite gradients, for extreme inputs: sequence
log-probs down to -1e4, responses of one token, distributions with exact zeros (-inf logits)
and logits of magnitude 1e4, in full and top-k form."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from raypo.losses import DIVERGENCES, KERNELS, LOSSES, PRIORS, build

from .batches import full_batch, leaves

CONFIGS = (
    [(name, {}) for name in LOSSES]
    + [("fdpo", {"divergence": d}) for d in ("forward_kl", "js", "alpha")]
    + [("kernel_dpo", {"kernel": k}) for k in KERNELS if k != "hmk"]
    + [("kernel_dpo", {"divergence": d}) for d in DIVERGENCES]
    + [("hmk_dpo", {"divergence": "js"})]
    + [("mi_dpo", {"prior": p}) for p in PRIORS]
    + [("tdpo", {"version": 1}), ("cal_dpo", {"length_normalize": True})]
    # the TRL loss types away from their defaults, the modifiers, mixtures
    + [("exo_pair", {"eps": 0.3}), ("discopop", {"tau": 0.5}), ("aot", {"eps": 0.2}),
       ("sppo_hard", {"beta": 0.01})]
    + [(n, {"use_weighting": True, "ld_alpha": 0.5})
       for n in ("dpo", "ipo", "exo_pair", "apo_down", "discopop")]
    + [("aot", {"ld_alpha": 0.0}), ("tdpo", {"use_weighting": True})]
    + [("mixture", {"terms": [{"name": "dpo", "weight": 1, "use_weighting": True},
                              {"name": "aot_unpaired", "weight": 0.5, "ld_alpha": 0.3},
                              {"name": "sft", "weight": 1},
                              {"name": "kernel_dpo", "weight": 0.1, "divergence": "js"}]})]
)
# epsilon_dpo perturbs full reference logits; every other loss also takes the top-k form
FULL_ONLY = {"epsilon_dpo"}


def _extreme_batch(seed: int, low: float, topk: int | None, dtype):
    batch = full_batch(B=3, T=4, V=9, seed=seed, extreme=True, topk=topk, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    for field in ("policy_chosen_logps", "policy_rejected_logps"):
        value = low * torch.rand(3, generator=g, dtype=dtype)
        setattr(batch, field, value.requires_grad_())
    for field in ("ref_chosen_logps", "ref_rejected_logps"):
        setattr(batch, field, low * torch.rand(3, generator=g, dtype=dtype))
    batch.chosen_lengths = torch.tensor([1.0, 4.0, 1.0], dtype=dtype)
    batch.rejected_lengths = torch.tensor([1.0, 1.0, 3.0], dtype=dtype)
    return batch


@settings(max_examples=25, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**16), low=st.sampled_from([-1e4, -1e2, -1.0, 0.0]),
       topk=st.sampled_from([None, 4]), double=st.booleans())
def test_every_loss_is_finite_with_finite_gradients(seed, low, topk, double):
    dtype = torch.float64 if double else torch.float32
    # one batch for every loss (the graph kept between them): building it is half the cost
    batch = _extreme_batch(seed, low, topk, dtype)
    for name, params in CONFIGS:
        if topk and name in FULL_ONLY:
            continue
        if name in ("sparsepo",) or params.get("prior") == "sparsepo":
            params = {**params, "hidden_size": 6}
        loss_fn = build(name, **params).to(dtype)
        for t in leaves(batch):
            t.grad = None
        out = loss_fn(batch)
        assert torch.isfinite(out.loss), (name, params, out.loss)
        out.loss.backward(retain_graph=True)
        grads = [t.grad for t in leaves(batch) + list(loss_fn.parameters())
                 if t.grad is not None]
        assert grads, (name, params)
        for g in grads:
            assert torch.isfinite(g).all(), (name, params, g.shape)
        for key, value in out.metrics.items():
            assert torch.isfinite(value).all(), (name, params, key)
