"""Forward + backward time of every loss on one batch, as ratios.

Sequence-level losses (B=64 pairs) are timed against `dpo` on the same batch. Token-level losses
(T=256 response positions, V=32000) are timed against one `log_softmax` forward + backward over
the same policy logits (chosen and rejected), with the reference logits in full and in top-k
(k=64) form. The loss is given only the fields it `requires`, as the trainer does.

    python benchmarks/losses.py [--token-pairs 4] [--device cpu|cuda] [--repeats 5]

Full-vocabulary logits for B=64, T=256, V=32000 take 2 GiB per tensor in float32, so the
token-level batch defaults to 4 pairs on a CPU machine (ratios are per-element costs and do
not depend on B); pass --token-pairs 64 on a GPU.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from raypo.losses import LOSSES, PreferenceBatch, TopKLogits, build

SEQUENCE_CONFIGS = (
    [(n, {}) for n in ("dpo", "ipo", "hinge", "cdpo", "robust", "simpo", "rdpo", "cal_dpo",
                       "beta_dpo", "exo_pair", "discopop", "sigmoid_norm", "nca_pair",
                       "bco_pair", "apo_zero", "apo_down", "sppo_hard", "aot", "aot_unpaired",
                       "sft", "mixture")]
    + [("dpo", {"use_weighting": True}), ("dpo", {"ld_alpha": 0.5}),
       ("dpo", {"use_weighting": True, "ld_alpha": 0.5})]
    + [("fdpo", {"divergence": d}) for d in ("reverse_kl", "forward_kl", "js", "alpha")]
    + [("mi_dpo", {"prior": p}) for p in ("reference", "simpo", "rdpo", "learnable")]
    + [("kernel_dpo", {"kernel": k}) for k in ("polynomial", "rbf", "mahalanobis", "spectral")]
    + [("kernel_dpo", {"kernel": "spectral", "form": "eigen"}), ("hmk_dpo", {})]
)
TOKEN_CONFIGS = (
    [("kernel_dpo", {"divergence": d})
     for d in ("kl", "js", "hellinger", "renyi", "bhattacharyya", "fdiv", "wasserstein")]
    + [("tdpo", {"version": 1}), ("tdpo", {"version": 2}), ("sparsepo", {}),
       ("mi_dpo", {"prior": "tdpo2"}), ("mi_dpo", {"prior": "sparsepo"}), ("epsilon_dpo", {})]
)


def make_batch(pairs: int, T: int, V: int, H: int, D: int, topk: int | None, device,
               token_level: bool) -> dict:
    g = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape, grad=False):
        return torch.randn(*shape, generator=g).to(device).requires_grad_(grad)

    lengths = lambda: torch.randint(T // 2, T + 1, (pairs,), generator=g).float().to(device)  # noqa: E731
    fields = dict(
        policy_chosen_logps=randn(pairs, grad=True), policy_rejected_logps=randn(pairs, grad=True),
        ref_chosen_logps=randn(pairs), ref_rejected_logps=randn(pairs),
        chosen_lengths=lengths(), rejected_lengths=lengths(),
        prompt_embeddings=randn(pairs, D), chosen_embeddings=randn(pairs, D, grad=True),
        rejected_embeddings=randn(pairs, D, grad=True),
    )
    for side in ("chosen", "rejected"):
        # per-token log-probs and masks (sft, WPO, LD-DPO read them at sequence level too)
        n = fields[f"{side}_lengths"].long()
        fields.update({
            f"{side}_mask": (torch.arange(T, device=device)[None] < n[:, None]).float(),
            f"policy_{side}_token_logps": randn(pairs, T, grad=True),
            f"ref_{side}_token_logps": randn(pairs, T),
            f"policy_{side}_log_sum_sq_probs": -randn(pairs, T).abs(),
        })
        if token_level:
            ref = randn(pairs, T, V)
            fields.update({
                f"{side}_labels": torch.randint(0, V, (pairs, T), generator=g).to(device),
                f"policy_{side}_logits": randn(pairs, T, V, grad=True),
                f"ref_{side}_logits": TopKLogits.from_logits(ref, topk) if topk else ref,
                f"ref_{side}_hidden": randn(pairs, T, H),
            })
    return fields


def timed(fn, repeats: int, device) -> float:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    fn()  # warm-up (lazy modules, allocator, kernels)
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def loss_step(name: str, params: dict, fields: dict, hidden: int):
    if name == "sparsepo" or params.get("prior") == "sparsepo":
        params = {**params, "hidden_size": hidden}
    loss_fn = build(name, **params).to(fields["policy_chosen_logps"].device)
    batch = PreferenceBatch(**{k: v for k, v in fields.items() if k in loss_fn.requires})

    def step():
        for v in vars(batch).values():
            if isinstance(v, torch.Tensor):
                v.grad = None
        loss_fn(batch).loss.backward()
    return step


def log_softmax_step(fields: dict):
    logits = [fields["policy_chosen_logits"], fields["policy_rejected_logits"]]

    def step():
        for x in logits:
            x.grad = None
            torch.log_softmax(x, -1).sum().backward()
    return step


def label(name: str, params: dict) -> str:
    return name + "".join(f" {k}={v}" for k, v in params.items())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--token-pairs", type=int, default=4)
    ap.add_argument("--T", type=int, default=256)
    ap.add_argument("--V", type=int, default=32000)
    ap.add_argument("--topk", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--embedding-dim", type=int, default=896)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    missing = set(LOSSES) - {n for n, _ in SEQUENCE_CONFIGS + TOKEN_CONFIGS}
    assert not missing, f"benchmark misses losses: {missing}"

    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"\nsequence-level, B={args.pairs}, embeddings D={args.embedding_dim}: "
          "forward+backward time / dpo's")
    fields = make_batch(args.pairs, args.T, args.V, args.hidden, args.embedding_dim, None,
                        device, token_level=False)
    base = timed(loss_step("dpo", {}, fields, args.hidden), args.repeats * 20, device)
    print(f"  {'dpo':<42} {base * 1e6:9.1f} us   1.00x")
    for name, params in SEQUENCE_CONFIGS[1:]:
        t = timed(loss_step(name, params, fields, args.hidden), args.repeats * 20, device)
        print(f"  {label(name, params):<42} {t * 1e6:9.1f} us  {t / base:5.2f}x")

    for topk in (None, args.topk):
        form = f"top-k={topk}" if topk else "full"
        fields = make_batch(args.token_pairs, args.T, args.V, args.hidden, args.embedding_dim,
                            topk, device, token_level=True)
        base = timed(log_softmax_step(fields), args.repeats, device)
        print(f"\ntoken-level, B={args.token_pairs} T={args.T} V={args.V}, reference {form}: "
              "forward+backward time / one log_softmax over the same policy logits")
        print(f"  {'log_softmax (baseline)':<42} {base * 1e3:9.1f} ms   1.00x")
        for name, params in TOKEN_CONFIGS:
            if topk and name == "epsilon_dpo":
                continue  # needs full reference logits by definition
            t = timed(loss_step(name, params, fields, args.hidden), args.repeats, device)
            print(f"  {label(name, params):<42} {t * 1e3:9.1f} ms  {t / base:5.2f}x")
        del fields


if __name__ == "__main__":
    main()
