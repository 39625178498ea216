"""Checkpoints: everything a stopped run needs to continue as if it had not stopped (policy,
optimizer, learning-rate schedule, the loss's state including adaptive beta, data position,
RNG, the metrics so far). Written atomically: a kill mid-write leaves the previous one."""

from __future__ import annotations

from pathlib import Path

import torch

from raypo.data.cache import atomic_torch_save

NAME = "last.pt"


def save(directory: str | Path, state: dict) -> Path:
    path = Path(directory) / NAME
    atomic_torch_save(state, path)
    return path


def load(directory: str | Path | None) -> dict | None:
    """The saved state, read with `weights_only=True`: tensors, numbers, strings and their
    lists, tuples and dicts, never arbitrary objects, so a checkpoint planted on shared
    storage cannot run code (what `save` stores is only such values)."""
    if directory is None or not (Path(directory) / NAME).is_file():
        return None
    return torch.load(Path(directory) / NAME, weights_only=True)
