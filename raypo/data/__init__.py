"""Preference datasets -> checked pairs -> token ids (cached) -> length-grouped, collated batches.

    dataset = load_preferences("my_prefs/")              # jsonl / json / parquet / folder / hub
    pairs = tokenize_pairs(dataset, tokenizer, max_length=512)
    train, held_out = pairs.split(0.1, seed=0)
    for indices in LengthGroupedBatches(train.lengths(), batch_size=8, seed=0):
        batch = collate(train, indices, pad_id=tokenizer.pad_token_id)
"""

from raypo.data.collate import LengthGroupedBatches, PairBatch, collate
from raypo.data.errors import DataError
from raypo.data.preference import data_fingerprint, load_preferences
from raypo.data.tokenize import TokenizedPairs, tokenize_pairs

__all__ = [
    "DataError",
    "LengthGroupedBatches",
    "PairBatch",
    "TokenizedPairs",
    "collate",
    "data_fingerprint",
    "load_preferences",
    "tokenize_pairs",
]
