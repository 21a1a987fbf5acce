"""The BingRel web sentences of the paper's Section 4.3: per fact, sentences that mention head and tail, and
sentences that mention only the head (pure Python; one-line errors naming the file and entry)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import KneuronsError
from ._files import _read_json

__all__ = ["BingRelBags", "bingrel_filename", "load_bingrel"]


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
