"""The confirmation stage: which configurations it confirms against which baseline, how it
pairs runs by seed, what it concludes; and end to end on the built-in task, including a
confirmation killed mid-way and resumed, and a finalist that is the baseline itself, whose
verdict must be that nothing beats it."""

from __future__ import annotations

import json
import math
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
from raypo.reports.schema import trial_row
from raypo.search.confirm import (
    Plan,
    baseline_config,
    best_finalist,
    config_id,
    confirmation_stats,
    make_plan,
    verdict,
)
from raypo.search.settings import Confirm
from raypo.search.space import SpaceError, parse_space

TINY = {"task": {"variant": "graded", "train_pairs": 64, "eval_pairs": 16, "base_steps": 20},
        "steps": 8, "batch_size": 8, "eval_every": 4, "eval_samples": 8, "warmup_steps": 2,
        "seed": 0}


def space_of(**tree):
    return parse_space({"name": "c", **TINY, **tree}, "c.yaml")


def trials_of(space, points: list[tuple[dict, float]]) -> pd.DataFrame:
    """A trials table as a search writes it, one ok row per (searched values, objective)."""
    rows = []
    for i, (values, objective) in enumerate(points):
        cfg = space.config(values)
        rows.append(trial_row(cfg, {"trial_id": f"t{i}", "status": "ok", "error": None,
                                    "objective": objective, "true_reward": objective},
                              searched=values))
    return pd.DataFrame(rows)


SPACE = dict(loss={"name": {"choice": ["dpo", "ipo", "kernel_dpo"]},
                   "beta": {"low": 0.05, "high": 0.5}},
             lr={"low": 1e-4, "high": 1e-2})


def test_finalists_are_the_best_distinct_configurations_each_with_its_baseline():
    space = space_of(**SPACE)
    trials = trials_of(space, [
        ({"loss": "kernel_dpo", "kernel_dpo.beta": 0.2, "lr": 1e-3}, 0.9),
        ({"loss": "ipo", "ipo.beta": 0.3, "lr": 2e-3}, 0.8),
        ({"loss": "kernel_dpo", "kernel_dpo.beta": 0.2, "lr": 1e-3}, 0.85),  # same config
        ({"loss": "dpo", "dpo.beta": 0.1, "lr": 1e-3}, 0.7),
    ])
    plan = make_plan(trials, space, Confirm(top=2, seeds=3))
    assert [f["trial_id"] for f in plan.finalists] == ["t0", "t1"]  # t2 repeats t0
    assert plan.seeds == [1, 2, 3]  # fresh seeds: the search's own (0) picked the winners
    first = space.config({"loss": "kernel_dpo", "kernel_dpo.beta": 0.2, "lr": 1e-3})
    base = baseline_config(first, {"name": "dpo"})
    # the baseline differs only in the loss, and keeps the finalist's beta
    assert base.loss.name == "dpo" and base.loss.params == {"beta": 0.2}
    assert base.model_dump(exclude={"loss"}) == first.model_dump(exclude={"loss"})
    assert plan.finalists[0]["baseline_id"] == config_id(base)
    assert len(plan.runs) == 4 * 3 and len({r["run_id"] for r in plan.runs}) == 12
    assert {r["seed"] for r in plan.runs} == {1, 2, 3}


def test_finalists_that_read_the_same_are_labelled_by_what_sets_them_apart():
    """Two kernel_dpo finalists that differ only in beta and learning rate (the quickstart's
    page showed two "kernel_dpo (kernel polynomial, divergence kl)"): each label names its
    beta and lr; a finalist unlike the others keeps its plain label."""
    space = space_of(**SPACE)
    trials = trials_of(space, [
        ({"loss": "kernel_dpo", "kernel_dpo.beta": 0.2, "lr": 1e-3}, 0.9),
        ({"loss": "kernel_dpo", "kernel_dpo.beta": 0.35, "lr": 3.1e-3}, 0.85),
        ({"loss": "ipo", "ipo.beta": 0.3, "lr": 2e-3}, 0.8),
    ])
    labels = [f["label"] for f in make_plan(trials, space, Confirm(top=3, seeds=2)).finalists]
    plain = "kernel_dpo (kernel rbf)"  # the default kernel, no divergence penalty
    assert labels == [f"{plain} [kernel_dpo.beta 0.2, lr 0.001]",
                      f"{plain} [kernel_dpo.beta 0.35, lr 0.0031]", "ipo"]


def test_a_finalist_that_is_the_baseline_is_its_own_baseline_and_runs_once():
    space = space_of(**SPACE)
    trials = trials_of(space, [({"loss": "dpo", "dpo.beta": 0.1, "lr": 1e-3}, 0.9),
                               ({"loss": "ipo", "ipo.beta": 0.1, "lr": 1e-3}, 0.8)])
    plan = make_plan(trials, space, Confirm(top=2, seeds=[7, 9]))
    dpo, ipo = plan.finalists
    assert dpo["config_id"] == dpo["baseline_id"]
    assert ipo["baseline_id"] == dpo["config_id"]  # ipo's baseline is the dpo finalist
    assert len(plan.runs) == 2 * 2 and {r["role"] for r in plan.runs} == {"finalist"}


