"""Everything a run needs before its first step, and everything runs share.

Data is tokenized once (cached by fingerprint); the reference outputs are computed once per
(model, dataset) and cached; on the built-in task the base model is fitted once (cached). A
search calls `prepare` once on the driver and every trial reads the caches.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch

from raypo.data.builtin import TaskSpec
from raypo.data.checks import check_split, drop_ties
from raypo.data.preference import data_fingerprint, load_preferences
from raypo.data.tokenize import TokenizedPairs, tokenize_pairs, tokenize_task
from raypo.losses import ModelFacts, Needs, PreferenceLoss, build, needs
from raypo.losses.batch import EMBEDDING_FIELDS
from raypo.models.encoder import encoder_embeddings, encoder_name
from raypo.models.judge import Judge, JudgeError, load_judge
from raypo.models.load import (
    Reference,
    enable_gradient_checkpointing,
    load_policy,
    load_tokenizer,
    model_fingerprint,
    reference_of,
)
from raypo.train.base_model import fit_base_model, fit_to_pairs
from raypo.train.builtin_judge import builtin_judge
from raypo.train.config import ConfigError, TrainConfig
from raypo.train.forward import outputs_for
from raypo.train.judging import JudgePrompts, judge_prompts, reference_judgement
from raypo.train.reference import ReferenceOutputs, reference_outputs


@dataclass
class Setup:
    cfg: TrainConfig
    tokenizer: Any
    policy: torch.nn.Module
    loss_fn: PreferenceLoss
    train_pairs: TokenizedPairs
    eval_pairs: TokenizedPairs
    ref_train: ReferenceOutputs
    ref_eval: ReferenceOutputs
    device: torch.device
    task: TaskSpec | None = None
    reference_model: Reference | None = None  # kept only where a loss or eval needs it
    live_reference_logits: bool = False  # full reference logits computed at every step
    model_fingerprint: str = ""
    reference_seconds: float = 0.0
    judge: Judge | None = None  # the reward model judging sampled responses (`judge:`)
    judge_prompts: JudgePrompts | None = None
    judge_reference: dict | None = None  # the reference's judged samples (raypo.train.judging)
    cache: dict = field(default_factory=dict)  # values computed once per run (ref_true_reward)
    # dtype: float16: float32 weights, the forward under float16 autocast (see `autocast`)
    autocast_dtype: torch.dtype | None = None

    def autocast(self):
        """The context every forward of the policy runs in (training, evaluation, the
        reference precompute): float16 autocast for `dtype: float16`, else nothing."""
        return _autocast(self.device, self.autocast_dtype)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def resolve_device(name: str, dtype: str = "float32") -> torch.device:
    """The device `name` ("auto": CUDA when available) means; ConfigError when `dtype` cannot
    train there. float16 trains only on CUDA, as mixed precision: float32 master weights, a
    float16 autocast forward and a gradient scaler (torch.amp.GradScaler), all CUDA-only in
    practice; pure float16 weights would lose small updates."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if dtype == "float16" and device.type != "cuda":
        raise ConfigError(f"dtype: float16 trains only on a CUDA device (float32 weights, "
                          f"float16 autocast, a gradient scaler), and this run's device is "
                          f"{device}; use dtype: bfloat16 (or float32) there")
    return device


def task_spec(cfg: TrainConfig) -> TaskSpec:
    t = cfg.task
    return TaskSpec(variant=t.variant, train_pairs=t.train_pairs, eval_pairs=t.eval_pairs,
                    flip=t.flip, length_bias=t.length_bias, bt_temperature=t.bt_temperature,
                    seed=t.seed)


def token_limits(cfg: TrainConfig) -> dict[str, Any]:
    """The config's limits on tokenized lengths, as raypo.data.tokenize.tokenize_pairs and
    tokenize_task take them."""
    return {"max_length": cfg.max_length, "max_prompt_length": cfg.max_prompt_length,
            "truncate_responses": cfg.truncate_responses}


def loss_needs(cfg: TrainConfig) -> Needs:
    """What the configured loss reads, without building it."""
    return needs(cfg.loss.name, **cfg.loss.params)


def model_facts(policy, embedding_dim: int | None = None) -> ModelFacts:
    """What a loss may need to know of `policy`. `embedding_dim`: the size of the embeddings
    a kernel sees (default: the policy's hidden size, which the policy and reference embedding
    sources have; an encoder has its own)."""
    hidden = policy.config.hidden_size
    embeddings = policy.get_output_embeddings().weight.detach()
    return ModelFacts(hidden_size=hidden, embedding_dim=embedding_dim or hidden,
                      vocab_size=int(embeddings.shape[0]), token_embeddings=embeddings)


