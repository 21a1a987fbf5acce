"""Proof on models whose knowledge we know: synthetic fact worlds, tiny GPT-2-type and BERT-type models trained
on them in the test, and the paper's claims checked against controls with paired statistics.

Three trials per kind (seeds 0, 1, 2: each its own world and model, see ``tests/worlds.py``), each trained,
located and measured in a worker process on one thread, so its numbers are the same at any thread setting. Every claim is checked on per-fact
*paired* differences pooled over the trials (knowledge neurons minus the same number of random neurons on the
same fact; the fact minus its control facts under the same edit) and asserted through a one-sided 99 % confidence
bound (``tests/paired.py``: the sign-test bound of the median, the exact sign test for paired successes,
Clopper-Pearson for a rate). The margin is the
bound itself: a claim passes only if it holds with 99 % confidence on these facts, not by being above a number
read off one run. What is asserted, and what was measured, is in README ("Synthetic fact world").
"""

from __future__ import annotations

import statistics

import pytest

from paired import median_lower_bound, proportion_lower_bound, sign_test_p
from worlds import SEEDS, build_trials

pytestmark = pytest.mark.slow

ALPHA = 0.01


@pytest.fixture(scope="module")
def trials():
    return build_trials()


def _facts(trials, kind):
    return [dict(x, seed=t.seed) for t in trials[kind] for x in t.facts]


def _by_seed(rows, key, stat=statistics.median):
    return [round(stat(x[key] for x in rows if x["seed"] == s), 4) for s in SEEDS]


@pytest.mark.parametrize("kind", ["causal", "masked"])
def test_models_learned_their_worlds(kind, trials):
    for t in trials[kind]:
        print(f"{kind} seed {t.seed}: training accuracy {t.accuracy:.3f} after {t.steps} steps, {t.located} of "
              f"{t.candidates} facts known and located")
        # far above chance (1 of 8 objects) with 99 % confidence, and enough known facts to test claims on
        assert proportion_lower_bound(round(t.accuracy * t.sentences), t.sentences, ALPHA) > 3 / 8
        assert t.located >= 15
        assert t.reverted  # every edit of the trial was reverted bit-exactly


@pytest.mark.parametrize("kind", ["causal", "masked"])
def test_suppressing_knowledge_neurons(kind, trials):
    rows = _facts(trials, kind)
    vs_random = [x["suppress_random"] - x["suppress"] for x in rows]  # > 0: the fact drops more than with random
    vs_controls = [x["controls"] - x["suppress"] for x in rows]  # > 0: the fact drops more than its controls
    print(f"{kind}: suppress Δp/p per seed, median {_by_seed(rows, 'suppress')} mean "
          f"{_by_seed(rows, 'suppress', statistics.mean)}; random {_by_seed(rows, 'suppress_random')}; controls "
          f"{_by_seed(rows, 'controls')}; {len(rows)} facts; per-fact differences, 99% lower bounds of the median: "
          f"vs random {median_lower_bound(vs_random):+.4f}, vs controls {median_lower_bound(vs_controls):+.4f}")
    assert median_lower_bound(vs_random, ALPHA) > 0
    assert median_lower_bound(vs_controls, ALPHA) > 0
    assert statistics.median(_by_seed(rows, "suppress")) < 0  # the median fact of the median seed goes down


@pytest.mark.parametrize("kind", ["causal", "masked"])
def test_amplifying_knowledge_neurons(kind, trials):
    """Doubling a fact's knowledge neurons raises its probability more than doubling as many random neurons, for
    the typical fact (99 % lower bound of the median per-fact difference above 0). The paper's claim is about
    the average; on these tiny models the average is carried by a few facts either way (one BERT-type seed
    lowers its facts by 10 % on average) and is printed, not asserted: README, "Synthetic fact world"."""
    rows = _facts(trials, kind)
    diffs = [x["amplify"] - x["amplify_random"] for x in rows]
    print(f"{kind}: amplify Δp/p per seed, median {_by_seed(rows, 'amplify')} mean "
          f"{_by_seed(rows, 'amplify', statistics.mean)}, random {_by_seed(rows, 'amplify_random')}; per-fact "
          f"difference median {statistics.median(diffs):+.4f} (99% lower bound {median_lower_bound(diffs):+.4f}), "
          f"mean {statistics.mean(diffs):+.4f}, up for "
          f"{sum(d > 0 for d in diffs)} of {len(diffs)}")
    assert median_lower_bound(diffs, ALPHA) > 0


def _wins(rows, a, b):
    return sum(x[a] > x[b] for x in rows), sum(x[a] < x[b] for x in rows)


def test_updating_facts_causal(trials):
    rows = [x for t in trials["causal"] for x in t.updates]
    wins, losses = _wins(rows, "kn", "random")
    flipped = sum(x["kn"] > 0.5 for x in rows)  # t' top-1 on most of the fact's prompts
    print(f"causal: update success@1 {statistics.mean(x['kn'] for x in rows):.2f}, random "
          f"{statistics.mean(x['random'] for x in rows):.2f}; better than random on {wins} facts, worse on "
          f"{losses}; flipped {flipped} of {len(rows)} (99% lower bound {proportion_lower_bound(flipped, len(rows)):.2f})")
    assert sign_test_p(wins, losses) < ALPHA
    assert proportion_lower_bound(flipped, len(rows), ALPHA) > 0.5  # a majority of facts, with 99 % confidence


