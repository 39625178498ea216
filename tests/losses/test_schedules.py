"""beta schedules against their formulas at hand-picked steps."""

from __future__ import annotations

import math

import pytest

from raypo.losses import SCHEDULES, build, schedule


def test_all_schedules_registered():
    assert {"constant", "linear", "cosine", "exponential", "step", "warmup_decay"} <= set(SCHEDULES)


@pytest.mark.parametrize("name,params,step,expected", [
    ("constant", {"beta": 0.3}, 1000, 0.3),
    ("linear", {"beta": 0.1, "end_beta": 0.3, "total_steps": 100}, 0, 0.1),
    ("linear", {"beta": 0.1, "end_beta": 0.3, "total_steps": 100}, 25, 0.15),
    ("linear", {"beta": 0.1, "end_beta": 0.3, "total_steps": 100}, 500, 0.3),
    ("cosine", {"beta": 0.5, "end_beta": 0.1, "total_steps": 100}, 50, 0.3),
    ("cosine", {"beta": 0.5, "end_beta": 0.1, "total_steps": 100}, 100, 0.1),
    ("exponential", {"beta": 0.2, "decay": 0.99}, 10, 0.2 * 0.99**10),
    ("exponential", {"beta": 0.2, "decay": 0.5, "min_beta": 0.01}, 100, 0.01),
    ("step", {"beta": 0.4, "step_size": 10, "factor": 0.5}, 9, 0.4),
    ("step", {"beta": 0.4, "step_size": 10, "factor": 0.5}, 25, 0.1),
    ("warmup_decay", {"beta": 0.2, "start_beta": 0.02, "warmup_steps": 10, "end_beta": 0.05,
                      "total_steps": 110}, 5, 0.11),
    ("warmup_decay", {"beta": 0.2, "start_beta": 0.02, "warmup_steps": 10, "end_beta": 0.05,
                      "total_steps": 110}, 60, 0.05 + 0.15 * (1 + math.cos(math.pi / 2)) / 2),
])
def test_schedule_value(name, params, step, expected):
    assert schedule(name, **params)(step) == pytest.approx(expected)


def test_schedule_drives_a_loss():
    loss = build("dpo", beta=0.1)
    sched = schedule("linear", beta=0.1, end_beta=0.5, total_steps=4)
    loss.set_beta(sched(2))
    assert loss.beta.item() == pytest.approx(0.3)
    assert loss.state_dict()["beta"].item() == pytest.approx(0.3)


@pytest.mark.parametrize("name,params,match", [
    ("cosinus", {}, "unknown beta schedule 'cosinus'"),
    ("linear", {"end_beta": 0.0}, "end_beta must be > 0"),
    ("warmup_decay", {"warmup_steps": 100, "total_steps": 50}, "warmup_steps < total_steps"),
    ("step", {"gamma": 0.5}, "no parameter 'gamma'"),
])
def test_bad_schedules_name_the_field(name, params, match):
    with pytest.raises(ValueError, match=match):
        schedule(name, **params)
