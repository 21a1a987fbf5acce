"""The ``kneurons`` command line.

Bad input ends with one line ``kneurons: error: ...`` on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import time
import warnings
from pathlib import Path

from . import __version__
from ._io import check_new_dir, check_target, handle_sigterm, kept_signal_handlers, termination_received
from .errors import KneuronsError


def _table(rows: list[dict], columns: list[str] | None = None, floatfmt: str = "{:.4f}") -> str:
    if not rows:
        return "(none)"
    columns = columns or list(rows[0])
    cells = [[(floatfmt.format(r[c]) if isinstance(r[c], float) else str(r[c])) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[j]) for row in cells)) for j, c in enumerate(columns)]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths)).rstrip()  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells])


def _load(args, device: str | None = None):
    """The model of ``args`` (on ``device`` if given, else ``--device``)."""
    from .models import load_model

    t = time.time()
    handle = load_model(args.model, dtype=getattr(args, "dtype", None),
                        device=device if device is not None else getattr(args, "device", None))
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


def _known_facts(handle, facts, relation=None):
    """Assess the built-in facts (:func:`kneurons.experiments.assess_facts`: known = top-1 on a majority of the
    fact's templates); rows to print and the known facts as :class:`~kneurons.experiments.FactItem` s."""
    from .experiments import assess_facts, fact_items

    rows, known = [], []
    for rel in [facts.relation(relation)] if relation else facts.relations:
        items = [it for it in fact_items(rel, causal=handle.is_causal) if it.prompts]
        for it, r in zip(items, assess_facts(handle, items) if items else []):
            rows.append({"relation": rel.id, "subject": it.subject, "object": it.object, "templates": r["n_prompts"],
                         "top-1": r.get("n_right", 0), "mean prob": r.get("mean_prob", float("nan")),
                         "known": "yes" if r["known"] else ("no (cannot be asked)" if r["error"] else "no")})
            if r["known"]:
                known.append(it)
    return rows, known


def cmd_facts(args) -> int:
    from .data import load_facts

    facts = load_facts(args.facts)
    handle = _load(args)
    rows, known = _known_facts(handle, facts, args.relation)
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
                    score=args.score, progress=bar.update, batch_prompts=args.batch_prompts, method=args.method,
                    foils=args.foils)
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


def _read_neurons(args):
    """``--neurons FILE`` read and checked before the model loads (``None`` without the option)."""
    from .neurons import KnowledgeNeurons

    if not args.neurons:
        if len(args.prompts) < 2:
            raise KneuronsError("give --neurons FILE, or at least 2 paraphrase prompts to locate the neurons")
        return None
    kn = KnowledgeNeurons.load(args.neurons)
    if not kn.neurons:
        raise KneuronsError(f"{args.neurons} holds no knowledge neurons")
    return kn


def _neurons_for(args, handle, kn=None):
    """Neurons from ``--neurons FILE`` (read by :func:`_read_neurons`) or located on the fly from the prompts."""
    from .neurons import check_neurons, locate

    if kn is not None:
        check_neurons(handle, kn, Path(args.neurons).name)  # shape and ids; another model's name: a warning
        return kn
    from .attribution import rows_per_prompt

    per_prompt = rows_per_prompt(handle, args.steps, method=args.method)
    with _progress_bar(per_prompt * len(args.prompts), "locating") as bar:
        kn = locate(handle, args.prompts, args.target, steps=args.steps, adaptive=True, progress=bar.update,
                    batch_size=args.batch_size, score=args.score, method=args.method, foils=args.foils)
    print(f"located {len(kn)} knowledge neurons: {kn.neurons}")
    if not kn.neurons:
        raise KneuronsError("no knowledge neurons found for this fact (try more or better paraphrases)")
    return kn


def _controls(args) -> list[tuple[str, str, str]]:
    return ([("same_relation", p, t) for p, t in (getattr(args, "relation_control", None) or [])]
            + [("other_relation", p, t) for p, t in (args.control or [])])


def cmd_intervene(args) -> int:
    from .interventions import measure_intervention

    kn = _read_neurons(args)
    handle = _load(args)
    kn = _neurons_for(args, handle, kn)
    prompts = args.prompts or kn.prompts
    target = args.target or kn.target
    if not prompts or not target:
        raise KneuronsError("give the fact's prompts and --target (or a --neurons file that has them)")
    factor = 0.0 if args.command == "suppress" else args.factor
    res = measure_intervention(handle, kn, prompts, target, factor, _controls(args), position=args.position)
    df = res.to_dataframe()
    print(_table(df[["group", "prompt", "target", "before", "after", "rel_change"]].to_dict("records")))
    s = res.summary()
    line = f"\n{args.command} x{factor:g} of {len(res.neurons)} neurons: fact {s['fact']:+.1%}"
    if (df.group == "same_relation").any():
        line += (f", same relation {s['same_relation']:+.1%} (relation specificity {s['relation_specificity']:.1f}: "
                 "fact / same relation)")
    if (df.group == "other_relation").any():
        line += f", other controls {s['other_relation']:+.1%}"
    if (df.group != "fact").any():
        line += f", specificity {s['specificity']:.1f} (fact / all controls)"
    print(line)
    return 0


def cmd_update(args) -> int:
    from .experiments import measure_update
    from .interventions import OptimizeSettings, save_edited, update_fact, weights_digest

    _check_model_dir(args.save_model)
    kn = _read_neurons(args)
    handle = _load(args)
    kn = _neurons_for(args, handle, kn)
    prompts = args.prompts or kn.prompts
    old = args.target or kn.target
    if not prompts or not old:
        raise KneuronsError("give the fact's prompts and --target (or a --neurons file that has them)")
    controls = [(p, t) for p, t in (args.control or [])]
    digest = weights_digest(handle.model)
    before = measure_update(handle, prompts, old, args.new, intra=controls, details=True)
    if args.update_method == "optimize":
        edit = update_fact(handle, kn, old, args.new, method="optimize", prompts=prompts, locality=args.locality or [],
                           settings=OptimizeSettings(**{f: v for f, v in (("steps", args.opt_steps), ("lr", args.opt_lr),
                                                                          ("bound", args.opt_bound), ("kl", args.kl))
                                                        if v is not None}))
    else:
        edit = update_fact(handle, kn, old, args.new, prompt=prompts[0], lambda1=args.lambda1, lambda2=args.lambda2,
                           space=args.space)
    with edit:
        after = measure_update(handle, prompts, old, args.new, intra=controls, details=True)
        if args.save_model:
            save_edited(handle, args.save_model)
    if weights_digest(handle.model) != digest:
        raise KneuronsError("the edit was not reverted bit-exactly (a bug: please report it)")
    rows = [{"prompt": p, f"P({old}) before": b.prob, "after": a.prob, f"P({args.new}) before": nb.prob,
             "after ": na.prob, f"rank of {args.new}": f"{nb.rank} -> {na.rank}"}
            for p, b, a, nb, na in zip(prompts, before["old"], after["old"], before["new"], after["new"])]
    print(_table(rows))
    if args.update_method == "optimize":
        print(f"\noptimized in {edit.info['steps_taken']} steps ("
              f"{'the new answer leads on every prompt' if edit.info['success'] else 'budget spent before success'}"
              f"), largest slot change {edit.info['max_relative_change']:.2f} x its norm")
    print(f"\nupdate {old} -> {args.new} in {len(kn)} value slots: success@1 {after['success1']:.0%}, success@5 "
          f"{after['success5']:.0%}" + (f"; control perplexity {before['ppl_intra']:.2f} -> {after['ppl_intra']:.2f}"
                                         if controls else ""))
    if args.save_model:
        print(f"edited model saved to {args.save_model}")
    return 0


def _check_model_dir(path):
    if path is not None:
        check_new_dir(path, parents=False)  # new or empty, its parent exists, writable, not a full disk


