"""What a training step does besides computing the loss: micro-batches averaged into one
reported loss, float16 refused where it cannot train, activations recomputed under gradient
checkpointing without changing a gradient, and the CUDA generators in a checkpoint."""

from __future__ import annotations

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from raypo.train.config import load_config
from raypo.train.loop import train
from raypo.train.setup import prepare
from tests.train.own_data import own_data

SMALL = ["task.train_pairs=64", "task.eval_pairs=16", "task.base_steps=50", "batch_size=8",
         "eval_samples=8", "htsr=off"]


def quiet(message):
    pass


def recording_steps():
    """(grads, handle): every optimizer step's gradients, recorded just before it steps (after
    clipping), in parameter order; `handle.remove()` ends the recording."""
    grads = []

    def record(optimizer, args, kwargs):
        grads.append([p.grad.detach().clone() for group in optimizer.param_groups
                      for p in group["params"] if p.grad is not None])

    return grads, register_optimizer_step_pre_hook(record)


def test_train_loss_is_the_mean_of_the_steps_micro_batches():
    """grad_accum micro-batches make one step: its train_loss is their mean (not the last
    one's), as the progress callback and the evaluation row report it."""
    cfg = load_config(None, [*SMALL, "steps=2", "eval_every=10", "grad_accum=2"])
    setup = prepare(cfg, log=quiet)
    micro, reported = [], []
    setup.loss_fn.register_forward_hook(lambda module, args, out: micro.append(out.loss.item()))

    def progress(step, loss):  # before the step's evaluation: only its micro-batches so far
        reported.append((loss, sum(micro) / len(micro), len(micro)))
        micro.clear()

    final = train(setup, progress=progress)
    assert len(reported) == 2
    for loss, mean, count in reported:
        assert count == 2 and loss == pytest.approx(mean, rel=1e-6)
    assert final["train_loss"] == reported[-1][0]


def test_float16_is_refused_on_the_cpu_before_a_model_loads(monkeypatch):
    """float16 trains as CUDA mixed precision (float32 weights, autocast, a gradient scaler);
    on a CPU the run stops at once and names bfloat16 (a ConfigError: the CLI exits 2)."""
    import raypo.train.setup as setup_module
    from raypo.train.config import ConfigError

    def must_not_load(*args, **kwargs):
        raise AssertionError("a model was loaded before the dtype was checked")

    monkeypatch.setattr(setup_module, "load_tokenizer", must_not_load)
    monkeypatch.setattr(setup_module, "fit_base_model", must_not_load)
    with pytest.raises(ConfigError, match=r"dtype: float16 .* cpu; use dtype: bfloat16"):
        prepare(load_config(None, [*SMALL, "dtype=float16", "device=cpu"]), log=quiet)


def checkpointing(model) -> bool:
    """Hugging Face's own flag (transformers 5 renamed it and warns on the old name)."""
    if hasattr(model, "activation_checkpointing_enable"):
        return model.is_activation_checkpointing
    return model.is_gradient_checkpointing


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_gradient_checkpointing_changes_no_loss_and_no_gradient(lora, tmp_path):
    """gradient_checkpointing: true recomputes the policy's activations in the backward pass:
    the same losses and gradients (float32); the reference and generation run as before (the
    built-in task samples from the policy and from the frozen reference copy; under LoRA the
    reference is the policy itself with adapters off)."""
    if lora:
        pytest.importorskip("peft")
        overrides = [*own_data(tmp_path), "lora={r: 4, alpha: 8, target_modules: all-linear}"]
    else:
        overrides = SMALL
    runs = []
    for enabled in (False, True):
        cfg = load_config(None, [*overrides, "steps=1", "grad_accum=2",
                                 f"gradient_checkpointing={str(enabled).lower()}"])
        setup = prepare(cfg, log=quiet)
        assert checkpointing(setup.policy) == enabled
        if setup.reference_model is not None and not setup.reference_model.shares_policy:
            assert not checkpointing(setup.reference_model.model)
        grads, handle = recording_steps()
        try:
            runs.append((train(setup), grads))
        finally:
            handle.remove()
    (plain, plain_grads), (recomputed, recomputed_grads) = runs
    compared = ["train_loss", "eval_loss", "pref_accuracy", "grad_norm"]
    if not lora:  # the built-in task: sampled from the policy and from the reference
        compared += ["true_reward", "ref_true_reward", "kl"]
    for key in compared:
        assert recomputed[key] == pytest.approx(plain[key], rel=1e-6, abs=1e-6), key
    assert len(plain_grads) == len(recomputed_grads) == 1
    for got, want in zip(recomputed_grads, plain_grads, strict=True):
        assert len(got) == len(want) > 0
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_a_checkpoint_carries_the_cuda_generators_and_restores_those_present(monkeypatch):
    """Beside the CPU generator, every CUDA device's; restored device i to device i for the
    devices both machines have; a checkpoint without them (a CPU run, an older one) restores
    the CPU's alone. CUDA is faked here: the calls, not the devices, are what is checked."""
    from raypo.train import checkpoint

    states = [torch.tensor([i], dtype=torch.uint8) for i in range(2)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: states)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.append)
    saved = checkpoint.rng_state()
    assert saved["cuda_rng"] == states and torch.equal(saved["rng"], torch.get_rng_state())

    for devices, expected in ((2, states), (1, states[:1]), (4, states)):
        restored.clear()
        monkeypatch.setattr(torch.cuda, "device_count", lambda n=devices: n)
        checkpoint.restore_rng(saved)
        assert restored == [expected], devices
    restored.clear()
    checkpoint.restore_rng({"rng": saved["rng"]})  # a checkpoint written without CUDA
    assert restored == []
