"""The weighted mixture of losses: the sum it computes, what it reads and says about itself,
the errors that name the term at fault, and how beta, schedules, step ends, binding and
fitting reach its terms. (TRL's own mixtures are compared in test_trl.py.)"""

from __future__ import annotations

import pytest
import torch

from raypo.losses import ModelFacts, build, identity, needs

from .batches import epsilon_batch, full_batch, leaves

BRIEF = [{"name": "dpo", "weight": 1.0}, {"name": "bco_pair", "weight": 1.0, "beta": 0.2},
         {"name": "sft", "weight": 1.0}]


def test_mixture_is_the_weighted_sum_of_its_terms_batch_losses():
    terms = [{**t, "weight": w} for t, w in zip(BRIEF, (0.5, 2.0, 0.25), strict=True)]
    mix_batch, term_batch = full_batch(seed=1), full_batch(seed=1)
    out = build("mixture", terms=terms)(mix_batch)
    parts = [build("dpo")(term_batch), build("bco_pair", beta=0.2)(term_batch),
             build("sft")(term_batch)]
    expected = 0.5 * parts[0].loss + 2.0 * parts[1].loss + 0.25 * parts[2].loss
    torch.testing.assert_close(out.loss, expected, rtol=1e-12, atol=0)
    out.loss.backward()
    expected.backward()
    for a, b in zip(leaves(mix_batch), leaves(term_batch), strict=True):
        if a.grad is not None or b.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-15)
    for name, part in zip(("dpo", "bco_pair", "sft"), parts, strict=True):
        assert out.metrics[f"{name}_loss"].item() == pytest.approx(part.loss.item())
    # its rewards are its first term's
    torch.testing.assert_close(out.chosen_rewards, parts[0].chosen_rewards)
    assert out.metrics["reward_margin"].item() == pytest.approx(
        parts[0].metrics["reward_margin"].item())
    assert out.metrics["bco_pair_beta"].item() == pytest.approx(0.2)
    assert "sft_beta" not in out.metrics  # sft takes no beta


def test_a_zero_weight_term_is_computed_and_adds_nothing():
    terms = [{"name": "dpo", "weight": 1.0}, {"name": "ipo", "weight": 0}]
    out = build("mixture", terms=terms)(full_batch(seed=2))
    assert out.loss.item() == pytest.approx(build("dpo")(full_batch(seed=2)).loss.item())
    assert out.metrics["ipo_loss"].item() > 0


def test_repeated_names_are_told_apart_in_the_metrics():
    terms = [{"name": "dpo", "weight": 1.0}, {"name": "dpo", "weight": 1.0, "beta": 0.5}]
    out = build("mixture", terms=terms)(full_batch())
    assert {"dpo0_loss", "dpo1_loss"} <= set(out.metrics)


def test_the_default_mixture_is_mpo():
    assert identity("mixture") == {"loss": "mixture", "family": "mixture",
                                   "terms": "dpo+bco_pair+sft"}
    mix = build("mixture")
    assert mix.weights == [0.8, 0.2, 1.0]


def test_needs_are_the_union_of_the_terms_and_known_without_building():
    terms = [{"name": "dpo", "weight": 1}, {"name": "kernel_dpo", "weight": 0.5,
                                            "kernel": "mahalanobis", "divergence": "kl"},
             {"name": "sft", "weight": 1}]
    declared = needs("mixture", terms=terms)
    assert declared.fields == (needs("dpo").fields | needs("sft").fields
                               | needs("kernel_dpo", kernel="mahalanobis",
                                       divergence="kl").fields)
    assert declared.fitted_embeddings and not declared.full_reference_logits
    assert needs("mixture", terms=[{"name": "epsilon_dpo", "weight": 1}]).full_reference_logits
    assert build("mixture", terms=terms).requires == declared.fields


def test_identity_names_the_terms():
    assert identity("mixture", terms=BRIEF) == {"loss": "mixture", "family": "mixture",
                                                "terms": "dpo+bco_pair+sft"}


