"""The built-in fact set and its loader.

``facts.json`` (packaged next to this module) holds relations, each with a few paraphrase templates and a list
of ``(subject, object)`` facts. Templates use ``[X]`` for the subject and ``[Y]`` for the blank where the
object goes. Most templates end with the blank, so causal models can score them; a few put it mid-sentence
(masked models only).

>>> from kneurons.data import load_facts
>>> fs = load_facts()
>>> rel = fs.relation("capital_of")
>>> fact = rel.facts[0]
>>> rel.prompts(fact, causal=True)[0]      # doctest: +SKIP
'The capital of France is the city of [Y].'
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from ..errors import KneuronsError

__all__ = ["Fact", "Relation", "FactSet", "load_facts", "DEFAULT_FACTS"]

DEFAULT_FACTS = "facts.json"
RELATION_TYPES = ("1-1", "N-1", "N-M")
# Only whitespace / punctuation / closing quotes or brackets may follow the blank of a causal template
# (the same rule as kneurons.prompts.encode).
from ..prompts import _TRAILING_OK  # noqa: E402


@dataclass(frozen=True)
class Fact:
    """One ``(subject, object)`` pair of a relation."""

    relation: str
    subject: str
    object: str


@dataclass
class Relation:
    """A relation: its templates and facts."""

    id: str
    label: str
    type: str
    templates: list[str]
    facts: list[Fact] = field(default_factory=list)

    @property
    def causal_templates(self) -> list[str]:
        """Templates whose blank ends the sentence (usable by causal models)."""
        return [t for t in self.templates if is_causal_template(t)]

    def prompts(self, fact: Fact | str, causal: bool = False) -> list[str]:
        """The fact's prompts: every template with ``[X]`` replaced by the subject; the blank stays ``[Y]``.

        ``causal=True`` keeps only templates whose blank ends the sentence. ``fact`` may be a :class:`Fact` or
        a subject string.
        """
        subject = fact.subject if isinstance(fact, Fact) else fact
        if not isinstance(subject, str) or not subject.strip():
            raise KneuronsError(f"relation {self.id!r}: empty subject")
        templates = self.causal_templates if causal else self.templates
        return [t.replace("[X]", subject) for t in templates]


def is_causal_template(template: str) -> bool:
    """True when only whitespace or punctuation follows ``[Y]``."""
    i = template.find("[Y]")
    return i >= 0 and bool(_TRAILING_OK.match(template[i + 3:]))


@dataclass
class FactSet:
    """A loaded fact set."""

    relations: list[Relation]
    version: int = 1
    description: str = ""
    source: str = ""

    def relation(self, id: str) -> Relation:
        for r in self.relations:
            if r.id == id:
                return r
        raise KneuronsError(f"unknown relation {id!r}; known: {', '.join(r.id for r in self.relations)}")

    @property
    def relation_ids(self) -> list[str]:
        return [r.id for r in self.relations]

    def facts(self, relation: str | None = None) -> list[Fact]:
        """All facts, or those of one relation."""
        if relation is not None:
            return list(self.relation(relation).facts)
        return [f for r in self.relations for f in r.facts]

    def __len__(self) -> int:
        return sum(len(r.facts) for r in self.relations)

    def to_dataframe(self):
        """One row per fact: ``relation, label, type, subject, object, n_templates, n_causal_templates``."""
        import pandas as pd

        rows = [{"relation": r.id, "label": r.label, "type": r.type, "subject": f.subject, "object": f.object,
                 "n_templates": len(r.templates), "n_causal_templates": len(r.causal_templates)}
                for r in self.relations for f in r.facts]
        cols = ["relation", "label", "type", "subject", "object", "n_templates", "n_causal_templates"]
        return pd.DataFrame(rows, columns=cols)


def _read_text(path) -> tuple[str, str]:
    if path is None:
        try:
            res = resources.files(__package__).joinpath(DEFAULT_FACTS)
            return res.read_text(encoding="utf-8"), f"kneurons/data/{DEFAULT_FACTS}"
        except (FileNotFoundError, OSError) as e:
            raise KneuronsError(f"packaged fact set {DEFAULT_FACTS} is missing: {e}") from None
    p = Path(path)
    if not p.is_file():
        raise KneuronsError(f"fact file not found: {p}")
    try:
        return p.read_text(encoding="utf-8"), str(p)
    except (OSError, UnicodeDecodeError) as e:
        raise KneuronsError(f"cannot read fact file {p}: {e}") from None


def _str(value, what: str, src: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise KneuronsError(f"{src}: {what} is missing or empty")
    return value.strip()


def _relation(raw, index: int, src: str) -> Relation:
    if not isinstance(raw, dict):
        raise KneuronsError(f"{src}: relation #{index} is not an object")
    rid = _str(raw.get("id"), f"relation #{index} id", src)
    where = f"{src}: relation {rid!r}"
    label = raw.get("label", "")
    if not isinstance(label, str):
        raise KneuronsError(f"{where}: label must be a string")
    rtype = raw.get("type", "N-M")
    if rtype not in RELATION_TYPES:
        raise KneuronsError(f"{where}: type {rtype!r} is not one of {', '.join(RELATION_TYPES)}")
    templates = raw.get("templates")
    if not isinstance(templates, list) or not templates:
        raise KneuronsError(f"{where}: templates must be a non-empty list")
    for t in templates:
        if not isinstance(t, str):
            raise KneuronsError(f"{where}: template {t!r} is not a string")
        nx, ny = t.count("[X]"), t.count("[Y]")
        if nx != 1 or ny != 1:
            raise KneuronsError(f"{where}: template {t!r} must hold exactly one [X] and one [Y] "
                                f"(has {nx} [X], {ny} [Y])")
    facts_raw = raw.get("facts")
    if not isinstance(facts_raw, list) or not facts_raw:
        raise KneuronsError(f"{where}: facts must be a non-empty list")
    facts = []
    for j, f in enumerate(facts_raw):
        if not isinstance(f, dict):
            raise KneuronsError(f"{where}: fact #{j} is not an object")
        subj = _str(f.get("subject"), f"fact #{j} subject", where)
        obj = _str(f.get("object"), f"fact #{j} ({subj!r}) object", where)
        facts.append(Fact(rid, subj, obj))
    return Relation(rid, label, rtype, list(templates), facts)


def load_facts(path: str | Path | None = None) -> FactSet:
    """Load a fact set (default: the packaged ``facts.json``); bad files raise :class:`KneuronsError`."""
    text, src = _read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise KneuronsError(f"invalid JSON in {src}: {e.msg} at line {e.lineno} column {e.colno}") from None
    if not isinstance(data, dict):
        raise KneuronsError(f"{src}: top level must be an object with a 'relations' list")
    rels_raw = data.get("relations")
    if not isinstance(rels_raw, list) or not rels_raw:
        raise KneuronsError(f"{src}: 'relations' must be a non-empty list")
    relations = [_relation(r, i, src) for i, r in enumerate(rels_raw)]
    seen = set()
    for r in relations:
        if r.id in seen:
            raise KneuronsError(f"{src}: duplicate relation id {r.id!r}")
        seen.add(r.id)
    version = data.get("version", 1)
    description = data.get("description", "")
    return FactSet(relations, version if isinstance(version, int) else 1,
                   description if isinstance(description, str) else "", src)
