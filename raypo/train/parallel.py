"""What the loop does differently when the policy is sharded by FSDP (`parallel: fsdp`).

Under DDP, and in one process, every rank holds the whole policy and these helpers are the plain
torch calls (but `gradient_sync`). Under FSDP each rank holds a shard of every parameter outside
a forward pass, so:
- anything that reads the policy's weights outside the wrapper's forward (generation, the
  held-out pass through `setup.policy`, HT-SR alphas) runs inside `full_params`;
- the gradient norm spans every rank's shard (FSDP's own `clip_grad_norm_`), plus the loss's
  own parameters, which every rank holds whole;
- a checkpoint holds the full policy state dict (gathered to rank 0) and every rank's shard of
  the optimizer state, so a resume with the same number of workers restores it exactly;
- with gradient accumulation every micro-batch's gradients are reduce-scattered (DDP
  all-reduces only the step's last: `gradient_sync`), and float16's gradient scaler is the
  sharded one, so that every rank skips the same overflowing steps.

The frozen reference copy (`models.load.Reference`) is taken before wrapping, so it is never
sharded: each rank keeps a whole one, as under DDP.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist
from torch import nn


def is_fsdp(model: nn.Module | None) -> bool:
    if model is None:
        return False
    from torch.distributed.fsdp import FullyShardedDataParallel

    return isinstance(model, FullyShardedDataParallel)


def wrap_fsdp(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` as FSDP, one unit per transformer block (the classes a Hugging Face model lists
    in `_no_split_modules`), original parameters kept so that the optimizer and checkpoints
    see the policy's own names and the loop's code stays as under DDP."""
    return _fsdp()(model, **fsdp_kwargs(model, device))


def fsdp_kwargs(model: nn.Module, device: torch.device) -> dict:
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = {type(m) for m in model.modules() if type(m).__name__ in names}
    kwargs = {"use_orig_params": True, "device_id": device}
    if blocks:
        kwargs["auto_wrap_policy"] = ModuleWrapPolicy(blocks)
    return kwargs


def _fsdp():
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel


def full_params(model: nn.Module | None):
    """Context in which the unwrapped policy holds its whole weights on every rank (a no-op
    unless `model` is FSDP). Every rank must enter it (it gathers)."""
    if not is_fsdp(model):
        return contextlib.nullcontext()
    return _fsdp().summon_full_params(model, writeback=False)


def gradient_sync(model: nn.Module, sync: bool):
    """Context for one micro-batch's forward and backward. Under DDP the gradients are
    all-reduced only when `sync` (the step's last micro-batch): the others accumulate in
    `.grad` locally (`no_sync`), and the last one's all-reduce carries the sum, so a step of
    `grad_accum` micro-batches communicates once. Under FSDP every micro-batch is still
    reduce-scattered: its `no_sync` would keep the whole unsharded gradient on every rank
    until the last micro-batch, the memory FSDP exists to save."""
    from torch.nn.parallel import DistributedDataParallel

    if sync or not isinstance(model, DistributedDataParallel):
        return contextlib.nullcontext()
    return model.no_sync()


def grad_scaler(model: nn.Module, device: torch.device, enabled: bool):
    """torch.amp's GradScaler (float16 training; disabled, every call is the plain one). Under
    FSDP its sharded variant: each rank sees only its shard's gradients, and the ranks must
    agree on whether a step overflowed (and is skipped)."""
    if is_fsdp(model):
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(device.type, enabled=enabled)
    return torch.amp.GradScaler(device.type, enabled=enabled)


def clip_grad_norm(model: nn.Module, params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_(params, max_norm)` with the norm of the whole model, not
    of this rank's shard, when `model` is FSDP: `params` may hold parameters outside it (the
    loss's), which every rank holds whole and which join the same global norm."""
    if not is_fsdp(model):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    inside = {id(p) for p in model.parameters()}
    outside = [p for p in params if id(p) not in inside and p.grad is not None]
    sharded = model.clip_grad_norm_(math.inf)  # the norm only: a coefficient of 1
    rest = (torch.nn.utils.clip_grad_norm_(outside, math.inf) if outside
            else torch.zeros((), device=sharded.device))
    total = torch.linalg.vector_norm(torch.stack([sharded.float(), rest.float().to(sharded)]))
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)  # as torch's clip_grad_norm_
    for p in params:
        if p.grad is not None:
            p.grad.mul_(coef.to(p.grad.device, p.grad.dtype))
    return total


def _trainable(policy: nn.Module) -> dict | None:
    """The trainable parameters by name when some are frozen (LoRA), else None."""
    params = dict(policy.named_parameters())
    if all(p.requires_grad for p in params.values()):
        return None
    return {name: p for name, p in params.items() if p.requires_grad}


def model_state(model: nn.Module, policy: nn.Module) -> dict:
    """The policy's full state dict (on rank 0; empty on the other ranks under FSDP); with
    LoRA only the adapter's weights: the frozen base reloads as it was, and a checkpoint of a
    real model then costs megabytes, not its whole weights."""
    if not is_fsdp(model):
        trainable = _trainable(policy)
        if trainable is not None:
            return {name: p.detach() for name, p in trainable.items()}
        return policy.state_dict()
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType

    # offloading to the CPU crashes when the model already is there (torch 2.13)
    offload = next(model.parameters()).device.type != "cpu"
    config = FullStateDictConfig(offload_to_cpu=offload, rank0_only=True)
    with _fsdp().state_dict_type(model, StateDictType.FULL_STATE_DICT, config):
        return model.state_dict()


def load_model_state(model: nn.Module, policy: nn.Module, state: dict) -> None:
    if not is_fsdp(model):
        trainable = _trainable(policy)
        if trainable is not None and set(state) == set(trainable):  # an adapter's checkpoint
            policy.load_state_dict(state, strict=False)
            return
        policy.load_state_dict(state)
        return
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType

    config = FullStateDictConfig(rank0_only=False)  # every rank read the checkpoint
    with _fsdp().state_dict_type(model, StateDictType.FULL_STATE_DICT, config):
        model.load_state_dict(state)


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer):
    """The optimizer's state dict; under FSDP the list of every rank's (each holds the state of
    its own shard), gathered so that rank 0's checkpoint has them all."""
    if not is_fsdp(model):
        return optimizer.state_dict()
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, _to_cpu(optimizer.state_dict()))
    return states


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state) -> None:
    if not is_fsdp(model):
        optimizer.load_state_dict(state)
        return
    world = dist.get_world_size()
    if not isinstance(state, list) or len(state) != world:
        raise RuntimeError(f"the checkpoint's FSDP optimizer state is for "
                           f"{len(state) if isinstance(state, list) else 'no'} ranks, this run "
                           f"has {world}: resume with the same num_workers")
    optimizer.load_state_dict(state[dist.get_rank()])


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj
