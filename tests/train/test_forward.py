"""The training forward runs rows shifted to column 0 (right padding, no attention mask) and
gathers its outputs back into the aligned layout: every output must be what each row gives
alone, unpadded, and the model must see fewer columns than the aligned layout has."""

from __future__ import annotations

import numpy as np
import torch

from raypo.data.collate import collate
from raypo.data.tokenize import TokenizedPairs
from raypo.models.tiny import tiny_model, tiny_tokenizer
from raypo.train.forward import sequence_forward


class Widths(torch.nn.Module):
    """The model, recording the width of what it is given."""

    def __init__(self, model):
        super().__init__()
        self.model, self.widths = model, []

    def forward(self, input_ids, **kwargs):
        self.widths.append(input_ids.shape[1])
        return self.model(input_ids=input_ids, **kwargs)


def test_each_row_gets_what_it_gives_alone_from_a_narrower_forward():
    tok = tiny_tokenizer()
    model = tiny_model(tok, seed=4).eval()
    rng = np.random.default_rng(1)

    def ids(size):
        return rng.integers(8, len(tok), size=size).tolist()

    n = 6  # long prompts with short responses and the other way round, as in real data
    pairs = TokenizedPairs([[tok.bos_token_id, *ids(2 * i)] for i in range(n)],
                           [[*ids(12 - 2 * i), tok.eos_token_id] for i in range(n)],
                           [[*ids(1 + i), tok.eos_token_id] for i in range(n)], "random")
    batch = collate(pairs, [2, 0, 5, 1, 4, 3], pad_id=tok.pad_token_id)
    wrapped = Widths(model)

    def top_logit(logits, ref, labels, mask):  # a TokenTerm: a function of the full logits
        return logits.max(-1).values * mask

    with torch.no_grad():  # chunks of 5 tokens: several per row, some across two rows
        out = sequence_forward(wrapped, batch, hidden=True, embeddings=True, chunk=5,
                               terms={"top": top_logit})
    assert wrapped.widths == [int(batch.attention_mask.sum(-1).max())]
    assert wrapped.widths[0] < batch.input_ids.shape[1]

    order = batch.index.tolist()
    prompts = [pairs.prompt_ids[i] for i in order] * 2
    responses = [pairs.chosen_ids[i] for i in order] + [pairs.rejected_ids[i] for i in order]
    close = {"rtol": 1e-5, "atol": 1e-5}  # float32
    for row, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        with torch.no_grad():
            alone = model(input_ids=torch.tensor([p + r]), output_hidden_states=True)
        logits = alone.logits[0, len(p) - 1:-1]  # the positions that predict the response
        want = logits.log_softmax(-1).gather(-1, torch.tensor(r)[:, None])[:, 0]
        n_r = len(r)
        torch.testing.assert_close(out.token_logps[row, :n_r], want, **close)
        assert not out.token_logps[row, n_r:].any()  # padding contributes nothing
        torch.testing.assert_close(out.logps[row], want.sum(), **close)
        torch.testing.assert_close(out.terms["top"][row, :n_r], logits.max(-1).values, **close)
        assert not out.terms["top"][row, n_r:].any()
        states = alone.hidden_states[-1][0]
        torch.testing.assert_close(out.hidden[row, :n_r], states[len(p) - 1:-1], **close)
        torch.testing.assert_close(out.response_embeddings[row], states[len(p):].mean(0),
                                   **close)
        if row < n:
            torch.testing.assert_close(out.prompt_embeddings[row], states[:len(p)].mean(0),
                                       **close)
