"""Registry members describe themselves: what a loss reads is known from its class and
parameters (and equals what the built loss reads), `bind` hands model facts to every part that
needs one, report identities and selection candidates come from the registries, and no stage
outside raypo.losses names a loss, kernel or divergence."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

from raypo.losses import (
    DIVERGENCES,
    KERNELS,
    LOSSES,
    ModelFacts,
    build,
    divergence_candidates,
    identity,
    kernel_candidates,
    needs,
)

# (loss, params): every loss, and the composite ones with parts that change what they read
CASES = [(name, {}) for name in LOSSES] + [
    ("kernel_dpo", {"divergence": "kl"}),
    ("kernel_dpo", {"kernel": "mahalanobis"}),
    ("kernel_dpo", {"kernel": "spectral", "form": "eigen"}),
    ("kernel_dpo", {"kernel": "polynomial", "divergence": "wasserstein", "k": 4}),
    ("hmk_dpo", {"divergence": "js"}),
    *(("mi_dpo", {"prior": p}) for p in ("reference", "simpo", "rdpo", "tdpo1", "tdpo2",
                                         "sparsepo", "learnable")),
    # the modifiers (options) and mixtures
    ("dpo", {"use_weighting": True}),
    ("ipo", {"ld_alpha": 0.5}),
    ("aot", {"ld_alpha": 0.5}),
    ("kernel_dpo", {"divergence": "js", "use_weighting": True, "ld_alpha": 0.2}),
    ("mi_dpo", {"prior": "tdpo2", "use_weighting": True}),
    ("mixture", {"terms": [{"name": "dpo", "weight": 1, "ld_alpha": 0.5},
                           {"name": "kernel_dpo", "weight": 0.5, "kernel": "mahalanobis",
                            "divergence": "kl"},
                           {"name": "sft", "weight": 1}]}),
    ("mixture", {"terms": [{"name": "epsilon_dpo", "weight": 1},
                           {"name": "sparsepo", "weight": 0}]}),
]


def _id(case):
    name, params = case
    return name + "".join(f"-{k}={v}" for k, v in params.items())


@pytest.mark.parametrize("case", CASES, ids=map(_id, CASES))
def test_declared_needs_equal_what_the_built_loss_reads(case):
    name, params = case
    declared = needs(name, **params)
    loss = build(name, **params)
    assert declared.fields == loss.requires
    assert declared.full_reference_logits == loss.full_reference_logits


def test_fitted_embeddings_only_for_kernels_that_fit_data():
    assert not needs("dpo").fitted_embeddings
    assert not needs("kernel_dpo", kernel="rbf").fitted_embeddings
    assert needs("kernel_dpo", kernel="mahalanobis").fitted_embeddings
    assert not needs("kernel_dpo", kernel="spectral").fitted_embeddings
    assert needs("kernel_dpo", kernel="spectral", form="eigen").fitted_embeddings
    assert needs("hmk_dpo").fitted_embeddings  # its Mahalanobis member


def test_full_reference_logits_is_declared_by_the_loss_that_perturbs_them():
    assert [n for n in LOSSES if needs(n).full_reference_logits] == ["epsilon_dpo"]


def test_identity_names_the_parts_of_a_composite_loss():
    assert identity("dpo") == {"loss": "dpo", "family": "baseline"}
    assert identity("kernel_dpo") == {"loss": "kernel_dpo", "family": "kernel",
                                      "kernel": "rbf", "divergence": None}
    assert identity("kernel_dpo", kernel="spectral", divergence="js")["kernel"] == "spectral"
    assert identity("hmk_dpo", divergence="kl") == {"loss": "hmk_dpo", "family": "kernel",
                                                    "kernel": "hmk", "divergence": "kl"}
    assert identity("mi_dpo", prior="rdpo")["prior"] == "rdpo"
    assert "divergence" not in identity("fdpo", divergence="js")  # an f-divergence, not a penalty
    assert identity("dpo", use_weighting=True, ld_alpha=0.5) == identity("dpo")
    assert identity("mixture", terms=[{"name": "ipo", "weight": 1}, {"name": "sft", "weight": 2}]
                    ) == {"loss": "mixture", "family": "mixture", "terms": "ipo+sft"}
    assert {identity(n)["family"] for n in ("nca_pair", "bco_pair", "apo_zero", "apo_down",
                                            "sppo_hard")} == {"anchored"}
    assert identity("aot")["family"] == identity("aot_unpaired")["family"] == "distributional"


def _facts(hidden=6, emb=5, vocab=11):
    return ModelFacts(hidden_size=hidden, embedding_dim=emb, vocab_size=vocab,
                      token_embeddings=torch.randn(vocab, 3, generator=torch.Generator()
                                                   .manual_seed(0)))


def test_bind_creates_learnable_parts_at_the_model_size_before_the_optimizer():
    loss = build("kernel_dpo", kernel="mahalanobis", learnable=True).bind(_facts(emb=5))
    assert loss.kernel.raw_factor.shape == (5, 5)
    assert any(p is loss.kernel.raw_factor for p in loss.parameters())
    sparse = build("sparsepo").bind(_facts(hidden=6))
    assert sparse.head.proj.weight.shape == (2, 6)
    assert float(sparse.head.proj.bias.detach().sum()) == 2.0  # the documented start: every mask 1
    prior = build("mi_dpo", prior="sparsepo").bind(_facts(hidden=7))
    assert prior.prior.head.proj.weight.shape == (2, 7)
    hmk = build("hmk_dpo").bind(_facts(emb=4))
    assert hmk.kernel.mahalanobis.raw_factor.shape == (4, 4)


def test_bind_gives_wasserstein_the_model_token_embeddings_unless_given():
    facts = _facts()
    bound = build("kernel_dpo", divergence="wasserstein").bind(facts)
    unit = bound.penalty.divergence.unit_embeddings
    assert torch.allclose(unit, torch.nn.functional.normalize(facts.token_embeddings, dim=-1))
    own = torch.eye(11)
    given = build("kernel_dpo", divergence="wasserstein", token_embeddings=own).bind(facts)
    assert torch.equal(given.penalty.divergence.unit_embeddings, own)


def test_bind_leaves_a_kernel_built_with_its_dimension_alone():
    loss = build("kernel_dpo", kernel="mahalanobis", dim=3).bind(_facts(emb=5))
    assert loss.kernel.raw_factor.shape == (3, 3)


def test_selection_candidates_come_from_the_registries():
    assert kernel_candidates() == ("polynomial", "rbf", "mahalanobis", "spectral")
    assert "hmk" in KERNELS and "hmk" not in kernel_candidates()
    assert set(divergence_candidates()) == {n for n, c in DIVERGENCES.items() if c.candidate}
    assert len(kernel_candidates()) * len(divergence_candidates()) == 28
    assert DIVERGENCES.get_class("wasserstein").support_k() == 8
    assert DIVERGENCES.get_class("wasserstein").support_k(k=3) == 3
    assert DIVERGENCES.get_class("kl").support_k() is None


def test_only_kernel_dpo_declares_a_ranked_pair():
    ranked = {n for n, cls in LOSSES.items() if cls.selection_params}
    assert ranked == {"kernel_dpo"}


# Stages that must ask the registries rather than name their members. The one string allowed
# is the evaluation metric `kl` (the sampled KL of the policy to the reference): a column
# name, not the divergence.
STAGES = ("train", "search", "selection", "reports")
METRIC_NAMES = {"kl"}


def _strings_outside_docstrings(path: Path):
    tree = ast.parse(path.read_text())
    docstrings = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
                and body and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant)):
            docstrings.add(id(body[0].value))
    for node in ast.walk(tree):
        if (isinstance(node, ast.Constant) and isinstance(node.value, str)
                and id(node) not in docstrings):
            yield node.lineno, node.value


def test_no_stage_outside_the_loss_package_names_a_registry_member():
    import raypo

    names = (set(LOSSES) | set(KERNELS) | set(DIVERGENCES)) - METRIC_NAMES
    root = Path(raypo.__file__).parent
    found = []
    for stage in STAGES:
        for path in sorted((root / stage).rglob("*.py")):
            for line, text in _strings_outside_docstrings(path):
                hit = set(re.findall(r"[A-Za-z_0-9]+", text)) & names
                if hit:
                    found.append(f"{path.relative_to(root)}:{line}: {sorted(hit)}")
    assert not found, "\n".join(found)


def test_selection_candidates_are_distinct_penalties_not_scaled_copies():
    """Two candidates whose values are proportional on every pair of distributions would be
    one candidate twice (fdiv with f = kl is kl; renyi at 0.5 is twice bhattacharyya)."""
    g = torch.Generator().manual_seed(0)
    p = torch.randn(64, 12, generator=g, dtype=torch.float64) * 2
    q = torch.randn(64, 12, generator=g, dtype=torch.float64) * 2
    values = {name: DIVERGENCES.create(name)(p, q) for name in divergence_candidates()}
    names = sorted(values)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            ratio = values[a] / values[b]
            assert float(ratio.std() / ratio.mean().abs()) > 0.01, (a, b)
