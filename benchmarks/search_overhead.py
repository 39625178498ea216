"""Search overhead: the same trials through raypo's Ray Tune path and a plain Optuna loop.

Both run in one invocation, on the built-in task, from the same space (TPE, seeded), with the
shared caches (base model, tokenized data, reference outputs) already on disk, so both do the
same training and the difference is what the search machinery costs:

- plain: `optuna.create_study` + `ask` / `space.define` / `run_trial` / `tell`, in this process,
  one trial after another;
- raypo: `run_search` with the same space, one trial at a time (`concurrency: 1`, each trial
  given every CPU), no scheduler: Ray start-up, Tune's trial actors, Optuna through
  OptunaSearch, the driver writing the Parquet report as trials end; all timed.

The configs each side sampled are compared (TPE with the same seed and deterministic trials
draws the same ones); then raypo again with `concurrency: 2` (one CPU per trial), which is how a
search uses a 2-core machine, for reference.

    python benchmarks/search_overhead.py [--trials 8] [--steps 150]
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def space_tree(name: str, trials: int, steps: int, concurrency: int, cpus: float) -> dict:
    return {
        "name": name, "task": {"variant": "graded", "train_pairs": 1000, "eval_pairs": 128},
        "objective": {"metric": "true_reward", "mode": "max"},
        "budget": {"trials": trials, "concurrency": concurrency},
        "scheduler": {"name": "none"}, "resources": {"cpus": cpus},
        "sampler": {"name": "tpe", "seed": 0, "startup_trials": 4},
        "selection": {"enabled": False},
        "loss": {"name": {"choice": ["dpo", "ipo", "kernel_dpo"]},
                 "beta": {"low": 0.05, "high": 0.5, "log": True},
                 "kernel": {"choice": ["rbf", "polynomial"], "when": {"name": "kernel_dpo"}}},
        "lr": {"low": 5e-4, "high": 3e-3, "log": True},
        "steps": steps, "batch_size": 32, "eval_every": max(steps // 3, 1), "eval_samples": 64,
        "seed": 0,
    }


def plain_loop(space) -> tuple[float, list[dict]]:
    """The baseline: Optuna's own loop around the training engine, in this process."""
    import optuna

    from raypo.search.run import _sampler
    from raypo.train.run import run_trial

    start = time.perf_counter()
    study = optuna.create_study(direction="maximize", sampler=_sampler(space))
    sampled = []
    for i in range(space.settings.budget.trials):
        trial = study.ask()
        values = space.define(trial)
        row, _ = run_trial(space.config(values), f"plain_{i}", log=lambda m: None)
        objective = row.get("true_reward") if row["status"] == "ok" else None
        study.tell(trial, objective if objective is not None and math.isfinite(objective)
                   else None, state=None if objective is not None else
                   optuna.trial.TrialState.FAIL)
        sampled.append(values)
    return time.perf_counter() - start, sampled


def raypo_search(space, reports: Path) -> tuple[float, list[dict]]:
    import pandas as pd
    import ray

    from raypo.search.run import run_search

    start = time.perf_counter()
    folder, _ = run_search(space, reports=reports, log=lambda m: None)
    ray.shutdown()
    seconds = time.perf_counter() - start
    from raypo.reports.schema import searched_values

    trials = pd.read_parquet(folder / "trials.parquet").sort_values("number")
    sampled = [searched_values(row) for _, row in trials.iterrows()]
    return seconds, sampled


def same(a: list[dict], b: list[dict]) -> bool:
    def norm(values):
        return {k: round(v, 9) if isinstance(v, float) else v for k, v in values.items()}

    return [norm(v) for v in a] == [norm(v) for v in b]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--steps", type=int, default=150)
    args = ap.parse_args()

    import torch

    from raypo.search.run import warm_caches
    from raypo.search.space import parse_space

    cpus = os.cpu_count() or 1
    torch.set_num_threads(cpus)
    work = Path(tempfile.mkdtemp(prefix="raypo-overhead-"))
    os.environ.setdefault("RAYPO_CACHE", str(work / "cache"))
    try:
        one = parse_space(space_tree("overhead", args.trials, args.steps, 1, cpus))
        warm_caches(one, log=lambda m: None)  # shared caches on disk before either side
        plain_s, plain_sampled = plain_loop(one)
        raypo_s, raypo_sampled = raypo_search(one, work / "reports")
        two = parse_space(space_tree("overhead2", args.trials, args.steps, 2, 1))
        raypo2_s, _ = raypo_search(two, work / "reports")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\n{args.trials} trials x {args.steps} steps, built-in task, {cpus} CPUs")
    print(f"{'path':<44}{'wall s':>9}{'÷ plain':>9}")
    print(f"{'plain Optuna loop (in-process, sequential)':<44}{plain_s:>9.1f}{1.0:>9.2f}")
    print(f"{'raypo search, 1 trial at a time':<44}{raypo_s:>9.1f}{raypo_s / plain_s:>9.2f}")
    print(f"{'raypo search, 2 trials at a time':<44}{raypo2_s:>9.1f}{raypo2_s / plain_s:>9.2f}")
    print(f"same configs sampled by both: {same(plain_sampled, raypo_sampled)}")
    load = os.getloadavg()[0]
    print(f"load average at the end: {load:.2f} on {cpus} CPUs")


if __name__ == "__main__":
    main()
