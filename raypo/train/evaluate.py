"""Evaluation: held-out preference accuracy and rewards on every dataset; on the built-in task
also what the policy actually generates, scored by the true reward, and its KL to the
reference estimated from the same samples."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raypo.data.builtin import eval_prompts, response_text
from raypo.data.collate import LengthGroupedBatches, collate
from raypo.train.forward import token_outputs
from raypo.train.step import preference_batch

# what held_out_metrics returns at every evaluation, and sample_and_score on the built-in task
HELD_OUT_METRICS = ("eval_loss", "pref_accuracy", "reward_margin", "chosen_reward",
                    "rejected_reward")
SAMPLED_METRICS = ("true_reward", "kl", "response_length")


@torch.no_grad()
def held_out_metrics(setup, policy) -> dict[str, float]:
    loss_fn = setup.loss_fn
    batches = LengthGroupedBatches(setup.eval_pairs.lengths(), setup.cfg.batch_size,
                                   shuffle=False)
    chosen, rejected, losses, weights = [], [], [], []
    for indices in batches:
        batch = collate(setup.eval_pairs, indices, setup.tokenizer.pad_token_id).to(setup.device)
        pb = preference_batch(setup, batch, policy, setup.ref_eval,
                              setup.cfg.embedding_source == "policy")
        out = loss_fn(pb)
        chosen.append(out.chosen_rewards.float().cpu())
        rejected.append(out.rejected_rewards.float().cpu())
        losses.append(float(out.loss))
        weights.append(len(indices))
    cr, rr = torch.cat(chosen), torch.cat(rejected)
    return dict(zip(HELD_OUT_METRICS, (
        sum(l * w for l, w in zip(losses, weights, strict=True)) / sum(weights),
        float((cr > rr).float().mean()), float((cr - rr).mean()), float(cr.mean()),
        float(rr.mean())), strict=True))


@dataclass
class Samples:
    """One sampled response per prompt: its token ids (up to and including the first EOS),
    and the summed log-probs of those tokens under the sampling model and the reference."""

    responses: list[list[int]]
    logps: torch.Tensor  # (N,) float32
    ref_logps: torch.Tensor | None  # (N,) float32; None when not asked for

    @property
    def lengths(self) -> torch.Tensor:
        return torch.tensor([float(len(r)) for r in self.responses])

    def kl(self) -> float:
        """Monte-Carlo KL(model || reference) = E_y~model[log model(y|x) - log ref(y|x)]."""
        return float((self.logps - self.ref_logps).mean())


def _left_padded(prompts: list[list[int]], pad_id: int, device):
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts])
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids.to(device), attention.to(device)


def _sequence_logps(model, sequences, attention, prompt_width, gen_mask, chunk: int):
    """Summed log-probs of the generated tokens (those of `gen_mask`), in chunks."""
    positions = (attention.cumsum(-1) - 1).clamp_min(0)
    mask = gen_mask.bool()
    rows, t = mask.nonzero(as_tuple=True)
    out = token_outputs(model, sequences, rows, prompt_width - 1 + t,
                        sequences[rows, prompt_width + t], chunk=chunk,
                        attention_mask=attention, position_ids=positions, use_cache=False)
    return torch.zeros(mask.shape, device=out.logps.device).masked_scatter(
        mask, out.logps).sum(-1)


@torch.no_grad()
def sample(setup, model, prompts: list[list[int]], *, seed: int, max_new_tokens: int,
           temperature: float = 1.0, top_p: float = 1.0, batch_size: int = 128,
           reference=None) -> Samples:
    """Sample one response to each prompt (token ids; left-padded batches of `batch_size`,
    the KV cache on, seeded), with the responses' log-probs under `model` and, when given,
    under `reference`."""
    tok, chunk = setup.tokenizer, setup.cfg.logits_chunk
    model.eval()
    responses, logps, ref_logps = [], [], []
    with torch.random.fork_rng(devices=[setup.device] if setup.device.type == "cuda" else []):
        torch.manual_seed(seed)
        for start in range(0, len(prompts), batch_size):
            ids, attn = _left_padded(prompts[start:start + batch_size], tok.pad_token_id,
                                     setup.device)
            out = model.generate(input_ids=ids, attention_mask=attn, do_sample=True, top_k=0,
                                 temperature=temperature, top_p=top_p,
                                 max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id)
            width = ids.shape[1]
            generated = out[:, width:]
            # a generated token counts up to and including the first EOS
            is_eos = generated == tok.eos_token_id
            gen_mask = (is_eos.long().cumsum(-1) - is_eos.long()) == 0
            attention = torch.cat([attn, gen_mask.long()], dim=1)
            responses += [row[mask].tolist() for row, mask in zip(generated.cpu(),
                                                                  gen_mask.cpu(), strict=True)]
            logps.append(_sequence_logps(model, out, attention, width, gen_mask, chunk).float())
            if reference is not None:
                ref_logps.append(_sequence_logps(reference, out, attention, width, gen_mask,
                                                 chunk).float())
    return Samples(responses, torch.cat(logps).cpu(),
                   torch.cat(ref_logps).cpu() if reference is not None else None)


def builtin_prompt_ids(tokenizer, prompts: list[str]) -> list[list[int]]:
    """The built-in task's prompts as the policy reads them: BOS, then the prompt's tokens."""
    return [[tokenizer.bos_token_id, *tokenizer(p, add_special_tokens=False).input_ids]
            for p in prompts]


def response_texts(setup, samples: Samples) -> list[str]:
    """The responses as text (special tokens dropped; on the built-in task the digits up to
    the first non-digit, what the true reward reads)."""
    texts = setup.tokenizer.batch_decode(samples.responses, skip_special_tokens=True)
    return [response_text(t) for t in texts] if setup.task is not None else texts


@torch.no_grad()
def sample_and_score(setup, model, n: int, seed: int) -> dict[str, float]:
    """Sample n responses (temperature 1), return the mean true reward and the Monte-Carlo
    KL(model || reference) = E_y~model[log model(y|x) - log ref(y|x)] over the same samples."""
    spec = setup.task
    prompts = builtin_prompt_ids(setup.tokenizer, eval_prompts(spec, n))
    samples = sample(setup, model, prompts, seed=seed, batch_size=n,
                     max_new_tokens=spec.response_digits[1] + 2, reference=setup.reference_model)
    rewards = [spec.true_reward(t) for t in response_texts(setup, samples)]
    return dict(zip(SAMPLED_METRICS, (sum(rewards) / len(rewards), samples.kl(),
                                      float(samples.lengths.mean())), strict=True))
