"""``kneurons run``: every experiment of the paper on a PARAREL-layout data set, into a resumable run store.

Phases run in order over all selected facts — assess, locate, suppress, activations, update, erase — and each
fact's (or relation's) result of each phase is stored in one transaction (:mod:`kneurons.experiments.store`).
Rerunning the same command skips what is stored; a different configuration into the same directory is refused.
Everything random is seeded by the run seed and the fact, so a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .. import __version__
from ..attribution import METHODS, SCORES
from ..data.bingrel import bingrel_filename, load_bingrel
from ..data.pararel import Pararel, load_pararel
from ..errors import KneuronsError
from ..interventions import SPACES, weights_digest
from ..neurons import random_neurons
from .activations import bag_activations
from .assess import KNOWN_AMONG, assess_facts
from .common import FactItem, controls_for, fact_items, rng_for, stable_seed
from .erase import erase_experiment
from .locate import locate_fact
from .store import RunStore
from .suppress import intervene_fact
from .update import shared_by_more_than, update_experiment

EXPERIMENTS = ("assess", "locate", "suppress", "activations", "update", "erase")
DEFAULT_ERASE = ["P19", "P27", "P106", "P937"]
#: settings that change results only by floating-point noise (chunking, placement): a run may be resumed with
#: other values (a near-tie — a fact on the edge of "known", a neuron on the edge of the threshold — may then
#: come out differently for the facts computed after the change)
NOT_IDENTITY = ("device", "batch_size", "assess_batch_size")


@dataclass
class RunConfig:
    """Everything that determines a run's results (see ``kneurons run --help`` for each field)."""

    model: str
    data: str
    relations: list[str] | None = None
    facts_per_relation: int = 10
    seed: int = 0
    experiments: list[str] = field(default_factory=lambda: list(EXPERIMENTS))
    max_prompts: int | None = None
    max_candidates: int = 200
    known_fraction: float = 0.5
    known_rank: int = 1
    known_among: str = "vocabulary"
    method: str = "integrated_gradients"
    steps: int = 20
    threshold: float = 0.2
    p: float = 0.7
    min_prompts: int = 3
    adaptive: bool = True
    activation_threshold: float = 0.5
    score: str = "prob"
    control_facts: int = 3
    control_prompts: int = 2
    bingrel_sentences: int = 10
    max_tokens: int = 128
    update_lambda1: float = 1.0
    update_lambda2: float = 8.0
    update_drop_shared: float | None = 0.1
    update_space: str = "embedding"
    ppl_facts: int = 5
    erase_relations: list[str] | None = field(default_factory=lambda: list(DEFAULT_ERASE))
    erase_top_k: int | None = 20
    erase_min_facts: int | None = None
    erase_mode: str = "unk"
    dtype: str | None = None
    device: str | None = None
    batch_size: int | None = None
    assess_batch_size: int = 32
    version: str = __version__

    def __post_init__(self):
        # JSON-stable forms, so that a resumed configuration compares equal to the stored one
        self.data = str(self.data)
        self.model = str(self.model)
        for name in ("relations", "experiments", "erase_relations"):
            v = getattr(self, name)
            if v is not None:
                setattr(self, name, [str(x) for x in ([v] if isinstance(v, str) else v)])

    def check(self) -> None:
        """Every option checked before anything is written (a bad value is a one-line error)."""
        def fraction(name):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not (0 < v <= 1):
                raise KneuronsError(f"{name} must be in (0, 1], got {v!r}")

        def at_least(name, lo, optional=False):
            v = getattr(self, name)
            if v is None and optional:
                return
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise KneuronsError(f"{name} must be an integer >= {lo}, got {v!r}")

        for name in ("threshold", "p", "activation_threshold"):
            fraction(name)
        if self.update_drop_shared is not None:
            fraction("update_drop_shared")
        at_least("steps", 1)
        at_least("facts_per_relation", 1)
        at_least("max_candidates", 1)
        at_least("max_prompts", 2, optional=True)  # refining needs 2 prompts of a fact
        at_least("known_rank", 1)
        at_least("min_prompts", 1)
        at_least("control_facts", 0)
        at_least("control_prompts", 1)
        at_least("bingrel_sentences", 1)
        at_least("max_tokens", 2)
        at_least("ppl_facts", 1)
        at_least("erase_top_k", 1, optional=True)
        at_least("erase_min_facts", 1, optional=True)
        at_least("batch_size", 1, optional=True)
        at_least("assess_batch_size", 1)
        if self.method not in METHODS:
            raise KneuronsError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.score not in SCORES:
            raise KneuronsError(f"score must be one of {', '.join(SCORES)}, got {self.score!r}")
        for name in ("update_lambda1", "update_lambda2"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or v != v or v in (float("inf"), float("-inf")):
                raise KneuronsError(f"{name} must be a finite number, got {v!r}")
        if not self.relations and self.relations is not None:
            raise KneuronsError("relations: give at least one relation id (or none for all)")
        bad = [e for e in self.experiments if e not in EXPERIMENTS]
        if bad:
            raise KneuronsError(f"unknown experiment(s) {', '.join(bad)}; known: {', '.join(EXPERIMENTS)}")
        if int(self.max_candidates) < int(self.facts_per_relation):
            raise KneuronsError("max_candidates must be >= facts_per_relation")
        if self.known_among not in KNOWN_AMONG:
            raise KneuronsError(f"known_among must be one of {', '.join(KNOWN_AMONG)}")
        if not isinstance(self.known_fraction, (int, float)) or not 0 <= self.known_fraction < 1:
            raise KneuronsError(f"known_fraction must be in [0, 1), got {self.known_fraction!r}")
        if self.update_space not in SPACES:
            raise KneuronsError(f"update_space must be one of {', '.join(SPACES)}, got {self.update_space!r}")
        if self.erase_mode not in ("zero", "unk"):
            raise KneuronsError("erase_mode must be 'zero' or 'unk'")
        if self.erase_top_k is None and self.erase_min_facts is None:
            raise KneuronsError("give erase_top_k or erase_min_facts")

    def identity(self) -> dict:
        ident = {k: v for k, v in dataclasses.asdict(self).items() if k not in NOT_IDENTITY}
        if ident["method"] == "integrated_gradients":  # the default: runs stored before the field existed resume
            del ident["method"]
        return ident


def pararel_dirs(data) -> tuple[Path, Path | None, Path | None]:
    """``(pararel dir, lama relations.jsonl or None, bingrel dir or None)`` for ``--data``: a directory holding
    ``pararel/`` (and optionally ``lama/``, ``bingrel/``), or a PARAREL directory itself."""
    d = Path(data)
    if not d.is_dir():
        raise KneuronsError(f"data directory not found: {d}")
    if (d / "pararel" / "query_pairs.json").is_file():
        root, pr = d, d / "pararel"
    elif (d / "query_pairs.json").is_file():
        root, pr = d.parent, d
    else:
        raise KneuronsError(f"{d} holds neither pararel/query_pairs.json nor query_pairs.json")
    lama = root / "lama" / "relations.jsonl"
    bing = root / "bingrel"
    return pr, (lama if lama.is_file() else None), (bing if bing.is_dir() else None)


def _bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="fact", disable=not enabled, dynamic_ncols=True, leave=True)


