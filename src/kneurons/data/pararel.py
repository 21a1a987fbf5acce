"""PARAREL, the fact set of Dai et al. (2022) (pure Python, no model needed).

:func:`load_pararel` reads ``query_pairs.json`` (``{relation_id: [[subject, object], ...]}``), ``patterns/P*.jsonl``
(one ``{"pattern": "[X] ... [Y] ."}`` a line) and the LAMA relation metadata ``relations.jsonl`` (label and type 1-1
/ N-1 / N-M). Nothing here knows where the data lives: the loader takes a path. Bad or missing files raise a
one-line :class:`~kneurons.errors.KneuronsError` naming the file (and line, where there is one). The editing
benchmarks are in :mod:`kneurons.data.editing`, the BingRel sentences in :mod:`kneurons.data.bingrel`.

>>> from kneurons.data.pararel import load_pararel          # doctest: +SKIP
>>> pr = load_pararel("../shared/data/pararel")             # doctest: +SKIP
>>> pr.summary()["facts"], pr.prompts("P19", "Allan Peiper", causal=True)[0]   # doctest: +SKIP
(27738, 'Allan Peiper was born in [Y].')
"""

from __future__ import annotations

from pathlib import Path

from ..errors import KneuronsError
from . import RELATION_TYPES, Fact, FactSet, Relation
from ._files import _read_json, _read_jsonl

__all__ = ["Pararel", "load_pararel"]


def _check_template(t, where: str) -> str:
    if not isinstance(t, str) or not t.strip():
        raise KneuronsError(f"{where}: pattern is missing or not a string")
    nx, ny = t.count("[X]"), t.count("[Y]")
    if nx != 1 or ny != 1:
        raise KneuronsError(f"{where}: template {t!r} must hold exactly one [X] and one [Y] "
                            f"(has {nx} [X], {ny} [Y])")
    return t.strip()


# --------------------------------------------------------------------------------------------------- PARAREL

class Pararel:
    """A loaded PARAREL fact set: relations (in ``query_pairs.json`` order) with templates and facts.

    Each relation is a :class:`kneurons.data.Relation` (``id, label, type, templates, facts``), so everything
    that works on the built-in fact set works here too (see :meth:`to_factset`).
    """

    def __init__(self, relations: list[Relation], source: str = ""):
        self._relations = list(relations)
        self._by_id = {r.id: r for r in self._relations}
        self.source = source

    @property
    def relations(self) -> list[str]:
        """The relation ids."""
        return [r.id for r in self._relations]

    def relation(self, id: str) -> Relation:
        try:
            return self._by_id[id]
        except (KeyError, TypeError):
            raise KneuronsError(f"unknown relation {id!r}; known: {', '.join(self.relations)}") from None

    def facts(self, relation: str | None = None) -> list[Fact]:
        """The facts of one relation (in file order), or all of them."""
        if relation is not None:
            return list(self.relation(relation).facts)
        return [f for r in self._relations for f in r.facts]

    def prompts(self, relation: str, subject: Fact | str, causal: bool = False) -> list[str]:
        """The relation's templates with ``[X]`` replaced by the subject; the blank stays ``[Y]``.

        ``causal=True`` keeps only templates whose ``[Y]`` ends the sentence (only punctuation may follow).
        """
        return self.relation(relation).prompts(subject, causal=causal)

    def causal_template_counts(self) -> dict[str, tuple[int, int]]:
        """``{relation: (templates usable by a causal model, all templates)}``."""
        return {r.id: (len(r.causal_templates), len(r.templates)) for r in self._relations}

    def summary(self) -> dict[str, int]:
        """Counts: relations, facts, templates, causal_templates, prompts, causal_prompts."""
        rs = self._relations
        return {
            "relations": len(rs),
            "facts": sum(len(r.facts) for r in rs),
            "templates": sum(len(r.templates) for r in rs),
            "causal_templates": sum(len(r.causal_templates) for r in rs),
            "prompts": sum(len(r.facts) * len(r.templates) for r in rs),
            "causal_prompts": sum(len(r.facts) * len(r.causal_templates) for r in rs),
        }

    def to_factset(self) -> FactSet:
        """The same data as a :class:`kneurons.data.FactSet`."""
        return FactSet(list(self._relations), description="PARAREL", source=self.source)

    def to_dataframe(self):
        """One row per fact: ``relation, label, type, subject, object, n_templates, n_causal_templates``."""
        return self.to_factset().to_dataframe()

    def __len__(self) -> int:
        return sum(len(r.facts) for r in self._relations)

    def __repr__(self) -> str:
        s = self.summary()
        return f"Pararel({s['relations']} relations, {s['facts']} facts, {s['templates']} templates)"


