"""Trials for the science tests: tiny models trained on synthetic fact worlds, measured against controls.

Each (kind, seed) is one trial: its own world (``make_world(seed=seed, **WORLD)``), its own model trained with
``kneurons.synthetic.TRAINING`` (one thread, attention fixed at construction, stopped at 90 % training accuracy),
the knowledge neurons of the facts it knows among the first ``N_LOCATED`` subjects of each relation, and every
measurement the tests assert on. A trial runs in a worker process on ONE thread from training to the last
measurement, so its numbers are the same whatever the thread setting of the test process (``OMP_NUM_THREADS``
1, 2 or unset); trials run in a pool with one worker per core. Workers return plain numbers.
"""

from __future__ import annotations

import os
import statistics
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context

SEEDS = (0, 1, 2)
WORLD = dict(n_subjects=40, n_objects=8)  # per seed: 40 subjects x 5 relations, 4 paraphrases each
N_LOCATED = 6  # subjects per relation whose knowledge neurons are located (the next 4 give controls)
KNOWN = 0.75  # a fact is known when it is the top-1 answer on at least 3 of its 4 prompts
N_HEAD_UPDATES = 16  # facts per masked trial updated in the head space (~1 s per edit)
N_OPTIMIZED = 16  # facts per trial edited by the KN-constrained optimize update (and its random control)
ERASE_TOP_K = 20


@dataclass
class Trial:
    kind: str
    seed: int
    accuracy: float  # training accuracy at the stop
    steps: int
    sentences: int  # training sentences
    candidates: int  # facts tried: the first N_LOCATED subjects of every relation
    located: int  # the known ones among them, with their knowledge neurons
    facts: list = field(default_factory=list)  # per known fact with neurons: Δp/p under the interventions
    updates: list = field(default_factory=list)  # per fact: success@1 of the update (kn / random / paper's rule)
    optimized: list = field(default_factory=list)  # per fact: optimize-edit through kn / random neurons
    erasures: list = field(default_factory=list)  # per erased relation: perplexity / accuracy changes
    reverted: bool = True  # every edit reverted bit-exactly


def prompts(handle, ps):
    return [p.replace("[Y]", "[MASK]") for p in ps] if handle.is_masked else list(ps)


def _relation_items(world, h, r):
    ps, ts = [], []
    for s in world.subjects:
        for p in prompts(h, world.prompts(r, s)):
            ps.append(p)
            ts.append(world.facts[r][s])
    return ps, ts


