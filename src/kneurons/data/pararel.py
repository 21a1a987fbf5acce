"""Loaders for the paper's data and standard editing benchmarks (pure Python, no model needed).

Nothing here knows where the data lives: every loader takes a path. Bad or missing files raise a one-line
:class:`~kneurons.errors.KneuronsError` naming the file (and line or case, where there is one).

* :func:`load_pararel` — the PARAREL fact set of Dai et al. (2022): ``query_pairs.json``
  (``{relation_id: [[subject, object], ...]}``), ``patterns/P*.jsonl`` (one ``{"pattern": "[X] ... [Y] ."}``
  a line) and the LAMA relation metadata ``relations.jsonl`` (label and type 1-1 / N-1 / N-M).
* :func:`load_counterfact` / :func:`load_zsre` — model-editing benchmarks, normalized to :class:`EditCase`.
* :func:`load_bingrel` — the BingRel web sentences (paper Section 4.3), one :class:`BingRelBags` per fact.

>>> from kneurons.data.pararel import load_pararel          # doctest: +SKIP
>>> pr = load_pararel("../shared/data/pararel")             # doctest: +SKIP
>>> pr.summary()["facts"], pr.prompts("P19", "Allan Peiper", causal=True)[0]   # doctest: +SKIP
(27738, 'Allan Peiper was born in [Y].')
"""

from __future__ import annotations

import gzip
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import KneuronsError
from . import RELATION_TYPES, Fact, FactSet, Relation

__all__ = ["Pararel", "load_pararel", "EditCase", "load_counterfact", "load_zsre", "BingRelBags",
           "load_bingrel", "bingrel_filename"]


# --------------------------------------------------------------------------------------------------- helpers

