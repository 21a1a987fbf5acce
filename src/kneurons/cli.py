"""The ``kneurons`` command line.

Bad input ends with one line ``kneurons: error: ...`` on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from . import __version__
from ._io import check_target
from .attribution.methods import METHODS, SCORES
from .errors import KneuronsError
from .interventions import SPACES


def _table(rows: list[dict], columns: list[str] | None = None, floatfmt: str = "{:.4f}") -> str:
    if not rows:
        return "(none)"
    columns = columns or list(rows[0])
    cells = [[(floatfmt.format(r[c]) if isinstance(r[c], float) else str(r[c])) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[j]) for row in cells)) for j, c in enumerate(columns)]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths)).rstrip()  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells])


def _load(args):
    from .models import load_model

    t = time.time()
    handle = load_model(args.model, dtype=getattr(args, "dtype", None), device=getattr(args, "device", None))
    print(f"model: {handle.name} ({handle.model_type}, {handle.kind}, {handle.n_layers} layers x {handle.d_ff} "
          f"FFN neurons, {handle.dtype}, {handle.device}) loaded in {time.time() - t:.1f}s", file=sys.stderr)
    return handle


def _check_out(path: str | None, overwrite: bool) -> None:
    if path is not None:
        check_target(path, overwrite)


def cmd_predict(args) -> int:
    from .prompts import assess, encode

    handle = _load(args)
    for p in args.prompts:
        encode(handle, p, args.target)
    res = assess(handle, args.prompts, args.target, top_k=args.top_k)
    rows = [{"prompt": a.prompt, "target": a.target, "prob": a.prob, "rank": a.rank,
             "top-1": "yes" if a.correct else "no", f"top-{args.top_k}": a.as_dict()["top"]} for a in res]
    print(_table(rows))
    return 0


def _fact_report(handle, facts, relation=None, majority: float = 0.5):
    from .prompts import assess

    rows, known = [], []
    rels = [facts.relation(relation)] if relation else facts.relations
    for rel in rels:
        items = []
        for fact in rel.facts:
            prompts = rel.prompts(fact, causal=handle.is_causal)
            items += [(fact, p) for p in prompts]
        if not items:
            continue
        res = assess(handle, [p for _, p in items], [f.object for f, _ in items], top_k=1)
        by_fact: dict = {}
        for (fact, _), a in zip(items, res):
            by_fact.setdefault((fact.subject, fact.object), []).append(a)
        for (subj, obj), results in by_fact.items():
            n_ok = sum(a.correct for a in results)
            ok = n_ok > majority * len(results)
            rows.append({"relation": rel.id, "subject": subj, "object": obj, "templates": len(results),
                         "top-1": n_ok, "mean prob": sum(a.prob for a in results) / len(results),
                         "known": "yes" if ok else "no"})
            if ok:
                known.append((rel, subj, obj, [a.prompt for a in results], [a.prob for a in results]))
    return rows, known


def cmd_facts(args) -> int:
    from .data import load_facts

    facts = load_facts(args.facts)
    handle = _load(args)
    rows, known = _fact_report(handle, facts, args.relation)
    print(_table(rows))
    print(f"\n{len(known)} of {len(rows)} facts known (top-1 on a majority of usable templates)")
    return 0


def _progress_bar(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="row", leave=False, disable=None, file=sys.stderr)


def cmd_locate(args) -> int:
    from .attribution import rows_per_prompt
    from .neurons import locate
    from .prompts import encode

    _check_out(args.save, args.overwrite)
    handle = _load(args)
    for p in args.prompts:
        encode(handle, p, args.target)
    total = rows_per_prompt(handle, args.steps, method=args.method) * len(args.prompts)
    t = time.time()
    with _progress_bar(total, args.method.replace("_", " ")) as bar:
        kn = locate(handle, args.prompts, args.target, steps=args.steps, threshold=args.threshold, p=args.p,
                    min_prompts=args.min_prompts, adaptive=args.adaptive, batch_size=args.batch_size,
                    score=args.score, progress=bar.update, batch_prompts=args.batch_prompts, method=args.method)
    elapsed = time.time() - t
    _print_located(kn, elapsed)
    if args.save:
        kn.save(args.save, overwrite=args.overwrite)
        print(f"saved to {args.save}")
    return 0


def _print_located(kn, elapsed: float | None = None) -> None:
    print(_table([{"prompt": p, "P(target)": b, "coarse neurons": len(c)}
                  for p, b, c in zip(kn.prompts, kn.base_probs, kn.coarse)]))
    took = f" in {elapsed:.1f}s ({elapsed / max(1, len(kn.prompts)):.1f}s per prompt)" if elapsed else ""
    print(f"\nknowledge neurons of '{kn.target}': {len(kn)} (p = {kn.params.get('p_used')}){took}")
    df = kn.to_dataframe()
    if len(df):
        print(_table(df[["layer", "neuron", "n_prompts_coarse", "mean_score"]].to_dict("records")
                     if "mean_score" in df else df.to_dict("records")))
        print("layers: " + ", ".join(f"L{l}: {n}" for l, n in kn.layers().items()))


def _neurons_for(args, handle):
    """Neurons from ``--neurons FILE`` or located on the fly from the prompts."""
    from .neurons import KnowledgeNeurons, locate

    if args.neurons:
        kn = KnowledgeNeurons.load(args.neurons)
        if kn.model.get("n_layers") not in (None, handle.n_layers) or kn.model.get("d_ff") not in (None, handle.d_ff):
            raise KneuronsError(f"{args.neurons} was located on a model of another shape ({kn.model.get('name')})")
        return kn
    if len(args.prompts) < 2:
        raise KneuronsError("give --neurons FILE, or at least 2 paraphrase prompts to locate the neurons")
    from .attribution import rows_per_prompt

    per_prompt = rows_per_prompt(handle, args.steps, method=args.method)
    with _progress_bar(per_prompt * len(args.prompts), "locating") as bar:
        kn = locate(handle, args.prompts, args.target, steps=args.steps, adaptive=True, progress=bar.update,
                    batch_size=args.batch_size, score=args.score, method=args.method)
    print(f"located {len(kn)} knowledge neurons: {kn.neurons}")
    if not kn.neurons:
        raise KneuronsError("no knowledge neurons found for this fact (try more or better paraphrases)")
    return kn


def _controls(args) -> list[tuple[str, str, str]]:
    return [("control", p, t) for p, t in (args.control or [])]


def cmd_intervene(args) -> int:
    from .interventions import measure_intervention

    handle = _load(args)
    kn = _neurons_for(args, handle)
    prompts = args.prompts or kn.prompts
    target = args.target or kn.target
    if not prompts or not target:
        raise KneuronsError("give the fact's prompts and --target (or a --neurons file that has them)")
    factor = 0.0 if args.command == "suppress" else args.factor
    res = measure_intervention(handle, kn, prompts, target, factor, _controls(args), position=args.position)
    df = res.to_dataframe()
    print(_table(df[["group", "prompt", "target", "before", "after", "rel_change"]].to_dict("records")))
    s = res.summary()
    print(f"\n{args.command} x{factor:g} of {len(res.neurons)} neurons: fact {s['fact']:+.1%}"
          + (f", controls {df[df.group != 'fact'].rel_change.mean():+.1%}, specificity {s['specificity']:.1f}"
             if (df.group != "fact").any() else ""))
    return 0


def cmd_update(args) -> int:
    from .interventions import perplexity, save_edited, update_fact, weights_digest
    from .prompts import assess

    _check_model_dir(args.save_model)
    handle = _load(args)
    kn = _neurons_for(args, handle)
    prompts = args.prompts or kn.prompts
    old = args.target or kn.target
    ctrl_p = [p for p, _ in (args.control or [])]
    ctrl_t = [t for _, t in (args.control or [])]
    digest = weights_digest(handle.model)
    before = {"old": assess(handle, prompts, old), "new": assess(handle, prompts, args.new),
              "ppl": perplexity(handle, ctrl_p, ctrl_t) if ctrl_p else float("nan")}
    edit = update_fact(handle, kn, old, args.new, prompt=prompts[0], lambda1=args.lambda1, lambda2=args.lambda2,
                       space=args.space)
    after = {"old": assess(handle, prompts, old), "new": assess(handle, prompts, args.new),
             "ppl": perplexity(handle, ctrl_p, ctrl_t) if ctrl_p else float("nan")}
    rows = [{"prompt": p, f"P({old}) before": b.prob, "after": a.prob, f"P({args.new}) before": nb.prob,
             "after ": na.prob, f"rank of {args.new}": f"{nb.rank} -> {na.rank}"}
            for p, b, a, nb, na in zip(prompts, before["old"], after["old"], before["new"], after["new"])]
    print(_table(rows))
    s1 = sum(a.rank <= 1 for a in after["new"]) / len(prompts)
    s5 = sum(a.rank <= 5 for a in after["new"]) / len(prompts)
    print(f"\nupdate {old} -> {args.new} in {len(kn)} value slots: success@1 {s1:.0%}, success@5 {s5:.0%}"
          + (f"; control perplexity {before['ppl']:.2f} -> {after['ppl']:.2f}" if ctrl_p else ""))
    if args.save_model:
        save_edited(handle, args.save_model)
        print(f"edited model saved to {args.save_model}")
    edit.revert()
    assert weights_digest(handle.model) == digest
    return 0


def _check_model_dir(path):
    if path is None:
        return
    p = Path(path)
    if p.exists() and any(p.iterdir()):
        raise KneuronsError(f"directory {p} is not empty")
    if not p.parent.exists():
        raise KneuronsError(f"directory does not exist: {p.parent}")


def _relation_items(handle, rel, facts_subset=None):
    items = [(f, p) for f in (facts_subset or rel.facts) for p in rel.prompts(f, causal=handle.is_causal)]
    return [p for _, p in items], [f.object for f, _ in items]


def cmd_erase(args) -> int:
    from .data import load_facts
    from .interventions import accuracy, erase_relation, perplexity, save_edited, shared_neurons
    from .neurons import KnowledgeNeurons, locate

    _check_model_dir(args.save_model)
    facts = load_facts(args.facts)
    rel = facts.relation(args.relation)
    handle = _load(args)
    if args.neurons:
        sets = [KnowledgeNeurons.load(f) for f in args.neurons]
    else:
        chosen = rel.facts[: args.facts_per_relation]
        sets = []
        from .attribution import rows_per_prompt

        per_prompt = rows_per_prompt(handle, args.steps, method=args.method)
        n_rows = sum(per_prompt * len(rel.prompts(f, causal=handle.is_causal)) for f in chosen)
        with _progress_bar(n_rows, f"locating {len(chosen)} facts of {rel.id}") as bar:
            for f in chosen:
                prompts = rel.prompts(f, causal=handle.is_causal)
                if len(prompts) >= 2:
                    sets.append(locate(handle, prompts, f.object, steps=args.steps, adaptive=True,
                                       keep_attributions=False, progress=bar.update, batch_size=args.batch_size,
                                       score=args.score, method=args.method))
    shared = shared_neurons(sets, args.min_facts, args.top_k)
    print(f"{len(shared)} neurons shared by the knowledge neurons of {len(sets)} facts of {rel.id}: {shared}")
    others = [r for r in facts.relations if r.id != rel.id]

    def measure():
        row = {}
        p, t = _relation_items(handle, rel)
        row["erased relation"] = (accuracy(handle, p, t), perplexity(handle, p, t))
        op, ot = [], []
        for r in others:
            a, b = _relation_items(handle, r)
            op += a
            ot += b
        row["other relations"] = (accuracy(handle, op, ot), perplexity(handle, op, ot))
        return row

    before = measure()
    edit = erase_relation(handle, sets, args.min_facts, args.top_k, mode=args.mode)
    after = measure()
    print(_table([{"prompts of": k, "accuracy before": before[k][0], "after": after[k][0],
                   "perplexity before": before[k][1], "after ": after[k][1],
                   "perplexity change": (after[k][1] - before[k][1]) / before[k][1]} for k in before]))
    if args.save_model:
        save_edited(handle, args.save_model)
        print(f"edited model saved to {args.save_model}")
    edit.revert()
    return 0


def cmd_demo(args) -> int:
    from .data import load_facts
    from .neurons import locate

    facts = load_facts()
    handle = _load(args)
    print(f"\n== 1. Knowledge assessing: which built-in facts does {handle.name} know? ==")
    rows, known = _fact_report(handle, facts)
    per_rel: dict = {}
    for r in rows:
        d = per_rel.setdefault(r["relation"], {"relation": r["relation"], "facts": 0, "known": 0})
        d["facts"] += 1
        d["known"] += r["known"] == "yes"
    print(_table(list(per_rel.values())))
    print(f"{len(known)} of {len(rows)} facts known (top-1 on a majority of templates)")
    sample = [r for r in rows if r["relation"] == rows[0]["relation"]][:8]
    print("\nexample relation:")
    print(_table(sample))
    if not known:
        raise KneuronsError("the model knows none of the built-in facts")
    wanted = args.fact
    choice = None
    for rel, subj, obj, prompts, probs in known:
        if wanted is None or wanted.lower() in (subj.lower(), f"{rel.id}:{subj}".lower()):
            if len(prompts) >= 3:
                choice = (rel, subj, obj, prompts)
                break
    if choice is None:
        raise KneuronsError(f"no known built-in fact matches {wanted!r} with >= 3 templates")
    rel, subj, obj, prompts = choice
    prompts = prompts[: args.prompts]
    print(f"\n== 2. Knowledge attribution: <{subj}, {rel.id}, {obj}> from {len(prompts)} paraphrases ==")
    from .attribution import rows_per_prompt

    t = time.time()
    with _progress_bar(rows_per_prompt(handle, args.steps, method=args.method) * len(prompts),
                       args.method.replace("_", " ")) as bar:
        kn = locate(handle, prompts, obj, steps=args.steps, adaptive=True, batch_size=args.batch_size,
                    method=args.method, progress=bar.update)
    _print_located(kn, time.time() - t)
    if not kn.neurons:
        print("no knowledge neurons at these settings; stopping")
        return 0

    from .interventions import measure_intervention, perplexity, update_fact, weights_digest
    from .neurons import random_neurons
    from .prompts import assess

    known_by_rel: dict = {}
    for r, s_, o, ps, _ in known:
        known_by_rel.setdefault(r.id, []).append((s_, o, ps))
    same = [(s_, o, ps) for s_, o, ps in known_by_rel[rel.id] if s_ != subj][:5]
    other = [v[0] for rid, v in known_by_rel.items() if rid != rel.id][:6]
    controls = [("same_relation", ps[0], o) for _, o, ps in same] + [("other_relation", ps[0], o) for _, o, ps in other]

    print(f"\n== 3. Suppress and amplify the {len(kn)} knowledge neurons (fact vs {len(controls)} control facts) ==")
    rnd = random_neurons(handle, kn, seed=0)
    summary = []
    for label, neurons, factor in (("suppress (x0)", kn, 0.0), ("amplify (x2)", kn, 2.0),
                                   ("suppress random neurons", rnd, 0.0), ("amplify random neurons", rnd, 2.0)):
        res = measure_intervention(handle, neurons, prompts, obj, factor, controls)
        if label == "suppress (x0)":
            print(_table(res.to_dataframe()[["group", "prompt", "target", "before", "after", "rel_change"]]
                         .to_dict("records")))
        s_ = res.summary()
        summary.append({"intervention": label, "fact dp/p": f"{s_['fact']:+.1%}",
                        "same relation": f"{s_['same_relation']:+.1%}", "other relations": f"{s_['other_relation']:+.1%}"})
    print()
    print(_table(summary))

    new = next((o for _, o, _ in same if o != obj), None)
    if new is None:
        return 0
    print(f"\n== 4. Update <{subj}, {rel.id}, {obj}> -> {new} in the neurons' value slots (each edit reverted) ==")
    intra_p = [ps[0] for _, _, ps in same]
    intra_t = [o for _, o, _ in same]
    inter_p = [ps[0] for _, _, ps in other]
    inter_t = [o for _, o, _ in other]
    digest = weights_digest(handle.model)

    def state():
        a_old, a_new = assess(handle, prompts, obj), assess(handle, prompts, new)
        return {"P(old)": sum(a.prob for a in a_old) / len(prompts), "P(new)": sum(a.prob for a in a_new) / len(prompts),
                "success@1": sum(a.rank <= 1 for a in a_new) / len(prompts),
                "success@5": sum(a.rank <= 5 for a in a_new) / len(prompts),
                "intra-relation ppl": perplexity(handle, intra_p, intra_t),
                "inter-relation ppl": perplexity(handle, inter_p, inter_t)}

    rows = [{"": "before", **state()}]
    tops = {}
    for lam2 in (8.0, 2.0, 1.0):  # the authors' lambda2 = 8 first, then milder edits
        with update_fact(handle, kn, obj, new, prompt=prompts[0], lambda1=1.0, lambda2=lam2):
            rows.append({"": f"after (l1=1, l2={lam2:g})", **state()})
            tops[lam2] = [a.top[0].token.strip() for a in assess(handle, prompts, new)]
    print(_table(rows, floatfmt="{:.4g}"))
    for lam2, t in tops.items():
        print(f"top-1 answers after the update with l2={lam2:g}: {', '.join(t)}")
    same_weights = weights_digest(handle.model) == digest
    print(f"reverted: every weight bit-identical to before: {'yes' if same_weights else 'NO'}")
    if not same_weights:
        raise KneuronsError("revert did not restore the weights")
    return 0


def _run_config(args):
    from .experiments.runner import RunConfig

    none_if = lambda v: None if v is not None and v <= 0 else v  # noqa: E731
    return RunConfig(
        model=args.model or "smollm2-135m", data=str(args.data), relations=args.relations,
        facts_per_relation=args.facts_per_relation, seed=args.seed, experiments=args.experiments,
        max_prompts=args.max_prompts, max_candidates=args.max_candidates, known_fraction=args.known_fraction,
        known_rank=args.known_rank, known_among=args.known_among, steps=args.steps, threshold=args.threshold,
        p=args.p, min_prompts=args.min_prompts, adaptive=not args.fixed_p, score=args.score, method=args.method,
        bingrel_sentences=args.bingrel_sentences, max_tokens=args.max_tokens, update_lambda1=args.lambda1,
        update_lambda2=args.lambda2, update_space=args.update_space,
        update_drop_shared=none_if(args.update_drop_shared), erase_relations=args.erase_relations,
        erase_top_k=none_if(args.erase_top_k), erase_min_facts=args.erase_min_facts, erase_mode=args.erase_mode,
        dtype=args.dtype, device=args.device, batch_size=args.batch_size)


def cmd_run(args) -> int:
    from .experiments.runner import Runner

    from .experiments.runner import pararel_dirs

    cfg = _run_config(args)
    cfg.check()
    pararel_dirs(cfg.data)  # before the model loads: a bad path fails at once
    t = time.time()
    runner = Runner(cfg, args.out, handle=_load(args), progress=not args.quiet,
                    log=lambda m: print(m, file=sys.stderr))
    store = runner.run()
    counts = store.counts()
    print(f"run complete in {time.time() - t:.0f}s: {args.out}")
    print(_table([{"experiment": e, "units stored": n} for e, n in sorted(counts.items())]))
    print(f"next: kneurons report {args.out}    kneurons export {args.out} --format csv")
    return 0


def cmd_export(args) -> int:
    from .experiments.export import export

    paths = export(args.run_dir, args.format, args.out, overwrite=args.overwrite)
    for p in paths:
        print(p)
    return 0


def cmd_report(args) -> int:
    from .report import format_summary, summary, write_report

    path = write_report(args.run_dir, args.out)
    print(format_summary(summary(args.run_dir)))
    print(f"report: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="kneurons", description="Knowledge neurons in Hugging Face transformers.")
    ap.add_argument("--version", action="version", version=f"kneurons {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    def model_args(p):
        p.add_argument("--model", "-m", default=None,
                       help="embedded name (smollm2-135m, gemma-3-270m), local directory, .gguf file or hub id "
                            "(default: smollm2-135m)")
        p.add_argument("--dtype", default=None, help="float32 (default), float64, bfloat16, float16")
        p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps ...")

    p = sub.add_parser("predict", help="assess a cloze prompt: target probability, rank, top-k")
    model_args(p)
    p.add_argument("--target", "-t", required=True)
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("prompts", nargs="+", help="prompt(s) with one blank: [MASK], [Y] or ___")
    p.set_defaults(fn=cmd_predict)

    p = sub.add_parser("facts", help="which built-in facts the model knows")
    model_args(p)
    p.add_argument("--relation", default=None)
    p.add_argument("--facts", default=None, help="a facts JSON file (default: the built-in set)")
    p.set_defaults(fn=cmd_facts)

    def ig_args(p):
        p.add_argument("--steps", type=int, default=20, help="integration steps m (default 20)")
        p.add_argument("--batch-size", type=int, default=None,
                       help="rows per forward/backward pass (memory budget; default: about 2048 row-positions on CPU)")
        p.add_argument("--score", choices=list(SCORES), default="prob")
        p.add_argument("--method", choices=list(METHODS), default="integrated_gradients",
                       help="how neurons are found: "
                            + "; ".join(f"{m.name}: {m.description}" for m in METHODS.values()))

    p = sub.add_parser("locate", help="knowledge neurons of one fact from its paraphrase prompts")
    model_args(p)
    ig_args(p)
    p.add_argument("--batch-prompts", action="store_true",
                   help="the paraphrases' rows share passes (same numbers; pays on a GPU, slower on a small CPU)")
    p.add_argument("--target", "-t", required=True)
    p.add_argument("--threshold", type=float, default=None,
                   help="coarse threshold t x max (default: the method's, 0.2; activation 0.5)")
    p.add_argument("--p", type=float, default=0.7, help="sharing fraction p (default 0.7)")
    p.add_argument("--min-prompts", type=int, default=3)
    p.add_argument("--adaptive", action="store_true", help="move p by 0.05 until 2-5 neurons")
    p.add_argument("--save", default=None, help="write the result as JSON")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("prompts", nargs="+", help="paraphrase prompts of one fact, each with one blank")
    p.set_defaults(fn=cmd_locate)

    def fact_args(p, need_target=True):
        p.add_argument("--neurons", default=None, help="a knowledge-neurons JSON file from `kneurons locate --save`")
        p.add_argument("--target", "-t", default=None, help="the fact's answer (default: from --neurons)")
        p.add_argument("--control", nargs=2, action="append", metavar=("PROMPT", "TARGET"),
                       help="a control prompt and its answer (repeatable)")
        p.add_argument("prompts", nargs="*", help="the fact's paraphrase prompts (default: from --neurons)")

    for name, helptext in (("suppress", "set knowledge neurons to 0 and measure the fact and controls"),
                           ("amplify", "multiply knowledge neurons by --factor (2) and measure")):
        p = sub.add_parser(name, help=helptext)
        model_args(p)
        ig_args(p)
        fact_args(p)
        p.add_argument("--factor", type=float, default=2.0)
        p.add_argument("--position", choices=["blank", "all"], default="blank")
        p.set_defaults(fn=cmd_intervene)

    p = sub.add_parser("update", help="rewrite a fact's answer in its neurons' value slots (then revert)")
    model_args(p)
    ig_args(p)
    fact_args(p)
    p.add_argument("--new", required=True, help="the new answer t'")
    p.add_argument("--lambda1", type=float, default=1.0)
    p.add_argument("--lambda2", type=float, default=8.0)
    p.add_argument("--space", choices=SPACES, default="embedding",
                   help="the targets' vectors: the paper's unembedding rows (default), the residual directions the "
                        "output head maps to them (head; for heads that transform the residual, e.g. BERT's MLM "
                        "head), or the logit gradient at the first prompt (gradient)")
    p.add_argument("--save-model", default=None, help="save the edited model to this (new or empty) directory")
    p.set_defaults(fn=cmd_update)

    p = sub.add_parser("erase", help="erase a built-in relation through the neurons its facts share")
    model_args(p)
    ig_args(p)
    p.add_argument("--relation", required=True, help="relation id of the built-in fact set")
    p.add_argument("--facts", default=None, help="a facts JSON file (default: the built-in set)")
    p.add_argument("--facts-per-relation", type=int, default=8, help="facts whose neurons are located")
    p.add_argument("--neurons", nargs="+", default=None, help="knowledge-neuron files instead of locating")
    p.add_argument("--min-facts", type=int, default=2, help="keep neurons shared by at least this many facts")
    p.add_argument("--top-k", type=int, default=None, help="or keep the k most shared neurons")
    p.add_argument("--mode", choices=["zero", "unk"], default="zero")
    p.add_argument("--save-model", default=None)
    p.set_defaults(fn=cmd_erase)

    p = sub.add_parser("run", help="every experiment of the paper on PARAREL-layout data, into a resumable run "
                                   "directory")
    model_args(p)
    ig_args(p)
    p.add_argument("--data", required=True, help="directory holding pararel/ (and lama/, bingrel/), or a PARAREL "
                                                 "directory (query_pairs.json + patterns/)")
    p.add_argument("--out", required=True, help="run directory (created; rerun the same command to resume)")
    p.add_argument("--relations", nargs="+", default=None, help="relation ids (default: all)")
    p.add_argument("--facts-per-relation", type=int, default=10, help="known facts per relation (default 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--experiments", nargs="+", default=["assess", "locate", "suppress", "activations", "update",
                                                        "erase"])
    p.add_argument("--max-prompts", type=int, default=None, help="use at most this many templates per fact")
    p.add_argument("--max-candidates", type=int, default=200,
                   help="facts assessed per relation while looking for known ones (default 200)")
    p.add_argument("--known-fraction", type=float, default=0.5,
                   help="known = right on more than this fraction of the fact's prompts (default 0.5)")
    p.add_argument("--known-rank", type=int, default=1, help="right = rank <= this (default 1)")
    p.add_argument("--known-among", choices=["vocabulary", "candidates"], default="vocabulary",
                   help="rank over the whole vocabulary, or among the relation's answers (LAMA/PARAREL style)")
    p.add_argument("--threshold", type=float, default=0.2)
    p.add_argument("--p", type=float, default=0.7)
    p.add_argument("--min-prompts", type=int, default=3)
    p.add_argument("--fixed-p", action="store_true", help="do not adapt p to get 2-5 neurons per fact")
    p.add_argument("--lambda1", type=float, default=1.0)
    p.add_argument("--lambda2", type=float, default=8.0)
    p.add_argument("--update-drop-shared", type=float, default=0.1,
                   help="update: drop neurons shared by more than this fraction of the relation's facts (0: keep)")
    p.add_argument("--update-space", choices=SPACES, default="embedding",
                   help="update: the paper's unembedding rows, the residual directions the output head maps to the "
                        "targets (head), or the logit gradient at the fact's prompt (gradient)")
    p.add_argument("--bingrel-sentences", type=int, default=10, help="activations: sentences per bag (default 10)")
    p.add_argument("--max-tokens", type=int, default=128, help="activations: truncate sentences (default 128)")
    p.add_argument("--erase-relations", nargs="+", default=["P19", "P27", "P106", "P937"])
    p.add_argument("--erase-top-k", type=int, default=20, help="erase the k most shared neurons (0: use --erase-min-facts)")
    p.add_argument("--erase-min-facts", type=int, default=None)
    p.add_argument("--erase-mode", choices=["unk", "zero"], default="unk")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("export", help="a run's results as parquet or CSV tables, one per experiment")
    p.add_argument("run_dir")
    p.add_argument("--format", choices=["parquet", "csv"], default="parquet")
    p.add_argument("--out", default=None, help="directory for the tables (default: RUN_DIR/export)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("report", help="HTML report + PNG figures of a run, beside the paper's numbers")
    p.add_argument("run_dir")
    p.add_argument("--out", default=None, help="directory for report.html and the figures (default: RUN_DIR/report)")
    p.set_defaults(fn=cmd_report)

    p = sub.add_parser("demo", help="the main job on the embedded model")
    model_args(p)
    ig_args(p)
    p.add_argument("--fact", default=None, help="subject of the built-in fact to locate (default: first known)")
    p.add_argument("--prompts", type=int, default=4, help="paraphrases to use")
    p.set_defaults(fn=cmd_demo)
    return ap


def main(argv=None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except KneuronsError as exc:
        print(f"kneurons: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kneurons: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
