"""The numbers of a report: everything :func:`summary` returns, computed from a run store with pandas.

Conventions (the report states them too):

* rows that are ``{"error": ...}`` or carry a ``skipped`` reason are counted per experiment and left out of
  every mean;
* a relative change Δp/p is first the mean over a fact's prompts (stored per row), then the mean over the facts
  of a relation (``per_relation``) and over all facts (``all_facts``, the headline number); ``mean_of_relations``
  is the unweighted mean of the relation means;
* means skip NaN (pandas' default); every non-finite number becomes ``None`` so that the summary is plain JSON.
"""

from __future__ import annotations

import math
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .. import __version__
from ..errors import KneuronsError
from ..experiments.locate import locate_stats
from ..experiments.paper import PAPER, PAPER_MODEL
from ..experiments.registry import EXPERIMENTS
from ..experiments.store import RunStore, describe_skipped

META_KEYS = ("model_info", "device", "skipped_relations", "known_facts", "activations_skipped",
             "activations_missing_relations", "activations_bad_files", "erase_not_in_run", "weights_restored",
             "last_run_seconds", "complete", "created")
METHODS = ("kn", "fact_specific", "activation", "random")
#: the neuron sets' names in tables and figures
METHOD_NAMES = {"kn": "knowledge neurons", "fact_specific": "fact-specific neurons", "activation": "activation baseline",
                "random": "random neurons"}
OPS = ("suppress", "amplify")
GROUPS = ("fact", "same_relation", "other_relation")
BAGS = ("head_tail", "head_only", "random")
UPDATE_QUANTITIES = ("p_old", "p_new", "success1", "success5", "ppl_intra", "ppl_inter")
ERASE_GROUPS = ("erased", "other")


@dataclass
class RunData:
    """What a report reads from a run directory (the store is closed once this exists)."""

    dir: Path
    config: dict
    meta: dict
    counts: dict
    tables: dict  # experiment -> DataFrame


def load_run(run_dir) -> RunData:
    """Read a run directory; a missing, foreign or corrupt one raises :class:`KneuronsError` (one line)."""
    store = RunStore(run_dir)  # raises KneuronsError for a missing / foreign directory or a corrupt database
    try:
        meta = {k: store.meta(k) for k in META_KEYS}
        counts = store.counts()
        tables = {e: pd.DataFrame(store.rows(e)) for e in EXPERIMENTS}
    except (sqlite3.DatabaseError, ValueError) as exc:  # ValueError: a stored JSON value that does not parse
        raise KneuronsError(f"cannot read the results of {store.dir}: {exc}") from None
    finally:
        store.close()
    return RunData(store.dir, dict(store.config), meta, counts, tables)


# ------------------------------------------------------------------------------------------------ helpers
def finite(x):
    """``float(x)`` when finite, else ``None`` (NaN, inf, missing, not a number)."""
    if x is None or isinstance(x, bool):
        return None if x is None else float(x)
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _is_set(v) -> bool:
    """A present, non-empty marker (an ``error`` / ``skipped`` value); NaN (a column absent from the row) is not."""
    if v is None:
        return False
    if isinstance(v, float):
        return not math.isnan(v)
    if isinstance(v, str):
        return bool(v.strip())
    return bool(v)


def _mean(series) -> float | None:
    s = pd.to_numeric(pd.Series(series, dtype="object"), errors="coerce").astype(float)
    s = s[s.map(math.isfinite)]
    return finite(s.mean()) if len(s) else None


def _ordered(values, preferred) -> list:
    """Distinct ``values`` in the ``preferred`` order, any others after them in order of appearance."""
    seen = list(dict.fromkeys(v for v in values if isinstance(v, str)))
    return [v for v in preferred if v in seen] + [v for v in seen if v not in preferred]


