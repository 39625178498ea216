"""Preference pairs -> token ids (prompt, chosen, rejected), with length limits and a disk cache.

The ids follow TRL's DPOTrainer, so a model trained here sees what it would see there:

- standard text: prompt = BOS + tokens(prompt); response = tokens(response) + EOS;
- conversational: prompt = the chat template with the generation prompt (the assistant
  header); response = what the template renders after that prefix for prompt + response,
  + EOS unless it already ends with it. No special tokens are added to either: the template
  carries them.

Text is text: a prompt or response that contains a special token's spelling (`<|assistant|>`,
`<eos>`) is tokenized as those characters (`split_special_tokens`), never as the control
token, so data cannot forge a turn or an end of sequence. Only the chat template's own markup
yields control tokens: message contents are rendered as placeholders, the template's text
around them is tokenized with special tokens and the contents without. Tokens that become the
unknown token (characters a vocabulary lacks) are counted in one warning.

Prompt and responses are tokenized separately, so every response starts at a known position
after its prompt (what `collate` relies on), even where a joint tokenization would merge
tokens across the boundary.
"""

from __future__ import annotations

import itertools
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch

from raypo.data.builtin import TaskSpec, preference_pairs
from raypo.data.cache import atomic_torch_save, cache_root, cached, hash_json, tokenizer_fingerprint
from raypo.data.checks import warn_unknown
from raypo.data.errors import DataError
from raypo.data.formats import COLUMNS

log = logging.getLogger(__name__)

# Bump when the token ids this module produces for the same inputs change, so old caches miss.
TOKENIZE_VERSION = 2  # 2: special-token spellings in text are text


