"""A trial's peak device memory, estimated from the model's config before the trial starts.

    plan = estimate(cfg)                     # cfg: a TrainConfig; the model's config is read
    print(plan.describe(available=24e9))     # the parts, the total, what to change
    check(plan, 24e9, "resources.gpu_memory_gb: 24")   # PlanError (exit 2) if it cannot fit

What one training step holds, per worker, with R = 2 x batch_size / workers rows of
S = max_length tokens (the most a micro-batch can hold; T = R x S tokens, N = R x (S - 1)
response tokens at most), L layers, hidden h, attention q = heads x head_dim and
kv = kv_heads x head_dim, MLP width i, vocabulary V, b bytes per activation (float32 4,
bfloat16 and float16 2):

- weights: the parameters as loaded (float16 trains float32 master weights, plus the float16
  copies of the linear weights that autocast makes and the backward keeps);
- gradients: one per trainable parameter, in its dtype (LoRA adapters are float32: peft
  keeps them so); under DDP its gradient buckets, another copy;
- optimizer: AdamW's two moments per trainable parameter, in the parameter's dtype;
  during `step` one more copy (the foreach implementation's sqrt of the second moment on
  a GPU; the largest tensor's temporaries on the CPU);
- activations: what autograd saves in the forward, per token and layer for a Llama-family
  block (RMSNorm, attention through SDPA, which saves no S x S scores, SwiGLU MLP),
  counted tensor by tensor and checked against autograd's saved tensors:
  full fine-tuning b (4h + 2q + 2kv + 4i) + 4 (2h + heads + 2);
  LoRA (frozen base weights save no inputs) 8h + b (2q + 2kv + 3i) + 4 heads + 8, plus each
  adapter's input (its own float32 copy, or the block's tensor under float32 without
  dropout; dropout adds its mask) and its rank-r output;
  with gradient checkpointing (Hugging Face's, non-reentrant) each layer keeps only its
  input (b h per token) and one layer's activations are alive while it is recomputed;
  outside the layers the final norm (8h + 12 bytes per token, 4h + 4 under LoRA) and the
  last hidden states of the response tokens (N x h x b) that the log-probs read;
- logits chunk: the output head runs on `logits_chunk` response tokens at a time and each
  chunk's logits are recomputed in the backward (raypo.train.forward), so only one chunk's
  vocabulary-sized tensors live at a time. A plain linear head and a loss that reads only
  log-probs (dpo and most others) take one vocabulary block at a time (`vocab_block`: the
  whole vocabulary on a GPU) in one float32 buffer, and under bfloat16 or float16 the
  block's logits or their gradient in that dtype beside it, on the CPU with a float32
  product too (`fused_chunk_bytes`); a frozen head (LoRA elsewhere) keeps E_p[W]
  (N x h float32) instead of recomputing. A loss with token
  terms (divergences, tdpo, epsilon_dpo) or a head LoRA adapts: at the chunk backward's peak
  CHUNK_COPIES float32 copies of chunk x V (the recomputed logits, the gather's gradient,
  logsumexp's backward), measured, under bfloat16 or float16 the logits in that dtype too,
  and the previous chunk's logits gradient, which the chunk loop still holds
  (`chunk_bytes`). Both: plus the gradient of the hidden states it flows into
  (2 x N x h x b). The head's weight gradient (V x h) is alive through the chunks' backward
  and, with tied embeddings, until the embedding's;
- reference copy: a frozen copy of the policy (losses that read full reference logits,
  epsilon_dpo, and the built-in task), never under LoRA (the policy with adapters off), and
  its hidden states at the response tokens for the live reference logits. The cached
  reference log-probs are not held on the device;
- headroom: on a GPU HEADROOM_FRACTION of the peak plus HEADROOM_BYTES (the CUDA context,
  the caching allocator's slack); on the CPU CPU_HEADROOM_BYTES (its runtime's buffers).

The peak is the largest of three moments: the backward's start (weights, reference, moments,
activations, the chunk, and the gradients alive then: the output head's, and with
grad_accum > 1 all those of the earlier micro-batches), the input embedding's backward (its
dense gradient beside the head's and the accumulated ones) and the optimizer step (weights,
reference, every gradient, the moments and the step's temporaries).

The test (tests/train/test_plan.py) checks the peak against measured CPU peaks of raypo's
own training steps on shapes the constants were not fitted on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from raypo.models.shape import JudgeShape, ModelShape, judge_shape, model_config, model_shape
from raypo.train.config import ConfigError, TrainConfig

GB = 1e9  # decimal gigabytes, as GPUs are sold (an A10G's "24 GB" is 24.1e9 bytes)
CHUNK_COPIES = 5  # float32 chunk x vocabulary tensors alive at the chunk backward's peak
HEADROOM_FRACTION = 0.10
HEADROOM_BYTES = 0.5 * GB
# On the CPU the runtime's own buffers (oneDNN and BLAS scratch, the heap's small blocks) add
# to the tensors: the mean of measured minus estimated peaks over six shapes (tests/train/
# test_plan.py's FITTED), each between -25 and +27 MB of it
CPU_HEADROOM_BYTES = 5e6
ACTIVATION_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
PARTS = ("weights", "gradients", "optimizer", "activations", "logits chunk", "reference copy",
         "judge")


class PlanError(ConfigError):
    """A trial that cannot fit the memory it is given (exit 2, before any trial)."""


@dataclass(frozen=True)
class MemoryPlan:
    """The estimate of one trial's peak (bytes), its parts at that moment and its inputs."""

    cfg: TrainConfig
    shape: ModelShape
    rows: int  # sequences per micro-batch per worker
    parts: dict[str, float]  # PARTS at the peak's moment
    moment: str  # when the peak comes: "backward", "embedding's backward", "optimizer step"
    others: dict[str, float]  # the other moments' totals
    device: str = "cuda"
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> float:
        """What the tensors take at the peak (no headroom)."""
        return sum(self.parts.values())

    @property
    def headroom(self) -> float:
        """A GPU's: the CUDA context and the caching allocator's slack; a CPU's: its runtime's
        own buffers (CPU_HEADROOM_BYTES)."""
        if self.device == "cuda":
            return HEADROOM_FRACTION * self.peak + HEADROOM_BYTES
        return CPU_HEADROOM_BYTES

    @property
    def total(self) -> float:
        return self.peak + self.headroom

    def fits(self, available: float) -> bool:
        return self.total <= available

    def describe(self, available: float | None = None, against: str = "") -> str:
        """The plan as lines of text: the inputs, each part, the total against `available`
        (bytes; `against` says where that figure comes from)."""
        cfg, s = self.cfg, self.shape
        dtype = cfg.dtype + (" (float32 master weights, float16 autocast)"
                             if cfg.dtype == "float16" else "")
        trained = (f"LoRA r {s.lora_rank} on {', '.join(s.lora_targets)}: "
                   f"{s.trainable / 1e6:,.2f}M trainable" if s.lora else "full fine-tuning")
        lines = [
            f"model {cfg.model or 'tiny built-in'}: {s.params / 1e6:,.1f}M parameters, "
            f"{s.layers} layers, hidden {s.hidden}, MLP {s.intermediate}, {s.heads} heads "
            f"({s.kv_heads} key-value), vocabulary {s.vocab:,}"
            f"{', tied embeddings' if s.tied else ''}; {dtype}; {trained}",
            f"micro-batch per worker: {self.rows} rows x {cfg.max_length} tokens "
            f"(batch_size {cfg.batch_size} pairs / {cfg.num_workers} worker"
            f"{'s' * (cfg.num_workers > 1)}; grad_accum {cfg.grad_accum}: "
            f"{cfg.batch_size * cfg.grad_accum} pairs per step), logits_chunk "
            f"{cfg.logits_chunk}, gradient_checkpointing "
            f"{'on' if cfg.gradient_checkpointing else 'off'}, loss {cfg.loss.name}",
            f"peak at the {self.moment} ("
            + ", ".join(f"the {k}: {_gb(v)}" for k, v in self.others.items()) + "):",
        ]
        for name in PARTS:
            if name == "judge" and cfg.judge is None:
                continue
            lines.append(f"  {name:<15}{_gb(self.parts[name]):>10}")
        lines.append(f"  {'headroom':<15}{_gb(self.headroom):>10}  ("
                     + ("CUDA context, allocator slack)" if self.device == "cuda"
                        else "the CPU runtime's buffers)"))
        total = f"  {'total':<15}{_gb(self.total):>10}"
        if available is None:
            lines.append(total + (f"  ({against})" if against else ""))
        else:
            spare = available - self.total
            verdict = (f"fits, {_gb(spare)} to spare" if spare >= 0
                       else f"does NOT fit: {_gb(-spare)} over")
            lines.append(f"{total} of {_gb(available)}"
                         f"{f' ({against})' if against else ''}: {verdict}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _gb(n: float) -> str:
    return f"{n / GB:.2f} GB"


def _lora_activation_bytes(s: ModelShape, b: int, mask_bytes: float) -> float:
    """Per token, over the whole model: what the adapters save (see the module docstring)."""
    shared = s.lora_dropout == 0 and s.lora_bytes == b
    seen, total = set(), 0.0
    for x in s.lora_inputs:
        total += s.lora_rank * s.lora_bytes  # lora_A's output, saved by lora_B
        if not shared:  # its own float32 copy (or dropout's output) and dropout's mask
            total += x.features * (s.lora_bytes + (mask_bytes if s.lora_dropout else 0))
        elif x.group == "attention_output":  # the attention's output, already saved by SDPA
            continue
        elif (x.block, x.group) not in seen:
            seen.add((x.block, x.group))
            total += x.features * b
    return total


def layer_activation_bytes(s: ModelShape, b: int) -> float:
    """Per token and layer, what one block saves for its backward (without the adapters'
    own inputs under LoRA)."""
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    h, i = s.hidden, s.intermediate
    if s.lora:
        return 8 * h + b * (2 * q + 2 * kv + 3 * i) + 4 * s.heads + 8
    return b * (4 * h + 2 * q + 2 * kv + 4 * i) + 4 * (2 * h + s.heads + 2)


def chunk_bytes(tokens: int, chunk: int, vocab: int, b: int) -> float:
    """The logits chunks' peak over `tokens` response tokens in chunks of `chunk`: a chunk's
    CHUNK_COPIES float32 copies and its logits in the model's dtype (`b` bytes, when not
    float32), beside the previous chunk's logits gradient (`b` bytes), which lives until the
    next chunk's own is taken (raypo.train.forward's chunk loop)."""
    own = CHUNK_COPIES * 4 + (b if b < 4 else 0)
    full, rest = divmod(tokens, chunk) if chunk else (0, 0)
    peaks = [own * min(chunk, tokens)]
    if full >= 2:
        peaks.append((own + b) * chunk)
    if full >= 1 and rest:
        peaks.append(own * rest + b * chunk)
    return float(max(peaks) * vocab)


def fused_chunk_bytes(tokens: int, chunk: int, vocab: int, b: int, device: str) -> float:
    """`LinearLogProbs`' block (raypo.train.chunked_head): one float32 buffer of chunk x
    vocab_block, and under a 2-byte dtype beside it the block's logits or their gradient in
    that dtype, plus on the CPU a float32 one (its 2-byte matrix products, measured)."""
    from raypo.train.chunked_head import vocab_block

    per_logit = 4 if b == 4 else 4 + b + (4 if device == "cpu" else 0)
    return float(min(chunk, tokens) * vocab_block(chunk, vocab, device) * per_logit)


def estimate(cfg: TrainConfig, shape: ModelShape | None = None, device: str = "cuda",
             judge: JudgeShape | None = None) -> MemoryPlan:
    """The memory plan of `cfg` (its model's and judge's shapes read from their configs unless
    given) on a `device` of type "cuda" (the default) or "cpu" (a few temporaries differ)."""
    from raypo.losses import needs
    from raypo.train.forward import outputs_for

    shape = shape or plan_shape(cfg)
    s, workers = shape, cfg.num_workers
    b = ACTIVATION_BYTES[cfg.dtype]
    rows = 2 * cfg.batch_size // workers
    tokens, responses = rows * cfg.max_length, rows * (cfg.max_length - 1)
    chunk_tokens = min(cfg.logits_chunk, responses)
    declared = needs(cfg.loss.name, **cfg.loss.params)
    terms = outputs_for(declared.fields)["terms"]
    notes = []

    weights = float(s.weight_bytes)
    if cfg.dtype == "float16":
        weights += 2 * s.linear_params  # autocast's float16 copies, kept for the backward
    gradients = float(s.trainable_bytes)
    moments = 2.0 * s.trainable_bytes
    step_temp = float(s.trainable_bytes if device == "cuda" else 2 * s.largest_trainable_bytes)
    head_grad = float(s.head_grad_bytes)
    fsdp = workers > 1 and cfg.parallel == "fsdp"
    if fsdp:  # parameters, gradients and moments sharded; one block gathered at a time
        block = s.weight_bytes / max(s.layers, 1)
        weights = weights / workers + 2 * block
        gradients, moments, step_temp, head_grad = (x / workers for x in
                                                    (gradients, moments, step_temp, head_grad))
        notes.append(f"FSDP over {workers} workers: weights, gradients and moments "
                     "sharded (an approximation: one block's weights gathered at a time)")
    elif workers > 1:
        gradients += s.trainable_bytes  # DDP's gradient buckets
    reference = 0.0
    live = declared.full_reference_logits
    if (live or cfg.builtin or cfg.judge is not None) and not s.lora:
        reference = float(s.weight_bytes)  # the frozen copy (models.load.Reference)
    if live and terms:
        reference += responses * s.hidden * b  # its last hidden states, for the chunks

    per_layer = layer_activation_bytes(s, b)
    mask_bytes = 1 if device == "cuda" else s.lora_bytes  # dropout's mask: bool / float
    per_layer_total = per_layer * s.layers + (_lora_activation_bytes(s, b, mask_bytes)
                                              if s.lora else 0.0)
    outside = 4 * s.hidden + 4 if s.lora else 8 * s.hidden + 12
    if s.plain_head and not terms:
        chunk = fused_chunk_bytes(responses, chunk_tokens, s.vocab, b, device)
        if not s.head_grad_bytes:  # a frozen head: E_p[W] kept from the forward
            chunk += responses * s.hidden * 4
    else:
        chunk = chunk_bytes(responses, chunk_tokens, s.vocab, b)
    chunk += 2 * responses * s.hidden * b
    if cfg.gradient_checkpointing:
        # each layer's input kept; one layer's activations while it is recomputed, which
        # happens after the chunks' backward: counted where they exceed the chunk's
        recomputed = tokens * per_layer_total / max(s.layers, 1)
        saved = tokens * s.layers * s.hidden * b + max(0.0, recomputed - chunk)
    else:
        saved = tokens * per_layer_total
    activations = saved + tokens * outside + responses * s.hidden * b

    # the gradients alive in the backward: the output head's (summed over the chunks), and
    # with grad_accum > 1 every gradient of the earlier micro-batches
    accumulated = gradients if cfg.grad_accum > 1 else 0.0
    embedding = s.embedding_grad_bytes / (workers if fsdp else 1)
    moments_of = {
        "backward": {"weights": weights, "gradients": accumulated + head_grad,
                     "optimizer": moments, "activations": activations,
                     "logits chunk": chunk, "reference copy": reference},
        # the backward's last op: the input embedding's dense gradient beside the head's
        # (tied: summed into it) and the accumulated ones
        "embedding's backward": {"weights": weights, "gradients": accumulated
                                 + (0.0 if s.tied else head_grad) + 2 * embedding,
                                 "optimizer": moments, "activations": 0.0,
                                 "logits chunk": 0.0, "reference copy": reference},
        "optimizer step": {"weights": weights, "gradients": gradients,
                           "optimizer": moments + step_temp, "activations": 0.0,
                           "logits chunk": 0.0, "reference copy": reference},
    }
    judge = judge or (plan_judge(cfg) if cfg.judge is not None else None)
    for parts in moments_of.values():
        parts["judge"] = float(judge.weight_bytes) if judge else 0.0
    if judge is not None:
        moments_of["evaluation"] = {
            "weights": weights, "gradients": 0.0, "optimizer": moments,
            "activations": evaluation_bytes(cfg, s, judge), "logits chunk": 0.0,
            "reference copy": reference, "judge": float(judge.weight_bytes)}
    ranked = sorted(moments_of.items(), key=lambda kv: -sum(kv[1].values()))
    if s.model_type not in ("llama", "qwen2", "qwen3", "mistral", "gemma", ""):
        notes.append(f"activations counted for a Llama-family block; a {s.model_type} "
                     "model's may differ")
    return MemoryPlan(cfg=cfg, shape=shape, rows=rows, parts=ranked[0][1], moment=ranked[0][0],
                      others={k: sum(v.values()) for k, v in ranked[1:]}, device=device,
                      notes=notes)


def evaluation_bytes(cfg: TrainConfig, s: ModelShape, judge: JudgeShape) -> float:
    """What a judged evaluation holds beside the weights (no gradients then: they are freed
    after every step): the policy's KV cache while it samples `judge.batch_size` responses of
    up to max_prompt_length + max_new_tokens tokens, and the activations of one forward of
    that batch (the policy's prefill, or the judge's scoring: the larger), none kept for a
    backward."""
    b = ACTIVATION_BYTES[cfg.dtype]
    rows, length = cfg.judge.batch_size, cfg.max_prompt_length + cfg.judge.max_new_tokens
    kv_cache = rows * length * s.layers * 2 * s.kv_heads * s.head_dim * b
    # a layer's widest tensors at once: the residual stream, attention, the MLP's two halves
    forward = rows * length * max((4 * s.hidden + 2 * s.intermediate),
                                  (4 * judge.hidden + 2 * judge.intermediate)) * b
    last_logits = rows * s.vocab * 4 * 3  # the sampled position's logits, softmax, top-p sort
    return kv_cache + forward + last_logits


_JUDGES: dict[str, JudgeShape] = {}


def plan_judge(cfg: TrainConfig) -> JudgeShape:
    """The shape of `cfg`'s judge, loaded in the trial's dtype (read once per judge)."""
    from raypo.train.builtin_judge import judge_config

    dtype = "float32" if cfg.dtype == "float16" else cfg.dtype
    key = f"{cfg.judge.model}|{dtype}"
    if key not in _JUDGES:
        if cfg.judge.builtin:
            config = judge_config()
        else:
            try:
                config = model_config(cfg.judge.model)
            except ValueError as e:
                raise PlanError(f"judge.model: the memory plan reads the judge's config and "
                                f"could not: {' '.join(str(e).split())}") from None
        _JUDGES[key] = judge_shape(config, dtype)
    return _JUDGES[key]


_SHAPES: dict[str, ModelShape] = {}


def plan_shape(cfg: TrainConfig) -> ModelShape:
    """The shape of `cfg`'s model as its trials train it (read once per model, dtype and
    LoRA setting). PlanError when the model's config cannot be read."""
    import json

    dtype = "float32" if cfg.dtype == "float16" else cfg.dtype  # float16: master weights
    key = json.dumps([cfg.model, dtype, cfg.lora], sort_keys=True, default=str)
    if key not in _SHAPES:
        try:
            config = model_config(cfg.model)
        except ValueError as e:
            raise PlanError(f"model: the memory plan reads the model's config and could not: "
                            f"{' '.join(str(e).split())}") from None
        _SHAPES[key] = model_shape(config, dtype, cfg.lora)
    return _SHAPES[key]


def suggestions(plan: MemoryPlan, available: float) -> list[str]:
    """What would make `plan` fit `available` bytes, each with its new total."""
    cfg, out = plan.cfg, []

    def total(**update) -> float:
        return estimate(cfg.model_copy(update=update), plan.shape, plan.device).total

    def fits(t: float) -> str:
        return f"{_gb(t)}{'' if t <= available else ', still over'}"

    pairs = cfg.batch_size * cfg.grad_accum
    batch = cfg.batch_size
    while batch > cfg.num_workers:
        smaller = next((d for d in range(batch - 1, 0, -1)
                        if pairs % d == 0 and d % cfg.num_workers == 0), None)
        if smaller is None:
            break
        batch = smaller
        t = total(batch_size=batch, grad_accum=pairs // batch)
        if t <= available or batch == cfg.num_workers:
            out.append(f"batch_size: {batch} with grad_accum: {pairs // batch} (the same "
                       f"{pairs} pairs per step): {fits(t)}")
            break
    if not cfg.gradient_checkpointing:
        out.append(f"gradient_checkpointing: true: {fits(total(gradient_checkpointing=True))}")
    if cfg.lora is None and cfg.model is not None:
        lora_total = estimate(cfg, _lora_shape(cfg), plan.device).total
        out.append(f"lora: {{r: 16}} (LoRA instead of full fine-tuning): {fits(lora_total)}")
    if cfg.logits_chunk > 128 and plan.shape.vocab >= 32_000:
        out.append(f"logits_chunk: 128: {fits(total(logits_chunk=128))}")
    if plan.parts.get("judge"):
        without = estimate(cfg.model_copy(update={"judge": None}), plan.shape, plan.device)
        out.append(f"a smaller judge (judge.model; this one takes {_gb(plan.parts['judge'])}: "
                   f"the trial without it plans {fits(without.total)})")
    return out


def _lora_shape(cfg: TrainConfig) -> ModelShape:
    return plan_shape(cfg.model_copy(update={"lora": {"r": 16}}))


def check(plan: MemoryPlan, available: float, against: str) -> None:
    """PlanError with the plan and what to change when it does not fit `available` bytes."""
    if plan.fits(available):
        return
    advice = suggestions(plan, available)
    raise PlanError(
        f"the trial's memory plan does not fit: {_gb(plan.total)} needed, {_gb(available)} "
        f"given ({against}); "
        + "; ".join(f"{k} {_gb(v)}" for k, v in plan.parts.items() if v)
        + f"; headroom {_gb(plan.headroom)} (peak at the {plan.moment}). "
        + ("Try: " + "; or ".join(advice) if advice else "No setting here makes it fit: a "
           "GPU with more memory, or more workers with parallel: fsdp")
        + ". `--plan` prints the plan.")




def local_gpu(cfg: TrainConfig) -> tuple[float, str] | None:
    """(bytes, what) of the GPU a run of `cfg` in this process would train on (`device`
    auto or cuda, or `use_gpu` for its workers), or None for a CPU run (nothing is checked:
    the CPU's memory is shared with everything else the machine runs)."""
    import torch

    if not torch.cuda.is_available():
        return None
    device = torch.device("cuda" if cfg.device == "auto" else cfg.device)
    if device.type != "cuda" and not cfg.use_gpu:
        return None
    props = torch.cuda.get_device_properties(device.index or 0)
    return float(props.total_memory), f"this machine's {props.name}"