def test_a_baseline_that_cannot_be_built_is_an_error_naming_the_section():
    space = space_of(**SPACE)
    trials = trials_of(space, [({"loss": "dpo", "dpo.beta": 0.1, "lr": 1e-3}, 0.9)])
    with pytest.raises(SpaceError, match="confirm.baseline"):
        make_plan(trials, space, Confirm(baseline={"name": "dpo", "gamma": 1.0}))
    with pytest.raises(ValueError, match="at least 2 seeds"):
        Confirm(seeds=1)


def _plan(mode="max") -> Plan:
    return Plan(seeds=[1, 2, 3, 4], metric="true_reward", mode=mode, baseline="dpo",
                finalists=[{"rank": 1, "trial_id": "a", "config_id": "F", "baseline_id": "B",
                            "label": "kernel_dpo (kernel rbf)", "search_objective": 0.9},
                           {"rank": 2, "trial_id": "b", "config_id": "G", "baseline_id": "B",
                            "label": "ipo", "search_objective": 0.8}])


def _rows(values: dict[str, list[float]]) -> pd.DataFrame:
    rows = [{"trial_id": f"{cid}-s{seed}", "config_id": cid, "seed": seed, "status": "ok",
             "true_reward": v} for cid, vs in values.items() for seed, v in zip(
                 [1, 2, 3, 4], vs, strict=True)]
    return pd.DataFrame(rows).sample(frac=1.0, random_state=0)  # the order rows ended in


def test_statistics_pair_runs_by_seed_whatever_order_they_ended_in():
    shared = [0.1, 0.5, 0.3, 0.7]  # seed effects, shared by every configuration
    rows = _rows({"B": shared, "F": [v + 0.05 for v in shared],
                  "G": [v + d for v, d in zip(shared, [0.1, -0.1, 0.05, -0.05], strict=True)]})
    stats = confirmation_stats(_plan(), rows).set_index("config_id")
    assert stats.loc["F", "diff_mean"] == pytest.approx(0.05)
    assert stats.loc["F", "diff_std"] == pytest.approx(0.0, abs=1e-12)
    assert stats.loc["F", "beats_baseline"]
    assert stats.loc["G", "diff_mean"] == pytest.approx(0.0, abs=1e-12)
    assert not stats.loc["G", "beats_baseline"]
    # Holm over two finalists: the larger p is at least the smaller times two
    assert stats["p_holm"].min() == pytest.approx(min(1.0, 2 * stats["p"].min()))
    text = verdict(stats.reset_index(), _plan())
    assert text.startswith("kernel_dpo (kernel rbf) beats dpo by 0.05 true_reward")
    assert "Holm p" in text and "4 seeds" in text


def test_no_finalist_beats_the_baseline_when_differences_are_noise_or_wrong_way():
    rows = _rows({"B": [0.5, 0.6, 0.4, 0.5], "F": [0.6, 0.5, 0.5, 0.4],
                  "G": [0.3, 0.4, 0.2, 0.3]})  # G is clearly worse: not "beats"
    stats = confirmation_stats(_plan(), rows)
    assert not stats["beats_baseline"].any()
    assert verdict(stats, _plan()) == "no finalist beats dpo beyond seed noise (4 seeds)"
    lower = confirmation_stats(_plan(mode="min"), rows)  # with min, G's lower value is better
    assert lower.set_index("config_id").loc["G", "beats_baseline"]


def test_the_recommended_finalist_is_the_verdicts_winner_else_the_best_mean():
    shared = [0.1, 0.5, 0.3, 0.7]
    # F beats B by a steady 0.05; G has the higher mean but does not beat its baseline
    rows = _rows({"B": shared, "F": [v + 0.05 for v in shared],
                  "G": [v + d for v, d in zip(shared, [0.9, -0.1, 0.05, -0.05], strict=True)]})
    stats = confirmation_stats(_plan(), rows)
    assert best_finalist(stats, "max")["config_id"] == "F"
    noise = confirmation_stats(_plan(), _rows({"B": [0.5, 0.6, 0.4, 0.5],
                                               "F": [0.6, 0.5, 0.5, 0.4],
                                               "G": [0.3, 0.4, 0.2, 0.3]}))
    assert best_finalist(noise, "max")["config_id"] == "F"  # 0.5 against G's 0.3
    assert best_finalist(noise.assign(mean=math.nan), "max") is None


def test_a_failed_run_drops_its_seed_from_the_pairs():
    rows = _rows({"B": [0.5, 0.6, 0.4, 0.5], "F": [0.6, 0.7, 0.5, 0.6],
                  "G": [0.5, 0.6, 0.4, 0.5]})
    rows.loc[(rows["config_id"] == "F") & (rows["seed"] == 3), "status"] = "failed"
    stats = confirmation_stats(_plan(), rows).set_index("config_id")
    assert stats.loc["F", "n"] == 3 and stats.loc["G", "n"] == 4


