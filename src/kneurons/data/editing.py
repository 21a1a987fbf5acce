"""Model-editing benchmarks — CounterFact (Meng et al. 2022) and zsRE (MEND split) — normalized to
:class:`EditCase` (pure Python, no model needed; every loader takes a path, bad files raise a one-line
:class:`~kneurons.errors.KneuronsError` naming the file and case)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import KneuronsError
from ._files import _read_json

__all__ = ["EditCase", "load_counterfact", "load_zsre"]

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
