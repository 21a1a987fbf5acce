"""CounterFact edits on the embedded model: the paper's rule vs KN-constrained optimization vs controls.

    python benchmarks/editing.py [--cases 200] [--data ../shared/data] [--out runs/editing-smollm2]

The first ``--cases`` cases of ``counterfact-edit-1k.json``; per case, every method of
:data:`kneurons.experiments.editing.EDIT_METHODS` (module docstring there), each edit reverted before the next.
Prints, per method, ROME's efficacy / paraphrase / neighborhood scores (ES / PS / NS: P(new) > P(true) on the
edit prompt / on its rephrasing; P(true) > P(new) on the neighbour), top-1 reliability, generalization and
locality, the mean number of edited slots, and the time; then the paired comparison that answers the question
of the issue: knowledge neurons vs the same number of random neurons at equal budget (per case, optimize_kn
minus optimize_random, sign test).

Resumable: ``--out DIR`` keeps the located neurons (``located.json``) and the rows of the cases edited so far
(``rows.csv``), both rewritten atomically after every few cases; rerunning the same command continues, and
``--summary`` prints the tables of what is there.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

ROME = {"ROME (GPT-2 XL, published)": (100.0, 96.4, 75.4), "KN (GPT-2 XL, ROME's table)": (28.7, 28.0, 72.9)}


def sign_test(wins: int, losses: int) -> float:
    """Two-sided sign-test p-value (ties dropped)."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    return min(1.0, 2 * sum(math.comb(n, j) for j in range(k + 1)) / 2 ** n)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=200)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="runs/editing-smollm2", help="directory of the resumable results")
    ap.add_argument("--summary", action="store_true", help="print the tables of what --out holds, compute nothing")
    ap.add_argument("--kl", type=float, default=None, help="optimize: weight of the preservation term")
    ap.add_argument("--steps", type=int, default=None, help="optimize: at most this many steps")
    ap.add_argument("--preserve", type=int, default=4, help="optimize: preserved prompts per case")
    ap.add_argument("--methods", nargs="+", default=None, help="edit methods (default: all of EDIT_METHODS)")
    args = ap.parse_args(argv)

    import json

    import pandas as pd
    import torch

    import kneurons
    from kneurons._io import atomic_write
    from kneurons.data.editing import load_counterfact
    from kneurons.experiments.editing import EDIT_METHODS, evaluate_edits, locate_case
    from kneurons.interventions import OptimizeSettings, weights_digest
    from kneurons.neurons import KnowledgeNeurons, relation_neurons

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = OptimizeSettings(**{k: v for k, v in (("kl", args.kl), ("steps", args.steps)) if v is not None})
    methods = tuple(args.methods or EDIT_METHODS)
    setup = {"cases": args.cases, "model": args.model, "settings": str(settings), "preserve": args.preserve,
             "methods": list(methods)}
    if (out / "setup.json").exists() and json.loads((out / "setup.json").read_text()) != setup:
        raise SystemExit(f"{out} holds a run with other settings: {(out / 'setup.json').read_text()}")
    atomic_write(out / "setup.json", lambda tmp: tmp.write_text(json.dumps(setup)), overwrite=True)
    cases = load_counterfact(Path(args.data) / "editing" / "counterfact-edit-1k.json")[: args.cases]
    rows_path, located_path = out / "rows.csv", out / "located.json"
    df = pd.read_csv(rows_path) if rows_path.exists() else pd.DataFrame()
    seconds = float(df["elapsed"].max()) if "elapsed" in df and len(df) else 0.0
    if not args.summary:
        h = kneurons.load_model(args.model) if args.model else kneurons.load_model()
        digest = weights_digest(h.model)
        raw = json.loads(located_path.read_text()) if located_path.exists() else {}
        located = {}
        for c in cases:
            v = raw.get(str(c.case_id))
            if isinstance(v, dict):
                located[c.case_id] = KnowledgeNeurons(**{k: v[k] for k in ("neurons", "prompts", "target", "coarse",
                                                                            "base_probs", "params", "model",
                                                                            "method")})
                located[c.case_id].neurons = [tuple(n) for n in located[c.case_id].neurons]
            elif isinstance(v, str):
                located[c.case_id] = v
        t = time.perf_counter() - seconds
        todo = [c for c in cases if c.case_id not in located]
        for k, c in enumerate(todo, 1):  # phase 1: every case's knowledge neurons (the common ones need all)
            try:
                located[c.case_id] = locate_case(h, c)
            except kneurons.KneuronsError as exc:
                located[c.case_id] = f"error: {exc}"
            raw[str(c.case_id)] = (located[c.case_id].as_dict() if isinstance(located[c.case_id], KnowledgeNeurons)
                                   else located[c.case_id])
            if k % 10 == 0 or k == len(todo):
                atomic_write(located_path, lambda tmp: tmp.write_text(json.dumps(raw)), overwrite=True)
                print(f"located {len(located)}/{len(cases)} cases, {(time.perf_counter() - t) / 60:.1f} min",
                      flush=True)
        sets = [v for v in located.values() if isinstance(v, KnowledgeNeurons)]
        common = relation_neurons(sets, q=0.05).neurons if len(sets) >= 2 else []
        found = {c.case_id: v if isinstance(v, KnowledgeNeurons) else kneurons.KneuronsError(v)
                 for c in cases for v in [located[c.case_id]]}
        done_ids = set(df["case_id"].astype(str)) if len(df) else set()
        todo = [c for c in cases if str(c.case_id) not in done_ids]
        for k in range(0, len(todo), 5):  # phase 2: edits, five cases at a time
            chunk = evaluate_edits(h, todo[k: k + 5], methods=methods, settings=settings,
                                   n_preserve=args.preserve, located=found, common=common, pool=cases)
            chunk["elapsed"] = time.perf_counter() - t
            df = pd.concat([df, chunk], ignore_index=True)
            atomic_write(rows_path, lambda tmp: df.to_csv(tmp, index=False), overwrite=True)
            print(f"edited {df.case_id.nunique()}/{len(cases)} cases, {(time.perf_counter() - t) / 60:.1f} min",
                  flush=True)
        assert weights_digest(h.model) == digest, "an edit was not reverted"
        df.attrs["common_neurons"] = len(common)
        seconds = time.perf_counter() - t
        name = h.name
    else:
        name = args.model or "smollm2-135m"
    done = df[df["reliability"].notna()] if "reliability" in df else df.iloc[:0]
    print(f"\n{name}, {df.case_id.nunique() if len(df) else 0} of {len(cases)} CounterFact cases, {seconds / 60:.1f} "
          f"min on {torch.get_num_threads()} thread(s); {done.case_id.nunique()} cases edited, "
          f"{df.attrs.get('common_neurons', 'the')} common neurons "
          f"left out of the fact-specific sets; weights bit-identical after all edits; optimize budget {settings}, "
          f"{args.preserve} preserved prompts")
    skipped = df[df["reliability"].isna()] if "reliability" in df else df
    if len(skipped):
        why = skipped.get("skipped", skipped.get("error"))
        print("not edited:", why.value_counts().to_dict() if why is not None else len(skipped))
    cols = ["reliability_score", "generalization_score", "neighborhood_score", "reliability", "generalization",
            "locality", "n_neurons", "edit_seconds"]
    by = done.groupby("method", sort=False)[cols].mean()
    by[cols[:6]] *= 100
    print("\n| method | cases | ES | PS | NS | reliability | generalization | locality | slots | s/edit |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for m in EDIT_METHODS:
        if m in by.index:
            r = by.loc[m]
            n = int((done.method == m).sum())
            print(f"| {m} | {n} | {r.reliability_score:.1f} | {r.generalization_score:.1f} | "
                  f"{r.neighborhood_score:.1f} | {r.reliability:.1f} | {r.generalization:.1f} | {r.locality:.1f} | "
                  f"{r.n_neurons:.1f} | {r.edit_seconds:.2f} |")
    for name, (es, ps, ns) in ROME.items():
        print(f"| {name} | – | {es} | {ps} | {ns} | | | | | |")
    # knowledge neurons vs random neurons at equal budget, per case
    piv = done.pivot_table(index="case_id", columns="method", values=["reliability_score", "neighborhood_score"])
    for metric in ("reliability_score", "neighborhood_score"):
        for a, b in (("optimize_kn", "optimize_random"), ("optimize_fact_specific", "optimize_random"),
                     ("kn", "random")):
            if (metric, a) in piv and (metric, b) in piv:
                d = (piv[(metric, a)] - piv[(metric, b)]).dropna()
                wins, losses = int((d > 0).sum()), int((d < 0).sum())
                print(f"{metric}: {a} vs {b}: {wins} cases better, {losses} worse, {len(d) - wins - losses} tied; "
                      f"sign test p = {sign_test(wins, losses):.2g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
