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
