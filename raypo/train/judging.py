"""Judged evaluation: the policy's sampled responses scored by a reward model and compared with
the reference's, on the same held-out prompts, at every evaluation.

    prompts = judge_prompts(cfg, eval_pairs, raw_prompts)       # at set-up
    reference = reference_judgement(setup)                      # once per search (cached)
    metrics = judge_metrics(setup, policy)                      # at every evaluation

The metrics (one meaning each; README's column table):
- `judge_reward` (`_se`): the mean score of the policy's samples and its standard error;
- `judge_win_rate` (`_se`): the share of prompts on which the policy's sample outscores the
  reference's, ties counting half;
- `judge_lc_win_rate`: the win rate controlled for length (`length_controlled_win_rate`);
- `kl`: Monte-Carlo KL(policy || reference) from the same samples (exact in expectation at
  `temperature: 1` and `top_p: 1`, the defaults: otherwise the samples are not the policy's);
- `response_length`: the mean number of generated tokens (EOS included);
- `ref_judge_reward`: the reference samples' mean score (the same in every trial).

The reference's samples and their scores are computed once per search, with a seed derived from
`data_seed` (REFERENCE_SEED_OFFSET), and cached by the model, the prompts, the judge and the
generation settings: every trial and confirmation run compares with the same ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from raypo.data.builtin import eval_prompts
from raypo.data.cache import atomic_torch_save, cache_root, cached, hash_json
from raypo.train.evaluate import builtin_prompt_ids, response_texts, sample

# The reference samples' seed is data_seed + this: independent of every training seed a
# search draws (seed + 1 samples the policy), fixed across a confirmation's seeds.
REFERENCE_SEED_OFFSET = 1_000_003
JUDGED_VERSION = 1
# what judge_metrics returns (on the built-in task with the true reward's beside them)
JUDGED_METRICS = ("judge_reward", "judge_reward_se", "judge_win_rate", "judge_win_rate_se",
                  "judge_lc_win_rate", "ref_judge_reward", "kl", "response_length")
# ridge penalty of the length-controlled logistic fit: keeps it finite when every prompt is won
LC_RIDGE = 1e-2


@dataclass
class JudgePrompts:
    """The held-out prompts a judge reads: as the data gave them (text or messages, what the
    judge renders) and as the policy reads them (token ids)."""

    raw: list
    ids: list[list[int]]

    def fingerprint(self) -> str:
        return hash_json({"raw": self.raw, "ids": self.ids})


def judge_prompts(cfg, tokenizer, eval_pairs=None, raw_by_pair: list | None = None,
                  task=None, log=print) -> JudgePrompts:
    """`judge.prompts` held-out prompts: the built-in task's sampling prompts, or the distinct
    prompts of the held-out pairs in their order (`raw_by_pair`: each held-out pair's prompt as
    the data gave it)."""
    n = cfg.judge.prompts
    if task is not None:
        raw = eval_prompts(task, n)
        return JudgePrompts(raw, builtin_prompt_ids(tokenizer, raw))
    seen: dict[tuple, int] = {}
    for i, ids in enumerate(eval_pairs.prompt_ids):
        seen.setdefault(tuple(ids), i)
    picks = list(seen.values())[:n]
    if len(picks) < n:
        log(f"judge.prompts: {n} asked, the held-out split has {len(picks)} distinct prompts; "
            f"judging on those {len(picks)}")
    return JudgePrompts([raw_by_pair[i] for i in picks],
                        [list(eval_pairs.prompt_ids[i]) for i in picks])


def _generation(cfg) -> dict:
    j = cfg.judge
    return {"max_new_tokens": j.max_new_tokens, "temperature": j.temperature, "top_p": j.top_p,
            "batch_size": j.batch_size}


def _max_new_tokens(setup) -> int:
    """The judge's `max_new_tokens`; on the built-in task no more than its longest response
    and an EOS can use."""
    limit = setup.cfg.judge.max_new_tokens
    return min(limit, setup.task.response_digits[1] + 2) if setup.task is not None else limit


def _sampled(setup, model, seed: int, reference=None):
    gen = _generation(setup.cfg)
    gen["max_new_tokens"] = _max_new_tokens(setup)
    samples = sample(setup, model, setup.judge_prompts.ids, seed=seed, reference=reference,
                     **gen)
    texts = response_texts(setup, samples)
    scores = setup.judge.score(setup.judge_prompts.raw, texts, setup.cfg.judge.batch_size)
    return samples, texts, scores


def reference_judgement(setup, log=print) -> dict:
    """The reference's samples on the judge's prompts and their scores (cached): `scores`
    (N,), `lengths` (N,) and `texts`."""
    cfg = setup.cfg
    seed = cfg.data_seed + REFERENCE_SEED_OFFSET
    key = hash_json({"model": setup.model_fingerprint, "prompts": setup.judge_prompts.fingerprint(),
                     "judge": setup.judge.fingerprint, "generation": _generation(cfg),
                     "max_new_tokens": _max_new_tokens(setup), "seed": seed,
                     "dtype": cfg.dtype, "v": JUDGED_VERSION})
    path = cache_root() / "judged" / f"{key}.pt"
    if cached(path):
        return torch.load(path, weights_only=True)
    log(f"judge: sampling and scoring the reference's responses to "
        f"{len(setup.judge_prompts.ids)} held-out prompts (once; cached afterwards)")
    with setup.autocast(), setup.reference_model.unwrapped() as reference:
        samples, texts, scores = _sampled(setup, reference, seed)
    out = {"scores": scores, "lengths": samples.lengths, "texts": texts}
    atomic_torch_save(out, path)
    return out


def _se(values: torch.Tensor) -> float:
    n = len(values)
    return float(values.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")


def outcomes(policy: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per prompt: 1 where the policy's score is higher, 0 where lower, 1/2 on a tie."""
    return (policy > reference).float() + 0.5 * (policy == reference).float()


