"""A model's shape from its config alone, with no weights: what the memory plan reads
(raypo.train.plan).

    config = model_config("Qwen/Qwen2.5-0.5B-Instruct")     # or a folder; None: the tiny model
    shape = model_shape(config, dtype="bfloat16", lora={"r": 16})
    shape.params, shape.trainable, shape.layers, shape.vocab

The config is read the way `raypo.models.load` reads the model: a local folder if there is
one, else a Hugging Face hub name (its config.json only), and the tiny built-in model's config
for None. The parameters are counted on a model built on PyTorch's meta device (shapes and
dtypes, no storage), wrapped by peft exactly as `load_policy` wraps it, so tied embeddings,
biases and LoRA's targets come out as the real model has them.
"""

from __future__ import annotations

from dataclasses import dataclass

# A LoRA layer's input, shared by the projections that read the same tensor (a decoder block
# of the Llama family: attention input, attention output, MLP input, MLP's inner product).
# Under float32 without dropout the adapters read that one tensor; otherwise each has its own.
LORA_INPUT_GROUPS = {"q_proj": "attention", "k_proj": "attention", "v_proj": "attention",
                     "o_proj": "attention_output", "gate_proj": "mlp", "up_proj": "mlp",
                     "down_proj": "mlp_inner"}


@dataclass(frozen=True)
class LoraInput:
    """One LoRA-adapted linear layer: its block, its own name and its in-features."""

    block: str  # the module path without the projection's own name
    name: str  # q_proj, v_proj, ...
    features: int

    @property
    def group(self) -> str:
        """Which of its block's tensors it reads (LORA_INPUT_GROUPS; its own otherwise)."""
        return LORA_INPUT_GROUPS.get(self.name, self.name)


@dataclass(frozen=True)
class ModelShape:
    """Sizes and byte counts of a causal LM as it is trained (dtype, LoRA applied)."""

    params: int  # every parameter, tied ones once
    weight_bytes: int  # as loaded for training (the dtype's, adapters in their own)
    trainable: int  # parameters that get a gradient and AdamW moments
    trainable_bytes: int
    largest_trainable_bytes: int  # the largest single trainable tensor
    head_grad_bytes: int  # the output head's gradient (0 when the head is frozen)
    embedding_grad_bytes: int  # the input embedding's gradient (0 when it is frozen)
    linear_params: int  # weights of the linear layers, the output head included
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    model_type: str
    plain_head: bool = True  # the output head is a plain nn.Linear (not one LoRA adapts)
    lora_inputs: tuple[LoraInput, ...] = ()
    lora_rank: int = 0
    lora_dropout: float = 0.0
    lora_bytes: int = 4  # the adapters' element size (peft keeps them in float32)

    @property
    def lora(self) -> bool:
        return bool(self.lora_inputs)

    @property
    def lora_targets(self) -> list[str]:
        """The adapted projections' names (q_proj, v_proj, ...), in first-seen order."""
        return list(dict.fromkeys(x.name for x in self.lora_inputs))


def model_config(name_or_path: str | None):
    """The transformers config of the model `name_or_path` (see the module's docstring).
    ValueError naming the model when it cannot be read (no such folder, or a hub name that
    does not resolve or a hub that cannot be reached with nothing cached)."""
    if name_or_path is None:
        from raypo.models.tiny import tiny_llama_config, tiny_tokenizer

        return tiny_llama_config(len(tiny_tokenizer()))
    from transformers import AutoConfig

    from raypo.models.load import _from_pretrained

    return _from_pretrained(AutoConfig.from_pretrained, "model_config", name_or_path)


def _text_config(config):
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def _grad_bytes(weight) -> int:
    return weight.numel() * weight.element_size() if weight.requires_grad else 0


def model_shape(config, dtype: str = "float32", lora: dict | None = None) -> ModelShape:
    """The shape of the model `config` describes, loaded in `dtype` ("float32", "bfloat16";
    the caller maps float16 training to its float32 master weights) and wrapped with `lora`
    (raypo's `lora:` settings) when given."""
    import warnings

    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM

    from raypo.models.load import DTYPES, _wrap_lora

    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the libraries' deprecation notes: not the user's
        model = AutoModelForCausalLM.from_config(config).to(DTYPES[dtype])
        if lora is not None:
            model = _wrap_lora(model, lora, seed=0)
    params = list(model.parameters())  # tied parameters once
    trainable = [p for p in params if p.requires_grad]
    head = model.get_output_embeddings()
    plain_head = type(head) is nn.Linear
    head = getattr(head, "base_layer", head)
    embedding = model.get_input_embeddings()
    embedding = getattr(embedding, "base_layer", embedding)
    inputs, rank, dropout, lora_bytes = [], 0, 0.0, 4
    for name, module in model.named_modules():
        base = getattr(module, "base_layer", None)
        if base is None or not isinstance(base, nn.Linear) or not hasattr(module, "lora_A"):
            continue
        block, _, leaf = name.rpartition(".")
        inputs.append(LoraInput(block, leaf, base.in_features))
        adapter = next(iter(module.lora_A.values()))
        rank, lora_bytes = adapter.out_features, adapter.weight.element_size()
        drop = next(iter(module.lora_dropout.values()))
        dropout = float(getattr(drop, "p", 0.0))
    text = _text_config(config)
    heads = text.num_attention_heads
    return ModelShape(
        params=sum(p.numel() for p in params),
        weight_bytes=sum(p.numel() * p.element_size() for p in params),
        trainable=sum(p.numel() for p in trainable),
        trainable_bytes=sum(p.numel() * p.element_size() for p in trainable),
        largest_trainable_bytes=max((p.numel() * p.element_size() for p in trainable),
                                    default=0),
        head_grad_bytes=_grad_bytes(head.weight),
        embedding_grad_bytes=_grad_bytes(embedding.weight),
        linear_params=sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear)),
        layers=text.num_hidden_layers, hidden=text.hidden_size,
        intermediate=getattr(text, "intermediate_size", None) or 4 * text.hidden_size,
        heads=heads, kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        vocab=head.weight.shape[0], tied=bool(getattr(config, "tie_word_embeddings", False)),
        model_type=getattr(config, "model_type", "") or "", plain_head=plain_head,
        lora_inputs=tuple(inputs), lora_rank=rank, lora_dropout=dropout,
        lora_bytes=lora_bytes)


@dataclass(frozen=True)
class JudgeShape:
    """A reward model's sizes, as the memory plan reads them (raypo.train.plan)."""

    weight_bytes: int
    layers: int
    hidden: int
    intermediate: int


def judge_shape(config, dtype: str = "float32") -> JudgeShape:
    """The shape of the sequence classifier `config` describes, loaded in `dtype` (built on
    the meta device: its score head, not a language model's head, is counted)."""
    import warnings

    import torch
    from transformers import AutoModelForSequenceClassification

    from raypo.models.load import DTYPES

    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForSequenceClassification.from_config(config).to(DTYPES[dtype])
    text = _text_config(config)
    return JudgeShape(
        weight_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
        layers=text.num_hidden_layers, hidden=text.hidden_size,
        intermediate=getattr(text, "intermediate_size", None) or 4 * text.hidden_size)
