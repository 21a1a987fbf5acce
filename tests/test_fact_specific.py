"""Fact-specific neurons and edits (issue 14): relation neurons, fact-specific sets, the relation specificity of
an intervention, erasing given relation neurons, and the KN-constrained optimize update's mechanics. The science
(flips, neighbours kept, random controls) is asserted on trained worlds in test_synthetic_world.py."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import handle_for
from kneurons import KnowledgeNeurons, erase_relation, update_fact
from kneurons.errors import KneuronsError
from kneurons.interventions import InterventionResult, OptimizeSettings, applied_edits, weights_digest
from kneurons.neurons import fact_specific, relation_neurons
from kneurons.prompts import assess

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

PROMPT = "the capital of france is ___ ."


def _kn(neurons, coarse=(), target="t", model=None):
    return KnowledgeNeurons(list(neurons), ["a [Y]", "b [Y]"], target, [list(c) for c in coarse], [0.5, 0.5], {},
                            model if model is not None else {"name": "m", "n_layers": 4, "d_ff": 8},
                            "integrated_gradients")


def test_relation_neurons_count_facts_above_q(tmp_path):
    sets = [_kn([(1, 2), (3, 4)], [[(1, 2), (0, 0)]]), _kn([(1, 2), (2, 2)], [[(0, 0)]]),
            _kn([(1, 2), (3, 4)], [[(0, 0)], [(3, 1)]]), _kn([(2, 5)], [[(2, 5)]])]
    rel = relation_neurons(sets, q=0.5)
    assert rel.neurons == [(1, 2)]  # in 3 of 4 facts; (3, 4) is in exactly half: not more than q
    assert rel.method == "relation" and rel.params["facts"] == 4 and rel.params["fact_counts"] == [[1, 2, 3]]
    assert relation_neurons(sets, q=0.25).neurons == [(1, 2), (3, 4)]
    assert relation_neurons(sets, q=0.1).neurons == [(1, 2), (3, 4)]  # (2, 2), (2, 5): one fact each, no relation's
    assert relation_neurons(sets, q=0.1, min_facts=1).neurons == [(1, 2), (2, 2), (2, 5), (3, 4)]
    assert relation_neurons(sets, q=0.5, level="coarse").neurons == [(0, 0)]  # coarse in 3 facts' prompts
    back = KnowledgeNeurons.load(rel.save(tmp_path / "rel.json"))
    assert back.neurons == rel.neurons and back.method == "relation" and back.params == rel.params
    assert list(back.to_dataframe()[["layer", "neuron"]].itertuples(index=False, name=None)) == [(1, 2)]

    spec = fact_specific(sets[0], rel)
    assert spec.neurons == [(3, 4)] and spec.method == "fact_specific"
    assert spec.params["relation_neurons_removed"] == 1 and spec.params["from_method"] == "integrated_gradients"
    assert fact_specific(sets[0], [(3, 4)]).neurons == [(1, 2)]  # a plain neuron list works too


@pytest.mark.parametrize("kw, match", [({"q": 1.5}, "q"), ({"level": "both"}, "level")])
def test_relation_neurons_bad_input(kw, match):
    sets = [_kn([(1, 2)]), _kn([(1, 2)])]
    with pytest.raises(KneuronsError, match=match):
        relation_neurons(sets, **kw)
    with pytest.raises(KneuronsError, match="at least 2 facts"):
        relation_neurons(sets[:1])
    with pytest.raises(KneuronsError, match="different models"):
        relation_neurons([_kn([(1, 2)]), _kn([(1, 2)], model={"name": "other", "n_layers": 4, "d_ff": 8})])


def test_relation_specificity_separates_fact_from_relation_neurons():
    def result(fact, same, other):
        rows = [{"group": g, "rel_change": v} for g, vs in (("fact", fact), ("same_relation", same),
                                                             ("other_relation", other)) for v in vs]
        return InterventionResult(0.0, [(0, 0)], rows)

    relation_like = result([-0.9, -0.8], [-0.7, -0.6], [-0.05, 0.05])
    assert relation_like.relation_specificity == pytest.approx(0.85 / 0.65)
    assert relation_like.specificity == pytest.approx(0.85 / abs((-0.7 - 0.6 - 0.05 + 0.05) / 4))
    fact_like = result([-0.9, -0.8], [-0.1, 0.0], [0.0, 0.0])
    assert fact_like.relation_specificity == pytest.approx(17.0)
    s = fact_like.summary()
    assert s["relation_specificity"] == fact_like.relation_specificity and s["specificity"] == fact_like.specificity
    assert math.isnan(result([-0.9], [], [0.1]).relation_specificity)  # no same-relation controls: undefined


def test_erase_given_relation_neurons_and_revert():
    h = handle_for("gpt2")
    digest = weights_digest(h.model)
    rel = relation_neurons([_kn([(0, 1), (1, 3)], model={}), _kn([(0, 1), (1, 3)], model={})], q=0.5)
    with erase_relation(h, neurons=rel) as edit:
        assert edit.slots == {(0, 1), (1, 3)} and edit.info["given_neurons"]
        for l, i in edit.slots:
            assert torch.count_nonzero(h.arch.value_slots(l)[i]) == 0
    assert weights_digest(h.model) == digest
    with pytest.raises(KneuronsError, match="one of them"):
        erase_relation(h, [rel], top_k=2, neurons=rel)
    with pytest.raises(KneuronsError, match="one of them"):
        erase_relation(h)


def _changed_slots(h, before):
    """(layer, neuron) of every value slot that differs from ``before``, and whether anything else changed."""
    changed, other = set(), False
    for name, v in h.model.state_dict().items():
        if torch.equal(v, before[name]):
            continue
        layer = next((l for l in range(h.n_layers) if v.data_ptr() == h.arch.ffn_out[l].weight.data_ptr()), None)
        if layer is None:
            other = True
            continue
        diff = (h.arch.value_slots(layer) != (before[name] if h.arch.transposed else before[name].t())).any(-1)
        changed |= {(layer, int(i)) for i in diff.nonzero()[:, 0]}
    return changed, other


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "bert"])
def test_optimize_changes_only_the_slots_and_reverts(model_type):
    """The search's hook (output + x[idx] @ Δ) is the written slot change: log P(new) it reports equals the edited
    model's own (float64), only the named slots differ, and revert() is bit-exact."""
    h = handle_for(model_type, dtype=torch.float64)
    prompt = "the capital of [MASK] is paris ." if h.is_masked else PROMPT
    old, new = ("france", "italy") if h.is_masked else ("paris", "rome")
    neurons = [(0, 1), (1, 5), (1, 7)]
    before = {k: v.clone() for k, v in h.model.state_dict().items()}
    digest = weights_digest(h.model)
    p0 = assess(h, [prompt], new)[0].logprob
    edit = update_fact(h, neurons, old, new, method="optimize", prompts=[prompt], locality=[prompt.replace(
        "capital", "city")], settings=OptimizeSettings(steps=15))
    changed, other = _changed_slots(h, before)
    assert changed == set(neurons) and not other
    got = assess(h, [prompt], new)[0].logprob
    assert got == pytest.approx(edit.info["logprob_new"][0], abs=1e-9)
    assert got > p0  # the search moved the new answer up
    assert edit.info["method"] == "optimize" and edit.info["settings"]["steps"] == 15
    rel = max(float((h.arch.value_slots(l)[i].detach() - (before_slot := _slot(before, h, l, i))).norm()
                    / before_slot.norm()) for l, i in neurons)
    assert rel <= OptimizeSettings().bound * (1 + 1e-9)
    assert applied_edits(h) == [edit] and applied_edits(h.model) == [edit]  # a handle or its module (Llama's has
    edit.revert()                                                           # an inner .model: not that one)
    assert weights_digest(h.model) == digest and not applied_edits(h) and not applied_edits(h.model)