@dataclass
class TokenizedPairs:
    """Token ids of N preference pairs, and the fingerprint of how they were made.

    `prompt_ids[i]` is shared by `chosen_ids[i]` and `rejected_ids[i]`; no list is empty.
    """

    prompt_ids: list[list[int]]
    chosen_ids: list[list[int]]
    rejected_ids: list[list[int]]
    fingerprint: str

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def lengths(self) -> np.ndarray:
        """(N,) int: per pair, the longer of prompt+chosen and prompt+rejected (what a pair
        costs in a batch, so what length-grouped batching sorts by)."""
        return np.array([len(p) for p in self.prompt_ids], dtype=np.int64) + self.response_lengths()

    def response_lengths(self) -> np.ndarray:
        """(N,) int: per pair, the longer of the chosen and the rejected response."""
        return np.array(
            [max(len(c), len(r)) for c, r in zip(self.chosen_ids, self.rejected_ids, strict=True)],
            dtype=np.int64,
        )

    def subset(self, indices: Sequence[int]) -> TokenizedPairs:
        """The pairs at `indices`, in that order (fingerprint derived from ours and them)."""
        idx = [int(i) for i in indices]
        return TokenizedPairs(
            [self.prompt_ids[i] for i in idx],
            [self.chosen_ids[i] for i in idx],
            [self.rejected_ids[i] for i in idx],
            hash_json({"of": self.fingerprint, "subset": idx}),
        )

    def split(self, eval_fraction: float, seed: int = 0) -> tuple[TokenizedPairs, TokenizedPairs]:
        """(train, eval), eval about `eval_fraction` of the pairs, deterministic in `seed`
        (the pairs at `split_indices`)."""
        train_idx, eval_idx = self.split_indices(eval_fraction, seed)
        return self.subset(train_idx), self.subset(eval_idx)

    def split_indices(self, eval_fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
        """(train, eval) pair indices, eval about `eval_fraction` of the pairs, deterministic
        in `seed`.

        Pairs that share a prompt go to the same side, so held-out accuracy measures prompts
        the policy has not trained on. Within each side the original order is kept.
        """
        if not 0.0 <= eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, prompt in enumerate(self.prompt_ids):
            groups.setdefault(tuple(prompt), []).append(i)
        order = list(groups.values())
        order = [order[k] for k in np.random.default_rng(seed).permutation(len(order))]
        target = round(eval_fraction * len(self))
        if eval_fraction > 0:
            target = max(target, 1)
        eval_idx: list[int] = []
        for group in order:
            if len(eval_idx) >= target:
                break
            if len(eval_idx) + len(group) < len(self):  # keep at least one pair for training
                eval_idx.extend(group)
        held = set(eval_idx)
        return [i for i in range(len(self)) if i not in held], sorted(eval_idx)


def tokenize_pairs(
    dataset: datasets.Dataset,
    tokenizer: Any,
    *,
    max_length: int = 512,
    max_prompt_length: int = 256,
    truncate_responses: bool = False,
    source: str = "<dataset>",
    cache_dir: str | Path | None = None,
    data_fingerprint: str | None = None,
) -> TokenizedPairs:
    """Tokenize the prompt/chosen/rejected pairs of `dataset` (as `load_preferences` returns).

    Prompts longer than `max_prompt_length` tokens lose their beginning (the end of a prompt
    is what the response answers), except a leading BOS. If a prompt plus a response is still
    longer than `max_length`, that is a `DataError` unless `truncate_responses`, which cuts
    the response's end (keeping at least one token). `source` names the data in errors.

    The result is cached in `cache_dir/tokenized/<fingerprint>.pt` (`cache_dir` defaults to
    RAYPO_CACHE or ~/.cache/raypo); the fingerprint hashes the data fingerprint
    (`data_fingerprint`, else `dataset._fingerprint`), the tokenizer and the limits.
    """
    if max_prompt_length < 1 or max_length < 2:
        raise ValueError(
            f"need max_prompt_length >= 1 and max_length >= 2, got {max_prompt_length} and "
            f"{max_length}"
        )
    fingerprint = hash_json(
        {
            "version": TOKENIZE_VERSION,
            "data": data_fingerprint or dataset._fingerprint,
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "max_length": max_length,
            "max_prompt_length": max_prompt_length,
            "truncate_responses": truncate_responses,
        }
    )
    path = cache_root(cache_dir) / "tokenized" / f"{fingerprint}.pt"
    cached = _load(path, fingerprint)
    if cached is not None:
        return cached

    pairs = TokenizedPairs(
        *_tokenize(dataset, tokenizer, max_length, max_prompt_length, truncate_responses, source),
        fingerprint=fingerprint,
    )
    atomic_torch_save(_pack(pairs), path)
    return pairs


def tokenize_task(spec: TaskSpec, split: str, tokenizer: Any, **limits: Any) -> TokenizedPairs:
    """The built-in task's `split` ("train" or "eval") pairs (raypo.data.builtin
    .preference_pairs), tokenized by `tokenize_pairs` with `limits` (its `max_length`,
    `max_prompt_length`, `truncate_responses`) and cached under the task's fingerprint."""
    rows = datasets.Dataset.from_list(preference_pairs(spec, split))
    return tokenize_pairs(rows, tokenizer, **limits, source=f"builtin:{spec.variant}",
                          data_fingerprint=f"builtin-{spec.fingerprint()}-{split}")


def _tokenize(
    dataset: datasets.Dataset, tokenizer: Any, max_length: int, max_prompt_length: int,
    truncate_responses: bool, source: str,
) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
    """Prompt, chosen and rejected ids of every row, within the limits."""
    missing = [c for c in COLUMNS if c not in dataset.column_names]
    if missing:
        raise DataError.at(
            source, None, None,
            f"missing column(s) {', '.join(map(repr, missing))}; present columns: "
            f"{', '.join(map(repr, dataset.column_names))} (tokenize what load_preferences "
            f"returns: it makes implicit prompts explicit)",
        )
    if len(dataset) == 0:
        raise DataError.at(source, None, None, "the dataset has no rows")
    columns = dataset.select_columns(list(COLUMNS)).to_dict()
    if isinstance(columns["chosen"][0], str):
        prompts, chosen, rejected = _standard(columns, tokenizer)
    else:
        prompts, chosen, rejected = _conversational(columns, tokenizer, source)

    bos = tokenizer.bos_token_id
    prompts = [_keep_end(p, max_prompt_length, bos) for p in prompts]
    for i, p in enumerate(prompts):
        if not p:
            raise DataError.at(
                source, "prompt", i,
                "the prompt tokenizes to no tokens; the first response token must be "
                "predicted from at least one prompt token",
            )
    limits = (max_length, max_prompt_length, truncate_responses, source)
    chosen = _fit(prompts, chosen, "chosen", *limits)
    rejected = _fit(prompts, rejected, "rejected", *limits)
    warn_unknown({"prompt": prompts, "chosen": chosen, "rejected": rejected},
                 getattr(tokenizer, "unk_token_id", None), getattr(tokenizer, "unk_token", None),
                 source)
    return prompts, chosen, rejected


def _encode(tokenizer: Any, texts: list[str], text_only: bool = True) -> list[list[int]]:
    """Token ids of `texts`, with no special tokens added, no padding and no truncation;
    `text_only`: a special token's spelling in the text is text, not the control token."""
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=False, padding=False, truncation=False,
                     split_special_tokens=text_only)["input_ids"]


