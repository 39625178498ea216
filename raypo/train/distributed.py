"""Many workers: the same training loop (raypo.train.loop.train) on Ray Train workers, DDP or
FSDP (`parallel: fsdp`, see raypo.train.parallel for what changes then).

The driver prepares every cache once (tokenized pairs, the built-in base model, reference
outputs), then a `TorchTrainer` starts `cfg.num_workers` workers that build the same Setup from
those caches. Each worker draws the same global batch and keeps its share of it
(`loop._batches`), DDP averages the policy's gradients and `average_loss_gradients` the loss's
own, so N workers follow the one-worker run of the same global batch and seed.

Ray is the outer shell: the step knows nothing of it. Inside a Tune function trainable, pass
`callbacks=[ray.tune.integration.ray_train.TuneReportCallback()]` so worker reports reach Tune.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import ray.train
import ray.train.torch
import torch.distributed as dist
from torch import nn

from raypo.data.cache import cache_root
from raypo.train import checkpoint
from raypo.train.config import ConfigError, TrainConfig
from raypo.train.loop import train
from raypo.train.parallel import fsdp_kwargs, full_params, wrap_fsdp
from raypo.train.setup import prepare, resolve_device


def train_distributed(cfg: TrainConfig, *, trial_name: str, storage_path: str | None = None,
                      on_eval=None, log=print, callbacks=(), save=None) -> dict:
    """Train on `cfg.num_workers` Ray Train workers; returns rank 0's final metrics.

    `cfg.batch_size` is the global batch. The Train run is named after `trial_name` and kept
    under `storage_path` (default: RAYPO_CACHE/ray_train), so a second call with the same name
    resumes from the run's last checkpoint. `on_eval(step, metrics)` is called for every
    evaluation, including those before a resume, once the run has ended: the workers report
    live only through `callbacks` (Train `UserCallback`s, run by the Train controller).
    `save` (a raypo.models.save.ModelSave): rank 0 writes the trained policy into its staging
    folder, which must be on a file system the worker sees (the driver's node, or shared).
    """
    if cfg.batch_size % cfg.num_workers:
        raise ConfigError(f"batch_size {cfg.batch_size} is the global batch: it must be "
                          f"divisible by num_workers {cfg.num_workers}")
    # the workers' kind of device: float16 on CPU workers is refused before anything loads
    resolve_device("cuda" if cfg.use_gpu else "cpu", cfg.dtype)
    prepare(cfg, log=log)  # write every cache here, so that no worker computes one
    cache = str(cache_root().resolve())  # workers change directory: absolute paths only
    storage = storage_path or str(Path(cache) / "ray_train")
    if "://" not in storage:
        storage = str(Path(storage).resolve())
    trainer = ray.train.torch.TorchTrainer(
        _worker,
        train_loop_config={"cfg": cfg, "cache": cache,
                           # a report on object storage: rank 0 uploads from its own node
                           "save_to": save and (getattr(save, "remote_weights", None)
                                                or str(save.staging())),
                           "merge": bool(save and save.merge)},
        torch_config=ray.train.torch.TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers,
                                               use_gpu=cfg.use_gpu),
        run_config=ray.train.RunConfig(
            name=re.sub(r"[^\w.-]+", "_", trial_name), storage_path=storage,
            # resuming needs only the latest; every report would otherwise keep a copy
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
            callbacks=list(callbacks)))
    result = trainer.fit()  # raises TrainingFailedError when a worker fails
    out = result.return_value  # rank 0's
    metrics, history = dict(out["metrics"]), out["history"]
    if save is not None:
        save.weights_written(out["saved"])
    for row in history if on_eval else ():
        on_eval(row["step"], row)
    resumed = f", resumed from step {out['resumed_from']}" if out["resumed_from"] else ""
    log(f"{trial_name}: {cfg.num_workers} workers ({out['wrapper']}), {metrics.get('steps')} "
        f"steps{resumed}; Train run in {result.path}")
    return metrics


def _worker(config: dict) -> dict:
    """One Ray Train worker: the Setup from the caches, DDP, the loop, a report per evaluation.

    Every rank reports (`ray.train.report` is a barrier); only rank 0 attaches a checkpoint.
    Rank 0's return value (final metrics and evaluations) becomes `Result.return_value`.
    """
    os.environ["RAYPO_CACHE"] = config["cache"]
    cfg: TrainConfig = config["cfg"]
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()  # this worker's GPU, not whichever "cuda" means
    setup = prepare(cfg.model_copy(update={"device": str(device)}),
                    log=print if rank == 0 else lambda message: None)
    wrapped = _wrap(setup.policy, cfg, device)
    average_loss_gradients(setup.loss_fn)
    local = Path(tempfile.mkdtemp(prefix=f"raypo-rank{rank}-"))  # ranks may share a node
    try:
        resumed_from, history = _resume(local, rank)
        reporter = _Reporter(local, rank, cfg.steps, history)
        final = train(setup, checkpoint_dir=local, on_eval=reporter, forward_model=wrapped)
        # each rank counted its own share; after a resume every rank starts from rank 0's
        # count, so the tokens before it are estimated as world x rank 0's
        final["tokens"] = sum(_gathered(final["tokens"]))
        final = agree(final)
        final["tokens_per_s"] = final["tokens"] / max(final["train_seconds"], 1e-9)
        ray.train.report(final, checkpoint=reporter.checkpoint(force=True))
        saved = _save(setup, wrapped, config, rank)
        return {"metrics": final, "history": history, "resumed_from": resumed_from,
                "wrapper": type(wrapped).__name__, "saved": saved}
    finally:
        shutil.rmtree(local, ignore_errors=True)


def _save(setup, wrapped, config: dict, rank: int) -> str | None:
    """Rank 0 writes the trained policy (whole: FSDP gathers it on every rank) where the
    driver asked; returns the format written."""
    if not config["save_to"]:
        return None
    from raypo.models.save import write_weights

    with full_params(wrapped):
        if rank != 0:
            return None
        target = config["save_to"]
        if "://" not in target:
            return write_weights(setup.policy, setup.tokenizer, target,
                                 merge=config["merge"], base=config["cfg"].model)
        from raypo.storage import location

        local = Path(tempfile.mkdtemp(prefix="raypo-model-"))
        try:  # the weights only: the trial adds raypo.json, which marks the folder whole
            fmt = write_weights(setup.policy, setup.tokenizer, local, merge=config["merge"],
                                base=config["cfg"].model)
            location(target).upload(local)
            return fmt
        finally:
            shutil.rmtree(local, ignore_errors=True)


def _wrap(policy: nn.Module, cfg: TrainConfig, device) -> nn.Module:
    """The policy as the training forward runs it: DDP or FSDP (`cfg.parallel`) when world > 1.
    prepare_model also sets the CUDA device that NCCL collectives use."""
    if cfg.parallel == "ddp":
        return ray.train.torch.prepare_model(policy, move_to_device=device)
    if device.type != "cpu":
        return ray.train.torch.prepare_model(
            policy, move_to_device=device, parallel_strategy="fsdp",
            parallel_strategy_kwargs=fsdp_kwargs(policy, device))
    # Ray's prepare_model refuses FSDP without CUDA, torch's FSDP runs on CPUs with gloo: wrap
    # it here, so the FSDP path also runs (and is tested) on CPU workers
    policy = ray.train.torch.prepare_model(policy, move_to_device=device, parallel_strategy=None)
    return wrap_fsdp(policy, device) if dist.get_world_size() > 1 else policy


def _resume(local: Path, rank: int) -> tuple[int | None, list[dict]]:
    """Copy the run's latest checkpoint, if it has one, into `local` (where the loop resumes
    from it); (the step it resumes from, the evaluations before it: rank 0 only)."""
    found = ray.train.get_checkpoint()
    if not found:
        return None, []
    found.to_directory(str(local))
    if rank != 0:
        return None, []
    state = checkpoint.load(local)["state"]
    return state["step"], list(state["history"])


class _Reporter:
    """The loop's `on_eval` on a worker: make the metrics agree across ranks, report them with
    rank 0's newest checkpoint.

    The loop saves a checkpoint after evaluating, so the checkpoint sent with an evaluation is
    the one written before it (resuming may repeat a few steps); the last evaluation is not
    reported here but with the final metrics and the final checkpoint.
    """

    def __init__(self, local: Path, rank: int, steps: int, history: list):
        self.local, self.rank, self.steps, self.history = local, rank, steps, history
        self.sent = self._mtime()  # of the checkpoint last reported (or resumed from)

    def __call__(self, step: int, row: dict) -> None:
        # in place: the loop keeps this same dict in its history, final metrics and checkpoint
        row.update(agree(row))
        self.history.append(dict(row))
        if step < self.steps:
            ray.train.report(row, checkpoint=self.checkpoint())

    def _mtime(self) -> int | None:
        path = self.local / checkpoint.NAME
        return path.stat().st_mtime_ns if path.is_file() else None

    def checkpoint(self, force: bool = False) -> ray.train.Checkpoint | None:
        """Rank 0's checkpoint folder if a checkpoint was written since the last report."""
        mtime = self._mtime()
        if self.rank != 0 or mtime is None or (mtime == self.sent and not force):
            return None
        self.sent = mtime
        return ray.train.Checkpoint.from_directory(str(self.local))


