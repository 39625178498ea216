"""Tokenizing preference pairs: ids checked by hand against the character-level tiny tokenizer,
length limits, the disk cache, and TokenizedPairs' helpers."""

from __future__ import annotations

import json
import logging

import datasets
import numpy as np
import pytest

from raypo.data import DataError, TokenizedPairs, load_preferences, tokenize_pairs
from raypo.data import tokenize as tokenize_module
from raypo.models.tiny import tiny_tokenizer

TOK = tiny_tokenizer()
VOCAB = TOK.get_vocab()
BOS, EOS = TOK.bos_token_id, TOK.eos_token_id
SYSTEM, USER, ASSISTANT, END = (VOCAB[t] for t in ("<|system|>", "<|user|>", "<|assistant|>",
                                                   "<|end|>"))


def chars(text: str) -> list[int]:
    """The tiny tokenizer is one token per character: ids by hand, from its vocabulary."""
    return [VOCAB[c] for c in text]


def text_data(*rows: tuple[str, str, str], fingerprint: str = "text-data") -> datasets.Dataset:
    ds = datasets.Dataset.from_dict(
        {"prompt": [r[0] for r in rows], "chosen": [r[1] for r in rows],
         "rejected": [r[2] for r in rows]}
    )
    ds._fingerprint = fingerprint
    return ds


def test_standard_row_is_bos_prompt_and_response_eos(tmp_path):
    pairs = tokenize_pairs(text_data(("2+2=", "4", "five")), TOK, cache_dir=tmp_path)
    assert chars("2") == [10]  # digits follow the 8 special tokens
    assert pairs.prompt_ids == [[BOS, *chars("2+2=")]]
    assert pairs.chosen_ids == [[*chars("4"), EOS]]
    assert pairs.rejected_ids == [[*chars("five"), EOS]]


def test_special_token_spellings_in_text_are_text_not_control_tokens(tmp_path):
    # text is text (issue 10): a "<bos>" or "<eos>" the data spells is those characters, so
    # data cannot forge a sequence start or end; raypo adds the one BOS and EOS itself
    pairs = tokenize_pairs(text_data(("<bos>hi", "a", "b<eos>")), TOK, cache_dir=tmp_path)
    assert pairs.prompt_ids == [[BOS, *chars("<bos>hi")]]
    assert pairs.rejected_ids == [[*chars("b<eos>"), EOS]]


def test_conversational_row_is_rendered_by_the_chat_template(tmp_path):
    row = {
        "prompt": [{"role": "system", "content": "be"}, {"role": "user", "content": "hi"}],
        "chosen": [{"role": "assistant", "content": "yo"}],
        "rejected": [{"role": "assistant", "content": "no"}],
    }
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(row) + "\n")
    pairs = tokenize_pairs(load_preferences(path), TOK, cache_dir=tmp_path)
    # "<|system|>be<|end|><|user|>hi<|end|><|assistant|>" then "yo<|end|>" + EOS
    assert pairs.prompt_ids == [[SYSTEM, *chars("be"), END, USER, *chars("hi"), END, ASSISTANT]]
    assert pairs.chosen_ids == [[*chars("yo"), END, EOS]]
    assert pairs.rejected_ids == [[*chars("no"), END, EOS]]


def conversational_data() -> datasets.Dataset:
    ds = datasets.Dataset.from_list([{
        "prompt": [{"role": "user", "content": "hi"}],
        "chosen": [{"role": "assistant", "content": "yo"}],
        "rejected": [{"role": "assistant", "content": "no"}],
    }])
    ds._fingerprint = "conversational-data"
    return ds


def test_conversational_data_without_chat_template_is_an_error(tmp_path):
    tok = tiny_tokenizer()
    tok.chat_template = None
    with pytest.raises(DataError, match=r"my-data, column 'prompt', row 0: .*no chat template"):
        tokenize_pairs(conversational_data(), tok, source="my-data", cache_dir=tmp_path)


def test_template_that_does_not_extend_the_prompt_is_an_error(tmp_path):
    tok = tiny_tokenizer()
    # the generation prompt ">" never appears in the rendered conversation
    tok.chat_template = (
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}>{% endif %}"
    )
    with pytest.raises(DataError, match=r"my-data, column 'chosen', row 0: .*as a prefix"):
        tokenize_pairs(conversational_data(), tok, source="my-data", cache_dir=tmp_path)


