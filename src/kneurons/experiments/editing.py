"""Knowledge-neuron edits scored on model-editing benchmarks (CounterFact, zsRE), as other editors are scored.

Per :class:`~kneurons.data.editing.EditCase`: the knowledge neurons of the fact (subject, edit prompt, true
answer) are located from the edit prompt and its rephrasings — all with ``target_true``, at least 2 prompts —
then :func:`kneurons.update_fact` rewrites ``target_true`` → ``target_new`` in their value slots, the metrics are
read, and the edit is reverted. Metrics (each over the case's prompts of that kind):

* ``reliability`` — share of edit prompts whose top-1 (first token) is ``target_new`` after the edit;
  ``reliability_score`` — share where P(new) > P(true) (ROME's "efficacy score");
* ``generalization`` / ``generalization_score`` — the same on the rephrase prompts;
* ``locality`` — share of locality prompts whose top-1 token is unchanged by the edit (EasyEdit's rule);
  ``locality_answer_kept`` — share where the given locality answer keeps its rank-1 status.

With ``control=True`` the same edit through as many random neurons gives the control row of each case.
Prompts are the text before the answer, so the blank ends every cloze: this suits causal models; for a masked
model the blank becomes one ``[MASK]`` per answer token at the end of the sentence.
"""

from __future__ import annotations

import time
from typing import Iterable

from ..errors import KneuronsError
from ..interventions import target_vectors, update_fact
from ..neurons import locate, random_neurons
from ..prompts import assess
from .common import mean, stable_seed


def _scores(handle, case, clozes: dict, batch_size: int) -> dict:
    """Predictions needed by the metrics, in one scoring pass."""
    items = ([(c, case.target_new, "rel") for c in clozes["reliability"]]
             + [(c, case.target_true, "rel_true") for c in clozes["reliability"]]
             + [(c, case.target_new, "gen") for c in clozes["generalization"]]
             + [(c, case.target_true, "gen_true") for c in clozes["generalization"]]
             + [(c, a, "loc") for c, a in clozes["locality"]])
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
            "p_new": mean(a.prob for a in after.get("rel", [])), "p_true": mean(a.prob for a in after.get("rel_true", []))}


def edit_case(handle, case, steps: int = 20, threshold: float = 0.2, p: float = 0.7, min_prompts: int = 2,
              adaptive: bool = True, lambda1: float = 1.0, lambda2: float = 8.0, space: str = "embedding",
              control: bool = True, seed: int = 0, batch_size: int = 32, ig_batch_size: int | None = None) -> list[dict]:
    """Rows (``method`` = ``"kn"`` and, with ``control``, ``"random"``) for one edit case; a case with fewer
    than 2 prompts or no knowledge neurons gives one row with a ``skipped`` reason."""
    clozes = case.clozes()
    base = {"case_id": case.case_id, "subject": case.subject, "target_true": case.target_true,
            "target_new": case.target_new}
    fact_prompts = clozes["reliability"] + clozes["generalization"]
    if len(fact_prompts) < 2:
        return [{**base, "method": "kn", "skipped": "fewer than 2 prompts of the fact to locate neurons from"}]
    t = time.perf_counter()
    kw = {"batch_size": ig_batch_size} if ig_batch_size else {}
    kn = locate(handle, fact_prompts, case.target_true, steps=steps, threshold=threshold, p=p,
                min_prompts=min_prompts, adaptive=adaptive, keep_attributions=False, **kw)
    seconds = time.perf_counter() - t
    if not kn.neurons:
        return [{**base, "method": "kn", "skipped": "no knowledge neurons"}]
    before = _scores(handle, case, clozes, batch_size)
    sets = {"kn": kn.neurons}
    if control:
        sets["random"] = random_neurons(handle, kn, seed=stable_seed(seed, "edit", case.case_id)).neurons
    rows = []
    vectors = target_vectors(handle, [case.target_true, case.target_new], fact_prompts[0], space)  # once per case
    for method, neurons in sets.items():
        with update_fact(handle, neurons, case.target_true, case.target_new, prompt=fact_prompts[0],
                         lambda1=lambda1, lambda2=lambda2, space=space, vectors=vectors):
            after = _scores(handle, case, clozes, batch_size)
        rows.append({**base, "method": method, "n_neurons": len(neurons), "locate_seconds": seconds,
                     "reliability_before": mean(a.rank == 1 for a in before.get("rel", [])),
                     **_metrics(before, after)})
    return rows


def evaluate_edits(handle, cases: Iterable, progress: bool = False, **kw):
    """:func:`edit_case` over ``cases``; returns a pandas DataFrame (one row per case and method). A case the
    model cannot be asked (e.g. an answer its tokenizer cannot spell) gets a row with its ``error``."""
    import pandas as pd
    from tqdm.auto import tqdm

    cases = list(cases)
    rows = []
    for case in tqdm(cases, desc="edits", unit="case", disable=not progress):
        try:
            rows += edit_case(handle, case, **kw)
        except KneuronsError as exc:
            rows.append({"case_id": case.case_id, "method": "kn", "error": str(exc)})
    return pd.DataFrame(rows)