def _gathered(value) -> list:
    """`value` from every rank, in rank order."""
    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def agree(metrics: dict) -> dict:
    """The same metrics on every rank: a value that differs between ranks (the training
    batch's loss and batch metrics, computed on each rank's share) becomes the mean over ranks,
    which for a mean over equal shares is the global batch's value; values every rank shares
    (evaluation, grad norm, lr, step) stay exactly as they are."""
    rows = _gathered(metrics)
    return {key: value if all(r.get(key) == value for r in rows)
            else sum(r[key] for r in rows) / len(rows)
            for key, value in metrics.items()}


def average_loss_gradients(loss_fn: nn.Module) -> None:
    """Average the gradients of the loss's own learnable parameters (kernel widths, mixture
    weights, SparsePO heads, learnable priors) across workers, as DDP does for the policy's.

    The loop calls the loss module itself, not a wrapper, so DDP cannot hold it: each
    parameter's gradient is all-reduced as soon as the backward pass has accumulated it. With
    gradient accumulation the running sum is averaged after every micro-batch, which still
    gives the mean of the sums (averaging is linear and the earlier part already agrees).
    Every rank builds the same graph, so the collectives come in the same order on each.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    world = dist.get_world_size()

    def average(param):
        dist.all_reduce(param.grad)
        param.grad.div_(world)

    for param in loss_fn.parameters():
        if param.requires_grad:
            param.register_post_accumulate_grad_hook(average)
