"""Experiment 5 — update a fact ⟨h, r, t⟩ → ⟨h, r, t′⟩ by editing its knowledge neurons' value slots.

Per known fact with knowledge neurons: t′ is another answer of the same relation (seeded); the edit is
:func:`kneurons.update_fact` (λ1 = 1, λ2 = 8 by default, as the authors ran it). Recorded, for the knowledge
neurons and for as many random neurons: success@1 / success@5 (share of the fact's prompts where t′'s first
token ranks first / in the top 5), the probabilities of t and t′, and the intra-relation / inter-relation
perplexity (exp of the mean −log p(gold) on prompts of other known facts of the same / of other relations)
before and after. Every edit is reverted before the next one. Paper (BERT-base): success 34.4% (random 0.0%),
inter-relation perplexity +7.2 (random +4.3).

``update_method="optimize"`` (``--update-method optimize``) edits the same value slots by the KN-constrained
search of :func:`kneurons.update_fact` instead (trained on the fact's prompts; the preservation term keeps the
answers of the intra-relation perplexity prompts, which are then not a held-out measure: the inter-relation
ones still are); the random neurons get the same budget.
"""

from __future__ import annotations

from collections import Counter

from ..interventions import target_vectors, update_fact
from ..prompts import assess, perplexity_of
from .common import FactItem, mean
from .common import Experiment, rng_for
from .units import constant_rows, refuse, task


def shared_by_more_than(neuron_sets, fraction: float | None) -> set:
    """Neurons in more than ``fraction`` of the facts' sets (and in at least 2): the authors left these out of
    updates, as they carry the relation rather than the fact. ``None``: keep everything. With few located facts
    per relation (e.g. 10) this drops every neuron that two facts share."""
    if fraction is None:
        return set()
    sets = [set(map(tuple, s)) for s in neuron_sets]
    counts = Counter(n for s in sets for n in s)
    return {n for n, c in counts.items() if c > fraction * len(sets) and c > 1}


def measure_update(handle, prompts, old: str, new: str, intra=(), inter=(), batch_size: int = 32,
                   details: bool = False) -> dict:
    """What an update is judged by, in one scoring pass: mean P(old) and P(new) on the fact's ``prompts``,
    success@1/@5 of ``new`` (rank of its first token, ties counted against it), and the perplexity of
    ``intra``/``inter`` — ``(prompt, gold)`` pairs of other facts of the same / of other relations. With ``details``
    also the per-prompt assessments (``"old"``, ``"new"``)."""
    prompts = list(prompts)
    n = len(prompts)
    pairs = [(p, old) for p in prompts] + [(p, new) for p in prompts] + list(intra) + list(inter)
    res = assess(handle, [p for p, _ in pairs], [t for _, t in pairs], batch_size=batch_size)
    old_res, new_res = res[:n], res[n: 2 * n]
    out = {"p_old": mean(a.prob for a in old_res), "p_new": mean(a.prob for a in new_res),
           "success1": mean(a.rank <= 1 for a in new_res), "success5": mean(a.rank <= 5 for a in new_res),
           "ppl_intra": perplexity_of(res[2 * n: 2 * n + len(intra)]),
           "ppl_inter": perplexity_of(res[2 * n + len(intra):])}
    if details:
        out.update(old=old_res, new=new_res)
    return out


def update_experiment(handle, item: FactItem, new_target: str, neuron_sets: dict[str, list],
                      intra: list[tuple[str, str]], inter: list[tuple[str, str]], lambda1: float = 1.0,
                      lambda2: float = 8.0, batch_size: int = 32, space: str = "embedding",
                      method: str = "rule") -> list[dict]:
    """One row per method (``kn``, ``random``, ...) whose neuron set is not empty; ``intra``/``inter``:
    ``(prompt, gold)`` pairs for the perplexities."""
    before = measure_update(handle, item.prompts, item.object, new_target, intra, inter, batch_size)
    rows = []
    vectors = None  # the targets' vectors, computed once for all methods (space="head" runs a search)
    for name, neurons in neuron_sets.items():
        if not neurons:
            continue
        if method == "optimize":
            edit = update_fact(handle, neurons, item.object, new_target, method="optimize",
                               prompts=list(item.prompts), locality=[p for p, _ in intra])
        else:
            if vectors is None:
                vectors = target_vectors(handle, [item.object, new_target], item.prompts[0], space)
            edit = update_fact(handle, neurons, item.object, new_target, prompt=item.prompts[0], lambda1=lambda1,
                               lambda2=lambda2, space=space, vectors=vectors)
        with edit:
            after = measure_update(handle, item.prompts, item.object, new_target, intra, inter, batch_size)
        row = {"method": name, "old": item.object, "new": new_target, "n_neurons": len(neurons),
               "n_intra": len(intra), "n_inter": len(inter), "update_method": method,
               "optimize_steps": edit.info.get("steps_taken")}
        for k in before:
            row[f"{k}_before"] = before[k]
            row[f"{k}_after"] = after[k]
        rows.append(row)
    return rows


def run_update(runner) -> None:
    cfg = runner.cfg
    known = runner.all_known()
    bar = runner.bar(len(known), "update")
    for rid, items in runner.known.items():
        kn_sets = {it.fact_id: runner.sets.get(it.fact_id, {}).get("kn", []) for it in items}
        drop = shared_by_more_than(kn_sets.values(), cfg.update_drop_shared)
        objects = runner.candidates(rid)
        for it in items:
            kn = [n for n in kn_sets[it.fact_id] if n not in drop]
            rnd = runner.sets.get(it.fact_id, {}).get("random", [])[: len(kn)]
            others = [o for o in objects if o != it.object]
            if not kn:
                t = task(constant_rows, [{"method": "kn", "n_neurons": 0, "skipped": "no knowledge neurons to edit"}])
            elif not others:
                t = task(refuse, f"relation {rid} has no other answer to update to")
            else:  # the new answer and the control prompts, seeded by the fact, chosen here; the edit in the task
                new = rng_for(cfg.seed, "update", it.fact_id).choice(others)
                r = rng_for(cfg.seed, "update-controls", it.fact_id)
                same = [k for k in known if k.relation == rid and k.fact_id != it.fact_id]
                other = [k for k in known if k.relation != rid]
                intra = runner.ppl_pairs(r.sample(same, min(cfg.ppl_facts, len(same))))
                inter = runner.ppl_pairs(r.sample(other, min(cfg.ppl_facts, len(other))))
                t = task(update_experiment, it, new, {"kn": kn, "random": rnd}, intra, inter, cfg.update_lambda1,
                         cfg.update_lambda2, cfg.assess_batch_size, space=cfg.update_space, method=cfg.update_method)
            runner.unit("update", it.fact_id, rid, t, bar)
    runner.join()
    bar.close()


EXPERIMENT = Experiment(
    "update", "update facts", "fact", run_update, needs=("locate",),
    fields=("update_lambda1", "update_lambda2", "update_drop_shared", "update_space", "update_method", "ppl_facts",
            "control_prompts"),
    section="update", summarize="kneurons.report.numbers:update_section", render="kneurons.report.render:update_html",
    figures=(("update", "kneurons.report.figures:update"),))
