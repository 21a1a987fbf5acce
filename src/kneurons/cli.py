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
from .errors import KneuronsError


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
    if path is None:
        return
    p = Path(path)
    if p.exists() and not overwrite:
        raise KneuronsError(f"{p} exists (use --overwrite to replace it)")
    if not p.parent.exists():
        raise KneuronsError(f"directory does not exist: {p.parent}")


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
    from .prompts import assess, encode

    _check_out(args.save, args.overwrite)
    handle = _load(args)
    for p in args.prompts:
        encode(handle, p, args.target)
    total = rows_per_prompt(handle, args.steps) * len(args.prompts)
    t = time.time()
    with _progress_bar(total, "integrated gradients") as bar:
        kn = locate(handle, args.prompts, args.target, steps=args.steps, threshold=args.threshold, p=args.p,
                    min_prompts=args.min_prompts, adaptive=args.adaptive, batch_size=args.batch_size,
                    score=args.score, progress=bar.update)
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
    with _progress_bar(rows_per_prompt(handle, args.steps) * len(prompts), "integrated gradients") as bar:
        kn = locate(handle, prompts, obj, steps=args.steps, adaptive=True, batch_size=args.batch_size,
                    progress=bar.update)
    _print_located(kn, time.time() - t)
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
                       help="rows per forward/backward pass (memory budget; default: one layer = steps + 1)")
        p.add_argument("--score", choices=["prob", "logprob"], default="prob")

    p = sub.add_parser("locate", help="knowledge neurons of one fact from its paraphrase prompts")
    model_args(p)
    ig_args(p)
    p.add_argument("--target", "-t", required=True)
    p.add_argument("--threshold", type=float, default=0.2, help="coarse threshold t x max (default 0.2)")
    p.add_argument("--p", type=float, default=0.7, help="sharing fraction p (default 0.7)")
    p.add_argument("--min-prompts", type=int, default=3)
    p.add_argument("--adaptive", action="store_true", help="move p by 0.05 until 2-5 neurons")
    p.add_argument("--save", default=None, help="write the result as JSON")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("prompts", nargs="+", help="paraphrase prompts of one fact, each with one blank")
    p.set_defaults(fn=cmd_locate)

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
