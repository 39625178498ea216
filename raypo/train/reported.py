"""Which metrics a training run reports, known before it runs: what a search's objective may
name (a misspelt `objective.metric` would otherwise leave every trial without an objective).

The names are their owners' (raypo.train.loop's step and end-of-run names, raypo.train.evaluate's
held-out and sampled ones, raypo.train.judging's judged ones), beside the loss's own metrics,
as raypo.train.run.run_trial returns them; the report row renames the ones
a column already has (raypo.reports.schema.metric_columns). The loss's own metrics come from
one forward pass of the configured loss on two training pairs.
"""

from __future__ import annotations

import dataclasses

import torch

from raypo.data.collate import collate
from raypo.train.config import TrainConfig
from raypo.train.evaluate import HELD_OUT_METRICS, SAMPLED_METRICS
from raypo.train.judging import JUDGED_METRICS
from raypo.train.loop import END_METRICS, HTSR_METRICS, STEP_METRICS
from raypo.train.setup import Setup, _fit_kernel, build_loss
from raypo.train.step import preference_batch

# the names of a run's result are their owners': the loop's, the evaluation's, the judge's
BUILTIN_TASK = {*SAMPLED_METRICS, "ref_true_reward"}
ROW = {"wall_s", "peak_memory_mb"}
BOOKKEEPING = {"trial_id", "status", "error", "objective"}


@torch.no_grad()
def loss_metrics(setup: Setup, cfg: TrainConfig | None = None) -> set[str]:
    """The scalar metrics the loss of `cfg` (default: the set-up's) reports, from one forward
    pass on two training pairs; the set-up's state (loss, RNG) is left as it was."""
    loss_fn = setup.loss_fn
    if cfg is not None and cfg.loss != setup.cfg.loss:
        loss_fn = build_loss(cfg, setup.policy).to(setup.device)
        _fit_kernel(loss_fn, setup.ref_train)
    probe = dataclasses.replace(setup, loss_fn=loss_fn)
    saved = {k: v.clone() for k, v in loss_fn.state_dict().items()}
    indices = list(range(min(2, len(setup.train_pairs))))
    with torch.random.fork_rng(devices=[]):
        batch = collate(setup.train_pairs, indices, setup.tokenizer.pad_token_id)
        out = loss_fn(preference_batch(probe, batch.to(setup.device), setup.policy,
                                       setup.ref_train, setup.cfg.embedding_source == "policy"))
    loss_fn.load_state_dict(saved)
    # the loop reports the loss's beta as current_beta
    return {k for k, v in out.metrics.items() if v.numel() == 1} - {"beta"}


def reported_metrics(setup: Setup, cfg: TrainConfig | None = None) -> set[str]:
    """The numeric keys of the result of a run of `cfg` (default: the set-up's config) on the
    set-up's model and data (raypo.train.run.run_trial)."""
    cfg = cfg or setup.cfg
    metrics = {*STEP_METRICS, *HELD_OUT_METRICS, *END_METRICS} | loss_metrics(setup, cfg)
    if cfg.htsr != "off":
        metrics |= set(HTSR_METRICS)
    if setup.task is not None:
        metrics |= BUILTIN_TASK
    if cfg.judge is not None:
        metrics |= set(JUDGED_METRICS)
    return {f"final_{k}" if k in BOOKKEEPING else k for k in metrics} | ROW
