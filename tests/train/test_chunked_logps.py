"""Log-probs in chunks (raypo.train.forward.token_outputs) against the full-vocabulary
computation they replace: the model's own logits at every response position, each row run
alone, log-softmax, and the loss evaluating its per-position terms on those full logits. The
loss and the gradients of every policy weight must agree to 1e-5 in float32, for losses that
read only log-probs (a trained head and a frozen one), WPO's log sum p^2, a divergence to the
cached top-k reference, TDPO's token KL and epsilon-DPO's perturbed log-probs under a live
full-vocabulary reference."""

from __future__ import annotations

import random
import types

import pytest
import torch

from raypo.data.collate import collate
from raypo.data.tokenize import TokenizedPairs
from raypo.losses import PreferenceBatch, build
from raypo.models.load import reference_of
from raypo.models.tiny import tiny_model, tiny_tokenizer
from raypo.train.reference import compute_reference
from raypo.train.setup import model_facts
from raypo.train.step import preference_batch

LOSSES = [
    ("dpo", {}),
    ("dpo", {"use_weighting": True}),  # WPO: log sum p^2 per position
    ("kernel_dpo", {"kernel": "rbf", "divergence": "js", "alpha_div": 0.5}),
    ("tdpo", {}),
    ("sparsepo", {}),
    ("epsilon_dpo", {"eps": 0.3, "beta": 0.5}),  # a live full-vocabulary reference
    # a head that is no plain nn.Linear (LoRA on the head): a checkpoint per chunk instead
    ("kernel_dpo", {"kernel": "rbf", "divergence": "js", "alpha_div": 0.5, "head": "other"}),
    # a frozen head (LoRA elsewhere): the backward reads E_p[W] kept by the forward
    ("dpo", {"use_weighting": True, "head": "frozen"}),
]


class OtherHead(torch.nn.Linear):
    """A linear head of another class, as peft's LoRA wrapper of a head is."""
TOPK = 8


def _pairs(n: int, seed: int = 0) -> TokenizedPairs:
    rng = random.Random(seed)

    def ids(lo, hi):
        return [rng.randrange(8, 60) for _ in range(rng.randint(lo, hi))]

    return TokenizedPairs([[1, *ids(0, 9)] for _ in range(n)], [[*ids(1, 12), 2] for _ in range(n)],
                          [[*ids(1, 12), 2] for _ in range(n)], fingerprint=f"random-{seed}")


def _full(model, pairs, order, T):
    """(2B, T, V) logits at the response positions, each row run alone: the oracle."""
    rows = []
    for side in (pairs.chosen_ids, pairs.rejected_ids):
        for i in order:
            prompt, response = pairs.prompt_ids[i], side[i]
            logits = model(input_ids=torch.tensor([prompt + response])).logits[0]
            logits = logits[len(prompt) - 1:-1].float()
            rows.append(torch.nn.functional.pad(logits, (0, 0, 0, T - len(response))))
    return torch.stack(rows)