def _slot(state, h, l, i):
    name = next(k for k, v in h.model.state_dict().items() if v.data_ptr() == h.arch.ffn_out[l].weight.data_ptr())
    w = state[name]
    return (w if h.arch.transposed else w.t())[i]


def test_optimize_bound_is_respected_and_layer_baseline_runs():
    h = handle_for("gpt2", dtype=torch.float64)
    before = {k: v.clone() for k, v in h.model.state_dict().items()}
    tight = OptimizeSettings(steps=30, lr=0.5, bound=0.05, margin=100.0)  # never succeeds: runs every step
    neurons = [(1, i) for i in range(h.d_ff)]  # a whole layer: the fine-tuning baseline's shape
    with update_fact(h, neurons, "paris", "rome", method="optimize", prompts=[PROMPT], settings=tight) as e:
        assert e.info["steps_taken"] == 30 and e.info["success"] is False
        assert e.info["max_relative_change"] <= 0.05 * (1 + 1e-9)
        for i in range(h.d_ff):
            d = (h.arch.value_slots(1)[i].detach() - _slot(before, h, 1, i)).norm() / _slot(before, h, 1, i).norm()
            assert float(d) <= 0.05 * (1 + 1e-6)


def test_optimize_failure_leaves_the_model_unedited():
    h = handle_for("gpt2")
    digest = weights_digest(h.model)
    h.model.train()
    flags = [p.requires_grad for p in h.model.parameters()]
    with pytest.raises(KneuronsError):  # a preservation prompt without a blank: refused inside the search
        update_fact(h, [(0, 1)], "paris", "rome", method="optimize", prompts=[PROMPT], locality=["no blank here"])
    assert weights_digest(h.model) == digest and not applied_edits(h)
    assert [p.requires_grad for p in h.model.parameters()] == flags and h.model.training  # both restored


@pytest.mark.parametrize("kw, match", [
    ({"method": "finetune"}, "update method"),
    ({"method": "optimize", "settings": OptimizeSettings(steps=0)}, "steps"),
    ({"method": "optimize", "settings": OptimizeSettings(lr=-1.0)}, "lr"),
    ({"method": "optimize", "settings": OptimizeSettings(bound=float("inf"))}, "bound"),
    ({"method": "optimize", "prompts": []}, "edit prompt"),
    ({"locality": ["x [Y]"]}, "belong to method='optimize'"),
])
def test_optimize_bad_input(kw, match):
    h = handle_for("gpt2")
    with pytest.raises(KneuronsError, match=match):
        update_fact(h, [(0, 1)], "paris", "rome", **kw)
    assert not applied_edits(h)
