"""The executor: runs an execution plan — the clean run of each prompt, then the row plan's passes — and sums
the gradients into attributions.

1. **Clean run** (:func:`prepare`, no gradient): every layer's blank activation, every block's output (replayed,
   not recomputed, for rows below their patched layer) and the unchanged score; for causal models with
   ``use_cache`` also the KV cache of the prompt before the blank — cut from the clean run's own cache
   (``prefix_from_clean_run``) or from a separate prefix pass — on which every row runs only the blank and
   target positions.
2. **Passes** (:func:`execute`): the rows of :func:`~kneurons.attribution.rows.plan_rows`, one pass per range of
   the row plan. In a pass, an FFN pre-hook puts each row's scaled activation at the blank of its layer (and the
   clean rows' unit scales at every attributed layer), :func:`~kneurons.hooks.replay_layers` replays blocks
   below each row's layer (:func:`~kneurons.attribution.rows.block_schedule`), the head scores the rows and one
   backward pass gives the gradients w.r.t. the scaled activations only (parameters frozen).
3. **Sum**: ``attribution = (w - b) * sum_k weights_k grad_k`` per prompt, with the ``alpha = 0`` rows' scores as
   the completeness diagnostic.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import KneuronsError
from ..hooks import capture_layer_outputs, ffn_hooks, frozen_parameters, head_inputs, replay_layers
from ..prompts import Encoded, pad_id
from .head import fused_logprob, logprob_from_logits, plain_linear_head
from .methods import get_score
from .plan import ExecutionPlan, Options, output_cache
from .result import Attribution, model_info
from .rows import CLEAN, RowPlan, block_schedule


def _cache_kwarg(model) -> str:
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@contextlib.contextmanager
def _head_on_positions(arch, pos: torch.Tensor):
    """Cut the last block's output to the scored positions ``pos`` (``[n]`` for every row, or ``[rows, n]``), so
    that the LM head runs on those only (positions never mix after the last block)."""

    def cut(mod, args, out):
        h = out[0] if isinstance(out, tuple) and out else out
        if not (isinstance(h, torch.Tensor) and h.dim() == 3):
            raise KneuronsError("cannot cut the last block's output to the scored positions: declare "
                                "head_on_scored_positions=False for this architecture")
        c = h[:, pos] if pos.dim() == 1 else h[torch.arange(h.shape[0], device=pos.device)[:, None], pos]
        return (c,) + tuple(out[1:]) if isinstance(out, tuple) else c

    hook = arch.layers[-1].register_forward_hook(cut)
    try:
        yield
    finally:
        hook.remove()


class _PromptRows:
    """The model inputs of rows of one prompt: ``ids`` ``[1, T]`` (with a KV cache: the blank and target
    positions; else the whole prompt), the blank's index in them, the scored positions, the prefix cache."""

    def __init__(self, handle, plan: ExecutionPlan, ids: torch.Tensor, blank: int, positions: list[int], cache):
        self.handle, self.plan, self.ids, self.blank, self.positions, self.cache = \
            handle, plan, ids, blank, positions, cache
        self.cache_kw = _cache_kwarg(handle.model) if plan.use_cache else None
        n = len(positions)
        # the model's output holds exactly the scored positions, in order: no gather needed
        self.output_is_scored = plan.head_on_scored_positions or positions == list(range(n))
        self.score_index = torch.tensor(positions, device=ids.device)
        self._repeated: tuple[int, object] | None = None  # the prefix cache repeated to a pass's row count

    def cache_for(self, rows: int, active: dict[int, int] | None = None):
        """A private prefix KV cache for ``rows`` rows (the repeated tensors are built once per row count; each
        pass gets a shallow copy of the layer objects, cut to each block's leading active rows, or a deep copy —
        ``plan.cache_copy``)."""
        if self._repeated is None or self._repeated[0] != rows:
            rep = copy.deepcopy(self.cache)
            if rows > 1:
                rep.batch_repeat_interleave(rows)
            self._repeated = (rows, rep)
        rep = self._repeated[1]
        if self.plan.cache_copy == "deep":
            return copy.deepcopy(rep)
        fresh = copy.copy(rep)
        fresh.layers = [copy.copy(layer) for layer in rep.layers]
        for j, layer in enumerate(fresh.layers):  # blocks run on their leading active rows only
            n = (active or {}).get(j, rows)
            if 0 < n < rows and getattr(layer, "keys", None) is not None:
                layer.keys, layer.values = layer.keys[:n], layer.values[:n]
        return fresh

    def forward(self, rows: int, active: dict[int, int] | None = None):
        model = self.handle.model
        ids = self.ids.expand(rows, -1)
        if self.plan.use_cache:
            return model(input_ids=ids, use_cache=True, **{self.cache_kw: self.cache_for(rows, active)}).logits
        cut = (_head_on_positions(self.handle.arch, self.score_index) if self.plan.head_on_scored_positions
               else contextlib.nullcontext())
        with cut:
            return model(input_ids=ids).logits

    def scored(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (logits or the head's input, ``[rows, positions, ...]``) at the scored positions."""
        if self.output_is_scored and t.shape[1] == len(self.positions):
            return t
        return t[:, self.score_index.to(t.device)]


@dataclass(frozen=True)
class Prepared:
    """One prompt after its clean run."""

    prompt: str
    enc: Encoded
    plan: ExecutionPlan
    rows: _PromptRows
    W: torch.Tensor  # [L, d_ff] clean activations at the blank
    outputs: dict  # block j -> its clean output at the rows' positions (for replay)
    base: float  # the score with nothing changed
    seqs: tuple  # the scored sequences: the target's token ids, then the foils' (see score_sequences)
    foils: tuple  # the foils used (those whose first token differs from the target's and from each other)


def score_sequences(handle, prompt: str, enc: Encoded, foils) -> tuple[tuple, tuple]:
    """``(sequences, foils used)``: the target's token ids, then per foil its first token (in the prompt's
    context) followed by the target's continuation — the contrastive score's foils (see
    :mod:`kneurons.attribution.methods`). Foils whose first token is the target's or an earlier foil's are
    dropped."""
    from ..prompts import encode

    target = tuple(enc.target_ids)
    if not foils:
        return (target,), ()
    seen, seqs, used = {target[0]}, [target], []
    for f in foils:
        first = encode(handle, prompt, f).target_ids[0]
        if first not in seen:
            seen.add(first)
            seqs.append((first,) + target[1:])
            used.append(f)
    if not used:
        raise KneuronsError(f"no foil starts with another token than the target {enc.target!r} (in {prompt!r}); "
                            "give other answers of the relation")
    return tuple(seqs), tuple(used)


def _prefix_cache(handle, prefix: torch.Tensor):
    """The prompt before the blank, once, for its KV cache (the LM head is not computed)."""
    model = handle.model
    head = plain_linear_head(model)
    skip_head = head_inputs(head, []) if head is not None else contextlib.nullcontext()
    extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    with torch.no_grad(), skip_head:
        out = model(input_ids=prefix, use_cache=True, **extra)
    cache = output_cache(out)
    if cache is None:
        raise KneuronsError("the model returned no KV cache for the prompt's prefix (probed: it did)")
    return cache


def prepare(handle, prompt: str, enc: Encoded, plan: ExecutionPlan, score: str, seqs=None,
            foils=()) -> Prepared:
    """The clean run of one prompt under ``plan`` (``seqs``: the scored sequences, default the target)."""
    model, arch = handle.model, handle.arch
    L = arch.n_layers
    full = torch.tensor([enc.input_ids], device=handle.device)
    n = enc.blank
    acts: dict[int, torch.Tensor] = {}

    def grab(at):
        def fn(layer, x):
            acts[layer] = x[0, at].detach().clone()
        return fn

    if plan.prefix_from_clean_run:
        # the whole prompt at once; its KV cache, cut to the positions before the blank, serves the rows
        with torch.no_grad(), ffn_hooks(arch, grab(n)), capture_layer_outputs(arch, range(L)) as outs:
            out = model(input_ids=full, use_cache=True)
        cache = output_cache(out)
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys[..., :n, :], layer.values[..., :n, :]
        rows = _PromptRows(handle, plan, full[:, n:], 0, [p - n for p in enc.score_positions], cache)
        outputs = {j: o[:, n:].clone() for j, o in outs.items()}  # not views: the whole prompt's are freed
        logits = out.logits[:, n:]
    else:
        if plan.use_cache:
            rows = _PromptRows(handle, plan, full[:, n:], 0, [p - n for p in enc.score_positions],
                               _prefix_cache(handle, full[:, :n]))
        else:
            rows = _PromptRows(handle, plan, full, n, list(enc.score_positions), None)
        with torch.no_grad(), ffn_hooks(arch, grab(rows.blank)), capture_layer_outputs(arch, range(L)) as outs:
            logits = rows.forward(1)
        outputs = dict(outs)
    seqs = (tuple(enc.target_ids),) if seqs is None else tuple(seqs)
    lp = logprob_from_logits(rows.scored(logits), torch.tensor(seqs, device=full.device))
    base = float(get_score(score).value(lp)[0])
    W = torch.stack([acts[l] for l in range(L)])
    return Prepared(prompt, enc, plan, rows, W, outputs, base, seqs, tuple(foils))


# ------------------------------------------------------------------------------------------- prompt groups

def _pad_dim(t: torch.Tensor, dim: int, size: int, front: bool) -> torch.Tensor:
    n = size - t.shape[dim]
    if n <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = n
    z = t.new_zeros(shape)
    return torch.cat([z, t] if front else [t, z], dim)


class _Group:
    """Several prompts' rows in one batch (same plan, same target): per-row inputs, padded KV caches
    (left-padded) or sequences (right-padded) and attention masks. The group key
    (:func:`~kneurons.attribution.plan.group_key`) admits only plain dynamic caches and plain block outputs."""

    def __init__(self, handle, preps: list[Prepared]):
        self.handle = handle
        self.plan = preps[0].plan
        self.first = preps[0].rows
        dev = handle.device
        if self.plan.use_cache:
            n = [p.enc.blank for p in preps]
            n_max = max(n)
            self.ids = torch.cat([p.rows.ids for p in preps])  # [P, T]: the blank and target positions
            T = self.ids.shape[1]
            self.keys = [torch.cat([_pad_dim(p.rows.cache.layers[j].keys, -2, n_max, front=True) for p in preps])
                         for j in range(len(self.first.cache.layers))]
            self.values = [torch.cat([_pad_dim(p.rows.cache.layers[j].values, -2, n_max, front=True)
                                      for p in preps]) for j in range(len(self.first.cache.layers))]
            self.mask = torch.zeros(len(preps), n_max + T, dtype=torch.long, device=dev)
            for i, k in enumerate(n):
                self.mask[i, n_max - k:] = 1
            self.position_ids = torch.tensor(n, device=dev)[:, None] + torch.arange(T, device=dev)
            self.blank = torch.zeros(len(preps), dtype=torch.long, device=dev)
            length = T
        else:
            length = max(len(p.enc.input_ids) for p in preps)
            pad = pad_id(handle.tokenizer)
            self.ids = torch.full((len(preps), length), pad, dtype=torch.long, device=dev)
            self.mask = torch.zeros(len(preps), length, dtype=torch.long, device=dev)
            for i, p in enumerate(preps):
                self.ids[i, : len(p.enc.input_ids)] = torch.tensor(p.enc.input_ids, device=dev)
                self.mask[i, : len(p.enc.input_ids)] = 1
            self.blank = torch.tensor([p.enc.blank for p in preps], device=dev)
            self.pos = torch.tensor([p.rows.positions for p in preps], device=dev)  # [P, n] scored positions
        self.outputs = {j: torch.cat([_pad_dim(p.outputs[j], 1, length, front=False) for p in preps])
                        for j in range(handle.arch.n_layers)}

    def forward(self, row_prompt: torch.Tensor, active: dict[int, int] | None = None):
        R = len(row_prompt)
        rp = row_prompt.to(self.ids.device)
        model = self.handle.model
        if self.plan.use_cache:
            cache = copy.copy(self.first.cache)
            cache.layers = [copy.copy(layer) for layer in self.first.cache.layers]
            for j, layer in enumerate(cache.layers):
                n = (active or {}).get(j, R)
                rows = rp[:n] if 0 < n < R else rp
                layer.keys, layer.values = self.keys[j][rows], self.values[j][rows]
            return model(input_ids=self.ids[rp], attention_mask=self.mask[rp], position_ids=self.position_ids[rp],
                         use_cache=True, **{self.first.cache_kw: cache}).logits
        with _head_on_positions(self.handle.arch, self.pos[rp]):
            return model(input_ids=self.ids[rp], attention_mask=self.mask[rp]).logits


# ------------------------------------------------------------------------------------------- passes

class _Batch:
    """What a pass needs of its prompt(s), the same for one prompt and a group: the clean activations, the
    blank of each row, the replayed block outputs, the forward pass and the scored positions."""

    def __init__(self, handle, preps: list[Prepared]):
        self.preps = preps
        self.group = _Group(handle, preps) if len(preps) > 1 else None
        self.W = torch.stack([p.W for p in preps]) if self.group is not None else preps[0].W[None]  # [P, L, d_ff]
        dev = self.W.device
        self.blank = self.group.blank if self.group is not None else torch.tensor([preps[0].rows.blank], device=dev)

    def replayed(self, j: int, rp: torch.Tensor):
        if self.group is None:
            return self.preps[0].outputs[j]  # batch 1: replay_layers expands it
        out = self.group.outputs[j]
        return out[rp.to(out.device)]

    def forward(self, rp: torch.Tensor, active):
        if self.group is not None:
            return self.group.forward(rp, active)
        return self.preps[0].rows.forward(len(rp), active)

    def scored(self, t: torch.Tensor) -> torch.Tensor:
        # a group's outputs hold the scored positions only (KV rows run exactly them; masked rows are cut)
        return t if self.group is not None else self.preps[0].rows.scored(t)


def _run_pass(handle, batch: _Batch, plan: ExecutionPlan, options: Options, head, targets, rl, rp, alpha, weight):
    """Score the rows of one pass (row ``r`` scales layer ``rl[r]`` of prompt ``rp[r]`` to ``alpha[r]`` at the
    blank; clean rows unchanged) and, for rows of nonzero ``weight``, the score's gradient w.r.t. the scaled
    activations and the clean rows' unit scales. Returns ``(scores [R], grads [R, d_ff] | None,
    unit grads [clean rows, attributed layers, d_ff] | None)``."""
    arch = handle.arch
    L = arch.n_layers
    R = len(rl)
    score = get_score(options.score)
    path = options.path
    layers = list(options.layers)
    unit_index = {l: i for i, l in enumerate(layers)}
    Wrows = batch.W
    dev = Wrows.device
    clean = (rl == CLEAN).nonzero()[:, 0].to(dev)
    patched = rl >= 0
    grad_rows = weight != 0
    need_grad = bool(grad_rows.any())
    w_rows = Wrows[rp.to(dev), rl.clamp(min=0).to(dev)]
    a = alpha.to(Wrows.dtype).to(dev)[:, None]
    if path.zero_baseline:
        scaled = a * w_rows
    else:
        b_rows = path.baseline.to(Wrows.dtype).to(dev)[rl.clamp(min=0).to(dev)]
        scaled = b_rows + a * (w_rows - b_rows)
    if need_grad:
        scaled.requires_grad_(True)
    units = torch.ones(len(clean), len(layers), arch.d_ff, dtype=Wrows.dtype, device=dev,
                       requires_grad=need_grad) if len(clean) else None
    present = sorted(set(rl[patched].tolist()) | (set(layers) if units is not None else set()))
    sel_by_layer = {l: (rl == l).nonzero()[:, 0].to(dev) for l in present}
    row_blank = batch.blank[rp.to(batch.blank.device)].to(dev)

    def patch(layer, x):
        sel = sel_by_layer.get(layer)
        with_units = units is not None and layer in unit_index
        if (sel is None or not len(sel)) and not with_units:
            return None
        y = x.clone()
        if sel is not None and len(sel):
            y[sel, row_blank[sel]] = scaled[sel].to(x.dtype)
        if with_units:  # x * 1 (b + (x - b) * 1 with a baseline): the clean rows' values are unchanged
            b = row_blank[clean]
            u = units[:, unit_index[layer]].to(x.dtype)
            if path.zero_baseline:
                y[clean, b] = x[clean, b] * u
            else:
                base = path.baseline[layer].to(x.dtype).to(x.device)
                y[clean, b] = base + (x[clean, b] - base) * u
        return y

    active, replayed = block_schedule(rl, L, plan.replay, plan.partial_blocks)
    cached = {j: batch.replayed(j, rp) for j in replayed}
    with (torch.enable_grad() if need_grad else torch.no_grad()), ffn_hooks(arch, patch, present), \
            replay_layers(arch, cached, R, active):
        if plan.fused_head:  # the model runs up to its LM head; the fused head scores the rows
            with head_inputs(head, [], placeholder="expand") as head_in:
                batch.forward(rp, active)
            lp = fused_logprob(head, batch.scored(head_in[-1]), targets, need_grad)
        else:
            lp = logprob_from_logits(batch.scored(batch.forward(rp, active)), targets)
        g = gu = None
        lp_d = lp.detach()
        lp_d = lp_d.float() if lp_d.dtype in (torch.float16, torch.bfloat16) else lp_d
        if need_grad:
            cot, factor = score.gradient(lp_d)
            gr = grad_rows.to(lp.device)
            g, gu = torch.autograd.grad((lp[gr] * cot[gr].to(lp.dtype)).sum(),
                                        [scaled, units if units is not None else scaled], allow_unused=True)
            gu = gu if units is not None else None
            # the score's factor (dP = P dlogP) after the backward pass: the gradient of the log-probability stays
            # well scaled in half precision, where P's own gradient underflows for unlikely targets
            if g is not None:
                g = g.to(factor.dtype) * factor[:, None]
            if gu is not None:
                gu = gu.to(factor.dtype) * factor[clean.to(factor.device), None, None]
    return score.value(lp_d), g, gu


def execute(handle, preps: list[Prepared], options: Options, rows: RowPlan,
            progress: Callable[[int], None] | None = None) -> list[Attribution]:
    """Every row of ``preps``' prompts (one prompt, or a group sharing passes) in the passes of ``rows``: the
    clean rows, the path's points and the ``alpha = 0`` diagnostic of every layer; the attributions."""
    arch = handle.arch
    L = arch.n_layers
    P = len(preps)
    plan = preps[0].plan
    path = options.path
    layers = list(options.layers)
    batch = _Batch(handle, preps)
    W0 = preps[0].W
    acc_dtype = torch.float64 if W0.dtype == torch.float64 else torch.float32
    grad_sum = torch.zeros(P, L, arch.d_ff, dtype=acc_dtype, device=W0.device)
    last_term = torch.zeros(P, L, arch.d_ff, dtype=acc_dtype, device=W0.device)  # the clean rows' alpha = 1 terms
    layer_zero = torch.full((P, L), float("nan"), dtype=torch.float64)
    head = plain_linear_head(handle.model) if plan.fused_head else None
    targets = torch.tensor(preps[0].seqs, device=W0.device)  # [1 + foils, n]: the target, then the foils
    _, denominator = path.factored()

    with frozen_parameters(handle.model):
        for start, stop in rows.passes:
            rl, rp = rows.layer[start:stop], rows.prompt[start:stop]
            alpha, weight = rows.alpha[start:stop], rows.weight[start:stop]
            s, g, gu = _run_pass(handle, batch, plan, options, head, targets, rl, rp, alpha, weight)
            steps_rows = (weight != 0) & (rl >= 0)
            if g is not None and bool(steps_rows.any()):
                gr = steps_rows.to(g.device)
                gw = g[gr].detach()
                w = weight[steps_rows]
                if not bool((w == 1).all()):
                    gw = gw * w.to(gw.dtype).to(gw.device)[:, None]
                grad_sum.index_put_((rp[steps_rows].to(grad_sum.device), rl[steps_rows].to(grad_sum.device)),
                                    gw.to(grad_sum.dtype), accumulate=True)
            if gu is not None:
                is_clean = rl == CLEAN
                for c, (p, w) in enumerate(zip(rp[is_clean].tolist(), weight[is_clean].tolist())):
                    term = gu[c].detach().to(acc_dtype)
                    last_term[p, layers] = term if w == 1 else term * w
            zero = (alpha == 0) & (rl >= 0)
            for p, l, v in zip(rp[zero].tolist(), rl[zero].tolist(), s[zero.to(s.device)].tolist()):
                layer_zero[p, l] = float(v)  # the score with layer l's blank activation set to the baseline
            del g, gu
            if progress is not None:  # a clean row stands for the alpha = 1 row of every layer
                n_clean = int((rl == CLEAN).sum())
                progress(len(rl) - n_clean + n_clean * len(layers))
    mask = torch.zeros(L, dtype=torch.bool)
    mask[layers] = True
    out_dtype = torch.float64 if W0.dtype == torch.float64 else torch.float32
    common = {"method": options.method, "steps": path.steps, "path": path.describe(), "score": options.score,
              "batch_size": options.batch_size, "rows_per_pass": rows.rows_per_pass, "pass_size_bound": rows.bound,
              "pass_memory_estimate": rows.estimate, "layers": layers,
              "baseline": path.describe()["baseline"], "position": "blank", **plan.params(),
              "prompts_per_group": P}
    results = []
    if options.foils:
        common["foils_given"] = list(options.foils)
    for i, prep in enumerate(preps):
        if options.foils:
            common["foils"] = list(prep.foils)  # the ones used for this prompt
        diff = prep.W.to(acc_dtype) if path.zero_baseline else \
            (prep.W - path.baseline.to(prep.W.dtype).to(prep.W.device)).to(acc_dtype)
        scores = (diff * grad_sum[i] + last_term[i]) / denominator
        scores[~mask.to(scores.device)] = 0
        results.append(Attribution(scores.to(out_dtype).cpu(), prep.W.to(out_dtype).cpu(), prep.prompt,
                                   prep.enc.target, prep.enc.target_ids, prep.base, layer_zero[i], dict(common),
                                   model_info(handle)))
    return results


# ------------------------------------------------------------------------------------------- the engine

def run(handle, prompts: list[str], targets: list[str], options: Options,
        progress: Callable[[int], None] | None = None,
        adjust: Callable[[ExecutionPlan], ExecutionPlan] | None = None) -> list[Attribution]:
    """Attribute each prompt's target: capabilities (probed once per handle), one plan per prompt, prompts with
    equal group keys sharing passes when ``options.batch_prompts``, and every prompt's (or group's) row plan and
    pass size decided before the first clean run (:func:`~kneurons.attribution.rows.plan_passes`: a plan
    estimated beyond the available memory is refused). ``adjust(plan)`` may switch a plan's shortcuts off (tests
    force every fallback this way; the result must not change). The model's train/eval mode and its
    parameters' ``requires_grad`` are restored afterwards, also on error."""
    from ..prompts import encode
    from .plan import available_memory, capabilities, decide, group_key, pass_shape
    from .rows import plan_passes

    was_training = handle.model.training
    try:
        with torch.inference_mode(False):
            devices = set(map(str, (getattr(handle.model, "hf_device_map", None) or {}).values()))
            if len(devices) > 1:
                raise KneuronsError("integrated gradients needs the model on one device; it is split over "
                                    f"{sorted(devices)}")
            encs = [encode(handle, p, t) for p, t in zip(prompts, targets)]  # also refuses unproducible targets
            scored = [score_sequences(handle, p, e, options.foils) for p, e in zip(prompts, encs)]
            handle.model.eval()
            caps = capabilities(handle, encs[0])
            units: list[list[int]] = []  # prompts computed together: one alone, or a group sharing passes
            plans: list[ExecutionPlan] = []
            groups: dict[object, list[int]] = {}
            for i, enc in enumerate(encs):
                plan = decide(handle, caps, options, enc)
                if adjust is not None:
                    plan = adjust(plan)
                plans.append(plan)
                key = group_key(handle, caps, plan, enc) if options.batch_prompts else None
                key = None if key is None else (key, scored[i][0])  # a group scores the same sequences
                if key is None:
                    units.append([i])
                else:
                    groups.setdefault(key, []).append(i)
            units += list(groups.values())
            available = available_memory(handle.device)
            gpu = handle.device.type == "cuda"
            row_plans = []
            for members in units:
                plan = plans[members[0]]
                shape = pass_shape(handle, plan, [encs[i] for i in members])
                row_plans.append(plan_passes(len(members), list(options.layers), options.path, shape,
                                             options.batch_size, available, gpu, plan.replay, plan.partial_blocks))
            out: list[Attribution | None] = [None] * len(prompts)
            for members, rows in zip(units, row_plans):  # nothing of a unit is kept for the next
                preps = [prepare(handle, prompts[i], encs[i], plans[i], options.score, *scored[i]) for i in members]
                for i, att in zip(members, execute(handle, preps, options, rows, progress)):
                    out[i] = att
            return out
    finally:
        handle.model.train(was_training)
