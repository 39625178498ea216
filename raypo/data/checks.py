"""Checks of a dataset as a whole, made before any model loads: what row-by-row checks cannot
see (ties, splits too small to batch or to measure, characters the tokenizer cannot hold).

Decisions, with their reasons:
- A pair whose chosen equals its rejected carries no preference: it is left out with one
  warning naming its rows (a hub dataset may hold a few; refusing the whole dataset for them
  would help nobody), and a dataset of nothing but such pairs is an error.
- Fewer training pairs than `batch_size` is an error, not a smaller batch: the batch size is a
  hyperparameter recorded in every report row and compared across trials, and a run that
  silently trains with another would be recorded wrongly.
- A held-out split of fewer than MIN_EVAL_PAIRS pairs is an error (its accuracy moves in steps
  of 1/n: one pair reads 0 or 1); under WARN_EVAL_PAIRS a warning gives its size.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import datasets

from raypo.data.errors import DataError

MIN_EVAL_PAIRS = 8
WARN_EVAL_PAIRS = 50
SHOWN_ROWS = 10


class DataWarning(UserWarning):
    """Something in the data the user should know about; the run goes on."""


def _rows(rows: Sequence[int]) -> str:
    shown = ", ".join(map(str, rows[:SHOWN_ROWS]))
    return shown + (f" and {len(rows) - SHOWN_ROWS} more" if len(rows) > SHOWN_ROWS else "")


def drop_ties(dataset: datasets.Dataset, source: str) -> datasets.Dataset:
    """The pairs whose chosen differs from rejected; one warning names the rows left out
    (0-based, in the order the data is read), an error if none is left."""
    ties = [i for i, (c, r) in enumerate(zip(dataset["chosen"], dataset["rejected"],
                                              strict=True)) if c == r]
    if not ties:
        return dataset
    if len(ties) == len(dataset):
        raise DataError.at(source, "rejected", None,
                           f"every pair ({len(ties)}) has rejected equal to chosen: there is "
                           "no preference to learn")
    warnings.warn(f"{source}: {len(ties)} pair(s) whose chosen equals rejected carry no "
                  f"preference and are left out: rows {_rows(ties)}", DataWarning,
                  stacklevel=2)
    drop = set(ties)
    kept = dataset.select([i for i in range(len(dataset)) if i not in drop])
    kept._fingerprint = dataset._fingerprint  # what the source's fingerprint describes
    return kept


def check_split(n_train: int, n_eval: int, *, batch_size: int, eval_fraction: float,
                prompts: int, source: str) -> None:
    """The held-out split is large enough to measure and the training split to batch."""
    total = n_train + n_eval
    if n_eval < MIN_EVAL_PAIRS:
        raise DataError.at(
            source, None, None,
            f"the held-out split has {n_eval} pair(s) (eval_fraction={eval_fraction:g} of "
            f"{total} pairs with {prompts} distinct prompts; pairs that share a prompt stay "
            f"on one side), fewer than the {MIN_EVAL_PAIRS} a held-out accuracy needs; raise "
            "eval_fraction or give more pairs with distinct prompts")
    if n_train < batch_size:
        raise DataError.at(
            source, None, None,
            f"{n_train} training pairs (after {n_eval} held out) are fewer than "
            f"batch_size={batch_size}, so a batch never fills; lower batch_size to at most "
            f"{n_train} or give more pairs")
    if n_eval < WARN_EVAL_PAIRS:
        warnings.warn(f"{source}: the held-out split has only {n_eval} pairs: pref_accuracy "
                      f"moves in steps of {1 / n_eval:.3f} and is a noisy objective",
                      DataWarning, stacklevel=2)


def warn_unknown(ids: dict[str, list[list[int]]], unk_id: int | None, unk: str | None,
                 source: str) -> int:
    """One warning with the count of tokens that became the unknown token; returns it."""
    if unk_id is None:
        return 0
    count, first = 0, None
    for column, rows in ids.items():
        for i, row in enumerate(rows):
            n = row.count(unk_id)
            if n and first is None:
                first = (column, i)
            count += n
    if count:
        warnings.warn(f"{source}: {count} token(s) became the unknown token {unk}: text the "
                      "tokenizer's vocabulary cannot represent (the first in column "
                      f"{first[0]!r}, row {first[1]})",
                      DataWarning, stacklevel=2)
    return count
