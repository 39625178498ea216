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


# ---------------------------------------------------------------------------- the report


def observed(grid, setting: str):
    """Per pair of `setting`: the seed-mean objective and the seeds' values."""
    d = grid[grid["setting"] == setting]
    groups = d.groupby(["kernel", "divergence"])["true_reward"]
    return groups.mean(), [g.to_numpy() for _, g in groups]


def setting_metrics(setting: str):
    """The zero-cost selection metrics of `setting` (its reference model and data), one row
    per pair, from raypo's own evidence path."""
    from raypo.search.evidence import collect_evidence, evidence_metrics

    evidence = collect_evidence(setting_config(setting), log=lambda m: None)
    return evidence_metrics(evidence)


# The hand-set divergence profiles the previous rule read, (boundedness, support, geometry)
# each in [0, 1]: 1 when the token-level value is bounded, how much it relies on the support
# the reference cache keeps, 1 when it uses distances between tokens. raypo's divergences
# carried them until the measured rule replaced that rule; they live here only to measure it.
PREVIOUS_PROFILES = {
    "kl": (0.0, 1.0, 0.0),  # unbounded, every token's log-ratio counts
    "js": (1.0, 0.5, 0.0),  # bounded by log 2
    "hellinger": (1.0, 0.5, 0.0),  # in [0, 1]
    "renyi": (0.0, 1.0, 0.0),  # unbounded, weights P^2 / Q
    "bhattacharyya": (0.5, 0.5, 0.0),  # -log(1 - H^2): unbounded only as supports part
    "fdiv": (0.0, 1.0, 0.0),  # default f = reverse_kl
    "wasserstein": (1.0, 1.0, 1.0),  # bounded by the cost's diameter; token geometry
}


def previous_rule(metrics) -> dict[tuple[str, str], float]:
    """The hand-made rule raypo shipped before this benchmark (kept here to be measured):
    S = (2 acc - 1) + tanh(snr) - tanh(0.1 margin_std / 2) + (2b - 1)(2T - 1) - s (1 - c)
    + D (g - (1 - b) / 2) - (1 - b)(1 - H) / 2, with T the tail heaviness of the per-token
    log-ratios, (b, s, g) the divergence's PREVIOUS_PROFILES entry, c coverage, H entropy,
    D drift."""
    import math

    def heaviness(kurt, tail):
        return 0.5 * ((1 - 3 / max(kurt, 3.0)) + (tail / (tail + 0.046) if tail > 0 else 0))

    k_metrics, d_metrics = metrics
    out = {}
    for k, km in k_metrics.items():
        sk = (2 * km["accuracy"] - 1) + math.tanh(km["snr"]) - math.tanh(0.1 * km["margin_std"]
                                                                         / 2)
        for d, dm in d_metrics.items():
            b, sup, g = PREVIOUS_PROFILES[d]
            t = heaviness(dm["kurtosis"], dm["tail_mass"])
            sd = ((2 * b - 1) * (2 * t - 1) - sup * (1 - dm["coverage"])
                  + dm["drift"] * (g - (1 - b) / 2) - (1 - b) * (1 - dm["entropy"]) / 2)
            out[(k, d)] = sk + sd
    return out


def features(setting: str, metrics) -> dict[tuple[str, str], dict[str, float]]:
    """Per pair, the candidate features of a fitted rule (raypo.selection.rule.features),
    plus the previous rule's hand-set `boundedness` of the divergence (PREVIOUS_PROFILES)."""
    from raypo.selection.rule import features as rule_features

    cfg = setting_config(setting)
    out = rule_features(*metrics, gamma=float(cfg.loss.params.get("gamma", 0.1)))
    return {(k, d): {**f, "boundedness": PREVIOUS_PROFILES[d][0]} for (k, d), f in out.items()}


# Feature sets compared (each fitted leave-one-setting-out); the rule ships the first.
FEATURE_SETS = {
    "saturation + strength": ("saturation", "strength"),
    "+ accuracy": ("saturation", "strength", "accuracy"),
    "+ accuracy, snr, boundedness": ("saturation", "strength", "accuracy", "snr",
                                     "boundedness"),
}


def _zscore(values):
    import numpy as np

    v = np.asarray(values, dtype=float)
    return (v - v.mean()) / (v.std() or 1.0)


def _matrix(all_features, setting, pairs, names):
    import numpy as np

    x = np.array([[all_features[setting][p][n] for n in names] for p in pairs])
    return np.column_stack([_zscore(c) for c in x.T])