def cmd_erase(args) -> int:
    from .data import load_facts
    from .experiments import erase_experiment, fact_items
    from .interventions import erase_relation, save_edited, shared_neurons
    from .neurons import KnowledgeNeurons, check_neurons, locate

    _check_model_dir(args.save_model)
    facts = load_facts(args.facts)
    rel = facts.relation(args.relation)
    sets = [KnowledgeNeurons.load(f) for f in args.neurons] if args.neurons else None
    handle = _load(args)
    if args.neurons:
        for f, kn in zip(args.neurons, sets):
            check_neurons(handle, kn, Path(f).name)
    else:
        chosen = [it for it in fact_items(rel, causal=handle.is_causal)[: args.facts_per_relation]
                  if len(it.prompts) >= 2]
        sets = []
        from .attribution import rows_per_prompt

        per_prompt = rows_per_prompt(handle, args.steps, method=args.method)
        n_rows = sum(per_prompt * len(it.prompts) for it in chosen)
        with _progress_bar(n_rows, f"locating {len(chosen)} facts of {rel.id}") as bar:
            for it in chosen:
                sets.append(locate(handle, list(it.prompts), it.object, steps=args.steps, adaptive=True,
                                   keep_attributions=False, progress=bar.update, batch_size=args.batch_size,
                                   score=args.score, method=args.method,
                                   foils=[o for o in dict.fromkeys(x.object for x in chosen) if o != it.object]
                                   if args.score == "contrastive" and not args.foils else args.foils))
    shared = shared_neurons(sets, args.min_facts, args.top_k)
    if not shared:
        raise KneuronsError(f"no neuron is shared by {args.min_facts} or more of the {len(sets)} facts' neuron sets "
                            "(lower --min-facts or use --top-k)")
    print(f"{len(shared)} neurons shared by the knowledge neurons of {len(sets)} facts of {rel.id}: {shared}")

    def prompts_of(relations):  # every (prompt, answer) the model can be asked
        return [(p, it.object, None) for r in relations for it in fact_items(r, causal=handle.is_causal)
                for p in it.prompts if _askable(handle, p, it.object)]

    rows = erase_experiment(handle, [shared], prompts_of([rel]), prompts_of([r for r in facts.relations if r != rel]),
                            top_k=None, min_facts=1, mode=args.mode)
    if args.save_model:
        with erase_relation(handle, [shared], min_facts=1, mode=args.mode):
            save_edited(handle, args.save_model)
    print(_table([{"prompts of": "erased relation" if r["group"] == "erased" else "other relations",
                   "accuracy before": r["acc_before"], "after": r["acc_after"], "perplexity before": r["ppl_before"],
                   "after ": r["ppl_after"], "perplexity change": (r["ppl_after"] - r["ppl_before"]) / r["ppl_before"]}
                  for r in rows]))
    if args.save_model:
        print(f"edited model saved to {args.save_model}")
    return 0


def _askable(handle, prompt: str, answer: str) -> bool:
    from .prompts import encode

    try:
        encode(handle, prompt, answer)
        return True
    except KneuronsError:
        return False


