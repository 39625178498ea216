"""The search driver's pieces: shared caches computed once per distinct need, the warm start
from the selection ranking, the samplers and schedulers chosen from the space."""

from __future__ import annotations

import optuna
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule

from raypo.search.run import (
    _sampler,
    _scheduler,
    cache_key,
    planned_trials,
    warm_caches,
    warm_start_points,
)
from raypo.search.space import parse_space

TINY = {"name": "t", "task": {"train_pairs": 32, "eval_pairs": 8, "base_steps": 5},
        "steps": 20, "eval_every": 5, "batch_size": 4}


def space_of(**tree):
    return parse_space({**TINY, **tree}, "space.yaml")


def test_losses_that_read_the_same_reference_outputs_share_one_cache_set_up():
    space = space_of(loss={"name": {"choice": ["dpo", "ipo", "kernel_dpo"]},
                           "beta": {"low": 0.05, "high": 0.5},
                           "divergence": {"choice": [None, "js", "kl"],
                                          "when": {"name": "kernel_dpo"}}})
    keys = {cache_key(space.config(v)) for v in space.representative_values()}
    # dpo = ipo (sequence log-probs); kernel_dpo without a penalty (embeddings); with js or
    # kl (embeddings and top-k logits): beta never matters
    assert len(keys) == 3
    logged = []
    assert warm_caches(space, log=logged.append) == 3
    assert sum("shared caches" in m for m in logged) == 3


RANKS = {("mahalanobis", "kl"): 1, ("rbf", "wasserstein"): 2, ("rbf", "js"): 3,
         ("polynomial", "kl"): 4, ("rbf", "kl"): 5}


def test_the_warm_start_takes_the_best_predicted_pairs_the_space_can_produce():
    space = space_of(selection={"warm_start": 2},
                     loss={"name": {"choice": ["dpo", "kernel_dpo"]},
                           "kernel": {"choice": ["rbf", "polynomial"],
                                      "when": {"name": "kernel_dpo"}},
                           "divergence": {"choice": ["kl", "js"],
                                          "when": {"name": "kernel_dpo"}}})
    assert warm_start_points(space, RANKS) == [
        {"kernel": "rbf", "divergence": "js", "loss": "kernel_dpo"},
        {"kernel": "polynomial", "divergence": "kl", "loss": "kernel_dpo"}]
    fixed = space_of(loss={"name": "kernel_dpo", "kernel": {"choice": ["rbf"]},
                           "divergence": {"choice": ["kl", "wasserstein"]}})
    assert warm_start_points(fixed, RANKS) == [
        {"kernel": "rbf", "divergence": "wasserstein"},
        {"kernel": "rbf", "divergence": "kl"}]
    assert warm_start_points(space_of(loss="dpo"), RANKS) == []


def test_samplers_and_schedulers_follow_the_space():
    assert isinstance(_sampler(space_of()), optuna.samplers.TPESampler)
    two = space_of(objectives=[{"metric": "true_reward"}, {"metric": "kl", "mode": "min"}])
    assert isinstance(_sampler(two), optuna.samplers.NSGAIISampler)
    assert isinstance(_sampler(space_of(sampler={"name": "random"})),
                      optuna.samplers.RandomSampler)
    assert isinstance(_scheduler(space_of()), FIFOScheduler)
    asha = _scheduler(space_of(scheduler={"name": "asha", "grace_period": 2},
                               steps={"choice": [20, 40]}))
    assert isinstance(asha, ASHAScheduler)
    # rungs from the grace period (2 evaluations of 5 steps) to the longest run, on `step`
    assert [m for m, _ in asha._brackets[0]._rungs] == [40, 20, 10]
    assert asha._time_attr == "step"
    assert isinstance(_scheduler(space_of(scheduler="median")), MedianStoppingRule)


def test_a_grid_plans_no_more_trials_than_it_has_points():
    grid = space_of(sampler={"name": "grid"}, budget={"trials": 10},
                    lr={"choice": [1e-3, 2e-3]}, seed={"choice": [0, 1]})
    assert planned_trials(grid) == 4
    assert planned_trials(space_of(budget={"trials": 10})) == 10
