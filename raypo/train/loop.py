"""One training run, top to bottom: set-up, optimizer, loop, evaluation, checkpoint."""

from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist

from raypo.data.collate import LengthGroupedBatches, collate
from raypo.errors import RaypoError
from raypo.losses import schedule
from raypo.selection.htsr import SUMMARY_KEYS, layer_alphas, summarize
from raypo.train import checkpoint
from raypo.train.evaluate import held_out_metrics, sample_and_score
from raypo.train.judging import judge_metrics
from raypo.train.parallel import (
    clip_grad_norm,
    full_params,
    grad_scaler,
    gradient_sync,
    load_model_state,
    load_optimizer_state,
    model_state,
    optimizer_state,
)
from raypo.train.setup import Setup
from raypo.train.step import preference_batch

# a row's names, as this module writes them: at every evaluation the step's (beside the loss's
# own metrics and the evaluation's, raypo.train.evaluate and raypo.train.judging), at the end of
# the run its totals and the HT-SR summary (none with `htsr: off`)
STEP_METRICS = ("step", "train_loss", "current_beta", "grad_norm", "current_lr", "eval_seconds")
END_METRICS = ("tokens", "train_seconds", "tokens_per_s", "steps", "eval_seconds", "eval_share")
HTSR_METRICS = (*(f"htsr_{k}" for k in SUMMARY_KEYS if k != "layers"), "htsr_matrices")


class TrainingDiverged(RaypoError, RuntimeError):
    """The loss became NaN or infinite; the run (trial) is recorded as failed (exit 1: the
    input was valid, the run was not)."""

    exit_status = 1