def length_controlled_win_rate(wins, length_diff) -> float:
    """The win rate at zero length difference: a logistic regression of the outcome (1, 1/2 or
    0) on tanh(length difference / its standard deviation), read at difference zero,
    sigmoid(intercept).

    AlpacaEval 2's length-controlled win rate (Dubois et al. 2024, arXiv 2404.04475) fits a
    GLM with this same length term and reads it at zero difference. Its other terms (the
    model's identity and each instruction's difficulty) need many models judged on each
    instruction; a search compares one policy with one reference per prompt, so the GLM keeps
    the intercept and the length term. A tiny ridge penalty (LC_RIDGE) keeps the fit finite
    when every prompt is won or lost. Without length differences it is the (ridge-shrunk) win
    rate.
    """
    y = np.asarray(wins, dtype=np.float64)
    d = np.asarray(length_diff, dtype=np.float64)
    sd = d.std()
    x = np.tanh(d / sd) if sd > 0 else np.zeros_like(d)
    design = np.stack([np.ones_like(x), x], axis=1)
    beta = np.zeros(2)
    for _ in range(50):  # Newton's method on the penalized log-likelihood
        p = 1 / (1 + np.exp(-design @ beta))
        grad = design.T @ (y - p) - LC_RIDGE * beta
        hess = design.T @ (design * (p * (1 - p))[:, None]) + LC_RIDGE * np.eye(2)
        step = np.linalg.solve(hess, grad)
        beta += step
        if np.abs(step).max() < 1e-10:
            break
    return float(1 / (1 + np.exp(-beta[0])))


@torch.no_grad()
def judge_metrics(setup, policy) -> dict[str, float]:
    """The judged metrics of `policy` (see the module's docstring); on the built-in task also
    its true reward on the same samples."""
    ref = setup.judge_reference
    samples, texts, scores = _sampled(setup, policy, setup.cfg.seed + 1,
                                      reference=setup.reference_model)
    wins = outcomes(scores, ref["scores"])
    out = dict(zip(JUDGED_METRICS, (
        float(scores.mean()), _se(scores), float(wins.mean()), _se(wins),
        length_controlled_win_rate(wins, samples.lengths - ref["lengths"]),
        float(ref["scores"].mean()), samples.kl(), float(samples.lengths.mean())),
        strict=True))
    if setup.task is not None:
        out["true_reward"] = sum(map(setup.task.true_reward, texts)) / len(texts)
        out["ref_true_reward"] = sum(map(setup.task.true_reward, ref["texts"])) / len(texts)
    return out

