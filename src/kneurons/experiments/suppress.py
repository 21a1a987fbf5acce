"""Experiment 3 — suppress and amplify: do the neurons control their fact, and only their fact?

For each known fact and each neuron set (``kn``, ``activation`` baseline, ``random``, and ``fact_specific``: the
fact's knowledge neurons minus its relation's — those found for more than ``relation_q`` of the relation's known
facts, :func:`kneurons.neurons.relation_neurons`): multiply the neurons' activations at the blank by 0
(suppress) and by 2 (amplify) and record the mean relative change Δp/p of the answer's probability on the fact's
own prompts and on control prompts (other known facts of the same relation, known facts of other relations).
The paper's Figures 3/4 average the fact's Δp/p per relation; the ratio fact ÷ same relation (the report's
relation specificity) tells neurons of one fact from neurons of its relation.
"""

from __future__ import annotations

from ..interventions import measure_intervention, score
from .common import FactItem, mean
from .common import Experiment, controls_for
from .units import task

OPS = {"suppress": 0.0, "amplify": 2.0}
GROUPS = ("fact", "same_relation", "other_relation")


def intervene_fact(handle, item: FactItem, neuron_sets: dict[str, list], controls: list[tuple[str, str, str]],
                   ops: dict[str, float] = OPS, batch_size: int = 32) -> list[dict]:
    """One row per (method, op, group): mean probability before/after and mean Δp/p over the group's prompts
    (:func:`kneurons.measure_intervention` per method and op). Methods whose neuron set is empty are skipped."""
    items = [("fact", p, item.object) for p in item.prompts] + [tuple(c) for c in controls]
    before = score(handle, [p for _, p, _ in items], [t for _, _, t in items], batch_size=batch_size)  # once
    rows = []
    for method, neurons in neuron_sets.items():
        if not neurons:
            continue
        for op, factor in ops.items():
            res = measure_intervention(handle, neurons, list(item.prompts), item.object, factor, controls,
                                       batch_size=batch_size, before=before)
            for group in GROUPS:
                mine = [r for r in res.rows if r["group"] == group]
                if not mine:
                    continue
                rows.append({"method": method, "op": op, "factor": factor, "group": group,
                             "n_neurons": len(neurons), "n_prompts": len(mine),
                             "before": mean(r["before"] for r in mine), "after": mean(r["after"] for r in mine),
                             "rel_change": mean(r["rel_change"] for r in mine)})
    return rows


def relation_sets(runner, q: float) -> dict[str, list[tuple[int, int]]]:
    """Relation id -> its relation neurons: the ``kn`` neurons of more than ``q`` of its known facts (relations
    with fewer than 2 located facts have none)."""
    from ..neurons import KnowledgeNeurons, relation_neurons

    out = {}
    for rid, items in runner.known.items():
        sets = [KnowledgeNeurons(runner.sets.get(it.fact_id, {}).get("kn", []), [], it.object, [], [], {}, {})
                for it in items if it.fact_id in runner.sets]
        out[rid] = relation_neurons(sets, q=q).neurons if len(sets) >= 2 else []
    return out


def run_suppress(runner) -> None:
    cfg = runner.cfg
    known = runner.all_known()
    bar = runner.bar(len(known), "suppress/amplify")
    relation = relation_sets(runner, cfg.relation_q)
    for it in known:
        sets = dict(runner.sets.get(it.fact_id, {}))
        if sets.get("kn"):
            sets["fact_specific"] = [n for n in sets["kn"] if n not in set(relation.get(it.relation, []))]
        runner.unit("suppress", it.fact_id, it.relation, task(
            intervene_fact, it, sets, controls_for(it, known, cfg.seed, cfg.control_facts, cfg.control_prompts),
            batch_size=cfg.assess_batch_size), bar)
    runner.join()
    bar.close()


EXPERIMENT = Experiment(
    "suppress", "suppress and amplify", "fact", run_suppress, needs=("locate",),
    fields=("control_facts", "control_prompts", "assess_batch_size", "relation_q"),
    section="suppress", summarize="kneurons.report.numbers:suppress_section", render="kneurons.report.render:suppress_html",
    figures=(("suppress", "kneurons.report.figures:suppress_relations"),
             ("suppress_controls", "kneurons.report.figures:suppress_controls")))
