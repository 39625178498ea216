"""Judged evaluation: a reward model scores the policy's samples against the reference's.

Checked against independent facts: the built-in judge ranks trained policies as the task's
true reward does (Spearman); the reference judged against itself wins half the time within a
binomial interval, a trained DPO policy more; the length-controlled win rate against a
general-purpose optimizer's fit of the same model; a judge loaded from a folder on a dataset
of the test's own; and each bad judge exits 2 naming its key.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import optimize, stats
from typer.testing import CliRunner

from raypo.cli import app
from raypo.data.builtin import TaskSpec
from raypo.train.builtin_judge import builtin_judge
from raypo.train.config import load_config
from raypo.train.judging import length_controlled_win_rate, outcomes
from raypo.train.loop import train
from raypo.train.setup import prepare
from tests.train.own_data import own_data

# the search tests' built-in task (its base model and reference outputs are cached once)
TASK = ["task.train_pairs=64", "task.eval_pairs=16", "task.base_steps=20", "batch_size=32",
        "htsr=off", "lr=3e-3"]
JUDGE = "judge={model: builtin, prompts: 64}"


def _quiet(message):
    pass


@pytest.mark.timeout(600)
def test_builtin_judge_ranks_trained_policies_as_the_true_reward_does():
    """9 policies (3 runs of different losses, task variants and learning rates, each judged
    after 10, 20 and 30 steps): Spearman(judge_reward, true_reward) >= 0.8."""
    runs = [["loss=dpo"], ["loss=dpo", "task.variant=length", "task.length_bias=2"],
            ["loss=ipo", "lr=1e-3"]]
    judged, true = [], []
    for run in runs:
        cfg = load_config(None, [*TASK, JUDGE, "steps=30", "eval_every=10", *run])
        train(prepare(cfg, log=_quiet), on_eval=lambda step, row: (
            judged.append(row["judge_reward"]), true.append(row["true_reward"])))
    assert len(judged) == 9
    assert max(true) - min(true) > 0.2  # clearly different qualities
    rho = stats.spearmanr(judged, true).statistic
    print(f"Spearman(judge_reward, true_reward) over 9 policies: {rho:.3f}")
    assert rho >= 0.8, (judged, true)


@pytest.mark.timeout(300)
def test_reference_against_itself_wins_half_and_trained_dpo_wins_more():
    cfg = load_config(None, [*TASK, "judge={model: builtin, prompts: 128}", "steps=30",
                          "eval_every=30"])
    setup = prepare(cfg, log=_quiet)
    from raypo.train.judging import judge_metrics

    # the untrained policy is the reference, sampled with the policy's seed (seed + 1), not
    # the cached reference samples' (data_seed + an offset)
    with torch.no_grad():
        itself = judge_metrics(setup, setup.policy)
    n = cfg.judge.prompts

    def interval(rate):
        return stats.binomtest(round(rate * n), n).proportion_ci(0.95)

    low, high = interval(itself["judge_win_rate"])
    assert low <= 0.5 <= high, itself
    assert itself["kl"] == pytest.approx(0.0, abs=1e-4)  # the same model
    trained = train(setup)
    low, _ = interval(trained["judge_win_rate"])
    assert low > 0.5, trained
    for key in ("judge_reward_se", "judge_win_rate_se"):
        assert 0 < trained[key] < 0.2
    assert trained["ref_judge_reward"] == pytest.approx(itself["ref_judge_reward"])
    assert 0 < trained["eval_share"] < 1 and trained["eval_seconds"] > 0


def test_outcomes_count_ties_half():
    policy = torch.tensor([1.0, 0.0, 2.0, 3.0])
    reference = torch.tensor([0.0, 1.0, 2.0, 1.0])
    assert outcomes(policy, reference).tolist() == [1.0, 0.0, 0.5, 1.0]


def _penalized_fit(y, x, ridge):
    """The same model fitted by a general-purpose optimizer (scipy's BFGS)."""
    design = np.stack([np.ones_like(x), x], axis=1)

    def loss(beta):
        z = design @ beta
        return -(y * z - np.logaddexp(0, z)).sum() + ridge / 2 * beta @ beta

    return 1 / (1 + math.exp(-optimize.minimize(loss, np.zeros(2), method="BFGS").x[0]))


def test_length_controlled_win_rate_reads_the_fit_at_zero_length_difference():
    from raypo.train.judging import LC_RIDGE

    rng = np.random.default_rng(0)
    diff = rng.normal(3.0, 4.0, size=4000)  # the policy mostly writes longer
    x = np.tanh(diff / diff.std())
    # outcomes drawn from a known model: even at equal length, winning when longer
    wins = (rng.random(4000) < 1 / (1 + np.exp(-2.0 * x))).astype(float)
    lc = length_controlled_win_rate(wins, diff)
    assert wins.mean() > 0.6  # the raw win rate rewards length
    assert abs(lc - 0.5) < 0.04  # controlled for it, an even match
    assert lc == pytest.approx(_penalized_fit(wins, x, LC_RIDGE), abs=1e-5)
    # no length differences: the (barely shrunk) raw win rate; every prompt won: finite
    even = np.array([1.0] * 70 + [0.0] * 30)
    assert length_controlled_win_rate(even, np.zeros(100)) == pytest.approx(0.7, abs=1e-3)
    assert 0.99 < length_controlled_win_rate(np.ones(50), rng.normal(size=50)) < 1.0


def _judge_folder(tmp_path, chat_template=None):
    """The built-in judge saved as a Hugging Face folder, its tokenizer with `chat_template`."""
    judge = builtin_judge(TaskSpec(), log=_quiet)
    folder = tmp_path / "judge"
    judge.model.save_pretrained(folder)
    judge.tokenizer.chat_template = chat_template
    judge.tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.timeout(300)
def test_a_judge_from_a_folder_on_own_data_and_a_fitted_tiny_policy(tmp_path, capsys):
    from raypo.models.tiny import CHAT_TEMPLATE

    folder = _judge_folder(tmp_path, CHAT_TEMPLATE)
    # own data, no model: the tiny model fitted to the data's responses (sft_steps)
    overrides = [o for o in own_data(tmp_path) if not o.startswith("model=")]
    cfg = load_config(None, [*overrides, "sft_steps=20", "steps=4", "eval_every=2",
                             f"judge={{model: {folder}, prompts: 6, max_new_tokens: 12}}"])
    messages = []
    setup = prepare(cfg, log=messages.append)
    distinct = len({tuple(p) for p in setup.eval_pairs.prompt_ids})
    assert setup.judge.chat and len(setup.judge_prompts.raw) == min(6, distinct)
    # the judge renders prompt and response in its own chat format
    assert setup.judge.render("abc", "de") == "<|user|>abc<|end|><|assistant|>de<|end|>"
    assert any("reference's responses" in m for m in messages)
    # what a search's objective may name: every judged metric (raypo.train.reported)
    from raypo.train.judging import JUDGED_METRICS
    from raypo.train.reported import reported_metrics

    assert {*JUDGED_METRICS, "eval_seconds", "eval_share"} <= reported_metrics(setup)
    rows = []
    final = train(setup, on_eval=lambda step, row: rows.append(row))
    assert [r["step"] for r in rows] == [2, 4]
    for key in ("judge_reward", "judge_win_rate", "judge_lc_win_rate", "kl",
                "response_length", "judge_reward_se", "judge_win_rate_se", "eval_seconds"):
        assert math.isfinite(final[key]), key
    assert 0 <= final["judge_win_rate"] <= 1 and 0 < final["response_length"] <= 13
    assert "true_reward" not in final  # no true reward outside the built-in task
    # a second run (another trial) reads the reference's judged samples from the cache
    again = []
    prepare(load_config(None, [*overrides, "sft_steps=20", "steps=4", "seed=1",
                               f"judge={{model: {folder}, prompts: 6, max_new_tokens: 12}}"]),
            log=again.append)
    assert not any("reference's responses" in m for m in again)


def _cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_judge_errors_exit_2_naming_the_key_before_any_training(tmp_path):
    overrides = own_data(tmp_path)
    policy_folder = next(o for o in overrides if o.startswith("model=")).split("=", 1)[1]
    config = tmp_path / "train.yaml"
    config.write_text(json.dumps({"steps": 2, "reports": str(tmp_path / "reports")}))
    base = ["train", config]
    for o in overrides:
        base += ["--set", o]
    # a causal language model is not a reward model
    result = _cli(*base, "--set", f"judge={policy_folder}")
    assert result.exit_code == 2, result.output
    assert "judge.model" in result.output and "sequence classifier" in result.output
    # a judge whose chat template cannot render the prompts
    raising = "{{ raise_exception('only system messages are supported') }}"
    folder = _judge_folder(tmp_path, raising)
    result = _cli(*base, "--set", f"judge={folder}")
    assert result.exit_code == 2, result.output
    assert "judge.model" in result.output and "cannot render" in result.output
    assert "only system messages" in result.output
    # judge: builtin judges only the built-in task
    result = _cli(*base, "--set", "judge=builtin")
    assert result.exit_code == 2 and "judge" in result.output
    assert not (tmp_path / "reports").exists()


def test_a_judged_objective_without_a_judge_exits_2_before_anything(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(json.dumps({"objective": {"metric": "judge_win_rate"},
                                 "loss": {"name": "dpo"}, "steps": 2}))
    result = _cli("search", space, "--reports", tmp_path / "reports")
    assert result.exit_code == 2, result.output
    assert "objective.metric: judge_win_rate" in result.output and "judge:" in result.output
    assert not (tmp_path / "reports").exists()


def test_judged_metrics_are_objectives_alone_or_beside_kl_in_a_pareto_search():
    from raypo.search.space import parse_space

    base = {"judge": "builtin", "loss": {"name": "dpo", "beta": {"low": 0.05, "high": 0.5}}}
    assert [o.metric for o in parse_space(base).objectives] == ["judge_win_rate"]
    pareto = parse_space({**base, "objectives": [{"metric": "judge_win_rate"},
                                                 {"metric": "kl", "mode": "min"}]})
    assert [(o.metric, o.mode) for o in pareto.objectives] == [("judge_win_rate", "max"),
                                                               ("kl", "min")]
    for metric in ("judge_reward", "judge_lc_win_rate"):
        assert parse_space({**base, "objective": metric}).objectives[0].metric == metric
