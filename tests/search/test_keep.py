"""A search leaves models: the keeper keeps the best trials' models (in the objective's
direction), replaces them as better ones finish and records `model_path`; `raypo export`
copies a kept model or says how to get one that was not kept."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from raypo.cli import app
from raypo.models.save import META, read_meta
from raypo.search.keep import ModelKeeper, staging_path


def stage(report: Path, run_id: str) -> None:
    """What a finished trial leaves: a saved folder (a raypo.json is all the keeper reads)."""
    folder = staging_path(report, run_id)
    folder.mkdir(parents=True)
    (folder / META).write_text(json.dumps({"trial_id": run_id}))


def kept_ids(report: Path) -> set[str]:
    return {p.name for p in (report / "models").iterdir() if not p.name.startswith(".")}


def test_the_keeper_keeps_the_best_in_the_objectives_direction_and_drops_the_rest(tmp_path):
    keeper = ModelKeeper(tmp_path, best=2, mode="max", metric="true_reward")
    offers = [("a", 0.5), ("b", 0.2), ("c", 0.7), ("d", None), ("e", 0.6), ("f", 0.6)]
    changes = []
    for run_id, objective in offers:
        stage(tmp_path, run_id)
        changes.append(keeper.offer(run_id, objective))
    assert changes == [{"a": "models/a"}, {"b": "models/b"}, {"c": "models/c", "b": None},
                       {"d": None}, {"e": "models/e", "a": None}, {"f": None}]  # tie: e stays
    assert kept_ids(tmp_path) == {"c", "e"}
    assert read_meta(tmp_path / "models" / "c")["keep"]["objective"] == 0.7
    assert not list((tmp_path / "models" / ".staging").iterdir())  # nothing staged is left
    # the state is the folders: a new keeper (a resumed search) carries on from them
    again = ModelKeeper(tmp_path, best=2, mode="max", metric="true_reward")
    stage(tmp_path, "g")
    assert again.offer("g", 0.9) == {"g": "models/g", "e": None}


@pytest.mark.timeout(60)
def test_a_row_whose_model_a_killed_driver_removed_gets_model_path_null(tmp_path):
    # the driver died after a better trial pushed "a" out of models/ and before a's row said
    # so: the end of the resumed stage makes the table say what is on disk
    from raypo.reports.writer import ReportWriter
    from raypo.search.keep import forget_missing

    keeper = ModelKeeper(tmp_path, best=1, mode="max", metric="true_reward")
    writer = ReportWriter(tmp_path, search="s")
    for run_id, objective in (("a", 0.5), ("b", 0.7)):
        stage(tmp_path, run_id)
        path = keeper.offer(run_id, objective)[run_id]
        writer.write_trial({"trial_id": run_id, "status": "ok", "model_path": path})
    forget_missing(writer)
    assert dict(zip(writer.trials["trial_id"], writer.trials["model_path"], strict=True)) == {
        "a": None, "b": "models/b"}
    on_disk = pd.read_parquet(tmp_path / "trials.parquet")["model_path"]
    assert on_disk.isna().tolist() == [True, False] and on_disk[1] == "models/b"


def test_min_mode_all_none_and_groups(tmp_path):
    low = ModelKeeper(tmp_path / "min", best=1, mode="min", metric="kl")
    for run_id, objective in (("a", 0.3), ("b", 0.1), ("c", 0.2)):
        stage(tmp_path / "min", run_id)
        low.offer(run_id, objective)
    assert kept_ids(tmp_path / "min") == {"b"}

    every = ModelKeeper(tmp_path / "all", best=None, mode="max", metric="m")
    none = ModelKeeper(tmp_path / "none", best=0, mode="max", metric="m")
    for run_id in ("a", "b"):
        stage(tmp_path / "all", run_id)
        every.offer(run_id, 1.0)
        stage(tmp_path / "none", run_id)
        assert none.offer(run_id, 1.0) == {run_id: None}
    assert kept_ids(tmp_path / "all") == {"a", "b"}
    assert not none.wants_models and kept_ids(tmp_path / "none") == set()

    # a confirmation stage keeps its own best beside the search's, in the same models/
    confirm = ModelKeeper(tmp_path / "all", best=1, mode="max", metric="m", group="confirm")
    stage(tmp_path / "all", "seed-1")
    assert confirm.offer("seed-1", 0.1) == {"seed-1": "models/seed-1"}
    assert kept_ids(tmp_path / "all") == {"a", "b", "seed-1"}


TINY = {"task": {"variant": "graded", "train_pairs": 64, "eval_pairs": 16, "base_steps": 20},
        "steps": 8, "batch_size": 8, "eval_every": 4, "eval_samples": 8, "warmup_steps": 2,
        "seed": 0, "loss": "dpo", "selection": {"enabled": False},
        "budget": {"trials": 3, "concurrency": 1}, "sampler": {"name": "grid"},
        "lr": {"choice": [1.0e-4, 3.0e-3, 1.0e-2]}}


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.mark.slow
def test_a_search_keeps_its_best_model_and_export_copies_it_or_rebuilds_another(ray_session,
                                                                             tmp_path):
    space = tmp_path / "kept.yaml"
    space.write_text(yaml.safe_dump({"name": "kept", **TINY, "keep": {"best": 1}}))
    result = cli("search", space, "--reports", tmp_path / "reports")
    assert result.exit_code == 0, result.output
    folder = tmp_path / "reports" / "kept"
    trials = pd.read_parquet(folder / "trials.parquet")
    assert set(trials["status"]) == {"ok"}, trials[["trial_id", "status", "error"]]
    best = trials.loc[trials["objective"].idxmax()]
    assert kept_ids(folder) == {best["trial_id"]}
    assert best["model_path"] == f"models/{best['trial_id']}"
    assert trials.drop(best.name)["model_path"].isna().all()
    assert read_meta(folder / best["model_path"])["keep"]["objective"] == best["objective"]
    assert not (folder / "models" / ".staging").exists()
    # ended trials keep no checkpoint (empty folders stay for Tune's experiment state)
    assert not [f for f in (folder / "tune").glob("*/checkpoint_*/**/*") if f.is_file()]

    out = tmp_path / "exported"
    result = cli("export", folder, out)
    assert result.exit_code == 0, result.output
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(out)
    kept = AutoModelForCausalLM.from_pretrained(folder / best["model_path"])
    for a, b in zip(exported.state_dict().values(), kept.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert read_meta(out)["exported_from"]["trial_id"] == best["trial_id"]

    other = trials.loc[trials["objective"].idxmin()]
    result = cli("export", folder, "--trial", other["trial_id"], tmp_path / "other")
    assert result.exit_code == 2
    assert f"trial {other['trial_id']}'s model was not kept" in result.output
    assert "--rebuild" in result.output and not (tmp_path / "other").exists()

    # rebuilt from the trial's own config and seed: the same held-out numbers as the trial
    result = cli("export", folder, "--trial", other["trial_id"], tmp_path / "other",
                 "--rebuild")
    assert result.exit_code == 0, result.output
    metrics = read_meta(tmp_path / "other")["metrics"]
    for key in ("eval_loss", "pref_accuracy", "true_reward"):
        assert metrics[key] == pytest.approx(other[key], rel=1e-5, abs=1e-7), key
