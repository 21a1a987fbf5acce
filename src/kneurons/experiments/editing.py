"""Knowledge-neuron edits scored on model-editing benchmarks (CounterFact, zsRE), as other editors are scored.

Per :class:`~kneurons.data.editing.EditCase`: the knowledge neurons of the fact (subject, edit prompt, true
answer) are located from the edit prompt and its rephrasings — all with ``target_true``, at least 2 prompts —
then :func:`kneurons.update_fact` rewrites ``target_true`` → ``target_new`` in their value slots, the metrics are
read, and the edit is reverted. Metrics (each over the case's prompts of that kind):

* ``reliability`` — share of edit prompts whose top-1 (first token) is ``target_new`` after the edit;
  ``reliability_score`` — share where P(new) > P(true) (ROME's "efficacy score");
* ``generalization`` / ``generalization_score`` — the same on the rephrase prompts;
* ``locality`` — share of locality prompts whose top-1 token is unchanged by the edit (EasyEdit's rule);
  ``locality_answer_kept`` — share where the given locality answer keeps its rank-1 status;
  ``neighborhood_score`` — share where the locality answer stays more probable than ``target_new`` (ROME's
  NS; with ``reliability_score`` = ES and ``generalization_score`` = PS).

``methods`` names the edits compared on each case (:data:`EDIT_METHODS`), all reverted before the next:

* ``kn`` — the authors' rule (:func:`kneurons.update_fact`, λ1, λ2, ``space``) on the knowledge neurons;
  ``random`` — the same on as many random neurons (the control; ``control=False`` drops it);
  ``kn_head`` — the rule with the output head's directions (``space="head"``);
* ``optimize_kn`` — ``update_fact(method="optimize")`` on the knowledge neurons' value slots (trained on the
  edit prompt only: the rephrasings measure generalization, the locality prompt is never seen; the
  preservation term keeps the unedited answers of the *same* prompt with other cases' subjects in place of
  the case's subject, ``preserve``: the relation must keep working for other subjects);
  ``optimize_fact_specific`` — the same on the fact-specific neurons (knowledge neurons minus the ``common``
  neurons: CounterFact's flat form names no relations, so :func:`evaluate_edits` takes as "relation neurons"
  those found for more than ``common_q`` of the evaluated cases); ``optimize_random`` — on as many random
  neurons (same budget); ``optimize_layers`` — on every value slot of the layers the knowledge neurons are in
  (a fine-tuning baseline, unconstrained within those layers).
Prompts are the text before the answer, so the blank ends every cloze: this suits causal models; for a masked
model the blank becomes one ``[MASK]`` per answer token at the end of the sentence.
"""

from __future__ import annotations

import time
from typing import Iterable

from ..errors import KneuronsError
from ..interventions import OptimizeSettings, target_vectors, update_fact
from ..neurons import KnowledgeNeurons, fact_specific, locate, random_neurons
from ..prompts import assess
from .common import mean, stable_seed


def _scores(handle, case, clozes: dict, batch_size: int) -> dict:
    """Predictions needed by the metrics, in one scoring pass."""
    items = ([(c, case.target_new, "rel") for c in clozes["reliability"]]
             + [(c, case.target_true, "rel_true") for c in clozes["reliability"]]
             + [(c, case.target_new, "gen") for c in clozes["generalization"]]
             + [(c, case.target_true, "gen_true") for c in clozes["generalization"]]
             + [(c, a, "loc") for c, a in clozes["locality"]]
             + [(c, case.target_new, "loc_new") for c, _ in clozes["locality"]])
    res = assess(handle, [c for c, _, _ in items], [t for _, t, _ in items], batch_size=batch_size) if items else []
    out: dict[str, list] = {}
    for (_, _, kind), a in zip(items, res):
        out.setdefault(kind, []).append(a)
    return out