def _read_json(path: Path, what: str):
    if not path.is_file():
        raise KneuronsError(f"{what} not found: {path}")
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rt", encoding="utf-8") as fh:
                text = fh.read()
        else:
            text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise KneuronsError(f"cannot read {what} {path}: {e}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise KneuronsError(f"invalid JSON in {path}: {e.msg} at line {e.lineno} column {e.colno}") from None


def _read_jsonl(path: Path, what: str) -> list[tuple[int, dict]]:
    """``(line number, object)`` for each non-blank line."""
    if not path.is_file():
        raise KneuronsError(f"{what} not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise KneuronsError(f"cannot read {what} {path}: {e}") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise KneuronsError(f"invalid JSON in {path} line {n}: {e.msg} at column {e.colno}") from None
        if not isinstance(obj, dict):
            raise KneuronsError(f"{path} line {n}: expected a JSON object")
        out.append((n, obj))
    return out


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


# --------------------------------------------------------------------------------------------------- editing

_BLANK_MARKERS = re.compile(r"\[MASK\]|\[Y\]")
_UNDERSCORE_BLANK = re.compile(r"_{3,}")


@dataclass
class EditCase:
    """One model-editing case, normalized from CounterFact or zsRE.

    Which metric uses which field:

    * **reliability** (efficacy): ``prompt`` should give ``target_new`` after the edit (``target_true`` before);
    * **generalization** (paraphrase): each of ``rephrase_prompts`` should also give ``target_new``;
    * **locality** (specificity / neighborhood): each of ``locality_prompts`` should keep giving the
      corresponding entry of ``locality_answers``.

    Prompts are the text *before* the answer; :meth:`cloze` turns one into a causal cloze ``"... [Y]"``.
    ``meta`` keeps extra source fields (zsRE: ``pred``, ``answers``, ``cond``).
    """

    case_id: int | str
    subject: str
    prompt: str
    target_true: str
    target_new: str
    rephrase_prompts: list[str] = field(default_factory=list)
    locality_prompts: list[str] = field(default_factory=list)
    locality_answers: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def cloze(self, prompt: str | None = None) -> str:
        """``prompt`` (default: the edit prompt) as a cloze whose blank ends it: ``prompt + " [Y]"``.

        The answer follows the prompt, so the blank goes at the end. Blank-like markers already in the text
        (``[Y]``, ``[MASK]``, runs of three or more underscores, as in some NQ questions) are neutralized
        (``(Y)``, ``(MASK)``, ``__``) so that the added ``[Y]`` is the only blank.
        """
        text = self.prompt if prompt is None else prompt
        if not isinstance(text, str) or not text.strip():
            raise KneuronsError(f"edit case {self.case_id!r}: empty prompt")
        text = _BLANK_MARKERS.sub(lambda m: "(" + m.group(0)[1:-1] + ")", text)
        text = _UNDERSCORE_BLANK.sub("__", text)
        return text.rstrip() + " [Y]"

    def clozes(self) -> dict:
        """Cloze prompts per metric: ``{"reliability": [...], "generalization": [...],
        "locality": [(cloze, answer), ...]}``."""
        return {"reliability": [self.cloze()],
                "generalization": [self.cloze(p) for p in self.rephrase_prompts],
                "locality": [(self.cloze(p), a) for p, a in zip(self.locality_prompts, self.locality_answers)]}


def _cases(path, what: str) -> tuple[list, Path]:
    p = Path(path)
    data = _read_json(p, f"{what} file")
    if not isinstance(data, list):
        raise KneuronsError(f"{p}: top level must be a list of {what} cases")
    return data, p


def _field_str(rec: dict, key: str, where: str) -> str:
    v = rec.get(key)
    if not isinstance(v, str) or not v.strip():
        raise KneuronsError(f"{where}: field {key!r} is missing or empty")
    return v.strip()


def _field_strs(rec: dict, key: str, where: str) -> list[str]:
    """A string or a non-empty list of strings."""
    v = rec.get(key)
    vals = [v] if isinstance(v, str) else v
    if not isinstance(vals, list) or not vals or not all(isinstance(s, str) and s.strip() for s in vals):
        raise KneuronsError(f"{where}: field {key!r} is missing or empty (expected a string or a list of strings)")
    return [s.strip() for s in vals]


def _with_subject(text: str, subject: str) -> str:
    return text.replace("{}", subject)


def _locality_answers(loc: list[str], answers: list[str], field: str, where: str) -> list[str]:
    """One answer per locality prompt (a single answer is shared by all of them)."""
    if len(answers) == 1 and len(loc) > 1:
        answers = answers * len(loc)
    if len(answers) != len(loc):
        raise KneuronsError(f"{where}: field {field!r} has {len(answers)} answers for {len(loc)} locality prompts")
    return answers


def load_counterfact(path: str | Path) -> list[EditCase]:
    """Load CounterFact in the flat form: a JSON list of ``{case_id, prompt, subject, ground_truth, target_new,
    rephrase_prompt, locality_prompt, locality_ground_truth}``.

    Prompts may hold the subject literally or as ``{}`` (replaced by the subject). ``rephrase_prompt``,
    ``locality_prompt`` and ``locality_ground_truth`` may each be a string or a list (one locality answer is
    shared by all locality prompts). Fields: reliability ← ``prompt``/``target_new`` (``ground_truth`` before
    the edit), generalization ← ``rephrase_prompt``, locality ← ``locality_prompt``/``locality_ground_truth``.
    """
    data, p = _cases(path, "CounterFact")
    out = []
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            raise KneuronsError(f"{p}: case #{i} is not an object")
        cid = rec.get("case_id")
        where = f"{p}: case #{i}" + (f" (case_id {cid})" if cid is not None else "")
        if cid is None or isinstance(cid, bool) or not isinstance(cid, (int, str)):
            raise KneuronsError(f"{where}: field 'case_id' is missing or not an int/string")
        subject = _field_str(rec, "subject", where)
        prompt = _with_subject(_field_str(rec, "prompt", where), subject)
        if subject not in prompt:
            raise KneuronsError(f"{where}: field 'prompt' does not contain the subject {subject!r}: {prompt!r}")
        target_true = _field_str(rec, "ground_truth", where)
        target_new = _field_str(rec, "target_new", where)
        rephrase = [_with_subject(s, subject) for s in _field_strs(rec, "rephrase_prompt", where)]
        loc = [_with_subject(s, subject) for s in _field_strs(rec, "locality_prompt", where)]
        loc_ans = _locality_answers(loc, _field_strs(rec, "locality_ground_truth", where), "locality_ground_truth",
                                    where)
        out.append(EditCase(cid, subject, prompt, target_true, target_new, rephrase, loc, loc_ans))
    return out


NQ_PREFIX = "nq question: "


def load_zsre(path: str | Path, strip_nq_prefix: bool = False, drop_empty_targets: bool = False) -> list[EditCase]:
    """Load zsRE (MEND split): a JSON list of ``{subject, src, pred, rephrase, alt, answers, loc, loc_ans, ...}``.

    Mapping: ``prompt`` ← ``src`` (a question), ``target_new`` ← ``alt``, ``target_true`` ← ``answers[0]``
    (the gold answer; ``pred`` when ``answers`` is absent or empty), ``rephrase_prompts`` ← ``rephrase``,
    ``locality_prompts`` ← ``loc`` (an ``"nq question: ..."`` string, kept as is unless ``strip_nq_prefix``)
    with ``locality_answers`` ← ``loc_ans``. ``case_id`` is the record's ``case_id`` or its index. ``pred``,
    ``answers`` and ``cond`` are kept in ``meta``. Metrics: reliability ← ``src``/``alt``, generalization ←
    ``rephrase``, locality ← ``loc``/``loc_ans``.

    A few published cases have an empty ``alt`` (no new target; 2 of the MEND train 1k). They are kept with
    ``target_new == ""`` (so case indices match the file) unless ``drop_empty_targets``; a *missing* ``alt``
    is an error.
    """
    data, p = _cases(path, "zsRE")
    out = []
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            raise KneuronsError(f"{p}: case #{i} is not an object")
        cid = rec.get("case_id", i)
        where = f"{p}: case #{i}" + (f" (case_id {cid})" if cid != i else "")
        subject = _field_str(rec, "subject", where)
        prompt = _with_subject(_field_str(rec, "src", where), subject)
        if subject not in prompt:
            raise KneuronsError(f"{where}: field 'src' does not contain the subject {subject!r}: {prompt!r}")
        answers = rec.get("answers")
        if answers is not None and (not isinstance(answers, list)
                                    or not all(isinstance(a, str) and a.strip() for a in answers)):
            raise KneuronsError(f"{where}: field 'answers' must be a list of non-empty strings")
        if answers:
            target_true = answers[0].strip()
        else:
            if not isinstance(rec.get("pred"), str) or not rec["pred"].strip():
                raise KneuronsError(f"{where}: field 'answers' (or 'pred') is missing or empty")
            target_true = rec["pred"].strip()
        target_new = rec.get("alt")
        if not isinstance(target_new, str):
            raise KneuronsError(f"{where}: field 'alt' is missing or not a string")
        target_new = target_new.strip()
        if not target_new and drop_empty_targets:
            continue
        rephrase = [_with_subject(s, subject) for s in _field_strs(rec, "rephrase", where)]
        loc = _field_strs(rec, "loc", where)
        if strip_nq_prefix:
            loc = [s[len(NQ_PREFIX):].strip() if s.startswith(NQ_PREFIX) else s for s in loc]
        loc_ans = _locality_answers(loc, _field_strs(rec, "loc_ans", where), "loc_ans", where)
        meta = {k: rec[k] for k in ("pred", "answers", "cond") if k in rec}
        out.append(EditCase(cid, subject, prompt, target_true, target_new, rephrase, loc, loc_ans, meta))
    return out


# --------------------------------------------------------------------------------------------------- BingRel

@dataclass
class BingRelBags:
    """Web sentences for one fact: ``th_bags`` mention head and tail, ``h_bags`` only the head."""

    th_bags: list[str]
    h_bags: list[str]


def bingrel_filename(relation: str) -> str:
    return f"final_distant_allbags_{relation}_new.json.gz"


def load_bingrel(directory: str | Path, relation: str, n_facts: int | None = None) -> list[BingRelBags]:
    """Load ``directory/final_distant_allbags_<relation>_new.json.gz``: one entry per fact of the relation, in
    ``query_pairs.json`` order. ``n_facts``: when given, the number of entries must equal it."""
    if not isinstance(relation, str) or not re.fullmatch(r"[A-Za-z0-9_\-]+", relation):
        raise KneuronsError(f"bad relation id {relation!r}")
    d = Path(directory)
    if not d.is_dir():
        raise KneuronsError(f"BingRel directory not found: {d}")
    p = d / bingrel_filename(relation)
    data = _read_json(p, f"BingRel file for relation {relation!r}")
    if not isinstance(data, list):
        raise KneuronsError(f"{p}: top level must be a list of {{th_bags, h_bags}} objects")
    out = []
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            raise KneuronsError(f"{p}: entry #{i} is not an object")
        bags = []
        for key in ("th_bags", "h_bags"):
            v = rec.get(key)
            if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
                raise KneuronsError(f"{p}: entry #{i}: field {key!r} is missing or not a list of strings")
            bags.append(list(v))
        out.append(BingRelBags(*bags))
    if n_facts is not None and len(out) != n_facts:
        raise KneuronsError(f"{p}: {len(out)} entries but relation {relation!r} has {n_facts} facts")
    return out
