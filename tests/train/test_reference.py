"""The reference precompute batches the 2N sequences alone, right-padded, without attention
mask: what it keeps must equal what the training layout's forward gives for the same pairs."""

from __future__ import annotations

import random

import pytest
import torch

from raypo.data.collate import collate
from raypo.data.tokenize import TokenizedPairs
from raypo.losses.batch import TopKLogits
from raypo.models.tiny import tiny_model, tiny_tokenizer
from raypo.train.forward import sequence_forward
from raypo.train.reference import compute_reference


def _pairs(n: int, seed: int = 0) -> TokenizedPairs:
    rng = random.Random(seed)

    def ids(lo, hi):
        return [rng.randrange(8, 60) for _ in range(rng.randint(lo, hi))]

    return TokenizedPairs([[1, *ids(0, 12)] for _ in range(n)], [ids(1, 20) for _ in range(n)],
                          [ids(1, 20) for _ in range(n)], fingerprint=f"random-{seed}")


@pytest.mark.parametrize("tokens_per_batch", [64, 4096])  # many small batches, and one
def test_precompute_matches_the_training_layout_forward(tokens_per_batch):
    tok = tiny_tokenizer()
    model = tiny_model(tok, seed=1).eval()
    pairs = _pairs(12)
    ref = compute_reference(model, pairs, pad_id=tok.pad_token_id, token_logps=True, topk=5,
                            hidden=True, embeddings=True, device=torch.device("cpu"),
                            tokens_per_batch=tokens_per_batch)
    index = torch.arange(len(pairs))
    batch = collate(pairs, index.tolist(), tok.pad_token_id)
    with torch.no_grad():
        want = sequence_forward(model, batch, hidden=True, embeddings=True, chunk=7)
    T, B = batch.labels.shape[1], len(pairs)
    got = ref.fields(index, T, "cpu")
    close = {"rtol": 1e-4, "atol": 1e-5}
    torch.testing.assert_close(got["ref_chosen_logps"], want.logps[:B], **close)
    torch.testing.assert_close(got["ref_rejected_logps"], want.logps[B:], **close)
    torch.testing.assert_close(got["ref_chosen_token_logps"], want.token_logps[:B], **close)
    torch.testing.assert_close(got["ref_rejected_hidden"],
                               want.hidden[B:] * batch.response_mask[B:, :, None], **close)
    torch.testing.assert_close(got["chosen_embeddings"], want.response_embeddings[:B], **close)
    torch.testing.assert_close(got["prompt_embeddings"], want.prompt_embeddings, **close)
    mask = batch.response_mask[:B].bool()
    for i in range(B):  # the top 5 of each chosen row's own full logits, run alone
        prompt, response = pairs.prompt_ids[i], pairs.chosen_ids[i]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + response])).logits[0]
        top = TopKLogits.from_logits(logits[len(prompt) - 1:-1], 5)
        torch.testing.assert_close(got["ref_chosen_logits"].values[i][mask[i]], top.values,
                                   **close)
        assert torch.equal(got["ref_chosen_logits"].indices[i][mask[i]], top.indices)
    assert not got["ref_chosen_logps"].is_inference()  # usable in a loss that is backpropagated
