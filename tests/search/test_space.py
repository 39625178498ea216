"""Search spaces: parsing, conditions, the define-by-run space, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import yaml

from raypo.search.space import SpaceError, load_fixed, load_space, parse_space

SPACES = Path(__file__).resolve().parents[2] / "search_spaces"

BASE = {"name": "t", "task": {"train_pairs": 64, "eval_pairs": 16}, "steps": 10}


def space_of(**tree):
    return parse_space({**BASE, **tree}, "space.yaml")


def sample(space, n=40, seed=0):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    out = []
    for _ in range(n):
        trial = study.ask()
        out.append(space.define(trial))
        study.tell(trial, 0.0)
    return out


@pytest.mark.parametrize("path", sorted(SPACES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_space_parses_and_samples_valid_configs(path):
    space = load_space(path)
    for values in sample(space, n=15):
        space.config(values)  # a valid training config, or it raises


def test_ranges_choices_and_fixed_values_become_optuna_distributions():
    space = space_of(lr={"low": 1e-4, "high": 1e-2, "log": True},
                     batch_size={"choice": [8, 16]}, seed={"low": 0, "high": 3},
                     loss={"name": "dpo", "beta": {"low": 0.05, "high": 0.5, "step": 0.05}})
    study = optuna.create_study()
    trial = study.ask()
    values = space.define(trial)
    # a loss parameter is named by its report column, qualified by the loss
    assert set(values) == {"lr", "batch_size", "seed", "dpo.beta"}
    dist = trial.distributions
    assert dist["lr"] == optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)
    assert dist["seed"] == optuna.distributions.IntDistribution(0, 3)
    assert dist["batch_size"] == optuna.distributions.CategoricalDistribution([8, 16])
    assert dist["dpo.beta"].step == 0.05
    cfg = space.config(values)
    assert cfg.lr == values["lr"] and cfg.loss.params["beta"] == values["dpo.beta"]
    assert cfg.steps == 10 and cfg.loss.name == "dpo"


def test_conditional_parameters_exist_only_when_their_condition_holds():
    space = space_of(loss={
        "name": {"choice": ["dpo", "kernel_dpo", "epsilon_dpo"]},
        "kernel": {"choice": ["rbf", "polynomial"], "when": {"name": "kernel_dpo"}},
        "sigma": {"low": 0.1, "high": 10.0, "log": True, "when": {"kernel": "rbf"}},
        "eps": {"low": 0.001, "high": 0.1, "when": {"loss.name": "epsilon_dpo"}}})
    seen = sample(space, n=60)
    for values in seen:
        name = values["loss"]
        assert ("kernel" in values) == (name == "kernel_dpo")
        assert ("kernel_dpo.sigma" in values) == (values.get("kernel") == "rbf")
        assert ("epsilon_dpo.eps" in values) == (name == "epsilon_dpo")
    assert {v["loss"] for v in seen} == {"dpo", "kernel_dpo", "epsilon_dpo"}
    assert any("kernel_dpo.sigma" in v for v in seen)


def test_a_condition_may_list_several_values_and_name_a_fixed_parameter():
    space = space_of(loss={"name": "kernel_dpo", "kernel": {"choice": ["rbf", "polynomial"]},
                           "degree": {"low": 1, "high": 3,
                                      "when": {"kernel": ["polynomial"]}}},
                     beta_schedule={"name": "cosine",
                                    "end_beta": {"value": 0.01, "when": {"name": "cosine"}}})
    for values in sample(space, n=20):
        cfg = space.config(values)
        assert cfg.beta_schedule.params == {"end_beta": 0.01}
        assert ("kernel_dpo.degree" in values) == (values["kernel"] == "polynomial")


def test_a_space_with_nothing_searched_is_a_training_config():
    space = load_space(SPACES / "builtin_dpo.yaml")
    assert space.params == []
    cfg = space.fixed_config()
    assert cfg.loss.name == "dpo" and cfg.steps == 300
    with pytest.raises(SpaceError, match="lr: a range or choice"):
        space_of(lr={"low": 1e-4, "high": 1e-3}).fixed_config()


def test_objectives_default_by_task_and_two_make_a_pareto_search():
    assert space_of().objectives[0].metric == "true_reward"
    assert parse_space({"data": "x.jsonl"}, "s").objectives[0].metric == "pref_accuracy"
    two = space_of(objectives=[{"metric": "true_reward"}, {"metric": "kl", "mode": "min"}])
    assert [(o.metric, o.mode) for o in two.objectives] == [("true_reward", "max"),
                                                            ("kl", "min")]


def test_grid_size_counts_conditional_combinations():
    space = space_of(loss={"name": {"choice": ["dpo", "kernel_dpo"]},
                           "kernel": {"choice": ["rbf", "polynomial"],
                                      "when": {"name": "kernel_dpo"}}},
                     seed={"low": 0, "high": 2})
    assert space.grid_size() == 3 * 3  # (dpo, kernel_dpo+rbf, kernel_dpo+polynomial) x seeds
    assert space_of(lr={"low": 1e-4, "high": 1e-3}).grid_size() == float("inf")


BAD = [
    ({"lrr": 0.1}, "lrr: unknown key"),
    ({"budget": {"trials": 0}}, "budget.trials"),
    ({"budget": {"trails": 3}}, "budget.trails: unknown key"),
    ({"scheduler": {"name": "hyperband"}}, "scheduler.name"),
    ({"lr": {"low": 1e-2, "high": 1e-4}}, "lr: low .* must be smaller than high"),
    ({"lr": {"low": 0.0, "high": 1e-2, "log": True}}, "lr: a log range needs low > 0"),
    ({"lr": {"low": 1e-4, "hi": 1e-2}}, "lr: a range takes"),
    ({"lr": {"low": "a", "high": 1e-2}}, "lr: low and high must be numbers"),
    ({"loss": {"name": {"choice": ["dpo", "dpox"]}}}, "unknown loss 'dpox'"),
    ({"loss": {"name": {"choice": []}}}, "loss.name.choice: expected a non-empty list"),
    ({"loss": {"name": "kernel_dpo", "kernel": {"choice": ["rbf", "gaussian"]}}},
     "gaussian"),
    ({"loss": {"name": "kernel_dpo", "divergence": {"choice": ["kl", "tv"]}}}, "tv"),
    ({"loss": {"name": "mi_dpo", "prior": {"choice": ["reference", "flat"]}}}, "flat"),
    ({"loss": {"name": {"choice": ["dpo", "epsilon_dpo"]}, "eps": 0.01}},
     r"loss='dpo'"),
    ({"loss": {"name": {"choice": ["dpo", "epsilon_dpo"]},
               "eps": {"low": 0.001, "high": 0.1, "when": {"nme": "epsilon_dpo"}}}},
     "loss.eps.when: condition on unknown parameter 'nme'"),
    ({"loss": {"name": {"choice": ["dpo", "epsilon_dpo"]},
               "eps": {"low": 0.001, "high": 0.1, "when": {"name": "eps_dpo"}}}},
     "loss.name never takes"),
    ({"lr": {"when": {"seed": 0}}}, "lr: `when` needs a value"),
    ({"objective": {"metric": "true_reward", "mode": "up"}}, "objective.mode"),
    ({"objectives": [{"metric": "a"}, {"metric": "b"}, {"metric": "c"}]}, "objectives"),
]


@pytest.mark.parametrize(("tree", "message"), BAD, ids=[m for _, m in BAD])
def test_bad_spaces_name_the_file_and_the_key(tree, message):
    with pytest.raises(SpaceError, match=message) as error:
        space_of(**tree)
    assert "space.yaml" in str(error.value)


def test_load_space_errors_name_the_file(tmp_path):
    with pytest.raises(SpaceError, match="no such file"):
        load_space(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("loss: [dpo\n")
    with pytest.raises(SpaceError, match="bad.yaml: not valid YAML"):
        load_space(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(SpaceError, match="bad.yaml: expected a mapping"):
        load_space(bad)


def test_overrides_replace_values_before_the_check(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({**BASE, "budget": {"trials": 5}}))
    space = load_space(path, {"budget.trials": 2, "name": "other", "model": None})
    assert space.settings.budget.trials == 2 and space.name == "other"


def test_training_reads_a_file_through_the_space_parser_past_its_search_sections(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump({**BASE, "budget": {"trials": 3}, "objective": "kl"}))
    cfg = load_fixed(path, [("lr", 0.002)])
    assert cfg.steps == 10 and cfg.lr == 0.002 and cfg.name == "t"
    path.write_text(yaml.safe_dump({**BASE, "lr": {"low": 1e-4, "high": 1e-3}}))
    with pytest.raises(SpaceError, match="lr: a range or choice"):
        load_fixed(path)


def test_the_grid_sampler_takes_choices_only():
    grid = space_of(sampler={"name": "grid"}, lr={"choice": [1e-3, 1e-2]},
                    seed={"low": 0, "high": 2})
    assert grid.grid() == {"lr": [1e-3, 1e-2], "seed": [0, 1, 2]}
    with pytest.raises(SpaceError, match="lr: the grid sampler needs a choice"):
        space_of(sampler={"name": "grid"}, lr={"low": 1e-3, "high": 1e-2})


def test_resources_set_the_trials_workers_and_gpu():
    space = space_of(resources={"workers": 2, "gpus": 1})
    cfg = space.fixed_config()
    assert cfg.num_workers == 2 and cfg.use_gpu
    with pytest.raises(SpaceError, match="num_workers: 4 disagrees with resources"):
        space_of(resources={"workers": 2}, num_workers=4)
