"""Proof on models whose knowledge we know: a synthetic fact world, a tiny GPT-2-type and a tiny BERT-type model
trained on it in the test, and the paper's claims checked against random-neuron controls.

Models are trained with ``kneurons.synthetic.TRAINING`` (no label smoothing, stopped at 90 % training
accuracy), and the claims are checked on the facts they know (top-1 on >= 3 of 4 paraphrases). Thresholds were
chosen from measured values (seed 0, 2-core CPU) with a wide margin, and each is one that the random-neuron
control fails:

=========================  ===================  ===================  ========================================
quantity                   causal (measured)    masked (measured)    asserted
=========================  ===================  ===================  ========================================
known facts located        55 of 60             56 of 60             >= 40
suppress, fact  Δp/p       -33%                 -37%                 <= -10%
suppress, random  Δp/p     +0.0%                +0.1%                |.| <= 1%, and fact drop >= 10x random
suppress, controls Δp/p    -7.3%                -2.1%                fact drop >= 2.5x the controls' mean drop
amplify x2, fact Δp/p      +7.8%                +6.5%                >= +4%, and >= 10x random
amplify x2, random Δp/p    -0.1%                -0.2%
update success@1           95% (random 8%)      7%; 81% head space   causal: >= 60%, random <= 30%; masked: see
                                                (random 4%)          test_updating_facts_masked_needs_the_head_space
erase (top-20), ppl        +53% vs +8% others   +48% vs +6% others   erased relation >= 3x other relations
=========================  ===================  ===================  ========================================

Trained to 99 % with label smoothing 0.1 (the earlier setting) the facts' probabilities sit at the smoothing
ceiling (~0.92) and amplification lowered them (-2.1 %): the claim needs probabilities with room to rise.
"""

from __future__ import annotations

import statistics

import pytest
import torch

from kneurons.interventions import (accuracy, erase_relation, measure_intervention, perplexity, shared_neurons,
                                    success, update_fact, weights_digest)
from kneurons.neurons import locate, random_neurons
from kneurons.synthetic import TRAINING, make_world, train_model

pytestmark = pytest.mark.slow

N_LOCATED = 12  # subjects per relation whose knowledge neurons are located


def _prompts(h, ps):
    return [p.replace("[Y]", "[MASK]") for p in ps] if h.is_masked else list(ps)


def _build(kind: str):
    torch.set_num_threads(2)
    world = make_world(seed=0)
    h = train_model(world, kind, seed=0, **TRAINING[kind])
    located = {}  # the facts the model knows (top-1 on >= 3 of their 4 prompts) among the first subjects
    for r in world.relations:
        for s in world.subjects[:N_LOCATED]:
            ps = _prompts(h, world.prompts(r, s))
            if accuracy(h, ps, world.facts[r][s]) >= 0.75:
                located[(r, s)] = locate(h, ps, world.facts[r][s], steps=20, adaptive=True, min_prompts=2,
                                         keep_attributions=False)
    return world, h, located


@pytest.fixture(scope="module")
def causal():
    return _build("causal")


@pytest.fixture(scope="module")
def masked():
    return _build("masked")


def _controls(world, h, r, s):
    same = [("same_relation", _prompts(h, world.prompts(r, s2))[0], world.facts[r][s2])
            for s2 in world.subjects[N_LOCATED: N_LOCATED + 4]]
    other = [("other_relation", _prompts(h, world.prompts(r2, s))[0], world.facts[r2][s])
             for r2 in world.relations if r2 != r]
    return same + other


def _facts_with_neurons(located):
    items = [(k, kn) for k, kn in located.items() if kn.neurons]
    assert len(items) >= 8, f"only {len(items)} facts got knowledge neurons"
    return items


def _relation_items(world, h, r):
    ps, ts = [], []
    for s in world.subjects:
        for p in _prompts(h, world.prompts(r, s)):
            ps.append(p)
            ts.append(world.facts[r][s])
    return ps, ts


@pytest.mark.parametrize("kind", ["causal", "masked"])
def test_model_learned_the_world(kind, request):
    world, h, located = request.getfixturevalue(kind)
    assert h.train_accuracy >= TRAINING[kind]["target_accuracy"]
    accs = {r: accuracy(h, *_relation_items(world, h, r)) for r in world.relations}
    print(f"{kind}: accuracy per relation {accs}; {len(located)} known facts located")
    assert min(accs.values()) >= 0.6 and statistics.mean(accs.values()) >= 0.85
    assert len(located) >= 40


@pytest.mark.parametrize("kind", ["causal", "masked"])
def test_suppressing_knowledge_neurons(kind, request):
    world, h, located = request.getfixturevalue(kind)
    fact, rnd, ctrl = [], [], []
    for (r, s), kn in _facts_with_neurons(located):
        ps = _prompts(h, world.prompts(r, s))
        res = measure_intervention(h, kn, ps, world.facts[r][s], 0.0, _controls(world, h, r, s))
        res_r = measure_intervention(h, random_neurons(h, kn, seed=1), ps, world.facts[r][s], 0.0)
        fact.append(res.mean_change("fact"))
        ctrl.append(statistics.mean(x["rel_change"] for x in res.rows if x["group"] != "fact"))
        rnd.append(res_r.mean_change("fact"))
    f, c, z = statistics.mean(fact), statistics.mean(ctrl), statistics.mean(rnd)
    print(f"{kind}: suppress fact {f:+.3f}, controls {c:+.3f}, random {z:+.3f} over {len(fact)} facts")
    assert f <= -0.10
    assert abs(z) <= 0.01 and abs(f) >= 10 * abs(z)
    assert abs(f) >= 2.5 * abs(c)


