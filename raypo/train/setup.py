"""Everything a run needs before its first step, and everything runs share.

Data is tokenized once (cached by fingerprint); the reference outputs are computed once per
(model, dataset) and cached; on the built-in task the base model is fitted once (cached). A
search calls `prepare` once on the driver and every trial reads the caches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import datasets
import torch

from raypo.data.builtin import TaskSpec, preference_pairs
from raypo.data.collate import LengthGroupedBatches, collate
from raypo.data.preference import data_fingerprint, load_preferences
from raypo.data.tokenize import TokenizedPairs, tokenize_pairs
from raypo.losses import PreferenceLoss, build
from raypo.models.load import (
    Reference,
    load_policy,
    load_tokenizer,
    model_fingerprint,
    reference_of,
)
from raypo.train.base_model import fit_base_model
from raypo.train.config import TrainConfig
from raypo.train.forward import needs
from raypo.train.reference import (
    ReferenceOutputs,
    compute_reference,
    load_or_compute,
    reference_key,
)


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
    cache: dict = field(default_factory=dict)  # values computed once per run (ref_true_reward)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def task_spec(cfg: TrainConfig) -> TaskSpec:
    t = cfg.task
    return TaskSpec(variant=t.variant, train_pairs=t.train_pairs, eval_pairs=t.eval_pairs,
                    flip=t.flip, length_bias=t.length_bias, bt_temperature=t.bt_temperature,
                    seed=t.seed)


def _tokenize(cfg, rows_or_ds, tokenizer, fingerprint, source) -> TokenizedPairs:
    ds = rows_or_ds if isinstance(rows_or_ds, datasets.Dataset) else datasets.Dataset.from_list(
        rows_or_ds)
    return tokenize_pairs(ds, tokenizer, max_length=cfg.max_length,
                          max_prompt_length=cfg.max_prompt_length,
                          truncate_responses=cfg.truncate_responses, source=source,
                          data_fingerprint=fingerprint)


def build_loss(cfg: TrainConfig, policy) -> PreferenceLoss:
    params = dict(cfg.loss.params)
    if params.get("divergence") == "wasserstein" and "token_embeddings" not in params:
        # the ground cost between tokens: the model's own output embeddings
        params["token_embeddings"] = policy.get_output_embeddings().weight.detach()
    if cfg.loss.name in ("sparsepo",) or params.get("prior") == "sparsepo":
        params.setdefault("hidden_size", policy.config.hidden_size)
    if cfg.loss.name == "hmk_dpo":
        params.setdefault("dim", policy.config.hidden_size)
    return build(cfg.loss.name, **params)


def prepare(cfg: TrainConfig, log=print) -> Setup:
    import time

    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    tokenizer = load_tokenizer(cfg.model)
    spec = None
    if cfg.builtin:
        if cfg.model is not None:
            raise ValueError("the built-in task trains the tiny built-in model; "
                             "give `data` to train another model")
        spec = task_spec(cfg)
        base, fit = fit_base_model(spec, tokenizer, steps=cfg.task.base_steps, seed=cfg.seed,
                                   log=log)
        policy = base.to(device)
        model_fp = f"tiny-base-{fit}"
        train_pairs = _tokenize(cfg, preference_pairs(spec, "train"), tokenizer,
                                f"builtin-{spec.fingerprint()}-train", f"builtin:{spec.variant}")
        eval_pairs = _tokenize(cfg, preference_pairs(spec, "eval"), tokenizer,
                               f"builtin-{spec.fingerprint()}-eval", f"builtin:{spec.variant}")
    else:
        policy = load_policy(cfg.model, tokenizer=tokenizer, dtype=cfg.dtype, device=device,
                             lora=cfg.lora, seed=cfg.seed)
        model_fp = model_fingerprint(cfg.model, policy)
        ds = load_preferences(cfg.data)
        pairs = _tokenize(cfg, ds, tokenizer, data_fingerprint(cfg.data), cfg.data)
        train_pairs, eval_pairs = pairs.split(cfg.eval_fraction, seed=cfg.seed)
    loss_fn = build_loss(cfg, policy).to(device)
    want = needs(loss_fn.requires)
    want["embeddings"] = want["embeddings"] and cfg.embedding_source == "reference"
    # epsilon-DPO perturbs full-vocabulary reference logits: those are computed live by the
    # reference rather than cached (they would not fit on disk for a real vocabulary).
    live_reference = loss_fn.full_reference_logits
    want["ref_logits"] = want["ref_logits"] and not live_reference  # no top-k cache then
    start = time.perf_counter()
    ref_train, ref_eval = (
        _reference(cfg, policy, pairs, model_fp, want, device, tokenizer, log)
        for pairs in (train_pairs, eval_pairs))
    reference_seconds = time.perf_counter() - start
    # LoRA: the policy with adapters off; otherwise a frozen copy, made only when needed
    needs_live = live_reference or cfg.builtin  # the built-in task's KL estimate needs it too
    reference_model = reference_of(policy) if needs_live else None
    _fit_kernel(loss_fn, ref_train)
    return Setup(cfg=cfg, tokenizer=tokenizer, policy=policy, loss_fn=loss_fn,
                 train_pairs=train_pairs, eval_pairs=eval_pairs, ref_train=ref_train,
                 ref_eval=ref_eval, device=device, task=spec, reference_model=reference_model,
                 live_reference_logits=live_reference,
                 model_fingerprint=model_fp, reference_seconds=reference_seconds)


def _fit_kernel(loss_fn, ref: ReferenceOutputs) -> None:
    """Data-dependent kernels (Mahalanobis covariance, spectral eigenvectors) are fitted once
    on the reference embeddings of the training responses."""
    if hasattr(loss_fn, "fit") and ref.embeddings:
        embeddings = torch.cat([ref.embeddings["chosen"], ref.embeddings["rejected"]])
        loss_fn.fit(embeddings.to(next(loss_fn.parameters(), embeddings).device))


def _reference(cfg, policy, pairs, model_fp, want, device, tokenizer, log) -> ReferenceOutputs:
    topk = cfg.topk if want["ref_logits"] else None
    # kernels fitted to data need reference embeddings even when the loss uses the policy's
    embeddings = want["embeddings"] or (cfg.loss.name in ("kernel_dpo", "hmk_dpo"))
    flags = {"token_logps": want["token_logps"], "topk": topk, "hidden": want["ref_hidden"],
             "embeddings": embeddings}
    key = reference_key(model_fp, pairs.fingerprint, flags)

    def compute():
        log(f"reference outputs: computing for {len(pairs)} pairs (cached afterwards)")
        # no activations are kept for a backward pass: larger batches, better matmul use
        batches = LengthGroupedBatches(pairs.lengths(), 4 * cfg.batch_size, shuffle=False)
        return compute_reference(policy, pairs, batches,
                                 lambda p, idx: collate(p, idx, tokenizer.pad_token_id),
                                 token_logps=want["token_logps"], topk=topk,
                                 hidden=want["ref_hidden"], embeddings=embeddings, device=device)

    ref, cached = load_or_compute(key, compute)
    if cached:
        log(f"reference outputs: read from cache ({len(pairs)} pairs)")
    return ref
