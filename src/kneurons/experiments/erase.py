"""Experiment 6 — erase a relation by emptying the value slots of the neurons its facts share.

From the knowledge neurons of the relation's located facts keep the ``top_k`` most frequent (the authors used
20) or those shared by ``>= min_facts`` facts; set their value slots to the [UNK] output embedding (``mode="unk"``;
zero where the tokenizer has no unknown token) or to zero. Recorded, for those neurons and for as many random
neurons: perplexity and accuracy on the erased relation's prompts and on other relations' prompts, before and
after. The edit is reverted afterwards. Paper (BERT-base; P19, P27, P106, P937): perplexity on the erased
relation +36.7% to +141.2%, on other relations +1.1% to +10.1%.
"""

from __future__ import annotations

from collections import Counter

from ..interventions import erase_relation, shared_neurons
from ..prompts import assess, perplexity_of
from .assess import is_right
from ..neurons import random_neurons
from .common import Experiment, rng_for, stable_seed
from .units import constant_rows, task


def measure(handle, items: list[tuple[str, str, list[str] | None]], known_rank: int = 1,
            known_among: str = "vocabulary", batch_size: int = 32) -> tuple[float, float]:
    """Perplexity and accuracy (the run's "right" rule) over ``(prompt, gold, candidates)`` triples."""
    if not items:
        return float("nan"), float("nan")
    cands = [c for _, _, c in items] if known_among == "candidates" else None
    res = assess(handle, [p for p, _, _ in items], [t for _, t, _ in items], batch_size=batch_size,
                 candidates=cands)
    return perplexity_of(res), sum(is_right(a, known_rank, known_among) for a in res) / len(res)


def erase_experiment(handle, neuron_sets: list[list], erased: list[tuple[str, str, list[str] | None]],
                     others: list[tuple[str, str, list[str] | None]], random_like=None, top_k: int | None = 20,
                     min_facts: int | None = None, mode: str = "unk", known_rank: int = 1,
                     known_among: str = "vocabulary", batch_size: int = 32) -> list[dict]:
    """Rows per (method, group). ``neuron_sets``: the knowledge neurons of each located fact of the relation;
    ``random_like``: a callable ``(n, exclude) -> n random neurons not in exclude`` for the control (None: no
    control)."""
    chosen = shared_neurons(neuron_sets, min_facts=None if top_k is not None else min_facts, top_k=top_k)
    freq = Counter(tuple(n) for s in neuron_sets for n in set(map(tuple, s)))
    sets = {"kn": chosen}
    if random_like is not None and chosen:
        sets["random"] = random_like(len(chosen), chosen)
    base = {g: measure(handle, it, known_rank, known_among, batch_size) for g, it in (("erased", erased),
                                                                                     ("other", others))}
    rows = []
    for method, neurons in sets.items():
        if not neurons:
            continue
        with erase_relation(handle, [neurons], min_facts=1, mode=mode) as edit:
            after = {g: measure(handle, it, known_rank, known_among, batch_size)
                     for g, it in (("erased", erased), ("other", others))}
            used_mode = edit.info["mode"]
        for g in ("erased", "other"):
            rows.append({"method": method, "group": g, "n_neurons": len(neurons), "mode": used_mode,
                         "n_prompts": len(erased if g == "erased" else others),
                         "mean_facts_per_neuron": (sum(freq.get(tuple(n), 0) for n in neurons) / len(neurons)),
                         "ppl_before": base[g][0], "ppl_after": after[g][0],
                         "acc_before": base[g][1], "acc_after": after[g][1]})
    return rows


def run_erase(runner) -> None:
    cfg = runner.cfg
    wanted = cfg.erase_relations if cfg.erase_relations is not None else list(runner.known)
    chosen = [r for r in wanted if r in runner.known]
    runner.store.set_meta("erase_not_in_run", [r for r in wanted if r not in runner.known])
    bar = runner.bar(len(chosen), "erase", unit="relation")
    rule = {"known_rank": cfg.known_rank, "known_among": cfg.known_among, "batch_size": cfg.assess_batch_size}
    cands = {rid: runner.candidates(rid) if cfg.known_among == "candidates" else None for rid in runner.known}
    for rid in chosen:
        items = runner.known[rid]
        sets = [runner.sets.get(it.fact_id, {}).get("kn", []) for it in items]
        if not any(sets):
            t = task(constant_rows, [{"method": "kn", "n_neurons": 0,
                                      "skipped": "no knowledge neurons in the relation"}])
        else:  # the prompts (other relations' facts seeded by the relation) chosen here; the edits in the task
            erased = [(p, it.object, cands[rid]) for it in items for p in it.prompts]
            r = rng_for(cfg.seed, "erase", rid)
            others = []
            for orid, oitems in runner.known.items():
                if orid != rid:
                    for it in r.sample(oitems, min(cfg.ppl_facts, len(oitems))):
                        others += [(p, it.object, cands[orid]) for p in it.prompts]
            t = task(erase_with_random_control, sets, erased, others, stable_seed(cfg.seed, "erase-random", rid),
                     top_k=cfg.erase_top_k, min_facts=cfg.erase_min_facts, mode=cfg.erase_mode, **rule)
        runner.unit("erase", rid, rid, t, bar)
    runner.join()
    bar.close()


def erase_with_random_control(handle, neuron_sets: list[list], erased, others, random_seed: int,
                              **kwargs) -> list[dict]:
    """:func:`erase_experiment` with as many random neurons (seeded by ``random_seed``) as the control."""
    return erase_experiment(handle, neuron_sets, erased, others,
                            random_like=lambda n, exclude: random_neurons(handle, n, seed=random_seed,
                                                                          exclude=exclude).neurons, **kwargs)


EXPERIMENT = Experiment(
    "erase", "erase relations", "relation", run_erase, needs=("locate",),
    fields=("erase_relations", "erase_top_k", "erase_min_facts", "erase_mode", "ppl_facts"),
    section="erase", summarize="kneurons.report.numbers:erase_section", render="kneurons.report.render:erase_html",
    figures=(("erase", "kneurons.report.figures:erase"),))
