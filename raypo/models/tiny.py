"""The tiny default model: a character-level tokenizer and a small Llama, built in code.

Nothing is downloaded: the tokenizer is made with `tokenizers` from a fixed alphabet (printable
ASCII plus chat-role tokens) and wrapped as a `PreTrainedTokenizerFast` with a chat template,
so conversational data renders as it would for a hub model. The model is a
`LlamaForCausalLM` of about 330 thousand parameters: small enough that fitting it to the
built-in task's base distribution takes seconds on a laptop CPU, real enough that every code
path (chat template, attention masks, `logits_to_keep`, save/load) is the one a hub model uses.
"""

from __future__ import annotations

import string

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
ROLES = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
ALPHABET = string.digits + string.ascii_letters + string.punctuation + " \n"

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer over ALPHABET, with pad/bos/eos/unk and chat-role tokens."""
    specials = [PAD, BOS, EOS, UNK, *ROLES]
    vocab = {tok: i for i, tok in enumerate(specials + list(ALPHABET))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # every character is its own token; special tokens are matched before the split
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK,
        additional_special_tokens=list(ROLES), padding_side="right",
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_llama_config(vocab_size: int, hidden_size: int = 96, layers: int = 3,
                      heads: int = 4, intermediate_size: int = 256,
                      max_positions: int = 256) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=max_positions, tie_word_embeddings=True,
        rms_norm_eps=1e-5, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )


def tiny_model(tokenizer: PreTrainedTokenizerFast, seed: int = 0, **config) -> LlamaForCausalLM:
    """A freshly initialised tiny Llama for `tokenizer` (seeded, so runs are reproducible)."""
    import torch

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(tiny_llama_config(len(tokenizer), **config))