def build_loss(cfg: TrainConfig, policy, embedding_dim: int | None = None) -> PreferenceLoss:
    """The configured loss, bound to what only the model (or the encoder) knows."""
    return build(cfg.loss.name, **cfg.loss.params).bind(model_facts(policy, embedding_dim))


def prepare(cfg: TrainConfig, log=print) -> Setup:
    import time

    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device, cfg.dtype)  # before any model loads
    # float16: float32 master weights under float16 autocast (the loop scales the loss);
    # bfloat16 and float32 weights load as named and run without autocast
    autocast_dtype = torch.float16 if cfg.dtype == "float16" else None
    weights_dtype = "float32" if autocast_dtype is not None else cfg.dtype
    tokenizer = _model_step(load_tokenizer, cfg.model)
    spec = None
    if cfg.builtin:
        if cfg.model is not None:
            raise ValueError("the built-in task trains the tiny built-in model; "
                             "give `data` to train another model")
        spec = task_spec(cfg)
        base, fit = fit_base_model(spec, tokenizer, steps=cfg.task.base_steps,
                                   seed=cfg.data_seed, log=log)
        policy = base.to(device)
        if cfg.lora is not None:  # adapters on the fitted base, as a user's model gets them
            policy = load_policy(None, tokenizer=tokenizer, dtype=next(base.parameters()).dtype,
                                 device=device, lora=cfg.lora, seed=cfg.seed,
                                 init_state=base.state_dict())
        model_fp = f"tiny-base-{fit}"
        train_pairs, eval_pairs = (tokenize_task(spec, split, tokenizer, **token_limits(cfg))
                                   for split in ("train", "eval"))
    else:
        # the data first: a dataset too small to batch or to hold out fails before a model
        # loads (raypo.data.checks)
        ds = drop_ties(load_preferences(cfg.data), cfg.data)
        pairs = tokenize_pairs(ds, tokenizer, **token_limits(cfg), source=cfg.data,
                               data_fingerprint=data_fingerprint(cfg.data))
        train_idx, eval_idx = pairs.split_indices(cfg.eval_fraction, seed=cfg.data_seed)
        train_pairs, eval_pairs = pairs.subset(train_idx), pairs.subset(eval_idx)
        eval_prompts_raw = ds.select(eval_idx)["prompt"]  # what a judge renders
        check_split(len(train_pairs), len(eval_pairs), batch_size=cfg.batch_size,
                    eval_fraction=cfg.eval_fraction, source=cfg.data,
                    prompts=len({tuple(p) for p in pairs.prompt_ids}))
        policy = _model_step(load_policy, cfg.model, tokenizer=tokenizer, dtype=weights_dtype,
                             device=device, lora=cfg.lora, seed=cfg.seed,
                             init_state=_fitted_tiny(cfg, tokenizer, train_pairs, log))
        model_fp = model_fingerprint(cfg.model, policy)
    if autocast_dtype is not None:  # the same weights give other reference outputs then
        model_fp += f"-autocast-{str(autocast_dtype).removeprefix('torch.')}"
    # the judge before the reference outputs: a judge that cannot judge fails in seconds
    judge, prompts = (_judge(cfg, spec, tokenizer, eval_pairs,
                             None if cfg.builtin else eval_prompts_raw, device, weights_dtype,
                             log) if cfg.judge is not None else (None, None))
    start = time.perf_counter()
    encoded = _encoder_embeddings(cfg, (train_pairs, eval_pairs), tokenizer, device, log)
    encoder_seconds = time.perf_counter() - start  # a precompute too: counted with the reference's
    loss_fn = build_loss(cfg, policy, encoded and encoded[0]["chosen"].shape[1]).to(device)
    declared = loss_needs(cfg)
    want = outputs_for(loss_fn.requires)
    # data-dependent kernels are fitted on reference embeddings even when the loss trains on
    # the policy's; an encoder brings its own
    want["embeddings"] = ((want["embeddings"] and cfg.embedding_source == "reference")
                          or (declared.fitted_embeddings
                              and encoder_name(cfg.embedding_source) is None))
    # Full-vocabulary reference logits (epsilon-DPO perturbs them) are computed live by the
    # reference rather than cached (they would not fit on disk for a real vocabulary).
    live_reference = declared.full_reference_logits
    want["ref_logits"] = want["ref_logits"] and not live_reference  # no top-k cache then
    start = time.perf_counter()
    with _autocast(device, autocast_dtype):  # the policy at step 0, as training computes it
        ref_train, ref_eval = (
            reference_outputs(policy, pairs, model_fingerprint=model_fp, want=want,
                              topk=cfg.topk, pad_id=tokenizer.pad_token_id, device=device,
                              chunk=cfg.logits_chunk, log=log)
            for pairs in (train_pairs, eval_pairs))
    reference_seconds = time.perf_counter() - start + encoder_seconds
    if encoded:  # the loss reads them where it reads the reference's (ReferenceOutputs.fields)
        ref_train.embeddings, ref_eval.embeddings = encoded
    # LoRA: the policy with adapters off; otherwise a frozen copy, made only when needed
    # the built-in task's and the judge's KL estimates need it too
    needs_live = live_reference or cfg.builtin or judge is not None
    reference_model = reference_of(policy) if needs_live else None
    if cfg.gradient_checkpointing:  # after the reference copy: the policy's own setting
        enable_gradient_checkpointing(policy)
    _fit_kernel(loss_fn, ref_train)
    setup = Setup(cfg=cfg, tokenizer=tokenizer, policy=policy, loss_fn=loss_fn,
                  train_pairs=train_pairs, eval_pairs=eval_pairs, ref_train=ref_train,
                  ref_eval=ref_eval, device=device, task=spec, reference_model=reference_model,
                  live_reference_logits=live_reference,
                  model_fingerprint=model_fp, reference_seconds=reference_seconds,
                  autocast_dtype=autocast_dtype, judge=judge, judge_prompts=prompts)
    if judge is not None:  # the reference's judged samples: once per search (cached)
        setup.judge_reference = reference_judgement(setup, log)
    return setup


