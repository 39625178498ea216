"""Load the policy, its tokenizer and its frozen reference; fingerprint the model for caches.

    tok = load_tokenizer("Qwen/Qwen2.5-0.5B")          # or None: the tiny built-in tokenizer
    policy = load_policy("Qwen/Qwen2.5-0.5B", tokenizer=tok, dtype="bfloat16", device="cuda",
                         lora={"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"})
    ref = reference_of(policy)       # frozen pi_ref: adapters off (LoRA) or a frozen copy
    ref_logits = ref(input_ids=ids, attention_mask=mask).logits
    ref.release()                    # before training: the reference is never held while training

`None` as the name everywhere means the tiny built-in model (raypo.models.tiny): nothing is
downloaded. LoRA needs the optional extra `pip install 'raypo[lora]'` (peft), imported lazily.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from raypo.models.tiny import tiny_model, tiny_tokenizer

DTYPES: dict[str, torch.dtype | str] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "auto": "auto",  # whatever the checkpoint's config says (hub models); float32 for tiny
}

# Short names accepted in the `lora` dict, mapped to peft.LoraConfig's own field names; any
# other key is passed to LoraConfig as it is.
LORA_ALIASES = {"alpha": "lora_alpha", "dropout": "lora_dropout"}

# Files whose size and mtime stand for a local checkpoint's weights in its fingerprint.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")

# Config keys that change with the library or the path, not with the model.
VOLATILE_CONFIG_KEYS = ("transformers_version", "_commit_hash", "_name_or_path")


# ----------------------------------------------------------------------------- tokenizer


def load_tokenizer(name_or_path: str | None):
    """The tokenizer for `name_or_path` (a local folder or a hub name; None: the tiny one).

    A missing pad token becomes the eos token, as TRL does (padding is masked out, so the
    choice of token does not matter); with no eos either, a new `<pad>` token is added and
    `load_policy` grows the embedding to match.
    """
    if name_or_path is None:
        return tiny_tokenizer()
    from transformers import AutoTokenizer

    tokenizer = _from_pretrained(AutoTokenizer.from_pretrained, "load_tokenizer", name_or_path)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
    return tokenizer


# ----------------------------------------------------------------------------- policy


def load_policy(
    name_or_path: str | None,
    *,
    tokenizer,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    lora: dict[str, Any] | None = None,
    seed: int = 0,
    init_state: dict[str, torch.Tensor] | None = None,
) -> nn.Module:
    """The policy to train, in eval mode (the trainer switches it to train mode).

    Args:
        name_or_path: local folder or hub name; None builds the tiny Llama for `tokenizer`.
        tokenizer: from `load_tokenizer`; the embedding grows if the tokenizer has more tokens.
        dtype: "float32" (default), "bfloat16", "float16", or "auto" (the checkpoint's own).
        device: where the model lives ("cpu", "cuda", "cuda:1", ...).
        lora: None for full fine-tuning, or LoRA settings, e.g. `{"r": 8, "alpha": 16,
            "dropout": 0.0, "target_modules": "all-linear"}`; other keys go to
            `peft.LoraConfig` unchanged. Needs `pip install 'raypo[lora]'`.
        seed: initialises the tiny model and the LoRA adapters (reproducible runs).
        init_state: a state dict loaded into the base model before LoRA wrapping, e.g. the
            tiny model fitted to the built-in task's base distribution.
    """
    torch_dtype = _torch_dtype(dtype)
    if name_or_path is None:
        model = tiny_model(tokenizer, seed=seed)
        if torch_dtype != "auto":
            model.to(dtype=torch_dtype)
    else:
        from transformers import AutoModelForCausalLM

        model = _from_pretrained(
            AutoModelForCausalLM.from_pretrained, "load_policy", name_or_path, dtype=torch_dtype)
    _fit_vocabulary(model, tokenizer)
    if init_state is not None:
        model.load_state_dict(init_state)
    model.to(device)
    if lora is not None:
        model = _wrap_lora(model, lora, seed)
    return model.eval()


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Hugging Face's gradient (activation) checkpointing on `model`, non-reentrant: each
    transformer block keeps only its input and recomputes its activations in the backward
    pass. It acts only in train mode with gradients on, so the reference (eval mode, no_grad;
    under LoRA the policy itself with adapters off) and generation (eval mode, with its cache)
    run as before. Non-reentrant checkpointing needs no `enable_input_require_grads` under
    LoRA (only the reentrant kind drops gradients when no input of a block requires one)."""
    kwargs = {"use_reentrant": False}
    # a PeftModel forwards both to its base model; transformers 5 renamed the method and
    # warns on the old name
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _torch_dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"load_policy: dtype={dtype!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def _fit_vocabulary(model: nn.Module, tokenizer) -> None:
    """Grow the embedding when the tokenizer has tokens the model lacks (an added pad token).

    Only grow: checkpoints often pad their embedding past the tokenizer's size (to a
    multiple of 64 for speed), and shrinking it would drop trained rows for nothing.
    """
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id


def _wrap_lora(model: nn.Module, lora: dict[str, Any], seed: int) -> nn.Module:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:
        raise ImportError(
            "load_policy: lora=... needs peft, an optional dependency: "
            "pip install 'raypo[lora]'") from exc
    settings = {LORA_ALIASES.get(key, key): value for key, value in lora.items()}
    try:
        config = LoraConfig(task_type="CAUSAL_LM", **settings)
    except TypeError as exc:
        raise ValueError(f"load_policy: lora={lora!r} is not a valid LoRA setting: {exc}") from exc
    # LoRA's A matrices are drawn at random: fork the RNG so the seed alone decides them
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return get_peft_model(model, config)


def _from_pretrained(load, caller: str, name_or_path: str, **kwargs):
    """`load(name_or_path)`, with an error that says which argument failed and why."""
    local = Path(name_or_path).expanduser()  # transformers itself does not expand "~"
    try:
        return load(str(local) if local.is_dir() else name_or_path, **kwargs)
    except (OSError, ValueError) as exc:
        where = ("a local folder, but it could not be loaded"
                 if local.is_dir()
                 else "not an existing local folder, and loading it as a Hugging Face hub name "
                      "failed (unknown name, or the hub cannot be reached)")
        raise ValueError(f"{caller}: name_or_path={name_or_path!r} is {where}: {exc}") from exc


# ----------------------------------------------------------------------------- reference


class Reference:
    """The frozen reference policy pi_ref, run under `torch.no_grad()` in eval mode.

    For a LoRA (peft) policy the reference is the policy itself with its adapters disabled
    (`with model.disable_adapter():`): the base weights are never trained, so no second
    copy is needed. For any other policy it is a frozen deep copy, taken now, so later
    optimizer steps on the policy do not reach it; that copy doubles the model's memory.

    The trainer therefore computes every reference output it needs once, before training
    (reference log-probabilities are shared by every trial of a search), then calls
    `release()`: the copy is dropped and the reference is never held during training.
    Calling a released reference raises RuntimeError. Used as a context manager, it
    releases itself on exit.
    """

    def __init__(self, policy: nn.Module):
        self.shares_policy = _is_peft_model(policy)
        if self.shares_policy:
            self._model: nn.Module | None = policy
        else:
            self._model = copy.deepcopy(policy).requires_grad_(False).eval()

    @property
    def model(self) -> nn.Module:
        """The module that runs the reference (the policy itself for LoRA)."""
        if self._model is None:
            raise RuntimeError(
                "Reference was released: compute reference outputs before release(), or "
                "make a new one with reference_of(policy)")
        return self._model

    def __call__(self, **model_inputs):
        model = self.model
        with torch.no_grad():
            if not self.shares_policy:
                return model(**model_inputs)
            was_training = model.training
            model.eval()
            try:
                with model.disable_adapter():
                    return model(**model_inputs)
            finally:
                model.train(was_training)

    @contextlib.contextmanager
    def unwrapped(self):
        """The reference as a module whose own methods may be called (`generate`): the frozen
        copy, or for LoRA the policy with its adapters off for the block."""
        model = self.model
        if not self.shares_policy:
            yield model
            return
        with model.disable_adapter():
            yield model

    def release(self) -> None:
        """Drop the reference (the frozen copy's memory is freed); later calls raise."""
        self._model = None

    def __enter__(self) -> Reference:
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


def reference_of(policy: nn.Module) -> Reference:
    """The reference model for `policy` as it is now (see `Reference`)."""
    return Reference(policy)


def _is_peft_model(model: nn.Module) -> bool:
    # a model can only be a PeftModel if peft was imported, so this never imports peft itself
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


# ----------------------------------------------------------------------------- fingerprint


def model_fingerprint(name_or_path: str | None, model: nn.Module) -> str:
    """sha256 (hex) naming the model for caches keyed by model (reference log-probabilities).

    Always the config (minus keys that change with the library version or the path) and
    the LoRA settings, if any, plus what identifies the weights without reading big files:
    - tiny model (None): the weights themselves, which are small; this covers the seed and
      any `init_state`.
    - local folder: the weight files' names, sizes and mtimes (not their contents: models
      are big; a rewritten checkpoint has a new mtime).
    - hub name: the name and the resolved commit (`config._commit_hash`) when known.
    """
    digest = hashlib.sha256()
    digest.update(_config_json(model).encode())
    digest.update(_lora_json(model).encode())
    if name_or_path is None:
        _hash_weights(digest, model)
    elif Path(name_or_path).expanduser().is_dir():
        digest.update(_weight_files_json(Path(name_or_path).expanduser()).encode())
    else:
        commit = getattr(model.config, "_commit_hash", None)
        digest.update(json.dumps({"hub": name_or_path, "commit": commit}).encode())
    return digest.hexdigest()


def _config_json(model: nn.Module) -> str:
    config = model.config.to_dict()
    for key in VOLATILE_CONFIG_KEYS:
        config.pop(key, None)
    return json.dumps(config, sort_keys=True, default=str)


def _lora_json(model: nn.Module) -> str:
    peft_config = getattr(model, "peft_config", None) if _is_peft_model(model) else None
    if not peft_config:
        return ""
    return json.dumps({name: cfg.to_dict() for name, cfg in peft_config.items()},
                      sort_keys=True, default=str)


def _hash_weights(digest, model: nn.Module) -> None:
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        # bytes of a float32 view: numpy has no bfloat16, and the dtype is hashed above
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())


def _weight_files_json(folder: Path) -> str:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    return json.dumps([(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files])
