"""Batches of preference pairs: which pairs go together, and how they are laid out as tensors.

Layout (fixed; the trainer depends on it). For B pairs, P = the longest prompt and T = the
longest response (chosen or rejected) in the batch, the 2B rows are the chosen sequences then
the rejected ones, each laid out as

    [left padding | prompt | response | right padding]
     columns 0 .. P-1      | P .. P+T-1

so that every prompt ends at column P-1 and every response starts at column P. A causal LM
run with `logits_to_keep=T+1` then gives logits whose `[:, :-1]` predict the T response
columns, aligned with `labels`. `position_ids` count only real tokens, so left padding does
not shift a row's positions: each row computes what it would alone, unpadded.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from raypo.data.tokenize import TokenizedPairs


@dataclass
class PairBatch:
    """B preference pairs as 2B rows (chosen rows 0..B-1, rejected rows B..2B-1).

    input_ids, attention_mask, position_ids: (2B, P+T) long. labels: (2B, T) long, the
    response ids with pad_id at padding. response_mask: (2B, T) float, 1 on response tokens.
    prompt_mask: (2B, P+T) float, 1 on prompt tokens. index: (B,) long, the pairs' indices in
    the `TokenizedPairs`. prompt_length: P. n_tokens: the non-padding tokens of all 2B rows.
    """

    input_ids: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    labels: Tensor
    response_mask: Tensor
    prompt_mask: Tensor
    index: Tensor
    prompt_length: int
    n_tokens: int

    @property
    def n_pairs(self) -> int:
        """B."""
        return int(self.index.shape[0])

    @property
    def response_length(self) -> int:
        """T: logits for the responses are `model(..., logits_to_keep=T + 1).logits[:, :-1]`."""
        return int(self.labels.shape[1])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PairBatch:
        """The same batch with every tensor on `device`."""
        moved = {
            f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), Tensor)
        }
        return dataclasses.replace(self, **moved)


def collate(pairs: TokenizedPairs, indices: Sequence[int], pad_id: int) -> PairBatch:
    """Lay out the pairs at `indices` as a `PairBatch` (see the module docstring)."""
    idx = [int(i) for i in indices]
    if not idx:
        raise ValueError("cannot collate an empty batch")
    prompts = [pairs.prompt_ids[i] for i in idx] * 2
    responses = [pairs.chosen_ids[i] for i in idx] + [pairs.rejected_ids[i] for i in idx]
    if any(not p for p in prompts):
        raise ValueError("every pair needs a prompt token: it predicts the first response token")
    P = max(len(p) for p in prompts)
    T = max(len(r) for r in responses)
    rows = len(prompts)

    input_ids = np.full((rows, P + T), pad_id, dtype=np.int64)
    attention = np.zeros((rows, P + T), dtype=np.int64)
    prompt_mask = np.zeros((rows, P + T), dtype=np.float32)
    for row, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        input_ids[row, P - len(p):P] = p
        input_ids[row, P:P + len(r)] = r
        attention[row, P - len(p):P + len(r)] = 1
        prompt_mask[row, P - len(p):P] = 1.0

    input_ids_t = torch.from_numpy(input_ids)
    attention_t = torch.from_numpy(attention)
    return PairBatch(
        input_ids=input_ids_t,
        attention_mask=attention_t,
        position_ids=(attention_t.cumsum(-1) - 1).clamp(min=0),
        labels=input_ids_t[:, P:].clone(),
        response_mask=attention_t[:, P:].float(),
        prompt_mask=torch.from_numpy(prompt_mask),
        index=torch.tensor(idx, dtype=torch.long),
        prompt_length=P,
        n_tokens=int(attention.sum()),
    )


class LengthGroupedBatches:
    """Batches of pair indices in which lengths are alike, so little compute goes to padding.

    Each epoch: shuffle all indices, cut them into chunks of `batch_size * group_factor`, sort
    each chunk by length (longest first), cut it into batches and shuffle the batches' order;
    the batch holding the longest pair is moved to the front so that a run that does not fit
    in memory fails on its first step. Grouping within chunks, not globally, keeps batches
    random enough for SGD. Deterministic in (seed, epoch); each index appears exactly once
    per epoch, except the last partial batch's when `drop_last`.
    """

    def __init__(
        self,
        lengths: Sequence[int] | np.ndarray,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        group_factor: int = 50,
    ) -> None:
        if batch_size < 1 or group_factor < 1:
            raise ValueError(
                f"batch_size and group_factor must be >= 1, got {batch_size} and {group_factor}"
            )
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.group_factor = group_factor
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose order `__iter__` gives (a new shuffle per epoch)."""
        self.epoch = epoch

    def __len__(self) -> int:
        n, b = len(self.lengths), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def __iter__(self) -> Iterator[list[int]]:
        n, b = len(self.lengths), self.batch_size
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        chunk = b * self.group_factor
        batches: list[np.ndarray] = []
        for start in range(0, n, chunk):
            part = order[start:start + chunk]
            # stable sort, so ties keep the shuffled order and the result stays seeded
            part = part[np.argsort(-self.lengths[part], kind="stable")]
            batches.extend(part[k:k + b] for k in range(0, len(part), b))
        # only the very last batch can be short: every chunk but the last is a multiple of b
        if self.drop_last and batches and len(batches[-1]) < b:
            batches.pop()
        if self.shuffle:
            batches = [batches[k] for k in rng.permutation(len(batches))]
        if batches:
            first = int(np.argmax([self.lengths[x].max() for x in batches]))
            batches.insert(0, batches.pop(first))
        return iter([x.tolist() for x in batches])