def cmd_demo(args) -> int:
    from .data import load_facts
    from .experiments import measure_update
    from .interventions import measure_intervention, update_fact, weights_digest
    from .neurons import locate, random_neurons
    from .prompts import assess

    facts = load_facts()
    handle = _load(args)
    print(f"\n== 1. Knowledge assessing: which built-in facts does {handle.name} know? ==")
    rows, known = _known_facts(handle, facts)
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
    wanted = (args.fact or "").lower()
    fact = next((it for it in known if len(it.prompts) >= 3 and (
        not wanted or wanted in (it.subject.lower(), f"{it.relation}:{it.subject}".lower()))), None)
    if fact is None:
        raise KneuronsError(f"no known built-in fact matches {args.fact!r} with >= 3 templates")
    prompts, obj = list(fact.prompts[: args.prompts]), fact.object
    print(f"\n== 2. Knowledge attribution: <{fact.subject}, {fact.relation}, {obj}> from {len(prompts)} "
          "paraphrases ==")
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
    foils = [o for o in dict.fromkeys(f.object for f in facts.relation(fact.relation).facts) if o != obj]
    t = time.time()
    with _progress_bar(rows_per_prompt(handle, args.steps) * len(prompts), "contrastive") as bar:
        ckn = locate(handle, prompts, obj, steps=args.steps, adaptive=True, batch_size=args.batch_size,
                     score="contrastive", foils=foils, progress=bar.update)
    print(f"\nfact-specific candidates: the contrastive score log P({obj}) - log mean P(foil) over the relation's "
          f"{len(foils)} other answers ({time.time() - t:.1f}s) finds {len(ckn)} neurons: {ckn.neurons} "
          f"({len(set(ckn.neurons) & set(kn.neurons))} shared with the paper's {len(kn)})")

    same = [it for it in known if it.relation == fact.relation and it.subject != fact.subject][:5]
    other = [next(it for it in known if it.relation == rid)
             for rid in dict.fromkeys(it.relation for it in known) if rid != fact.relation][:6]
    controls = ([("same_relation", it.prompts[0], it.object) for it in same]
                + [("other_relation", it.prompts[0], it.object) for it in other])
    print(f"\n== 3. Suppress and amplify the {len(kn)} knowledge neurons (fact vs {len(controls)} control facts) ==")
    rnd = random_neurons(handle, kn, seed=0)
    summary = []
    before = assess(handle, prompts + [p for _, p, _ in controls], [obj] * len(prompts) + [t for _, _, t in controls])
    sets = [("suppress (x0)", kn, 0.0), ("amplify (x2)", kn, 2.0), ("suppress random neurons", rnd, 0.0),
            ("amplify random neurons", rnd, 2.0)]
    if ckn.neurons:
        sets += [("suppress contrastive neurons", ckn, 0.0), ("amplify contrastive neurons", ckn, 2.0)]
    for label, neurons, factor in sets:
        res = measure_intervention(handle, neurons, prompts, obj, factor, controls, before=before)
        if label == "suppress (x0)":
            print(_table(res.to_dataframe()[["group", "prompt", "target", "before", "after", "rel_change"]]
                         .to_dict("records")))
        s_ = res.summary()
        summary.append({"intervention": label, "fact dp/p": f"{s_['fact']:+.1%}",
                        "same relation": f"{s_['same_relation']:+.1%}", "other relations": f"{s_['other_relation']:+.1%}",
                        "fact / same relation": f"{s_['relation_specificity']:.2f}"})
    print()
    print(_table(summary))
    print("fact / same relation: about 1 for neurons of the relation, large for neurons of this one fact")

    new = next((it.object for it in same if it.object != obj), None)
    if new is None:
        return 0
    print(f"\n== 4. Update <{fact.subject}, {fact.relation}, {obj}> -> {new} in the neurons' value slots (each edit "
          "reverted) ==")
    intra = [(it.prompts[0], it.object) for it in same]
    inter = [(it.prompts[0], it.object) for it in other]
    digest = weights_digest(handle.model)
    names = {"p_old": "P(old)", "p_new": "P(new)", "success1": "success@1", "success5": "success@5",
             "ppl_intra": "intra-relation ppl", "ppl_inter": "inter-relation ppl"}

    def state():
        m = measure_update(handle, prompts, obj, new, intra, inter, details=True)
        return {names[k]: m[k] for k in names}, [a.top[0].token.strip() for a in m["new"]]

    rows = [{"": "before", **state()[0]}]
    tops = {}
    for lam2 in (8.0, 2.0, 1.0):  # the authors' lambda2 = 8 first, then milder edits
        with update_fact(handle, kn, obj, new, prompt=prompts[0], lambda1=1.0, lambda2=lam2):
            values, tops[f"rule, l2={lam2:g}"] = state()
            rows.append({"": f"after (l1=1, l2={lam2:g})", **values})
    # KN-constrained optimization: the same value slots, trained on the first two prompts (the others measure
    # generalization), keeping two same-relation facts' answers (the neighbours below are other facts)
    keep, neighbours = same[:2], same[2:] + other[:3]
    with update_fact(handle, kn, obj, new, method="optimize", prompts=prompts[:2],
                     locality=[it.prompts[0] for it in keep]) as edit:
        values, tops["optimize"] = state()
        rows.append({"": f"after (optimize, {edit.info['steps_taken']} steps)", **values})
        after_n = assess(handle, [it.prompts[0] for it in neighbours], [it.object for it in neighbours])
    before_n = assess(handle, [it.prompts[0] for it in neighbours], [it.object for it in neighbours])
    print(_table(rows, floatfmt="{:.4g}"))
    for name, t in tops.items():
        print(f"top-1 answers after the update ({name}): {', '.join(t)}")
    print(f"\nneighbours (other facts; not trained on) under the optimize edit:")
    print(_table([{"prompt": b.prompt, "answer": b.target, "P before": b.prob, "P after": a.prob,
                   "top-1 before": b.top[0].token.strip(), "top-1 after": a.top[0].token.strip()}
                  for b, a in zip(before_n, after_n)], floatfmt="{:.3g}"))
    same_weights = weights_digest(handle.model) == digest
    print(f"reverted: every weight bit-identical to before: {'yes' if same_weights else 'NO'}")
    if not same_weights:
        raise KneuronsError("revert did not restore the weights")
    return 0


def _run_config(args):
    from .experiments.runner import RunConfig
    from .options import from_arguments

    return from_arguments(RunConfig, args)  # every field from its generated option (kneurons.options)


