"""The output head in chunks: two autograd functions that apply a plain linear head to
`chunk` response positions at a time and free each chunk's vocabulary-sized logits before the
next (raypo.train.forward chooses between them).

- `LinearLogProbs`: only the targets' log-probs (and WPO's log sum p^2). The vocabulary is
  taken in blocks as well (`vocab_block`), the log normaliser accumulated over them with a
  running maximum and sum, and the backward turns each recomputed block into its gradient
  in place, g (onehot(target) - softmax): one chunk x block buffer in all. A frozen head keeps
  E_p[W] from the forward instead of recomputing.
- `LinearInChunks`: any per-position terms of the logits (divergences to the reference,
  perturbed log-probs): autograd on each recomputed chunk, the head's weight gradient
  accumulated in one buffer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# On the CPU the vocabulary is taken in blocks of about this many logits per chunk (16 MB of
# float32, which stays in cache across the in-place passes over it); on a GPU, where cache
# gains little and every block is more kernel launches, in one block
CPU_BLOCK_ELEMENTS = 1 << 22


def vocab_block(chunk: int, vocab: int, device_type: str) -> int:
    """The vocabulary block of `LinearLogProbs` for chunks of `chunk` tokens."""
    if device_type != "cpu":
        return vocab
    return min(vocab, max(1024, CPU_BLOCK_ELEMENTS // max(chunk, 1)))


class _BlockLogits:
    """h W_b^T + b_b in float32 for one vocabulary block W_b = W[v:v + block] at a time; on
    the CPU float32 weights' go into one buffer reused from block to block (a fresh tensor
    per block would be fresh pages, each faulted and zeroed by the kernel). A GPU's caching
    allocator reuses memory itself, and there a plain F.linear keeps float16 autocast's
    casts (an out= product is not autocast)."""

    def __init__(self, weight: Tensor, bias: Tensor | None, rows: int, block: int):
        self.weight, self.bias, self.block = weight, bias, block
        self.buffer = (weight.new_empty(rows, block)
                       if weight.dtype == torch.float32 and weight.device.type == "cpu"
                       else None)

    def __call__(self, h: Tensor, v: int) -> Tensor:
        w = self.weight[v:v + self.block]
        bias = None if self.bias is None else self.bias[v:v + self.block]
        if self.buffer is None or h.dtype != torch.float32:
            return F.linear(h, w, bias).float()
        z = self.buffer[:h.shape[0], :w.shape[0]]
        torch.matmul(h, w.t(), out=z)
        return z if bias is None else z.add_(bias)


def _in_block(targets: Tensor, start: int, width: int) -> tuple[Tensor, Tensor]:
    """Which targets fall in the vocabulary block [start, start + width), and each target's
    column in the block (clamped into it where it falls outside: read only where inside)."""
    inside = (targets >= start) & (targets < start + width)
    return inside, (targets - start).clamp(0, width - 1)[:, None]


class LinearLogProbs(torch.autograd.Function):
    """log softmax(h W^T + b)[target] for a plain linear head and a loss that reads only the
    targets' log-probs (no token terms), `chunk` rows by one vocabulary block (`vocab_block`)
    at a time. The log normaliser is accumulated over the blocks (a running maximum and sum,
    as flash attention does); the gradient of a block's logits, g (onehot(target) - softmax),
    is made in place in the block's one buffer, where autograd through logsumexp and gather
    makes four or five chunk x vocabulary tensors. The backward recomputes each block's
    logits. A frozen head (LoRA elsewhere) needs no recompute: the forward keeps
    E_p[W] = softmax @ W (N x H), and the gradient of h is g (W[target] - E_p[W]).
    `log_sum_sq`: WPO's log sum p^2, appended to out["log_sum_sq"] per chunk, no gradient."""

    @staticmethod
    def forward(ctx, h, weight, bias, targets, chunk, log_sum_sq, out):
        n, vocab = h.shape[0], weight.shape[0]
        block = vocab_block(chunk, vocab, h.device.type)
        logits = _BlockLogits(weight, bias, min(chunk, n), block)
        logps = h.new_empty(n, dtype=torch.float32)
        log_normalizer = torch.empty_like(logps)
        frozen = (h.requires_grad and not weight.requires_grad
                  and (bias is None or not bias.requires_grad))
        expected = h.new_empty(n, h.shape[1], dtype=torch.float32) if frozen else None
        for i in range(0, n, chunk):
            h_part, t = h[i:i + chunk], targets[i:i + chunk]
            top = h_part.new_full((len(t),), -torch.inf, dtype=torch.float32)
            total, squares, target_logit = (torch.zeros_like(top) for _ in range(3))
            acc = torch.zeros_like(expected[i:i + chunk]) if frozen else None
            for v in range(0, vocab, block):
                z = logits(h_part, v)
                inside, at = _in_block(t, v, z.shape[1])
                target_logit = torch.where(inside, z.gather(1, at)[:, 0], target_logit)
                new_top = torch.maximum(top, z.amax(1))
                rescale = (top - new_top).exp()  # 0 on the first block (top = -inf)
                top = new_top
                unnormalized = z.sub_(top[:, None]).exp_()  # in (0, 1]: no overflow
                total = total * rescale + unnormalized.sum(1)
                if log_sum_sq:
                    squares = (squares * rescale.square()
                               + torch.linalg.vector_norm(unnormalized, dim=1).square())
                if frozen:
                    acc = acc * rescale[:, None] + (
                        unnormalized.to(weight.dtype) @ weight[v:v + block]).float()
                del z, unnormalized  # freed before the next block's logits are made
            log_normalizer[i:i + chunk] = top + total.log()
            logps[i:i + chunk] = target_logit - log_normalizer[i:i + chunk]
            if log_sum_sq:  # log sum p^2 = log sum exp(2 (z - max)) - 2 log sum exp(z - max)
                out.setdefault("log_sum_sq", []).append(squares.log() - 2 * total.log())
            if frozen:
                expected[i:i + chunk] = acc / total[:, None]
        ctx.save_for_backward(h, weight, bias, targets, log_normalizer, expected)
        ctx.chunk = chunk
        return logps

    @staticmethod
    def backward(ctx, grad_logps):
        h, weight, bias, targets, log_normalizer, expected = ctx.saved_tensors
        if expected is not None:  # frozen head: no logits to recompute
            grad_h = grad_logps[:, None] * (weight[targets].float() - expected)
            return grad_h.to(h.dtype), None, None, None, None, None, None
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        n, vocab, chunk = h.shape[0], weight.shape[0], ctx.chunk
        block = vocab_block(chunk, vocab, h.device.type)
        logits = _BlockLogits(weight, bias, min(chunk, n), block)
        grad_h = torch.zeros_like(h) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_b = torch.zeros_like(bias) if need_b else None
        for i in range(0, n, chunk):
            h_part, t = h[i:i + chunk], targets[i:i + chunk]
            g, lse = grad_logps[i:i + chunk, None], log_normalizer[i:i + chunk, None]
            for v in range(0, vocab, block):
                z = logits(h_part, v)
                grad_z = z.sub_(lse).exp_().mul_(-g)  # -g softmax
                inside, at = _in_block(t, v, z.shape[1])
                grad_z.scatter_add_(1, at, g * inside[:, None])  # + g onehot(target)
                grad_z = grad_z.to(weight.dtype)
                if need_h:
                    grad_h[i:i + chunk].addmm_(grad_z, weight[v:v + block])
                if need_w:
                    grad_w[v:v + block].addmm_(grad_z.t(), h_part)
                if need_b:
                    grad_b[v:v + block] += grad_z.sum(0)
                del z, grad_z  # freed before the next block's logits are made
        return grad_h, grad_w, grad_b, None, None, None, None


