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