def cmd_run(args) -> int:
    from .experiments.runner import Runner, pararel_dirs
    from .experiments.store import RunStore

    cfg = _run_config(args)
    cfg.check()
    pararel_dirs(cfg.data)  # before the model loads: a bad path fails at once
    t = time.time()
    # before the model loads: the run's lock (one writer), a writable disk, an intact store of this configuration;
    # a failure before any result is stored removes what this command created
    # None: in this process; with --ray: its options checked and Ray installed, before anything is written
    executor = _ray_pool(args)
    try:
        with RunStore.open(args.out, cfg.identity()) as store:
            # with --ray: the cluster reached (or the local one started) before the model loads, after the cheap
            # checks of the store; the workers hold the model on their devices and load it while the driver loads
            # its copy (for the weights digest, the tokenizer and the plan), which stays on the CPU
            if executor is not None:
                executor.connect()
                executor.launch(cfg)
            handle = _load(args) if executor is None else _load(args, device="cpu")
            Runner(cfg, args.out, handle=handle, progress=not args.quiet, log=lambda m: print(m, file=sys.stderr),
                   store=store, executor=executor).run()
            counts, skipped = store.counts(), store.skipped_data()
    finally:
        if executor is not None:
            executor.close()
    print(_table([{"experiment": e, "units stored": n} for e, n in sorted(counts.items())]))
    print(f"next: kneurons report {args.out}    kneurons export {args.out} --format csv")
    print(f"run complete in {time.time() - t:.0f}s: {args.out}" if not skipped else
          f"run complete in {time.time() - t:.0f}s with skipped data ({'; '.join(skipped)}; see the report): {args.out}")
    return 0


def _ray_pool(args):
    """``kneurons run --ray``'s pool of workers, or None without ``--ray``; Ray is imported only with it."""
    if args.ray is None:
        given = [f for f, v in (("--workers", args.workers), ("--gpus-per-worker", args.gpus_per_worker),
                                ("--threads-per-worker", args.threads_per_worker)) if v is not None]
        if given:
            raise KneuronsError(f"{', '.join(given)} only apply with --ray")
        return None
    from .experiments.ray_pool import RayPool, import_ray

    import_ray()  # a one-line error saying how to install it
    return RayPool(args.ray, workers=args.workers, gpus_per_worker=args.gpus_per_worker,
                   threads_per_worker=args.threads_per_worker or 1)


def _ray_address(text: str) -> str:
    from .experiments.ray_pool import parse_address

    try:
        return parse_address(text)
    except KneuronsError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--ray ")) from None


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


def cmd_explain(args) -> int:
    from .explain import explain_neurons

    from .prompts import parse_cloze

    kn = _read_neurons(args)
    if args.prompt is not None:
        parse_cloze(args.prompt)
    if args.prompt is not None and not (args.target or kn.target):
        raise KneuronsError("--prompt needs --target (or a --neurons file that has one)")
    handle = _load(args)
    kn_checked = _neurons_for(args, handle, kn)
    prompt = args.prompt if args.prompt is not None else (kn.prompts[0] if kn.prompts else None)
    target = args.target or kn.target or None
    df = explain_neurons(handle, kn_checked, top_k=args.top_k, prompt=prompt, target=target if prompt else None,
                         top_facts=args.top_facts)
    rows = []
    for r in df.to_dict("records"):
        row = {"layer": r["layer"], "neuron": r["neuron"], "activation": r["activation"],
               "promotes": " ".join(repr(t) for t in r["promotes"]), "demotes": " ".join(repr(t) for t in r["demotes"])}
        if args.top_facts:
            row["most active on"] = "; ".join(f"{f} ({a:.2f})" for f, a in zip(r["top_facts"], r["top_fact_activations"]))
        rows.append(row)
    print(_table(rows))
    if prompt:
        print(f"\nactivation at the blank of {prompt!r} (target {target!r})")
    return 0


def cmd_serve(args) -> int:
    from .server import bind, check_installed, create_app, serve, url_of

    check_installed()
    if args.runs is not None:
        runs = Path(args.runs)
        if not runs.exists():
            raise KneuronsError(f"runs directory does not exist: {args.runs}")
        if not runs.is_dir():
            raise KneuronsError(f"runs directory is not a directory: {args.runs}")
    sock = bind(args.host, args.port)  # a busy port is refused before the model loads
    try:
        handle = _load(args)
        app = create_app(handle, args.runs)
        if args.host in ("127.0.0.1", "localhost"):  # only this machine's names reach it (no DNS rebinding)
            from starlette.middleware.trustedhost import TrustedHostMiddleware

            app.add_middleware(TrustedHostMiddleware, allowed_hosts=["127.0.0.1", "localhost"])
        print(f"kneurons explorer: {url_of(sock)}  (Ctrl-C stops it)", flush=True)
        try:
            serve(app, sock)
        except KeyboardInterrupt:  # uvicorn shut down gracefully, then re-raised the signal
            pass
    finally:
        sock.close()
    print("kneurons: explorer stopped", file=sys.stderr)
    return 0


# ------------------------------------------------------------------------------------------ argument checks
# Each option's value is checked by argparse (before anything is loaded); a bad value ends in one line
# "kneurons: error: argument --x: ..." and exit code 2.