# Placeholders for message contents while a chat template renders (private-use characters,
# which no template rewrites and real text does not hold).
_HOLE = re.compile("\ue000([0-9]+)\ue001")


def _holes(messages: list[dict], offset: int = 0) -> list[dict]:
    return [{**m, "content": f"\ue000{offset + k}\ue001"} for k, m in enumerate(messages)]


def _encode_rendered(tokenizer: Any, rendered: str, contents: list[str]) -> list[int]:
    """Ids of a template rendering with placeholders: the template's text with its special
    tokens, each content as text only."""
    ids: list[int] = []
    pieces = _HOLE.split(rendered)  # template, index, template, index, ..., template
    for k, piece in enumerate(pieces):
        if k % 2:
            ids += _encode(tokenizer, [contents[int(piece)]])[0] if contents[int(piece)] else []
        elif piece:
            ids += _encode(tokenizer, [piece], text_only=False)[0]
    return ids


def _mentions_special(tokenizer: Any, messages: list[dict]) -> bool:
    specials = [t for t in getattr(tokenizer, "all_special_tokens", []) if t]
    return any(s in m["content"] for m in messages for s in specials)


def _keep_end(prompt: list[int], limit: int, bos: int | None) -> list[int]:
    """The last `limit` tokens of `prompt`; a leading BOS stays in front, since models are
    trained with it at position 0 and behave oddly without it."""
    if len(prompt) <= limit:
        return prompt
    if limit > 1 and bos is not None and prompt[0] == bos:
        return [bos, *prompt[len(prompt) - limit + 1:]]
    return prompt[len(prompt) - limit:]


def _with_eos(ids: list[list[int]], eos: int | None) -> list[list[int]]:
    # An empty response stays empty here, so that `_fit` reports it instead of training on a
    # lone EOS.
    if eos is None:
        return ids
    return [x if not x or x[-1] == eos else [*x, eos] for x in ids]


def _standard(columns: dict[str, list], tokenizer: Any):
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    prompts = [
        x if bos is None or x[:1] == [bos] else [bos, *x]
        for x in _encode(tokenizer, columns["prompt"])
    ]
    chosen = _with_eos(_encode(tokenizer, columns["chosen"]), eos)
    rejected = _with_eos(_encode(tokenizer, columns["rejected"]), eos)
    return prompts, chosen, rejected


def _conversational(columns: dict[str, list], tokenizer: Any, source: str):
    if not getattr(tokenizer, "chat_template", None):
        raise DataError.at(
            source, "prompt", 0,
            f"the data is conversational (message lists) but the tokenizer "
            f"({type(tokenizer).__name__}) has no chat template to render it; use a chat "
            f"model's tokenizer or set tokenizer.chat_template",
        )
    prompt_texts: list[str] = []
    responses: dict[str, list[str]] = {"chosen": [], "rejected": []}
    literal: dict[int, dict[str, list[int]]] = {}  # rows whose contents spell special tokens
    for i, prompt in enumerate(columns["prompt"]):
        messages = prompt + columns["chosen"][i] + columns["rejected"][i]
        if _mentions_special(tokenizer, messages):
            literal[i] = _conversational_row(tokenizer, prompt, columns, i, source)
            prompt_texts.append("")
            for texts in responses.values():
                texts.append("")
            continue
        prompt_text = tokenizer.apply_chat_template(
            prompt, tokenize=False, add_generation_prompt=True
        )
        prompt_texts.append(prompt_text)
        for column, texts in responses.items():
            full = tokenizer.apply_chat_template(prompt + columns[column][i], tokenize=False)
            texts.append(_response_text(prompt_text, full, column, i, source))
    eos = tokenizer.eos_token_id
    # the template's own markup must stay control tokens: no split here
    ids = {"prompt": _encode(tokenizer, prompt_texts, text_only=False),
           **{c: _encode(tokenizer, t, text_only=False) for c, t in responses.items()}}
    for i, row in literal.items():
        for column, row_ids in row.items():
            ids[column][i] = row_ids
    return (
        ids["prompt"],
        _with_eos(ids["chosen"], eos),
        _with_eos(ids["rejected"], eos),
    )