def split_rows(df: pd.DataFrame, need=()) -> tuple[pd.DataFrame, list[tuple[str, str, str]]]:
    """``(good rows, issues)``: issues are ``(unit, "error" | "skipped", message)`` for error rows, skipped rows
    and rows lacking a column in ``need`` (reported as errors)."""
    if df.empty:
        return df, []
    n = len(df)
    err = df["error"].map(_is_set) if "error" in df else pd.Series([False] * n, index=df.index)
    skip = (df["skipped"].map(_is_set) if "skipped" in df else pd.Series([False] * n, index=df.index)) & ~err
    bad = pd.Series([False] * n, index=df.index)
    missing = {}
    for c in need:
        lack = ~df[c].notna() if c in df else pd.Series([True] * n, index=df.index)
        lack &= ~err & ~skip & ~bad
        for i in df.index[lack]:
            missing[i] = f"malformed row (no {c!r})"
        bad |= lack
    issues = []
    for i in df.index:
        unit = str(df.at[i, "unit"]) if "unit" in df else "?"
        if err[i]:
            issues.append((unit, "error", str(df.at[i, "error"])))
        elif skip[i]:
            issues.append((unit, "skipped", str(df.at[i, "skipped"])))
        elif bad[i]:
            issues.append((unit, "error", missing[i]))
    return df[~err & ~skip & ~bad], issues


