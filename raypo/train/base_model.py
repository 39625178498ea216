"""Fit the tiny model to the built-in task's base distribution (cached by config hash).

This is the "SFT" stage of the controlled experiment: the reference and initial policy of every
run on the built-in task is this fitted model. Fitting takes seconds; the weights are cached
under RAYPO_CACHE/base_models/<hash>.pt, written atomically, so the runs of a search and every
later run share one fit.
"""

from __future__ import annotations

import torch

from raypo.data.builtin import TaskSpec, base_corpus
from raypo.data.cache import atomic_torch_save, cache_root, hash_json
from raypo.models.tiny import tiny_model

FIT_VERSION = 1


def _encode(tokenizer, prompt: str, response: str) -> tuple[list[int], int]:
    prompt_ids = [tokenizer.bos_token_id, *tokenizer(prompt, add_special_tokens=False).input_ids]
    response_ids = tokenizer(response, add_special_tokens=False).input_ids
    return prompt_ids + response_ids + [tokenizer.eos_token_id], len(prompt_ids)


def fit_key(spec: TaskSpec, steps: int, seed: int) -> str:
    # only what shapes the base distribution: every variant shares one fitted base model
    base = {"prompt_digits": spec.prompt_digits, "response_digits": spec.response_digits,
            "sorted_share": spec.sorted_share, "task_seed": spec.seed}
    return hash_json({"base": base, "steps": steps, "seed": seed, "v": FIT_VERSION})[:16]


def fit_base_model(spec: TaskSpec, tokenizer, steps: int = 400, seed: int = 0,
                   batch_size: int = 64, lr: float = 3e-3, log=None):
    """The tiny model fitted to the base distribution (from cache when it exists).

    Returns (model, key): `key` identifies the fit and is part of the reference cache key.
    """
    key = fit_key(spec, steps, seed)
    path = cache_root() / "base_models" / f"{key}.pt"
    model = tiny_model(tokenizer, seed=seed)
    if path.is_file():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval(), key
    g = torch.Generator().manual_seed(seed)
    corpus = base_corpus(spec, n=steps * batch_size // 4 + 1000)
    encoded = [_encode(tokenizer, x["prompt"], x["response"]) for x in corpus]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 20))
    model.train()
    for step in range(steps):
        picks = torch.randint(0, len(encoded), (batch_size,), generator=g).tolist()
        rows = [encoded[i] for i in picks]
        L = max(len(ids) for ids, _ in rows)
        ids = torch.full((batch_size, L), tokenizer.pad_token_id)
        labels = torch.full((batch_size, L), -100)
        for r, (seq, n_prompt) in enumerate(rows):
            ids[r, :len(seq)] = torch.tensor(seq)
            labels[r, n_prompt:len(seq)] = torch.tensor(seq[n_prompt:])  # loss on responses
        loss = model(input_ids=ids, attention_mask=(ids != tokenizer.pad_token_id).long(),
                     labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        sched.step()
        optimizer.zero_grad(set_to_none=True)
        if log and (step + 1) % 100 == 0:
            log(f"base model: step {step + 1}/{steps}, loss {loss.item():.3f}")
    atomic_torch_save(model.state_dict(), path)
    return model.eval(), key