def _int_in(lo: int, hi: int | None = None):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"must be {'from ' + str(lo) + ' to ' + str(hi) if hi is not None else '>= ' + str(lo)}, got {v}")
        return v
    parse.__name__ = "integer"
    return parse


def _number(lo: float | None = None, hi: float | None = None, lo_open: bool = False):
    """A finite float in [lo, hi] (or (lo, hi] with ``lo_open``)."""
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        if lo is not None and (v < lo or (lo_open and v == lo)) or hi is not None and v > hi:
            left = "(" if lo_open else "["
            raise argparse.ArgumentTypeError(f"must be in {left}{lo if lo is not None else '-inf'}, "
                                             f"{hi if hi is not None else 'inf'}], got {text}")
        return v
    parse.__name__ = "number"
    return parse


_FRACTION = _number(0.0, 1.0, lo_open=True)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``kneurons: error: <what>`` and exit code 2 (no usage dump)."""

    def error(self, message):
        sub = self.prog.split(" ", 1)[1] if " " in self.prog else ""
        where = f" {sub}" if sub else ""
        self.exit(2, f"kneurons: error: {message} (see kneurons{where} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from .attribution.methods import MAX_STEPS, METHODS, SCORES
    from .interventions import SPACES, UPDATE_METHODS, OptimizeSettings

    ap = _Parser(prog="kneurons", description="Knowledge neurons in Hugging Face transformers.")
    ap.add_argument("--version", action="version", version=f"kneurons {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def model_args(p):
        p.add_argument("--model", "-m", default=None,
                       help="embedded name (smollm2-135m, gemma-3-270m), local directory, .gguf file or hub id "
                            "(default: smollm2-135m)")
        p.add_argument("--dtype", default=None, choices=["float32", "float64", "bfloat16", "float16"],
                       help="float32 (default), float64, bfloat16, float16")
        p.add_argument("--device", default=None, help="cpu (default), cuda, cuda:N or mps")

    p = sub.add_parser("predict", help="assess a cloze prompt: target probability, rank, top-k")
    model_args(p)
    p.add_argument("--target", "-t", required=True)
    p.add_argument("--top-k", type=_int_in(1), default=5, help="answers to list (1 to the vocabulary size)")
    p.add_argument("prompts", nargs="+", help="prompt(s) with one blank: [MASK], [Y] or ___")
    p.set_defaults(fn=cmd_predict)

    p = sub.add_parser("facts", help="which built-in facts the model knows")
    model_args(p)
    p.add_argument("--relation", default=None)
    p.add_argument("--facts", default=None, help="a facts JSON file (default: the built-in set)")
    p.set_defaults(fn=cmd_facts)

    def ig_args(p):
        p.add_argument("--steps", type=_int_in(1, MAX_STEPS), default=20,
                       help=f"integration steps m (default 20, at most {MAX_STEPS})")
        p.add_argument("--batch-size", type=_int_in(1), default=None,
                       help="rows per forward/backward pass (memory budget; default: about 2048 row-positions on CPU, "
                            "within half the available memory)")
        p.add_argument("--score", choices=list(SCORES), default="prob",
                       help="what is attributed: " + "; ".join(f"{s.name}: {s.description}" for s in SCORES.values()))
        p.add_argument("--foils", nargs="+", default=None, metavar="ANSWER",
                       help="--score contrastive: other answers of the relation to contrast the target with")
        p.add_argument("--method", choices=list(METHODS), default="integrated_gradients",
                       help="how neurons are found: "
                            + "; ".join(f"{m.name}: {m.description}" for m in METHODS.values()))

    p = sub.add_parser("locate", help="knowledge neurons of one fact from its paraphrase prompts")
    model_args(p)
    ig_args(p)
    p.add_argument("--batch-prompts", action="store_true",
                   help="the paraphrases' rows share passes (same numbers; pays on a GPU, slower on a small CPU)")
    p.add_argument("--target", "-t", required=True)
    p.add_argument("--threshold", type=_FRACTION, default=None,
                   help="coarse threshold t x max, in (0, 1] (default: the method's, 0.2; activation 0.5)")
    p.add_argument("--p", type=_FRACTION, default=0.7, help="sharing fraction p, in (0, 1] (default 0.7)")
    p.add_argument("--min-prompts", type=_int_in(1), default=3)
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
        p.add_argument("--factor", type=_number(), default=2.0)
        p.add_argument("--position", choices=["blank", "all"], default="blank")
        p.add_argument("--relation-control", nargs=2, action="append", metavar=("PROMPT", "TARGET"),
                       help="a prompt of another fact of the SAME relation and its answer (repeatable): gives the "
                            "relation specificity (fact / same relation), which tells fact neurons from relation "
                            "neurons")
        p.set_defaults(fn=cmd_intervene)

    p = sub.add_parser("update", help="rewrite a fact's answer in its neurons' value slots (then revert)")
    model_args(p)
    ig_args(p)
    fact_args(p)
    p.add_argument("--new", required=True, help="the new answer t'")
    p.add_argument("--lambda1", type=_number(), default=1.0)
    p.add_argument("--lambda2", type=_number(), default=8.0)
    p.add_argument("--space", choices=SPACES, default="embedding",
                   help="the targets' vectors: the paper's unembedding rows (default), the residual directions the "
                        "output head maps to them (head; for heads that transform the residual, e.g. BERT's MLM "
                        "head), or the logit gradient at the first prompt (gradient)")
    p.add_argument("--update-method", choices=UPDATE_METHODS, default="rule",
                   help="rule: the authors' rule (lambda1, lambda2, --space); optimize: gradient steps on the value "
                        "slots of the neurons only, until the new answer is top-1 on the prompts (--locality prompts "
                        "kept by a KL term; --opt-steps, --opt-lr, --opt-bound, --kl)")
    p.add_argument("--locality", action="append", default=None, metavar="PROMPT",
                   help="optimize: a cloze whose next-token distribution the edit must keep (repeatable)")
    p.add_argument("--opt-steps", type=_int_in(1, 10_000), default=None,
                   help=f"optimize: at most this many steps (default {OptimizeSettings.steps})")
    p.add_argument("--opt-lr", type=_number(lo=0, lo_open=True), default=None,
                   help=f"optimize: step size in units of each slot's norm (default {OptimizeSettings.lr})")
    p.add_argument("--opt-bound", type=_number(lo=0, lo_open=True), default=None,
                   help=f"optimize: no slot moves by more than this x its norm (default {OptimizeSettings.bound})")
    p.add_argument("--kl", type=_number(lo=0), default=None,
                   help=f"optimize: weight of the KL term on --locality prompts (default {OptimizeSettings.kl})")
    p.add_argument("--save-model", default=None, help="save the edited model to this (new or empty) directory")
    p.set_defaults(fn=cmd_update)

    p = sub.add_parser("erase", help="erase a built-in relation through the neurons its facts share")
    model_args(p)
    ig_args(p)
    p.add_argument("--relation", required=True, help="relation id of the built-in fact set")
    p.add_argument("--facts", default=None, help="a facts JSON file (default: the built-in set)")
    p.add_argument("--facts-per-relation", type=_int_in(1), default=8, help="facts whose neurons are located")
    p.add_argument("--neurons", nargs="+", default=None, help="knowledge-neuron files instead of locating")
    p.add_argument("--min-facts", type=_int_in(1), default=2, help="keep neurons shared by at least this many facts")
    p.add_argument("--top-k", type=_int_in(1), default=None, help="or keep the k most shared neurons")
    p.add_argument("--mode", choices=["zero", "unk"], default="zero")
    p.add_argument("--save-model", default=None)
    p.set_defaults(fn=cmd_erase)

    from .experiments.runner import RunConfig
    from .options import add_arguments

    p = sub.add_parser("run", help="every experiment of the paper on PARAREL-layout data, into a resumable run "
                                   "directory")
    add_arguments(p, RunConfig)  # one option per RunConfig field: its help, default, range and choices
    p.add_argument("--out", required=True, help="run directory (created; rerun the same command to resume)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    ray = p.add_argument_group("Ray (pip install 'kneurons[ray]'): units computed by a pool of workers, each "
                                "holding the model; same results, the store written here")
    ray.add_argument("--ray", nargs="?", const="auto", default=None, type=_ray_address, metavar="ADDRESS",
                     help="auto (the cluster of `ray start`; the default of a bare --ray), local:N (start a local "
                          "cluster of N workers) or host:port / ray://host:port")
    ray.add_argument("--workers", type=_int_in(1), default=None,
                     help="workers (default: N of local:N, else the cluster's GPUs / --gpus-per-worker or CPUs / "
                          "--threads-per-worker)")
    ray.add_argument("--gpus-per-worker", type=_number(0.0), default=None,
                     help="GPUs of each worker (default: 1 on a cluster with GPUs, else 0)")
    ray.add_argument("--threads-per-worker", type=_int_in(1), default=None,
                     help="torch threads (and Ray CPUs) of each worker (default 1)")
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
    p.add_argument("--prompts", type=_int_in(2), default=4, help="paraphrases to use (at least 2)")
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("explain", help="what each knowledge neuron writes: the tokens its value slot promotes and "
                                       "demotes, its activation, the built-in facts it is most active on")
    model_args(p)
    p.add_argument("--neurons", required=True, help="a knowledge-neurons JSON file from `kneurons locate --save`")
    p.add_argument("--top-k", type=_int_in(1, 1000), default=10, help="tokens listed per neuron (default 10)")
    p.add_argument("--top-facts", type=_int_in(0, 1000), default=3,
                   help="built-in facts listed per neuron, most active first (default 3; 0: none)")
    p.add_argument("--prompt", default=None, help="activation at this prompt's blank (default: the file's first)")
    p.add_argument("--target", "-t", default=None, help="the prompt's answer (default: from --neurons)")
    p.set_defaults(fn=cmd_explain, prompts=[])

    p = sub.add_parser("serve", help="a local web explorer: predict, locate, what neurons write, interventions, "
                                     "edits (needs the 'serve' extra)")
    model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_int_in(0, 65535), default=8765, help="port (default 8765; 0: any free port)")
    p.add_argument("--runs", default=None, help="a directory of runs (from `kneurons run`) to list with their reports")
    p.set_defaults(fn=cmd_serve)
    return ap


def _precheck(args) -> None:
    """What can be checked before the model loads: device, prompts' blanks, targets."""
    from .models import check_device
    from .prompts import parse_cloze

    if getattr(args, "device", None) is not None:
        check_device(args.device)
    prompts = getattr(args, "prompts", None)
    for p in prompts if isinstance(prompts, list) else []:
        parse_cloze(p)
    for p, t in getattr(args, "control", None) or []:
        parse_cloze(p)
        if not t.strip():
            raise KneuronsError(f"empty target for control prompt {p!r}")
    for name in ("target", "new"):
        v = getattr(args, name, None)
        if v is not None and not v.strip():
            raise KneuronsError(f"empty {'target' if name == 'target' else 'new answer'} (--{name})")
    if hasattr(args, "foils") and (args.command != "erase" or args.foils):
        from .attribution.methods import get_score  # a contrastive score needs foils (erase: the relation's
        from .attribution.plan import check_foils   # other answers by default); foils need a contrastive score

        check_foils(get_score(args.score), args.foils)
    if hasattr(args, "locality") and args.update_method != "optimize" and (
            args.locality or any(getattr(args, o) is not None for o in ("opt_steps", "opt_lr", "opt_bound", "kl"))):
        raise KneuronsError("--locality, --opt-steps, --opt-lr, --opt-bound and --kl belong to --update-method optimize")
    factor = getattr(args, "factor", None)
    if args.command == "amplify" and factor is not None and abs(factor) > 100:
        warnings.warn(f"--factor {factor:g} multiplies the neurons' activations by more than 100: expect values "
                      "past the float range (the probabilities then become NaN, which is reported as an error)")


