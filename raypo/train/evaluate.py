"""Evaluation: held-out preference accuracy and rewards on every dataset; on the built-in task
also what the policy actually generates, scored by the true reward, and its KL to the
reference estimated from the same samples."""

from __future__ import annotations

import torch

from raypo.data.builtin import eval_prompts, response_text
from raypo.data.collate import LengthGroupedBatches, collate
from raypo.train.forward import token_outputs
from raypo.train.step import preference_batch


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
    return {
        "eval_loss": sum(l * w for l, w in zip(losses, weights, strict=True)) / sum(weights),
        "pref_accuracy": float((cr > rr).float().mean()),
        "reward_margin": float((cr - rr).mean()),
        "chosen_reward": float(cr.mean()),
        "rejected_reward": float(rr.mean()),
    }


def _prompt_batch(tokenizer, prompts: list[str], device):
    encoded = [[tokenizer.bos_token_id, *tokenizer(p, add_special_tokens=False).input_ids]
               for p in prompts]
    width = max(map(len, encoded))
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(e)) + e for e in encoded])
    return ids.to(device), (ids != tokenizer.pad_token_id).long().to(device)


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
def sample_and_score(setup, model, n: int, seed: int) -> dict[str, float]:
    """Sample n responses (temperature 1), return the mean true reward and the Monte-Carlo
    KL(model || reference) = E_y~model[log model(y|x) - log ref(y|x)] over the same samples."""
    spec, tok = setup.task, setup.tokenizer
    ids, attn = _prompt_batch(tok, eval_prompts(spec, n), setup.device)
    model.eval()
    with torch.random.fork_rng(devices=[setup.device] if setup.device.type == "cuda" else []):
        torch.manual_seed(seed)
        out = model.generate(input_ids=ids, attention_mask=attn, do_sample=True, top_k=0,
                             temperature=1.0, max_new_tokens=spec.response_digits[1] + 2,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    width = ids.shape[1]
    generated = out[:, width:]
    # a generated token counts up to and including the first EOS
    is_eos = generated == tok.eos_token_id
    gen_mask = (is_eos.long().cumsum(-1) - is_eos.long()) == 0
    attention = torch.cat([attn, gen_mask.long()], dim=1)
    texts = tok.batch_decode(generated, skip_special_tokens=True)
    rewards = [spec.true_reward(response_text(t)) for t in texts]
    chunk = setup.cfg.logits_chunk
    logp = _sequence_logps(model, out, attention, width, gen_mask, chunk)
    ref_logp = _sequence_logps(setup.reference_model, out, attention, width, gen_mask, chunk)
    return {"true_reward": sum(rewards) / len(rewards), "kl": float((logp - ref_logp).mean()),
            "response_length": float(gen_mask.sum(-1).float().mean())}
