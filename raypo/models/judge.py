"""A judge: a reward model that scores a prompt and a response in its own format.

    judge = load_judge("Skywork/Skywork-Reward-V2-Qwen3-0.6B", device="cuda", dtype="bfloat16")
    scores = judge.score(prompts, responses)       # (N,) float32 on the CPU

A reward model is a sequence classifier with one output (`AutoModelForSequenceClassification`,
`num_labels: 1`): the scalar read at the last token of the rendered conversation. It has its
own tokenizer, so a prompt and a response are rendered in the judge's chat format (its chat
template, the prompt's messages followed by the response as the assistant's turn), not the
policy's. A judge whose tokenizer has no chat template (cross-encoders such as DeBERTa reward
models) gets prompt and response as a text pair, `tokenizer(prompt, response)`, which puts its
own separator between them. A conversational prompt is then its messages' contents, one per
line.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from raypo.errors import RaypoError
from raypo.models.load import DTYPES, _from_pretrained, model_fingerprint

# The longest input the judge reads (the response's end is kept: the score is read there)
MAX_JUDGE_TOKENS = 4096


class JudgeError(RaypoError, ValueError):
    """A judge that cannot judge: the message names `judge.model` and what was expected."""


def reward_model_problem(config) -> str | None:
    """Why `config` is not a reward model's (a sequence classifier with one output), or None."""
    architectures = list(getattr(config, "architectures", None) or [])
    labels = getattr(config, "num_labels", None)
    if any(a.endswith("ForSequenceClassification") for a in architectures) and labels == 1:
        return None
    return (f"its config says architectures {architectures or 'none'} with num_labels "
            f"{labels}; a judge is a reward model: a sequence classifier with one output "
            "(AutoModelForSequenceClassification, num_labels: 1)")


def prompt_text(prompt: Any) -> str:
    """A prompt as plain text: itself, or a conversation's contents one per line."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(str(m.get("content", "")) for m in prompt)


class Judge:
    """A loaded reward model and its tokenizer, in eval mode on one device."""

    def __init__(self, model: nn.Module, tokenizer, name: str, fingerprint: str, log=print):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.fingerprint = fingerprint
        self.chat = bool(getattr(tokenizer, "chat_template", None))
        if tokenizer.pad_token is None:  # batches are padded; the score is read before the pad
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        model.config.pad_token_id = tokenizer.pad_token_id
        tokenizer.padding_side = "right"
        tokenizer.truncation_side = "left"  # keep the response's end, where the score is read
        limit = getattr(model.config, "max_position_embeddings", None) or MAX_JUDGE_TOKENS
        self.max_tokens = min(limit, MAX_JUDGE_TOKENS, tokenizer.model_max_length)
        if not self.chat:
            log(f"judge {name}: its tokenizer has no chat template; prompt and response are "
                "given to it as a text pair (tokenizer(prompt, response)), without chat markup")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def render(self, prompt: Any, response: str) -> str:
        """The conversation (prompt, response) in the judge's chat format (chat judges only)."""
        messages = (list(prompt) if not isinstance(prompt, str)
                    else [{"role": "user", "content": prompt}])
        return self.tokenizer.apply_chat_template(
            [*messages, {"role": "assistant", "content": response}], tokenize=False)

    def check_prompts(self, prompts: list) -> None:
        """JudgeError when the judge's tokenizer cannot render one of `prompts`."""
        for i, prompt in enumerate(prompts):
            try:
                ids = self.encode([prompt], ["a response"])["input_ids"]
            except Exception as e:  # a template's own raise_exception, a missing role, ...
                raise JudgeError(f"judge.model: {self.name}: its tokenizer cannot render "
                                 f"held-out prompt {i} ({str(prompt)[:80]!r}): "
                                 f"{type(e).__name__}: {' '.join(str(e).split())}") from None
            if ids.shape[1] == 0:
                raise JudgeError(f"judge.model: {self.name}: its tokenizer renders held-out "
                                 f"prompt {i} as no tokens")

    def encode(self, prompts: list, responses: list[str]) -> dict[str, torch.Tensor]:
        """The judge's padded input of each (prompt, response), as `score` reads it."""
        tok = self.tokenizer
        if self.chat:
            texts = [self.render(p, r) for p, r in zip(prompts, responses, strict=True)]
            # the template carries its special tokens
            return tok(texts, add_special_tokens=False, padding=True, truncation=True,
                       max_length=self.max_tokens, return_tensors="pt")
        return tok([prompt_text(p) for p in prompts], responses, padding=True,
                   truncation="longest_first", max_length=self.max_tokens, return_tensors="pt")

    @torch.no_grad()
    def score(self, prompts: list, responses: list[str], batch_size: int = 16) -> torch.Tensor:
        """(N,) float32 scores of each (prompt, response), on the CPU."""
        out = []
        for start in range(0, len(prompts), batch_size):
            batch = self.encode(prompts[start:start + batch_size],
                                 responses[start:start + batch_size])
            batch = {k: v.to(self.device) for k, v in batch.items()}
            out.append(self.model(**batch).logits[:, 0].float().cpu())
        return torch.cat(out) if out else torch.zeros(0)


def load_judge(name_or_path: str, *, device, dtype: str = "float32", log=print) -> Judge:
    """The reward model `name_or_path` (a local folder or a hub name) on `device`; JudgeError
    naming `judge.model` when it is not a reward model or cannot be loaded."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    try:
        config = _from_pretrained(AutoConfig.from_pretrained, "judge.model", name_or_path)
    except ValueError as e:
        raise JudgeError(" ".join(str(e).split())) from None
    problem = reward_model_problem(config)
    if problem:
        raise JudgeError(f"judge.model: {name_or_path} is not a reward model: {problem}")
    try:
        tokenizer = _from_pretrained(AutoTokenizer.from_pretrained, "judge.model", name_or_path)
        model = _from_pretrained(AutoModelForSequenceClassification.from_pretrained,
                                 "judge.model", name_or_path, dtype=DTYPES[dtype])
    except ValueError as e:
        raise JudgeError(" ".join(str(e).split())) from None
    model.to(device).eval().requires_grad_(False)
    return Judge(model, tokenizer, name_or_path, model_fingerprint(name_or_path, model), log=log)

