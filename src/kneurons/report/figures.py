"""The report's figures, drawn from a summary (:func:`kneurons.report.summary`) with matplotlib's Agg canvas.

Figures are built as :class:`matplotlib.figure.Figure` objects without pyplot, so nothing global (backend,
open windows) changes in the caller's process. A figure whose section has no data is not drawn (``None``).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from ..errors import KneuronsError
from .numbers import BAGS, ERASE_GROUPS, GROUPS, METHOD_NAMES, METHODS, OPS

COLORS = {"kn": "#1f5fa8", "fact_specific": "#2a9d5c", "activation": "#e07b12", "random": "#8c8c8c"}
LABELS = METHOD_NAMES
GROUP_LABELS = {"fact": "the fact", "same_relation": "same relation", "other_relation": "other relations"}
DPI = 110


@dataclass
class Figure:
    name: str      # file name, e.g. "fig1-locate-layers.png"
    title: str
    caption: str
    png: bytes


def _mpl():
    try:
        from matplotlib.figure import Figure as MplFigure
    except ImportError:
        raise KneuronsError("the report needs matplotlib: pip install 'matplotlib>=3.7'") from None
    return MplFigure


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    return buf.getvalue()


def _v(x) -> float:
    return float("nan") if x is None else float(x)


def _style(ax, ylabel: str, zero: bool = True) -> None:
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    if zero:
        ax.axhline(0, color="black", lw=0.8)
    ax.margins(y=0.12)  # room for the bar labels


def _xticks(ax, labels) -> None:
    ax.set_xticks(range(len(labels)))
    long = len(labels) > 8 or sum(len(x) for x in labels) > 8 * len(labels) + 12
    ax.set_xticklabels(labels, rotation=35 if long else 0, ha="right" if long else "center")


def _bars(ax, groups: list, series: list[tuple[str, list, str]], fmt=None, width: float = 0.8,
          inside: bool = False) -> None:
    """Grouped bars: ``series`` = ``[(label, values per group, color)]``; values may be NaN (no bar)."""
    k = max(len(series), 1)
    w = width / k
    for j, (label, vals, color) in enumerate(series):
        xs = [i - width / 2 + w * (j + 0.5) for i in range(len(groups))]
        bars = ax.bar(xs, [_v(v) for v in vals], w, label=label, color=color)
        if fmt is not None and len(groups) * k <= 24:
            ax.bar_label(bars, labels=["" if v is None else fmt(v) for v in vals], fontsize=7,
                         padding=0 if inside else 2, label_type="center" if inside else "edge",
                         color="white" if inside else "black")


def _pct(v) -> str:
    return f"{v * 100:+.1f}%"


# ------------------------------------------------------------------------------------------------ figures
def locate_layers(s: dict):
    loc = s["locate"]
    methods = [m for m in ("kn", "activation") if m in loc["methods"]
               and any(loc["methods"][m]["layer_fraction"])]
    if not methods:
        return None
    n = loc["n_layers"]
    fig = _mpl()(figsize=(max(6.0, min(14.0, 0.35 * n + 4)), 3.6))
    ax = fig.add_subplot()
    _bars(ax, list(range(n)), [(f"{LABELS[m]} ({loc['methods'][m]['neurons_per_fact']:.2f} per fact)",
                                loc["methods"][m]["layer_fraction"], COLORS[m]) for m in methods])
    ax.set_xticks(range(n))
    ax.set_xticklabels([str(i) for i in range(n)], fontsize=8 if n > 24 else 10)
    ax.set_xlabel("layer (0 = closest to the input)")
    _style(ax, "fraction of the method's neurons", zero=False)
    ax.legend(frameon=False, fontsize=9)
    ax.set_title("Where the neurons are: fraction of all located neurons per layer", fontsize=11)
    return Figure("fig1-locate-layers.png", "Layer distribution of the located neurons",
                  "Fraction of all neurons a method located (over all facts) that sit in each layer. The paper "
                  f"({s['run']['paper_model']}) finds knowledge neurons mostly in the top layers.", _png(fig))


def suppress_relations(s: dict):
    ops = s["suppress"]["ops"]
    present = [op for op in OPS if any("fact" in ops.get(op, {}).get(m, {}) for m in METHODS)]
    if not present:
        return None
    rels = list(dict.fromkeys(r for op in present for m in ops[op] for r in
                              ops[op][m].get("fact", {}).get("per_relation", {})))
    groups = rels + ["all facts"]
    fig = _mpl()(figsize=(max(9.0, min(16.0, 0.7 * len(groups) + 5)), 3.4 * len(present) + 0.4))
    paper = s["suppress"]["paper"]
    for i, op in enumerate(present):
        ax = fig.add_subplot(len(present), 1, i + 1)
        series = []
        for m in METHODS:
            cell = ops[op].get(m, {}).get("fact")
            if not cell:
                continue
            vals = [cell["per_relation"].get(r, {}).get("mean") for r in rels] + [cell["all_facts"]]
            series.append((f"{LABELS[m]} (n={cell['n_facts']})", [None if v is None else 100 * v for v in vals],
                           COLORS[m]))
        _bars(ax, groups, series)
        for m, ls in (("kn", "--"), ("activation", ":")):
            if paper[op].get(m) is not None:
                ax.axhline(100 * paper[op][m], color=COLORS[m], ls=ls, lw=1.2,
                           label=f"paper, {LABELS[m]} ({100 * paper[op][m]:+.2f}%)")
        ax.axvline(len(rels) - 0.5, color="black", lw=0.6, alpha=0.5)
        _xticks(ax, groups)
        _style(ax, "mean Δp/p of the fact (%)")
        ax.set_title(f"{op.capitalize()} (activation × {0 if op == 'suppress' else 2}): change in the probability "
                     "of the correct answer", fontsize=11)
        ax.legend(frameon=False, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return Figure("fig2-suppress-amplify.png", "Suppress / amplify per relation",
                  "Mean relative change Δp/p of the correct answer's probability on the fact's own prompts, "
                  "averaged over the facts of each relation; the last group is the mean over all facts. Dashed / "
                  "dotted lines: the paper's averages for knowledge neurons / the activation baseline.", _png(fig))


def suppress_controls(s: dict):
    ops = s["suppress"]["ops"]
    present = [op for op in OPS if ops.get(op)]
    if not present:
        return None
    fig = _mpl()(figsize=(11.0, 3.6))
    for i, op in enumerate(present):
        ax = fig.add_subplot(1, len(present), i + 1)
        series = []
        for m in METHODS:
            if m in ops[op]:
                vals = [ops[op][m].get(g, {}).get("all_facts") for g in GROUPS]
                series.append((LABELS[m], [None if v is None else 100 * v for v in vals], COLORS[m]))
        _bars(ax, [GROUP_LABELS[g] for g in GROUPS], series, fmt=lambda v: f"{v:+.1f}")
        _xticks(ax, [GROUP_LABELS[g] for g in GROUPS])
        _style(ax, "mean Δp/p (%)")
        ax.set_title(f"{op}: which prompts change", fontsize=11)
    handles, labels = fig.axes[0].get_legend_handles_labels()
    fig.tight_layout()
    fig.legend(handles, labels, frameon=False, fontsize=9, loc="upper center", bbox_to_anchor=(0.5, 0.0),
               ncol=len(labels))
    return Figure("fig3-suppress-controls.png", "Specificity: the fact vs control facts",
                  "Mean Δp/p over all facts, on the fact's own prompts and on control prompts of other known facts "
                  "of the same relation and of other relations. Specific neurons move the fact and leave the "
                  "controls (especially other relations) near zero.", _png(fig))


def activations(s: dict):
    act = s["activations"]
    bags = [b for b in BAGS if b in act["bags"]]
    if not bags:
        return None
    fig = _mpl()(figsize=(9.0, 3.4))
    names = [b.replace("_", "-") for b in BAGS]
    ax = fig.add_subplot(1, 2, 1)
    vals = [act["bags"].get(b, {}).get("all_facts") for b in BAGS]
    _bars(ax, names, [(f"ours (n={act['facts_with_neurons']} facts)", vals, COLORS["kn"])],
          fmt=lambda v: f"{v:.3g}")
    _xticks(ax, names)
    _style(ax, "mean activation")
    ax.set_title(f"ours: {s['run']['model']}", fontsize=10)
    ax2 = fig.add_subplot(1, 2, 2)
    pvals = [act["paper"][b] for b in BAGS]
    _bars(ax2, names, [("paper", pvals, "#555555")], fmt=lambda v: f"{v:.3g}")
    _xticks(ax2, names)
    _style(ax2, "mean activation")
    ax2.set_title(f"paper: {s['run']['paper_model']}", fontsize=10)
    fig.tight_layout()
    return Figure("fig4-activations.png", "Activation of knowledge neurons on web sentences",
                  "Mean activation of each fact's knowledge neurons (averaged over token positions and sentences, "
                  "then over facts) on sentences that mention the subject and the answer (head-tail), the subject "
                  "only (head-only), and other facts' sentences (random). Separate axes: activation scales differ "
                  "between architectures.", _png(fig))


def update(s: dict):
    upd = s["update"]
    methods = [m for m in ("kn", "random") if m in upd["methods"]]
    if not methods:
        return None
    fig = _mpl()(figsize=(11.0, 3.6))
    ax = fig.add_subplot(1, 2, 1)
    qs = ["success1", "success5"]
    names = ["success@1", "success@5"]
    _bars(ax, names, [(LABELS[m], [None if upd["methods"][m].get(f"{q}_after") is None
                                   else 100 * upd["methods"][m][f"{q}_after"] for q in qs], COLORS[m])
                      for m in methods], fmt=lambda v: f"{v:.1f}" if v >= 8 else "", inside=True)
    for j, m in enumerate(methods):
        p = upd["paper"].get(f"success1_{m}")
        if p is not None:
            x = -0.4 + 0.8 / len(methods) * (j + 0.5)
            ax.plot([x], [100 * p], marker="_", color="black", ms=22, mew=2.5, ls="none",
                    label="paper success@1" if j == 0 else None)
    _xticks(ax, names)
    _style(ax, "prompts answering the new object (%)")
    ax.set_title("Update: success after the edit", fontsize=11)
    ax.legend(frameon=False, fontsize=8)
    ax2 = fig.add_subplot(1, 2, 2)
    names2 = ["intra-relation", "inter-relation"]
    _bars(ax2, names2, [(LABELS[m], [upd["methods"][m].get("delta_ppl_intra"),
                                     upd["methods"][m].get("delta_ppl_inter")], COLORS[m]) for m in methods],
          fmt=lambda v: f"{v:+.3g}")
    for j, m in enumerate(methods):
        p = upd["paper"].get(f"delta_ppl_inter_{m}")
        if p is not None:
            x = 1 - 0.4 + 0.8 / len(methods) * (j + 0.5)
            ax2.plot([x], [p], marker="_", color="black", ms=22, mew=2.5, ls="none",
                     label=f"paper ({s['run']['paper_model']})" if j == 0 else None)
    _xticks(ax2, names2)
    _style(ax2, "Δ perplexity (after − before)")
    ax2.set_title("Update: side effects on other facts", fontsize=11)
    ax2.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return Figure("fig5-update.png", "Updating a fact",
                  "Left: share of the fact's prompts whose top-1 / top-5 prediction is the new object after the "
                  "edit (mean over facts). Right: absolute change of the perplexity of other known facts of the same "
                  "relation (intra) and of other relations (inter). Black dashes: the paper's numbers; the "
                  "perplexity scale depends on the model.", _png(fig))


def erase(s: dict):
    rels = {r: v for r, v in s["erase"]["relations"].items() if v}
    if not rels:
        return None
    names = list(rels)
    fig = _mpl()(figsize=(max(8.0, min(14.0, 1.6 * len(names) + 4)), 4.2))
    ax = fig.add_subplot()
    series = []
    shade = {("kn", "erased"): COLORS["kn"], ("kn", "other"): "#9cc0e8", ("random", "erased"): "#555555",
             ("random", "other"): "#c8c8c8"}
    for m in ("kn", "random"):
        for g in ERASE_GROUPS:
            if any(g in rels[r].get(m, {}) for r in names):
                vals = [rels[r].get(m, {}).get(g, {}).get("ppl_change") for r in names]
                series.append((f"{LABELS[m]}: {'erased relation' if g == 'erased' else 'other relations'}",
                               [None if v is None else 100 * v for v in vals], shade[(m, g)]))
    _bars(ax, names, series, fmt=lambda v: f"{v:+.0f}" if abs(v) >= 10 else f"{v:+.1f}")
    lo, hi = s["erase"]["paper"]["erased_ppl_change"]
    ax.axhspan(100 * lo, 100 * hi, color=COLORS["kn"], alpha=0.08, zorder=0,
               label=f"paper, erased relation ({100 * lo:+.1f}% .. {100 * hi:+.1f}%)")
    lo, hi = s["erase"]["paper"]["other_ppl_change"]
    ax.axhspan(100 * lo, 100 * hi, color="#e07b12", alpha=0.18, zorder=0,
               label=f"paper, other relations ({100 * lo:+.1f}% .. {100 * hi:+.1f}%)")
    _xticks(ax, names)
    _style(ax, "perplexity change (%)")
    ax.set_title("Erase a relation: relative perplexity change", fontsize=11)
    ax.legend(frameon=False, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3)
    fig.tight_layout()
    return Figure("fig6-erase.png", "Erasing relations",
                  "Relative change of the perplexity of the correct answers after emptying the value slots of the "
                  "relation's most shared knowledge neurons (and of as many random neurons), on the erased "
                  "relation's prompts and on other relations' prompts. Shaded bands: the paper's ranges over its "
                  "four relations.", _png(fig))


def make_figures(s: dict) -> dict:
    """``{key: Figure}`` for every figure the registered experiments name (:attr:`Experiment.figures`) that has
    data."""
    from ..experiments.registry import EXPERIMENTS

    out = {}
    for e in EXPERIMENTS.values():
        for key, ref in e.figures:
            fig = e.part(ref)(s)
            if fig is not None:
                out[key] = fig
    return out
