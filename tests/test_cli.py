"""`raypo train` as a user runs it: a report on disk, JSON on the last line, and clear errors
with a non-zero exit status for bad configs and bad data (and nothing written)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from raypo.cli import app

SMALL = ["--set", "task.train_pairs=64", "--set", "task.eval_pairs=16", "--set",
         "task.base_steps=50", "--set", "batch_size=8", "--set", "eval_samples=8",
         "--set", "steps=4", "--set", "eval_every=2"]


def _run(args):
    return CliRunner().invoke(app, args)


def test_train_writes_a_one_trial_report_and_json(tmp_path):
    result = _run(["train", "search_spaces/builtin_dpo.yaml", *SMALL,
                   "--set", f"reports={tmp_path}", "--json"])
    assert result.exit_code == 0, result.output
    final = json.loads(result.stdout.strip().splitlines()[-1])
    for key in ("pref_accuracy", "reward_margin", "chosen_reward", "kl", "true_reward",
                "ref_true_reward", "tokens_per_s", "wall_s"):
        assert key in final, key
    trials = pd.read_parquet(tmp_path / "builtin_dpo" / "trials.parquet")
    assert len(trials) == 1 and trials.loc[0, "status"] == "ok"
    assert trials.loc[0, "loss"] == "dpo" and trials.loc[0, "dpo.beta"] == 0.1
    assert trials.loc[0, "family"] == "baseline" and trials.loc[0, "seed"] == 0
    steps = pd.read_parquet(tmp_path / "builtin_dpo" / "steps.parquet")
    assert list(steps["step"]) == [2, 4]


def test_unknown_key_exits_2_naming_file_and_key(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("loss: dpo\nstepz: 3\n")
    result = _run(["train", str(config), "--set", f"reports={tmp_path}"])
    assert result.exit_code == 2
    assert "bad.yaml" in result.output and "stepz: unknown key" in result.output
    assert not (tmp_path / "bad").exists()


def test_bad_loss_parameter_names_it(tmp_path):
    result = _run(["train", "search_spaces/builtin_dpo.yaml", "--set", "loss.bta=0.1",
                   "--set", f"reports={tmp_path}"])
    assert result.exit_code == 2
    assert "no parameter 'bta'" in result.output


def test_bad_data_exits_2_naming_file_column_and_row(tmp_path):
    data = tmp_path / "prefs.jsonl"
    rows = [{"prompt": "a", "chosen": "b", "rejected": "c"},
            {"prompt": "a", "chosen": 3, "rejected": "c"}]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    result = _run(["train", "search_spaces/builtin_dpo.yaml", "--set", f"data={data}",
                   "--set", f"reports={tmp_path / 'reports'}"])
    assert result.exit_code == 2, result.output
    assert "prefs.jsonl" in result.output and "'chosen'" in result.output
    assert "row 1" in result.output
    assert not (tmp_path / "reports").exists()


def test_missing_config_file(tmp_path):
    result = _run(["train", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2 and "nope.yaml: no such file" in result.output


def test_float16_on_the_cpu_exits_2_naming_bfloat16(tmp_path):
    result = _run(["train", "search_spaces/builtin_dpo.yaml", "--set", "dtype=float16",
                   "--set", "device=cpu", "--set", f"reports={tmp_path}"])
    assert result.exit_code == 2, result.output
    assert "dtype: float16" in result.output and "use dtype: bfloat16" in result.output
    assert not (tmp_path / "builtin_dpo" / "trials.parquet").exists()


@pytest.mark.timeout(120)
def test_select_ranks_pairs_at_the_step_every_trial_reached(tmp_path):
    from tests.reports.test_tables import write_pruned_search

    write_pruned_search(tmp_path)
    result = _run(["select", str(tmp_path), "--top", "3"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    # by hand, true_reward at step 50 (where the first pruned trial stopped): polynomial/js
    # 0.95 (pruned c), rbf/kl (0.6 + 0.9) / 2 from a and b, polynomial/kl 0.2 (pruned d)
    assert lines[1] == ("values: true_reward at step 50, the highest step every trial reached "
                        "(the finished ones and those the scheduler stopped); 2 pruned "
                        "trials, counted per pair")
    assert lines[3].startswith("1. kernel polynomial, divergence js: true_reward 0.9500 ")
    assert "1 trial, 1 pruned, predicted rank 2" in lines[3]
    assert lines[4].startswith("2. kernel rbf, divergence kl: true_reward 0.7500 ± ")
    assert "(best 0.9000, 2 trials, predicted rank 1)" in lines[4]
    assert lines[5].startswith("3. kernel polynomial, divergence kl: true_reward 0.2000 ")
    chosen = json.loads(_run(["select", str(tmp_path), "--json", "--top", "3"])
                        .output.splitlines()[-1])
    assert chosen["values"]["step"] == 50 and chosen["values"]["pruned"] == 2
    assert [(p["objective"], p["trials"], p["pruned"]) for p in chosen["pairs"]] == [
        (pytest.approx(0.95), 1, 1), (pytest.approx(0.75), 2, 0), (pytest.approx(0.2), 1, 1)]
    assert [(b["trial_id"], b["status"], b["step"]) for b in chosen["best"]] == [
        ("c", "pruned", 50), ("b", "ok", 50), ("h", "ok", 50)]


@pytest.mark.timeout(120)
def test_select_marks_pruned_trials_and_says_when_it_has_only_final_values(tmp_path):
    from tests.reports.test_tables import write_pruned_search

    rows = [("x", "ok", None, None, {50: 0.8, 100: 0.5}),
            ("y", "pruned", None, None, {50: 0.6})]
    write_pruned_search(tmp_path / "steps", rows)
    output = _run(["select", str(tmp_path / "steps"), "--top", "2"]).output
    assert "values: true_reward at step 50" in output and "1 pruned trial, marked p" in output
    assert "1. x dpo: true_reward 0.8000" in output and "2. p y dpo: true_reward 0.6000" in output
    write_pruned_search(tmp_path / "old", rows, steps=False)  # before steps.parquet
    output = _run(["select", str(tmp_path / "old"), "--top", "2"]).output
    assert ("values: true_reward: the finished trials' final values; this report has no "
            "per-evaluation values (steps.parquet), so its 1 pruned trial, stopped at earlier "
            "steps, is left out") in output
    assert "1. x dpo: true_reward 0.5000" in output and " y " not in output
