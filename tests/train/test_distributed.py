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
COMPARED = ("train_loss", "eval_loss", "pref_accuracy")


def quiet(message):
    pass


def assert_same_run(got: dict, want: dict, keys=COMPARED):
    for key in keys:
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), (got["step"], key)


def test_global_batch_must_split_evenly_across_workers():
    # refused with the config, before anything starts (issue 10)
    with pytest.raises(ValueError, match=r"batch_size \(9\) must be a multiple of "
                                         r"num_workers \(2\)"):
        load_config(None, [*SMALL, "steps=4", "batch_size=9", "num_workers=2"])


@pytest.mark.slow
def test_two_workers_match_one_worker_with_the_same_global_batch(ray_session, tmp_path):
    """DDP on two CPU workers against one worker (the resume of a multi-worker run is the FSDP
    test's: the same Ray Train restore); rank 0 writes the trained policy where a local
    report stages it, and it holds the one-worker run's weights."""
    from transformers import AutoModelForCausalLM

    from raypo.models.save import ModelSave

    single_history = []
    single_setup = prepare(load_config(None, [*SMALL, "steps=6"]), log=quiet)
    single = train(single_setup, on_eval=lambda step, m: single_history.append(m))
    cfg = load_config(None, [*SMALL, "steps=6", "num_workers=2"])
    messages, history = [], []
    save = ModelSave(tmp_path / "model")
    two = train_distributed(cfg, trial_name="two-workers", storage_path=str(tmp_path / "train"),
                            log=messages.append, on_eval=lambda s, m: history.append(m),
                            save=save)
    assert any("(DistributedDataParallel)" in m for m in messages), messages
    saved = AutoModelForCausalLM.from_pretrained(save.finish(cfg, {"status": "ok"}))
    want = single_setup.policy.state_dict()
    for name, weight in saved.state_dict().items():
        torch.testing.assert_close(weight, want[name], rtol=1e-4, atol=1e-6, msg=name)
    assert [row["step"] for row in history] == [2, 4, 6]
    for got, want in zip(history, single_history, strict=True):
        assert_same_run(got, want)
    assert_same_run(two, single, (*COMPARED, "true_reward", "steps"))
    # a difference of two sequence log-probs (~10 each): float noise of 1e-6 shows at 1e-5
    assert two["kl"] == pytest.approx(single["kl"], abs=1e-5)


def _accumulate_loss_gradients(rank: int) -> list[torch.Tensor]:
    """On an initialised process group: a loss module's learnable parameters (an nn.Linear
    stands for them) after two micro-batches of this rank's share, their gradients averaged
    across the workers by average_loss_gradients."""
    torch.manual_seed(0)
    loss_fn = nn.Linear(3, 1)
    average_loss_gradients(loss_fn)
    for inputs in _shares(rank):  # two micro-batches: accumulated gradients too
        loss_fn(inputs).mean().backward()
    return [p.grad for p in loss_fn.parameters()]


def _shares(rank: int) -> list[torch.Tensor]:
    return [torch.arange(12.0).reshape(4, 3) * (rank + 1) + micro for micro in range(2)]


def test_fsdp_with_lora_is_refused():
    with pytest.raises(ValueError, match="parallel: fsdp does not support lora"):
        load_config(None, ["parallel=fsdp", "lora={r: 4}"])


@pytest.mark.slow
@pytest.mark.parametrize("use_gpu", [
    False,  # Ray refuses FSDP without CUDA; raypo wraps with torch's FSDP itself (gloo)
    pytest.param(True, marks=pytest.mark.skipif(
        torch.cuda.device_count() < 2, reason="two CUDA devices needed (NCCL, Ray's FSDP)")),
], ids=["cpu-gloo", "gpu-nccl"])
def test_fsdp_workers_match_one_worker_also_across_a_resume(ray_session, tmp_path, use_gpu):
    """FSDP shards the policy: evaluation and sampling gather it (summon_full_params), the
    gradient norm spans the shards, a checkpoint holds the full policy and every rank's
    optimizer shard; none of it may change what is learned."""
    common = [*SMALL, f"use_gpu={str(use_gpu).lower()}"]
    single = train(prepare(load_config(None, [*common, "steps=4"]), log=quiet))

    def fsdp(steps, messages, history):
        cfg = load_config(None, [*common, f"steps={steps}", "num_workers=2", "parallel=fsdp"])
        return train_distributed(cfg, trial_name=f"fsdp-{use_gpu}", storage_path=str(tmp_path),
                                 log=messages.append, on_eval=lambda s, m: history.append(m))

    first_log, second_log, history = [], [], []
    fsdp(2, first_log, [])
    second = fsdp(4, second_log, history)  # resumes from the step-2 checkpoint
    assert any("resumed from step 2" in m for m in second_log), second_log
    assert any("(FullyShardedDataParallel)" in m for m in second_log), second_log
    assert [row["step"] for row in history] == [2, 4]
    assert_same_run(second, single, (*COMPARED, "true_reward", "steps", "grad_norm"))
    assert second["kl"] == pytest.approx(single["kl"], abs=1e-5)



