"""``kneurons run``: every experiment of the paper on a PARAREL-layout data set, into a resumable run store.

Phases run in order over all selected facts — assess, locate, suppress, activations, update, erase — and each
fact's (or relation's) result of each phase is stored in one transaction (:mod:`kneurons.experiments.store`).
Rerunning the same command skips what is stored; a different configuration into the same directory is refused.
Everything random is seeded by the run seed and the fact, so a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .. import __version__
from ..attribution import MAX_STEPS, METHODS, SCORES
from ..data.pararel import Pararel, load_pararel
from ..errors import KneuronsError
from ..interventions import SPACES, UPDATE_METHODS, weights_digest
from ..models import DEFAULT_MODEL
from ..options import check_fields, option
from . import registry
from .assess import KNOWN_AMONG
from .common import FactItem
from .store import RunStore
from .units import InProcess, Outcome, Task

DEFAULT_ERASE = ["P19", "P27", "P106", "P937"]
#: settings that change results only by floating-point noise (chunking, placement): a run may be resumed with
#: other values (a near-tie — a fact on the edge of "known", a neuron on the edge of the threshold — may then
#: come out differently for the facts computed after the change)
NOT_IDENTITY = ("device", "batch_size", "assess_batch_size")


@dataclass
class RunConfig:
    """Everything that determines a run's results. Each field declares its help, range and command-line flag
    once (:func:`kneurons.options.option`): ``kneurons run``'s options are generated from these fields and
    :meth:`check` validates with the same rules."""

    model: str = option(help="embedded name (smollm2-135m, gemma-3-270m), local directory, .gguf file or hub id",
                        short="-m", cli_default=DEFAULT_MODEL)
    data: str = option(help="directory holding pararel/ (and lama/, bingrel/), or a PARAREL directory "
                            "(query_pairs.json + patterns/)")
    relations: list[str] | None = option(None, many=True, help="relation ids (default: all)")
    facts_per_relation: int = option(10, lo=1, help="known facts per relation")
    seed: int = option(0, help="seed of every random choice (fact order, controls, random neurons)")
    experiments: list[str] = option(default_factory=registry.names, many=True, choices=registry.names,
                                    help="experiments to run (with those they need)")
    max_prompts: int | None = option(None, lo=2, help="use at most this many templates per fact")
    max_candidates: int = option(200, lo=1, help="facts assessed per relation while looking for known ones")
    known_fraction: float = option(0.5, lo=0, hi=1, hi_open=True,
                                   help="known = right on more than this fraction of the fact's prompts")
    known_rank: int = option(1, lo=1, help="right = rank <= this")
    known_among: str = option("vocabulary", choices=KNOWN_AMONG,
                              help="rank over the whole vocabulary, or among the relation's answers (LAMA/PARAREL "
                                   "style)")
    method: str = option("integrated_gradients", choices=lambda: list(METHODS),
                         help="how knowledge neurons are found (kneurons.attribution.METHODS)")
    steps: int = option(20, lo=1, hi=MAX_STEPS, help="integration steps m")
    threshold: float = option(0.2, lo=0, hi=1, lo_open=True, help="coarse threshold t x max")
    p: float = option(0.7, lo=0, hi=1, lo_open=True, help="sharing fraction p")
    min_prompts: int = option(3, lo=1, help="a refined neuron is coarse in at least this many prompts")
    adaptive: bool = option(True, negate="fixed-p", help="do not adapt p to get 2-5 neurons per fact")
    activation_threshold: float = option(0.5, lo=0, hi=1, lo_open=True,
                                         help="the activation baseline's threshold x max activation")
    score: str = option("prob", choices=lambda: list(SCORES),
                        help="what is attributed: prob (the paper's), logprob, or contrastive (log P(answer) - log "
                             "mean P(other answers of the relation): neurons of the fact, not of its relation)")
    relation_q: float = option(0.3, lo=0, hi=1, hi_open=True,
                               help="suppress: relation neurons = knowledge neurons of more than this fraction of "
                                    "the relation's known facts; the fact-specific set leaves them out")
    control_facts: int = option(3, lo=0, help="suppress: control facts of the same and of other relations, each")
    control_prompts: int = option(2, lo=1, help="prompts per control fact (suppress, update perplexities)")
    bingrel_sentences: int = option(10, lo=1, help="activations: sentences per bag")
    max_tokens: int = option(128, lo=2, help="activations: truncate sentences to this many tokens")
    update_lambda1: float = option(1.0, flag="--lambda1", help="update: lambda1 (how much of t is removed)")
    update_lambda2: float = option(8.0, flag="--lambda2", help="update: lambda2 (how much of t' is added)")
    update_drop_shared: float | None = option(0.1, lo=0, hi=1, lo_open=True, zero_means_none=True,
                                              help="update: drop neurons shared by more than this fraction of the "
                                                   "relation's facts (0: keep all)")
    update_space: str = option("embedding", choices=SPACES,
                               help="update: the paper's unembedding rows, the residual directions the output head "
                                    "maps to the targets (head), or the logit gradient at the fact's prompt "
                                    "(gradient)")
    update_method: str = option("rule", choices=UPDATE_METHODS,
                                help="update: the authors' rule (--lambda1/--lambda2/--update-space) or optimize (gradient "
                                     "steps on the neurons' value slots only, bounded, with a KL term; "
                                     "kneurons.update_fact)")
    ppl_facts: int = option(5, lo=1, help="update/erase: facts (of the same and of other relations) whose perplexity is measured")
    erase_relations: list[str] | None = option(default_factory=lambda: list(DEFAULT_ERASE), many=True,
                                               help="relations to erase")
    erase_top_k: int | None = option(20, lo=1, zero_means_none=True,
                                     help="erase the k most shared neurons (0: use --erase-min-facts)")
    erase_min_facts: int | None = option(None, lo=1, help="or erase neurons shared by at least this many facts")
    erase_mode: str = option("unk", choices=("unk", "zero"), help="erase: value slots become [UNK]'s vector or 0")
    dtype: str | None = option(None, choices=("float32", "float64", "bfloat16", "float16"),
                               help="float32 (default), float64, bfloat16, float16")
    device: str | None = option(None, help="cpu (default), cuda, cuda:N or mps")
    batch_size: int | None = option(None, lo=1, help="rows per forward/backward pass (memory budget; default: about "
                                                     "2048 row-positions on CPU, within half the available memory)")
    assess_batch_size: int = option(32, lo=1, help="prompts per scoring batch")
    version: str = option(__version__, cli=False, help="the kneurons version that made the run")

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
        check_fields(self)
        if self.max_candidates < self.facts_per_relation:
            raise KneuronsError("max_candidates must be >= facts_per_relation")
        if self.erase_top_k is None and self.erase_min_facts is None:
            raise KneuronsError("give erase_top_k or erase_min_facts")

    def identity(self) -> dict:
        ident = {k: v for k, v in dataclasses.asdict(self).items() if k not in NOT_IDENTITY}
        if ident["method"] == "integrated_gradients":  # the default: runs stored before the field existed resume
            del ident["method"]
        for name, default in (("relation_q", 0.3), ("update_method", "rule")):  # likewise
            if ident[name] == default:
                del ident[name]
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


class Runner:
    """One run: the loaded data, the model, the store — and what the experiments share while it runs (the known
    facts, their neuron sets). :meth:`run` runs the configured experiments of the registry in order, each storing
    its units through :meth:`unit` (stored units are skipped, so a rerun resumes)."""

    def __init__(self, config: RunConfig, out, handle=None, progress: bool = True,
                 log: Callable[[str], None] | None = None, store: RunStore | None = None, executor=None):
        """``store``: the run store, already opened for ``config`` with :meth:`RunStore.open` (the CLI opens it —
        lock, integrity and configuration checks — before loading the model); default: opened here.
        ``executor``: where units are computed (:mod:`kneurons.experiments.units`; default: in this process, on
        ``handle``; :class:`~kneurons.experiments.ray_pool.RayPool`: a pool of Ray workers)."""
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
        self.executor = executor if executor is not None else InProcess()
        if store is not None and store.config != config.identity():
            raise KneuronsError(f"the run store {store.dir} was opened for another configuration")
        self.store = store if store is not None else RunStore.open(out, config.identity())
        self.store.set_meta("model_info", handle.info())
        self.store.set_meta("device", str(handle.device))
        self.known: dict[str, list[FactItem]] = {}  # relation -> its known facts (set by the assess experiment)
        self.sets: dict[str, dict[str, list[tuple[int, int]]]] = {}  # fact -> method -> neurons (from locate)

    # ------------------------------------------------------------------------------------ for the experiments
    def bar(self, total: int, desc: str, unit: str = "fact"):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, disable=not self.progress, dynamic_ncols=True, leave=True)

    def candidates(self, rid: str) -> list[str]:
        """The relation's possible answers: its facts' objects."""
        return sorted({f.object for f in self.data.relation(rid).facts})

    def submit(self, task: Task, done: Callable[[Outcome], None]) -> None:
        """Compute ``task`` with the run's executor; ``done(outcome)`` runs here, in submission order (at once
        in process; when the result is back with a pool — call :meth:`join` before reading what it stores)."""
        self.executor.submit(task, done)

    def join(self) -> None:
        """Wait until every submitted task's callback has run."""
        self.executor.join()

    def unit(self, experiment: str, unit: str, relation: str, task: Task, bar=None) -> None:
        """Store the rows of ``task`` (computed by the executor on its model) as ``experiment``'s result for
        ``unit`` unless it is stored already. A unit the method cannot handle (a one-line :class:`KneuronsError`)
        is stored as its error; the run goes on."""
        if self.store.has(experiment, unit):
            if bar is not None:
                bar.update(1)
            return

        def store(outcome: Outcome) -> None:
            rows = outcome.rows if outcome.error is None else [{"error": outcome.error}]
            self.store.put(experiment, unit, relation, rows, outcome.seconds)
            if bar is not None:
                bar.update(1)

        self.submit(dataclasses.replace(task, label=task.label or f"{experiment} {unit}"), store)

    def all_known(self) -> list[FactItem]:
        return [it for items in self.known.values() for it in items]

    def load_sets(self) -> None:
        """The located neuron sets of the known facts, from the store."""
        self.sets = {}
        for it in self.all_known():
            rows = self.store.get("locate", it.fact_id) or []
            self.sets[it.fact_id] = {r["method"]: [tuple(n) for n in r["neurons"]] for r in rows if "method" in r}

    def ppl_pairs(self, pool: list[FactItem]) -> list[tuple[str, str]]:
        return [(p, k.object) for k in pool for p in k.prompts[: self.cfg.control_prompts]]

    # --------------------------------------------------------------------------------------------- all
    def run(self) -> RunStore:
        t0 = time.time()
        digest = weights_digest(self.h.model)
        stored = self.store.meta("weights_digest")
        if stored is not None and stored != digest:
            raise KneuronsError(f"{self.store.dir} was run with other weights of {self.cfg.model!r} (SHA-256 "
                                f"{stored[:12]}…, now {digest[:12]}…); use another --out")
        self.store.set_meta("weights_digest", digest)
        try:
            self.executor.start(self.h, self.cfg, digest, log=self.log)
            self.store.set_meta("device", self.executor.device())  # where the units are computed
            self.store.set_meta("executor", self.executor.description)
            for experiment in registry.plan(self.cfg.experiments):
                experiment.run(self)
                self.join()
        finally:
            self.executor.close()
        if weights_digest(self.h.model) != digest:  # every edit must have been reverted
            raise KneuronsError("model weights differ after the run: an edit was not reverted (a bug)")
        self.store.set_meta("weights_restored", True)
        self.store.set_meta("last_run_seconds", time.time() - t0)
        self.store.set_meta("complete", True)
        return self.store


def run(config: RunConfig, out, handle=None, progress: bool = True, log=None, executor=None) -> RunStore:
    """Run (or resume) every configured experiment; returns the :class:`RunStore`. ``executor``: where units
    are computed (default: in this process; a :class:`~kneurons.experiments.ray_pool.RayPool` for Ray)."""
    return Runner(config, out, handle=handle, progress=progress, log=log, executor=executor).run()