class LinearInChunks(torch.autograd.Function):
    """values(h W^T + b) a chunk of rows at a time, for a plain linear head: the forward keeps
    no logits; the backward recomputes each chunk's, takes the gradient of `values` with
    respect to them (autograd, whatever the terms are), and adds the chunk's share of the
    weight's gradient into one buffer (addmm_). Checkpointing each chunk instead would hand
    autograd one vocabulary x hidden weight gradient per chunk to sum: twice the head's
    gradient memory at the backward's peak. The terms may hold no trainable parameters of
    their own (none does: their gradient would not be taken here)."""

    @staticmethod
    def forward(ctx, h, weight, bias, chunk, values):
        ctx.save_for_backward(h, weight, bias)
        ctx.chunk, ctx.values = chunk, values
        with torch.no_grad():
            return torch.cat([values(F.linear(h[i:i + chunk], weight, bias).float(),
                                     slice(i, i + chunk), True)
                              for i in range(0, h.shape[0], chunk)])

    @staticmethod
    def backward(ctx, grad_out):
        h, weight, bias = ctx.saved_tensors
        chunk = ctx.chunk
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        grad_b = torch.zeros_like(bias) if bias is not None and ctx.needs_input_grad[2] else None
        for i in range(0, h.shape[0], chunk):
            h_part = h[i:i + chunk]
            with torch.enable_grad():
                z = F.linear(h_part, weight, bias).detach().requires_grad_()
                out = ctx.values(z.float(), slice(i, i + chunk), False)
                (grad_z,) = torch.autograd.grad(out, z, grad_out[i:i + chunk])
            if grad_h is not None:
                grad_h[i:i + chunk] = grad_z @ weight
            if grad_w is not None:
                grad_w.addmm_(grad_z.t(), h_part)
            if grad_b is not None:
                grad_b += grad_z.sum(0)
            del z, out, grad_z  # freed before the next chunk's logits are made
        return grad_h, grad_w, grad_b, None, None