def _undecodable(argv) -> str | None:
    """The first argument that is not valid UTF-8 (the OS hands those over as lone surrogates)."""
    for a in argv:
        try:
            a.encode("utf-8")
        except UnicodeEncodeError:
            return a.encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace")
    return None


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    print(f"kneurons: warning: {' '.join(str(message).split())}", file=sys.stderr)


def main(argv=None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = sys.argv[1:] if argv is None else list(argv)
    with kept_signal_handlers():  # the caller's handlers back at the end (main may run inside another program)
        handle_sigterm()  # SIGTERM/SIGHUP unwind like Ctrl-C (temporaries removed); exit 128 + signal number
        return _main(argv)


def _main(argv: list[str]) -> int:
    old_show = warnings.showwarning
    warnings.showwarning = _one_line_warning
    try:
        bad = _undecodable(argv)
        if bad is not None:
            raise KneuronsError(f"argument is not valid UTF-8: {bad}")
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as exc:  # --help, --version (0) or a refused argument (2, its line already printed)
            return exc.code if isinstance(exc.code, int) else 2
        _precheck(args)
        return args.fn(args)
    except Exception as exc:
        signum = termination_received()
        if signum is not None:  # the signal's exception became this error on its way up: report the signal
            return _signalled(signum)
        if not isinstance(exc, KneuronsError):
            raise
        print(f"kneurons: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        return _signalled(getattr(exc, "signum", signal.SIGINT))
    finally:
        warnings.showwarning = old_show


def _signalled(signum: int) -> int:
    print("kneurons: interrupted" if signum == signal.SIGINT else f"kneurons: terminated (signal {signum})",
          file=sys.stderr)
    return 128 + signum


if __name__ == "__main__":
    sys.exit(main())
