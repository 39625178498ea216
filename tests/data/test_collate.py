"""Collation layout (exact tensors, and equivalence with unpadded model runs) and
length-grouped batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from raypo.data import LengthGroupedBatches, TokenizedPairs, collate
from raypo.models.tiny import tiny_model, tiny_tokenizer

PAD = 0


def two_pairs() -> TokenizedPairs:
    return TokenizedPairs(
        prompt_ids=[[1, 10, 11], [1, 12]],
        chosen_ids=[[20, 2], [24, 25, 26, 27, 2]],
        rejected_ids=[[21, 22, 23, 2], [28, 2]],
        fingerprint="hand-made",
    )


def test_collate_layout_of_a_hand_made_batch():
    batch = collate(two_pairs(), [0, 1], pad_id=PAD)
    # P = 3 (longest prompt), T = 5 (longest response); rows: chosen 0, chosen 1, rejected 0,
    # rejected 1; prompts end at column 2, responses start at column 3.
    assert batch.prompt_length == 3 and batch.response_length == 5 and batch.n_pairs == 2
    assert batch.input_ids.tolist() == [
        [1, 10, 11, 20, 2, 0, 0, 0],
        [0, 1, 12, 24, 25, 26, 27, 2],
        [1, 10, 11, 21, 22, 23, 2, 0],
        [0, 1, 12, 28, 2, 0, 0, 0],
    ]
    assert batch.attention_mask.tolist() == [
        [1, 1, 1, 1, 1, 0, 0, 0],
        [0, 1, 1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 1, 1, 0],
        [0, 1, 1, 1, 1, 0, 0, 0],
    ]
    assert batch.position_ids.tolist() == [
        [0, 1, 2, 3, 4, 4, 4, 4],
        [0, 0, 1, 2, 3, 4, 5, 6],
        [0, 1, 2, 3, 4, 5, 6, 6],
        [0, 0, 1, 2, 3, 3, 3, 3],
    ]
    assert batch.labels.tolist() == [
        [20, 2, 0, 0, 0],
        [24, 25, 26, 27, 2],
        [21, 22, 23, 2, 0],
        [28, 2, 0, 0, 0],
    ]
    assert batch.response_mask.tolist() == [
        [1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1],
        [1, 1, 1, 1, 0],
        [1, 1, 0, 0, 0],
    ]
    assert batch.prompt_mask.tolist() == [
        [1, 1, 1, 0, 0, 0, 0, 0],
        [0, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0],
        [0, 1, 1, 0, 0, 0, 0, 0],
    ]
    assert batch.index.tolist() == [0, 1]
    assert batch.n_tokens == 5 + 7 + 7 + 4
    for name in ("input_ids", "attention_mask", "position_ids", "labels", "index"):
        assert getattr(batch, name).dtype == torch.long, name
    assert batch.response_mask.dtype == batch.prompt_mask.dtype == torch.float32


def test_collate_follows_the_given_index_order_and_pad_id():
    batch = collate(two_pairs(), [1, 0], pad_id=99)
    assert batch.index.tolist() == [1, 0]
    assert batch.input_ids[0].tolist() == [99, 1, 12, 24, 25, 26, 27, 2]
    assert batch.labels[1].tolist() == [20, 2, 99, 99, 99]


def test_to_moves_every_tensor():
    moved = collate(two_pairs(), [0, 1], pad_id=PAD).to("meta")
    assert all(
        getattr(moved, name).device.type == "meta"
        for name in ("input_ids", "attention_mask", "position_ids", "labels", "response_mask",
                     "prompt_mask", "index")
    )
    assert moved.prompt_length == 3 and moved.n_tokens == 23


def response_logps(model, input_ids, attention_mask, position_ids, labels):
    """Per-token log-probs of `labels` from the logits of the last T+1 positions."""
    T = labels.shape[1]
    logits = model(input_ids=input_ids, attention_mask=attention_mask,
                   position_ids=position_ids, logits_to_keep=T + 1).logits[:, :-1]
    return logits.log_softmax(-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


# Eager attention is checked in float32 only: a float32-configured model cast to float64
# builds its eager padding mask in a way that turns fully masked (left padding) query rows to
# NaN, a transformers quirk unrelated to this layout.
@pytest.mark.parametrize(
    ("attention", "dtype", "atol"),
    [("sdpa", torch.float64, 1e-9), ("eager", torch.float32, 1e-5)],
)
def test_padded_batch_gives_each_row_its_unpadded_log_probs(attention, dtype, atol):
    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer).to(dtype).eval()
    model.set_attn_implementation(attention)
    rng = np.random.default_rng(0)

    def seq(low: int, high: int) -> list[int]:
        return rng.integers(8, len(tokenizer), size=int(rng.integers(low, high))).tolist()

    n = 5
    pairs = TokenizedPairs(
        [[tokenizer.bos_token_id, *seq(1, 12)] for _ in range(n)],
        [[*seq(1, 10), tokenizer.eos_token_id] for _ in range(n)],
        [[*seq(1, 10), tokenizer.eos_token_id] for _ in range(n)],
        "random",
    )
    batch = collate(pairs, [3, 0, 4, 1, 2], pad_id=tokenizer.pad_token_id)
    with torch.no_grad():
        batched = response_logps(model, batch.input_ids, batch.attention_mask,
                                 batch.position_ids, batch.labels)
        # the same batch attending to its padding: shows the comparison can fail
        unmasked = response_logps(model, batch.input_ids, torch.ones_like(batch.attention_mask),
                                  batch.position_ids, batch.labels)
        prompts = [pairs.prompt_ids[i] for i in batch.index.tolist()] * 2
        responses = ([pairs.chosen_ids[i] for i in batch.index.tolist()]
                     + [pairs.rejected_ids[i] for i in batch.index.tolist()])
        worst_unmasked = 0.0
        for row, (p, r) in enumerate(zip(prompts, responses, strict=True)):
            ids = torch.tensor([p + r])
            alone = model(input_ids=ids).logits[0, len(p) - 1:-1].log_softmax(-1)
            expected = alone.gather(-1, torch.tensor(r)[:, None]).squeeze(-1)
            mask = batch.response_mask[row].bool()
            assert int(mask.sum()) == len(r)
            torch.testing.assert_close(batched[row][mask], expected, rtol=0, atol=atol)
            off = float((unmasked[row][mask] - expected).abs().max())
            worst_unmasked = max(worst_unmasked, off)
    assert worst_unmasked > 1000 * atol


def padding_fraction(batches: list[list[int]], lengths: np.ndarray) -> float:
    padded = sum(len(b) * lengths[b].max() for b in batches)
    return 1.0 - lengths.sum() / padded


def test_length_grouping_wastes_far_less_on_padding_than_random_batches():
    lengths = np.random.default_rng(0).integers(5, 500, size=4000)
    grouped = list(LengthGroupedBatches(lengths, batch_size=16, seed=0))
    order = np.random.default_rng(1).permutation(len(lengths))
    random_batches = [order[k:k + 16] for k in range(0, len(order), 16)]
    assert padding_fraction(random_batches, lengths) > 0.35
    assert padding_fraction(grouped, lengths) < 0.05


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(
    n=st.integers(0, 300), batch_size=st.integers(1, 20), group_factor=st.integers(1, 8),
    drop_last=st.booleans(), shuffle=st.booleans(), seed=st.integers(0, 2**16),
)
def test_every_index_appears_once_per_epoch(n, batch_size, group_factor, drop_last, shuffle,
                                             seed):
    lengths = np.random.default_rng(seed).integers(1, 50, size=n)
    sampler = LengthGroupedBatches(lengths, batch_size, seed=seed, shuffle=shuffle,
                                   drop_last=drop_last, group_factor=group_factor)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    seen = [i for b in batches for i in b]
    assert len(seen) == len(set(seen))
    assert sum(len(b) < batch_size for b in batches) <= 1  # only the remainder is short
    if drop_last:
        assert len(seen) == (n // batch_size) * batch_size
        assert all(len(b) == batch_size for b in batches)
    else:
        assert sorted(seen) == list(range(n))
    if batches:  # the longest pair comes first, so running out of memory happens at once
        assert lengths[batches[0]].max() == lengths[seen].max()


def test_order_is_deterministic_in_seed_and_epoch():
    lengths = np.random.default_rng(0).integers(1, 100, size=500)

    def epoch(seed: int, e: int) -> list[list[int]]:
        sampler = LengthGroupedBatches(lengths, 8, seed=seed, group_factor=4)
        sampler.set_epoch(e)
        return list(sampler)

    assert epoch(0, 0) == epoch(0, 0)
    assert epoch(0, 1) == epoch(0, 1)
    assert epoch(0, 0) != epoch(0, 1)
    assert epoch(0, 0) != epoch(1, 0)


def test_batches_within_a_chunk_are_sorted_longest_first_without_shuffle():
    lengths = np.array([3, 9, 1, 7, 5, 2])
    batches = list(LengthGroupedBatches(lengths, 2, shuffle=False, group_factor=3))
    assert batches == [[1, 3], [4, 0], [5, 2]]


def test_length_of_the_sampler():
    assert len(LengthGroupedBatches(np.ones(10), 3)) == 4
    assert len(LengthGroupedBatches(np.ones(10), 3, drop_last=True)) == 3