def fit_weights(grid, settings, all_features, names):
    """Least squares of the within-setting z-scored seed-mean objective on the within-setting
    z-scored features `names`, over `settings` (never the one scored)."""
    import numpy as np

    xs, ys = [], []
    for s in settings:
        means, _ = observed(grid, s)
        xs.append(_matrix(all_features, s, list(means.index), names))
        ys.append(_zscore(means.to_numpy()))
    weights, *_ = np.linalg.lstsq(np.vstack(xs), np.concatenate(ys), rcond=None)
    return weights


def score_ranking(scores: dict, means) -> dict[str, float]:
    """Spearman with the observed seed-mean ranking, and where the top picks finished."""
    from scipy import stats

    pairs = list(means.index)
    predicted = [scores[p] for p in pairs]
    observed_rank = means.rank(ascending=False, method="min")
    order = sorted(pairs, key=lambda p: -scores[p])
    return {"spearman": float(stats.spearmanr(predicted, means.to_numpy()).statistic),
            "top1_rank": float(observed_rank[order[0]]),
            "top3_ranks": [int(observed_rank[p]) for p in order[:3]]}


def random_baseline(means, n: int = 5000, seed: int = 0) -> dict[str, float]:
    import numpy as np
    from scipy import stats

    rng = np.random.default_rng(seed)
    obs = means.to_numpy()
    ranks = means.rank(ascending=False, method="min").to_numpy()
    rho, top1, top3 = [], [], []
    for _ in range(n):
        perm = rng.permutation(len(obs))
        rho.append(stats.spearmanr(perm, obs).statistic)
        top1.append(ranks[np.argmax(perm)])
        top3.append(min(ranks[np.argsort(-perm)[:3]]) <= 3)
    return {"spearman": float(np.mean(rho)), "top1_rank": float(np.mean(top1)),
            "p_spearman_0.6": float(np.mean(np.array(rho) >= 0.6)),
            "p_top1_in_top3": float(np.mean(np.array(top1) <= 3))}


def report(path: Path, settings) -> dict:
    import numpy as np
    import pandas as pd

    from raypo.reports.stats import one_way

    grid = pd.read_parquet(path)
    settings = [s for s in settings if (grid["setting"] == s).sum() == len(grid_cells([s]))]
    metrics = {s: setting_metrics(s) for s in settings}
    all_features = {s: features(s, metrics[s]) for s in settings}
    results = {}
    print(f"{len(grid)} runs; {len(SEEDS)} seeds per pair; settings: {', '.join(settings)}\n")
    for s in settings:
        means, groups = observed(grid, s)
        effect = one_way(groups)
        rules = {"previous rule (hand-made)": previous_rule(metrics[s])}
        others = [o for o in settings if o != s]
        fitted = {}
        for label, names in FEATURE_SETS.items():
            weights = fit_weights(grid, others, all_features, names)
            z = _matrix(all_features, s, list(means.index), names) @ weights
            rules[f"fitted LOSO: {label}"] = dict(zip(means.index, z, strict=True))
            fitted[label] = dict(zip(names, weights.tolist(), strict=True))
        scored = {name: score_ranking(sc, means) for name, sc in rules.items()}
        scored["random (expected)"] = random_baseline(means)
        results[s] = {"anova_F": effect["F"], "anova_p": effect["p"], "icc": effect["icc"],
                      "rules": scored, "weights": fitted,
                      "best_observed": list(means.idxmax()),
                      "spread": float(means.max() - means.min())}
        print(f"== {s}: pair effect F {effect['F']:.2f}, p {effect['p']:.2g}, ICC "
              f"{effect['icc']:.2f}; seed-mean objective {means.min():.3f}..{means.max():.3f},"
              f" best {means.idxmax()}")
        for name, r in scored.items():
            extra = (f", top-3 finished {r['top3_ranks']}" if "top3_ranks" in r else
                     f", P(Spearman >= 0.6) {r['p_spearman_0.6']:.3f}, P(top-1 in top 3) "
                     f"{r['p_top1_in_top3']:.3f}")
            print(f"  {name:32s} Spearman {r['spearman']:+.2f}, top-1 finished "
                  f"{r['top1_rank']:.1f} of {len(means)}{extra}")
        first = next(iter(FEATURE_SETS))
        print(f"  weights of '{first}' fitted on the others: "
              + ", ".join(f"{f} {w:+.2f}" for f, w in fitted[first].items()))
    names = next(iter(FEATURE_SETS.values()))
    weights = fit_weights(grid, settings, all_features, names)
    residuals = []
    for s in settings:
        means, _ = observed(grid, s)
        z = _matrix(all_features, s, list(means.index), names) @ weights
        residuals.extend(_zscore(means.to_numpy()) - z)
    results["shipped"] = {"features": list(names), "weights": weights.tolist(),
                          "residual_sd": float(np.std(residuals))}
    print(f"\nweights on all {len(settings)} settings (what raypo.selection.rule ships): "
          + ", ".join(f"{n} {w:+.3f}" for n, w in zip(names, weights, strict=True))
          + f"; residual sd {np.std(residuals):.3f} (z units)")
    if "graded" in settings:
        results["warm_start"] = warm_start_effect(grid, metrics["graded"], all_features,
                                                  settings)
    out = path.parent / "report.json"
    from raypo.reports.writer import write_json_atomic

    write_json_atomic(out, results)
    print(f"\nwritten: {out}")
    return results