def _judge(cfg, spec, tokenizer, eval_pairs, raw_prompts, device, dtype, log):
    """The judge on the trial's device and the prompts it judges; ConfigError naming
    `judge.model` when it cannot judge them."""
    try:
        if cfg.judge.builtin:
            judge = builtin_judge(spec, device=device, seed=cfg.data_seed, log=log)
        else:
            judge = load_judge(cfg.judge.model, device=device, dtype=dtype, log=log)
        prompts = judge_prompts(cfg, tokenizer, eval_pairs, raw_prompts, spec, log)
        judge.check_prompts(prompts.raw)
    except JudgeError as e:
        raise ConfigError(str(e)) from None
    return judge, prompts


def _fitted_tiny(cfg: TrainConfig, tokenizer, train_pairs: TokenizedPairs, log):
    """Own data and no model: the tiny model fitted to the training responses (cached), or
    None (a model was given; or sft_steps: 0, random weights, with a warning)."""
    if cfg.model is not None:
        return None
    if cfg.sft_steps == 0:
        log("warning: sft_steps: 0: the tiny model starts from random weights and is its own "
            "reference, so KL, implicit rewards and the selection metrics say little about "
            "your data; sft_steps > 0 fits it to the data's responses first")
        return None
    # data_seed, as the built-in base model: the reference stays fixed across training seeds
    return fit_to_pairs(train_pairs, tokenizer, steps=cfg.sft_steps, seed=cfg.data_seed,
                        log=log)


def _model_step(load, *args, **kwargs):
    """A model or tokenizer load whose failure is the config's `model` being wrong (a folder
    that is not a model, a hub name that does not resolve): ConfigError, on one line."""
    try:
        return load(*args, **kwargs)
    except ValueError as e:
        if "name_or_path=" not in str(e):
            raise
        raise ConfigError("model: " + " ".join(str(e).split())) from None


def _encoder_embeddings(cfg, splits, tokenizer, device, log) -> tuple[dict, ...] | None:
    """Per split, the frozen encoder embeddings (`embedding_source: encoder:NAME`) when the
    loss reads embeddings; None otherwise."""
    name = encoder_name(cfg.embedding_source)
    if name is None or not (loss_needs(cfg).fields & EMBEDDING_FIELDS):
        return None
    return tuple(encoder_embeddings(name, pairs, tokenizer, device=device, log=log)
                 for pairs in splits)


def _fit_kernel(loss_fn, ref: ReferenceOutputs) -> None:
    """Data-dependent kernels (Mahalanobis covariance, spectral eigenvectors) are fitted once
    on the embeddings the loss sees (the reference's, or the encoder's) of the training
    responses."""
    if hasattr(loss_fn, "fit") and ref.embeddings:
        embeddings = torch.cat([ref.embeddings["chosen"], ref.embeddings["rejected"]])
        loss_fn.fit(embeddings.to(next(loss_fn.parameters(), embeddings).device))
