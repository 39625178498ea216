"""Report queries: best trial, kernel-divergence pairs and pivot, Pareto front, typed columns."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from raypo.reports import ReportWriter, load
from raypo.reports.tables import common_step_note
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


# (trial, status, kernel, divergence, true_reward by step): two trials ran their 100 steps, the
# scheduler stopped c at step 50 and d at 75; e failed before its first evaluation, f failed
# after one, g was interrupted (a resume runs it again), h is dpo (not a kernel trial)
PRUNED_ROWS = [
    ("a", "ok", "rbf", "kl", {25: 0.5, 50: 0.6, 75: 0.7, 100: 0.8}),
    ("b", "ok", "rbf", "kl", {25: 0.4, 50: 0.9, 75: 0.5, 100: 0.6}),
    ("c", "pruned", "polynomial", "js", {25: 0.3, 50: 0.95}),
    ("d", "pruned", "polynomial", "kl", {25: 0.1, 50: 0.2, 75: 0.25}),
    ("e", "failed", "spectral", "js", {}),
    ("f", "failed", "spectral", "kl", {25: 0.99}),
    ("g", "interrupted", "spectral", "hellinger", {25: 0.98}),
    ("h", "ok", None, None, {25: 0.3, 50: 0.7, 75: 0.75, 100: 0.72}),
]


def write_pruned_search(directory, rows=PRUNED_ROWS, *, steps=True):
    """A search's report as the recorder writes it, with trials pruned at earlier steps than
    the finished ones: each row's values are its last evaluation's (a pruned row also has the
    `step` it was stopped at), steps.parquet has every evaluation."""
    writer = ReportWriter(directory, search="s")
    for number, (trial, status, kernel, divergence, values) in enumerate(rows):
        last = max(values, default=None)
        reward = values[last] if last is not None else None
        row = {"trial_id": trial, "number": number, "status": status,
               "objective": None if status == "failed" else reward, "true_reward": reward,
               "kl": None if last is None else last / 100,
               "loss": "dpo" if kernel is None else "kernel_dpo", "kernel": kernel,
               "divergence": divergence, "steps": 100}
        if status == "pruned":
            row["step"] = last
        history = [{"step": s, "true_reward": v, "kl": s / 100, "train_loss": 0.5}
                   for s, v in values.items()] if steps else []
        writer.write_trial(row, history)
    writer.write_meta({"kind": "search", "name": "s", "status": "finished",
                       "objectives": [{"metric": "true_reward", "mode": "max"}]})
    write_parquet_atomic(directory / "selection.parquet", pd.DataFrame(
        {"kernel": ["rbf", "polynomial"], "divergence": ["kl", "js"], "predicted_rank": [1, 2]}))
    return load(directory)


@pytest.mark.timeout(60)
def test_every_trial_is_compared_at_the_highest_step_all_of_them_reached(tmp_path):
    rep = write_pruned_search(tmp_path)
    common = rep.at_common_step()
    # by hand: c stopped at step 50, the earliest; every trial's true_reward at step 50
    assert common["trial_id"].tolist() == ["a", "b", "c", "d", "h"]  # no e, f, g
    assert common.set_index("trial_id")["value"].to_dict() == pytest.approx(
        {"a": 0.6, "b": 0.9, "c": 0.95, "d": 0.2, "h": 0.7})
    assert (common["step"] == 50).all()
    assert common["status"].tolist() == ["ok", "ok", "pruned", "pruned", "ok"]
    assert common.attrs == {"metric": "true_reward", "basis": "common", "step": 50,
                            "pruned": 2, "left_out": 0}
    assert rep.at_common_step("objective").attrs["step"] == 50  # the same metric
    assert common_step_note(common, "marked p") == (
        "true_reward at step 50, the highest step every trial reached (the finished ones and "
        "those the scheduler stopped); 2 pruned trials, marked p")

    pairs = rep.pairs().set_index(["kernel", "divergence"])
    assert list(pairs.index) == [("polynomial", "js"), ("rbf", "kl"), ("polynomial", "kl")]
    assert pairs.loc[("rbf", "kl"), "objective"] == pytest.approx(0.75)  # (0.6 + 0.9) / 2
    assert pairs.loc[("rbf", "kl"), "best"] == pytest.approx(0.9)
    assert pairs.loc[("rbf", "kl"), ["trials", "pruned"]].tolist() == [2, 0]
    assert pairs.loc[("polynomial", "js"), ["trials", "pruned"]].tolist() == [1, 1]
    assert pairs.loc[("polynomial", "js"), "predicted_rank"] == 2
    assert rep.pivot().loc["polynomial", "kl"] == pytest.approx(0.2)
    assert rep.best()["trial_id"] == "a"  # the best finished trial, by its final value

    # another objective: its own values at its own common step
    kl = rep.at_common_step("kl")
    assert kl.attrs["step"] == 50 and (kl["value"] == 0.5).all()


@pytest.mark.timeout(60)
def test_a_trial_without_evaluations_counts_at_the_step_its_row_says(tmp_path):
    rep = write_pruned_search(tmp_path)
    # a pruned trial whose evaluations did not reach steps.parquet (the driver restarted)
    rep.steps = rep.steps[rep.steps["trial_id"] != "c"]
    common = rep.at_common_step().set_index("trial_id")
    assert common.loc["c", ["value", "step"]].tolist() == [pytest.approx(0.95), 50]
    assert common.loc["a", "value"] == pytest.approx(0.6)


@pytest.mark.timeout(60)
def test_without_pruning_the_values_are_the_final_ones(tmp_path):
    rows = [r for r in PRUNED_ROWS if r[1] != "pruned"]
    rows.append(("i", "ok", "rbf", "kl", {25: 0.3, 50: 0.5}))  # a shorter budget, finished
    common = write_pruned_search(tmp_path, rows).at_common_step().set_index("trial_id")
    assert common["value"].to_dict() == pytest.approx({"a": 0.8, "b": 0.6, "h": 0.72,
                                                       "i": 0.5})
    assert common.attrs["basis"] == "final" and common.attrs["step"] is None
    assert "no trial was pruned" in common_step_note(common)


@pytest.mark.timeout(60)
def test_a_report_without_evaluations_falls_back_to_the_final_values_and_says_so(tmp_path):
    rep = write_pruned_search(tmp_path, steps=False)
    assert rep.steps.empty
    common = rep.at_common_step()
    assert common.set_index("trial_id")["value"].to_dict() == pytest.approx(
        {"a": 0.8, "b": 0.6, "h": 0.72})  # finished trials only
    assert common.attrs["basis"] == "no_steps" and common.attrs["left_out"] == 2
    assert "2 pruned trials, stopped at earlier steps, are left out" in common_step_note(common)
    assert rep.pairs().set_index(["kernel", "divergence"]).loc[
        ("rbf", "kl"), "objective"] == pytest.approx(0.7)


@pytest.mark.timeout(60)
def test_confirmation_runs_do_not_move_the_common_step(tmp_path):
    write_pruned_search(tmp_path)
    confirm = ReportWriter(tmp_path, search="s", table="confirm")
    confirm.write_trial({"trial_id": "r1", "status": "ok", "objective": 0.1, "true_reward": 0.1,
                         "config_id": "x", "role": "finalist"},
                        [{"step": 10, "true_reward": 0.1}])
    rep = load(tmp_path)
    assert rep.at_common_step().attrs["step"] == 50
    assert "r1" not in set(rep.at_common_step()["trial_id"])
    assert rep.confirm["trial_id"].tolist() == ["r1"]
