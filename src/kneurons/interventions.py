"""Interventions (suppress / amplify activations) and weight edits (update a fact, erase a relation).

Activation interventions go through the one hook mechanism (:func:`kneurons.hooks.ffn_hooks`): the chosen
neurons' activations are multiplied by ``factor`` (0 = suppress, 2 = amplify) at the blank position (default)
or at every position. "The blank" is the position a kneurons scoring function attributes (see
:mod:`kneurons.prompts`); scoring functions publish it per batch row while an intervention is active.

Weight edits change *value slots* — the FFN output projection's weight columns (rows for GPT-2's Conv1D) that
match the neurons — and return an :class:`Edit`. ``Edit.revert()`` writes back the saved original slots, so
every parameter is bit-identical to before; an ``Edit`` is also a context manager that reverts on exit.

**Update** ⟨h, r, t⟩ → ⟨h, r, t′⟩ (the authors' rule): for each value slot ``v``::

    v ← v − λ1 · (‖v‖ / ‖e_t‖) · e_t + λ2 · (‖v‖ / ‖e_t′‖) · e_t′        (λ1 = 1, λ2 = 8)

``e`` is the target's vector in the *output* (unembedding) space — the matrix that turns the residual stream into
logits, which is what a value slot writes into. For tied models it is also the input embedding; for untied
models (e.g. Llama-style ``lm_head``) it is the ``lm_head`` row. A multi-token target uses the mean of its
tokens' unembedding rows (tokenized in the context of the fact's prompt).

``space="head"`` (an option, not the paper's rule) uses the residual-stream direction that the model's own output
head — everything between the last block and the logits: final norm, BERT's MLM-head transform (dense + GELU +
LayerNorm), soft-capping, projections — maps to the target most confidently: the unit vector ``u`` maximising ``log
p(t | head(n·u))``, with ``n`` the norm of the last block's output at the fact's blank, found by gradient ascent
(Adam, at most 100 steps) from the unembedding row (from a seeded random vector where the rows are not in the model width).
Like the paper's ``e`` it depends on the target (and ``n``) only; for a head that is a norm and a bare unembedding
it stays close to that row; where the head transforms the residual first (BERT-type models) the unembedding row is
not a direction the value slots can write the target with, and this is. A multi-token target uses the mean of its
tokens' directions.

``space="gradient"`` (an option) uses the local direction ``e = ∂ logit_t / ∂ h`` at the blank of the fact's prompt,
where ``h`` is the last block's output (first target token only).

**Erase** a relation: the neurons shared by at least ``min_facts`` of its facts' knowledge-neuron sets (or the
``top_k`` most frequent) get their value slots set to zero or to the unknown token's unembedding vector
(models whose tokenizer has no unknown token — byte-level vocabularies whose "unknown" token is really a marker
such as ``<|endoftext|>``, see :func:`unknown_token` — get zero, with a warning).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import numbers
import warnings
import weakref
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import torch

from .errors import KneuronsError
from .hooks import ffn_hooks, frozen_parameters, register_blank_hook, unregister_blank_hook
from .prompts import assess, encode, perplexity_of

from .neurons import Neuron, as_neurons, check_neurons  # noqa: E402


def _neurons(handle, neurons) -> list[Neuron]:
    return check_neurons(handle, neurons)


class Intervention:
    """Multiply the activations of ``neurons`` by ``factor`` while active (a context manager).

    ``position="all"``: at every position of every forward pass of the model. ``position="blank"``: at the blank
    of each prompt, which only a kneurons scoring function (:func:`kneurons.assess`, :func:`measure_intervention`)
    knows: it passes each batch's blank positions to the intervention explicitly
    (:func:`kneurons.hooks.at_blanks`); any other forward pass of the model is refused while it is active."""

    def __init__(self, handle, neurons, factor: float, position: str = "blank"):
        if isinstance(factor, bool) or not isinstance(factor, numbers.Real) or not math.isfinite(float(factor)):
            raise KneuronsError(f"factor must be a finite number, got {factor!r}")
        if position not in ("blank", "all"):
            raise KneuronsError(f"position must be 'blank' or 'all', got {position!r}")
        self.handle = handle
        self.neurons = _neurons(handle, neurons)
        self.factor = float(factor)
        self.position = position
        by_layer: dict[int, list[int]] = {}
        for l, i in self.neurons:
            by_layer.setdefault(l, []).append(i)
        self._by_layer = {l: torch.tensor(ix) for l, ix in by_layer.items()}
        self._active = None  # the installed hooks while active

    def apply(self, layer: int, x: torch.Tensor, blanks: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` (``[batch, positions, d_ff]``, layer ``layer``) with the neurons scaled at every position
        (``blanks=None``) or at one position per row."""
        idx = self._by_layer[layer].to(x.device)
        x = x.clone()
        if blanks is None:
            x[..., idx] = x[..., idx] * self.factor
            return x
        rows = torch.arange(x.shape[0], device=x.device)
        b = blanks.to(x.device)
        if b.shape[0] != x.shape[0]:
            raise KneuronsError("blank positions do not match the batch")
        sub = x[rows, b]  # [batch, d_ff]
        sub[:, idx] = sub[:, idx] * self.factor
        x[rows, b] = sub
        return x

    @property
    def active(self) -> bool:
        return self._active is not None

    def __enter__(self):
        if self._active is not None:
            raise KneuronsError("this intervention is already active (it cannot be entered twice)")
        if self.position == "all":
            ctx = ffn_hooks(self.handle.arch, self.apply, self._by_layer.keys())
            ctx.__enter__()
            self._active = ("all", ctx)
        else:
            self._active = ("blank", register_blank_hook(self.handle.arch, self.handle.model, self._by_layer.keys(),
                                                         self.apply))
        return self

    def __exit__(self, *exc):
        kind, what = self._active
        self._active = None
        if kind == "all":
            return what.__exit__(*exc)
        unregister_blank_hook(self.handle.model, what)
        return False


