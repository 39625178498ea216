"""Optimal transport between next-token distributions: the debiased Sinkhorn divergence."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

from raypo.losses.batch import Logits, TopKLogits
from raypo.losses.divergences.base import LOG_FLOOR, Divergence, check_pair, log1mexp
from raypo.losses.registry import DIVERGENCES, check_positive

# POT imports every array library it finds; raypo only hands it torch tensors. Importing JAX or
# CuPy on a GPU machine would make them reserve most of the GPU's memory (XLA preallocates 75%)
# and slow every start-up, so those backends stay off unless the user turned them on.
for _backend in ("JAX", "CUPY", "TENSORFLOW"):
    os.environ.setdefault(f"POT_BACKEND_DISABLE_{_backend}", "1")
from ot.batch import solve_batch  # noqa: E402

# Positions per chunk when gathering embeddings for the ground cost, so that (chunk, 2k, d)
# stays near 2**24 numbers (64 MiB in float32) whatever the batch.
_COST_CHUNK_NUMBERS = 2**24


@DIVERGENCES.register("wasserstein")
class Wasserstein(Divergence):
    """Debiased Sinkhorn divergence S = OT(P, Q) - OT(P, P)/2 - OT(Q, Q)/2 (Feydy et al. 2019,
    "Interpolating between Optimal Transport and MMD using Sinkhorn Divergences"), the
    Wasserstein penalty of DPO-Kernels (arXiv 2501.03271).

    OT(a, b) = min_T <T, C> + reg * sum T log T over plans T with marginals a, b. S is exactly 0
    at P == Q, >= 0, and tends to the exact W1 distance as reg -> 0: |S - W1| <= reg * (H(a) +
    H(b)), H the entropy.

    Support: for two full sides, the union of their top-k supports; with a TopKLogits side
    (a reference cache), the first k of its kept tokens (`topk` sorts them by probability), the
    only tokens where it is known. Plus, in both cases, one "rest" point holding each side's
    remaining mass. In the union the 2k indices are concatenated and a duplicate gets zero mass
    (the floor) on its second occurrence, so it is exact without dynamic shapes. The rest point
    lies at the largest ground distance (2 with embeddings, 1 without) from every token, which
    keeps the ground cost a metric; so mass is conserved, a distribution and its own top-k
    cache are exactly 0 apart, and with k = V the value is the full one. As for every
    divergence, at least one side must be full logits.

    Solver: POT's batched Sinkhorn (`ot.batch.solve_batch`, all positions and the three
    problems in one batch, in float64). The plain (scaling) iterations are used on the CPU
    while max(cost)/reg < 100, where exp(-cost/reg) cannot underflow float64; otherwise, and on
    GPUs (POT's plain solver allocates its initial scalings on the CPU), the log-domain ones.
    The value is taken as reg * (<u, a> + <v, b>) from the log
    potentials (u, v), detached: this equals the primal value at convergence (before it, the
    dual objective, a lower bound, since the last half-step makes the column marginals exact),
    and by the envelope theorem its gradient in a and b is the exact one, with no
    backpropagation through the iterations.

    Args:
        token_embeddings: (V, d) output embeddings of the tokens. The ground cost between tokens
            i and j is the Euclidean distance of their L2-normalised embeddings, in [0, 2]. With
            None (default) the trained model's output embeddings are used once the loss is
            bound to it (`bind`; raypo's trainer does this); unbound, the cost
            is 0 between a token and itself and 1 otherwise; W1 is then
            the total variation sum |P - Q| / 2 (on the union support).
        k: tokens taken from each side (default 8). Transport costs grow with the square of
            the support; 8 + 8 (+ rest) keeps the penalty within 2x of a log_softmax over the
            vocabulary (benchmarks/losses.py), and the rest point keeps the mass beyond them.
        reg: entropic regularisation, in cost units (default 0.1).
        max_iter: Sinkhorn iterations at most (default 20).
        tol: stop when the row marginals are within tol in L2 (default 1e-4).

    Formula and paper: docs/losses.md#divergence-wasserstein
    """

    @classmethod
    def support_k(cls, k: int = 8, **params) -> int:
        return int(k)

    def on_bind(self, facts) -> None:
        """The ground cost from the model's output embeddings, unless some were given."""
        if self.unit_embeddings is None and facts.token_embeddings is not None:
            self.unit_embeddings = F.normalize(facts.token_embeddings.detach(), dim=-1)

    def __init__(self, token_embeddings: Tensor | None = None, k: int = 8, reg: float = 0.1,
                 max_iter: int = 20, tol: float = 1e-4):
        super().__init__()
        if token_embeddings is not None and token_embeddings.dim() != 2:
            raise ValueError(
                "wasserstein: token_embeddings must be (V, d), got shape "
                f"{tuple(token_embeddings.shape)}"
            )
        if int(k) != k or k < 1:
            raise ValueError(f"wasserstein: k must be a positive integer, got {k!r}")
        if int(max_iter) != max_iter or max_iter < 1:
            raise ValueError(f"wasserstein: max_iter must be a positive integer, got {max_iter!r}")
        self.k, self.max_iter = int(k), int(max_iter)
        self.reg = check_positive("wasserstein", "reg", reg)
        self.tol = check_positive("wasserstein", "tol", tol)
        # Not persistent: the embeddings belong to the model's checkpoint, not the loss's.
        unit = None if token_embeddings is None else F.normalize(token_embeddings.detach(), dim=-1)
        self.register_buffer("unit_embeddings", unit, persistent=False)

    def forward(self, p_logits: Logits, q_logits: Logits) -> Tensor:
        check_pair(p_logits, q_logits)
        index, logp, logq = self.union_support(p_logits, q_logits)
        lead, n = logp.shape[:-1], logp.shape[-1]
        index, logp, logq = index.reshape(-1, n - 1), logp.reshape(-1, n), logq.reshape(-1, n)
        if index.shape[0] == 0:
            return logp.new_zeros(lead)
        cost = self.ground_cost(index).to(logp.dtype)
        return self.sinkhorn_divergence(logp.exp(), logq.exp(), cost).clamp_min(0.0).reshape(lead)

    def union_support(self, p: Logits, q: Logits) -> tuple[Tensor, Tensor, Tensor]:
        """(indices (..., n), log P and log Q (..., n + 1)) on the support described in the
        class docstring, the last bin being the rest mass."""
        if isinstance(p, TopKLogits) or isinstance(q, TopKLogits):
            p, q = (self._first_k(x) if isinstance(x, TopKLogits) else x for x in (p, q))
            index = (p if isinstance(p, TopKLogits) else q).indices
            duplicate = torch.zeros_like(index, dtype=torch.bool)
        else:
            first, second = self._top(p), self._top(q)
            index = torch.cat([first, second], dim=-1)
            duplicate = (second.unsqueeze(-1) == first.unsqueeze(-2)).any(-1)
            duplicate = torch.cat([torch.zeros_like(first, dtype=torch.bool), duplicate], dim=-1)
        return index, self._log_probs(p, index, duplicate), self._log_probs(q, index, duplicate)

    def _first_k(self, x: TopKLogits) -> TopKLogits:
        return TopKLogits(x.values[..., :self.k], x.indices[..., :self.k], x.log_normalizer)

    def _top(self, logits: Tensor) -> Tensor:
        return logits.detach().topk(min(self.k, logits.shape[-1]), dim=-1).indices

    @staticmethod
    def _log_probs(x: Logits, index: Tensor, duplicate: Tensor) -> Tensor:
        if isinstance(x, TopKLogits):  # the support is its own kept tokens
            logp = x.values - x.log_normalizer.unsqueeze(-1)
        else:
            logp = x.log_softmax(-1).gather(-1, index)  # see common_support for why not logsumexp
            logp = logp.masked_fill(duplicate, LOG_FLOOR)
        logp = logp.clamp_min(LOG_FLOOR)
        rest = log1mexp(logp.logsumexp(-1, keepdim=True)).clamp_min(LOG_FLOOR)
        logp = torch.cat([logp, rest], dim=-1)
        return logp - logp.logsumexp(-1, keepdim=True)

    @torch.no_grad()
    def ground_cost(self, index: Tensor) -> Tensor:
        """(N, n + 1, n + 1) cost between the n support tokens of each of N positions and the
        rest point."""
        same = index.unsqueeze(-1) == index.unsqueeze(-2)
        if self.unit_embeddings is None:
            cost, far = (~same).float(), 1.0
        else:
            n, d = index.shape[-1], self.unit_embeddings.shape[-1]
            chunk = max(1, _COST_CHUNK_NUMBERS // (n * d))
            grams = []
            for idx in index.split(chunk):
                emb = self.unit_embeddings[idx]
                grams.append(emb @ emb.transpose(-1, -2))
            gram = torch.cat(grams)
            # |e_i - e_j| = sqrt(2 - 2 e_i.e_j) for unit vectors; the rounding of the dot
            # product would put sqrt(1e-7) ~ 3e-4 on the diagonal: equal tokens get an exact 0.
            cost, far = (2.0 - 2.0 * gram).clamp_min(0.0).sqrt().masked_fill(same, 0.0), 2.0
        cost = F.pad(cost, (0, 1, 0, 1), value=far)
        cost[:, -1, -1] = 0.0
        return cost

    def sinkhorn_divergence(self, a: Tensor, b: Tensor, cost: Tensor) -> Tensor:
        """S(a, b) for (N, n) distributions a, b and (N, n, n) cost."""
        n_pos = a.shape[0]
        # OT(a, b), OT(a, a), OT(b, b) in one batch: one solver call, one iteration count.
        left, right = torch.cat([a, a, b]), torch.cat([b, a, b])
        cost = cost.double()
        plain = cost.device.type == "cpu" and float(cost.max()) / self.reg < 100
        res = solve_batch(cost.repeat(3, 1, 1), self.reg, left.detach().double(),
                          right.detach().double(), method="sinkhorn" if plain else "log_sinkhorn",
                          grad="detach", max_iter=self.max_iter, tol=self.tol)
        u, v = (t.detach() for t in res.potentials)
        if plain:  # the plain solver returns the scalings exp(u), exp(v)
            u, v = u.log(), v.log()
        u, v = u.to(left.dtype), v.to(left.dtype)
        ot = self.reg * ((u * left).sum(-1) + (v * right).sum(-1))
        ot_ab, ot_aa, ot_bb = ot.split(n_pos)
        return ot_ab - 0.5 * (ot_aa + ot_bb)

    def extra_repr(self) -> str:
        emb = "None" if self.unit_embeddings is None else tuple(self.unit_embeddings.shape)
        return (f"token_embeddings={emb}, k={self.k}, reg={self.reg}, max_iter={self.max_iter}, "
                f"tol={self.tol}")