def _metrics(before: dict, after: dict) -> dict:
    def top1(kind):
        return mean(a.rank == 1 for a in after.get(kind, []))

    def beats(kind):
        return mean(n.prob > t.prob for n, t in zip(after.get(kind, []), after.get(kind + "_true", [])))

    loc_b, loc_a = before.get("loc", []), after.get("loc", [])
    return {"reliability": top1("rel"), "reliability_score": beats("rel"),
            "generalization": top1("gen"), "generalization_score": beats("gen"),
            "locality": mean(b.top[0].token_id == a.top[0].token_id for b, a in zip(loc_b, loc_a)),
            "locality_answer_kept": mean((b.rank == 1) == (a.rank == 1) for b, a in zip(loc_b, loc_a)),
            "neighborhood_score": mean(a.prob > n.prob for a, n in zip(loc_a, after.get("loc_new", []))),
            "p_new": mean(a.prob for a in after.get("rel", [])), "p_true": mean(a.prob for a in after.get("rel_true", []))}


EDIT_METHODS = ("kn", "random", "kn_head", "optimize_kn", "optimize_fact_specific", "optimize_random",
                "optimize_layers")


def locate_case(handle, case, steps: int = 20, threshold: float = 0.2, p: float = 0.7, min_prompts: int = 2,
                adaptive: bool = True, ig_batch_size: int | None = None) -> KnowledgeNeurons | str:
    """The knowledge neurons of a case's true fact, from its edit prompt and rephrasings (or the reason there are
    none)."""
    clozes = case.clozes()
    fact_prompts = clozes["reliability"] + clozes["generalization"]
    if len(fact_prompts) < 2:
        return "fewer than 2 prompts of the fact to locate neurons from"
    kw = {"batch_size": ig_batch_size} if ig_batch_size else {}
    t = time.perf_counter()
    kn = locate(handle, fact_prompts, case.target_true, steps=steps, threshold=threshold, p=p,
                min_prompts=min_prompts, adaptive=adaptive, keep_attributions=False, **kw)
    kn.params["seconds"] = time.perf_counter() - t
    return kn if kn.neurons else "no knowledge neurons"


def edit_case(handle, case, steps: int = 20, threshold: float = 0.2, p: float = 0.7, min_prompts: int = 2,
              adaptive: bool = True, lambda1: float = 1.0, lambda2: float = 8.0, space: str = "embedding",
              control: bool = True, seed: int = 0, batch_size: int = 32, ig_batch_size: int | None = None,
              methods=("kn", "random"), kn: KnowledgeNeurons | str | None = None, common=(),
              preserve=(), settings: OptimizeSettings | None = None) -> list[dict]:
    """Rows (one per name of ``methods`` that applies, see the module docstring) for one edit case; a case with
    fewer than 2 prompts or no knowledge neurons gives one row with a ``skipped`` reason. ``kn``: the case's
    neurons when already located (:func:`locate_case`); ``common``: the neurons ``optimize_fact_specific``
    leaves out; ``preserve``: clozes whose next-token distribution the optimize edits keep (KL term)."""
    unknown = [m for m in methods if m not in EDIT_METHODS]
    if unknown:
        raise KneuronsError(f"unknown edit method(s) {unknown}; choose from {', '.join(EDIT_METHODS)}")
    clozes = case.clozes()
    base = {"case_id": case.case_id, "subject": case.subject, "target_true": case.target_true,
            "target_new": case.target_new}
    fact_prompts = clozes["reliability"] + clozes["generalization"]
    if kn is None:
        kn = locate_case(handle, case, steps, threshold, p, min_prompts, adaptive, ig_batch_size)
    if isinstance(kn, str):
        return [{**base, "method": "kn", "skipped": kn}]
    seconds = kn.params.get("seconds", float("nan"))
    before = _scores(handle, case, clozes, batch_size)
    rnd = random_neurons(handle, kn, seed=stable_seed(seed, "edit", case.case_id)).neurons
    specific = fact_specific(kn, list(common)).neurons
    layers = sorted({l for l, _ in kn.neurons})
    sets = {"kn": kn.neurons, "random": rnd, "kn_head": kn.neurons, "optimize_kn": kn.neurons,
            "optimize_fact_specific": specific, "optimize_random": rnd,
            "optimize_layers": [(l, i) for l in layers for i in range(handle.d_ff)]}
    wanted = [m for m in methods if control or m != "random"]
    rows = []
    vectors = {}
    for method in wanted:
        neurons = sets[method]
        if not neurons:
            rows.append({**base, "method": method, "n_neurons": 0, "skipped": "no fact-specific neurons"})
            continue
        t = time.perf_counter()
        if method.startswith("optimize"):
            edit = update_fact(handle, neurons, case.target_true, case.target_new, method="optimize",
                               prompts=clozes["reliability"], locality=list(preserve), settings=settings)
        else:
            sp = "head" if method == "kn_head" else space
            if sp not in vectors:  # once per case and space, shared by the neuron sets
                vectors[sp] = target_vectors(handle, [case.target_true, case.target_new], fact_prompts[0], sp)
            edit = update_fact(handle, neurons, case.target_true, case.target_new, prompt=fact_prompts[0],
                               lambda1=lambda1, lambda2=lambda2, space=sp, vectors=vectors[sp])
        with edit:
            edit_seconds = time.perf_counter() - t
            after = _scores(handle, case, clozes, batch_size)
        rows.append({**base, "method": method, "n_neurons": len(neurons), "locate_seconds": seconds,
                     "edit_seconds": edit_seconds, "optimize_steps": edit.info.get("steps_taken"),
                     "optimize_success": edit.info.get("success"),
                     "reliability_before": mean(a.rank == 1 for a in before.get("rel", [])),
                     **_metrics(before, after)})
    return rows


