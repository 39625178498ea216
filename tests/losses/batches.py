"""Preference batches for the loss tests: every field filled and mutually consistent (sequence
log-probs are the masked sums of the token log-probs of the labels under the logits)."""

from __future__ import annotations

import torch

from raypo.losses import PreferenceBatch, TopKLogits


def sequence_batch(policy_w, policy_l, ref_w, ref_l, len_w=None, len_l=None,
                   dtype=torch.float64) -> PreferenceBatch:
    """A sequence-level batch from plain numbers or lists."""
    t = lambda x: torch.as_tensor(x, dtype=dtype).reshape(-1)  # noqa: E731
    policy_w, policy_l, ref_w, ref_l = map(t, (policy_w, policy_l, ref_w, ref_l))
    n = policy_w.numel()
    return PreferenceBatch(
        policy_chosen_logps=policy_w.requires_grad_(),
        policy_rejected_logps=policy_l.requires_grad_(),
        ref_chosen_logps=ref_w, ref_rejected_logps=ref_l,
        chosen_lengths=t(len_w if len_w is not None else [1] * n),
        rejected_lengths=t(len_l if len_l is not None else [1] * n),
    )


def full_batch(B=4, T=5, V=7, H=6, D=3, seed=0, dtype=torch.float64, scale=2.0, topk=None,
               min_len=1, extreme=False) -> PreferenceBatch:
    """A batch with every field. `topk` gives the reference logits in top-k form; `extreme`
    puts logits of -inf (exact zeros) and magnitudes near 1e4 into the distributions."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    def side():
        lengths = torch.randint(min_len, T + 1, (B,), generator=g)
        mask = (torch.arange(T)[None, :] < lengths[:, None]).to(dtype)
        labels = torch.randint(0, V, (B, T), generator=g)
        policy = scale * randn(B, T, V)
        ref = scale * randn(B, T, V)
        if extreme:
            policy = policy * 5e3
            ref = ref * 5e3
            zero = torch.rand(B, T, V, generator=g) < 0.3
            zero[..., 0] = False  # keep one finite entry per row
            policy = policy.masked_fill(zero, float("-inf"))
            ref_zero = torch.roll(zero, 1, -1)
            ref_zero[..., 0] = False
            ref = ref.masked_fill(ref_zero, float("-inf"))
            # the labels sit on finite policy entries, as real tokens do
            labels = torch.zeros_like(labels)
        policy.requires_grad_()
        tok = torch.log_softmax(policy, -1).gather(-1, labels[..., None])[..., 0]
        ref_tok = torch.log_softmax(ref, -1).gather(-1, labels[..., None])[..., 0]
        tok = torch.where(mask.bool(), tok, torch.zeros((), dtype=dtype))
        ref_tok = torch.where(mask.bool(), ref_tok, torch.zeros((), dtype=dtype))
        ref_form = TopKLogits.from_logits(ref, topk) if topk else ref
        with torch.no_grad():  # log sum_v p_v^2 (WPO), 0 at padding as the trainer gives it
            log_sq = torch.logsumexp(2 * torch.log_softmax(policy, -1), -1) * mask
        return dict(policy=policy, ref=ref_form, labels=labels, mask=mask,
                    lengths=lengths.to(dtype), log_sq=log_sq,
                    tok=tok, ref_tok=ref_tok, logp=tok.sum(-1), ref_logp=ref_tok.sum(-1),
                    hidden=randn(B, T, H))

    w, l = side(), side()
    emb = lambda: randn(B, D).requires_grad_()  # noqa: E731
    return PreferenceBatch(
        policy_chosen_logps=w["logp"], policy_rejected_logps=l["logp"],
        ref_chosen_logps=w["ref_logp"], ref_rejected_logps=l["ref_logp"],
        chosen_lengths=w["lengths"], rejected_lengths=l["lengths"],
        chosen_mask=w["mask"], rejected_mask=l["mask"],
        chosen_labels=w["labels"], rejected_labels=l["labels"],
        policy_chosen_token_logps=w["tok"], policy_rejected_token_logps=l["tok"],
        ref_chosen_token_logps=w["ref_tok"], ref_rejected_token_logps=l["ref_tok"],
        policy_chosen_log_sum_sq_probs=w["log_sq"], policy_rejected_log_sum_sq_probs=l["log_sq"],
        policy_chosen_logits=w["policy"], policy_rejected_logits=l["policy"],
        ref_chosen_logits=w["ref"], ref_rejected_logits=l["ref"],
        ref_chosen_hidden=w["hidden"], ref_rejected_hidden=l["hidden"],
        prompt_embeddings=emb(), chosen_embeddings=emb(), rejected_embeddings=emb(),
    )


def epsilon_batch(direction: float) -> PreferenceBatch:
    """Policy logits = reference + direction * d, d raising the chosen labels' logits and
    lowering the rejected ones'. Moving further along d (f+ = f + eps (f - f_ref)) raises
    z when direction > 0, so z+ > z > z- and epsilon-DPO's s = +1; direction < 0 gives -1."""
    batch = full_batch(seed=11)
    for side, sign in (("chosen", 1.0), ("rejected", -1.0)):
        ref = getattr(batch, f"ref_{side}_logits")
        labels = getattr(batch, f"{side}_labels")
        d = torch.zeros_like(ref).scatter(-1, labels[..., None], sign)
        policy = (ref + direction * d).requires_grad_()
        setattr(batch, f"policy_{side}_logits", policy)
    return batch


def leaves(batch: PreferenceBatch) -> list[torch.Tensor]:
    """The tensors of `batch` that gradients reach."""
    return [v for v in vars(batch).values()
            if isinstance(v, torch.Tensor) and v.requires_grad and v.is_leaf]