def warm_start_effect(grid, graded_metrics, all_features, settings, sampler_seeds=40,
                      budget: int = 12) -> dict:
    """What the warm start buys on the quickstart space's choices (4 kernels x kl, js,
    hellinger, on the graded task): TPE picks pairs, each trial's objective is one of that
    pair's grid runs (drawn at random), and we count the trials until a pair of the grid's
    observed top 3 (among those 12) is tried; with and without the rule's top 3 enqueued
    first (the rule fitted without the graded setting), over many sampler seeds."""
    import numpy as np
    import optuna
    import yaml

    space = yaml.safe_load((Path(__file__).parents[1] / "search_spaces" / "quickstart.yaml")
                           .read_text())
    kernels, divergences = space["loss"]["kernel"]["choice"], space["loss"]["divergence"][
        "choice"]
    d = grid[(grid["setting"] == "graded") & grid["kernel"].isin(kernels)
             & grid["divergence"].isin(divergences)]
    runs = {key: g["true_reward"].to_numpy() for key, g in d.groupby(["kernel", "divergence"])}
    means = d.groupby(["kernel", "divergence"])["true_reward"].mean()
    top3 = set(means.sort_values(ascending=False).index[:3])
    names = next(iter(FEATURE_SETS.values()))
    weights = fit_weights(grid, [s for s in settings if s != "graded"], all_features, names)
    pairs = list(runs)
    z = _matrix(all_features, "graded", pairs, names) @ weights
    predicted = [p for _, p in sorted(zip(-z, pairs, strict=True))][:3]
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    def trials_to_top3(seed: int, warm: bool) -> int:
        rng = np.random.default_rng(seed)
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=4)
        study = optuna.create_study(direction="maximize", sampler=sampler)
        if warm:
            for k, dv in predicted:
                study.enqueue_trial({"kernel": k, "divergence": dv})
        for n in range(1, budget + 1):
            trial = study.ask()
            pair = (trial.suggest_categorical("kernel", kernels),
                    trial.suggest_categorical("divergence", divergences))
            study.tell(trial, float(rng.choice(runs[pair])))
            if pair in top3:
                return n
        return budget + 1  # not within the budget

    out = {}
    for warm in (False, True):
        counts = np.array([trials_to_top3(s, warm) for s in range(sampler_seeds)])
        out["with warm start" if warm else "without"] = {
            "median": float(np.median(counts)), "mean": float(counts.mean()),
            "share_within_3": float((counts <= 3).mean()),
            "share_not_within_budget": float((counts > budget).mean())}
    out["predicted_top3"] = [list(p) for p in predicted]
    out["observed_top3"] = [list(p) for p in sorted(top3)]
    print(f"\n== warm start on the quickstart's 12 pairs (graded grid outcomes, "
          f"{sampler_seeds} TPE seeds, budget {budget}): rule's top 3 {predicted}, "
          f"observed top 3 {sorted(top3)}")
    for key in ("without", "with warm start"):
        r = out[key]
        print(f"  {key:16s} trials to reach an observed top-3 pair: median {r['median']:.0f}, "
              f"mean {r['mean']:.2f}; within 3 trials {r['share_within_3']:.0%}, not within "
              f"{budget}: {r['share_not_within_budget']:.0%}")
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["grid", "report", "all"], nargs="?", default="all")
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS))
    parser.add_argument("--concurrency", type=int, default=2)
    args = parser.parse_args(argv)
    if args.what in ("grid", "all"):
        run_grid(args.settings, args.concurrency)
    if args.what in ("report", "all"):
        report(OUT / "grid.parquet", args.settings)


if __name__ == "__main__":
    main()
