"""The explorer's web application: a thin JSON API over the library, and one static page.

Every endpoint calls the library (:func:`kneurons.assess`, :func:`kneurons.locate`, :func:`kneurons.attribute`,
:func:`kneurons.explain_neurons`, :func:`kneurons.measure_intervention`, :func:`kneurons.update_fact` /
:meth:`kneurons.Edit.revert`, :func:`kneurons.interventions.weights_digest`); nothing is computed here that the
library computes. One model per server; every use of it holds one lock, so requests are serialised: an attribution
runs as a background job holding the lock (its progress is polled at ``/api/jobs/{id}``), a predict waits for it,
and a second attribution is refused while one runs. Bad input is a 400 answer ``{"error": "<one line>"}``; the
server stays up. The server reads and writes no path that a request names: neuron sets come and go as JSON bodies,
and runs are listed from the directory given on the command line only.
"""

from __future__ import annotations

import base64
import inspect
import json
import math
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Optional

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field

from ..errors import KneuronsError

STATIC = Path(__file__).parent / "static"

#: limits of one request (oversized requests are refused with a message)
LIMITS = {"body_bytes": 2 << 20, "prompts": 16, "prompt_chars": 2000, "controls": 32, "neurons": 2000,
          "top_k": 100, "steps": 200, "factor": 100.0, "lambda": 1000.0}

#: the groups a control prompt may belong to (as :func:`kneurons.measure_intervention` reads them)
CONTROL_GROUPS = ("same_relation", "other_relation")


def _b64(t) -> str:
    import numpy as np

    return base64.b64encode(np.ascontiguousarray(t.detach().float().cpu().numpy(), dtype="<f4").tobytes()).decode()


def _num(x: float) -> float | None:
    """JSON has no NaN/inf: those become null."""
    x = float(x)
    return x if math.isfinite(x) else None


class Job:
    """One attribution running in a background thread (``state``: running, done or error)."""

    def __init__(self, total: int, what: str):
        self.id = uuid.uuid4().hex[:12]
        self.total = total
        self.what = what
        self.done = 0
        self.state = "queued"
        self.started = time.time()
        self.finished: float | None = None
        self.result = None
        self.error: str | None = None
        self.beats = 0  # blocks seen forward and backward (kneurons.hooks.observe_blocks)
        self.stage: dict | None = None

    def progress(self, n: int) -> None:
        self.done += int(n)

    def heartbeat(self, layer: int, direction: str) -> None:
        self.beats += 1
        self.stage = {"layer": layer, "direction": direction}

    def as_dict(self, with_result: bool = True) -> dict:
        end = self.finished or time.time()
        out = {"id": self.id, "state": self.state, "done": self.done, "total": self.total, "what": self.what,
               "elapsed": round(end - self.started, 3), "beats": self.beats, "stage": self.stage}
        if self.error:
            out["error"] = self.error
        if with_result and self.state == "done":
            out["result"] = self.result
        return out


class Explorer:
    """The server's state: the model handle, its lock, the applied edit, the attribution jobs."""

    def __init__(self, handle, runs_dir: str | Path | None = None):
        from ..interventions import weights_digest

        self.handle = handle
        self.lock = threading.Lock()  # held by every use of the model
        self.jobs_lock = threading.Lock()  # held while the jobs are looked at or changed
        self.runs_dir = Path(runs_dir).resolve() if runs_dir is not None else None
        self.original_digest = weights_digest(handle.model)
        self.edit = None
        self.jobs: dict[str, Job] = {}
        self.running: Job | None = None
        self._fact_acts = None
        self.last_check: dict | None = None

    # ------------------------------------------------------------------ helpers (callers hold the lock)
    def fact_acts(self):
        """The built-in facts' blank activations, computed once (for "most active on")."""
        if self._fact_acts is None:
            from ..explain import fact_activations, fact_prompts

            items = fact_prompts(self.handle)
            self._fact_acts = (items, fact_activations(self.handle, items))
        return self._fact_acts

    def state(self) -> dict:
        e = self.edit
        return {"edited": e is not None,
                "edit": None if e is None else {**{k: _jsonable(v) for k, v in e.info.items()}, "kind": e.kind,
                                                "slots": len(e.neurons)},
                "original_digest": self.original_digest, "last_check": self.last_check,
                "job": self.running.as_dict(False) if self.running else None}


