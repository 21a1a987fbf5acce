"""Experiment 2 — locate: refined knowledge neurons of each known fact, with the two baselines.

Per fact: ``kn`` (the run's method, integrated gradients by default — any name of
:data:`kneurons.attribution.METHODS` —, coarse ``threshold x max``, refined over the fact's prompts, adaptive p
by default as the authors did), ``activation`` (the paper's baseline: activation above ``0.5 x max``, same
refining) and ``random`` (as many random neurons as ``kn`` found, seeded by the fact).
:func:`locate_stats` gives the paper's statistics: neurons per fact, layer distribution, and how many neurons
facts of the same relation share compared with facts of different relations.
"""

from __future__ import annotations

import time
from collections import Counter
from itertools import combinations

from ..attribution import DEFAULT_BATCH_SIZE
from ..neurons import activation_baseline, locate, random_neurons
from .common import FactItem, mean, stable_seed
from .common import Experiment
from .units import task

NEURON_SETS = ("kn", "activation", "random")  # the rows of each fact


def _row(method: str, kn, seconds: float) -> dict:
    return {"method": method, "n_neurons": len(kn.neurons), "neurons": [list(n) for n in kn.neurons],
            "p_used": kn.params.get("p_used"), "mean_base_prob": mean(kn.base_probs), "seconds": seconds}


def locate_fact(handle, item: FactItem, seed: int = 0, steps: int = 20, threshold: float = 0.2, p: float = 0.7,
                min_prompts: int = 3, adaptive: bool = True, activation_threshold: float = 0.5,
                score: str = "prob", batch_size: int = DEFAULT_BATCH_SIZE,
                method: str = "integrated_gradients", foils=None) -> list[dict]:
    """Rows for ``kn`` (found by ``method``; ``foils``: the other answers a contrastive score compares with),
    ``activation`` and ``random`` neurons of one fact (needs >= 2 prompts)."""
    t = time.perf_counter()
    kn = locate(handle, list(item.prompts), item.object, steps=steps, threshold=threshold, p=p,
                min_prompts=min_prompts, adaptive=adaptive, score=score, batch_size=batch_size,
                keep_attributions=False, method=method, seed=stable_seed(seed, "kn", item.fact_id), foils=foils)
    rows = [_row("kn", kn, time.perf_counter() - t)]
    t = time.perf_counter()
    act = activation_baseline(handle, list(item.prompts), item.object, threshold=activation_threshold, p=p,
                              min_prompts=min_prompts, adaptive=adaptive)
    rows.append(_row("activation", act, time.perf_counter() - t))
    if kn.neurons:
        rnd = random_neurons(handle, kn, seed=stable_seed(seed, "random", item.fact_id))
        rows.append({"method": "random", "n_neurons": len(rnd.neurons), "neurons": [list(n) for n in rnd.neurons],
                     "p_used": None, "mean_base_prob": mean(kn.base_probs), "seconds": 0.0})
    else:
        rows.append({"method": "random", "n_neurons": 0, "neurons": [], "p_used": None,
                     "mean_base_prob": mean(kn.base_probs), "seconds": 0.0})
    return rows


def neuron_sets(rows: list[dict], method: str = "kn") -> dict[str, tuple[str, list[tuple[int, int]]]]:
    """``{fact_id: (relation, neurons)}`` from locate rows (as :meth:`RunStore.rows` returns them)."""
    return {r["unit"]: (r["relation"], [tuple(n) for n in r["neurons"]]) for r in rows if r["method"] == method}


def locate_stats(rows: list[dict], n_layers: int) -> dict:
    """Per method: neurons per fact, share of facts with none, layer histogram (fractions), and the mean number
    of neurons shared by a pair of facts of the same relation vs of different relations."""
    out = {}
    for method in NEURON_SETS:
        sets = neuron_sets(rows, method)
        if not sets:
            continue
        counts = [len(n) for _, n in sets.values()]
        layers = Counter(l for _, ns in sets.values() for l, _ in ns)
        total = sum(layers.values())
        intra, inter = [], []
        for (_, (ra, na)), (_, (rb, nb)) in combinations(sets.items(), 2):
            (intra if ra == rb else inter).append(len(set(na) & set(nb)))
        out[method] = {"facts": len(sets), "neurons_per_fact": mean(counts),
                       "facts_without_neurons": sum(c == 0 for c in counts),
                       "layer_fraction": [layers.get(l, 0) / total if total else 0.0 for l in range(n_layers)],
                       "shared_same_relation": mean(intra), "shared_other_relation": mean(inter),
                       "pairs_same_relation": len(intra), "pairs_other_relation": len(inter)}
    return out


def foils_for(runner, item: FactItem) -> list[str] | None:
    """A contrastive score's foils: the relation's other answers (``None`` for the other scores)."""
    if runner.cfg.score != "contrastive":
        return None
    return [c for c in runner.candidates(item.relation) if c != item.object]


def run_locate(runner) -> None:
    cfg = runner.cfg
    items = runner.all_known()
    bar = runner.bar(len(items), "locate")
    extra = {"batch_size": cfg.batch_size} if cfg.batch_size else {}
    for it in items:
        runner.unit("locate", it.fact_id, it.relation, task(
            locate_fact, it, seed=cfg.seed, steps=cfg.steps, threshold=cfg.threshold, p=cfg.p,
            min_prompts=cfg.min_prompts, adaptive=cfg.adaptive, activation_threshold=cfg.activation_threshold,
            score=cfg.score, method=cfg.method, foils=foils_for(runner, it), **extra), bar)
    runner.join()
    bar.close()
    runner.load_sets()


EXPERIMENT = Experiment(
    "locate", "knowledge neurons", "fact", run_locate, needs=("assess",),
    fields=("method", "steps", "threshold", "p", "min_prompts", "adaptive", "activation_threshold", "score",
            "batch_size"),
    section="locate", summarize="kneurons.report.numbers:locate_section", render="kneurons.report.render:locate_html",
    figures=(("locate", "kneurons.report.figures:locate_layers"),))
