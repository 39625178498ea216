"""End-to-end searches on the built-in task: Ray Tune + Optuna, reports, select, failures,
resume after the driver is killed, a trial of two Ray Train workers. (A search on a separate
multi-node Ray cluster is tests/cluster/test_multinode_search.py's.)"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

import raypo.reports as reports
from raypo.cli import app
from raypo.losses import divergence_candidates, kernel_candidates

TINY = {"task": {"variant": "graded", "train_pairs": 64, "eval_pairs": 16, "base_steps": 20},
        "steps": 12, "batch_size": 8, "eval_every": 4, "eval_samples": 8, "warmup_steps": 2,
        "seed": 0}


def write_space(tmp_path: Path, name: str, **tree) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, **TINY, **tree}, sort_keys=False))
    return path


def cli(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result


SPACES = Path(__file__).resolve().parents[2] / "search_spaces"


@pytest.mark.slow
def test_the_quickstart_search_writes_one_row_per_trial_and_starts_from_the_predicted_best(
        ray_session, tmp_path):
    # the shipped quickstart space itself, with 4 of its 12 trials
    result = cli("search", SPACES / "quickstart.yaml", "--samples", 4, "--no-confirm",
                 "--reports", tmp_path / "reports")
    assert result.exit_code == 0, result.output
    folder = tmp_path / "reports" / "quickstart"
    trials = pd.read_parquet(folder / "trials.parquet")  # plain pandas reads it
    shown = trials[["trial_id", "number", "status", "kernel", "divergence", "objective",
                    "predicted_rank"]].to_string()  # what a failure below prints
    assert len(trials) == 4 and trials["trial_id"].is_unique, shown
    assert set(trials["status"]) <= {"ok", "pruned"} and "ok" in set(trials["status"]), shown
    assert trials["objective"].between(0, 1).all()  # true reward is a share
    assert trials["objective"].equals(trials["true_reward"])
    assert trials["kernel_dpo.beta"].dtype == float and trials["lr"].dtype == float
    assert sorted(trials["number"]) == [1, 2, 3, 4]

    selection = pd.read_parquet(folder / "selection.parquet")
    pairs = len(kernel_candidates()) * len(divergence_candidates())
    assert len(selection) == pairs
    assert sorted(selection["predicted_rank"]) == list(range(1, pairs + 1))
    rank = {(k, d): r for k, d, r in zip(selection["kernel"], selection["divergence"],
                                         selection["predicted_rank"], strict=True)}
    space = yaml.safe_load((SPACES / "quickstart.yaml").read_text())
    kernels, divergences = (space["loss"][k]["choice"] for k in ("kernel", "divergence"))
    possible = sorted((rank[(k, d)], k, d) for k in kernels for d in divergences)
    warm = space["selection"]["warm_start"]
    first = trials.sort_values("number").head(warm)
    assert [(k, d) for k, d in zip(first["kernel"], first["divergence"], strict=True)
            ] == [(k, d) for _, k, d in possible[:warm]], shown  # predicted best first
    for row in trials.itertuples():
        assert row.predicted_rank == rank[(row.kernel, row.divergence)], shown

    steps = pd.read_parquet(folder / "steps.parquet")
    for trial_id, group in steps.groupby("trial_id"):
        status = trials.set_index("trial_id").loc[trial_id, "status"]
        expected = [25, 50, 75, 100] if status == "ok" else [25, 50, 75, 100][:len(group)]
        assert sorted(group["step"]) == expected, (trial_id, status, shown)
    meta = json.loads((folder / "search.json").read_text())
    assert meta["status"] == "finished" and meta["objectives"][0]["metric"] == "true_reward"
    assert meta["params"] == ["kernel", "divergence", "kernel_dpo.beta", "lr"]  # = columns

    rep = reports.load(folder)
    ok = trials[trials["status"] == "ok"]
    # select compares every trial, pruned ones included, at the highest step all reached
    compared = trials[trials["status"].isin(["ok", "pruned"])]
    common = steps[steps["trial_id"].isin(compared["trial_id"])].groupby("trial_id")["step"]
    step = common.max().min()
    at = steps[steps["step"] == step].set_index("trial_id")["true_reward"]
    means = compared.assign(value=compared["trial_id"].map(at)).groupby(
        ["kernel", "divergence"])["value"].mean()
    selected = json.loads(cli("select", folder, "--json", "--top", "2").output.splitlines()[-1])
    assert selected["single_seed"] is True and selected["confirmation"] is None
    assert selected["values"]["step"] == (step if (compared["status"] == "pruned").any()
                                          else None)
    chosen = selected["pairs"]
    assert (chosen[0]["kernel"], chosen[0]["divergence"]) == means.idxmax()
    assert chosen[0]["objective"] == pytest.approx(means.max())
    assert chosen[0]["trials"] == int(((compared["kernel"] == chosen[0]["kernel"])
                                       & (compared["divergence"] == chosen[0]["divergence"])
                                       ).sum())
    assert rep.pivot().loc[chosen[0]["kernel"], chosen[0]["divergence"]] == pytest.approx(
        means.max())
    assert rep.best()["objective"] == ok["objective"].max()

    again = cli("search", SPACES / "quickstart.yaml", "--reports", tmp_path / "reports")
    assert again.exit_code != 0 and "--resume" in again.output  # nothing is overwritten


@pytest.mark.slow
def test_a_diverging_trial_is_recorded_as_failed_and_the_search_goes_on(ray_session, tmp_path):
    space = write_space(tmp_path, "nan", budget={"trials": 2, "concurrency": 2},
                        sampler={"name": "grid"}, loss="dpo",
                        lr={"choice": [1.0e-3, 1.0e30]})  # 1e30 makes the loss NaN
    result = cli("search", space, "--reports", tmp_path / "reports")
    assert result.exit_code == 0, result.output
    trials = reports.load(tmp_path / "reports" / "nan").trials.set_index("lr")
    assert trials.loc[1.0e30, "status"] == "failed"
    assert "nan" in trials.loc[1.0e30, "error"].lower()
    assert pd.isna(trials.loc[1.0e30, "objective"])
    assert trials.loc[1.0e-3, "status"] == "ok" and trials.loc[1.0e-3, "objective"] > 0


@pytest.mark.slow
def test_a_trial_with_two_workers_trains_under_ray_train_inside_the_search(ray_session,
                                                                         s3_server, tmp_path):
    """A two-worker trial (a TorchTrainer inside the Tune trial) with the report on object
    storage (the local S3 server): its Train run and checkpoint go under the search's
    storage, rank 0 uploads the model, the driver keeps it there and it loads. (On a local
    report rank 0 writes into the report's staging folder: tests/train/test_distributed.py.)"""
    space = write_space(tmp_path, "workers", budget={"trials": 1, "concurrency": 1},
                        resources={"workers": 2}, selection={"enabled": False}, loss="dpo",
                        steps=8)
    root = s3_server.uri("two-workers")
    result = cli("search", space, "--reports", root)
    assert result.exit_code == 0, result.output
    rep = reports.load(f"{root}/workers")
    (row,) = rep.trials.itertuples()
    assert row.status == "ok" and 0 <= row.objective <= 1
    # a TorchTrainer ran it, its run and checkpoint under the search's own storage
    train_files = s3_server.keys("two-workers/workers/tune/ray_train/")
    assert any(row.trial_id in f and "/checkpoint_" in f for f in train_files), train_files
    # the evaluations of the Train run reach the report too
    assert sorted(rep.steps["step"]) == [4, 8]
    # rank 0 wrote the trained policy, the driver kept it (keep: best 1 by default); from a
    # bucket `raypo export` downloads it
    assert row.model_path == f"models/{row.trial_id}"
    exported = cli("export", f"{root}/workers", tmp_path / "exported")
    assert exported.exit_code == 0, exported.output
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "exported")


