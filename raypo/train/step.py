"""From a collated batch to a `PreferenceBatch`: the policy's forward, the cached reference
outputs, and a live reference forward only for losses that need full reference logits."""

from __future__ import annotations

import torch

from raypo.losses import PreferenceBatch
from raypo.train.forward import outputs_for, sequence_forward


def preference_batch(setup, batch, policy, ref_outputs, embeddings_from_policy: bool
                     ) -> PreferenceBatch:
    loss_fn = setup.loss_fn
    want = outputs_for(loss_fn.requires)
    B, T = batch.index.shape[0], batch.labels.shape[1]
    use_policy_emb = want["embeddings"] and embeddings_from_policy
    out = sequence_forward(policy, batch, logits=want["logits"], embeddings=use_policy_emb,
                           log_sum_sq=want["log_sum_sq"])
    fields = ref_outputs.fields(batch.index, T, batch.labels.device)
    mask = batch.response_mask
    fields.update(
        policy_chosen_logps=out.logps[:B], policy_rejected_logps=out.logps[B:],
        chosen_lengths=mask[:B].sum(-1), rejected_lengths=mask[B:].sum(-1),
        chosen_mask=mask[:B], rejected_mask=mask[B:],
        chosen_labels=batch.labels[:B], rejected_labels=batch.labels[B:],
        policy_chosen_token_logps=out.token_logps[:B],
        policy_rejected_token_logps=out.token_logps[B:],
    )
    if out.log_sum_sq_probs is not None:
        fields.update(policy_chosen_log_sum_sq_probs=out.log_sum_sq_probs[:B],
                      policy_rejected_log_sum_sq_probs=out.log_sum_sq_probs[B:])
    if out.logits is not None:
        fields.update(policy_chosen_logits=out.logits[:B], policy_rejected_logits=out.logits[B:])
    if use_policy_emb:
        fields.update(prompt_embeddings=out.prompt_embeddings,
                      chosen_embeddings=out.response_embeddings[:B],
                      rejected_embeddings=out.response_embeddings[B:])
    if setup.live_reference_logits:  # full-vocabulary reference logits (see setup.py)
        with torch.no_grad():
            ref = sequence_forward(setup.reference_model, batch, logits=True)
        fields.update(ref_chosen_logits=ref.logits[:B], ref_rejected_logits=ref.logits[B:])
    return PreferenceBatch(**{k: v for k, v in fields.items() if k in loss_fn.requires})
