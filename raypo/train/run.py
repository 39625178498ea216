"""A training run as one trial: prepare, train, and the trial's result (status, objective,
metrics) that raypo.reports.schema turns into a row of trials.parquet."""

from __future__ import annotations

import resource
import time
import traceback

import torch

from raypo.data.errors import DataError
from raypo.train.config import ConfigError, TrainConfig
from raypo.train.loop import train
from raypo.train.setup import prepare


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def objective_of(metrics: dict, builtin: bool) -> float | None:
    """On the built-in task what the policy generates (true reward); on a dataset the held-out
    preference accuracy."""
    return metrics.get("true_reward" if builtin else "pref_accuracy")


def run_trial(cfg: TrainConfig, trial_id: str, *, checkpoint_dir=None, log=print,
              on_eval=None, progress=None, save=None, train_storage: str | None = None
              ) -> tuple[dict, list[dict]]:
    """(result, step rows): the result holds trial_id, status, error, objective and the final
    metrics. A failing run is recorded (status failed, the error) rather than raised, so a
    search goes on. `save` (a raypo.models.save.ModelSave): where the trained policy is
    written, with the result in its raypo.json, if the run finishes. `train_storage`: where
    a multi-worker run keeps its Ray Train run and checkpoints (a search's storage)."""
    start = time.perf_counter()
    row = {"trial_id": trial_id}
    history: list[dict] = []

    def keep(step, metrics):
        history.append(metrics)
        if on_eval:
            on_eval(step, metrics)

    device = torch.device("cpu")
    try:
        if cfg.num_workers > 1:  # Ray Train workers; checkpoints live in the Train run
            from raypo.train.distributed import train_distributed  # ray only when needed

            metrics = train_distributed(cfg, trial_name=trial_id, on_eval=keep, log=log,
                                        save=save, storage_path=train_storage)
        else:
            setup = prepare(cfg, log=log)
            device = setup.device
            metrics = train(setup, checkpoint_dir=checkpoint_dir, on_eval=keep,
                            progress=progress)
            if save is not None:
                save.write_weights(setup.policy, setup.tokenizer, cfg)
        row.update(status="ok", error=None, objective=objective_of(metrics, cfg.builtin))
        # a metric named like a bookkeeping column must not overwrite it
        row.update({f"final_{k}" if k in row else k: v for k, v in metrics.items()})
    except (KeyboardInterrupt, SystemExit, DataError, ConfigError):
        raise  # bad input is the user's to fix, not a failed trial
    except Exception as error:  # recorded with its message; the caller decides the exit code
        log(traceback.format_exc())
        row.update(status="failed", error=f"{type(error).__name__}: {error}", objective=None)
    row.update(wall_s=time.perf_counter() - start, peak_memory_mb=peak_memory_mb(device))
    if save is not None and save.finish(cfg, row) is not None:
        log(f"model: {save.directory}")
    return row, history