@pytest.mark.parametrize("kind", ["causal", "masked"])
def test_amplifying_knowledge_neurons(kind, request):
    world, h, located = request.getfixturevalue(kind)
    fact, rnd = [], []
    for (r, s), kn in _facts_with_neurons(located):
        ps = _prompts(h, world.prompts(r, s))
        fact.append(measure_intervention(h, kn, ps, world.facts[r][s], 2.0).mean_change("fact"))
        rnd.append(measure_intervention(h, random_neurons(h, kn, seed=1), ps, world.facts[r][s], 2.0)
                   .mean_change("fact"))
    f, z = statistics.mean(fact), statistics.mean(rnd)
    print(f"{kind}: amplify fact {f:+.3f}, random {z:+.3f}")
    assert f >= 0.04 and f >= 10 * abs(z)


def test_updating_facts_causal(causal):
    world, h, located = causal
    digest = weights_digest(h.model)
    ok, ok_rnd = [], []
    for (r, s), kn in _facts_with_neurons(located):
        ps = _prompts(h, world.prompts(r, s))
        new = world.other_object(r, s)
        with update_fact(h, kn, world.facts[r][s], new, prompt=ps[0]):
            ok.append(success(h, ps, new, 1))
        with update_fact(h, random_neurons(h, kn, seed=1), world.facts[r][s], new, prompt=ps[0]):
            ok_rnd.append(success(h, ps, new, 1))
        assert weights_digest(h.model) == digest  # every edit reverted bit-exactly
    print(f"causal: update success@1 {statistics.mean(ok):.2f}, random {statistics.mean(ok_rnd):.2f}")
    assert statistics.mean(ok) >= 0.6 and statistics.mean(ok_rnd) <= 0.3


def test_updating_facts_masked_needs_the_head_space(masked):
    """The paper's rule (t's unembedding row) barely updates the tiny BERT, whose MLM head transforms the
    residual (dense + GELU + LayerNorm) before the tied embeddings; ``space="head"`` (the residual direction that
    head maps to the target) makes t' the top-1 answer for a clear majority. Measured (56 known facts, seed 0):
    7 % vs 81 % success@1, random neurons 4 %; worlds/models of seeds 1 and 2: 69 % and 58 % (paper rule 4 %, 1 %).
    Failures are mostly facts whose neurons write little at the blank (sum of activation x slot norm)."""
    world, h, located = masked
    digest = weights_digest(h.model)
    emb, head, rnd = [], [], []
    for (r, s), kn in _facts_with_neurons(located):
        ps = _prompts(h, world.prompts(r, s))
        new = world.other_object(r, s)
        for out, neurons, space in ((emb, kn, "embedding"), (head, kn, "head"),
                                    (rnd, random_neurons(h, kn, seed=1), "head")):
            with update_fact(h, neurons, world.facts[r][s], new, prompt=ps[0], space=space):
                out.append(success(h, ps, new, 1))
    assert weights_digest(h.model) == digest
    e, g, z = statistics.mean(emb), statistics.mean(head), statistics.mean(rnd)
    print(f"masked: update success@1 embedding space {e:.2f}, head space {g:.2f}, random (head) {z:.2f}")
    assert g >= 0.6 and g >= 4 * max(e, 0.02) and z <= 0.15


@pytest.mark.parametrize("kind", ["causal", "masked"])
def test_erasing_a_relation(kind, request):
    world, h, located = request.getfixturevalue(kind)
    digest = weights_digest(h.model)
    ratios, ratios_rnd, acc_drop, acc_drop_other = [], [], [], []
    base = {r: _relation_items(world, h, r) for r in world.relations}
    ppl0 = {r: perplexity(h, *base[r]) for r in world.relations}
    acc0 = {r: accuracy(h, *base[r]) for r in world.relations}
    for r in world.relations:
        sets = [located[(r, s)] for s in world.subjects[:N_LOCATED] if (r, s) in located]
        if not shared_neurons(sets, top_k=20):
            continue
        with erase_relation(h, sets, top_k=20) as edit:
            ppl = {x: perplexity(h, *base[x]) / ppl0[x] - 1 for x in world.relations}
            acc = {x: acc0[x] - accuracy(h, *base[x]) for x in world.relations}
            n = len(edit.neurons)
        with erase_relation(h, [random_neurons(h, n, seed=3)], top_k=n):
            ppl_rnd = perplexity(h, *base[r]) / ppl0[r] - 1
        others = [ppl[x] for x in world.relations if x != r]
        ratios.append((ppl[r], statistics.mean(others)))
        ratios_rnd.append(ppl_rnd)
        acc_drop.append(acc[r])
        acc_drop_other.append(statistics.mean(acc[x] for x in world.relations if x != r))
    assert weights_digest(h.model) == digest
    assert len(ratios) >= 3
    erased = statistics.mean(a for a, _ in ratios)
    rest = statistics.mean(b for _, b in ratios)
    rnd = statistics.mean(ratios_rnd)
    print(f"{kind}: erase ppl change erased {erased:+.3f}, others {rest:+.3f}, random erase {rnd:+.3f}; "
          f"accuracy drop erased {statistics.mean(acc_drop):.3f}, others {statistics.mean(acc_drop_other):.3f}")
    assert erased >= 3 * max(rest, 0.005)
    assert erased >= 3 * max(rnd, 0.005)
    assert statistics.mean(acc_drop) >= statistics.mean(acc_drop_other)
