"""``write_report``: a self-contained ``report.html`` (figures embedded as base64 PNG, inline CSS, no script, no
external resource) plus every figure as a PNG file and ``summary.json``, written atomically into a directory."""

from __future__ import annotations

import base64
import html
import json
import time
from pathlib import Path

from .._io import atomic_dir, owned_output
from ..experiments.registry import EXPERIMENTS
from ..experiments.store import check_output_target
from .figures import Figure, make_figures
from .numbers import BAGS, METHOD_NAMES, METHODS, OPS, compute_summary, format_value, load_run

REPORT = "report.html"
SUMMARY = "summary.json"
NA = '<span class="na">—</span>'

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:#222;margin:0;
 background:#fafafa;line-height:1.45}
main{max-width:1180px;margin:0 auto;padding:16px 28px 48px;background:#fff}
h1{font-size:1.6em;margin:.4em 0 .2em} h2{font-size:1.25em;margin-top:1.8em;border-bottom:2px solid #1f5fa8;
 padding-bottom:3px} h3{font-size:1.05em;margin:1.2em 0 .4em}
table{border-collapse:collapse;margin:.5em 0 1em;font-size:.88em}
th,td{border:1px solid #d5d5d5;padding:3px 8px;text-align:right;vertical-align:top}
th{background:#eef2f7;font-weight:600} td.l,th.l{text-align:left} td.l{white-space:nowrap}
td.paper,th.paper{background:#fff6e5} tr.total td{font-weight:600;background:#f6f6f6}
.na{color:#999} .note{color:#555;font-size:.9em} .warn{background:#fff1f0;border:1px solid #e0a0a0;padding:8px 12px;
 border-radius:4px} .empty{background:#f4f4f4;border-left:4px solid #999;padding:8px 12px;color:#444}
figure{margin:1em 0 1.6em} figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:.86em;color:#444;max-width:60em} code{font-size:.92em}
.kv td{text-align:left;white-space:normal} .kv td.k{color:#555}
"""


# ------------------------------------------------------------------------------------------------ formatting
def esc(x) -> str:
    return html.escape("" if x is None else str(x))


def fmt(v, kind: str = "num") -> str:
    """:func:`~kneurons.report.numbers.format_value` with typographic minus signs; ``kind`` as there (``dppl`` and
    ``act`` are its ``perplexity`` and ``activation``)."""
    if v is None:
        return NA
    if kind == "fraction_range":
        return f"{fmt(v[0], 'fraction')} .. {fmt(v[1], 'fraction')}"
    return format_value(v, {"dppl": "perplexity", "act": "activation"}.get(kind, kind)).replace("-", "−")


def arrow(a, b, kind: str) -> str:
    return f"{fmt(a, kind)} → {fmt(b, kind)}"


def table(header: list[str] | None, rows: list[list[str]], left: int = 1, paper_cols=(), classes: str = "",
          row_classes=None) -> str:
    """An HTML table (no header row when ``header`` is empty); cells are HTML already; the first ``left`` columns
    are left-aligned."""
    def cls(i):
        c = []
        if i < left:
            c.append("l")
        if i in paper_cols:
            c.append("paper")
        return f' class="{" ".join(c)}"' if c else ""

    out = [f'<table class="{classes}">' if classes else "<table>"]
    if header:
        out += ["<tr>"] + [f"<th{cls(i)}>{h}</th>" for i, h in enumerate(header)] + ["</tr>"]
    for j, r in enumerate(rows):
        rc = row_classes[j] if row_classes else ""
        out.append(f'<tr class="{rc}">' if rc else "<tr>")
        out += [f"<td{cls(i)}>{c}</td>" for i, c in enumerate(r)]
        out.append("</tr>")
    out.append("</table>")
    return "".join(out)


def empty(msg: str) -> str:
    return f'<p class="empty">{msg}</p>'


def figure_html(fig: Figure) -> str:
    data = base64.b64encode(fig.png).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{esc(fig.title)}">'
            f"<figcaption><b>{esc(fig.title)}.</b> {esc(fig.caption)} <span class=\"note\">(also "
            f"<code>{esc(fig.name)}</code>)</span></figcaption></figure>")


def _mname(m: str) -> str:
    return esc(METHOD_NAMES.get(m, m))


# ------------------------------------------------------------------------------------------------ sections
def _header(s: dict) -> str:
    run = s["run"]
    info = run["model_info"] or {}
    parts = ["<h1>Knowledge neurons — run report</h1>",
             f"<p>Our model: <b>{esc(run['model'])}</b>"]
    if info:
        parts.append(f" ({esc(info.get('model_type'))}, {esc(info.get('kind'))}, {esc(info.get('n_layers'))} "
                     f"layers × {esc(info.get('d_ff'))} FFN neurons, {esc(info.get('dtype'))}, on "
                     f"{esc(run['device'])})")
    parts.append(f". The paper (Dai et al., ACL 2022): <b>{esc(run['paper_model'])}</b> on PARAREL. Data: "
                 f"<code>{esc(run['data'])}</code>. Paper numbers are shown beside ours throughout "
                 '(<span style="background:#fff6e5">shaded</span>).</p>')
    if not run["complete"]:
        parts.append('<p class="warn"><b>Incomplete run.</b> The run has not finished (interrupted, or still '
                     "running): every number below covers only the units stored so far.</p>")
    if run["weights_restored"] is False:
        parts.append('<p class="warn">The run did not confirm that the model weights were restored after the '
                     "edits.</p>")
    if run.get("skipped_data"):
        parts.append('<div class="warn"><b>The run skipped data.</b> Every number below leaves it out:<ul>'
                     + "".join(f"<li>{esc(m)}</li>" for m in run["skipped_data"]) + "</ul></div>")
    return "".join(parts)


def _glance(s: dict) -> str:
    rows = []
    for r in s["compare"]:
        rows.append([esc(r["quantity"]), fmt(r["ours"], r["unit"]), "" if r["n"] is None else esc(r["n"]),
                     fmt(r["paper"], r["unit"])])
    return ("<h2>At a glance: ours beside the paper's</h2>"
            + table(["quantity", f"ours ({esc(s['run']['model'])})", "n", f"paper ({esc(s['run']['paper_model'])})"],
                    rows, paper_cols=(3,))
            + '<p class="note">n: facts (relations for erase) behind our number. — : no data in this run, or no '
              "published number.</p>")


def _details(s: dict) -> str:
    run = s["run"]
    secs = run["last_run_seconds"]
    created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(run["created"])) if run["created"] else None
    kv = [("run directory", f"<code>{esc(run['dir'])}</code>"),
          ("model (as given)", f"<code>{esc(run['model_path'])}</code>"),
          ("model source", esc((run["model_info"] or {}).get("source"))), ("device", esc(run["device"])),
          ("data", f"<code>{esc(run['data'])}</code>"),
          ("kneurons version", f"run: {esc(run['run_version'])}, report: {esc(run['report_version'])}"),
          ("complete", "yes" if run["complete"] else "<b>no</b>"),
          ("weights restored after the edits", {True: "yes", False: "<b>no</b>"}.get(run["weights_restored"], NA)),
          ("last run took", NA if secs is None else f"{secs:.0f} s"), ("created", esc(created) if created else NA),
          ("experiments configured", esc(", ".join(run["experiments_configured"]))),
          ("units stored", esc(", ".join(f"{k}: {v}" for k, v in sorted(run["units_stored"].items())) or "none"))]
    cfg = sorted(run["config"].items())
    half = (len(cfg) + 1) // 2
    crow = []
    for i in range(half):
        a = cfg[i]
        b = cfg[i + half] if i + half < len(cfg) else ("", "")
        crow.append([esc(a[0]), f"<code>{esc(json.dumps(a[1]))}</code>", esc(b[0]),
                     f"<code>{esc(json.dumps(b[1]))}</code>" if b[0] else ""])
    return ("<h2>1. Run</h2>" + table([], [[k, v] for k, v in kv], left=2, classes="kv")
            + "<h3>Settings (the run's configuration)</h3>" + table(["setting", "value", "setting", "value"], crow,
                                                                      left=4, classes="kv"))


def facts_html(s: dict, figs: dict | None = None) -> str:
    f = s["facts"]
    rows, rc = [], []
    for rid, p in f["per_relation"].items():
        rows.append([esc(rid), str(p["assessed"]), str(p["known"]), str(p["used"]), str(p["errors"]),
                     esc(p["skipped"]) if p["skipped"] else ""])
        rc.append("")
    rows.append(["all", str(f["assessed"]), str(f["known"]), str(f["used"]), str(f["errors"]), ""])
    rc.append("total")
    body = table(["relation", "facts assessed", "known", "used (went on)", "could not be asked", "relation skipped"],
                 rows, row_classes=rc, left=1)
    if not f["per_relation"]:
        body = empty("No fact was assessed in this run.")
    return ("<h3>Facts (knowledge assessing)</h3>" + body
            + '<p class="note">A fact is known when the answer is right on more than the configured share of its '
              "prompts; at most <code>facts_per_relation</code> known facts of a relation go on to the other "
              "experiments (\"used\").</p>")


def _issues(s: dict) -> str:
    rows, msgs = [], []
    for e, v in s["issues"].items():
        rows.append([esc(e), str(v["units"]), str(v["rows"]), str(v["errors"]), str(v["skipped"])])
        for m in v["messages"][:10]:
            msgs.append(f"<li><b>{esc(e)}</b>, {esc(m['kind'])} ×{m['count']}: {esc(m['message'][:300])}</li>")
        if len(v["messages"]) > 10:
            msgs.append(f"<li><b>{esc(e)}</b>: {len(v['messages']) - 10} more distinct messages</li>")
    out = ("<h3>Units stored, errors and skipped rows</h3>"
           + table(["experiment", "units stored", "rows", "error rows", "skipped rows"], rows)
           + '<p class="note">Error and skipped rows are left out of every mean below.</p>')
    if msgs:
        out += "<ul class=\"note\">" + "".join(msgs) + "</ul>"
    return out


def locate_html(s: dict, figs: dict) -> str:
    loc = s["locate"]
    out = ["<h2>2. Locate: knowledge neurons per fact</h2>"]
    if not loc["methods"]:
        return "".join(out) + empty("No locate results in this run.")
    p = loc["paper"]
    rows = []
    for m in ("kn", "activation"):
        st = loc["methods"].get(m)
        if not st:
            continue
        rows.append([_mname(m), str(st["facts"]), fmt(st["neurons_per_fact"], "count"),
                     fmt(p["neurons_per_fact" if m == "kn" else "neurons_per_fact_activation"], "count"),
                     str(st["facts_without_neurons"]), fmt(st["shared_same_relation"], "count"),
                     fmt(st["shared_other_relation"], "count"), fmt(st["seconds_per_fact"], "count")])
    out.append(table(["method", "facts", "neurons per fact", "paper", "facts without neurons",
                      "shared per pair, same relation", "shared per pair, other relations", "seconds per fact"],
                     rows, paper_cols=(3,)))
    kn = loc["methods"].get("kn", {})
    out.append('<p class="note">Neurons per fact: mean over all located facts, facts without neurons counted as 0. '
               "Shared: mean number of neurons two facts have in common, over all pairs of facts of the same "
               "relation and of different relations; the paper finds same-relation pairs share more. Random neurons "
               "(the control below) are drawn per fact, as many as its knowledge neurons.</p>")
    if kn and kn["facts"] and kn["facts_without_neurons"] == kn["facts"]:
        out.append(empty(f"No knowledge neurons were found for any of the {kn['facts']} located facts, so the "
                         "knowledge-neuron rows of the experiments below are empty."))
    per = loc["per_relation"]
    if per:
        rows = []
        for rid, v in per.items():
            k, a = v.get("kn", {}), v.get("activation", {})
            rows.append([esc(rid), str(k.get("facts", a.get("facts", 0))), fmt(k.get("neurons_per_fact"), "count"),
                         "" if not k else str(k["facts_without_neurons"]), fmt(a.get("neurons_per_fact"), "count"),
                         "" if not a else str(a["facts_without_neurons"])])
        out.append("<h3>Per relation</h3>" + table(
            ["relation", "facts", "knowledge neurons per fact", "facts without", "activation-baseline per fact",
             "facts without"], rows))
    if "locate" in figs:
        out.append(figure_html(figs["locate"]))
    else:
        out.append(empty("No neuron was located by any method: there is no layer distribution to draw."))
    return "".join(out)


def suppress_html(s: dict, figs: dict) -> str:
    sup = s["suppress"]
    out = ["<h2>3. Suppress and amplify</h2>",
           '<p class="note">Each fact\'s neurons are multiplied by 0 (suppress) or 2 (amplify) at the blank; Δp/p is '
           "the relative change of the correct answer's probability, averaged over the prompts of the fact (or of "
           "control facts), then over the facts of each relation, then over all facts. A method is run only for the "
           "facts where its neuron set is not empty (random neurons: as many as the fact's knowledge neurons), so "
           "the methods may cover different facts (n).</p>"]
    ops = sup["ops"]
    if not ops:
        return "".join(out) + empty("No suppress/amplify results: no located fact had a non-empty neuron set "
                                    "(or the experiment was not run).")
    rows = []
    for op in [o for o in OPS if o in ops] + [o for o in ops if o not in OPS]:
        for m in [x for x in METHODS if x in ops[op]] + [x for x in ops[op] if x not in METHODS]:
            c = ops[op][m]
            f = c.get("fact", {})
            paper = sup["paper"].get(op, {}).get(m)
            rows.append([esc(op), _mname(m), str(f.get("n_facts", 0)), fmt(c.get("fact", {}).get("neurons_per_fact"),
                                                                            "count"),
                         arrow(f.get("before"), f.get("after"), "share"), fmt(f.get("all_facts"), "fraction"),
                         fmt(f.get("mean_of_relations"), "fraction"), fmt(paper, "fraction"),
                         fmt(c.get("same_relation", {}).get("all_facts"), "fraction"),
                         fmt(c.get("other_relation", {}).get("all_facts"), "fraction"),
                         fmt(c.get("relation_specificity"), "count"),
                         fmt(c.get("relation_specificity_median"), "count"),
                         f"{c['facts_beyond_relation']}/{c['facts_paired']}" if "facts_paired" in c else NA])
    out.append(table(["op", "method", "facts", "neurons per fact", "p(answer) before → after",
                      "Δp/p fact (all facts)", "Δp/p fact (mean of relations)", "paper",
                      "Δp/p same relation", "Δp/p other relations", "fact ÷ same relation",
                      "per fact: median ratio", "per fact: |fact| > |same|"], rows, left=2,
                     paper_cols=(7,)))
    out.append('<p class="note">fact ÷ same relation (relation specificity): |Δp/p of the fact| ÷ |Δp/p of other '
               "facts of the same relation| (of the means over all facts); about 1 for neurons of the relation, large for "
               "neurons of the fact. Per fact: the same ratio for each fact and its own same-relation controls — "
               "the median, and the facts whose own change is larger than their controls' (of the facts with both). "
               "Fact-specific neurons are a fact's knowledge neurons minus its relation's (found for more than "
               "relation_q of the relation's facts).</p>")
    missing = [m for m in ("kn", "random") if not any(m in ops[o] for o in ops)]
    if missing:
        out.append(empty(f"No rows for {', '.join(METHOD_NAMES[m] for m in missing)}: no fact had knowledge neurons "
                         "to act on."))
    # per relation, fact group
    rels = list(dict.fromkeys(r for o in ops for m in ops[o]
                              for r in ops[o][m].get("fact", {}).get("per_relation", {})))
    cols = [(o, m) for o in OPS if o in ops for m in METHODS if m in ops[o]]
    if rels and cols:
        rows = []
        for rid in rels:
            row = [esc(rid)]
            for o, m in cols:
                pr = ops[o][m].get("fact", {}).get("per_relation", {}).get(rid)
                row.append(NA if not pr else f"{fmt(pr['mean'], 'fraction')} <span class=\"note\">(n={pr['n_facts']})"
                                             "</span>")
            rows.append(row)
        out.append("<h3>Per relation: Δp/p of the fact</h3>"
                   + table(["relation"] + [f"{o}, {_mname(m)}" for o, m in cols], rows))
    for key in ("suppress", "suppress_controls"):
        if key in figs:
            out.append(figure_html(figs[key]))
    return "".join(out)


def activations_html(s: dict, figs: dict) -> str:
    act = s["activations"]
    out = ["<h2>4. Activations on web sentences (BingRel)</h2>",
           '<p class="note">For each fact with knowledge neurons, the mean activation of those neurons on up to '
           "<code>bingrel_sentences</code> sentences per bag. A neuron's activation on a sentence is the mean over "
           "its token positions (padding and special tokens excluded) — the paper's exact position rule is not "
           "published — then averaged over the fact's neurons and sentences, then over facts. Activation scales "
           "differ between architectures (activation function, gating, layer norm), so compare the ordering "
           "head-tail &gt; head-only ≈ random rather than the values.</p>"]
    if act["skipped"]:
        out.append(empty(f"The experiment was skipped: {esc(act['skipped'])}."))
    if act["missing_relations"]:
        out.append(f'<p class="note">Relations without BingRel sentences: {esc(", ".join(act["missing_relations"]))}.'
                   "</p>")
    if act.get("bad_files"):
        out.append('<p class="warn">Relations skipped because their BingRel file could not be read: '
                   + "; ".join(f"<b>{esc(r)}</b> ({esc(why)})" for r, why in act["bad_files"].items()) + ".</p>")
    if not act["bags"]:
        if not act["skipped"]:
            out.append(empty(f"No activation was measured: none of the {act['facts']} facts had knowledge neurons "
                             "(or sentences)." if act["facts"] else "No activation results in this run."))
        return "".join(out)
    rows = [[esc(b.replace("_", "-")), fmt(act["bags"].get(b, {}).get("all_facts"), "act"),
             fmt(act["bags"].get(b, {}).get("max_all_facts"), "act"),
             str(act["bags"].get(b, {}).get("n_facts", 0)),
             fmt(act["bags"].get(b, {}).get("sentences_per_fact"), "count"), fmt(act["paper"].get(b), "act")]
            for b in BAGS]
    out.append(table(["sentences", "mean activation (ours)", "max over positions (ours)", "facts",
                      "sentences per fact", "paper"], rows, paper_cols=(5,)))
    out.append(f'<p class="note">{act["facts_with_neurons"]} of {act["facts"]} facts had knowledge neurons and '
               "sentences.</p>")
    if "activations" in figs:
        out.append(figure_html(figs["activations"]))
    return "".join(out)


def _skip_reasons(s: dict, experiment: str) -> str:
    reasons = [m["message"] for m in s["issues"][experiment]["messages"] if m["kind"] == "skipped"]
    text = "; ".join(reasons) or "no reason recorded"
    if experiment == "update" and s["run"]["config"].get("update_drop_shared") is not None and reasons:
        text += ", after dropping the neurons shared within the relation"
    return esc(text)


def update_html(s: dict, figs: dict) -> str:
    upd = s["update"]
    cfg = s["run"]["config"]
    drop = cfg.get("update_drop_shared")
    dropped = ""
    if drop is not None:
        share = f"{float(drop) * 100:g}%" if isinstance(drop, (int, float)) else esc(drop)
        dropped = f" (neurons shared by more than {share} of the relation's facts dropped)"
    out = ["<h2>5. Update a fact</h2>",
           '<p class="note">⟨h, r, t⟩ → ⟨h, r, t′⟩ with t′ another answer of the relation, by editing the value slots '
           f"of the fact's knowledge neurons{dropped} with λ1 = {esc(cfg.get('update_lambda1'))}, "
           f"λ2 = {esc(cfg.get('update_lambda2'))}, and, as a control, of as many random neurons. Success@k: share of "
           "the fact's "
           "prompts whose top-k prediction is t′ (mean over facts). Perplexity of other known facts of the same "
           "relation (intra) and of other relations (inter); Δ is after − before per fact, relative Δ is "
           "(after − before)/before, both averaged over facts. Every edit is reverted.</p>"]
    if not upd["methods"]:
        if upd["facts"]:
            return "".join(out) + empty(f"No fact was updated: {upd['facts_without_neurons']} of {upd['facts']} facts "
                                        f"were skipped ({_skip_reasons(s, 'update')}), {upd['facts_with_errors']} "
                                        "had errors.")
        return "".join(out) + empty("No update results in this run.")
    rows = []
    for m, c in upd["methods"].items():
        rows.append([_mname(m), str(c["n_facts"]), fmt(c.get("neurons_per_fact"), "count"),
                     arrow(c.get("success1_before"), c.get("success1_after"), "share"),
                     fmt(upd["paper"].get(f"success1_{m}"), "share"),
                     arrow(c.get("success5_before"), c.get("success5_after"), "share"),
                     arrow(c.get("p_old_before"), c.get("p_old_after"), "share"),
                     arrow(c.get("p_new_before"), c.get("p_new_after"), "share")])
    out.append(table(["method", "facts", "neurons per fact", "success@1 before → after", "paper success@1",
                      "success@5 before → after", "p(t) before → after", "p(t′) before → after"], rows,
                     paper_cols=(4,)))
    rows = []
    for m, c in upd["methods"].items():
        rows.append([_mname(m), arrow(c.get("ppl_intra_before"), c.get("ppl_intra_after"), "ppl"),
                     fmt(c.get("delta_ppl_intra"), "dppl"), fmt(c.get("rel_delta_ppl_intra"), "fraction"),
                     arrow(c.get("ppl_inter_before"), c.get("ppl_inter_after"), "ppl"),
                     fmt(c.get("delta_ppl_inter"), "dppl"), fmt(c.get("rel_delta_ppl_inter"), "fraction"),
                     fmt(upd["paper"].get(f"delta_ppl_inter_{m}"), "dppl")])
    out.append(table(["method", "intra-relation ppl", "Δ", "relative Δ", "inter-relation ppl", "Δ", "relative Δ",
                      "paper Δ inter"], rows, paper_cols=(7,)))
    out.append(f'<p class="note">{upd["facts_edited"]} of {upd["facts"]} facts were edited; '
               f"{upd['facts_without_neurons']} were skipped ({_skip_reasons(s, 'update')}), "
               f"{upd['facts_with_errors']} had errors. Perplexities are of the whole answer under our model; the paper's absolute Δ is on "
               f"{esc(s['run']['paper_model'])}.</p>")
    if "update" in figs:
        out.append(figure_html(figs["update"]))
    return "".join(out)


def erase_html(s: dict, figs: dict) -> str:
    er = s["erase"]
    cfg = s["run"]["config"]
    if cfg.get("erase_top_k") is not None:
        which = f"the {esc(cfg['erase_top_k'])} knowledge neurons shared by most of the relation's facts"
    elif cfg.get("erase_min_facts") is not None:
        which = f"the knowledge neurons shared by at least {esc(cfg['erase_min_facts'])} of the relation's facts"
    else:
        which = "the relation's most shared knowledge neurons"
    out = ["<h2>6. Erase a relation</h2>",
           f'<p class="note">The value slots of {which} are set to the [UNK] output embedding (zero where the '
           f"tokenizer has none) or to zero (mode <code>{esc(cfg.get('erase_mode'))}</code>); as many "
           "random neurons are the control. Perplexity change = after/before − 1 on the erased relation's prompts "
           "and on other relations' prompts; accuracy uses the run's \"right\" rule. Paper relations: "
           f"{esc(', '.join(er['paper']['relations']))}.</p>"]
    if er["not_in_run"]:
        out.append(f'<p class="note">Asked for but not in the run: {esc(", ".join(er["not_in_run"]))}.</p>')
    for title, d in (("skipped", er["skipped"]), ("failed", er["errors"])):
        if d:
            out.append(empty(f"Relations {title}: " + "; ".join(f"{esc(k)} ({esc(v)})" for k, v in d.items()) + "."))
    rels = {r: v for r, v in er["relations"].items() if v}
    if not rels:
        return "".join(out) + ("" if er["skipped"] or er["errors"] else empty("No erase results in this run."))
    rows = []
    for rid, v in rels.items():
        for m, groups in v.items():
            e, o = groups.get("erased", {}), groups.get("other", {})
            rows.append([esc(rid), _mname(m), fmt(e.get("n_neurons") or o.get("n_neurons"), "int"),
                         esc(e.get("mode") or o.get("mode")),
                         arrow(e.get("ppl_before"), e.get("ppl_after"), "ppl"), fmt(e.get("ppl_change"), "fraction"),
                         arrow(e.get("acc_before"), e.get("acc_after"), "share"),
                         arrow(o.get("ppl_before"), o.get("ppl_after"), "ppl"), fmt(o.get("ppl_change"), "fraction"),
                         arrow(o.get("acc_before"), o.get("acc_after"), "share")])
    out.append(table(["relation", "method", "neurons", "mode", "erased: perplexity", "change", "erased: accuracy",
                      "other: perplexity", "change", "other: accuracy"], rows, left=2))
    rng = er["range"]
    rows = [[_mname(m), fmt(rng.get(m, {}).get("erased"), "fraction_range"),
             fmt(er["paper"]["erased_ppl_change"] if m == "kn" else None, "fraction_range"),
             fmt(rng.get(m, {}).get("other"), "fraction_range"),
             fmt(er["paper"]["other_ppl_change"] if m == "kn" else None, "fraction_range")] for m in ("kn", "random")]
    out.append("<h3>Range over relations</h3>" + table(
        ["method", "erased relation (ours)", "paper", "other relations (ours)", "paper"], rows, paper_cols=(2, 4)))
    if "erase" in figs:
        out.append(figure_html(figs["erase"]))
    return "".join(out)


def render_html(s: dict, figs: dict) -> str:
    sections = [e.part("render")(s, figs) for e in EXPERIMENTS.values() if e.render is not None]
    body = "".join([_header(s), _glance(s), _details(s), sections[0] if sections else "", _issues(s),
                    *sections[1:]])
    foot = (f'<hr><p class="note">Generated by kneurons {esc(s["run"]["report_version"])} from '
            f"<code>{esc(s['run']['dir'])}</code>. Paper: Dai, Dong, Hao, Sui, Chang, Wei — Knowledge Neurons in "
            "Pretrained Transformers, ACL 2022.</p>")
    title = f"kneurons report — {esc(s['run']['model'])}"
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head>'
            f"<body><main>{body}{foot}</main></body></html>\n")


# ------------------------------------------------------------------------------------------------ writing
def _is_report_file(name: str) -> bool:
    """Files a report wrote before reports recorded a manifest."""
    return name in (REPORT, SUMMARY) or (name.startswith("fig") and name.endswith(".png"))


def write_report(run_dir, out_dir=None) -> Path:
    """Write ``report.html`` (self-contained), one PNG per figure and ``summary.json`` into ``out_dir``
    (default ``RUN_DIR/report``); returns the path of ``report.html``.

    The files are written into a temporary directory beside ``out_dir`` and swapped into place in one step
    (:func:`kneurons._io.atomic_dir`), so a failure leaves no half-written report and an earlier report there
    stays whole until the new one replaces it. The target follows the rule exports follow
    (:func:`~kneurons.experiments.store.check_output_target`): an existing ``out_dir`` is replaced only when it is
    empty or holds a report, never a run directory or anything inside one but ``RUN_DIR/report``; a missing,
    foreign or corrupt run raises :class:`~kneurons.KneuronsError`."""
    data = load_run(run_dir)
    out = Path(out_dir) if out_dir is not None else data.dir / "report"
    check_output_target(data.dir, out, "report", True, _is_report_file)
    s = compute_summary(data)
    figs = make_figures(s)
    page = render_html(s, figs)

    def build(tmp: Path) -> None:
        for fig in figs.values():
            (tmp / fig.name).write_bytes(fig.png)
        (tmp / SUMMARY).write_text(json.dumps(s, indent=1, allow_nan=False) + "\n", encoding="utf-8")
        (tmp / REPORT).write_text(page, encoding="utf-8")

    atomic_dir(out, build, replace=lambda d: owned_output(d, "report", _is_report_file), manifest="report")
    return out / REPORT