def _load_relation_meta(path: Path) -> dict[str, tuple[str, str]]:
    meta = {}
    for n, obj in _read_jsonl(path, "relation metadata file"):
        where = f"{path} line {n}"
        rid = obj.get("relation")
        if not isinstance(rid, str) or not rid.strip():
            raise KneuronsError(f"{where}: 'relation' is missing or empty")
        label = obj.get("label", "")
        if not isinstance(label, str):
            raise KneuronsError(f"{where}: label must be a string")
        rtype = obj.get("type")
        if rtype not in RELATION_TYPES:
            raise KneuronsError(f"{where}: type {rtype!r} is not one of {', '.join(RELATION_TYPES)}")
        meta[rid.strip()] = (label, rtype)
    return meta


def _load_pairs(path: Path) -> dict[str, list[tuple[str, str]]]:
    data = _read_json(path, "query pairs file")
    if not isinstance(data, dict) or not data:
        raise KneuronsError(f"{path}: top level must be a non-empty object {{relation_id: [[subject, object], ...]}}")
    out = {}
    for rid, pairs in data.items():
        if not isinstance(pairs, list):
            raise KneuronsError(f"{path}: relation {rid!r} must map to a list of [subject, object] pairs")
        rows = []
        for j, p in enumerate(pairs):
            if (not isinstance(p, (list, tuple)) or len(p) != 2
                    or not all(isinstance(s, str) and s.strip() for s in p)):
                raise KneuronsError(f"{path}: relation {rid!r} fact #{j} must be a [subject, object] pair of "
                                    f"non-empty strings, got {p!r}")
            rows.append((p[0].strip(), p[1].strip()))
        out[rid] = rows
    return out


def _load_patterns(path: Path) -> list[str]:
    templates = []
    for n, obj in _read_jsonl(path, "pattern file"):
        templates.append(_check_template(obj.get("pattern"), f"{path} line {n}"))
    return templates


def load_pararel(directory: str | Path, relations: list[str] | None = None,
                 lama_relations: str | Path | bool | None = None) -> Pararel:
    """Load PARAREL from ``directory`` (holding ``query_pairs.json`` and ``patterns/P*.jsonl``).

    Only relations of ``query_pairs.json`` that have a pattern file with at least one pattern are kept, in
    ``query_pairs.json`` order; ``relations`` restricts them further (an id that is not available is an error).
    ``lama_relations``: the LAMA ``relations.jsonl`` with labels and types; by default
    ``directory/../lama/relations.jsonl``. Pass ``False`` to load without it (labels and types then empty).
    A relation missing from the metadata file gets an empty label and type.
    """
    d = Path(directory)
    if not d.is_dir():
        raise KneuronsError(f"PARAREL directory not found: {d}")
    pairs = _load_pairs(d / "query_pairs.json")
    pat_dir = d / "patterns"
    if not pat_dir.is_dir():
        raise KneuronsError(f"PARAREL patterns directory not found: {pat_dir}")

    if lama_relations is False:
        meta = {}
    else:
        if lama_relations is None or lama_relations is True:
            meta_path = d.parent / "lama" / "relations.jsonl"
            if not meta_path.is_file():
                raise KneuronsError(f"relation metadata file not found: {meta_path} (pass lama_relations=PATH, "
                                    f"or lama_relations=False to load without labels and types)")
        else:
            meta_path = Path(lama_relations)
        meta = _load_relation_meta(meta_path)

    if relations is not None:
        if isinstance(relations, str):
            relations = [relations]
        for rid in relations:
            if rid not in pairs:
                raise KneuronsError(f"unknown relation {rid!r}: not in {d / 'query_pairs.json'}")
            if not (pat_dir / f"{rid}.jsonl").is_file():
                raise KneuronsError(f"relation {rid!r} has no pattern file {pat_dir / (rid + '.jsonl')}")
        wanted = set(relations)
        ids = [rid for rid in pairs if rid in wanted]
    else:
        ids = list(pairs)

    out = []
    for rid in ids:
        pfile = pat_dir / f"{rid}.jsonl"
        if not pfile.is_file():
            continue
        templates = _load_patterns(pfile)
        if not templates:
            if relations is not None:
                raise KneuronsError(f"relation {rid!r}: pattern file {pfile} holds no patterns")
            continue
        label, rtype = meta.get(rid, ("", ""))
        facts = [Fact(rid, s, o) for s, o in pairs[rid]]
        out.append(Relation(rid, label, rtype, templates, facts))
    if not out:
        raise KneuronsError(f"{d}: no relation of query_pairs.json has patterns in {pat_dir}")
    return Pararel(out, str(d))