def evaluate_edits(handle, cases: Iterable, progress: bool = False, methods=("kn", "random"),
                   common_q: float = 0.05, n_preserve: int = 4, located: dict | None = None, common=None,
                   pool: list | None = None, **kw):
    """:func:`edit_case` over ``cases``; returns a pandas DataFrame (one row per case and method). A case the
    model cannot be asked (e.g. an answer its tokenizer cannot spell) gets a row with its ``error``.

    ``located``: ``{case_id: KnowledgeNeurons or the reason there are none}`` from :func:`locate_case`, to locate
    once and edit in several calls (missing cases are located here). With ``optimize_fact_specific`` the
    ``common`` neurons it leaves out are, unless given, those found for more than ``common_q`` of the cases
    (every case is located first). The optimize edits of a case preserve its edit prompt with the subjects of
    the ``n_preserve`` cases after it in ``pool`` (default ``cases``) in place of its own (their edit prompts
    where the subject is not in the prompt) — never the case's own locality prompt, which measures the edit."""
    import pandas as pd
    from tqdm.auto import tqdm

    from ..neurons import relation_neurons

    cases = list(cases)
    pool = list(pool) if pool is not None else cases
    located = dict(located or {})
    loc_kw = {a: kw[a] for a in ("steps", "threshold", "p", "min_prompts", "adaptive", "ig_batch_size") if a in kw}

    def find(case):
        if case.case_id not in located:
            try:
                located[case.case_id] = locate_case(handle, case, **loc_kw)
            except KneuronsError as exc:
                located[case.case_id] = KneuronsError(str(exc))
        return located[case.case_id]

    if "optimize_fact_specific" in methods and common is None:
        sets = [kn for kn in (find(c) for c in tqdm(cases, desc="locate", unit="case", disable=not progress))
                if isinstance(kn, KnowledgeNeurons)]
        common = relation_neurons(sets, q=common_q).neurons if len(sets) >= 2 else []
    common = list(common or [])
    index = {c.case_id: k for k, c in enumerate(pool)}
    rows = []
    for case in tqdm(cases, desc="edits", unit="case", disable=not progress):
        k = index.get(case.case_id, 0)
        others = [pool[(k + j) % len(pool)] for j in range(1, min(n_preserve, len(pool) - 1) + 1)]
        others = [o for o in others if o.case_id != case.case_id]
        preserve = [case.cloze(case.prompt.replace(case.subject, o.subject)) if case.subject in case.prompt
                    else o.cloze() for o in others]
        try:
            kn = find(case)
            if isinstance(kn, KneuronsError):
                raise kn
            rows += edit_case(handle, case, methods=methods, kn=kn, common=common, preserve=preserve, **kw)
        except KneuronsError as exc:
            rows.append({"case_id": case.case_id, "method": "kn", "error": str(exc)})
    df = pd.DataFrame(rows)
    df.attrs["common_neurons"] = len(common)
    return df
