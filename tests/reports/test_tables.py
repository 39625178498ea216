"""Report queries: best trial, kernel-divergence pairs and pivot, Pareto front, typed columns."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from raypo.reports import ReportWriter, load
from raypo.reports.writer import write_json_atomic, write_parquet_atomic

ROWS = [  # (trial, status, kernel, divergence, objective, kl)
    ("a", "ok", "rbf", "js", 0.80, 2.0),
    ("b", "ok", "rbf", "js", 0.70, 1.0),
    ("c", "ok", "polynomial", "kl", 0.90, 3.0),
    ("d", "ok", "rbf", None, 0.60, 0.5),
    ("e", "pruned", "rbf", "kl", 0.95, 0.1),  # stopped early: not an answer
    ("f", "failed", "spectral", "js", None, None),
    ("g", "ok", None, None, 0.99, 9.0),  # dpo: not a kernel trial
]


def make_report(tmp_path, objectives):
    writer = ReportWriter(tmp_path, search="s")
    for trial, status, kernel, divergence, objective, kl in ROWS:
        writer.write_trial({"trial_id": trial, "status": status, "objective": objective,
                            "true_reward": objective, "kl": kl,
                            "loss": "dpo" if kernel is None else "kernel_dpo",
                            "kernel": kernel, "divergence": divergence})
    write_json_atomic(tmp_path / "search.json", {"objectives": objectives})
    write_parquet_atomic(tmp_path / "selection.parquet", pd.DataFrame(
        {"kernel": ["rbf", "polynomial"], "divergence": ["js", "kl"], "predicted_rank": [1, 2]}))
    return load(tmp_path)


def test_pairs_average_the_finished_kernel_trials_per_pair(tmp_path):
    rep = make_report(tmp_path, [{"metric": "true_reward", "mode": "max"}])
    pairs = rep.pairs().set_index(["kernel", "divergence"])
    assert list(pairs.index) == [("polynomial", "kl"), ("rbf", "js"), ("rbf", "none")]
    assert pairs.loc[("rbf", "js"), "objective"] == pytest.approx(0.75)
    assert pairs.loc[("rbf", "js"), "std"] == pytest.approx(math.sqrt(0.005))  # sample std
    assert pairs.loc[("rbf", "js"), "best"] == pytest.approx(0.80)
    assert pairs.loc[("rbf", "js"), "trials"] == 2
    assert pairs.loc[("rbf", "js"), "predicted_rank"] == 1
    assert math.isnan(pairs.loc[("rbf", "none"), "predicted_rank"])
    assert rep.selected().iloc[0][["kernel", "divergence"]].tolist() == ["polynomial", "kl"]
    assert rep.pivot().loc["rbf", "js"] == pytest.approx(0.75)
    assert rep.best()["trial_id"] == "g"  # over every finished trial, kernel or not


def test_minimised_objectives_rank_the_other_way(tmp_path):
    rep = make_report(tmp_path, [{"metric": "true_reward", "mode": "min"}])
    assert rep.best()["trial_id"] == "d"
    assert rep.selected().iloc[0][["kernel", "divergence"]].tolist() == ["rbf", "none"]


def test_the_pareto_front_keeps_the_undominated_finished_trials(tmp_path):
    rep = make_report(tmp_path, [{"metric": "true_reward", "mode": "max"},
                                 {"metric": "kl", "mode": "min"}])
    # by hand: g (best reward), d (lowest kl), b (0.70 at kl 1.0), a (0.80 at 2.0),
    # c (0.90 at 3.0); none of them beats another on both
    assert sorted(rep.pareto()["trial_id"]) == ["a", "b", "c", "d", "g"]
    rep.trials.loc[rep.trials.trial_id == "a", "kl"] = 0.9  # now a dominates b
    assert "b" not in set(rep.pareto()["trial_id"])


def test_mixed_text_and_number_columns_are_stored_as_text(tmp_path):
    writer = ReportWriter(tmp_path, search="s")
    writer.write_trial({"trial_id": "a", "status": "ok", "f": "auto"})
    writer.write_trial({"trial_id": "b", "status": "ok", "f": 0.5})
    assert pd.read_parquet(tmp_path / "trials.parquet")["f"].tolist() == ["auto", "0.5"]