def _response_text(prompt_text: str, full: str, column: str, i: int, source: str) -> str:
    if not full.startswith(prompt_text):
        raise DataError.at(
            source, column, i,
            "the chat template does not render the prompt (with its generation "
            "prompt) as a prefix of prompt + response, so the response cannot be cut "
            f"out; prompt renders as {prompt_text[-80:]!r}, prompt + response as "
            f"{full[:len(prompt_text) + 40][-120:]!r}",
        )
    return full[len(prompt_text):]


def _conversational_row(tokenizer: Any, prompt: list[dict], columns: dict[str, list], i: int,
                        source: str) -> dict[str, list[int]]:
    """Prompt and response ids of a row whose contents spell special tokens, rendered with
    placeholders so those spellings stay text."""
    contents = [m["content"] for m in prompt]
    prompt_text = tokenizer.apply_chat_template(_holes(prompt), tokenize=False,
                                                add_generation_prompt=True)
    out = {"prompt": _encode_rendered(tokenizer, prompt_text, contents)}
    for column in ("chosen", "rejected"):
        response = columns[column][i]
        full = tokenizer.apply_chat_template(
            _holes(prompt) + _holes(response, len(prompt)), tokenize=False)
        text = _response_text(prompt_text, full, column, i, source)
        out[column] = _encode_rendered(tokenizer, text,
                                       contents + [m["content"] for m in response])
    return out


def _fit(
    prompts: list[list[int]], responses: list[list[int]], column: str,
    max_length: int, max_prompt_length: int, truncate: bool, source: str,
) -> list[list[int]]:
    """Check each response against `max_length`, cutting its end when `truncate`."""
    out = []
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        if not r:
            raise DataError.at(source, column, i, "the response tokenizes to no tokens")
        room = max_length - len(p)
        if len(r) > room:
            what = (
                f"prompt ({len(p)} tokens, after truncation to max_prompt_length="
                f"{max_prompt_length}) + response ({len(r)} tokens) = {len(p) + len(r)} tokens "
                f"exceeds max_length={max_length}"
            )
            if not truncate:
                raise DataError.at(
                    source, column, i,
                    f"{what}; pass truncate_responses=True to cut responses to fit, or raise "
                    f"max_length",
                )
            if room < 1:
                raise DataError.at(
                    source, column, i,
                    f"{what}, and not even one response token fits; raise max_length above "
                    f"max_prompt_length",
                )
            r = r[:room]
        out.append(r)
    return out


def _pack(pairs: TokenizedPairs) -> dict[str, Any]:
    """Flat int32 tensors + offsets: compact, and loadable with `weights_only=True`."""
    packed: dict[str, Any] = {"version": TOKENIZE_VERSION, "fingerprint": pairs.fingerprint}
    for name, ids in (("prompt", pairs.prompt_ids), ("chosen", pairs.chosen_ids),
                      ("rejected", pairs.rejected_ids)):
        sizes = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32,
                           count=int(sizes.sum()))
        packed[name] = torch.from_numpy(flat)
        packed[f"{name}_offsets"] = torch.from_numpy(np.concatenate([[0], np.cumsum(sizes)]))
    return packed


def _load(path: Path, fingerprint: str) -> TokenizedPairs | None:
    if not cached(path):
        return None
    try:
        packed = torch.load(path, weights_only=True)
        if packed["version"] != TOKENIZE_VERSION or packed["fingerprint"] != fingerprint:
            return None
        lists = []
        for name in ("prompt", "chosen", "rejected"):
            flat = packed[name].tolist()
            offsets = packed[f"{name}_offsets"].tolist()
            lists.append([flat[a:b] for a, b in itertools.pairwise(offsets)])
        return TokenizedPairs(*lists, fingerprint=fingerprint)
    except Exception as e:  # a damaged cache file is only a cache miss
        log.warning("ignoring unreadable tokenization cache %s: %s", path, e)
        return None