def _world() -> tuple[int, int]:
    """(rank, world size): (0, 1) unless torch.distributed runs (under Ray Train)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _batches(setup: Setup, epoch: int, skip: int):
    """Index lists from `epoch`, batch `skip` on, forever; yields (epoch, position, indices).

    Every worker draws the same global batch (same seed) and keeps its own share of it, so
    N workers see exactly the pairs one worker would, and DDP's gradient mean equals the
    one-worker gradient of the global batch.
    """
    rank, world = _world()
    sampler = LengthGroupedBatches(setup.train_pairs.lengths(), setup.cfg.batch_size,
                                   seed=setup.cfg.seed, drop_last=True)
    if len(sampler) == 0:  # the data is checked before this (raypo.data.checks); never spin
        raise ValueError(f"{len(setup.train_pairs)} training pairs are fewer than "
                         f"batch_size={setup.cfg.batch_size}: no batch can be drawn")
    while True:
        sampler.set_epoch(epoch)
        for pos, indices in enumerate(sampler):
            if pos >= skip:
                yield epoch, pos + 1, indices[rank::world]
        epoch, skip = epoch + 1, 0


def evaluate(setup: Setup, step: int, forward_model=None) -> dict[str, float]:
    # under FSDP the unwrapped policy holds whole weights only inside full_params
    # (generation cannot run through the FSDP wrapper); every rank evaluates alike
    with full_params(forward_model), setup.autocast():
        metrics = held_out_metrics(setup, setup.policy)
        if setup.judge is not None:  # sampled, judged, and on the built-in task scored too
            metrics.update(judge_metrics(setup, setup.policy))
        elif setup.task is not None:
            metrics.update(sample_and_score(setup, setup.policy, setup.cfg.eval_samples,
                                            seed=setup.cfg.seed + 1))
    if setup.task is not None and setup.judge is None:  # the reference is never sharded
        if "ref_true_reward" not in setup.cache:
            # LoRA: the policy with its adapters off, not the policy trained so far
            with setup.autocast(), setup.reference_model.unwrapped() as reference:
                ref = sample_and_score(setup, reference, setup.cfg.eval_samples,
                                       seed=setup.cfg.seed + 1)
            setup.cache["ref_true_reward"] = ref["true_reward"]
        metrics["ref_true_reward"] = setup.cache["ref_true_reward"]
    setup.policy.train()
    setup.loss_fn.train()
    return metrics


def train(setup: Setup, *, checkpoint_dir=None, on_eval=None, progress=None,
          forward_model=None) -> dict:
    """Train `setup.policy` with `setup.loss_fn`; returns the final metrics.

    `on_eval(step, metrics)` is called at every evaluation (Tune reports there);
    `progress(step, loss)` after every optimizer step (a progress bar). `forward_model` is
    the module the training forward runs through (DDP's wrapper of the policy under Ray
    Train; the policy itself by default). A step's loss is the mean over its `grad_accum`
    micro-batches, read from the device once per step (the divergence check).
    """
    cfg, policy, loss_fn = setup.cfg, setup.policy, setup.loss_fn
    forward_model = forward_model or policy
    # the wrapper's parameters: under FSDP these are this rank's shards
    params = [p for m in (forward_model, loss_fn) for p in m.parameters() if p.requires_grad]
    # fused: one kernel per step and no parameter-sized temporaries (the foreach AdamW makes
    # one for its denominators: at a real vocabulary, the embedding's size again)
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
    # float16 (CUDA): the loss scaled against underflow; otherwise every call is the plain one
    scaler = grad_scaler(forward_model, setup.device, setup.autocast_dtype == torch.float16)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / (cfg.warmup_steps + 1)))
    beta = schedule(cfg.beta_schedule.name, **{"beta": float(loss_fn.beta),
                                                "total_steps": cfg.steps,
                                                **cfg.beta_schedule.params}
                    ) if cfg.beta_schedule.name != "constant" else None
    state = {"step": 0, "epoch": 0, "pos": 0, "tokens": 0, "train_seconds": setup.reference_seconds,
             "eval_seconds": 0.0, "history": []}
    saved = checkpoint.load(checkpoint_dir)
    if saved:
        load_model_state(forward_model, policy, saved["policy"])
        loss_fn.load_state_dict(saved["loss"])
        load_optimizer_state(forward_model, optimizer, saved["optimizer"])
        lr_sched.load_state_dict(saved["lr_sched"])
        if saved.get("scaler"):  # empty from a run without float16
            scaler.load_state_dict(saved["scaler"])
        checkpoint.restore_rng(saved)
        state = saved["state"]
    batches = _batches(setup, state["epoch"], state["pos"])
    policy.train()
    loss_fn.train()
    for step in range(state["step"], cfg.steps):
        start = time.perf_counter()
        if beta is not None:
            loss_fn.set_beta(beta(step))
        loss_sum = torch.zeros((), device=setup.device)
        for micro in range(1, cfg.grad_accum + 1):
            state["epoch"], state["pos"], indices = next(batches)
            batch = collate(setup.train_pairs, indices, setup.tokenizer.pad_token_id)
            batch = batch.to(setup.device)
            # DDP all-reduces the accumulated gradients once, on the last micro-batch
            with gradient_sync(forward_model, micro == cfg.grad_accum):
                with setup.autocast():
                    out = loss_fn(preference_batch(setup, batch, forward_model,
                                                   setup.ref_train,
                                                   cfg.embedding_source == "policy"))
                scaler.scale(out.loss / cfg.grad_accum).backward()
            loss_sum += out.loss.detach()
            state["tokens"] += batch.n_tokens
        train_loss = loss_sum.item() / cfg.grad_accum  # the step's one wait for the device
        if not math.isfinite(train_loss):
            raise TrainingDiverged(f"step {step}: loss is {train_loss}")
        scaler.unscale_(optimizer)  # the true gradients, for clipping
        grad_norm = clip_grad_norm(forward_model, params, cfg.max_grad_norm)
        scaler.step(optimizer)  # skipped when a float16 gradient overflowed
        scaler.update()
        lr_sched.step()
        optimizer.zero_grad(set_to_none=True)
        loss_fn.on_step_end()
        state["train_seconds"] += time.perf_counter() - start
        state["step"] = step + 1
        if progress:
            progress(step + 1, train_loss)
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            start = time.perf_counter()
            evaluated = evaluate(setup, step + 1, forward_model)
            # eval_seconds: all evaluations so far (a checkpoint of an older version has none)
            state["eval_seconds"] = state.get("eval_seconds", 0.0) + time.perf_counter() - start
            # current_*: the values at this step, beside the configured ones in a row
            row = {"step": step + 1, "train_loss": train_loss,
                   "current_beta": float(loss_fn.beta), "grad_norm": float(grad_norm),
                   "current_lr": lr_sched.get_last_lr()[0],
                   **{k: float(v) for k, v in out.metrics.items()
                      if v.numel() == 1 and k != "beta"},  # beta: current_beta
                   **evaluated, "eval_seconds": state["eval_seconds"]}
            state["history"].append(row)
            if on_eval:
                on_eval(step + 1, row)
        if checkpoint_dir and ((cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0)
                               or step + 1 == cfg.steps):
            checkpoint.save(checkpoint_dir, {
                "policy": model_state(forward_model, policy), "loss": loss_fn.state_dict(),
                "optimizer": optimizer_state(forward_model, optimizer),
                "lr_sched": lr_sched.state_dict(), "scaler": scaler.state_dict(),
                **checkpoint.rng_state(), "state": state})
    return final_metrics(setup, state, forward_model)


def final_metrics(setup: Setup, state: dict, forward_model=None) -> dict:
    last = dict(state["history"][-1]) if state["history"] else {}
    cover = setup.cfg.htsr
    if cover != "off":  # off: no htsr_* values at all (null in the report's table)
        with full_params(forward_model):
            htsr = summarize(layer_alphas(setup.policy, cover=cover))
        last.update({f"htsr_{k}": v for k, v in htsr.items() if k != "layers"},
                    htsr_matrices=htsr["layers"], htsr_cover=cover)
    evaluating = state.get("eval_seconds", 0.0)
    last.update(tokens=state["tokens"], train_seconds=state["train_seconds"],
                tokens_per_s=state["tokens"] / max(state["train_seconds"], 1e-9),
                steps=state["step"], eval_seconds=evaluating,
                eval_share=evaluating / max(state["train_seconds"] + evaluating, 1e-9))
    return last