@pytest.mark.parametrize("terms,match", [
    ([], "terms is empty"),
    ("dpo", "terms must be a list"),
    ([{"name": "dpo", "weight": 1}, "ipo"], r"terms\[1\]: expected \{name"),
    ([{"weight": 1}], r"terms\[0\]: name \(a registered loss\) is missing"),
    ([{"name": "dpo", "weight": 1}, {"name": "dpoo", "weight": 1}],
     r"terms\[1\] \(dpoo\): unknown loss 'dpoo'"),
    ([{"name": "dpo", "weight": 1, "bta": 0.1}], r"terms\[0\] \(dpo\): .*no parameter 'bta'"),
    ([{"name": "ipo", "weight": 1}, {"name": "dpo", "weight": 1, "beta": -1}],
     r"terms\[1\] \(dpo\): dpo: beta must be > 0"),
    ([{"name": "dpo"}], r"terms\[0\] \(dpo\): weight is missing"),
    ([{"name": "dpo", "weight": -0.5}], r"terms\[0\] \(dpo\): weight must be .* >= 0, got -0.5"),
    ([{"name": "dpo", "weight": "1"}], r"terms\[0\] \(dpo\): weight must be"),
    ([{"name": "dpo", "weight": True}], r"terms\[0\] \(dpo\): weight must be"),
    ([{"name": "dpo", "weight": float("nan")}], r"terms\[0\] \(dpo\): weight must be"),
    ([{"name": "mixture", "weight": 1, "terms": [{"name": "dpo", "weight": 1}]}],
     r"terms\[0\] \(mixture\): a mixture cannot be a term of a mixture"),
    ([{"name": "tdpo", "weight": 1, "ld_alpha": 0.5}],
     r"terms\[0\] \(tdpo\): .*no parameter 'ld_alpha'"),
])
def test_bad_terms_are_named_by_index(terms, match):
    with pytest.raises(ValueError, match=match):
        build("mixture", terms=terms)


def test_needs_reports_a_bad_term_by_index_too():
    with pytest.raises(ValueError, match=r"terms\[1\] \(nope\): unknown loss"):
        needs("mixture", terms=[{"name": "dpo", "weight": 1}, {"name": "nope", "weight": 1}])
    with pytest.raises(ValueError, match=r"terms\[0\] \(kernel_dpo\): .*unknown parameter"):
        needs("mixture", terms=[{"name": "kernel_dpo", "weight": 1, "sigmaa": 1.0}])


def test_a_beta_schedule_scales_every_terms_beta_by_one_factor():
    mix = build("mixture", terms=BRIEF)  # dpo 0.1, bco_pair 0.2, sft (no beta)
    assert mix.beta.item() == pytest.approx(0.1)
    mix.set_beta(0.05)
    assert mix.beta.item() == pytest.approx(0.05)
    assert mix.terms[0].beta.item() == pytest.approx(0.05)
    assert mix.terms[1].beta.item() == pytest.approx(0.1)  # the ratio 2 kept
    out = mix(full_batch())
    assert out.metrics["beta"].item() == pytest.approx(0.05)


def test_step_ends_reach_stateful_terms_and_state_resumes():
    terms = [{"name": "epsilon_dpo", "weight": 1, "beta": 0.1, "eps": 0.05},
             {"name": "beta_dpo", "weight": 0.5}]
    mix = build("mixture", terms=terms)
    mix(epsilon_batch(1.0))  # s = +1 on every pair
    mix.on_step_end()
    assert mix.terms[0].beta.item() == pytest.approx(0.1 / 1.05)
    assert mix.beta.item() == pytest.approx(0.1 / 1.05)  # follows its first term
    assert bool(mix.terms[1].m0_initialized)
    resumed = build("mixture", terms=terms)
    resumed.load_state_dict(mix.state_dict())
    assert resumed.terms[0].beta.item() == pytest.approx(mix.terms[0].beta.item())
    assert resumed.terms[1].m0.item() == pytest.approx(mix.terms[1].m0.item())
    assert resumed.beta.item() == pytest.approx(mix.beta.item())


def test_bind_and_fit_reach_the_terms():
    facts = ModelFacts(hidden_size=6, embedding_dim=3, vocab_size=7)
    terms = [{"name": "dpo", "weight": 1}, {"name": "sparsepo", "weight": 1},
             {"name": "kernel_dpo", "weight": 1, "kernel": "mahalanobis", "learnable": True}]
    mix = build("mixture", terms=terms).bind(facts)
    assert mix.terms[1].head.proj.weight.shape == (2, 6)
    assert mix.terms[2].kernel.raw_factor.shape == (3, 3)
    params = {id(p) for p in mix.parameters()}
    assert id(mix.terms[2].kernel.raw_factor) in params  # the optimizer sees term parameters
    fixed = build("mixture", terms=[{"name": "kernel_dpo", "weight": 1,
                                     "kernel": "mahalanobis"}])
    embeddings = torch.randn(50, 3, generator=torch.Generator().manual_seed(0)) * torch.tensor(
        [1.0, 3.0, 0.3])
    before = fixed.terms[0](full_batch(D=3)).loss.item()
    fixed.fit(embeddings)
    assert fixed.terms[0](full_batch(D=3)).loss.item() != pytest.approx(before, rel=1e-9)


def test_mixture_modes_reach_the_terms():
    mix = build("mixture", terms=[{"name": "epsilon_dpo", "weight": 1}]).eval()
    assert not mix.terms[0].training
    mix(epsilon_batch(1.0))
    mix.on_step_end()  # nothing gathered in eval mode
    assert mix.terms[0].beta.item() == pytest.approx(0.01)