def _clean(obj):
    """Recursively: numbers -> finite float or None, tuples -> lists, numpy scalars -> Python."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if hasattr(obj, "item") and not isinstance(obj, (list, dict)):  # numpy scalar
        obj = obj.item()
    if isinstance(obj, bool):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return finite(obj)
    return obj


# ------------------------------------------------------------------------------------------------ sections
def _run_section(d: RunData) -> dict:
    info = d.meta.get("model_info") or {}
    cfg = d.config
    return {"dir": str(d.dir), "model": info.get("name") or cfg.get("model"), "model_path": cfg.get("model"),
            "model_info": info, "device": d.meta.get("device"), "data": cfg.get("data"),
            "paper_model": PAPER_MODEL, "run_version": cfg.get("version"), "report_version": __version__,
            "complete": bool(d.meta.get("complete")), "weights_restored": d.meta.get("weights_restored"),
            "last_run_seconds": d.meta.get("last_run_seconds"), "created": d.meta.get("created"),
            "experiments_configured": list(cfg.get("experiments") or []), "units_stored": dict(d.counts),
            "skipped_data": describe_skipped(d.meta, _error_units(d)), "config": cfg}


def _error_units(d: RunData) -> dict[str, int]:
    """Per experiment, the units with a non-empty ``error`` in a row (as the run's last line counts them)."""
    out = {}
    for e, df in d.tables.items():
        if len(df) and "error" in df:
            bad = df[df["error"].map(lambda v: isinstance(v, str) and v != "")]
            if len(bad):
                out[e] = int(bad["unit"].nunique())
    return out


def facts_section(d: RunData, issues: dict) -> dict:
    # assess error rows (a fact the model cannot be asked) are facts assessed and not known
    issues["assess"] = split_rows(d.tables["assess"], need=("relation",))[1]
    known_used = d.meta.get("known_facts") or {}
    skipped_rel = d.meta.get("skipped_relations") or {}
    full = d.tables["assess"]
    relations = _ordered(list(full["relation"]) if "relation" in full else [], list(known_used))
    relations += [r for r in skipped_rel if r not in relations]
    per = {}
    for rid in relations:
        rows = full[full["relation"] == rid] if "relation" in full else full.iloc[0:0]
        err = sum(_is_set(v) for v in rows["error"]) if "error" in rows else 0
        known = sum(v is True or v == 1 for v in rows["known"]) if "known" in rows else 0
        per[rid] = {"assessed": len(rows), "known": known, "errors": err,
                    "used": len(known_used.get(rid, [])), "skipped": skipped_rel.get(rid)}
    return {"assessed": sum(p["assessed"] for p in per.values()), "known": sum(p["known"] for p in per.values()),
            "errors": sum(p["errors"] for p in per.values()), "used": sum(p["used"] for p in per.values()),
            "relations": len([r for r in per if per[r]["skipped"] is None]), "skipped_relations": skipped_rel,
            "per_relation": per}


def locate_section(d: RunData, issues: dict) -> dict:
    df, issues["locate"] = split_rows(d.tables["locate"], need=("method", "neurons", "relation"))
    info = d.meta.get("model_info") or {}
    rows = df.to_dict("records")
    n_layers = info.get("n_layers")
    if not isinstance(n_layers, int) or n_layers < 1:
        n_layers = 1 + max((int(n[0]) for r in rows for n in r["neurons"]), default=-1)
    stats = locate_stats(rows, n_layers) if rows else {}
    for m, st in stats.items():
        st["seconds_per_fact"] = _mean(df.loc[df["method"] == m, "seconds"]) if "seconds" in df else None
    per = {}
    for rid in _ordered(df["relation"], []) if len(df) else []:
        sub = df[df["relation"] == rid]
        per[rid] = {}
        for m in _ordered(sub["method"], METHODS):
            counts = sub.loc[sub["method"] == m, "neurons"].map(len)
            per[rid][m] = {"facts": len(counts), "neurons_per_fact": _mean(counts),
                           "facts_without_neurons": int((counts == 0).sum())}
    return {"facts": int(df["unit"].nunique()) if len(df) else 0, "n_layers": n_layers, "methods": stats,
            "per_relation": per, "paper": PAPER["locate"]}


def _by_fact(df: pd.DataFrame, value: str) -> dict:
    """Mean of ``value`` over all rows (facts), per relation, and the mean of the relation means."""
    per = {}
    for rid in _ordered(df["relation"], []):
        sub = df[df["relation"] == rid]
        per[rid] = {"mean": _mean(sub[value]), "n_facts": int(sub["unit"].nunique())}
    rel_means = [p["mean"] for p in per.values() if p["mean"] is not None]
    return {"all_facts": _mean(df[value]), "mean_of_relations": _mean(rel_means) if rel_means else None,
            "n_facts": int(df["unit"].nunique()), "per_relation": per}


def suppress_section(d: RunData, issues: dict) -> dict:
    df, issues["suppress"] = split_rows(d.tables["suppress"], need=("method", "op", "group", "relation"))
    out = {"facts": int(df["unit"].nunique()) if len(df) else 0, "ops": {}, "paper": {op: PAPER[op] for op in OPS}}
    if not len(df):
        return out
    for op in _ordered(df["op"], OPS):
        for m in _ordered(df.loc[df["op"] == op, "method"], METHODS):
            for g in _ordered(df.loc[(df["op"] == op) & (df["method"] == m), "group"], GROUPS):
                sub = df[(df["op"] == op) & (df["method"] == m) & (df["group"] == g)]
                cell = _by_fact(sub, "rel_change") if "rel_change" in sub else {}
                cell["before"] = _mean(sub["before"]) if "before" in sub else None
                cell["after"] = _mean(sub["after"]) if "after" in sub else None
                cell["neurons_per_fact"] = _mean(sub["n_neurons"]) if "n_neurons" in sub else None
                out["ops"].setdefault(op, {}).setdefault(m, {})[g] = cell
            cells = out["ops"].get(op, {}).get(m, {})
            fact, same = (cells.get(g, {}).get("all_facts") for g in ("fact", "same_relation"))
            if cells and fact is not None and same is not None and math.isfinite(fact) and math.isfinite(same):
                cells["relation_specificity"] = abs(fact) / max(abs(same), 1e-12)  # fact ÷ same relation
            if cells and "rel_change" in df:
                cells.update(_per_fact_specificity(df[(df["op"] == op) & (df["method"] == m)]))
    return out


def _per_fact_specificity(df: pd.DataFrame) -> dict:
    """Fact ÷ same relation for each fact with both groups: the median ratio, and how many facts moved more than
    their relation's other facts (a mean of ratios is dominated by facts whose controls barely moved)."""
    wide = df.pivot_table(index="unit", columns="group", values="rel_change", aggfunc="mean")
    if "fact" not in wide or "same_relation" not in wide:
        return {}
    both = wide[["fact", "same_relation"]].dropna()
    both = both[both.map(math.isfinite).all(axis=1)]
    if not len(both):
        return {}
    f, c = both["fact"].abs(), both["same_relation"].abs()
    return {"relation_specificity_median": float((f / c.clip(lower=1e-12)).median()),
            "facts_beyond_relation": int((f > c).sum()), "facts_paired": len(both)}


def activations_section(d: RunData, issues: dict) -> dict:
    df, issues["activations"] = split_rows(d.tables["activations"], need=("bag", "relation"))
    out = {"facts": int(df["unit"].nunique()) if len(df) else 0, "facts_with_neurons": 0, "bags": {},
           "skipped": d.meta.get("activations_skipped"),
           "missing_relations": d.meta.get("activations_missing_relations") or [],
           "bad_files": d.meta.get("activations_bad_files") or {},
           "paper": PAPER["activations"]}
    if not len(df) or "mean_activation" not in df:
        return out
    vals = df[pd.to_numeric(df["mean_activation"], errors="coerce").map(math.isfinite)]
    out["facts_with_neurons"] = int(vals["unit"].nunique())
    for bag in _ordered(vals["bag"], BAGS):
        sub = vals[vals["bag"] == bag]
        cell = _by_fact(sub, "mean_activation")
        if "max_activation" in sub:  # max over positions (runs made before it was recorded lack it)
            cell["max_all_facts"] = _mean(sub["max_activation"])
        cell["sentences_per_fact"] = _mean(sub["n_sentences"]) if "n_sentences" in sub else None
        out["bags"][bag] = cell
    return out


def update_section(d: RunData, issues: dict) -> dict:
    full = d.tables["update"]
    df, issues["update"] = split_rows(full, need=("method", "relation"))
    skipped_units = {u for u, kind, _ in issues["update"] if kind == "skipped"}
    error_units = {u for u, kind, _ in issues["update"] if kind == "error"}
    out = {"facts": int(full["unit"].nunique()) if len(full) else 0, "facts_edited": 0,
           "facts_without_neurons": len(skipped_units - set(df["unit"] if len(df) else [])),
           "facts_with_errors": len(error_units), "methods": {}, "paper": PAPER["update"]}
    if not len(df):
        return out
    out["facts_edited"] = int(df["unit"].nunique())
    for m in _ordered(df["method"], ("kn", "random")):
        sub = df[df["method"] == m]
        cell = {"n_facts": int(sub["unit"].nunique()),
                "neurons_per_fact": _mean(sub["n_neurons"]) if "n_neurons" in sub else None}
        for q in UPDATE_QUANTITIES:
            b, a = f"{q}_before", f"{q}_after"
            if b not in sub or a not in sub:
                continue
            before = pd.to_numeric(sub[b], errors="coerce")
            after = pd.to_numeric(sub[a], errors="coerce")
            cell[b], cell[a] = _mean(before), _mean(after)
            if q.startswith("ppl"):
                cell[f"delta_{q}"] = _mean(after - before)
                cell[f"rel_delta_{q}"] = _mean((after - before) / before)
        out["methods"][m] = cell
    return out


def erase_section(d: RunData, issues: dict) -> dict:
    full = d.tables["erase"]
    df, issues["erase"] = split_rows(full, need=("method", "group"))
    out = {"relations": {}, "skipped": {}, "errors": {}, "not_in_run": d.meta.get("erase_not_in_run") or [],
           "range": {}, "paper": PAPER["erase"]}
    for unit, kind, msg in issues["erase"]:
        (out["skipped"] if kind == "skipped" else out["errors"])[unit] = msg
    if not len(df):
        return out
    for unit in _ordered(df["unit"], []):
        sub = df[df["unit"] == unit]
        rel = {}
        for m in _ordered(sub["method"], ("kn", "random")):
            for g in _ordered(sub.loc[sub["method"] == m, "group"], ERASE_GROUPS):
                r = sub[(sub["method"] == m) & (sub["group"] == g)].iloc[0]
                pb, pa = finite(r.get("ppl_before")), finite(r.get("ppl_after"))
                rel.setdefault(m, {})[g] = {
                    "ppl_before": pb, "ppl_after": pa,
                    "ppl_change": (pa / pb - 1) if pb and pa is not None else None,
                    "acc_before": finite(r.get("acc_before")), "acc_after": finite(r.get("acc_after")),
                    "n_neurons": finite(r.get("n_neurons")), "n_prompts": finite(r.get("n_prompts")),
                    "mean_facts_per_neuron": finite(r.get("mean_facts_per_neuron")), "mode": r.get("mode")}
        out["relations"][unit] = rel
    for m in ("kn", "random"):
        for g in ERASE_GROUPS:
            ch = [rel[m][g]["ppl_change"] for rel in out["relations"].values()
                  if g in rel.get(m, {}) and rel[m][g]["ppl_change"] is not None]
            if ch:
                out["range"].setdefault(m, {})[g] = [min(ch), max(ch)]
    return out


def _issues_section(d: RunData, issues: dict) -> dict:
    out = {}
    for e in EXPERIMENTS:
        iss = issues.get(e, [])
        msgs = {}
        for _, kind, msg in iss:
            msgs[(kind, msg)] = msgs.get((kind, msg), 0) + 1
        out[e] = {"units": int(d.counts.get(e, 0)), "rows": len(d.tables[e]),
                  "errors": sum(k == "error" for _, k, _ in iss), "skipped": sum(k == "skipped" for _, k, _ in iss),
                  "messages": [{"kind": k, "message": m, "count": c} for (k, m), c in
                               sorted(msgs.items(), key=lambda kv: -kv[1])]}
    return out


def _g(d: dict, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _compare(s: dict) -> list[dict]:
    """The rows "ours beside the paper's"."""
    rows = []

    def add(section, key, quantity, ours, paper, unit, n=None):
        rows.append({"section": section, "key": key, "quantity": quantity, "ours": ours, "paper": paper,
                     "unit": unit, "n": n})

    loc, sup, act, upd, era = s["locate"], s["suppress"], s["activations"], s["update"], s["erase"]
    add("locate", "neurons_per_fact", "knowledge neurons per fact", _g(loc, "methods", "kn", "neurons_per_fact"),
        PAPER["locate"]["neurons_per_fact"], "count", _g(loc, "methods", "kn", "facts"))
    add("locate", "neurons_per_fact_activation", "activation-baseline neurons per fact",
        _g(loc, "methods", "activation", "neurons_per_fact"), PAPER["locate"]["neurons_per_fact_activation"],
        "count", _g(loc, "methods", "activation", "facts"))
    names = METHOD_NAMES
    for op in OPS:
        for m in METHODS:
            add(op, m, f"{op}: Δp/p of the fact, {names[m]}", _g(sup, "ops", op, m, "fact", "all_facts"),
                PAPER[op].get(m), "fraction", _g(sup, "ops", op, m, "fact", "n_facts"))
    for m in ("kn", "fact_specific"):  # no paper number: the paper did not measure it
        add("suppress", f"relation_specificity_{m}", f"suppress: fact ÷ same relation, {names[m]}",
            _g(sup, "ops", "suppress", m, "relation_specificity"), None, "count",
            _g(sup, "ops", "suppress", m, "fact", "n_facts"))
        add("suppress", f"relation_specificity_median_{m}", f"suppress: fact ÷ same relation per fact (median), "
            f"{names[m]}", _g(sup, "ops", "suppress", m, "relation_specificity_median"), None, "count",
            _g(sup, "ops", "suppress", m, "facts_paired"))
    for bag in BAGS:
        add("activations", bag, f"mean activation, {bag.replace('_', '-')} sentences",
            _g(act, "bags", bag, "all_facts"), PAPER["activations"][bag], "activation",
            _g(act, "bags", bag, "n_facts"))
    for bag in BAGS:
        if _g(act, "bags", bag, "max_all_facts") is not None:
            add("activations", f"{bag}_max", f"max-over-positions activation, {bag.replace('_', '-')} sentences",
                _g(act, "bags", bag, "max_all_facts"), None, "activation", _g(act, "bags", bag, "n_facts"))
    for m in ("kn", "random"):
        add("update", f"success1_{m}", f"update success@1, {names[m]}", _g(upd, "methods", m, "success1_after"),
            PAPER["update"][f"success1_{m}"], "share", _g(upd, "methods", m, "n_facts"))
    for m in ("kn", "random"):
        add("update", f"delta_ppl_inter_{m}", f"update Δ inter-relation perplexity, {names[m]}",
            _g(upd, "methods", m, "delta_ppl_inter"), PAPER["update"][f"delta_ppl_inter_{m}"], "perplexity",
            _g(upd, "methods", m, "n_facts"))
    n_rel = len([r for r in era["relations"].values() if "kn" in r])
    add("erase", "erased_ppl_change", "erase: perplexity change on the erased relation (range)",
        _g(era, "range", "kn", "erased"), list(PAPER["erase"]["erased_ppl_change"]), "fraction_range", n_rel)
    add("erase", "other_ppl_change", "erase: perplexity change on other relations (range)",
        _g(era, "range", "kn", "other"), list(PAPER["erase"]["other_ppl_change"]), "fraction_range", n_rel)
    add("erase", "erased_ppl_change_random", "erase with random neurons: change on the erased relation (range)",
        _g(era, "range", "random", "erased"), None, "fraction_range", n_rel)
    return rows


def compute_summary(d: RunData) -> dict:
    issues: dict = {}
    s = {"run": _run_section(d)}
    for e in EXPERIMENTS.values():  # each experiment's section, by the function its registry entry names
        summarize = e.part("summarize")
        if summarize is not None:
            s[e.section or e.name] = summarize(d, issues)
    s["issues"] = _issues_section(d, issues)
    s["compare"] = _compare(s)
    return _clean(s)


def summary(run_dir) -> dict:
    """The key numbers of a run beside the paper's (plain JSON-able dict; see :mod:`kneurons.report`)."""
    return compute_summary(load_run(run_dir))


def format_value(v, unit: str = "num") -> str:
    """One number as text (ASCII; the HTML report swaps in typographic minus signs). ``unit``: fraction (signed %,
    scientific notation for huge changes of a broken model), fraction_range, share (%), count, int, ppl (a
    perplexity), perplexity (a signed change of one), activation, num. ``None`` → ``n/a``."""
    if v is None:
        return "n/a"
    if unit == "fraction_range":
        return f"{format_value(v[0], 'fraction')} .. {format_value(v[1], 'fraction')}"
    v = float(v) + 0.0  # no "-0"

    def fixed(x: float, digits: int) -> float:  # no "-0.00" either
        return 0.0 if abs(x) < 0.5 * 10 ** -digits else x

    if unit == "fraction":
        return f"{v * 100:+.3g}%" if abs(v) >= 1e4 else f"{fixed(v * 100, 2):+.2f}%"
    if unit == "share":
        return f"{fixed(v * 100, 1):.1f}%"
    if unit == "count":
        return f"{fixed(v, 2):.2f}"
    if unit == "int":
        return f"{fixed(v, 0):.0f}"
    if unit == "ppl":
        return f"{v:.3g}" if round(abs(v), 2) >= 1000 else f"{fixed(v, 2):.2f}"
    if unit == "perplexity":
        return f"{v:+.3g}"
    return f"{v:.4g}"


def format_summary(s: dict) -> str:
    """A plain-text table of ``s["compare"]`` (ours beside the paper's) with a header line, for the CLI."""
    run = s["run"]
    head = (f"{run['model']} (paper: {run['paper_model']}); {s['facts']['known']} of {s['facts']['assessed']} "
            f"facts known, {s['facts']['used']} used; run {'complete' if run['complete'] else 'INCOMPLETE'}"
            + (f"; skipped data: {'; '.join(run['skipped_data'])}" if run.get("skipped_data") else ""))
    rows = [("quantity", "ours", "n", "paper")]
    for r in s["compare"]:
        rows.append((r["quantity"], format_value(r["ours"], r["unit"]), "" if r["n"] is None else str(r["n"]),
                     "—" if r["paper"] is None else format_value(r["paper"], r["unit"])))
    w = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [head] + ["  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r)) for r in rows]
    return "\n".join(lines)
