"""Experiment 1 — assess: which facts the model knows.

A fact is *known* when the answer is right on more than ``known_fraction`` of its prompts (default 0.5: a
majority). "Right" is, with ``known_among="vocabulary"`` (default), rank ``<= known_rank`` of the first answer
token over the whole vocabulary (``known_rank=1``: the model's top-1, and multi-token answers also need every
later token to be the arg-max, see :class:`kneurons.Assessment`); with ``known_among="candidates"``, rank
``<= known_rank`` among the relation's possible answers (its facts' objects, compared by first token) — the
restricted-candidate evaluation of LAMA and PARAREL, which suits small causal models whose top-1 is often a
function word ("the", "a"). Only known facts go on to the other experiments.
"""

from __future__ import annotations

from ..errors import KneuronsError
from ..prompts import assess, encode
from .common import FactItem, mean
from .common import Experiment, fact_items, rng_for
from .units import task


KNOWN_AMONG = ("vocabulary", "candidates")


def is_right(a, known_rank: int, known_among: str = "vocabulary") -> bool:
    if known_among == "candidates":
        return a.candidate_rank <= known_rank
    return bool(a.correct) if known_rank == 1 else a.rank <= known_rank


def assess_facts(handle, items: list[FactItem], known_fraction: float = 0.5, known_rank: int = 1,
                 known_among: str = "vocabulary", candidates: list[str] | None = None,
                 batch_size: int = 32) -> list[dict]:
    """One row per fact: prompts, how many are right, mean probability, ``known``. ``candidates`` (needed for
    ``known_among="candidates"``): the relation's possible answers."""
    if known_among not in KNOWN_AMONG:
        raise KneuronsError(f"known_among must be one of {', '.join(KNOWN_AMONG)}, got {known_among!r}")
    if known_among == "candidates" and not candidates:
        raise KneuronsError("known_among='candidates' needs the relation's candidate answers")
    if not 0 <= known_fraction < 1:
        raise KneuronsError(f"known_fraction must be in [0, 1), got {known_fraction!r}")
    if int(known_rank) < 1:
        raise KneuronsError(f"known_rank must be >= 1, got {known_rank!r}")
    prompts, targets, owner = [], [], []
    rows = []
    for j, it in enumerate(items):
        row = {"fact_id": it.fact_id, "relation": it.relation, "subject": it.subject, "object": it.object,
               "n_prompts": len(it.prompts), "error": ""}
        rows.append(row)
        try:  # a fact the model cannot be asked (e.g. an answer its tokenizer cannot spell) is recorded, not fatal
            for p in it.prompts:
                encode(handle, p, it.object)
        except KneuronsError as exc:
            row["error"] = str(exc)
            continue
        for p in it.prompts:
            prompts.append(p)
            targets.append(it.object)
            owner.append(j)
    cands = sorted(set(candidates)) if known_among == "candidates" else None
    res = assess(handle, prompts, targets, batch_size=batch_size, candidates=cands) if prompts else []
    for j, row in enumerate(rows):
        mine = [a for a, o in zip(res, owner) if o == j]
        n_right = sum(is_right(a, known_rank, known_among) for a in mine)
        row.update({"n_right": n_right, "mean_prob": mean(a.prob for a in mine),
                    "mean_rank": mean(a.rank for a in mine),
                    "known": bool(mine) and not row["error"] and n_right > known_fraction * len(mine)})
    return rows


def run_assess(runner) -> None:
    """Facts of each relation in a seeded order, assessed in chunks until ``facts_per_relation`` known ones are
    found (at most ``max_candidates`` tried); the known facts are the later experiments' facts. A relation's next
    chunk is submitted when its previous one is stored (in process: at once, relation after relation; with a
    pool of workers the relations' chunks are computed side by side)."""
    cfg, store = runner.cfg, runner.store
    causal = runner.h.is_causal
    skipped = {}
    bar = runner.bar(len(runner.data.relations) * cfg.facts_per_relation, "assess (known facts)")

    def step(rid: str, chunks: list[list[FactItem]], k: int, cands) -> None:
        """Assess chunk ``k`` of the relation (what is not stored yet), then go on with the next if needed."""
        chunk = chunks[k]
        todo = [it for it in chunk if not store.has("assess", it.fact_id)]

        def stored(outcome=None) -> None:
            if outcome is not None:
                if outcome.error is not None:
                    raise KneuronsError(outcome.error)
                for it, row in zip(todo, outcome.rows):
                    store.put("assess", it.fact_id, rid, [row])
            known = runner.known[rid]
            for it in chunk:
                if store.get("assess", it.fact_id)[0]["known"] and len(known) < cfg.facts_per_relation:
                    known.append(it)
                    bar.update(1)
            if len(known) < cfg.facts_per_relation and k + 1 < len(chunks):
                step(rid, chunks, k + 1, cands)
            else:
                bar.update(cfg.facts_per_relation - len(known))

        if todo:
            runner.submit(task(assess_facts, todo, cfg.known_fraction, cfg.known_rank, cfg.known_among, cands,
                               batch_size=cfg.assess_batch_size, label=f"assess {todo[0].fact_id}..."), stored)
        else:
            stored()

    for rid in runner.data.relations:
        rel = runner.data.relation(rid)
        usable = len(rel.causal_templates) if causal else len(rel.templates)
        if usable < 2:
            skipped[rid] = f"{usable} usable template(s); refining needs 2"
            bar.update(cfg.facts_per_relation)
            continue
        order = list(range(len(rel.facts)))
        rng_for(cfg.seed, "facts", rid).shuffle(order)
        order = order[: cfg.max_candidates]
        cands = runner.candidates(rid) if cfg.known_among == "candidates" else None
        runner.known[rid] = []
        chunks = [fact_items(rel, causal, cfg.max_prompts, order[start: start + 16])
                  for start in range(0, len(order), 16)]
        if chunks:
            step(rid, chunks, 0, cands)
        else:
            bar.update(cfg.facts_per_relation)
    runner.join()
    bar.close()
    store.set_meta("skipped_relations", skipped)
    store.set_meta("known_facts", {rid: [it.fact_id for it in v] for rid, v in runner.known.items()})
    runner.log(f"{len(runner.all_known())} known facts in {len(runner.known)} relations")


EXPERIMENT = Experiment(
    "assess", "assess (known facts)", "fact", run_assess,
    fields=("relations", "facts_per_relation", "seed", "max_prompts", "max_candidates", "known_fraction",
            "known_rank", "known_among", "assess_batch_size"),
    section="facts", summarize="kneurons.report.numbers:facts_section", render="kneurons.report.render:facts_html")
