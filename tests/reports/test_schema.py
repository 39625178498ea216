"""One schema for report rows: a report built from trials of the shipped variants.yaml space has
no Optuna parameter and no column with two meanings."""

from __future__ import annotations

from pathlib import Path

import optuna
import pandas as pd
import pytest

from raypo.losses import LOSSES
from raypo.reports.schema import (
    BOOKKEEPING,
    IDENTITY,
    RUN,
    SCHEDULE,
    config_columns,
    parameter_column,
    trial_row,
)
from raypo.search.space import load_space, parse_space

SPACES = Path(__file__).resolve().parents[2] / "search_spaces"


@pytest.fixture(scope="module")
def variants():
    """A report of 300 sampled variants.yaml trials (random sampler: every branch)."""
    space = load_space(SPACES / "variants.yaml")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    rows, samples = [], []
    for i in range(300):
        trial = study.ask()
        values = space.define(trial)
        study.tell(trial, 0.0)
        samples.append(values)
        rows.append(trial_row(space.config(values), {"trial_id": f"t{i}", "status": "ok",
                                                     "error": None, "objective": 0.5},
                              searched=values))
    return space, samples, pd.DataFrame(rows)


def test_every_searched_parameter_is_its_own_column_with_the_trial_value(variants):
    space, samples, table = variants
    for i, values in enumerate(samples):
        for name, value in values.items():
            assert table.loc[i, name] == value, (name, i)


def test_a_qualified_column_is_filled_only_in_its_own_loss_rows(variants):
    _, _, table = variants
    for column in table.columns:
        head = column.split(".", 1)[0]
        if "." in column and head in LOSSES:
            filled = table[table[column].notna()]
            assert set(filled["loss"]) == {head}, column


def test_names_that_differ_by_loss_are_separate_parameters(variants):
    space, _, table = variants
    names = [p.name for p in space.params]
    assert len(names) == len(set(names))
    # fdpo's divergence order and TDPO's KL weight, once one `loss.alpha` in the file
    assert {"fdpo.alpha", "tdpo.alpha"} <= set(names) and "alpha" not in table
    assert "fdpo.divergence" in names  # its f-divergence, not a penalty
    # `divergence` is the token-level penalty of a kernel loss: empty in every other row
    assert table["divergence"].isna().all() if "divergence" in table else True
    # the loss's beta means something else in each loss (a target for IPO, a temperature
    # for DPO): one column per loss
    assert {"dpo.beta", "ipo.beta"} <= set(names) and "beta" not in table


def test_bare_columns_belong_to_the_schema(variants):
    _, _, table = variants
    known = set(BOOKKEEPING) | set(IDENTITY) | set(RUN) | {SCHEDULE}
    bare = {c for c in table.columns if "." not in c}
    assert bare <= known, bare - known


def test_an_identity_parameter_means_one_thing_and_is_one_parameter_across_losses():
    space = parse_space({"loss": {"name": {"choice": ["kernel_dpo", "hmk_dpo"]},
                                  "divergence": {"choice": ["kl", "js"]},
                                  "gamma": {"low": 0.01, "high": 0.5}}}, "s.yaml")
    names = [p.name for p in space.params]
    assert names.count("divergence") == 1  # the same penalty in both losses
    assert {"kernel_dpo.gamma", "hmk_dpo.gamma"} <= set(names)
    assert parameter_column(("loss", "kernel"), "kernel_dpo") == "kernel"
    assert parameter_column(("beta_schedule", "end_beta")) == "beta_schedule.end_beta"
    assert parameter_column(("beta_schedule", "name")) == SCHEDULE


def test_config_columns_carry_the_loss_defaults_and_the_schedule():
    space = parse_space({"loss": {"name": "kernel_dpo", "kernel": "polynomial"},
                         "beta_schedule": {"name": "cosine", "end_beta": 0.01}}, "s.yaml")
    row = config_columns(space.fixed_config())
    assert row["loss"] == "kernel_dpo" and row["family"] == "kernel"
    assert row["kernel"] == "polynomial" and row["divergence"] is None
    assert row["kernel_dpo.beta"] == 0.1 and row["kernel_dpo.gamma"] == 0.1  # defaults
    assert row[SCHEDULE] == "cosine" and row["beta_schedule.end_beta"] == 0.01
    assert row["seed"] == 0 and row["data"] == "builtin:graded"


def test_a_metric_named_like_a_column_is_kept_apart():
    space = parse_space({"loss": "dpo"}, "s.yaml")
    row = trial_row(space.fixed_config(), {"trial_id": "t", "status": "ok", "error": None,
                                           "objective": 0.5, "lr": 0.5, "steps": 7})
    assert row["lr"] == 1e-3 and row["final_lr"] == 0.5 and row["final_steps"] == 7
