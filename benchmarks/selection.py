"""Does the selection rule predict which kernel-divergence pair trains best?

Full grids of the candidate pairs (kernel_dpo with every candidate kernel x divergence), several
training seeds each, on several task settings (built-in variants, and settings of gamma,
alpha_div and beta that change which pairs win); then, per setting:

- how much of the outcome the pair explains beyond seed noise: one-way ANOVA over the pairs
  (scipy.stats.f_oneway) and the intraclass correlation ICC(1) = (MSB - MSW) / (MSB + (k-1) MSW);
- Spearman (scipy.stats.spearmanr) between the rule's predicted rank and the observed rank of
  the seed-mean objective, and where the rule's top-1 pick and top-3 picks finished;
- the same figures for a random ranking (the mean over many permutations, and the share of
  permutations that reach Spearman >= 0.6), which is what a rule must beat.

Each rule is scored leave-one-setting-out: whatever a rule fits (its constants), it fits on the
other settings, never on the one it is scored on.

    python benchmarks/selection.py grid      # run (or resume) the grids: ~1-2 h on 2 cores
    python benchmarks/selection.py report    # the tables, from the grid on disk

The grid rows are written to reports/benchmarks/selection/grid.parquet as runs end (atomic
rewrites), so an interrupted grid resumes where it stopped.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

OUT = Path("reports/benchmarks/selection")
SEEDS = (1, 2, 3)

BASE = {
    "name": "selection-benchmark",
    "task": {"variant": "graded", "train_pairs": 1000, "eval_pairs": 128},
    "loss": {"name": "kernel_dpo", "beta": 0.1, "gamma": 0.1, "alpha_div": 0.01},
    "lr": 1e-3, "steps": 100, "batch_size": 32, "warmup_steps": 10, "eval_every": 50,
    "eval_samples": 64, "data_seed": 0,
}

# name -> overrides of BASE (dotted keys). Chosen so that the winning pair can move: the
# variants change the data, gamma the weight of the kernel margin, alpha_div the weight of the
# divergence penalty, beta the strength of the KL constraint the penalty competes with.
SETTINGS = {
    "graded": {},
    "length": {"task.variant": "length"},
    "noisy": {"task.variant": "noisy"},
    "graded-gamma1": {"loss.gamma": 1.0},
    "graded-alpha0.3": {"loss.alpha_div": 0.3},
    "noisy-beta0.3": {"task.variant": "noisy", "loss.beta": 0.3},
}


def setting_config(setting: str, kernel: str | None = None, divergence: str | None = None,
                   seed: int = 0, **extra):
    import copy

    from raypo.train.config import TrainConfig, set_dotted

    tree = copy.deepcopy(BASE)
    for key, value in {**SETTINGS[setting], **extra}.items():
        set_dotted(tree, key, value)
    if kernel is not None:
        tree["loss"]["kernel"] = kernel
    if divergence is not None:
        tree["loss"]["divergence"] = divergence
    tree["seed"] = seed
    return TrainConfig.model_validate(tree)


def grid_cells(settings) -> list[tuple[str, str, str, int]]:
    from raypo.losses import divergence_candidates, kernel_candidates

    return [(s, k, d, seed) for s in settings
            for k, d in itertools.product(kernel_candidates(), divergence_candidates())
            for seed in SEEDS]


def candidate_defaults(kernel: str, divergence: str) -> str:
    """The candidates' default parameters: a grid row computed under other defaults is stale."""
    import json

    from raypo.losses import DIVERGENCES, KERNELS

    return json.dumps({"kernel": KERNELS.parameters(kernel),
                       "divergence": DIVERGENCES.parameters(divergence)},
                      sort_keys=True, default=str)


def _run_cell(cell):
    import torch

    from raypo.reports.schema import trial_row
    from raypo.train.run import run_trial

    torch.set_num_threads(1)
    setting, kernel, divergence, seed = cell
    cfg = setting_config(setting, kernel, divergence, seed)
    result, history = run_trial(cfg, f"{setting}/{kernel}/{divergence}/{seed}",
                                log=lambda m: None)
    row = trial_row(cfg, result)
    keep = {k: v for k, v in row.items() if isinstance(v, int | float | str | None)}
    for h in history:  # the intermediate evaluations, for studying short probes
        keep[f"true_reward@{h['step']}"] = h.get("true_reward")
    return {**keep, "setting": setting, "kernel": kernel, "divergence": divergence,
            "seed": seed, "defaults": candidate_defaults(kernel, divergence)}


def run_grid(settings, concurrency: int) -> None:
    import pandas as pd
    import ray

    from raypo.reports.writer import write_parquet_atomic
    from raypo.train.setup import prepare

    path = OUT / "grid.parquet"
    done = pd.read_parquet(path) if path.is_file() else pd.DataFrame()
    if not done.empty:  # rows computed under other candidate defaults are run again
        current = [candidate_defaults(k, d) for k, d in zip(done["kernel"], done["divergence"],
                                                            strict=True)]
        stale = done.get("defaults", pd.Series(None, index=done.index)) != pd.Series(
            current, index=done.index)
        if stale.any():
            print(f"grid: {int(stale.sum())} runs on disk used other candidate defaults: "
                  "running them again", file=sys.stderr, flush=True)
        done = done[~stale]
    seen = set() if done.empty else set(zip(done["setting"], done["kernel"],
                                            done["divergence"], done["seed"], strict=True))
    todo = [c for c in grid_cells(settings) if c not in seen]
    print(f"grid: {len(seen)} runs on disk, {len(todo)} to go", file=sys.stderr, flush=True)
    if not todo:
        return
    for setting in dict.fromkeys(c[0] for c in todo):  # shared caches once per setting
        for divergence in (None, "kl"):  # embeddings only / embeddings and top-k logits
            prepare(setting_config(setting, "mahalanobis", divergence), log=lambda m: None)
    cache = os.environ.get("RAYPO_CACHE")
    env = {"env_vars": {"RAYPO_CACHE": cache}} if cache else None
    ray.init(address="local", num_cpus=concurrency, runtime_env=env, log_to_driver=False)
    task = ray.remote(num_cpus=1, max_retries=1)(_run_cell)
    pending = [task.remote(c) for c in todo]
    rows = [] if done.empty else done.to_dict("records")
    start = time.time()
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=3600)
        if not ready:
            raise TimeoutError("grid: no run finished within an hour")
        rows.append(ray.get(ready[0]))
        write_parquet_atomic(path, pd.DataFrame(rows))
        n = len(rows) - len(seen)
        rate = (time.time() - start) / n
        print(f"grid: {n}/{len(todo)} runs ({rate:.1f} s each, "
              f"{rate * len(pending) / 60:.0f} min left)", file=sys.stderr, flush=True)
    ray.shutdown()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["grid", "report", "all"], nargs="?", default="all")
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS))
    parser.add_argument("--concurrency", type=int, default=2)
    args = parser.parse_args(argv)
    if args.what in ("grid", "all"):
        run_grid(args.settings, args.concurrency)
    if args.what in ("report", "all"):
        from benchmarks.selection_report import report  # noqa: PLC0415

        report(OUT / "grid.parquet", args.settings)


if __name__ == "__main__":
    main()
