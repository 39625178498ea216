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


def rng_state() -> dict:
    """The random generators' states, for `save`: the CPU's and, where CUDA is available, every
    visible device's (dropout and sampling on a GPU draw from the device's own generator)."""
    state = {"rng": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(saved: dict) -> None:
    """Set the generators to a checkpoint's `rng_state`. A checkpoint without CUDA states (from
    a CPU run, or older) leaves the devices' generators as seeded; one from a machine with a
    different number of devices restores those both have, device i to device i (a Ray Train
    worker sees its own GPU as device 0), and leaves any others as seeded."""
    torch.set_rng_state(saved["rng"])
    states = saved.get("cuda_rng")
    if states and torch.cuda.is_available():  # device i gets state i
        torch.cuda.set_rng_state_all(states[:torch.cuda.device_count()])