def run_trial(kind: str, seed: int) -> Trial:
    """Train, locate and measure one trial on one thread (the worker's job)."""
    import torch

    from kneurons.interventions import (accuracy, erase_relation, measure_intervention, perplexity,
                                        shared_neurons, success, update_fact, weights_digest)
    from kneurons.neurons import locate, random_neurons
    from kneurons.prompts import assess
    from kneurons.synthetic import TRAINING, make_world, train

    torch.set_num_threads(1)
    w = make_world(seed=seed, **WORLD)
    tr = train(w, kind, seed=seed, **TRAINING[kind])
    h = tr.handle
    digest = weights_digest(h.model)
    located = {}
    for r in w.relations:
        for s in w.subjects[:N_LOCATED]:
            ps = prompts(h, w.prompts(r, s))
            if accuracy(h, ps, w.facts[r][s]) >= KNOWN:
                located[(r, s)] = locate(h, ps, w.facts[r][s], steps=20, adaptive=True, min_prompts=2,
                                         keep_attributions=False)
    known = [(k, kn) for k, kn in located.items() if kn.neurons]
    trial = Trial(kind, seed, tr.accuracy, tr.steps, sum(1 for _ in w.sentences()), N_LOCATED * len(w.relations),
                  len(known))

    for i, ((r, s), kn) in enumerate(known):
        ps, obj = prompts(h, w.prompts(r, s)), w.facts[r][s]
        rnd = random_neurons(h, kn, seed=i)
        same = [("same_relation", prompts(h, w.prompts(r, s2))[0], w.facts[r][s2])
                for s2 in w.subjects[N_LOCATED: N_LOCATED + 4]]
        other = [("other_relation", prompts(h, w.prompts(r2, s))[0], w.facts[r2][s]) for r2 in w.relations
                 if r2 != r]
        sup = measure_intervention(h, kn, ps, obj, 0.0, same + other)
        trial.facts.append(dict(
            fact=(r, s), suppress=sup.mean_change("fact"),
            controls=statistics.mean(x["rel_change"] for x in sup.rows if x["group"] != "fact"),
            suppress_random=measure_intervention(h, rnd, ps, obj, 0.0).mean_change("fact"),
            amplify=measure_intervention(h, kn, ps, obj, 2.0).mean_change("fact"),
            amplify_random=measure_intervention(h, rnd, ps, obj, 2.0).mean_change("fact")))

        # updates: the paper's rule on the causal model; on the masked one the head space (and the paper's rule)
        if kind == "masked" and i >= N_HEAD_UPDATES:
            continue
        space = "head" if kind == "masked" else "embedding"
        new = w.other_object(r, s)
        arms = [("kn", kn, space), ("random", rnd, space)] + ([("paper", kn, "embedding")] if kind == "masked" else [])
        row = {}
        for name, neurons, sp in arms:
            with update_fact(h, neurons, obj, new, prompt=ps[0], space=sp):
                row[name] = success(h, ps, new, 1)
        trial.updates.append(row)

    for i, ((r, s), kn) in enumerate(known[:N_OPTIMIZED]):  # KN-constrained optimization; random: same budget
        ps, obj, new = prompts(h, w.prompts(r, s)), w.facts[r][s], w.other_object(r, s)
        # neighbours: other subjects of the relation (not the preserved ones), and the subject's other relations
        subjects = [(prompts(h, w.prompts(r, s2))[0], w.facts[r][s2]) for s2 in w.subjects[N_LOCATED: N_LOCATED + 4]]
        relations = [(prompts(h, w.prompts(r2, s))[0], w.facts[r2][s]) for r2 in w.relations if r2 != r]
        preserve = [prompts(h, w.prompts(r, s2))[0] for s2 in w.subjects[N_LOCATED + 4: N_LOCATED + 8]]
        top0 = {k: [a.top[0].token_id for a in assess(h, [p for p, _ in g], [t for _, t in g])]
                for k, g in (("subjects", subjects), ("relations", relations))}
        row = {}
        for name, neurons in (("kn", kn), ("random", random_neurons(h, kn, seed=i))):
            with update_fact(h, neurons, obj, new, method="optimize", prompts=ps, locality=preserve) as edit:
                row[name] = success(h, ps, new, 1)
                for k, g in (("subjects", subjects), ("relations", relations)):
                    now = [a.top[0].token_id for a in assess(h, [p for p, _ in g], [t for _, t in g])]
                    row[f"{name}_kept_{k}"] = statistics.mean(b == a for b, a in zip(top0[k], now))
                row[name + "_steps"] = edit.info["steps_taken"]
        trial.optimized.append(row)

    base = {r: _relation_items(w, h, r) for r in w.relations}
    ppl0 = {r: perplexity(h, *base[r]) for r in w.relations}
    acc0 = {r: accuracy(h, *base[r]) for r in w.relations}
    for r in w.relations:
        sets = [kn for (r2, _), kn in located.items() if r2 == r]
        if not shared_neurons(sets, top_k=ERASE_TOP_K):
            continue
        with erase_relation(h, sets, top_k=ERASE_TOP_K) as edit:
            ppl = {x: perplexity(h, *base[x]) / ppl0[x] - 1 for x in w.relations}
            drop = {x: acc0[x] - accuracy(h, *base[x]) for x in w.relations}
            n = len(edit.neurons)
        with erase_relation(h, [random_neurons(h, n, seed=3)], top_k=n):
            ppl_rnd = perplexity(h, *base[r]) / ppl0[r] - 1
        others = [x for x in w.relations if x != r]
        trial.erasures.append(dict(relation=r, ppl=ppl[r], ppl_others=statistics.mean(ppl[x] for x in others),
                                   ppl_random=ppl_rnd, acc_drop=drop[r],
                                   acc_drop_others=statistics.mean(drop[x] for x in others)))
    trial.reverted = weights_digest(h.model) == digest
    return trial


def build_trials(kinds=("causal", "masked"), seeds=SEEDS) -> dict[str, list[Trial]]:
    """Every (kind, seed) trial, run in parallel worker processes (spawned: no state shared with the tests)."""
    jobs = [(k, s) for k in sorted(kinds, reverse=True) for s in seeds]  # masked first: it trains longest
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    with ProcessPoolExecutor(max(1, min(len(jobs), cores)), mp_context=get_context("spawn")) as pool:
        done = list(pool.map(run_trial, *zip(*jobs)))
    trials: dict[str, list[Trial]] = {k: [] for k in kinds}
    for t in done:
        trials[t.kind].append(t)
    return trials