def _full_batch(loss, policy, reference, pairs, batch, ref_outputs, live: bool):
    B, T = batch.index.shape[0], batch.labels.shape[1]
    order = batch.index.tolist()
    logits = _full(policy, pairs, order, T)
    mask = batch.response_mask
    token = logits.log_softmax(-1).gather(-1, batch.labels[..., None])[..., 0] * mask
    log_sum_sq = ((torch.logsumexp(2 * logits, -1) - 2 * torch.logsumexp(logits, -1))
                  * mask).detach()
    fields = ref_outputs.fields(batch.index, T, "cpu")
    if live:
        with torch.no_grad():
            ref_logits = _full(reference.model, pairs, order, T)
        fields.update(ref_chosen_logits=ref_logits[:B], ref_rejected_logits=ref_logits[B:])
    fields.update(
        policy_chosen_logps=token[:B].sum(-1), policy_rejected_logps=token[B:].sum(-1),
        chosen_lengths=mask[:B].sum(-1), rejected_lengths=mask[B:].sum(-1),
        chosen_mask=mask[:B], rejected_mask=mask[B:],
        chosen_labels=batch.labels[:B], rejected_labels=batch.labels[B:],
        policy_chosen_token_logps=token[:B], policy_rejected_token_logps=token[B:],
        policy_chosen_log_sum_sq_probs=log_sum_sq[:B],
        policy_rejected_log_sum_sq_probs=log_sum_sq[B:],
        policy_chosen_logits=logits[:B], policy_rejected_logits=logits[B:])
    return PreferenceBatch(**{k: v for k, v in fields.items() if k in loss.requires})


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name,params", LOSSES, ids=lambda v: v if isinstance(v, str) else "")
def test_chunked_loss_and_weight_gradients_equal_the_full_logits_ones(name, params):
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    policy = tiny_model(tok, seed=3)
    reference = reference_of(policy)  # a frozen copy; then the policy moves away from it
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    pairs = _pairs(5)
    head = params.get("head")
    params = {k: v for k, v in params.items() if k != "head"}
    if head == "other":
        policy.get_output_embeddings().__class__ = OtherHead
    elif head == "frozen":
        policy.get_output_embeddings().weight.requires_grad_(False)
    loss = build(name, **params).bind(model_facts(policy))
    live = loss.full_reference_logits  # no top-k cache then, as in raypo.train.setup
    ref_outputs = compute_reference(reference.model, pairs, pad_id=tok.pad_token_id,
                                    token_logps=True, topk=None if live else TOPK,
                                    hidden=True, embeddings=True, device=torch.device("cpu"))
    setup = types.SimpleNamespace(loss_fn=loss, live_reference_logits=live,
                                  reference_model=reference,
                                  cfg=types.SimpleNamespace(logits_chunk=5))
    batch = collate(pairs, [4, 1, 0, 3, 2], pad_id=tok.pad_token_id)
    weights = [p for p in policy.parameters() if p.requires_grad]

    chunked = loss(preference_batch(setup, batch, policy, ref_outputs, False))
    full = loss(_full_batch(loss, policy, reference, pairs, batch, ref_outputs, live))
    torch.testing.assert_close(chunked.loss, full.loss, rtol=1e-5, atol=1e-5)
    for key in set(chunked.metrics) & set(full.metrics):
        torch.testing.assert_close(chunked.metrics[key], full.metrics[key], rtol=1e-5,
                                   atol=1e-5, msg=key)
    got = torch.autograd.grad(chunked.loss, weights, allow_unused=True)
    want = torch.autograd.grad(full.loss, weights, allow_unused=True)
    for g, h in zip(got, want, strict=True):
        assert (g is None) == (h is None)
        if g is not None:
            torch.testing.assert_close(g, h, rtol=1e-5, atol=1e-6)
    assert any(g is not None and g.abs().sum() > 0 for g in got)
    if not live:  # the divergences read the cached top-k form of the reference
        assert ref_outputs.topk_values


@pytest.mark.timeout(60)
@pytest.mark.parametrize("frozen", [False, True], ids=["trained", "frozen"])
def test_vocabulary_blocks_give_log_softmax_values_and_gradients(monkeypatch, frozen):
    """The fused head (`LinearLogProbs`): chunks of 4 rows by vocabulary blocks of 1024,
    the last one partial, targets at the blocks' edges, a bias: log-probs, WPO's log sum p^2
    and the gradients equal log_softmax's."""
    from raypo.train import chunked_head

    monkeypatch.setattr(chunked_head, "CPU_BLOCK_ELEMENTS", 4 * 1024)
    assert chunked_head.vocab_block(4, 5000, "cpu") == 1024
    torch.manual_seed(0)
    n, hidden, vocab = 13, 7, 5000
    h = torch.randn(n, hidden, requires_grad=True)
    weight = torch.randn(vocab, hidden, requires_grad=not frozen)
    bias = torch.randn(vocab, requires_grad=not frozen)
    targets = torch.randint(0, vocab, (n,))
    targets[:4] = torch.tensor([0, 1023, 1024, vocab - 1])
    out: dict = {}
    logps = chunked_head.LinearLogProbs.apply(h, weight, bias, targets, 4, True, out)
    logits = torch.nn.functional.linear(h, weight, bias)
    want = logits.log_softmax(-1).gather(1, targets[:, None])[:, 0]
    torch.testing.assert_close(logps, want, rtol=1e-5, atol=1e-5)
    log_sum_sq = torch.logsumexp(2 * logits, -1) - 2 * torch.logsumexp(logits, -1)
    torch.testing.assert_close(torch.cat(out["log_sum_sq"]), log_sum_sq, rtol=1e-5, atol=1e-5)
    upstream = torch.randn(n)
    trained = [x for x in (h, weight, bias) if x.requires_grad]
    got = torch.autograd.grad((logps * upstream).sum(), trained)
    expected = torch.autograd.grad((want * upstream).sum(), trained)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
