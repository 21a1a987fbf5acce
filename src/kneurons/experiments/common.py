"""What the experiments share: a fact with its prompts, and seeded choices of control facts."""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass

from ..data import Fact, Relation
from ..errors import KneuronsError


@dataclass(frozen=True)
class FactItem:
    """One fact of a relation with the prompts the model can be asked (``[Y]`` marks the blank)."""

    fact_id: str  # "<relation>:<index in the relation's fact list>"
    relation: str
    subject: str
    object: str
    prompts: tuple[str, ...]

    @property
    def fact(self) -> Fact:
        return Fact(self.relation, self.subject, self.object)


def fact_items(relation: Relation, causal: bool, max_prompts: int | None = None,
               indices=None) -> list[FactItem]:
    """The relation's facts as :class:`FactItem` s; causal models get only templates whose blank ends the
    sentence; ``max_prompts`` keeps the first templates (file order)."""
    if max_prompts is not None and int(max_prompts) < 1:
        raise KneuronsError(f"max_prompts must be >= 1, got {max_prompts!r}")
    idx = range(len(relation.facts)) if indices is None else indices
    out = []
    for i in idx:
        f = relation.facts[i]
        prompts = relation.prompts(f, causal=causal)
        if max_prompts is not None:
            prompts = prompts[: int(max_prompts)]
        out.append(FactItem(f"{relation.id}:{i}", relation.id, f.subject, f.object, tuple(prompts)))
    return out


def rng_for(seed: int, *parts) -> random.Random:
    """A random generator seeded by the run seed and a purpose (stable across processes and Python versions)."""
    return random.Random(":".join(map(str, (seed,) + parts)))


def stable_seed(seed: int, *parts) -> int:
    """An integer seed from the run seed and a purpose (stable across processes)."""
    return zlib.crc32(":".join(map(str, (seed,) + parts)).encode())


def controls_for(item: FactItem, known: list[FactItem], seed: int, n_facts: int = 3,
                 prompts_per_fact: int = 2) -> list[tuple[str, str, str]]:
    """Control prompts for ``item``: ``n_facts`` other known facts of the same relation and ``n_facts`` of other
    relations, the first ``prompts_per_fact`` prompts of each, as ``(group, prompt, target)`` triples."""
    same = [k for k in known if k.relation == item.relation and k.fact_id != item.fact_id
            and k.object != item.object]
    other = [k for k in known if k.relation != item.relation]
    out = []
    for group, pool in (("same_relation", same), ("other_relation", other)):
        rng = rng_for(seed, "controls", item.fact_id, group)
        chosen = rng.sample(pool, min(n_facts, len(pool)))
        for k in chosen:
            out += [(group, p, k.object) for p in k.prompts[:prompts_per_fact]]
    return out


def mean(values) -> float:
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else float("nan")


@dataclass(frozen=True)
class Experiment:
    """One experiment of ``kneurons run``, declared once and used by the runner, the report and the CLI.

    ``name``: its key in the run store and in ``--experiments``. ``unit``: what one stored result is about (a
    ``"fact"`` or a ``"relation"``). ``needs``: experiments whose stored results it reads (they run first).
    ``fields``: the :class:`~kneurons.experiments.runner.RunConfig` fields it reads. ``run(runner)``: computes and
    stores its units through ``runner.unit(...)``, which skips the ones already stored (so a rerun resumes).
    ``section``: its key in the report's summary; ``summarize``, ``render`` and ``figures`` name the report's
    functions for it as ``"module:function"`` (imported only when a report is made, so the report stays
    downstream of the experiments): ``summarize(run_data, issues) -> dict``, ``render(summary, figures) -> html``,
    each figure ``figure(summary) -> Figure | None``.
    """

    name: str
    title: str
    unit: str
    run: object  # Callable[[Runner], None]
    needs: tuple[str, ...] = ()
    fields: tuple[str, ...] = ()
    section: str = ""
    summarize: str | None = None
    render: str | None = None
    figures: tuple[str, ...] = ()

    def part(self, what: str):
        """The report function named by ``summarize`` / ``render`` (or one of ``figures``: ``what`` is then that
        reference), imported on first use."""
        import importlib

        ref = getattr(self, what, None) if what in ("summarize", "render") else what
        if ref is None:
            return None
        module, _, name = ref.partition(":")
        return getattr(importlib.import_module(module), name)