class Runner:
    """One run: the loaded data, the model, the store. :meth:`run` does all phases (resuming)."""

    def __init__(self, config: RunConfig, out, handle=None, progress: bool = True,
                 log: Callable[[str], None] | None = None, store: RunStore | None = None):
        """``store``: the run store, already opened for ``config`` with :meth:`RunStore.open` (the CLI opens it —
        lock, integrity and configuration checks — before loading the model); default: opened here."""
        config.check()
        self.cfg = config
        self.progress = progress
        self.log = log or (lambda msg: None)
        pr_dir, lama, self.bingrel_dir = pararel_dirs(config.data)
        self.data: Pararel = load_pararel(pr_dir, relations=config.relations,
                                          lama_relations=lama if lama is not None else False)
        if handle is None:
            from ..models import load_model

            handle = load_model(config.model, dtype=config.dtype, device=config.device)
        self.h = handle
        if store is not None and store.config != config.identity():
            raise KneuronsError(f"the run store {store.dir} was opened for another configuration")
        self.store = store if store is not None else RunStore.open(out, config.identity())
        self.store.set_meta("model_info", {"name": handle.name, "model_type": handle.model_type,
                                           "kind": handle.kind, "n_layers": handle.n_layers, "d_ff": handle.d_ff,
                                           "dtype": str(handle.dtype).replace("torch.", ""),
                                           "source": getattr(handle, "source", "")})
        self.store.set_meta("device", str(handle.device))
        self.known: dict[str, list[FactItem]] = {}
        self.sets: dict[str, dict[str, list[tuple[int, int]]]] = {}

    # --------------------------------------------------------------------------------------------- helpers
    def _ia(self):
        return {"batch_size": self.cfg.batch_size} if self.cfg.batch_size else {}

    def _candidates(self, rid: str) -> list[str]:
        return sorted({f.object for f in self.data.relation(rid).facts})

    def _unit(self, experiment: str, unit: str, relation: str, compute, bar=None) -> None:
        if self.store.has(experiment, unit):
            if bar is not None:
                bar.update(1)
            return
        t = time.perf_counter()
        try:
            rows = compute()
        except KneuronsError as exc:  # a fact the method cannot handle is recorded, the run goes on
            rows = [{"error": str(exc)}]
        self.store.put(experiment, unit, relation, rows, time.perf_counter() - t)
        if bar is not None:
            bar.update(1)

    def all_known(self) -> list[FactItem]:
        return [it for items in self.known.values() for it in items]

    # --------------------------------------------------------------------------------------------- phases
    def phase_assess(self) -> None:
        cfg = self.cfg
        causal = self.h.is_causal
        skipped = {}
        bar = _bar(len(self.data.relations) * cfg.facts_per_relation, "assess (known facts)", self.progress)
        for rid in self.data.relations:
            rel = self.data.relation(rid)
            usable = len(rel.causal_templates) if causal else len(rel.templates)
            if usable < 2:
                skipped[rid] = f"{usable} usable template(s); refining needs 2"
                bar.update(cfg.facts_per_relation)
                continue
            order = list(range(len(rel.facts)))
            rng_for(cfg.seed, "facts", rid).shuffle(order)
            order = order[: cfg.max_candidates]
            cands = self._candidates(rid) if cfg.known_among == "candidates" else None
            known: list[FactItem] = []
            for start in range(0, len(order), 16):
                chunk = fact_items(rel, causal, cfg.max_prompts, order[start: start + 16])
                todo = [it for it in chunk if not self.store.has("assess", it.fact_id)]
                if todo:
                    rows = assess_facts(self.h, todo, cfg.known_fraction, cfg.known_rank, cfg.known_among, cands,
                                        batch_size=cfg.assess_batch_size)
                    for it, row in zip(todo, rows):
                        self.store.put("assess", it.fact_id, rid, [row])
                for it in chunk:
                    if self.store.get("assess", it.fact_id)[0]["known"] and len(known) < cfg.facts_per_relation:
                        known.append(it)
                        bar.update(1)
                if len(known) >= cfg.facts_per_relation:
                    break
            bar.update(cfg.facts_per_relation - len(known))
            self.known[rid] = known
        bar.close()
        self.store.set_meta("skipped_relations", skipped)
        self.store.set_meta("known_facts", {rid: [it.fact_id for it in v] for rid, v in self.known.items()})

    def phase_locate(self) -> None:
        cfg = self.cfg
        items = self.all_known()
        bar = _bar(len(items), "locate", self.progress)
        for it in items:
            self._unit("locate", it.fact_id, it.relation, lambda it=it: locate_fact(
                self.h, it, seed=cfg.seed, steps=cfg.steps, threshold=cfg.threshold, p=cfg.p,
                min_prompts=cfg.min_prompts, adaptive=cfg.adaptive, activation_threshold=cfg.activation_threshold,
                score=cfg.score, method=cfg.method, **self._ia()), bar)
        bar.close()
        self._load_sets()

    def _load_sets(self) -> None:
        self.sets = {}
        for it in self.all_known():
            rows = self.store.get("locate", it.fact_id) or []
            self.sets[it.fact_id] = {r["method"]: [tuple(n) for n in r["neurons"]] for r in rows if "method" in r}

    def phase_suppress(self) -> None:
        cfg = self.cfg
        known = self.all_known()
        bar = _bar(len(known), "suppress/amplify", self.progress)
        for it in known:
            sets = self.sets.get(it.fact_id, {})
            self._unit("suppress", it.fact_id, it.relation, lambda it=it, sets=sets: intervene_fact(
                self.h, it, sets, controls_for(it, known, cfg.seed, cfg.control_facts, cfg.control_prompts),
                batch_size=cfg.assess_batch_size), bar)
        bar.close()

    def phase_activations(self) -> None:
        cfg = self.cfg
        if self.bingrel_dir is None:
            self.store.set_meta("activations_skipped", "no bingrel/ directory next to the PARAREL data")
            return
        missing, bad = [], {}
        bar = _bar(len(self.all_known()), "activations (BingRel)", self.progress)
        for rid, items in self.known.items():
            if not (self.bingrel_dir / bingrel_filename(rid)).is_file():
                missing.append(rid)
                bar.update(len(items))
                continue
            if all(self.store.has("activations", it.fact_id) for it in items):
                bar.update(len(items))
                continue
            try:
                bags = load_bingrel(self.bingrel_dir, rid, n_facts=len(self.data.relation(rid).facts))
            except KneuronsError as exc:  # a bad file: recorded, and the run goes on (resumable)
                bad[rid] = str(exc)
                bar.update(len(items))
                continue
            for it in items:
                idx = int(it.fact_id.rsplit(":", 1)[1])
                kn = self.sets.get(it.fact_id, {}).get("kn", [])
                self._unit("activations", it.fact_id, rid, lambda it=it, idx=idx, kn=kn: bag_activations(
                    self.h, it, kn, bags[idx], bags, idx, seed=cfg.seed, n_sentences=cfg.bingrel_sentences,
                    max_tokens=cfg.max_tokens), bar)
        bar.close()
        self.store.set_meta("activations_missing_relations", missing)
        self.store.set_meta("activations_bad_files", bad)

    def _ppl_pairs(self, pool: list[FactItem]) -> list[tuple[str, str]]:
        return [(p, k.object) for k in pool for p in k.prompts[: self.cfg.control_prompts]]

    def phase_update(self) -> None:
        cfg = self.cfg
        known = self.all_known()
        bar = _bar(len(known), "update", self.progress)
        for rid, items in self.known.items():
            kn_sets = {it.fact_id: self.sets.get(it.fact_id, {}).get("kn", []) for it in items}
            drop = shared_by_more_than(kn_sets.values(), cfg.update_drop_shared)
            objects = self._candidates(rid)
            for it in items:
                kn = [n for n in kn_sets[it.fact_id] if n not in drop]
                rnd = self.sets.get(it.fact_id, {}).get("random", [])[: len(kn)]
                others = [o for o in objects if o != it.object]

                def compute(it=it, kn=kn, rnd=rnd, others=others):
                    if not kn:
                        return [{"method": "kn", "n_neurons": 0, "skipped": "no knowledge neurons to edit"}]
                    if not others:
                        raise KneuronsError(f"relation {rid} has no other answer to update to")
                    new = rng_for(cfg.seed, "update", it.fact_id).choice(others)
                    r = rng_for(cfg.seed, "update-controls", it.fact_id)
                    same = [k for k in known if k.relation == rid and k.fact_id != it.fact_id]
                    other = [k for k in known if k.relation != rid]
                    intra = self._ppl_pairs(r.sample(same, min(cfg.ppl_facts, len(same))))
                    inter = self._ppl_pairs(r.sample(other, min(cfg.ppl_facts, len(other))))
                    return update_experiment(self.h, it, new, {"kn": kn, "random": rnd}, intra, inter,
                                             cfg.update_lambda1, cfg.update_lambda2, cfg.assess_batch_size,
                                             space=cfg.update_space)
                self._unit("update", it.fact_id, rid, compute, bar)
        bar.close()

    def phase_erase(self) -> None:
        cfg = self.cfg
        wanted = cfg.erase_relations if cfg.erase_relations is not None else list(self.known)
        chosen = [r for r in wanted if r in self.known]
        self.store.set_meta("erase_not_in_run", [r for r in wanted if r not in self.known])
        bar = _bar(len(chosen), "erase", self.progress)
        bar.unit = "relation"
        rule = {"known_rank": cfg.known_rank, "known_among": cfg.known_among, "batch_size": cfg.assess_batch_size}
        cands = {rid: self._candidates(rid) if cfg.known_among == "candidates" else None for rid in self.known}
        for rid in chosen:
            def compute(rid=rid):
                items = self.known[rid]
                sets = [self.sets.get(it.fact_id, {}).get("kn", []) for it in items]
                if not any(sets):
                    return [{"method": "kn", "n_neurons": 0, "skipped": "no knowledge neurons in the relation"}]
                erased = [(p, it.object, cands[rid]) for it in items for p in it.prompts]
                r = rng_for(cfg.seed, "erase", rid)
                others = []
                for orid, oitems in self.known.items():
                    if orid != rid:
                        for it in r.sample(oitems, min(cfg.ppl_facts, len(oitems))):
                            others += [(p, it.object, cands[orid]) for p in it.prompts]
                seed = stable_seed(cfg.seed, "erase-random", rid)
                return erase_experiment(self.h, sets, erased, others,
                                        random_like=lambda n, exclude: random_neurons(self.h, n, seed=seed,
                                                                                       exclude=exclude).neurons,
                                        top_k=cfg.erase_top_k, min_facts=cfg.erase_min_facts, mode=cfg.erase_mode,
                                        **rule)
            self._unit("erase", rid, rid, compute, bar)
        bar.close()

    # --------------------------------------------------------------------------------------------- all
    def run(self) -> RunStore:
        t0 = time.time()
        digest = weights_digest(self.h.model)
        stored = self.store.meta("weights_digest")
        if stored is not None and stored != digest:
            raise KneuronsError(f"{self.store.dir} was run with other weights of {self.cfg.model!r} (SHA-256 "
                                f"{stored[:12]}…, now {digest[:12]}…); use another --out")
        self.store.set_meta("weights_digest", digest)
        self.phase_assess()
        n_known = len(self.all_known())
        self.log(f"{n_known} known facts in {len(self.known)} relations")
        order = [e for e in EXPERIMENTS[1:] if e in self.cfg.experiments]
        if order and "locate" not in order and any(e in order for e in ("suppress", "activations", "update", "erase")):
            order.insert(0, "locate")  # the later experiments need the neurons
        for name in order:
            if name == "locate":
                self.phase_locate()
            else:
                if not self.sets:
                    self._load_sets()
                getattr(self, f"phase_{name}")()
        if weights_digest(self.h.model) != digest:  # every edit must have been reverted
            raise KneuronsError("model weights differ after the run: an edit was not reverted (a bug)")
        self.store.set_meta("weights_restored", True)
        self.store.set_meta("last_run_seconds", time.time() - t0)
        self.store.set_meta("complete", True)
        return self.store


def run(config: RunConfig, out, handle=None, progress: bool = True, log=None) -> RunStore:
    """Run (or resume) every configured experiment; returns the :class:`RunStore`."""
    return Runner(config, out, handle=handle, progress=progress, log=log).run()
