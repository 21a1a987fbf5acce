"""The one hook mechanism: forward pre-hooks on the FFN output projections.

Everything that reads or changes neurons — capturing activations, integrated-gradient scaling, suppress and
amplify — goes through :func:`ffn_hooks`, which installs one forward pre-hook per layer's FFN output
projection and calls ``fn(layer, x)`` with the projection's input ``x`` (``[batch, seq, d_ff]``). ``fn`` returns
a replacement tensor or ``None`` (leave unchanged). Hooks are always removed on exit, also on error.

Interventions at the *blank* position (:func:`register_blank_hook`) need each batch row's blank, which only a
kneurons scoring function knows: it passes the positions explicitly for its forward pass (:func:`at_blanks`).
Registrations are kept per model, so every handle of a model sees them.

:func:`replay_layers` is the one compute shortcut: blocks below a patched layer are identical for every row of
a batch, so their outputs are replayed from a cached clean run instead of recomputed. :func:`head_inputs` lets
the attribution engine score the LM head itself (a fused, vocabulary-chunked log-probability) instead of the
model materialising full logits.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from .architectures import ResolvedArch
from .errors import KneuronsError

HookFn = Callable[[int, torch.Tensor], "torch.Tensor | None"]

BlankFn = Callable[[int, torch.Tensor, torch.Tensor], "torch.Tensor | None"]


@dataclass(eq=False)
class BlankHook:
    """``fn(layer, x, blanks)`` on the FFN inputs of ``layers``, acting at one (blank) position per batch row."""

    arch: ResolvedArch
    layers: list[int]
    fn: BlankFn
    installed: object = None  # the ffn_hooks context in place now: the guard, or fn bound to a batch's blanks

    def install(self, fn: HookFn) -> None:
        if self.installed is not None:
            self.installed.__exit__(None, None, None)
        self.installed = ffn_hooks(self.arch, fn, self.layers)
        self.installed.__enter__()

    def remove(self) -> None:
        if self.installed is not None:
            self.installed.__exit__(None, None, None)
            self.installed = None


#: the blank-position hooks registered on each model (every handle of a model sees them), oldest first
_BLANK_HOOKS: "weakref.WeakKeyDictionary[torch.nn.Module, list[BlankHook]]" = weakref.WeakKeyDictionary()


def _guard(layer: int, x: torch.Tensor):
    raise KneuronsError("position='blank' needs a kneurons scoring function (kneurons.assess, measure_intervention) "
                        "to say where the blank is; use position='all' for your own forward passes")


def register_blank_hook(arch: ResolvedArch, model: torch.nn.Module, layers: Iterable[int], fn: BlankFn) -> BlankHook:
    """Register ``fn`` to act at the blank positions of every kneurons scoring call on ``model`` until
    :func:`unregister_blank_hook`. Meanwhile any other forward pass of the model is refused (a guard hook): the
    model alone cannot say where the blank is."""
    hook = BlankHook(arch, sorted(set(int(l) for l in layers)), fn)
    hook.install(_guard)
    _BLANK_HOOKS.setdefault(model, []).append(hook)
    return hook


def unregister_blank_hook(model: torch.nn.Module, hook: BlankHook) -> None:
    hook.remove()
    hooks = _BLANK_HOOKS.get(model, [])
    if hook in hooks:
        hooks.remove(hook)


@contextlib.contextmanager
def at_blanks(model: torch.nn.Module, blanks: torch.Tensor):
    """For the forward passes inside: the blank-position hooks registered on ``model`` act at ``blanks`` (one
    position per batch row, passed explicitly by the scoring function), in place of their guards."""
    swapped = []
    try:
        for hook in list(_BLANK_HOOKS.get(model, ())):
            hook.install(lambda layer, x, _fn=hook.fn: _fn(layer, x, blanks))
            swapped.append(hook)
        yield
    finally:
        for hook in swapped:
            hook.install(_guard)


@contextlib.contextmanager
def ffn_hooks(arch: ResolvedArch, fn: HookFn, layers: Iterable[int] | None = None):
    """Install ``fn`` as a forward pre-hook on the FFN output projection of ``layers`` (default all)."""
    handles = []
    chosen = range(arch.n_layers) if layers is None else sorted(set(int(l) for l in layers))
    shapes: dict[int, tuple[int, int]] = {}
    try:
        for layer in chosen:
            module = arch.ffn_out[layer]

            def block_hook(mod, args, kwargs, _layer=layer):
                h = args[0] if args else kwargs.get("hidden_states")
                if isinstance(h, torch.Tensor) and h.dim() == 3:
                    shapes[_layer] = (h.shape[0], h.shape[1])

            def hook(mod, args, _layer=layer):
                x = args[0]
                flat = None
                if x.dim() == 2 and _layer in shapes:  # e.g. OPT flattens [batch*seq, d_ff] before fc2
                    _, s = shapes[_layer]
                    if s > 0 and x.shape[0] % s == 0:
                        flat = x.shape
                        x = x.reshape(x.shape[0] // s, s, x.shape[-1])
                if x.dim() != 3:
                    raise KneuronsError(
                        f"layer {_layer}: the FFN input has shape {tuple(x.shape)}, not [batch, seq, d_ff] (an unpadded "
                        "attention implementation?); load the model with attn_implementation='eager' or 'sdpa'")
                new = fn(_layer, x)
                if new is None:
                    return None
                if flat is not None:
                    new = new.reshape(flat)
                return (new,) + tuple(args[1:])

            handles.append(arch.layers[layer].register_forward_pre_hook(block_hook, with_kwargs=True))
            handles.append(module.register_forward_pre_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


class Capture:
    """Stores the FFN activations seen by :func:`ffn_hooks` (optionally at chosen positions only)."""

    def __init__(self, positions: torch.Tensor | None = None, detach: bool = True):
        self.positions = positions  # [batch] index of one position per row, or None for all
        self.detach = detach
        self.acts: dict[int, torch.Tensor] = {}

    def __call__(self, layer: int, x: torch.Tensor):
        t = x.detach() if self.detach else x
        if self.positions is not None:
            t = t[torch.arange(t.shape[0], device=t.device), self.positions.to(t.device)]
        self.acts[layer] = t.clone() if self.detach else t
        return None

    def stacked(self) -> torch.Tensor:
        """``[n_layers, batch, (seq,) d_ff]`` in layer order."""
        return torch.stack([self.acts[k] for k in sorted(self.acts)])


@contextlib.contextmanager
def capture(arch: ResolvedArch, positions: torch.Tensor | None = None, layers=None):
    """Context manager yielding a :class:`Capture` filled by the next forward pass."""
    cap = Capture(positions)
    with ffn_hooks(arch, cap, layers):
        yield cap


@contextlib.contextmanager
def capture_layer_outputs(arch: ResolvedArch, layers: Iterable[int]):
    """Record the raw output object of the given blocks (for :func:`replay_layers`)."""
    store: dict[int, object] = {}
    handles = []
    try:
        for layer in layers:
            def hook(mod, args, output, _layer=layer):
                store[_layer] = _map_tensors(output, lambda t: t.detach())
            handles.append(arch.layers[layer].register_forward_hook(hook))
        yield store
    finally:
        for h in handles:
            h.remove()


def _map_tensors(obj, f):
    if isinstance(obj, torch.Tensor):
        return f(obj)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*[_map_tensors(o, f) for o in obj])
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map_tensors(o, f) for o in obj)
    if isinstance(obj, dict):
        return type(obj)({k: _map_tensors(v, f) for k, v in obj.items()})
    return obj


def _expand(t: torch.Tensor, rows: int) -> torch.Tensor:
    return t.expand(rows, *t.shape[1:]).contiguous() if t.dim() > 0 and t.shape[0] == 1 else t


def _slice_rows(obj, n: int, rows: int):
    """The first ``n`` rows of every batch-shaped tensor (``dim >= 2`` with ``rows`` rows) in ``obj``."""
    if isinstance(obj, torch.Tensor):
        return obj[:n] if obj.dim() >= 2 and obj.shape[0] == rows else obj
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(_slice_rows(o, n, rows) for o in obj)
    if isinstance(obj, list):
        return [_slice_rows(o, n, rows) for o in obj]
    return obj


def _join_rows(computed, cached, n: int):
    """Rows ``:n`` from ``computed``, rows ``n:`` from ``cached`` (same structure)."""
    if isinstance(computed, torch.Tensor) and isinstance(cached, torch.Tensor):
        if computed.dim() >= 1 and computed.shape[0] == n and cached.shape[0] > n:
            return torch.cat([computed, cached[n:].to(computed.dtype)], 0)
        return computed
    if isinstance(computed, tuple) and isinstance(cached, tuple) and len(computed) == len(cached):
        joined = [_join_rows(a, b, n) for a, b in zip(computed, cached)]
        return type(computed)(*joined) if hasattr(computed, "_fields") else tuple(joined)
    return computed


@contextlib.contextmanager
def replay_layers(arch: ResolvedArch, outputs: dict[int, object], rows: int, active: dict[int, int] | None = None):
    """Skip recomputing blocks whose rows are all (or partly) clean.

    ``outputs[j]`` is block ``j``'s output in the clean run (batch 1). ``active[j]`` (default 0) is how many
    *leading* rows of the batch really need block ``j``: 0 replays the cached output for every row; ``0 < n <
    rows`` runs the block on the first ``n`` rows only (every batch-shaped argument is cut to them; a KV cache
    passed in must already hold ``n`` rows for that block) and fills the other rows from the cache. Valid only
    when the rows left out see exactly the clean run's input at block ``j`` (true below each row's patched
    layer, when rows are sorted by patched layer).
    """
    saved = []
    active = active or {}
    try:
        for layer, out in outputs.items():
            n = int(active.get(layer, 0))
            if n >= rows:
                continue
            module = arch.layers[layer]
            expanded = _map_tensors(out, lambda t: _expand(t, rows))
            if n <= 0:
                def fwd(*args, _out=expanded, **kwargs):
                    return _out
            else:
                original = module.forward

                def fwd(*args, _out=expanded, _n=n, _orig=original, **kwargs):
                    args = _slice_rows(args, _n, rows)
                    kwargs = {k: _slice_rows(v, _n, rows) for k, v in kwargs.items()}
                    return _join_rows(_orig(*args, **kwargs), _out, _n)

            saved.append((module, module.__dict__.get("forward")))
            module.forward = fwd
        yield
    finally:
        for module, old in reversed(saved):
            if old is None:
                del module.forward
            else:
                module.forward = old


@contextlib.contextmanager
def head_inputs(module: torch.nn.Module, store: list, placeholder: str = "zeros"):
    """Run the model without computing its output projection ``module`` (an ``nn.Linear``, the LM head).

    Every call appends the module's input to ``store`` and returns, instead of the logits, zeros of the logits'
    shape: ``placeholder="zeros"`` a real tensor (safe whatever the model does with it), ``"expand"`` a stride-0
    view that costs nothing (only where the model is known to return the head's output unchanged).
    """
    vocab = int(module.weight.shape[0])

    def fwd(x, *args, **kwargs):
        store.append(x)
        shape = (*x.shape[:-1], vocab)
        if placeholder == "expand":
            return x.detach().new_zeros(()).expand(shape)
        return x.detach().new_zeros(shape)

    old = module.__dict__.get("forward")
    module.forward = fwd
    try:
        yield store
    finally:
        if old is None:
            del module.forward
        else:
            module.forward = old


@contextlib.contextmanager
def frozen_parameters(model: torch.nn.Module):
    """Temporarily set ``requires_grad=False`` on every parameter (gradients only w.r.t. activations)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)


@contextlib.contextmanager
def observe_blocks(arch: ResolvedArch, fn: Callable[[int, str], None]):
    """Observe the model's passes block by block, changing nothing: ``fn(layer, "forward")`` after each block's
    forward, and ``fn(layer, "backward")`` when the gradient with respect to that block's output has been computed
    (a tensor hook that returns ``None``, so the gradient is left as it is). A heartbeat for long passes — the
    explorer shows it while an attribution's pass runs, between the engine's per-pass ``progress`` calls."""

    def forward_hook(layer: int):
        def hook(mod, args, out):
            fn(layer, "forward")
            h = out[0] if isinstance(out, tuple) else out
            if isinstance(h, torch.Tensor) and h.requires_grad:
                h.register_hook(lambda grad: fn(layer, "backward"))
            return None
        return hook

    handles = [arch.layers[layer].register_forward_hook(forward_hook(layer)) for layer in range(arch.n_layers)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