def suppress(handle, neurons, position: str = "blank") -> Intervention:
    """Set the neurons' activations to 0 (a context manager)."""
    return Intervention(handle, neurons, 0.0, position)


def amplify(handle, neurons, factor: float = 2.0, position: str = "blank") -> Intervention:
    """Multiply the neurons' activations by ``factor`` (default 2, a context manager)."""
    return Intervention(handle, neurons, factor, position)


# --------------------------------------------------------------------------------------------- measuring

def score(handle, prompts: Sequence[str], targets, intervention: Intervention | None = None,
          batch_size: int = 32):
    """:func:`kneurons.assess` with ``intervention`` active (blank positions published per row)."""
    if isinstance(targets, str):
        targets = [targets] * len(prompts)
    if intervention is None or intervention.active:
        return assess(handle, list(prompts), list(targets), batch_size=batch_size)
    with intervention:  # assess publishes each batch's blank positions
        return assess(handle, list(prompts), list(targets), batch_size=batch_size)


@dataclass
class InterventionResult:
    """Probabilities before/after an intervention on a fact's prompts and on control prompts."""

    factor: float
    neurons: list[Neuron]
    rows: list[dict] = field(default_factory=list)  # one per prompt: group, prompt, target, before, after, rel

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame(self.rows)

    def mean_change(self, group: str) -> float:
        """Mean relative change Δp/p over the prompts of ``group`` ('fact', 'same_relation', 'other_relation')."""
        vals = [r["rel_change"] for r in self.rows if r["group"] == group]
        return float(sum(vals) / len(vals)) if vals else float("nan")

    @property
    def specificity(self) -> float:
        """|mean Δp/p on the fact| / |mean Δp/p on all control prompts| (large = specific to the fact)."""
        ctrl = [r["rel_change"] for r in self.rows if r["group"] != "fact"]
        if not ctrl:
            return float("nan")
        c = abs(sum(ctrl) / len(ctrl))
        return abs(self.mean_change("fact")) / max(c, 1e-12)

    @property
    def relation_specificity(self) -> float:
        """|mean Δp/p on the fact| / |mean Δp/p on other facts of the same relation|: the ratio that separates
        neurons of one fact (large) from neurons of its relation (about 1)."""
        same = self.mean_change("same_relation")
        if math.isnan(same):
            return float("nan")
        return abs(self.mean_change("fact")) / max(abs(same), 1e-12)

    def summary(self) -> dict:
        return {"factor": self.factor, "neurons": len(self.neurons), "fact": self.mean_change("fact"),
                "same_relation": self.mean_change("same_relation"),
                "other_relation": self.mean_change("other_relation"), "specificity": self.specificity,
                "relation_specificity": self.relation_specificity}


def measure_intervention(handle, neurons, prompts: Sequence[str], target: str, factor: float = 0.0,
                         controls: Sequence[tuple[str, str, str]] = (), position: str = "blank",
                         batch_size: int = 32, before=None) -> InterventionResult:
    """Δp/p on the fact's ``prompts`` and on ``controls`` — ``(group, prompt, target)`` triples whose group is
    ``"same_relation"`` or ``"other_relation"`` — when ``neurons`` are multiplied by ``factor``. ``before``: the
    unchanged model's assessments of the same prompts (fact prompts, then controls), to score them once for
    several interventions."""
    iv = Intervention(handle, neurons, factor, position)
    items = [("fact", p, target) for p in prompts] + [tuple(c) for c in controls]
    ps = [p for _, p, _ in items]
    ts = [t for _, _, t in items]
    if before is None:
        before = score(handle, ps, ts, batch_size=batch_size)
    elif len(before) != len(items) or [(b.prompt, b.target) for b in before] != [(p, t.strip()) for p, t in
                                                                                  zip(ps, ts)]:
        raise KneuronsError("before: assessments of other prompts than the fact's prompts and controls")
    after = score(handle, ps, ts, intervention=iv, batch_size=batch_size)
    res = InterventionResult(iv.factor, iv.neurons)
    for (group, p, t), b, a in zip(items, before, after):
        res.rows.append({"group": group, "prompt": p, "target": t, "before": b.prob, "after": a.prob,
                         "rel_change": (a.prob - b.prob) / b.prob if b.prob > 0 else float("nan"),
                         "rank_before": b.rank, "rank_after": a.rank})
    return res


