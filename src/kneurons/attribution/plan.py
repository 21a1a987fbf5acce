"""The execution plan: how the engine computes an attribution, decided once, up front, per prompt.

Each shortcut of the engine is one word, the same in the options, the model's capabilities, the plan, the
result's ``params`` and the README:

``use_cache``
    causal models: the prompt before the blank runs once; every row runs only the blank and target positions
    on its KV cache.
``prefix_from_clean_run``
    that KV cache is cut from the clean run's (no separate prefix pass). Needs a plain dynamic cache (not a
    sliding-window one) and blocks that return only their hidden states (BLOOM, Falcon and GPT-Neo also
    return attention weights).
``replay``
    blocks below a row's patched layer are not recomputed: their clean outputs are replayed.
``partial_blocks``
    a block runs only on the rows patched at or below it, the others replay it. Needs every batch-shaped
    argument of a block to have the batch as its first dimension (not BLOOM's ALiBi bias, ``[batch * heads,
    ...]``) and, with a KV cache, cache layers that can be cut to those rows.
``head_on_scored_positions``
    rows that run the whole sequence (no KV cache) feed the LM head only their scored positions (a hook cuts
    the last block's output). Needs a model that does not reshape after its last block (GPT-2 does).
``fused_head``
    the LM head is scored by the fused, vocabulary-chunked log-probability (:mod:`.head`). Needs a model that
    returns its plain ``nn.Linear`` head's output unchanged (not Gemma-2's soft-capped logits) in float32/64.

:class:`Options` say which shortcuts the caller allows (all, by default); :class:`Capabilities` which ones the
model allows — declared in its :class:`~kneurons.architectures.ArchSpec` (``True``/``False``) or ``"probe"``,
settled by :func:`probe` once per handle (cached in ``handle.capabilities``); :func:`decide` combines both into a
frozen :class:`ExecutionPlan`. Results do not depend on the plan (tests force every plan against a naive loop);
speed and memory do. ``params`` records the plan and which capabilities were probed.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass

import torch

from ..architectures import CAPABILITIES  # the ones an ArchSpec declares: True / False / "probe"
from ..errors import KneuronsError
from ..hooks import capture_layer_outputs, replay_layers
from ..prompts import Encoded, config_int
from .head import chunk_rows, plain_linear_head
from .methods import IntegrationPath, check_steps, get_method, get_score
from .rows import PassShape

SHORTCUTS = ("use_cache", "prefix_from_clean_run", "replay", "partial_blocks", "head_on_scored_positions",
             "fused_head")
#: older option names, still accepted
RENAMED = {"slice_head": "head_on_scored_positions"}
#: cache layer types whose update() rebinds its tensors (never writes into them): safe to shallow-copy
SHALLOW_COPY_LAYERS = frozenset({"DynamicLayer", "DynamicSlidingWindowLayer"})
_OOM = tuple(t for t in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None))
             if isinstance(t, type))


# ------------------------------------------------------------------------------------------- options

@dataclass(frozen=True)
class Options:
    """What to compute (method, path, score, layers) and how (rows per pass, prompt batching, the shortcuts the
    caller allows)."""

    method: str
    path: IntegrationPath
    score: str
    layers: tuple[int, ...]
    batch_size: int | None = None
    batch_prompts: bool = False
    use_cache: bool = True
    prefix_from_clean_run: bool = True
    replay: bool = True
    partial_blocks: bool = True
    head_on_scored_positions: bool = True
    fused_head: bool = True
    foils: tuple[str, ...] = ()  # other answers a contrastive score compares the target with

    @classmethod
    def build(cls, handle, steps=20, score="prob", batch_size=None, layers=None, method="integrated_gradients",
              path=None, batch_prompts=False, foils=None, **shortcuts) -> "Options":
        """Checked options (one-line :class:`KneuronsError` for bad values)."""
        for old, new in RENAMED.items():
            if old in shortcuts:
                if new in shortcuts:
                    raise KneuronsError(f"give {new} only ({old} is its older name)")
                warnings.warn(f"{old} is now called {new}", DeprecationWarning, stacklevel=4)
                shortcuts[new] = shortcuts.pop(old)
        unknown = set(shortcuts) - set(SHORTCUTS)
        if unknown:
            raise KneuronsError(f"unknown option(s): {', '.join(sorted(unknown))}")
        check_steps(steps)
        foils = check_foils(get_score(score), foils)
        if batch_size is not None and (not isinstance(batch_size, int) or isinstance(batch_size, bool)
                                       or batch_size < 1):
            raise KneuronsError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        m = get_method(method)
        if m.kind != "attribution":
            raise KneuronsError(f"method {m.name!r} does not attribute by gradients; locate(..., method="
                                f"{m.name!r}) finds its neurons")
        if path is None:
            path = m.path(steps)
        elif not isinstance(path, IntegrationPath):
            raise KneuronsError(f"path must be an IntegrationPath, got {type(path).__name__}")
        path.check_baseline(handle.n_layers, handle.d_ff)
        L = handle.n_layers
        layers = list(range(L)) if layers is None else sorted(set(int(l) for l in layers))
        if not layers:
            raise KneuronsError("layers is empty: name at least one layer (or None for all)")
        if any(l < 0 or l >= L for l in layers):
            raise KneuronsError(f"layers must be in 0..{L - 1}")
        return cls(m.name, path, score, tuple(layers), batch_size, bool(batch_prompts),
                   **{k: bool(v) for k, v in shortcuts.items()}, foils=foils)


def check_foils(score, foils) -> tuple[str, ...]:
    """The foils a score needs, as a tuple of distinct stripped strings (one-line :class:`KneuronsError`: a
    contrastive score without foils, foils for a score that does not use them, an empty foil)."""
    if foils is None or (not isinstance(foils, str) and len(foils) == 0):
        if score.needs_foils:
            raise KneuronsError(f"score {score.name!r} needs foils: other answers of the relation to contrast the "
                                "target with (foils=[...], --foils)")
        return ()
    if not score.needs_foils:
        raise KneuronsError(f"foils are used only by a contrastive score, not by score {score.name!r}")
    if isinstance(foils, str):
        raise KneuronsError("foils must be a list of answers, not one string")
    out = []
    for f in foils:
        if not isinstance(f, str) or not f.strip():
            raise KneuronsError(f"every foil must be a non-empty answer, got {f!r}")
        if f.strip() not in out:
            out.append(f.strip())
    return tuple(out)


# ------------------------------------------------------------------------------------------- capabilities

@dataclass(frozen=True)
class Capabilities:
    """What the model allows. ``use_cache``, ``cache_layers`` and ``plain_block_outputs`` are observed on the
    probe forward; the :data:`CAPABILITIES` ones come from the ArchSpec unless it says ``"probe"`` (then
    ``probed`` names them)."""

    use_cache: bool  # the model returns a KV cache the rows can reuse (causal models)
    cache_layers: tuple[str, ...]  # that cache's layer types
    plain_block_outputs: bool  # every block returns one [batch, seq, ...] tensor
    prefix_from_clean_run: bool
    partial_blocks: bool
    head_on_scored_positions: bool
    fused_head: bool
    batch_prompts: bool
    probed: tuple[str, ...] = ()


def capabilities(handle, enc: Encoded) -> Capabilities:
    """The handle's capabilities: declared ones from its ArchSpec, the others from :func:`probe` — run once
    per handle on this prompt and kept in ``handle.capabilities``."""
    spec = handle.arch.spec
    found = handle.capabilities
    to_probe = [name for name in CAPABILITIES if getattr(spec, name) == "probe"]
    if "use_cache" not in found or any(name not in found for name in to_probe):
        found.update(probe(handle, enc, trials=[n for n in to_probe if n not in found]))
    declared = {name: (bool(found[name]) if getattr(spec, name) == "probe" else bool(getattr(spec, name)))
                for name in CAPABILITIES}
    return Capabilities(bool(found["use_cache"]), tuple(found["cache_layers"]), bool(found["plain_block_outputs"]),
                        batch_prompts=bool(spec.batch_prompts), probed=tuple(to_probe), **declared)


def output_cache(out):
    for name in ("cache", "past_key_values"):
        c = getattr(out, name, None)
        if c is not None:
            return c
    return None


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape:
        return False
    tol = {torch.float64: 1e-9, torch.float32: 1e-4}.get(b.dtype, 1e-2)
    a, b = a.double(), b.double()
    scale = float(b.abs().max()) if b.numel() else 0.0
    return bool(torch.isfinite(a).all()) and float((a - b).abs().max()) <= tol * max(scale, 1e-30)


def probe(handle, enc: Encoded, trials=()) -> dict:
    """Observe the model on one prompt. One forward (no gradient) shows whether it returns a reusable KV cache
    and of which layer types, whether its blocks return plain hidden states, and whether it returns its plain
    linear head's output unchanged — which settles ``prefix_from_clean_run`` and ``fused_head`` by inspection.
    ``partial_blocks`` and ``head_on_scored_positions`` (when named in ``trials``) are settled by running the
    shortcut once and comparing its logits with the plain forward's: a shortcut the model cannot take raises
    inside the model or gives other numbers. This is the one place where the engine tries something and
    catches an error; out-of-memory errors propagate."""
    model, arch = handle.model, handle.arch
    ids = torch.tensor([enc.input_ids], device=handle.device)
    S = ids.shape[1]
    head = plain_linear_head(model)
    head_out: list = []
    hook = None
    if head is not None:  # a copy: a model that edits its logits in place after the head must not match
        hook = head.register_forward_hook(
            lambda mod, args, out: head_out.append(out.detach().clone() if isinstance(out, torch.Tensor) else None))
    kw = {"use_cache": True} if handle.is_causal else {}
    try:
        with torch.no_grad(), capture_layer_outputs(arch, range(arch.n_layers)) as outs:
            out = model(input_ids=ids, **kw)
    finally:
        if hook is not None:
            hook.remove()
    logits = out.logits.detach()
    cache = output_cache(out) if handle.is_causal else None
    layers = getattr(cache, "layers", None)
    use_cache = cache is not None and hasattr(cache, "batch_repeat_interleave")
    cache_layers = tuple(type(layer).__name__ for layer in layers) if use_cache and isinstance(layers, list) else ()
    plain = all(isinstance(o, torch.Tensor) and o.dim() >= 2 and tuple(o.shape[:2]) == (1, S) for o in outs.values())
    found = {
        "use_cache": use_cache, "cache_layers": cache_layers, "plain_block_outputs": plain,
        "prefix_from_clean_run": bool(use_cache and plain and cache_layers
                                      and all(t == "DynamicLayer" for t in cache_layers)),
        "fused_head": bool(len(head_out) == 1 and head_out[0] is not None and head_out[0].dtype == logits.dtype
                           and head_out[0].shape == logits.shape and torch.equal(head_out[0], logits)),
    }
    off = {"use_cache": False} if handle.is_causal else {}
    if "head_on_scored_positions" in trials:
        pos = torch.tensor(enc.score_positions, device=ids.device)
        cut = {"done": False}

        def cut_last(mod, args, o):
            h = o[0] if isinstance(o, tuple) and o else o
            if not (isinstance(h, torch.Tensor) and h.dim() == 3 and h.shape[1] == S):
                return None
            cut["done"] = True
            return (h[:, pos],) + tuple(o[1:]) if isinstance(o, tuple) else h[:, pos]

        def cut_run():
            h = arch.layers[-1].register_forward_hook(cut_last)
            try:
                return model(input_ids=ids, **off).logits
            finally:
                h.remove()

        got = _trial(cut_run)
        found["head_on_scored_positions"] = bool(got is not None and cut["done"] and _close(got, logits[:, pos]))
    if "partial_blocks" in trials:
        def partial_run():  # two rows: every block runs on the first only and replays the clean output for the other
            with replay_layers(arch, outs, 2, {j: 1 for j in range(arch.n_layers)}):
                return model(input_ids=ids.expand(2, -1), **off).logits

        got = _trial(partial_run)
        found["partial_blocks"] = bool(got is not None and _close(got, logits.expand(2, -1, -1)))
    return found


def _trial(fn):
    """``fn()`` under no_grad, or ``None`` if the model cannot run it (errors other than out-of-memory)."""
    try:
        with torch.no_grad():
            return fn().detach()
    except _OOM:
        raise
    except (RuntimeError, ValueError, IndexError):
        return None


# ------------------------------------------------------------------------------------------- the plan

@dataclass(frozen=True)
class ExecutionPlan:
    """How one prompt (or a group of prompts sharing passes) is computed. See the module docstring for the
    shortcuts; ``cache_copy`` is how each pass gets its private copy of the prefix KV cache: ``"shallow"``
    (cache layers rebind their tensors on update, so copying the layer objects suffices, and a layer can be
    cut to a pass's leading rows), ``"deep"`` (any other cache: a deep copy per pass) or ``"none"``."""

    use_cache: bool
    prefix_from_clean_run: bool
    cache_copy: str
    replay: bool
    partial_blocks: bool
    head_on_scored_positions: bool
    fused_head: bool
    probed: tuple[str, ...] = ()

    def __post_init__(self):
        problems = []
        if self.cache_copy not in ("shallow", "deep", "none"):
            problems.append(f"cache_copy {self.cache_copy!r}")
        if self.use_cache != (self.cache_copy != "none"):
            problems.append("use_cache needs cache_copy 'shallow' or 'deep', and only then")
        if self.prefix_from_clean_run and not self.use_cache:
            problems.append("prefix_from_clean_run needs use_cache")
        if self.partial_blocks and not self.replay:
            problems.append("partial_blocks needs replay")
        if self.partial_blocks and self.cache_copy == "deep":
            problems.append("partial_blocks needs a cache that can be cut to a pass's rows (cache_copy 'shallow')")
        if self.head_on_scored_positions and self.use_cache:
            problems.append("head_on_scored_positions applies to rows without a KV cache")
        if problems:
            raise KneuronsError("inconsistent execution plan: " + "; ".join(problems))

    def replace(self, **changes) -> "ExecutionPlan":
        """A copy with some fields changed (checked again)."""
        return dataclasses.replace(self, **changes)

    def params(self) -> dict:
        return {"use_cache": self.use_cache, "prefix_from_clean_run": self.prefix_from_clean_run,
                "cache_copy": self.cache_copy, "replay": self.replay, "partial_blocks": self.partial_blocks,
                "head_on_scored_positions": self.head_on_scored_positions, "fused_head": self.fused_head,
                "probed": list(self.probed)}


def decide(handle, caps: Capabilities, options: Options, enc: Encoded) -> ExecutionPlan:
    """Each shortcut where the options allow it, the model can take it and the prompt suits it."""
    use_cache = bool(options.use_cache and handle.is_causal and caps.use_cache and enc.blank >= 1)
    if not use_cache:
        cache_copy = "none"
    elif caps.cache_layers and all(t in SHALLOW_COPY_LAYERS for t in caps.cache_layers):
        cache_copy = "shallow"
    else:
        cache_copy = "deep"
    head = plain_linear_head(handle.model)
    return ExecutionPlan(
        use_cache=use_cache,
        prefix_from_clean_run=use_cache and options.prefix_from_clean_run and caps.prefix_from_clean_run,
        cache_copy=cache_copy,
        replay=options.replay,
        partial_blocks=options.replay and options.partial_blocks and caps.partial_blocks and cache_copy != "deep",
        head_on_scored_positions=(not use_cache) and options.head_on_scored_positions
        and caps.head_on_scored_positions,
        fused_head=bool(options.fused_head and caps.fused_head and head is not None
                        and head.weight.dtype in (torch.float32, torch.float64)),
        probed=caps.probed,
    )


def group_key(handle, caps: Capabilities, plan: ExecutionPlan, enc: Encoded):
    """Prompts with equal keys can share passes (``None``: this prompt runs alone): same plan, and either
    KV-cached prefixes (padded together: plain dynamic cache layers) with the same moving positions and
    target, or masked prompts with the same target whose LM head runs on the scored positions. Blocks must
    return plain hidden states (stacked per prompt) and run on partial rows."""
    if handle.arch.guessed or not caps.batch_prompts or not caps.plain_block_outputs or not plan.partial_blocks:
        return None
    if plan.use_cache and caps.cache_layers and all(t == "DynamicLayer" for t in caps.cache_layers):
        n = enc.blank
        return ("kv", plan, len(enc.input_ids) - n, tuple(p - n for p in enc.score_positions),
                tuple(enc.target_ids))
    if not plan.use_cache and handle.is_masked and plan.head_on_scored_positions:
        return ("masked", plan, tuple(enc.target_ids))
    return None


# ------------------------------------------------------------------------------------------- memory

#: attention implementations that do not keep the attention weights (measured on CPU with sdpa for 21 of the
#: table's architectures: only Falcon's own sdpa call keeps them, ``ArchSpec.sdpa_keeps_weights``)
FUSED_ATTENTION = ("sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")


def available_memory(device) -> int | None:
    """Bytes the engine may still allocate on ``device``: on CUDA the device's free memory plus what PyTorch's
    allocator holds unused; on CPU the system's ``MemAvailable`` (Linux ``/proc/meminfo``) or its free physical
    pages; ``None`` where unknown (then nothing is refused)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type != "cpu":
        return None
    if os.path.exists("/proc/meminfo"):
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    names = getattr(os, "sysconf_names", {})
    if "SC_AVPHYS_PAGES" in names and "SC_PAGE_SIZE" in names:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    return None


def pass_shape(handle, plan: ExecutionPlan, encs: list[Encoded]) -> PassShape:
    """The sizes a pass's memory depends on, for prompts sharing passes under ``plan`` (from the model's config
    where the ArchSpec does not say: heads, key/value heads, the attention implementation)."""
    arch = handle.arch
    config = getattr(handle.model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    d = arch.d_model
    heads = config_int(text, ("num_attention_heads", "n_head", "num_heads", "n_heads"), max(1, d // 64))
    kv_heads = 1 if getattr(text, "multi_query", False) is True else \
        config_int(text, ("num_key_value_heads", "num_kv_heads", "n_head_kv"), heads)
    head_dim = config_int(text, ("head_dim",), max(1, d // heads))
    tokens = max(len(e.input_ids) for e in encs)
    if plan.use_cache:
        prefix = max(e.blank for e in encs)
        positions = max(len(e.input_ids) - e.blank for e in encs)
    else:
        prefix, positions = 0, tokens
    scored = len(encs[0].score_positions)
    if plan.fused_head:
        logit_positions = 0
    elif plan.head_on_scored_positions:
        logit_positions = scored
    else:
        logit_positions = positions
    unembedding = arch.unembedding()
    itemsize = torch.empty((), dtype=handle.dtype).element_size()
    return PassShape(tokens=tokens, positions=positions, prefix=prefix, prompts=len(encs), n_layers=arch.n_layers,
                     d_model=d, d_ff=arch.d_ff, heads=heads, kv_width=2 * kv_heads * head_dim,
                     vocab=int(unembedding.shape[0]), itemsize=itemsize,
                     eager_attention=(getattr(config, "_attn_implementation", None) not in FUSED_ATTENTION
                                      or arch.spec.sdpa_keeps_weights),
                     logit_positions=logit_positions, scored=scored if plan.fused_head else 0,
                     head_chunk=chunk_rows(int(unembedding.shape[1]), unembedding.element_size()),
                     cache_copies=2 if plan.cache_copy == "deep" else 1)
