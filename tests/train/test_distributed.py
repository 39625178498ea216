"""Many workers under Ray Train: two CPU workers follow the one-worker run of the same global
batch and seed (the issue's acceptance test), also across a resume, and the loss's own learnable
parameters get the gradient of the whole global batch as the policy's do under DDP."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from raypo.train.config import load_config
from raypo.train.distributed import average_loss_gradients, train_distributed
from raypo.train.loop import train
from raypo.train.setup import prepare

SMALL = ["task.train_pairs=64", "task.eval_pairs=16", "task.base_steps=50", "batch_size=8",
         "eval_samples=8", "eval_every=2", "loss=dpo"]
COMPARED = ("loss", "eval_loss", "pref_accuracy")


def quiet(message):
    pass


def assert_same_run(got: dict, want: dict, keys=COMPARED):
    for key in keys:
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), (got["step"], key)


def test_global_batch_must_split_evenly_across_workers():
    cfg = load_config(None, [*SMALL, "steps=4", "batch_size=9", "num_workers=2"])
    with pytest.raises(ValueError, match="batch_size 9.*num_workers 2"):
        train_distributed(cfg, trial_name="uneven", log=quiet)


@pytest.mark.slow
def test_two_workers_match_one_worker_with_the_same_global_batch(ray_session, tmp_path):
    single_history = []
    single = train(prepare(load_config(None, [*SMALL, "steps=6"]), log=quiet),
                   on_eval=lambda step, m: single_history.append(m))

    def two_workers(steps, messages, history):
        cfg = load_config(None, [*SMALL, f"steps={steps}", "num_workers=2"])
        return train_distributed(cfg, trial_name="two-workers", storage_path=str(tmp_path),
                                 log=messages.append, on_eval=lambda s, m: history.append(m))

    first_log, second_log, history, second_history = [], [], [], []
    first = two_workers(4, first_log, history)  # the first 4 steps of the 6-step run
    assert [row["step"] for row in history] == [2, 4]
    for got, want in zip(history, single_history[:2], strict=True):
        assert_same_run(got, want)
    assert_same_run(first, single_history[1])
    assert not any("resumed" in m for m in first_log)

    # the same trial name again, now to 6 steps: it goes on from its step-4 checkpoint
    second = two_workers(6, second_log, second_history)
    assert any("resumed from step 4" in m for m in second_log), second_log
    assert [row["step"] for row in second_history] == [2, 4, 6]
    assert second_history[:2] == history
    assert_same_run(second, single, (*COMPARED, "true_reward", "steps"))
    # a difference of two sequence log-probs (~10 each): float noise of 1e-6 shows at 1e-5
    assert second["kl"] == pytest.approx(single["kl"], abs=1e-5)


def _accumulate_on_rank(rank: int, world: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    torch.manual_seed(0)
    loss_fn = nn.Linear(3, 1)  # stands for a loss module's learnable parameters
    average_loss_gradients(loss_fn)
    for inputs in _shares(rank):  # two micro-batches: accumulated gradients too
        loss_fn(inputs).mean().backward()
    torch.save([p.grad for p in loss_fn.parameters()], f"{out}/{rank}.pt")
    dist.destroy_process_group()


def _shares(rank: int) -> list[torch.Tensor]:
    return [torch.arange(12.0).reshape(4, 3) * (rank + 1) + micro for micro in range(2)]


@pytest.mark.slow  # each spawned worker imports torch, ray.train and transformers (~10 s)
def test_loss_parameter_gradients_are_averaged_across_workers(tmp_path):
    mp.spawn(_accumulate_on_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    torch.manual_seed(0)
    alone = nn.Linear(3, 1)
    for rank in range(2):
        for inputs in _shares(rank):
            (alone(inputs).mean() / 2).backward()  # the mean over both workers' shares
    for rank in range(2):
        got = torch.load(tmp_path / f"{rank}.pt")
        for grad, want in zip(got, alone.parameters(), strict=True):
            torch.testing.assert_close(grad, want.grad)
