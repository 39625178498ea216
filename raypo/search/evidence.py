"""The evidence the search starts from: selection metrics of a (model, dataset), before training.

    table = selection_table(cfg)   # one row per kernel-divergence pair, by predicted rank

The reference model (the only model there is before training) is run once over a seeded
subset of the training pairs (`max_pairs`), keeping what the metrics read: prompt/response
embeddings, per-token log-probs and top-k next-token distributions. Those outputs are cached on
disk by (model, data, subset) fingerprint through raypo.train.reference.reference_outputs,
like every other reference output, so a second call with the same inputs reads them back. The
preparation uses the same public functions as a run's set-up (raypo.train.setup.prepare):
tokenizing from raypo.data.tokenize, the reference outputs from raypo.train.reference. The
metrics and the rule themselves are pure functions in raypo.selection.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from pydantic import ValidationError

from raypo.data.checks import drop_ties
from raypo.data.preference import data_fingerprint, load_preferences
from raypo.data.tokenize import tokenize_pairs, tokenize_task
from raypo.losses import LOSSES, TopKLogits
from raypo.models.load import load_policy, load_tokenizer, model_fingerprint
from raypo.search.space import load_space
from raypo.selection.metrics import divergence_metrics, kernel_metrics
from raypo.selection.rule import rank_pairs
from raypo.train.base_model import fit_base_model
from raypo.train.config import (
    ConfigError,
    TrainConfig,
    format_validation_error,
    set_dotted,
)
from raypo.train.reference import ReferenceOutputs, reference_outputs
from raypo.train.setup import resolve_device, task_spec, token_limits

# The reference outputs the metrics read (the flags of raypo.train.reference.reference_outputs).
WANT = {"token_logps": True, "ref_logits": True, "ref_hidden": False, "embeddings": True}

# The config keys that decide the model, the data and the reference outputs: all the metrics
# depend on. The rest of a config or search space (loss, schedule, search sections) is ignored.
RELEVANT_KEYS = ("model", "data", "task", "max_length", "max_prompt_length",
                 "truncate_responses", "topk", "seed", "data_seed", "batch_size", "eval_fraction",
                 "dtype", "device", "lora")


@dataclass
class Evidence:
    """The reference outputs of the metric subset, and what describes them."""

    ref: ReferenceOutputs
    vocab_size: int
    model: str  # the model's name or path, or "builtin:tiny"
    data: str  # the dataset's path or name, or "builtin:<variant>"
    pairs: int  # pairs the metrics were computed on


def metrics_config(path: str | Path | None, *, model: str | None = None,
                   data: str | None = None, overrides: dict[str, Any] | None = None
                   ) -> TrainConfig:
    """The TrainConfig the metrics run on: the RELEVANT_KEYS of `path` (a training config or a
    search space, read by the space parser with `model` / `data` where given; its searched
    values are ignored: they fall back to their defaults; missing or None: defaults, i.e. the
    built-in task), then `overrides` (dotted keys already parsed). ConfigError names the file
    and the key."""
    source = str(path) if path is not None else "<config>"
    tree: dict = {}
    if path is not None:
        space = load_space(path, {"model": model, "data": data})
        tree = {k: v for k, v in copy.deepcopy(space.fixed).items() if k in RELEVANT_KEYS}
    for dotted, value in (overrides or {}).items():
        set_dotted(tree, dotted, value)
    if model is not None:
        tree["model"] = model
    if data is not None:
        tree["data"] = data
    try:
        return TrainConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(format_validation_error(source, e)) from None


def _subset(pairs, max_pairs: int, seed: int):
    """A seeded subset of at most `max_pairs` pairs, in dataset order (its fingerprint is
    derived from the indices, so the reference cache key follows it)."""
    if len(pairs) <= max_pairs:
        return pairs
    picked = np.random.default_rng(seed).choice(len(pairs), size=max_pairs, replace=False)
    return pairs.subset(sorted(picked.tolist()))


def collect_evidence(cfg: TrainConfig, *, max_pairs: int = 512, log=print) -> Evidence:
    """Run (or read from cache) the reference over a seeded subset of the training pairs.

    The same preparation as raypo.train.setup.prepare (tokenizer, base model or loaded model,
    tokenized training split), without a loss. Raises DataError for unusable data and
    ValueError for a model that cannot be loaded or a model without data.
    """
    if max_pairs < 2:
        raise ValueError(f"max_pairs must be >= 2 (the kernels' covariance needs two), "
                         f"got {max_pairs}")
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    if cfg.builtin:
        if cfg.model is not None:
            raise ValueError("the built-in task uses the tiny built-in model; give `data` to "
                             "compute metrics for another model")
        tokenizer = load_tokenizer(None)
        spec = task_spec(cfg)
        base, fit = fit_base_model(spec, tokenizer, steps=cfg.task.base_steps,
                                   seed=cfg.data_seed, log=log)
        policy, model_fp = base.to(device), f"tiny-base-{fit}"
        train = tokenize_task(spec, "train", tokenizer, **token_limits(cfg))
        model_name, data_name = "builtin:tiny", f"builtin:{spec.variant}"
    else:
        # data first: a bad dataset path is reported before a model is downloaded
        ds = drop_ties(load_preferences(cfg.data), cfg.data)
        tokenizer = load_tokenizer(cfg.model)
        policy = load_policy(cfg.model, tokenizer=tokenizer, dtype=cfg.dtype, device=device,
                             lora=cfg.lora, seed=cfg.seed)
        model_fp = model_fingerprint(cfg.model, policy)
        pairs = tokenize_pairs(ds, tokenizer, **token_limits(cfg), source=cfg.data,
                               data_fingerprint=data_fingerprint(cfg.data))
        train, _ = pairs.split(cfg.eval_fraction, seed=cfg.data_seed)
        model_name, data_name = cfg.model or "builtin:tiny", cfg.data
    subset = _subset(train, max_pairs, cfg.data_seed)
    ref = reference_outputs(policy, subset, model_fingerprint=model_fp, want=WANT,
                            topk=cfg.topk, pad_id=tokenizer.pad_token_id, device=device,
                            chunk=cfg.logits_chunk, log=log)
    vocab_size = int(policy.get_output_embeddings().weight.shape[0])
    return Evidence(ref=ref, vocab_size=vocab_size, model=model_name, data=data_name,
                    pairs=len(subset))


def _topk(ref: ReferenceOutputs, side: str) -> TopKLogits:
    # the cache holds log-probabilities (TopKLogits.from_logits): log_normalizer 0
    values = ref.topk_values[side]
    return TopKLogits(values, ref.topk_indices[side].long(), torch.zeros(values.shape[:-1]))


def evidence_metrics(evidence: Evidence) -> tuple[dict, dict]:
    """(kernel metrics, divergence metrics) of `evidence`, as raypo.selection.metrics computes
    them: the kernels on the reference's (prompt, chosen, rejected) embeddings, the divergence
    metrics on its per-token log-probs and top-k distributions."""
    ref = evidence.ref
    emb = ref.embeddings
    k_metrics = kernel_metrics(emb["prompt"].float(), emb["chosen"].float(),
                               emb["rejected"].float())
    d_metrics = divergence_metrics(
        chosen_token_logps=ref.token_logps["chosen"], chosen_lengths=ref.lengths["chosen"],
        rejected_token_logps=ref.token_logps["rejected"],
        rejected_lengths=ref.lengths["rejected"], chosen_topk=_topk(ref, "chosen"),
        rejected_topk=_topk(ref, "rejected"), vocab_size=evidence.vocab_size)
    return k_metrics, d_metrics


def selection_table(cfg: TrainConfig, *, max_pairs: int = 512, gamma: float | None = None,
                    log=print) -> pd.DataFrame:
    """One row per kernel-divergence pair (every candidate kernel x every candidate
    divergence of the registries: raypo.losses.kernel_candidates, divergence_candidates),
    sorted by `predicted_rank` (1 = best): the columns of raypo.selection.rule.rank_pairs
    (kernel, divergence, predicted_rank, score, confidence, kernel_* and divergence_*
    metrics), plus `model`, `data` and `metric_pairs` (how many pairs the metrics saw).
    `gamma`: the weight of the kernel margin the search trains with (default: the config's
    loss's, or the rule's default)."""
    evidence = collect_evidence(cfg, max_pairs=max_pairs, log=log)
    if gamma is None:
        gamma = kernel_weight(cfg.loss.name, cfg.loss.params)
    table = rank_pairs(*evidence_metrics(evidence), **({} if gamma is None else
                                                        {"gamma": gamma}))
    table["model"] = evidence.model
    table["data"] = evidence.data
    table["metric_pairs"] = evidence.pairs
    return table


def kernel_weight(loss: str, params: dict) -> float | None:
    """The weight of the kernel margin a loss built with `params` uses, for a loss that
    declares one (`kernel_weight_param`); None otherwise."""
    cls = LOSSES.get_class(loss)
    name = cls.kernel_weight_param
    if name is None:
        return None
    value = params.get(name, LOSSES.parameters(loss).get(name))
    return float(value) if isinstance(value, int | float) else None


def describe(table: pd.DataFrame) -> str:
    """A selection table as text: the kernel metrics (one row per kernel), the divergence
    metrics (one row per divergence), then the ranking of the pairs."""
    def block(prefix: str, key: str) -> pd.DataFrame:
        cols = [c for c in table.columns if c.startswith(prefix) and c != key]
        rows = table.drop_duplicates(key).set_index(key)[cols]
        return rows.rename(columns=lambda c: c.removeprefix(prefix)).sort_values(
            "score", ascending=False)

    ranking = table[["predicted_rank", "kernel", "divergence", "score"]]
    confidence = table["confidence"].iloc[0] if "confidence" in table else float("nan")
    head = f"model {table['model'].iloc[0]}, data {table['data'].iloc[0]}"
    if "metric_pairs" in table:
        head += f", {int(table['metric_pairs'].iloc[0])} pairs"
    with pd.option_context("display.width", 200, "display.max_columns", 50,
                           "display.float_format", "{:.4g}".format):
        return "\n\n".join([
            head,
            "kernel metrics:\n" + block("kernel_", "kernel").to_string(),
            "divergence metrics:\n" + block("divergence_", "divergence").to_string(),
            f"ranking (1 = predicted best; confidence that the top pick beats the 4th: "
            f"{confidence:.2f}, a prior: docs/selection.md):\n"
            + ranking.to_string(index=False),
        ])