def _jsonable(v):
    if isinstance(v, (str, int, bool)) or v is None:
        return v
    if isinstance(v, float):
        return _num(v)
    return str(v)


def default_fact(handle):
    """A built-in fact to start with (France → Paris where the model can be asked it) and control prompts of the
    same and of other relations; empty where the tokenizer cannot spell the built-in facts (tiny test models)."""
    from ..data import load_facts
    from ..prompts import encode

    def askable(p, t):
        try:
            encode(handle, p, t)
            return True
        except KneuronsError:
            return False

    facts = load_facts()
    for rel in facts.relations:
        for f in rel.facts:
            prompts = [p for p in rel.prompts(f, causal=handle.is_causal) if askable(p, f.object)]
            if len(prompts) < 3:
                continue
            controls = []
            for g in rel.facts:
                if g != f and len([c for c in controls if c["group"] == "same_relation"]) < 2:
                    ps = [p for p in rel.prompts(g, causal=handle.is_causal) if askable(p, g.object)]
                    if ps:
                        controls.append({"group": "same_relation", "prompt": ps[0], "target": g.object})
            for other in facts.relations:
                if other is rel or len(controls) >= 4:
                    continue
                for g in other.facts[:1]:
                    ps = [p for p in other.prompts(g, causal=handle.is_causal) if askable(p, g.object)]
                    if ps:
                        controls.append({"group": "other_relation", "prompt": ps[0], "target": g.object})
            return {"prompts": prompts[:4], "target": f.object, "controls": controls}
    return {"prompts": [], "target": "", "controls": []}


# ---------------------------------------------------------------------------------- request bodies
class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Control(Body):
    group: str
    prompt: str = Field(max_length=LIMITS["prompt_chars"])
    target: str = Field(max_length=200)


class PredictIn(Body):
    prompt: str = Field(max_length=LIMITS["prompt_chars"])
    target: Optional[str] = Field(None, max_length=200)  # omitted: the top-k only
    top_k: int = Field(10, ge=1, le=LIMITS["top_k"])


class LocateIn(Body):
    prompts: list[str] = Field(min_length=1, max_length=LIMITS["prompts"])
    target: str = Field(max_length=200)
    method: str = "integrated_gradients"
    steps: int = Field(20, ge=1, le=LIMITS["steps"])
    score: str = "prob"
    foils: list[str] = Field([], max_length=LIMITS["prompts"] * 20)  # score "contrastive": the relation's other answers
    threshold: Optional[float] = None
    p: float = 0.7
    min_prompts: int = Field(3, ge=1, le=LIMITS["prompts"])
    adaptive: bool = True


class NeuronsIn(Body):
    neurons: list[list[int]] = Field(min_length=1, max_length=LIMITS["neurons"])


class ExplainIn(NeuronsIn):
    prompt: Optional[str] = Field(None, max_length=LIMITS["prompt_chars"])
    target: Optional[str] = Field(None, max_length=200)
    top_k: int = Field(10, ge=1, le=LIMITS["top_k"])
    top_facts: int = Field(3, ge=0, le=20)


class InterveneIn(NeuronsIn):
    prompts: list[str] = Field(min_length=1, max_length=LIMITS["prompts"])
    target: str = Field(max_length=200)
    factor: float
    controls: list[Control] = Field([], max_length=LIMITS["controls"])
    top_k: int = Field(5, ge=1, le=LIMITS["top_k"])


class UpdateIn(NeuronsIn):
    prompts: list[str] = Field(min_length=1, max_length=LIMITS["prompts"])
    target: str = Field(max_length=200)
    new: str = Field(max_length=200)
    controls: list[Control] = Field([], max_length=LIMITS["controls"])
    lambda1: float = 1.0
    lambda2: float = 8.0
    space: str = "embedding"
    method: Optional[str] = None