# ------------------------------------------------------------------------- end to end


def _write(tmp_path: Path, name: str, **tree) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, **TINY, **tree}, sort_keys=False))
    return path


def _env(cache) -> dict:
    return {**os.environ, "RAYPO_CACHE": str(cache), "RAY_AUTH_MODE": "disabled",
            "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}


@pytest.mark.slow
def test_a_search_with_confirm_killed_mid_confirmation_resumes_to_a_verdict(
        ray_session, tmp_path, raypo_cache):
    # Two dpo finalists (a grid over lr): each is its own baseline, so the verdict is known:
    # nothing beats dpo. The search runs in a subprocess, killed once the first confirmation
    # run has its row; `raypo confirm` then finishes the rest.
    space = _write(tmp_path, "confirmed", budget={"trials": 2, "concurrency": 2},
                   sampler={"name": "grid"}, selection={"enabled": False}, loss="dpo",
                   lr={"choice": [1e-3, 2e-3]}, confirm={"top": 2, "seeds": 3})
    folder = tmp_path / "reports" / "confirmed"
    args = [sys.executable, "-m", "raypo", "search", str(space), "--reports",
            str(tmp_path / "reports")]
    proc = subprocess.Popen(args, env=_env(raypo_cache), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    runs = folder / "confirm.parquet"
    deadline = time.time() + 300
    try:
        while time.time() < deadline and not runs.is_file() and proc.poll() is None:
            time.sleep(0.5)
        assert runs.is_file(), "no confirmation run finished within 5 minutes"
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its Ray, mid-confirmation
    finally:
        proc.wait(timeout=60)
    before = pd.read_parquet(runs)
    assert 1 <= len(before) < 6
    again = CliRunner().invoke(app, ["confirm", str(folder)])  # the space's confirm: section
    assert again.exit_code == 0, again.output
    after = pd.read_parquet(runs)  # plain pandas reads it
    assert len(after) == 6 and after["trial_id"].is_unique
    assert set(after["seed"]) == {1, 2, 3} and set(after["role"]) == {"finalist"}
    assert set(after["status"]) == {"ok"} and after["objective"].between(0, 1).all()
    kept = after.set_index("trial_id").loc[before["trial_id"], "objective"]
    assert list(kept) == list(before["objective"])  # what had finished is not run again

    rep = reports.load(folder)
    assert rep.verdict == "no finalist beats dpo beyond seed noise (3 seeds)"
    stats = rep.confirmation()
    assert list(stats["rank"]) == [1, 2] and (stats["n"] == 3).all()
    assert stats["same_as_baseline"].all() and (stats["diff_mean"] == 0).all()
    assert rep.meta["confirmation"]["status"] == "finished"
    chosen = json.loads(CliRunner().invoke(app, ["select", str(folder), "--json"])
                        .output.splitlines()[-1])
    assert chosen["single_seed"] is False and chosen["verdict"] == rep.verdict
    assert [c["rank"] for c in chosen["confirmation"]] == [1, 2]
    text = CliRunner().invoke(app, ["select", str(folder)]).output
    assert f"verdict: {rep.verdict}" in text and "Holm p" in text
    assert CliRunner().invoke(app, ["report", str(folder)]).exit_code == 0
    page = (folder / "report.html").read_text()
    section = page.split('<section id="confirmation">')[1].split("</section>")[0]
    assert "<svg" in section and rep.verdict in section
    assert all(math.isclose(p, 1.0) for p in stats["p_holm"])

    # keep: {best: 1} (the default) keeps the search's best trial and the confirmation's
    # best finalist's best seed; nothing beats dpo, so the best finalist is the best mean
    best = stats.loc[stats["mean"].idxmax()]
    mine = after[after["config_id"] == best["config_id"]]
    top_seed = mine.loc[mine["objective"].idxmax(), "trial_id"]
    assert list(after["model_path"].dropna()) == [f"models/{top_seed}"]
    assert rep.meta["confirmation"]["model_path"] == f"models/{top_seed}"
    search_kept = rep.trials["model_path"].dropna().tolist()
    assert len(search_kept) == 1
    assert sorted(p.name for p in (folder / "models").iterdir()) == sorted(
        [top_seed, search_kept[0].split("/")[1]])  # the staging folder is gone too
    assert f"models/{top_seed}" in text and chosen["model_path"] == f"models/{top_seed}"
    out = tmp_path / "chosen"
    exported = CliRunner().invoke(app, ["export", str(folder), str(out)])
    assert exported.exit_code == 0, exported.output
    meta = json.loads((out / "raypo.json").read_text())
    assert meta["exported_from"]["trial_id"] == top_seed and meta["config"]["seed"] in (1, 2, 3)
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out).num_parameters() > 0
