"""Loading the policy and tokenizer from a folder, the reference model, and fingerprints.

Every model here is the tiny one, saved to a temporary folder: nothing touches the network."""

from __future__ import annotations

import huggingface_hub.constants
import pytest
import torch

from raypo.models.load import (
    Reference,
    load_policy,
    load_tokenizer,
    model_fingerprint,
    reference_of,
)
from raypo.models.tiny import tiny_model, tiny_tokenizer


@pytest.fixture
def offline(monkeypatch):
    """No hub access: the env var for subprocesses, the constant for this one (read at import)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def saved(tmp_path, offline):
    """The tiny tokenizer and model (seed 3) saved as a Hugging Face folder."""
    tok = tiny_tokenizer()
    model = tiny_model(tok, seed=3)
    tok.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)
    return tmp_path, model


def batch(tok, texts=("Hello there!", "ab")):
    enc = tok(list(texts), return_tensors="pt", padding=True)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def train_one_step(model, inputs, lr=1e-2):
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr)
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    model.eval()


# ----------------------------------------------------------------------------- loading


def test_none_gives_the_tiny_tokenizer_and_model():
    tok = load_tokenizer(None)
    model = load_policy(None, tokenizer=tok, seed=3)
    reference = tiny_model(tiny_tokenizer(), seed=3)
    inputs = batch(tok)
    torch.testing.assert_close(logits(model, inputs), logits(reference, inputs), rtol=0, atol=0)
    assert not model.training


def test_saved_folder_loads_back_with_identical_logits(saved):
    path, original = saved
    tok = load_tokenizer(str(path))
    model = load_policy(str(path), tokenizer=tok)
    assert tok.get_vocab() == tiny_tokenizer().get_vocab()
    assert model.dtype == torch.float32
    inputs = batch(tok)
    torch.testing.assert_close(logits(model, inputs), logits(original, inputs), rtol=0, atol=0)


@pytest.mark.parametrize("name", [None, "saved"])
def test_bfloat16_policy_runs_close_to_float32(saved, name):
    path = str(saved[0]) if name else None
    tok = load_tokenizer(path)
    full = load_policy(path, tokenizer=tok, seed=3)
    half = load_policy(path, tokenizer=tok, dtype="bfloat16", seed=3)
    assert half.dtype == torch.bfloat16
    inputs = batch(tok)
    torch.testing.assert_close(logits(half, inputs).float(), logits(full, inputs),
                               rtol=0, atol=0.05)


def test_unknown_dtype_names_the_choices():
    with pytest.raises(ValueError, match="dtype='fp8'.*bfloat16"):
        load_policy(None, tokenizer=tiny_tokenizer(), dtype="fp8")


def test_missing_pad_token_becomes_eos(saved):
    path, _ = saved
    tok = tiny_tokenizer()
    tok.pad_token = None
    tok.save_pretrained(path)
    loaded = load_tokenizer(str(path))
    assert loaded.pad_token == loaded.eos_token == "<eos>"


def test_tokenizer_with_more_tokens_grows_the_embedding(saved):
    path, original = saved
    tok = load_tokenizer(str(path))
    tok.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    model = load_policy(str(path), tokenizer=tok)
    assert model.get_input_embeddings().weight.shape[0] == len(tok) == len(tiny_tokenizer()) + 1
    inputs = batch(tiny_tokenizer())  # old tokens keep their rows
    torch.testing.assert_close(logits(model, inputs)[..., :-1], logits(original, inputs))


def test_init_state_is_loaded(saved):
    _, trained = saved  # seed 3, loaded into a seed-0 model
    tok = tiny_tokenizer()
    model = load_policy(None, tokenizer=tok, seed=0, init_state=trained.state_dict())
    inputs = batch(tok)
    torch.testing.assert_close(logits(model, inputs), logits(trained, inputs), rtol=0, atol=0)


@pytest.mark.parametrize("loader", [load_tokenizer, load_policy])
def test_missing_local_path_is_named_in_the_error(tmp_path, offline, loader):
    missing = tmp_path / "no" / "such-model"
    kwargs = {"tokenizer": tiny_tokenizer()} if loader is load_policy else {}
    with pytest.raises(ValueError, match="name_or_path=.*no/such-model.*not an existing local"):
        loader(str(missing), **kwargs)


def test_unknown_hub_name_offline_is_named_in_the_error(offline):
    with pytest.raises(ValueError, match="load_tokenizer: name_or_path='nobody-xyz/no-model'"):
        load_tokenizer("nobody-xyz/no-model")


def test_folder_without_a_model_says_it_is_a_folder(tmp_path, offline):
    with pytest.raises(ValueError, match="is a local folder, but it could not be loaded"):
        load_policy(str(tmp_path), tokenizer=tiny_tokenizer())


# ----------------------------------------------------------------------------- reference


def test_reference_of_plain_model_is_frozen_at_creation():
    tok = tiny_tokenizer()
    policy = load_policy(None, tokenizer=tok)
    ref = reference_of(policy)
    inputs = batch(tok)
    at_init = logits(policy, inputs)
    torch.testing.assert_close(ref(**inputs).logits, at_init, rtol=0, atol=0)

    train_one_step(policy, inputs)
    assert not torch.allclose(logits(policy, inputs), at_init)
    torch.testing.assert_close(ref(**inputs).logits, at_init, rtol=0, atol=0)
    assert not ref.shares_policy
    assert all(not p.requires_grad for p in ref.model.parameters())


def test_reference_output_carries_no_graph():
    tok = tiny_tokenizer()
    ref = reference_of(load_policy(None, tokenizer=tok))
    assert not ref(**batch(tok)).logits.requires_grad


def test_released_reference_raises_a_clear_error():
    tok = tiny_tokenizer()
    ref = reference_of(load_policy(None, tokenizer=tok))
    ref.release()
    with pytest.raises(RuntimeError, match="released.*before release"):
        ref(**batch(tok))


def test_reference_as_context_manager_releases_on_exit():
    tok = tiny_tokenizer()
    with reference_of(load_policy(None, tokenizer=tok)) as ref:
        assert isinstance(ref, Reference)
        ref(**batch(tok))
    with pytest.raises(RuntimeError, match="released"):
        ref.model  # noqa: B018


def test_lora_without_peft_says_how_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "peft", None)  # makes `import peft` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'raypo\[lora\]'"):
        load_policy(None, tokenizer=tiny_tokenizer(), lora={"r": 4})


LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}


def test_lora_reference_is_the_policy_with_adapters_off():
    pytest.importorskip("peft")
    tok = tiny_tokenizer()
    inputs = batch(tok)
    base = logits(load_policy(None, tokenizer=tok, seed=1), inputs)
    policy = load_policy(None, tokenizer=tok, seed=1, lora=LORA)
    ref = reference_of(policy)
    assert ref.shares_policy and ref.model is policy  # no second copy

    train_one_step(policy, inputs, lr=0.5)
    policy.train()  # the reference must run in eval mode and leave the policy's mode alone
    assert not torch.allclose(logits(policy, inputs), base, atol=1e-4)
    torch.testing.assert_close(ref(**inputs).logits, base, rtol=0, atol=1e-6)
    assert policy.training
    ref.release()
    assert sum(p.requires_grad for p in policy.parameters()) > 0  # policy untouched


def test_lora_trains_only_the_adapters_and_is_seeded():
    pytest.importorskip("peft")
    tok = tiny_tokenizer()
    a = load_policy(None, tokenizer=tok, seed=1, lora=LORA)
    b = load_policy(None, tokenizer=tok, seed=1, lora=LORA)
    trainable = [n for n, p in a.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(p, q), n


def test_bad_lora_setting_is_named():
    pytest.importorskip("peft")
    with pytest.raises(ValueError, match="lora=.*rank"):
        load_policy(None, tokenizer=tiny_tokenizer(), lora={"rank": 4})


# ----------------------------------------------------------------------------- fingerprint


def test_tiny_fingerprint_follows_seed_and_weights():
    tok = tiny_tokenizer()
    fp = [model_fingerprint(None, load_policy(None, tokenizer=tok, seed=s)) for s in (0, 0, 1)]
    assert fp[0] == fp[1] != fp[2]
    assert len(fp[0]) == 64
    other = load_policy(None, tokenizer=tok, seed=1)
    other.load_state_dict(load_policy(None, tokenizer=tok, seed=0).state_dict())
    assert model_fingerprint(None, other) == fp[0]


def test_folder_fingerprint_changes_when_weights_are_rewritten(saved):
    path, _ = saved
    tok = load_tokenizer(str(path))
    model = load_policy(str(path), tokenizer=tok)
    before = model_fingerprint(str(path), model)
    assert model_fingerprint(str(path), load_policy(str(path), tokenizer=tok)) == before
    tiny_model(tok, seed=4).save_pretrained(path)
    assert model_fingerprint(str(path), model) != before


def test_fingerprint_depends_on_dtype(saved):
    path, _ = saved
    tok = load_tokenizer(str(path))
    fps = {model_fingerprint(str(path), load_policy(str(path), tokenizer=tok, dtype=d))
           for d in ("float32", "bfloat16")}
    assert len(fps) == 2


def test_fingerprint_depends_on_lora_settings(saved):
    pytest.importorskip("peft")
    path, _ = saved
    tok = load_tokenizer(str(path))
    fps = [model_fingerprint(str(path), load_policy(str(path), tokenizer=tok, lora=lora))
           for lora in (None, LORA, {**LORA, "r": 8})]
    assert len(set(fps)) == 3


def test_hub_fingerprint_uses_the_commit(saved):
    path, _ = saved
    model = load_policy(str(path), tokenizer=load_tokenizer(str(path)))
    model.config._commit_hash = "a" * 40
    first = model_fingerprint("org/model", model)
    model.config._commit_hash = "b" * 40
    assert model_fingerprint("org/model", model) != first
    assert model_fingerprint("org/other", model) != model_fingerprint("org/model", model)