def create_app(handle, runs_dir: str | Path | None = None):
    """The FastAPI application serving ``handle`` (a :class:`kneurons.ModelHandle`); ``runs_dir``: a directory of
    runs (from ``kneurons run``) to list and open the reports of."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse
    from fastapi.staticfiles import StaticFiles
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from .. import __version__
    from ..attribution import METHODS, SCORES
    from .. import interventions

    ex = Explorer(handle, runs_dir)
    info_fact = default_fact(handle)
    app = FastAPI(title="kneurons explorer", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.explorer = ex

    def err(status: int, message: str):
        return JSONResponse({"error": " ".join(str(message).split())}, status_code=status)

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        size = request.headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > LIMITS["body_bytes"]):
            if size.isdigit() and int(size) <= 32 * LIMITS["body_bytes"]:
                async for _ in request.stream():  # read (and drop) it, so that the client sees the answer
                    pass
            return err(413, f"request too large: {size} bytes (at most {LIMITS['body_bytes']})")
        return await call_next(request)

    @app.exception_handler(KneuronsError)
    async def on_kneurons_error(request, exc):
        return err(400, str(exc))

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request, exc):
        e = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        return err(400, f"{where}: {e.get('msg')}" if where else e.get("msg"))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request, exc):
        return err(exc.status_code, exc.detail)

    @app.exception_handler(Exception)
    async def on_error(request, exc):  # a bug: answered in one line, the server stays up
        return err(500, f"internal error ({type(exc).__name__}: {exc})")

    def check_prompts(prompts, target) -> None:
        """Blanks and targets checked before the lock is taken (the tokenizer only)."""
        from ..prompts import encode

        for p in prompts:
            encode(handle, p, target)

    def check_controls(controls) -> list[tuple[str, str, str]]:
        out = []
        for c in controls:
            if c.group not in CONTROL_GROUPS:
                raise KneuronsError(f"control group must be one of {', '.join(CONTROL_GROUPS)}, got {c.group!r}")
            check_prompts([c.prompt], c.target)
            out.append((c.group, c.prompt, c.target))
        return out

    def check_neuron_list(neurons):
        from ..neurons import check_neurons

        return check_neurons(handle, neurons)

    def check_number(name: str, v: float, bound: float) -> float:
        if not math.isfinite(v) or abs(v) > bound:
            raise KneuronsError(f"{name} must be a finite number from -{bound:g} to {bound:g}, got {v!r}")
        return v

    def top_list(a) -> list[dict]:
        return [{"token": p.token, "prob": p.prob} for p in a.top]

    def assessed(a) -> dict:
        return {"prompt": a.prompt, "target": a.target, "prob": a.prob, "rank": a.rank, "correct": a.correct,
                "top": top_list(a)}

    # ------------------------------------------------------------------------------ pages
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    # ------------------------------------------------------------------------------ API
    @app.get("/api/info")
    def info():
        """What the page builds its forms from: the model, the library's methods, scores, update spaces and
        methods (one list each, from the library's own constants), defaults and limits."""
        h = handle
        update_params = inspect.signature(interventions.update_fact).parameters
        return {"version": __version__,
                "model": {"name": h.name, "type": h.model_type, "kind": h.kind, "n_layers": h.n_layers,
                          "d_ff": h.d_ff, "dtype": str(h.dtype).replace("torch.", ""), "device": str(h.device)},
                "methods": [{"name": m.name, "kind": m.kind, "description": m.description,
                             "threshold": m.threshold} for m in METHODS.values()],
                "scores": [{"name": s.name, "description": s.description} for s in SCORES.values()],
                "spaces": list(interventions.SPACES),
                "update_methods": list(getattr(interventions, "UPDATE_METHODS", ())),
                "update_takes": [k for k in ("space", "method", "lambda1", "lambda2") if k in update_params],
                "control_groups": list(CONTROL_GROUPS), "limits": LIMITS,
                "locate_defaults": {"steps": 20, "p": 0.7, "min_prompts": 3, "adaptive": True},
                "example": info_fact, "runs": ex.runs_dir is not None}

    @app.get("/api/state")
    def state():
        return ex.state()

    @app.post("/api/predict")
    def predict(body: PredictIn):
        from ..prompts import assess

        target = body.target if body.target is not None else _one_token_answer(handle, body.prompt)
        check_prompts([body.prompt], target)
        with ex.lock:
            a = assess(handle, [body.prompt], target, top_k=body.top_k)[0]
        out = {**assessed(a), "edited": ex.edit is not None}
        if body.target is None:  # the top-k at the blank only: nothing of the stand-in answer is shown
            out.update(target=None, prob=None, rank=None, correct=None)
        return out

    @app.post("/api/locate")
    def locate_start(body: LocateIn):
        from ..attribution import get_method, get_score, rows_per_prompt
        from ..neurons import _check_fraction

        from ..attribution.plan import check_foils

        m = get_method(body.method)
        check_foils(get_score(body.score), body.foils)
        _check_fraction("threshold", body.threshold)
        _check_fraction("p", body.p)
        prompts = [p for p in body.prompts]
        check_prompts(prompts, body.target)
        total = rows_per_prompt(handle, body.steps, method=m.name) * len(prompts)
        job = Job(total, f"{m.name} of {body.target!r} over {len(prompts)} prompt(s)")
        with ex.jobs_lock:  # refuse a second attribution while one is queued or runs
            if ex.running is not None and ex.running.state in ("queued", "running"):
                return err(409, f"an attribution is already running ({ex.running.what}, "
                                f"{ex.running.as_dict(False)['elapsed']:.0f} s so far); wait for it to finish")
            ex.running = job
            ex.jobs = {k: j for k, j in ex.jobs.items() if j.state in ("queued", "running")}  # keep the newest
            ex.jobs[job.id] = job
        threading.Thread(target=run_locate, args=(job, body, prompts), daemon=True,
                         name=f"kneurons-locate-{job.id}").start()
        return job.as_dict()

    def run_locate(job: Job, body, prompts):
        try:
            with ex.lock:
                job.state = "running"
                job.started = time.time()
                job.result = locate_result(body, prompts, job)
            job.state = "done"
        except KneuronsError as exc:
            job.error, job.state = " ".join(str(exc).split()), "error"
        except Exception as exc:  # a bug: reported in the job, the server stays up
            job.error, job.state = f"internal error ({type(exc).__name__}: {exc})", "error"
        finally:
            job.finished = time.time()

    def locate_result(body, prompts, job) -> dict:
        from ..hooks import observe_blocks
        from ..neurons import locate

        with observe_blocks(handle.arch, job.heartbeat):  # life between the engine's per-pass progress calls
            if len(prompts) == 1:  # one prompt: its coarse neurons (locate refines over paraphrases, >= 2)
                kn = _one_prompt(handle, prompts[0], body, job.progress)
            else:
                kn = locate(handle, prompts, body.target, steps=body.steps, threshold=body.threshold, p=body.p,
                            min_prompts=body.min_prompts, adaptive=body.adaptive, score=body.score,
                            progress=job.progress, method=body.method, foils=body.foils or None)
        return neuron_set(kn)

    def neuron_set(kn) -> dict:
        """A neuron set for the page: the library's JSON, its table, and the heatmap when attributions exist."""
        df = kn.to_dataframe()
        out = {"set": kn.as_dict(), "table": json.loads(df.to_json(orient="records")) if len(df) else [],
               "heatmap": None}
        attrs = getattr(kn, "attributions", None)
        if attrs:
            import torch

            scores = torch.stack([a.scores.float() for a in attrs]).mean(0)
            acts = torch.stack([a.activations.float() for a in attrs]).mean(0)
            out["heatmap"] = {"n_layers": int(scores.shape[0]), "d_ff": int(scores.shape[1]),
                              "scores": _b64(scores), "activations": _b64(acts),
                              "max_abs": _num(scores.abs().max()), "prompts": len(attrs),
                              "method": kn.method, "score": kn.params.get("score")}
            for row in out["table"]:
                row["activation"] = _num(acts[row["layer"], row["neuron"]])
        return out

    @app.get("/api/jobs/{job_id}")
    def job_status(job_id: str):
        job = ex.jobs.get(job_id)
        if job is None:
            return err(404, f"no such job: {job_id!r}")
        return job.as_dict()

    @app.post("/api/explain")
    def explain(body: ExplainIn):
        from ..explain import explain_neurons

        nrns = check_neuron_list(body.neurons)
        if body.prompt is not None:
            if body.target is None:
                raise KneuronsError("explaining activations on a prompt needs its target")
            check_prompts([body.prompt], body.target)
        with ex.lock:
            df = explain_neurons(handle, nrns, top_k=body.top_k, prompt=body.prompt, target=body.target,
                                 top_facts=body.top_facts, fact_acts=ex.fact_acts() if body.top_facts else None)
        rows = json.loads(df.to_json(orient="records"))
        return {"rows": rows}

    @app.post("/api/intervene")
    def intervene(body: InterveneIn):
        from ..interventions import Intervention, measure_intervention
        from ..prompts import assess

        nrns = check_neuron_list(body.neurons)
        factor = check_number("factor", body.factor, LIMITS["factor"])
        check_prompts(body.prompts, body.target)
        controls = check_controls(body.controls)
        with ex.lock:
            res = measure_intervention(handle, nrns, body.prompts, body.target, factor, controls)
            top_before = assess(handle, body.prompts[:1], body.target, top_k=body.top_k)[0]
            with Intervention(handle, nrns, factor):
                top_after = assess(handle, body.prompts[:1], body.target, top_k=body.top_k)[0]
        rows = [{k: (_num(v) if isinstance(v, float) else v) for k, v in r.items()} for r in res.rows]
        return {"factor": factor, "neurons": [list(n) for n in res.neurons], "rows": rows,
                "summary": {k: _num(v) for k, v in res.summary().items()},
                "before": assessed(top_before), "after": assessed(top_after)}

    def update_scores(prompts, old, new, controls):
        from ..experiments.update import measure_update
        from ..prompts import assess

        m = measure_update(handle, prompts, old, new, details=True)
        rows = [{"prompt": p, "p_old": a.prob, "p_new": b.prob, "rank_new": b.rank, "top": top_list(a)}
                for p, a, b in zip(prompts, m["old"], m["new"])]
        ctrl = assess(handle, [p for _, p, _ in controls], [t for _, _, t in controls]) if controls else []
        crow = [{"group": g, "prompt": p, "target": t, "prob": a.prob, "rank": a.rank}
                for (g, p, t), a in zip(controls, ctrl)]
        return {"prompts": rows, "controls": crow, "success1": m["success1"], "success5": m["success5"],
                "p_old": m["p_old"], "p_new": m["p_new"]}

    @app.post("/api/update")
    def update(body: UpdateIn):
        from ..interventions import update_fact

        nrns = check_neuron_list(body.neurons)
        check_prompts(body.prompts, body.target)
        check_prompts(body.prompts[:1], body.new)
        controls = check_controls(body.controls)
        kwargs = {"lambda1": check_number("lambda1", body.lambda1, LIMITS["lambda"]),
                  "lambda2": check_number("lambda2", body.lambda2, LIMITS["lambda"])}
        if body.space not in interventions.SPACES:
            raise KneuronsError(f"space must be one of {', '.join(interventions.SPACES)}, got {body.space!r}")
        kwargs["space"] = body.space
        methods = getattr(interventions, "UPDATE_METHODS", ())
        if body.method is not None:
            if body.method not in methods:
                raise KneuronsError(f"update method must be one of {', '.join(methods) or '(none)'}, "
                                    f"got {body.method!r}")
            kwargs["method"] = body.method
        with ex.lock:
            if ex.edit is not None:
                raise KneuronsError("the served model is already edited: revert that edit first")
            before = update_scores(body.prompts, body.target, body.new, controls)
            edit = update_fact(handle, nrns, body.target, body.new, prompt=body.prompts[0], **kwargs)
            try:
                after = update_scores(body.prompts, body.target, body.new, controls)
            except BaseException:  # the model never stays edited by a failed request
                edit.revert()
                raise
            ex.edit = edit
            ex.last_check = None
        return {"before": {k: _clean(v) for k, v in before.items()}, "after": {k: _clean(v) for k, v in after.items()},
                **ex.state()}

    @app.post("/api/revert")
    def revert():
        with ex.lock:
            if ex.edit is None:
                raise KneuronsError("the served model is not edited: nothing to revert")
            ex.edit.revert()
            ex.edit = None
            digest = interventions.weights_digest(handle.model)
            ex.last_check = {"digest": digest, "identical": digest == ex.original_digest}
        if not ex.last_check["identical"]:
            return err(500, "the edit was not reverted bit-exactly (a bug: please report it)")
        return ex.state()

    @app.post("/api/neurons/load")
    async def load_neurons(request: Request):
        """A neuron set uploaded as the library's JSON (the body), read by :meth:`KnowledgeNeurons.load` from a
        private temporary file (the server reads no path the page names)."""
        from ..neurons import KnowledgeNeurons

        raw = await request.body()
        if not raw.strip():
            raise KneuronsError("empty neuron file")
        with tempfile.TemporaryDirectory(prefix="kneurons-upload-") as d:
            f = Path(d) / "uploaded.json"
            f.write_bytes(raw)
            kn = KnowledgeNeurons.load(f)
        check_neuron_list(kn)
        return neuron_set(kn)

    # ------------------------------------------------------------------------------ runs
    def run_dirs() -> list[Path]:
        from ..experiments.store import DATABASE

        if ex.runs_dir is None:
            return []
        return sorted(d for d in ex.runs_dir.iterdir() if d.is_dir() and (d / DATABASE).is_file())

    @app.get("/api/runs")
    def runs():
        if ex.runs_dir is None:
            return {"runs_dir": None, "runs": []}
        from ..report.render import REPORT

        out = []
        for d in run_dirs():
            cfg = {}
            try:
                cfg = json.loads((d / "config.json").read_text(encoding="utf-8"))
            except (OSError, ValueError):
                pass
            report = (d / "report" / REPORT).is_file()
            out.append({"name": d.name, "model": cfg.get("config", cfg).get("model") if isinstance(cfg, dict) else None,
                        "report": f"/runs/{d.name}/report/{REPORT}" if report else None,
                        "modified": (d / "results.sqlite").stat().st_mtime})
        return {"runs_dir": ex.runs_dir.name, "runs": out}

    @app.get("/runs/{name}/report/{path:path}", include_in_schema=False)
    def run_report(name: str, path: str):
        dirs = {d.name: d for d in run_dirs()}
        if name not in dirs:
            return err(404, f"no run named {name!r}")
        base = (dirs[name] / "report").resolve()
        f = (base / path).resolve()
        if not f.is_relative_to(base) or not f.is_file():
            return err(404, f"no such report file: {path!r}")
        return FileResponse(f)

    return app


def _one_token_answer(handle, prompt: str) -> str:
    """A stand-in answer of one token, so that :func:`kneurons.assess` scores a cloze given without a target: its
    top-k are the predictions at the blank (one mask for a masked model), which do not depend on the answer."""
    from ..prompts import encode, parse_cloze

    parse_cloze(prompt)
    for word in ("the", "a", "of", "and", ".", ","):
        try:
            if len(encode(handle, prompt, word).target_ids) == 1:
                return word
        except KneuronsError:
            continue
    raise KneuronsError("give a target: this tokenizer spells none of the stand-in answers in one token")


def _clean(v):
    if isinstance(v, float):
        return _num(v)
    if isinstance(v, list):
        return [_clean(x) for x in v]
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    return v


def _one_prompt(handle, prompt: str, body, progress):
    """The coarse neurons of one prompt as a :class:`KnowledgeNeurons` (with its attribution): what ``locate``
    keeps of a prompt before refining over paraphrases."""
    from ..attribution import attribute, get_method, model_info
    from ..neurons import KnowledgeNeurons, coarse_neurons

    m = get_method(body.method)
    if m.kind != "attribution":
        raise KneuronsError(f"method {m.name!r} needs at least 2 paraphrase prompts here; give more prompts")
    threshold = (m.threshold if m.threshold is not None else 0.2) if body.threshold is None else body.threshold
    attrs = attribute(handle, [prompt], body.target, steps=body.steps, score=body.score, progress=progress,
                      method=m.name, foils=body.foils or None)
    coarse = coarse_neurons(attrs[0], threshold)
    params = {"method": m.name, "threshold": threshold, "steps": body.steps, "score": body.score, "p_used": None,
              "single_prompt": True}
    return KnowledgeNeurons(sorted(coarse), [prompt], body.target.strip(), [coarse], [attrs[0].base_prob], params,
                            model_info(handle), m.name, attributions=attrs)
