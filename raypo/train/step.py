"""From a collated batch to a `PreferenceBatch`: the policy's forward (with the loss's
per-position terms computed in chunks), the cached reference outputs, and a live reference for
losses that need full reference logits."""

from __future__ import annotations

from raypo.losses import PreferenceBatch
from raypo.losses.batch import TOKEN_TERM_FIELDS, TopKLogits
from raypo.losses.token import token_terms
from raypo.train.forward import outputs_for, sequence_forward


def preference_batch(setup, batch, policy, ref_outputs, embeddings_from_policy: bool
                     ) -> PreferenceBatch:
    loss_fn = setup.loss_fn
    want = outputs_for(loss_fn.requires)
    B, T = batch.index.shape[0], batch.labels.shape[1]
    use_policy_emb = want["embeddings"] and embeddings_from_policy
    fields = ref_outputs.fields(batch.index, T, batch.labels.device)
    terms = token_terms(loss_fn) if want["terms"] else {}
    if not terms:
        reference = None
    elif setup.live_reference_logits:  # full-vocabulary reference logits (see setup.py)
        reference = setup.reference_model
    else:  # the cached top-k form, chosen rows then rejected rows as in the batch
        reference = TopKLogits.cat([fields["ref_chosen_logits"], fields["ref_rejected_logits"]])
    out = sequence_forward(policy, batch, embeddings=use_policy_emb,
                           log_sum_sq=want["log_sum_sq"], terms=terms, reference=reference,
                           chunk=setup.cfg.logits_chunk)
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
    if terms:
        fields.update(chosen_token_terms={k: v[:B] for k, v in out.terms.items()},
                      rejected_token_terms={k: v[B:] for k, v in out.terms.items()})
    if use_policy_emb:
        fields.update(prompt_embeddings=out.prompt_embeddings,
                      chosen_embeddings=out.response_embeddings[:B],
                      rejected_embeddings=out.response_embeddings[B:])
    keep = loss_fn.requires | TOKEN_TERM_FIELDS
    return PreferenceBatch(**{k: v for k, v in fields.items() if k in keep})