def test_response_that_tokenizes_to_nothing_is_an_error(tmp_path):
    tok = tiny_tokenizer()
    # renders only user turns and has no generation prompt: every response text is ""
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}"
        "{{ '<|user|>' + m['content'] }}{% endif %}{% endfor %}"
    )
    with pytest.raises(DataError, match=r"my-data, column 'chosen', row 0: .*no tokens"):
        tokenize_pairs(conversational_data(), tok, source="my-data", cache_dir=tmp_path)


def test_long_prompt_keeps_its_end_and_its_bos(tmp_path):
    pairs = tokenize_pairs(text_data(("abcdefgh", "x", "y")), TOK, max_prompt_length=4,
                           cache_dir=tmp_path)
    assert pairs.prompt_ids == [[BOS, *chars("fgh")]]


def test_too_long_response_is_an_error_naming_the_limit(tmp_path):
    data = text_data(("ab", "c", "d"), ("ab", "cd", "0123456789"))
    with pytest.raises(DataError) as err:
        tokenize_pairs(data, TOK, max_length=8, max_prompt_length=4, source="prefs.jsonl",
                       cache_dir=tmp_path)
    message = str(err.value)
    assert "prefs.jsonl, column 'rejected', row 1:" in message
    assert "prompt (3 tokens" in message and "response (11 tokens) = 14 tokens" in message
    assert "max_length=8" in message and "truncate_responses" in message


def test_truncate_responses_cuts_the_response_end_to_fit(tmp_path):
    data = text_data(("ab", "c", "d"), ("ab", "cd", "0123456789"))
    pairs = tokenize_pairs(data, TOK, max_length=8, max_prompt_length=4,
                           truncate_responses=True, cache_dir=tmp_path)
    assert pairs.rejected_ids[1] == chars("01234")  # 3 prompt + 5 = 8; EOS cut off
    assert pairs.chosen_ids[1] == [*chars("cd"), EOS]  # short enough: untouched
    assert pairs.lengths().max() == 8


def test_truncate_responses_with_no_room_left_is_still_an_error(tmp_path):
    data = text_data(("abcdef", "x", "y"))
    with pytest.raises(DataError, match=r"column 'chosen', row 0: .*not even one response token"):
        tokenize_pairs(data, TOK, max_length=4, max_prompt_length=4, truncate_responses=True,
                       cache_dir=tmp_path)


class EncodeCounter:
    """Wraps `_encode` to count how often text is actually tokenized."""

    def __init__(self, monkeypatch):
        self.calls = 0
        real = tokenize_module._encode

        def counted(tokenizer, texts):
            self.calls += 1
            return real(tokenizer, texts)

        monkeypatch.setattr(tokenize_module, "_encode", counted)


def test_cache_hit_returns_without_tokenizing(tmp_path, monkeypatch):
    data = text_data(("ab", "c", "d"), ("xy", "zz", "w"))
    first = tokenize_pairs(data, TOK, cache_dir=tmp_path)
    path = tmp_path / "tokenized" / f"{first.fingerprint}.pt"
    assert path.exists()
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left over

    counter = EncodeCounter(monkeypatch)
    again = tokenize_pairs(data, TOK, cache_dir=tmp_path)
    assert counter.calls == 0
    assert again == first


def test_cache_misses_when_tokenizer_limits_or_data_change(tmp_path, monkeypatch):
    data = text_data(("ab", "c", "d"))
    base = tokenize_pairs(data, TOK, cache_dir=tmp_path).fingerprint
    counter = EncodeCounter(monkeypatch)

    other_template = tiny_tokenizer()
    other_template.chat_template = "{{ messages }}"
    added_token = tiny_tokenizer()
    added_token.add_tokens(["<new>"])
    fingerprints = {
        tokenize_pairs(data, other_template, cache_dir=tmp_path).fingerprint,
        tokenize_pairs(data, added_token, cache_dir=tmp_path).fingerprint,
        tokenize_pairs(data, TOK, max_length=100, cache_dir=tmp_path).fingerprint,
        tokenize_pairs(data, TOK, max_prompt_length=10, cache_dir=tmp_path).fingerprint,
        tokenize_pairs(data, TOK, truncate_responses=True, cache_dir=tmp_path).fingerprint,
        tokenize_pairs(data, TOK, data_fingerprint="v2", cache_dir=tmp_path).fingerprint,
    }
    assert base not in fingerprints and len(fingerprints) == 6
    assert counter.calls == 6 * 3  # each one tokenized its prompts, chosen and rejected