def _ddp_rank(rank: int, world: int, init_file: str, out: str) -> None:
    """One gloo rank: the real loop on the tiny model under DDP, twice from the same start:
    as it runs (no_sync on all but a step's last micro-batch), then all-reducing every
    micro-batch (the loop before); what `_ddp_run` records, saved for the test."""
    import contextlib

    import raypo.train.loop as loop

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    results = {"once": _ddp_run()}
    loop.gradient_sync = lambda model, sync: contextlib.nullcontext()
    results["every"] = _ddp_run()
    results["loss_grads"] = _accumulate_loss_gradients(rank)
    torch.save(results, f"{out}/{rank}.pt")
    dist.destroy_process_group()


def _ddp_run() -> dict:
    """One run under DDP: before each optimizer step, the all-reduce rounds since the last
    (a round all-reduces every bucket once; a DDP comm hook sees each bucket) and the
    gradients the optimizer is about to apply."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    setup = prepare(load_config(None, [*SMALL, *DDP_RUN]), log=quiet)
    average_loss_gradients(setup.loss_fn)
    model = DistributedDataParallel(setup.policy)
    buckets, rounds, grads = [], [], []

    def count(state, bucket):
        state.append(bucket.is_last())
        return allreduce_hook(None, bucket)  # the default: all-reduce and average

    def before_step(optimizer, args, kwargs):
        rounds.append(sum(buckets))
        buckets.clear()
        grads.append([p.grad.clone() for group in optimizer.param_groups
                      for p in group["params"] if p.grad is not None])

    model.register_comm_hook(buckets, count)
    handle = register_optimizer_step_pre_hook(before_step)
    try:
        train(setup, forward_model=model)
    finally:
        handle.remove()
    return {"rounds": rounds, "grads": grads}


DDP_RUN = ["steps=2", "grad_accum=3", "eval_every=10", "eval_samples=2", "htsr=off"]


@pytest.mark.slow  # two spawned ranks import torch and transformers (~10 s)
def test_ddp_all_reduces_once_per_step_and_loss_parameters_get_the_global_gradient(tmp_path):
    """grad_accum micro-batches, one all-reduce round (every bucket once) per optimizer step,
    not one per micro-batch; the accumulated gradients the optimizer sees are those of
    all-reducing every micro-batch (to float noise). And the loss's own learnable parameters
    get the gradient of the whole global batch, as the policy's do under DDP."""
    prepare(load_config(None, [*SMALL, *DDP_RUN]), log=quiet)  # the caches, once, here
    mp.spawn(_ddp_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"{rank}.pt") for rank in range(2)]
    for got in ranks:
        assert got["once"]["rounds"] == [1, 1]  # steps=2
        assert got["every"]["rounds"] == [3, 3]  # grad_accum=3
        for once, every in zip(got["once"]["grads"], got["every"]["grads"], strict=True):
            assert len(once) == len(every) > 0
            for a, b in zip(once, every, strict=True):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    for a, b in zip(ranks[0]["once"]["grads"][-1], ranks[1]["once"]["grads"][-1], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # DDP: every rank the same
    torch.manual_seed(0)
    alone = nn.Linear(3, 1)
    for rank in range(2):
        for inputs in _shares(rank):
            (alone(inputs).mean() / 2).backward()  # the mean over both workers' shares
    for got in ranks:
        for grad, want in zip(got["loss_grads"], alone.parameters(), strict=True):
            torch.testing.assert_close(grad, want.grad)