# ------------------------------------------------------------------------------------------ weight edits

def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 over every parameter and buffer (names, dtypes and bytes): equal iff bit-identical."""
    h = hashlib.sha256()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


#: the weight edits applied to each model, oldest first. Kept per *model* (not per handle): two handles wrapping
#: one model see, and are checked against, the same edits.
_APPLIED: "weakref.WeakKeyDictionary[torch.nn.Module, list[Edit]]" = weakref.WeakKeyDictionary()


def applied_edits(model) -> list["Edit"]:
    """The edits currently applied to ``model`` (a module or a handle), oldest first."""
    from .models import ModelHandle

    if isinstance(model, ModelHandle):  # not getattr(model, "model"): Llama-type modules have an inner .model
        model = model.model
    return list(_APPLIED.get(model, ()))


class Edit:
    """A reversible weight edit. ``revert()`` restores every touched value slot bit-exactly.

    Edits of one model form a stack. Reverting an edit while a later one that changed some of the *same* value
    slots is still applied is refused (it would restore stale values under the later edit); edits of disjoint
    slots may be reverted in any order. As a context manager an edit reverts on exit; when the block ends with an
    exception, later edits of the same slots that the block left applied are reverted first (the exception gets a
    note naming them), so the user's exception surfaces and the model is left as before the block.
    """

    def __init__(self, handle, kind: str, neurons: list[Neuron], info: dict | None = None):
        self.handle = handle
        self.kind = kind
        self.neurons = neurons
        self.info = info or {}
        self._saved: list[tuple[int, int, torch.Tensor]] = []
        self.reverted = False
        _APPLIED.setdefault(handle.model, []).append(self)

    def _save(self, layer: int, index: int) -> torch.Tensor:
        slot = self.handle.arch.value_slots(layer)[index]
        self._saved.append((layer, index, slot.detach().clone()))
        return slot

    @property
    def slots(self) -> set[Neuron]:
        """The value slots this edit changed."""
        return {(l, i) for l, i, _ in self._saved}

    def _later_overlapping(self) -> list["Edit"]:
        stack = _APPLIED.get(self.handle.model, [])
        later = stack[stack.index(self) + 1:] if self in stack else []
        mine = self.slots
        return [e for e in later if e.slots & mine]

    def _restore(self) -> None:
        with torch.no_grad():
            for layer, index, old in reversed(self._saved):
                self.handle.arch.value_slots(layer)[index].copy_(old)
        self.reverted = True
        stack = _APPLIED.get(self.handle.model, [])
        if self in stack:
            stack.remove(self)

    def revert(self) -> None:
        if self.reverted:
            raise KneuronsError("this edit was already reverted")
        blocking = self._later_overlapping()
        if blocking:
            shared = sorted(self.slots & set().union(*(e.slots for e in blocking)))
            raise KneuronsError(f"revert edits in reverse order: {blocking[-1]!r}, applied later, changed the same "
                                f"value slots {shared[:5]}{' ...' if len(shared) > 5 else ''}; revert it first")
        self._restore()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if self.reverted:
            return False
        if exc is None:
            self.revert()
            return False
        # the block raised: do not replace its exception. Later edits of the same slots go first, then this one.
        undone = []
        for later in reversed(self._later_overlapping()):
            later._restore()
            undone.append(repr(later))
        self._restore()
        if undone and hasattr(exc, "add_note"):
            exc.add_note(f"kneurons: leaving the edit block also reverted the later edit(s) of the same value slots "
                         f"that were still applied: {', '.join(undone)}")
        return False

    def __repr__(self):
        state = "reverted" if self.reverted else "applied"
        what = {k: v for k, v in self.info.items() if k in ("old", "new", "mode")}
        return f"Edit({self.kind}, {len(self.neurons)} value slots, {state}{', ' if what else ''}" \
               f"{', '.join(f'{k}={v!r}' for k, v in what.items())})"


def _apply(edit: "Edit", new_slot) -> "Edit":
    """Write ``new_slot(layer, index, slot)`` into each of the edit's value slots; on any failure the slots already
    written are restored and the edit is dropped (nothing half-applied)."""
    try:
        with torch.no_grad():
            for l, i in edit.neurons:
                slot = edit._save(l, i)
                slot.copy_(new_slot(l, i, slot))
    except BaseException:
        edit._restore()
        raise
    return edit


def _check_editable(handle) -> None:
    for layer in range(handle.n_layers):
        w = handle.arch.ffn_out[layer].weight
        if not w.dtype.is_floating_point or w.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            raise KneuronsError(f"cannot edit a model whose FFN weights are {w.dtype} (quantized/integer); load it "
                                "in float32/bfloat16")
        if type(w) is not torch.nn.Parameter and not isinstance(w, torch.Tensor):  # pragma: no cover
            raise KneuronsError("cannot edit quantized weights")
    if getattr(handle.model, "is_quantized", False) or getattr(handle.model, "hf_quantizer", None) is not None:
        raise KneuronsError("cannot edit a quantized model; load it in float32/bfloat16")


SPACES = ("embedding", "head", "gradient")
HEAD_STEPS = 100  # Adam steps of the space="head" search
HEAD_LR = 0.4  # its step per coordinate is HEAD_LR / sqrt(d_model): about the same angle at any model width
HEAD_TOL = 1e-4  # the search stops once every token's -log p is below this (p > 0.9999)


def _last_block(handle):
    return handle.arch.layers[handle.n_layers - 1]


def _block_states(out) -> torch.Tensor:
    """The hidden states in a block's output, checked to be ``[batch, positions, width]``."""
    h = out[0] if isinstance(out, tuple) else out
    if not isinstance(h, torch.Tensor) or h.dim() != 3:
        shape = tuple(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__
        raise KneuronsError(f"the last block's output is {shape}, not [batch, positions, width] (unpadded attention "
                            "implementations are not supported here; load the model with attn_implementation='eager' "
                            "or 'sdpa')")
    return h


@contextlib.contextmanager
def _gradients_on():
    """Autograd on, even inside ``torch.inference_mode()`` or ``torch.no_grad()``."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def _logit_gradient(handle, target: str, prompt: str) -> torch.Tensor:
    """∂ logit(first target token) / ∂ (last block's output) at the blank of ``prompt``."""
    enc = encode(handle, prompt, target)
    grabbed = {}

    def hook(mod, args, out):
        leaf = _block_states(out).detach().requires_grad_(True)
        grabbed["h"] = leaf
        return (leaf,) + tuple(out[1:]) if isinstance(out, tuple) else leaf

    handle_ = _last_block(handle).register_forward_hook(hook)
    try:
        with _gradients_on():
            out = handle.model(input_ids=torch.tensor([enc.input_ids], device=handle.device))
            logit = out.logits[0, enc.score_positions[0], enc.target_ids[0]]
            (g,) = torch.autograd.grad(logit, grabbed["h"])
    finally:
        handle_.remove()
    return g[0, enc.blank].detach().double()


def _head_directions(handle, token_ids: Sequence[int], norm: float, steps: int = HEAD_STEPS) -> torch.Tensor:
    """Per token, the unit residual vector ``u`` maximising log p(token | head(norm · u)) (module docstring).

    The head is the model's own: one-token inputs (one row per token) are run with the last block's output
    replaced by ``norm · u``, so whatever follows the last block (norms, transforms, soft-capping) is what the
    search sees. ``u`` starts at the token's unembedding row (a seeded random vector where the rows are not in
    the model width, e.g. ELECTRA), is renormalised after every Adam step, and the best point seen (the start
    included) is returned: the first point where p > 1 − ``HEAD_TOL`` (the search stops once every token has
    one). Rows are independent (the loss is their sum, Adam acts elementwise, and a row that is done stays done).
    """
    U = handle.arch.unembedding()
    d = handle.arch.d_model
    starts = []
    for t in token_ids:
        start = U[t].detach().float().cpu() if U.shape[1] == d else torch.zeros(d)
        if not torch.isfinite(start).all() or float(start.norm()) == 0:
            start = torch.randn(d, generator=torch.Generator().manual_seed(int(t)))
        starts.append(start / start.norm())
    dtype = torch.promote_types(U.dtype, torch.float32)  # float64 models search in float64

    def hook(mod, args, out):
        h = _block_states(out)
        x = (norm * u).to(h.device, h.dtype)[:, None, :].expand_as(h)
        return (x,) + tuple(out[1:]) if isinstance(out, tuple) else x

    hook_ = _last_block(handle).register_forward_hook(hook)
    try:
        with _gradients_on():  # tensors made here, so that none is an inference-mode tensor
            rows = torch.arange(len(token_ids), device=handle.device)
            ids = torch.tensor(list(token_ids), device=handle.device)
            u = torch.stack(starts).to(handle.device, dtype).requires_grad_(True)
            best, best_loss = u.detach().clone(), torch.full((len(ids),), math.inf, dtype=dtype, device=handle.device)
            opt = torch.optim.Adam([u], lr=HEAD_LR / math.sqrt(d))
            for step in range(steps + 1):
                logits = handle.model(input_ids=ids[:, None]).logits[:, -1]
                loss = -torch.log_softmax(logits.to(dtype), -1)[rows, ids]
                better = (loss.detach() < best_loss) & (best_loss >= HEAD_TOL)  # a row that is done stays done
                best[better] = u.detach()[better]
                best_loss = torch.where(better, loss.detach(), best_loss)
                if step == steps or bool((best_loss < HEAD_TOL).all()):
                    break
                opt.zero_grad()
                loss.sum().backward(inputs=[u])
                opt.step()
                with torch.no_grad():
                    u /= u.norm(dim=-1, keepdim=True)
    finally:
        hook_.remove()
    best = best.double()
    return best / best.norm(dim=-1, keepdim=True)


def _blank_norm(handle, prompt: str, target: str) -> float:
    """Norm of the last block's output at the blank of ``prompt``."""
    enc = encode(handle, prompt, target)
    grabbed = {}

    def hook(mod, args, out):
        grabbed["h"] = _block_states(out)[0, enc.blank].detach()

    hook_ = _last_block(handle).register_forward_hook(hook)
    try:
        with torch.no_grad():
            handle.model(input_ids=torch.tensor([enc.input_ids], device=handle.device))
    finally:
        hook_.remove()
    return float(grabbed["h"].double().norm())


def target_vector(handle, target: str, prompt: str | None = None, space: str = "embedding") -> torch.Tensor:
    """The target's vector: its tokens' mean unembedding row (``space="embedding"``, the paper's), the residual
    direction the output head maps to it (``space="head"``), or the residual-stream gradient of its logit at
    ``prompt`` (``space="gradient"``); see the module docstring."""
    return target_vectors(handle, [target], prompt, space)[0]


def target_vectors(handle, targets: Sequence[str], prompt: str | None = None,
                   space: str = "embedding") -> list[torch.Tensor]:
    """:func:`target_vector` for several targets (``space="head"``: one search for all of them)."""
    if space not in SPACES:
        raise KneuronsError(f"space must be one of {', '.join(SPACES)}, got {space!r}")
    if space == "gradient":
        if prompt is None:
            raise KneuronsError("space='gradient' needs the fact's prompt")
        return [_logit_gradient(handle, t, prompt) for t in targets]
    if prompt is None:
        prompt = "X [Y]"  # a leading space, as after any word (matters for byte-level BPE vocabularies)
    ids = [encode(handle, prompt, t).target_ids for t in targets]
    if space == "head":  # one search for every token of every target
        flat = [i for one in ids for i in one]
        dirs = _head_directions(handle, flat, _blank_norm(handle, prompt, targets[0]))
        out, k = [], 0
        for one in ids:
            out.append(dirs[k: k + len(one)].mean(0))
            k += len(one)
        return out
    U = handle.arch.unembedding()
    if U.shape[1] != handle.arch.d_model:
        raise KneuronsError(f"model type {handle.model_type!r}: its output embeddings ({U.shape[1]} wide) are not in "
                            f"the model width ({handle.arch.d_model}); value-slot edits are not defined")
    return [U[torch.tensor(one, device=U.device)].detach().double().mean(0) for one in ids]


UPDATE_METHODS = ("rule", "optimize")


@dataclass(frozen=True)
class OptimizeSettings:
    """The budget of ``update_fact(method="optimize")`` (module docstring). ``steps``: at most this many Adam
    steps; ``lr``: Adam's step in units of each slot's norm; ``bound``: no slot moves by more than ``bound x``
    its norm (projected after every step); ``kl``: weight of the preservation term (mean KL divergence from
    the unedited next-token distribution at the blank of the locality prompts); ``margin``: success once the new
    target's every token is the top-1 with at least this log-probability lead over the runner-up on every edit
    prompt (the search stops there)."""

    steps: int = 40
    lr: float = 0.3
    bound: float = 8.0
    kl: float = 1.0
    margin: float = 1.0

    def check(self) -> "OptimizeSettings":
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or not 1 <= self.steps <= 10_000:
            raise KneuronsError(f"optimize steps must be an integer from 1 to 10000, got {self.steps!r}")
        for name in ("lr", "bound", "kl", "margin"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or \
                    (v == 0 and name in ("lr", "bound")):
                raise KneuronsError(f"optimize {name} must be a finite number {'>' if name in ('lr', 'bound') else '>='}"
                                    f" 0, got {v!r}")
        return self


def _encoded_batch(handle, clozes: Sequence[str], targets: Sequence[str]):
    """Encodings of ``clozes`` with ``targets`` (teacher-forced for causal models), right-padded into one batch."""
    from .prompts import pad_batch, pad_id

    encs = [encode(handle, c, t) for c, t in zip(clozes, targets)]
    ids, mask = pad_batch(encs, pad_id(handle.tokenizer), handle.device)
    return encs, ids, mask


def _optimized_deltas(handle, nrns: list[Neuron], new_target: str, prompts: Sequence[str],
                      locality: Sequence[str], cfg: OptimizeSettings) -> tuple[dict, dict]:
    """``({neuron: Δslot}, info)``: the slot changes found by the search. The model's weights are not touched
    here: a forward hook on each edited layer's FFN output projection adds ``x[..., idx] @ Δ`` — exactly what
    the changed value slots add — so an exception leaves the model as it was."""
    arch = handle.arch
    by_layer: dict[int, list[int]] = {}
    for l, i in nrns:
        by_layer.setdefault(l, []).append(i)
    dtype = torch.float64 if arch.value_slots(0).dtype == torch.float64 else torch.float32
    dev = handle.device
    idx = {l: torch.tensor(ix, device=dev) for l, ix in by_layer.items()}
    norms = {l: arch.value_slots(l)[idx[l]].detach().to(dtype).norm(dim=-1).clamp_min(1e-12) for l in by_layer}
    with _gradients_on():
        z = {l: torch.zeros(len(ix), arch.d_model, dtype=dtype, device=dev, requires_grad=True)
             for l, ix in by_layer.items()}

    def adder(layer):
        def hook(mod, args, out):
            x = args[0]
            delta = (norms[layer][:, None] * z[layer]).to(out.dtype)
            return out + x[..., idx[layer]].to(out.dtype) @ delta
        return hook

    # one batch: the edit prompts (teacher-forced new target), then the locality prompts (read at their blank only)
    use_kl = bool(locality) and cfg.kl > 0
    kept = list(locality) if use_kl else []
    encs, ids, mask = _encoded_batch(handle, list(prompts) + kept, [new_target] * (len(prompts) + len(kept)))
    rows = [(r, p, t) for r, e in enumerate(encs[: len(prompts)]) for p, t in zip(e.score_positions, e.target_ids)]
    rr, pp, tt = (torch.tensor(v, device=dev) for v in zip(*rows))
    lrows = torch.arange(len(prompts), len(encs), device=dev)
    lpos = torch.tensor([e.score_positions[0] for e in encs[len(prompts):]], device=dev, dtype=torch.long)
    if use_kl:
        with torch.no_grad():
            ref = torch.log_softmax(handle.model(input_ids=ids[lrows], attention_mask=mask[lrows]).logits[
                torch.arange(len(kept), device=dev), lpos].to(dtype), -1)
    hooks = [arch.ffn_out[l].register_forward_hook(adder(l)) for l in by_layer]
    info = {"steps_taken": 0, "success": False}
    try:
        with _gradients_on(), _search_mode(handle.model):
            # Adam moves every coordinate by about lr: lr / sqrt(width) moves a slot by about lr x its norm
            opt = torch.optim.Adam(list(z.values()), lr=cfg.lr / math.sqrt(arch.d_model))
            for step in range(cfg.steps + 1):
                logits = handle.model(input_ids=ids, attention_mask=mask).logits
                lp = torch.log_softmax(logits[rr, pp].to(dtype), -1)
                tok = lp[torch.arange(len(rows), device=dev), tt]
                others = lp.detach().clone()
                others[torch.arange(len(rows), device=dev), tt] = -math.inf
                lead = tok.detach() - others.max(-1).values
                info["steps_taken"], info["min_lead"] = step, float(lead.min())
                per_prompt = torch.zeros(len(prompts), dtype=dtype, device=dev).index_add(0, rr, tok.detach())
                info["logprob_new"] = [float(v) for v in per_prompt]  # log P(new) per edit prompt, as edited
                if bool((lead >= cfg.margin).all()):
                    info["success"] = True
                    break
                if step == cfg.steps:
                    break
                loss = -tok.sum() / len(prompts)
                if use_kl:
                    cur = torch.log_softmax(logits[lrows, lpos].to(dtype), -1)
                    kl = (ref.exp() * (ref - cur)).sum(-1).mean()
                    info["kl"] = float(kl.detach())
                    loss = loss + cfg.kl * kl
                opt.zero_grad()
                loss.backward(inputs=list(z.values()))
                opt.step()
                with torch.no_grad():
                    for v in z.values():  # ||Δ|| <= bound * ||slot||: rows of z have norm <= bound
                        v.mul_((cfg.bound / v.norm(dim=-1, keepdim=True).clamp_min(1e-30)).clamp(max=1.0))
    finally:
        for h_ in hooks:
            h_.remove()
    deltas = {}
    for l, ix in by_layer.items():
        d = (norms[l][:, None] * z[l]).detach()
        for k, i in enumerate(ix):
            deltas[(l, i)] = d[k]
    info["max_relative_change"] = max(float(v.detach().norm(dim=-1).max()) for v in z.values())
    return deltas, info


@contextlib.contextmanager
def _search_mode(model):
    """Eval mode and no parameter gradients for the search (:func:`kneurons.hooks.frozen_parameters`): only the
    search's own tensors get gradients; the train/eval mode is restored after."""
    was_training = model.training
    try:
        model.eval()
        with frozen_parameters(model):
            yield
    finally:
        model.train(was_training)


def update_fact(handle, neurons, old_target: str, new_target: str, prompt: str | None = None,
                lambda1: float = 1.0, lambda2: float = 8.0, space: str = "embedding", vectors=None, *,
                method: str = "rule", prompts: Sequence[str] | None = None, locality: Sequence[str] = (),
                settings: OptimizeSettings | None = None) -> Edit:
    """Rewrite ⟨h, r, old⟩ → ⟨h, r, new⟩ in the value slots of ``neurons`` (see module docstring).

    ``method="rule"`` (the authors'): ``v ← v − λ1·e_old + λ2·e_new`` (scaled), the vectors in ``space``.
    ``vectors``: the targets' vectors ``(e_old, e_new)`` from :func:`target_vectors` (same ``space``), to reuse
    one computation for several neuron sets of the same fact; computed here when not given.

    ``method="optimize"``: only these value slots change, by gradient steps on ``-log P(new)`` (teacher-forced
    joint probability of every token) over the edit ``prompts`` (default: ``prompt``, or the neurons' prompts),
    plus ``settings.kl`` × the mean KL divergence from the unedited next-token distribution at the blank of the
    ``locality`` prompts (clozes whose answer must not move), each slot's change bounded (``settings``,
    :class:`OptimizeSettings`); it stops early once ``new`` is the top-1 answer of every edit prompt by the
    margin. ``Edit.info`` has the steps taken and whether it succeeded. Either way the edit is an :class:`Edit`
    (bit-exact ``revert()``); a failure leaves the model unedited."""
    if method not in UPDATE_METHODS:
        raise KneuronsError(f"update method must be one of {', '.join(UPDATE_METHODS)}, got {method!r}")
    nrns = _neurons(handle, neurons)
    if not isinstance(old_target, str) or not isinstance(new_target, str) or not new_target.strip():
        raise KneuronsError("the old and new targets must be non-empty strings")
    if old_target.strip() == new_target.strip():
        raise KneuronsError(f"the new target equals the old one ({old_target!r})")
    if method == "optimize":
        cfg = (settings or OptimizeSettings()).check()
        if prompts is None:
            prompts = [prompt] if prompt is not None else list(getattr(neurons, "prompts", []) or [])
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        locality = [locality] if isinstance(locality, str) else list(locality)
        if not prompts:
            raise KneuronsError("method='optimize' needs the edit prompt(s) (prompt= or prompts=)")
        _check_editable(handle)
        deltas, info = _optimized_deltas(handle, nrns, new_target, prompts, locality, cfg)
        info.update(old=old_target, new=new_target, method="optimize", prompts=prompts, locality=len(locality),
                    settings=dataclasses.asdict(cfg))
        return _apply(Edit(handle, "update", nrns, info),
                      lambda l, i, slot: (slot.to(deltas[(l, i)].dtype) + deltas[(l, i)].to(slot.device)).to(slot.dtype))
    if settings is not None or locality or prompts is not None:
        raise KneuronsError("prompts=, locality= and settings= belong to method='optimize'")
    for lam, name in ((lambda1, "lambda1"), (lambda2, "lambda2")):
        if not isinstance(lam, (int, float)) or not math.isfinite(lam):
            raise KneuronsError(f"{name} must be a finite number")
    _check_editable(handle)
    if prompt is None and hasattr(neurons, "prompts") and neurons.prompts:
        prompt = neurons.prompts[0]
    if vectors is None:
        e_old, e_new = target_vectors(handle, [old_target, new_target], prompt, space)
    else:
        e_old, e_new = (torch.as_tensor(v).double() for v in vectors)
        if e_old.shape != (handle.arch.d_model,) or e_new.shape != (handle.arch.d_model,):
            raise KneuronsError(f"vectors must be two vectors of the model width ({handle.arch.d_model}), got "
                                f"{tuple(e_old.shape)} and {tuple(e_new.shape)}")
    for vec, name in ((e_old, old_target), (e_new, new_target)):
        if not torch.isfinite(vec).all() or float(vec.norm()) == 0:
            raise KneuronsError(f"target {name!r} has a zero or non-finite target vector ({space} space); cannot "
                                "scale by it")
    def rule(l, i, slot):
        v = slot.double()
        norm = v.norm()
        new = v - lambda1 * norm / e_old.norm() * e_old.to(v.device) + lambda2 * norm / e_new.norm() * e_new.to(v.device)
        return new.to(slot.dtype)

    return _apply(Edit(handle, "update", nrns, {"old": old_target, "new": new_target, "lambda1": lambda1,
                                                "lambda2": lambda2, "space": space, "method": "rule"}), rule)


def shared_neurons(neuron_sets: Iterable, min_facts: int | None = 5, top_k: int | None = None) -> list[Neuron]:
    """Neurons appearing in at least ``min_facts`` of the sets, or the ``top_k`` most frequent."""
    if min_facts is None and top_k is None:
        raise KneuronsError("give min_facts or top_k")
    for name, v in (("min_facts", min_facts), ("top_k", top_k)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise KneuronsError(f"{name} must be an integer >= 1, got {v!r}")
    counts = Counter(n for s in neuron_sets for n in set(as_neurons(getattr(s, "neurons", s))))
    if top_k is not None:
        return sorted(n for n, _ in counts.most_common(int(top_k)))
    return sorted(n for n, c in counts.items() if c >= int(min_facts))


def unknown_token(tokenizer) -> tuple[int | None, str]:
    """The id of the tokenizer's unknown token — a BERT-style [UNK]/<unk> that stands for no word — or ``None``
    and the reason. Byte-level vocabularies (GPT-2, SmolLM2, OPT, ...) have none: they name a document or sequence
    marker (``<|endoftext|>``, ``</s>``) as their "unknown" token, and filling value slots with it would write that
    marker, not an unknown word."""
    unk = getattr(tokenizer, "unk_token_id", None)
    name = getattr(tokenizer, "unk_token", None)
    if unk is None or name is None:
        return None, "the tokenizer has no unknown token"
    # not pad: fine-tunes often pad with their real <unk>
    markers = {getattr(tokenizer, f"{k}_token_id", None) for k in ("bos", "eos", "sep", "cls")}
    if unk in markers or "unk" not in str(name).lower():
        return None, f"the tokenizer's unknown token {name!r} is a sequence marker, not an unknown word"
    return int(unk), ""


def erase_relation(handle, neuron_sets: Iterable | None = None, min_facts: int | None = 5,
                   top_k: int | None = None, mode: str = "zero", neurons=None) -> Edit:
    """Erase a relation: value slots of the neurons shared by its facts become zero or the [UNK] vector.

    Either ``neuron_sets`` (the facts' knowledge neurons; the neurons in at least ``min_facts`` of them, or the
    ``top_k`` most frequent, are erased) or ``neurons``: the relation's neurons themselves, e.g. the result of
    :func:`kneurons.relation_neurons`."""
    if mode not in ("zero", "unk"):
        raise KneuronsError(f"mode must be 'zero' or 'unk', got {mode!r}")
    if (neuron_sets is None) == (neurons is None):
        raise KneuronsError("give the facts' neuron sets or the relation's neurons (neurons=), one of them")
    if neurons is not None:
        chosen = check_neurons(handle, neurons, "neurons")  # refuses an empty set
        min_facts = top_k = None
    else:
        neuron_sets = list(neuron_sets)
        for k, s in enumerate(neuron_sets):  # every set checked against the model: shape, ids, name (empty allowed)
            if as_neurons(getattr(s, "neurons", s), f"neuron set {k}"):
                check_neurons(handle, s, f"neuron set {k}")
        chosen = shared_neurons(neuron_sets, min_facts, top_k)
        if not chosen:
            raise KneuronsError(f"no neuron is shared by {min_facts} or more facts of the relation (lower "
                                "min_facts or use top_k)")
    nrns = _neurons(handle, chosen)
    _check_editable(handle)
    fill = None
    if mode == "unk":
        unk, why = unknown_token(handle.tokenizer)
        if unk is None:
            warnings.warn(f"{why}: erasing with zero vectors instead", stacklevel=2)
            mode = "zero"
        else:
            U = handle.arch.unembedding()
            if U.shape[1] != handle.arch.d_model:
                raise KneuronsError("output embeddings are not in the model width; use mode='zero'")
            fill = U[unk].detach()
    return _apply(Edit(handle, "erase", nrns, {"mode": mode, "min_facts": min_facts, "top_k": top_k,
                                               "given_neurons": neurons is not None}),
                  lambda l, i, slot: torch.zeros_like(slot) if fill is None else fill.to(slot.dtype))


# -------------------------------------------------------------------------------------------- metrics

def perplexity(handle, prompts: Sequence[str], targets, batch_size: int = 32) -> float:
    """exp of the mean −log p(gold) over prompts (the paper's intra/inter-relation perplexity)."""
    if not prompts:
        return float("nan")
    return perplexity_of(assess(handle, list(prompts), targets if isinstance(targets, str) else list(targets),
                                batch_size=batch_size))


def accuracy(handle, prompts: Sequence[str], targets, batch_size: int = 32) -> float:
    if not prompts:
        return float("nan")
    res = assess(handle, list(prompts), targets if isinstance(targets, str) else list(targets), batch_size=batch_size)
    return sum(a.correct for a in res) / len(res)


def success(handle, prompts: Sequence[str], new_target: str, k: int = 1) -> float:
    """Fraction of prompts where ``new_target``'s first token ranks within the top ``k``."""
    res = assess(handle, list(prompts), new_target)
    return sum(a.rank <= k for a in res) / len(res)


def save_edited(handle, directory) -> Path:
    """Save the (edited) model and tokenizer with ``save_pretrained``; reload with :func:`kneurons.load_model`.

    ``directory`` must be new or empty. The files are written into a temporary sibling and published with one
    rename (:func:`kneurons._io.atomic_dir`): a full disk, an error or Ctrl-C leaves ``directory`` as it was."""
    from ._io import atomic_dir, check_new_dir

    d = Path(directory)
    tensors = {t.data_ptr(): t.numel() * t.element_size() for t in handle.model.state_dict().values()}  # tied once
    check_new_dir(d, min_free=sum(tensors.values()) + (16 << 20), parents=False)

    def build(tmp: Path) -> None:
        handle.model.save_pretrained(tmp)
        handle.tokenizer.save_pretrained(tmp)

    return atomic_dir(d, build, replace=False)