def test_same_tokenizer_built_twice_hits_the_cache(tmp_path, monkeypatch):
    data = text_data(("ab", "c", "d"))
    tokenize_pairs(data, TOK, cache_dir=tmp_path)
    fresh = tiny_tokenizer()
    fresh(["abc"], padding=True, truncation=True, max_length=2)  # leaves state on the backend
    counter = EncodeCounter(monkeypatch)
    tokenize_pairs(data, fresh, cache_dir=tmp_path)
    assert counter.calls == 0


def test_cache_dir_defaults_to_raypo_cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYPO_CACHE", str(tmp_path / "env-cache"))
    pairs = tokenize_pairs(text_data(("ab", "c", "d")), TOK)
    assert (tmp_path / "env-cache" / "tokenized" / f"{pairs.fingerprint}.pt").exists()


def test_damaged_cache_file_is_a_miss(tmp_path, monkeypatch, caplog):
    data = text_data(("ab", "c", "d"))
    first = tokenize_pairs(data, TOK, cache_dir=tmp_path)
    (tmp_path / "tokenized" / f"{first.fingerprint}.pt").write_bytes(b"not a torch file")
    counter = EncodeCounter(monkeypatch)
    with caplog.at_level(logging.WARNING):
        assert tokenize_pairs(data, TOK, cache_dir=tmp_path) == first
    assert counter.calls == 3
    assert "unreadable tokenization cache" in caplog.text


def make_pairs() -> TokenizedPairs:
    return TokenizedPairs(
        prompt_ids=[[1, 10], [1, 11, 12], [1, 10], [1, 13]],
        chosen_ids=[[20, 2], [21, 2], [22, 23, 24, 2], [2]],
        rejected_ids=[[25, 26, 27, 2], [2], [28, 2], [29, 2]],
        fingerprint="f",
    )


def test_lengths_are_the_longer_side_of_each_pair():
    pairs = make_pairs()
    assert len(pairs) == 4
    assert pairs.response_lengths().tolist() == [4, 2, 4, 2]
    assert pairs.lengths().tolist() == [6, 5, 6, 4]


def test_subset_keeps_order_and_changes_fingerprint():
    pairs = make_pairs()
    sub = pairs.subset([3, 1])
    assert sub.prompt_ids == [[1, 13], [1, 11, 12]]
    assert sub.chosen_ids == [[2], [21, 2]]
    assert sub.rejected_ids == [[29, 2], [2]]
    assert sub.fingerprint not in (pairs.fingerprint, pairs.subset([1, 3]).fingerprint)


def test_split_is_deterministic_disjoint_and_keeps_prompts_together():
    rng = np.random.default_rng(0)
    prompts = [[1, int(rng.integers(8, 20))] for _ in range(200)]  # many shared prompts
    pairs = TokenizedPairs(prompts, [[2]] * 200, [[3, 2]] * 200, "f")
    train, held = pairs.split(0.2, seed=3)
    again_train, again_held = pairs.split(0.2, seed=3)
    assert (train.prompt_ids, held.prompt_ids) == (again_train.prompt_ids, again_held.prompt_ids)
    assert len(train) + len(held) == 200
    assert 30 <= len(held) <= 70
    assert not {tuple(p) for p in train.prompt_ids} & {tuple(p) for p in held.prompt_ids}
    assert pairs.split(0.2, seed=4)[1].prompt_ids != held.prompt_ids


def test_split_of_distinct_prompts_hits_the_fraction():
    pairs = TokenizedPairs([[1, i] for i in range(100)], [[2]] * 100, [[2]] * 100, "f")
    train, held = pairs.split(0.1, seed=0)
    assert (len(train), len(held)) == (90, 10)
    assert pairs.split(0.0)[1].prompt_ids == []


def test_dataset_without_explicit_prompt_column_is_an_error(tmp_path):
    ds = datasets.Dataset.from_dict({"chosen": ["a"], "rejected": ["b"]})
    with pytest.raises(DataError, match=r"raw: missing column\(s\) 'prompt'; present columns"):
        tokenize_pairs(ds, TOK, source="raw", cache_dir=tmp_path)