def _env(cache) -> dict:
    return {**os.environ, "RAYPO_CACHE": str(cache), "RAY_AUTH_MODE": "disabled",
            "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}


@pytest.mark.slow
def test_a_killed_search_resumes_with_every_trial_exactly_once(raypo_cache, tmp_path):
    space = write_space(tmp_path, "resume", budget={"trials": 4, "concurrency": 1},
                        selection={"enabled": False},
                        loss={"name": "dpo", "beta": {"low": 0.05, "high": 0.5, "log": True}})
    folder = tmp_path / "reports" / "resume"
    command = [sys.executable, "-m", "raypo", "search", str(space), "--reports",
               str(tmp_path / "reports")]
    with open(tmp_path / "first.log", "w") as log:
        driver = subprocess.Popen(command, env=_env(raypo_cache), stdout=log, stderr=log,
                                  start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and driver.poll() is None:
            if (folder / "trials.parquet").exists() and len(
                    pd.read_parquet(folder / "trials.parquet")) >= 1:
                break
            time.sleep(0.5)
        assert driver.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        driver.send_signal(signal.SIGKILL)  # the driver only: no clean-up of any kind
        driver.wait()
    finally:
        time.sleep(3)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(driver.pid, signal.SIGKILL)  # Ray's own processes, if any remain
    before = pd.read_parquet(folder / "trials.parquet")
    assert 1 <= len(before) < 4

    resumed = subprocess.run([*command, "--resume"], env=_env(raypo_cache), capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = pd.read_parquet(folder / "trials.parquet")
    assert len(after) == 4 and after["trial_id"].is_unique
    assert set(after["status"]) <= {"ok", "pruned"}
    # the trials finished before the kill are kept as they were
    kept = after.set_index("trial_id").loc[before["trial_id"], "objective"]
    assert kept.to_numpy() == pytest.approx(before["objective"].to_numpy())
    steps = pd.read_parquet(folder / "steps.parquet")
    assert not steps.duplicated(["trial_id", "step"]).any()


BAD_INPUTS = [
    ({"lrr": 0.1}, "lrr: unknown key"),
    ({"lr": {"low": 1.0, "high": 0.1}}, "lr: low (1.0) must be smaller"),
    ({"loss": {"name": {"choice": ["dpo", "dpoo"]}}}, "unknown loss 'dpoo'"),
    ({"loss": {"name": "kernel_dpo", "kernel": {"choice": ["rbf", "laplace"]}}}, "laplace"),
    ({"loss": {"name": "kernel_dpo", "divergence": {"choice": ["kl", "tv"]}}}, "tv"),
    ({"loss": {"name": "mi_dpo", "prior": {"choice": ["tdpo1", "uniform"]}}}, "uniform"),
    ({"loss": {"name": {"choice": ["dpo", "epsilon_dpo"]},
               "eps": {"low": 0.01, "high": 0.1, "when": {"method": "epsilon_dpo"}}}},
     "condition on unknown parameter 'method'"),
    ({"budget": {"trials": -1}}, "budget.trials"),
]


@pytest.mark.parametrize(("tree", "message"), BAD_INPUTS, ids=[m for _, m in BAD_INPUTS])
def test_bad_search_inputs_exit_non_zero_naming_the_key(tmp_path, tree, message):
    space = write_space(tmp_path, "bad", **tree)
    result = cli("search", space, "--reports", tmp_path / "reports")
    assert result.exit_code == 2
    assert message in result.output and "bad.yaml" in result.output
    assert not (tmp_path / "reports").exists()  # nothing half-written


def test_search_cli_errors_for_missing_files_resume_and_samples(tmp_path):
    result = cli("search", tmp_path / "none.yaml")
    assert result.exit_code == 2 and "none.yaml: no such file" in result.output
    space = write_space(tmp_path, "ok", loss="dpo")
    result = cli("search", space, "--resume", "--reports", tmp_path / "reports")
    assert result.exit_code == 2 and "no interrupted search to resume" in result.output
    result = cli("search", space, "--samples", "0")
    assert result.exit_code == 2 and "--samples" in result.output
    result = cli("search", space, "--data", tmp_path / "missing.jsonl", "--reports",
                 tmp_path / "reports")
    assert result.exit_code == 2 and "missing.jsonl" in result.output


def test_select_says_a_ranking_without_confirmation_is_single_seed(tmp_path):
    result = cli("select", tmp_path)
    assert result.exit_code == 2 and "no trials.parquet" in result.output
    writer = reports.ReportWriter(tmp_path / "r", search="r")
    writer.write_trial({"trial_id": "a", "status": "failed", "objective": None, "loss": "dpo"})
    result = cli("select", tmp_path / "r")
    assert result.exit_code == 2 and "no finished trial" in result.output
    writer.write_trial({"trial_id": "b", "status": "ok", "objective": 0.5, "loss": "dpo",
                        "kernel": None})
    result = cli("select", tmp_path / "r")
    assert result.exit_code == 0 and "1. b dpo" in result.output
    assert "single-seed" in result.output and "raypo confirm" in result.output
    writer.write_meta({"kind": "search", "status": "incomplete", "resume": "raypo search x"})
    result = cli("select", tmp_path / "r")
    assert result.exit_code == 0 and "this search is incomplete" in result.output