def test_updating_facts_masked_needs_the_head_space(trials):
    """The paper's rule (t's unembedding row) barely updates the tiny BERT, whose MLM head transforms the
    residual (dense + GELU + LayerNorm) before the tied embeddings; ``space="head"`` (the residual direction that
    head maps to the target) updates many more facts, and random neurons in that space do not."""
    rows = [x for t in trials["masked"] for x in t.updates]
    vs_paper, vs_random = _wins(rows, "kn", "paper"), _wins(rows, "kn", "random")
    print(f"masked: update success@1 head space {statistics.mean(x['kn'] for x in rows):.2f}, paper's rule "
          f"{statistics.mean(x['paper'] for x in rows):.2f}, random neurons (head space) "
          f"{statistics.mean(x['random'] for x in rows):.2f}; head space better/worse than the paper's rule on "
          f"{vs_paper} facts, than random on {vs_random}, of {len(rows)}")
    assert sign_test_p(*vs_paper) < ALPHA
    assert sign_test_p(*vs_random) < ALPHA


@pytest.mark.parametrize("kind", ["causal", "masked"])
def test_optimize_edits_through_knowledge_neurons(kind, trials):
    """KN-constrained editing (update_fact(method="optimize"): only the value slots of the fact's knowledge
    neurons move, bounded, with a KL term keeping four other subjects of the relation): it flips most facts (t' top-1
    on at least 3 of 4 prompts) where as many random neurons with the same budget do not, and the subject's other
    relations mostly keep their top-1 answer. Other subjects of the same relation (not the preserved ones) are
    hurt more than by the random control: the knowledge neurons are largely relation neurons, and an edit through
    them spills over to the relation. Issue 14 aimed at >= 90 % of facts flipped with >= 90 % of other subjects
    unchanged: the flips get there (measured 46/48 causal, 43/48 masked), the other subjects do not (0.56 and
    0.73; README, "Fact-specific neurons and edits")."""
    rows = [x for t in trials[kind] for x in t.optimized]
    flipped = sum(x["kn"] >= 0.75 for x in rows)
    flipped_rnd = sum(x["random"] >= 0.75 for x in rows)
    wins, losses = _wins(rows, "kn", "random")
    kept = [x["kn_kept_subjects"] for x in rows]
    kept_rel = [x["kn_kept_relations"] for x in rows]
    print(f"{kind}: optimize flips {flipped}/{len(rows)} facts (99% lower bound "
          f"{proportion_lower_bound(flipped, len(rows), ALPHA):.2f}), random neurons {flipped_rnd}; other subjects "
          f"unchanged {statistics.mean(kept):.2f} (random {statistics.mean(x['random_kept_subjects'] for x in rows):.2f}),"
          f" other relations {statistics.mean(kept_rel):.2f}; steps {statistics.mean(x['kn_steps'] for x in rows):.1f} "
          f"vs {statistics.mean(x['random_steps'] for x in rows):.1f}")
    assert sign_test_p(wins, losses) < ALPHA and wins > losses
    assert proportion_lower_bound(flipped, len(rows), ALPHA) > 0.7
    n_kept_rel = round(sum(kept_rel) * 4)  # four other relations per fact
    assert proportion_lower_bound(n_kept_rel, 4 * len(rows), ALPHA) > 0.6
    spill = _wins(rows, "random_kept_subjects", "kn_kept_subjects")  # the relation-neuron spill-over, paired
    assert sign_test_p(*spill) < ALPHA and spill[0] > spill[1]


@pytest.mark.parametrize("kind", ["causal", "masked"])
def test_erasing_a_relation(kind, trials):
    """Erasing a relation's top-20 shared neurons raises the perplexity on that relation more than on the other
    relations and more than erasing as many random neurons: per (trial, relation) pair, pooled."""
    rows = [x for t in trials[kind] for x in t.erasures]
    vs_others = [x["ppl"] - x["ppl_others"] for x in rows]
    vs_random = [x["ppl"] - x["ppl_random"] for x in rows]
    acc_vs_others = [x["acc_drop"] - x["acc_drop_others"] for x in rows]
    print(f"{kind}: erase, perplexity change of the erased relation minus the others' (median "
          f"{statistics.median(vs_others):+.3f}, 99% bound {median_lower_bound(vs_others):+.3f}), minus random "
          f"erasure ({statistics.median(vs_random):+.3f}, {median_lower_bound(vs_random):+.3f}); accuracy drop minus "
          f"the others' (median {statistics.median(acc_vs_others):+.3f}, mean {statistics.mean(acc_vs_others):+.3f}, "
          f"up in {sum(d > 0 for d in acc_vs_others)} of {len(acc_vs_others)}) over {len(rows)} erasures")
    assert len(rows) >= 12
    assert median_lower_bound(vs_others, ALPHA) > 0
    assert median_lower_bound(vs_random, ALPHA) > 0
    assert statistics.mean(acc_vs_others) > 0
