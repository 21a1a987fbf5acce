"""Integrated gradients over every FFN neuron (Dai et al. 2022, eq. 3), batched and exact.

For layer ``l`` let ``w`` be the FFN activation (the input of the FFN output projection) at the blank position
of the clean run. The attribution of neuron ``i`` is::

    Attr_i = w_i / m * sum_{k=1..m} dP(target | w_l := (k/m) w) / dw_i

with only layer ``l``'s activation at the blank position replaced (all other layers and positions run
normally), a zero baseline and ``m`` steps (default 20). ``P`` is the target's probability (``score="prob"``,
the paper's choice) or log-probability (``score="logprob"``); for multi-token targets it is the joint
probability defined in :mod:`kneurons.prompts`, attributed at the first blank position.

How it is fast — the numbers are those of the plain definition (tests compare against a naive reference):

1. one clean forward per prompt (no gradient) caches every block's output and the blank activations; for
   causal models it covers the whole prompt and its KV cache, cut to the positions before the blank, serves the
   rows (sliding-window caches, or blocks returning more than their hidden states: a separate prefix pass);
2. a batch row that patches layer ``l`` replays the cached outputs of blocks ``< l`` (they are identical for
   every row) instead of recomputing them;
3. causal models: positions before the blank never see the patch, so each row runs only the blank position
   and the teacher-forced target positions on that KV cache;
4. rows of all layers and steps share batches (sorted by layer, cut into ``batch_size`` rows); with
   ``attribute(..., batch_prompts=True)`` rows of several prompts too (padded, with attention masks);
5. gradients flow only to the scaled activations: parameters are frozen during attribution;
6. the LM head is scored by a fused function streamed over vocabulary chunks: each chunk of the unembedding
   matrix is read once for the logits, the running log-sum-exp and the softmax-weighted sum of unembeddings
   that the gradient needs (``dlogp/dh = e_t - E_p[e]``), and no ``[rows, vocab]`` logits tensor is kept.
   Used only where the clean run shows the model returns its plain ``nn.Linear`` head's output unchanged
   (no soft-capping or scaling) in float32/float64; otherwise the model's own logits are scored.

The ``k = m`` (``alpha = 1``) terms of all layers come from one "clean row" per prompt in the first pass: its
blank activation is multiplied by a unit vector at every layer, and the gradient w.r.t. those units is
``w * dP/dw`` at ``alpha = 1``. One row per layer with ``alpha = 0``, scored in the same passes but not
differentiated, reports completeness: ``sum_i Attr_i`` vs ``P(w) - P(0)``.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import __version__
from ._io import atomic_write
from .errors import KneuronsError
from .hooks import capture_layer_outputs, ffn_hooks, frozen_parameters, head_inputs, replay_layers
from .prompts import Encoded, encode, pad_id

SCORES = ("prob", "logprob")
# cache layer types whose update() rebinds its tensors (never writes into them): safe to shallow-copy
_SHALLOW_COPY_LAYERS = {"DynamicLayer", "DynamicSlidingWindowLayer"}
DEFAULT_BATCH_SIZE = None  # whole layers, about DEFAULT_TOKENS_PER_PASS row-positions per pass
DEFAULT_TOKENS_PER_PASS = 2048  # at most this many row-positions per pass on CPU (memory ~ this x layers)
DEFAULT_TOKENS_PER_PASS_GPU = 16384  # on a GPU bigger passes win (H200: all 252 rows of BERT-base in one pass)
DEFAULT_LOGITS_PER_PASS = 1 << 22  # without the fused head: at most this many logits ([rows, positions, vocab])
HEAD_CHUNK_BYTES = 8 << 20  # vocabulary chunk of the fused head: this many bytes of the unembedding matrix


def default_rows_per_pass(steps: int, positions: int, device: str = "cpu", logits_per_row: int = 0) -> int:
    """Rows per forward/backward pass when ``batch_size`` is not given: a budget of row-positions (each row
    runs ``positions`` positions through the blocks) and, where the model's own head materialises logits,
    of logits (``logits_per_row`` = scored positions x vocabulary; 0 with the fused head)."""
    tokens = DEFAULT_TOKENS_PER_PASS_GPU if str(device).startswith("cuda") else DEFAULT_TOKENS_PER_PASS
    rows = tokens // max(1, positions)
    if logits_per_row:
        rows = min(rows, DEFAULT_LOGITS_PER_PASS // logits_per_row)
    return max(steps, rows)


def model_info(handle) -> dict:
    return {"name": handle.name, "model_type": handle.model_type, "kind": handle.kind,
            "n_layers": handle.n_layers, "d_ff": handle.d_ff, "dtype": str(handle.dtype).replace("torch.", ""),
            "source": getattr(handle, "source", "")}


@dataclass
class Attribution:
    """Integrated-gradient scores of every FFN neuron for one prompt and target."""

    scores: torch.Tensor  # [n_layers, d_ff]
    activations: torch.Tensor  # [n_layers, d_ff] clean activations at the blank
    prompt: str
    target: str
    target_ids: list[int]
    base_score: float  # P(target) (or log P) with nothing changed
    baseline_scores: torch.Tensor  # [n_layers] score with layer l's blank activation set to 0
    params: dict
    model: dict
    version: str = __version__
    created: float = field(default_factory=time.time)

    @property
    def base_prob(self) -> float:
        return self.base_score if self.params.get("score", "prob") == "prob" else math.exp(self.base_score)

    @property
    def n_layers(self) -> int:
        return int(self.scores.shape[0])

    def top(self, k: int = 10) -> list[tuple[int, int, float]]:
        """The ``k`` highest-scoring neurons as ``(layer, index, score)``."""
        flat = self.scores.flatten()
        k = min(int(k), flat.numel())
        vals, idx = flat.topk(k)
        d = self.scores.shape[1]
        return [(int(i) // d, int(i) % d, float(v)) for v, i in zip(vals, idx)]

    def completeness(self):
        """Per layer: ``sum_i Attr_i``, ``P(w) - P(0)`` and their ratio (1 for exact integration)."""
        import pandas as pd

        sums = self.scores.double().sum(1)
        delta = self.base_score - self.baseline_scores.double()
        return pd.DataFrame({"layer": range(self.n_layers), "sum_attr": sums.numpy(), "delta": delta.numpy(),
                             "ratio": (sums / delta).numpy()})

    def to_dataframe(self, nonzero: bool = False):
        """Long format: one row per neuron (layer, neuron, score, activation) plus prompt/target columns."""
        import pandas as pd

        L, D = self.scores.shape
        df = pd.DataFrame({
            "layer": np.repeat(np.arange(L), D), "neuron": np.tile(np.arange(D), L),
            "score": self.scores.double().flatten().numpy(), "activation": self.activations.double().flatten().numpy(),
        })
        if nonzero:
            df = df[df.score != 0]
        df.insert(0, "target", self.target)
        df.insert(0, "prompt", self.prompt)
        return df.reset_index(drop=True)

    def _meta(self) -> dict:
        return {"kind": "kneurons.Attribution", "prompt": self.prompt, "target": self.target,
                "target_ids": self.target_ids, "base_score": self.base_score, "params": self.params,
                "model": self.model, "version": self.version, "created": self.created}

    def save(self, path, overwrite: bool = False) -> Path:
        """Write one safetensors file (tensors + JSON metadata), atomically."""
        from safetensors.torch import save_file

        tensors = {"scores": self.scores.contiguous(), "activations": self.activations.contiguous(),
                   "baseline_scores": self.baseline_scores.contiguous()}
        return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"kneurons": json.dumps(self._meta())}),
                            overwrite)

    @classmethod
    def load(cls, path) -> "Attribution":
        from safetensors import safe_open

        path = Path(path)
        if not path.exists():
            raise KneuronsError(f"attribution file does not exist: {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads(f.metadata()["kneurons"])
                tensors = {k: f.get_tensor(k) for k in ("scores", "activations", "baseline_scores")}
        except Exception as exc:
            raise KneuronsError(f"not a readable kneurons attribution file: {path} ({type(exc).__name__})")
        if meta.get("kind") != "kneurons.Attribution":
            raise KneuronsError(f"not a kneurons attribution file: {path}")
        return cls(tensors["scores"], tensors["activations"], meta["prompt"], meta["target"], meta["target_ids"],
                   meta["base_score"], tensors["baseline_scores"], meta["params"], meta["model"], meta["version"],
                   meta["created"])


# ------------------------------------------------------------------------------------------- the engine

def _cache_kwarg(model) -> str:
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _out_cache(out):
    for name in ("cache", "past_key_values"):
        c = getattr(out, name, None)
        if c is not None:
            return c
    return None


class _MergeFailed(Exception):
    """The clean run cannot also provide the prefix's KV cache (a separate prefix pass is run instead)."""


def _plain_dynamic_cache(model) -> bool:
    """Whether the model's default cache holds every layer's whole prefix (no sliding windows)."""
    try:
        from transformers import DynamicCache

        layers = DynamicCache(config=model.config).layers
    except Exception:
        return False
    return bool(layers) and all(type(layer).__name__ == "DynamicLayer" for layer in layers)


class _HeadLogProb(torch.autograd.Function):
    """``log softmax(x W^T + b)[target]`` per row of ``x`` ``[N, d]``, streamed over vocabulary chunks.

    Forward keeps a running max and sum of exponentials (online log-sum-exp) and, when a gradient is wanted,
    the running softmax-weighted sum of unembedding rows ``A = sum_v p_v W_v``; backward is then
    ``dlogp/dx = W_target - A`` with no further pass over the vocabulary. ``weight``/``bias`` get no gradient
    (the engine freezes parameters).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, target, chunk: int, need_grad: bool):
        n, d = x.shape
        m = torch.full((n,), -math.inf, dtype=x.dtype, device=x.device)
        s = torch.zeros(n, dtype=x.dtype, device=x.device)
        acc = torch.zeros(n, d, dtype=x.dtype, device=x.device) if need_grad else None
        for a in range(0, weight.shape[0], chunk):
            w = weight[a:a + chunk]
            z = x @ w.t() if bias is None else torch.addmm(bias[a:a + chunk], x, w.t())
            new_m = torch.maximum(m, z.amax(1))
            rescale = torch.exp(m - new_m)
            z.sub_(new_m[:, None]).exp_()
            s = s * rescale + z.sum(1)
            if acc is not None:
                acc.mul_(rescale[:, None]).addmm_(z, w)
            m = new_m
        w_t = weight[target]
        z_t = (x * w_t).sum(1) + (bias[target] if bias is not None else 0)
        if acc is not None:
            acc.div_(s[:, None])
            ctx.save_for_backward(w_t, acc)
        return z_t - (m + s.log())

    @staticmethod
    def backward(ctx, grad):
        w_t, acc = ctx.saved_tensors
        return grad[:, None] * (w_t - acc), None, None, None, None, None


class _Runner:
    """Runs the model on the 'moving part' of one encoded prompt for a batch of rows."""

    def __init__(self, handle, enc: Encoded, use_cache: bool, slice_head: bool = True, fused_head: bool = True):
        self.handle = handle
        self.model = handle.model
        dev = handle.device
        ids = torch.tensor([enc.input_ids], device=dev)
        head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        self.head = head if (isinstance(head, torch.nn.Linear) and type(head).forward is torch.nn.Linear.forward
                             and head.weight.dim() == 2) else None
        # decided on the clean run (validate_fused_head)
        self.fused_candidate = bool(fused_head and self.head is not None
                                    and self.head.weight.dtype in (torch.float32, torch.float64))
        self.fused = False
        self.kv = bool(use_cache and handle.is_causal and enc.blank >= 1)
        self.cache = None
        self.full_ids = ids
        self.prefix_len = enc.blank
        self.clean_blank = enc.blank  # the blank's index in the clean run's input
        # merged: the clean run processes the whole prompt and its KV cache, cut to the prefix, serves the rows
        # (no separate prefix pass); only for plain (non-sliding) dynamic caches, checked again after the run
        self.merged = False
        if self.kv:
            self.cache_kw = _cache_kwarg(self.model)
            self.merged = _plain_dynamic_cache(self.model)
            if not self.merged:
                self._run_prefix()
        if self.kv:
            self.ids = ids[:, enc.blank:]
            self.blank = 0
            self.positions = [p - enc.blank for p in enc.score_positions]
        else:
            self.ids = ids
            self.blank = enc.blank
            self.positions = list(enc.score_positions)
        if not self.merged:
            self.clean_blank = self.blank
        self.tgt_t = torch.tensor(enc.target_ids, device=dev)
        self._repeated: dict[int, object] = {}
        self._shallow_ok = (self.merged or all(type(layer).__name__ in _SHALLOW_COPY_LAYERS
                                               for layer in getattr(self.cache, "layers", [None]))) if self.kv else False
        # Without a KV cache the whole sequence runs; the LM head is then applied to the scored positions only
        # (a forward hook on the last block cuts its output). Positions after the last block never mix.
        self.slice_ok = bool(slice_head and not self.kv and handle.is_masked and not handle.arch.guessed)
        # partial blocks (run on some rows, replayed for the others) need per-block KV caches of that size
        self.staircase_ok = ((not self.kv) or self._shallow_ok) and not handle.arch.guessed
        self.sliced = False  # set when the cut really happened (checked after the clean run)
        self.pos_full = torch.tensor(self.positions, device=dev)
        self.pos_t = torch.arange(len(self.positions), device=dev) if self.slice_ok else self.pos_full
        self.positions_are_range = self.slice_ok or self.positions == list(range(len(self.positions)))

    def _run_prefix(self) -> None:
        """The prompt before the blank, once, for its KV cache (the LM head is not computed)."""
        skip_head = head_inputs(self.head, []) if self.head is not None else contextlib.nullcontext()
        with torch.no_grad(), skip_head:
            extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(self.model.forward).parameters else {}
            out = self.model(input_ids=self.full_ids[:, : self.prefix_len], use_cache=True, **extra)
        self.cache = _out_cache(out)
        if self.cache is None or not hasattr(self.cache, "batch_repeat_interleave"):
            self.kv = False

    def unmerge(self) -> None:
        """Fall back to a separate prefix pass (the merged clean run's cache or outputs were not usable)."""
        self.merged = False
        self.cache = None
        self._run_prefix()
        if not self.kv:  # no usable cache at all: rows run the whole prompt
            self.ids, self.blank = self.full_ids, self.prefix_len
            self.positions = [p + self.prefix_len for p in self.positions]
            self.pos_full = torch.tensor(self.positions, device=self.full_ids.device)
            self.pos_t = self.pos_full
            self.positions_are_range = self.positions == list(range(len(self.positions)))
            self._shallow_ok = False
        else:
            self._shallow_ok = all(type(layer).__name__ in _SHALLOW_COPY_LAYERS
                                   for layer in getattr(self.cache, "layers", [None]))
        self.staircase_ok = ((not self.kv) or self._shallow_ok) and not self.handle.arch.guessed
        self.clean_blank = self.blank

    def clean_forward(self):
        """The clean run (batch 1): logits at the positions the rows run."""
        if not self.merged:
            return self.forward(1)
        out = self.model(input_ids=self.full_ids, use_cache=True)
        cache = _out_cache(out)
        layers = getattr(cache, "layers", None)
        if (cache is None or not hasattr(cache, "batch_repeat_interleave") or not layers
                or any(type(layer).__name__ != "DynamicLayer" for layer in layers)):
            raise _MergeFailed("the model's KV cache is not a plain dynamic cache")
        n = self.prefix_len
        for layer in layers:  # keep the prefix only: the rows run the blank and target positions on it
            layer.keys, layer.values = layer.keys[..., :n, :], layer.values[..., :n, :]
        self.cache = cache
        return out.logits[:, n:]

    def rows_outputs(self, outputs: dict) -> dict:
        """Block outputs of the clean run at the positions the rows run (merged: after the prefix)."""
        if not self.merged:
            return outputs
        n, S = self.prefix_len, self.full_ids.shape[1]
        cut = {}
        for j, o in outputs.items():
            if not (isinstance(o, torch.Tensor) and o.dim() >= 2 and o.shape[1] == S):
                raise _MergeFailed("a block returns more than its hidden states")
            cut[j] = o[:, n:]
        return cut

    def disable_slicing(self) -> None:
        self.slice_ok = False
        self.pos_t = self.pos_full
        self.positions_are_range = self.positions == list(range(len(self.positions)))

    def _cache_for(self, rows: int, active: dict[int, int] | None = None):
        """A private KV cache of the prefix, repeated to ``rows`` (the repeated tensors are built once per size;
        each forward gets a shallow copy, since cache layers rebind rather than mutate their tensors)."""
        rep = self._repeated.get(rows)
        if rep is None:
            rep = copy.deepcopy(self.cache)
            if rows > 1:
                rep.batch_repeat_interleave(rows)
            self._repeated = {rows: rep}
        layers = getattr(rep, "layers", None)
        if self._shallow_ok and isinstance(layers, list):
            fresh = copy.copy(rep)
            fresh.layers = [copy.copy(layer) for layer in layers]
            for j, layer in enumerate(fresh.layers):  # blocks run on their leading active rows only
                n = (active or {}).get(j, rows)
                if 0 < n < rows and getattr(layer, "keys", None) is not None:
                    layer.keys, layer.values = layer.keys[:n], layer.values[:n]
            return fresh
        return copy.deepcopy(rep)

    def forward(self, rows: int, active: dict[int, int] | None = None):
        ids = self.ids.expand(rows, -1)
        if self.kv:
            cache = self._cache_for(rows, active)
            return self.model(input_ids=ids, use_cache=True, **{self.cache_kw: cache}).logits
        # full sequence: cut the last block's output to the scored positions, so the LM head runs on those only
        with self._slice_last_block():
            return self.model(input_ids=ids).logits

    @contextlib.contextmanager
    def _slice_last_block(self):
        pos = self.pos_full

        def cut(mod, args, out):
            if isinstance(out, torch.Tensor) and out.dim() == 3:
                self.sliced = True
                return out[:, pos]
            if isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor) and out[0].dim() == 3:
                self.sliced = True
                return (out[0][:, pos],) + tuple(out[1:])
            return None

        handle = self.handle.arch.layers[-1].register_forward_hook(cut) if self.slice_ok else None
        try:
            yield
        finally:
            if handle is not None:
                handle.remove()

    def _scored(self, t: torch.Tensor) -> torch.Tensor:
        n = len(self.positions)
        return t if (t.shape[1] == n and self.positions_are_range) else t[:, self.pos_t]

    @contextlib.contextmanager
    def clean_head_check(self):
        """Around the clean run: record the LM head's output, to decide whether the fused head may replace it
        (see :meth:`validate_fused_head`)."""
        self._head_out = []
        if not self.fused_candidate:
            yield
            return

        def keep(mod, args, out):
            # a copy: a model that edits its logits in place after the head must fail the check below
            self._head_out.append(out.detach().clone() if isinstance(out, torch.Tensor) else None)

        hook = self.head.register_forward_hook(keep)
        try:
            yield
        finally:
            hook.remove()

    def validate_fused_head(self, logits: torch.Tensor) -> None:
        """Use the fused head only if the model returned its plain ``nn.Linear`` head's output unchanged on the
        clean run (then the fused score is the model's score, up to float rounding: tests)."""
        outs, self._head_out = self._head_out, []
        if not self.fused_candidate or len(outs) != 1 or outs[0] is None:
            return
        y = outs[0]
        if y.dim() == 3 and logits.dim() == 3 and y.shape[1] > logits.shape[1]:
            y = y[:, y.shape[1] - logits.shape[1]:]  # merged clean run: the logits are those after the prefix
        if y.shape == logits.shape and y.dtype == logits.dtype and torch.equal(y, logits):
            self.fused = True  # (otherwise the model post-processes its logits: soft-capping, scaling, ...)

    def fused_logprob(self, x: torch.Tensor, need_grad: bool) -> torch.Tensor:
        """``sum_j log p(target_j)`` per row from the LM head's input ``x`` ``[rows, positions, d]``."""
        sel = self._scored(x)
        rows, n, d = sel.shape
        w = self.head.weight
        chunk = max(16, HEAD_CHUNK_BYTES // (w.shape[1] * w.element_size()))
        tgt = self.tgt_t.repeat(rows)
        lp = _HeadLogProb.apply(sel.reshape(rows * n, d).to(w.dtype), w, self.head.bias, tgt, chunk, need_grad)
        return lp.view(rows, n).sum(-1)

    def logprob(self, logits: torch.Tensor) -> torch.Tensor:
        """``sum_j log p(target_j)`` per row, as ``z_t - logsumexp(z)`` (no full log-softmax tensor)."""
        n = len(self.positions)
        sel = self._scored(logits)  # [rows, T, vocab]
        if sel.dtype in (torch.float16, torch.bfloat16):
            sel = sel.float()
        tgt = self.tgt_t.view(1, n, 1).expand(sel.shape[0], n, 1)
        return (sel.gather(-1, tgt)[..., 0] - torch.logsumexp(sel, dim=-1)).sum(-1)


def _is_oom(exc: BaseException) -> bool:
    oom = tuple(t for t in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None))
                if isinstance(t, type))
    return isinstance(exc, oom) or "out of memory" in str(exc).lower()


def _pack(sizes: list[int], batch_size: int):
    """Row ranges of consecutive groups (the clean rows, then each layer's rows): whole groups per pass while they
    fit ``batch_size`` (so the replay of lower blocks is never wasted), a group bigger than that in pieces."""
    out, start, pos = [], 0, 0
    for size in sizes:
        if size > batch_size:
            if pos > start:
                out.append((start, pos))
            out += [(pos + a, pos + min(a + batch_size, size)) for a in range(0, size, batch_size)]
            pos += size
            start = pos
            continue
        if pos + size - start > batch_size:
            out.append((start, pos))
            start = pos
        pos += size
    if pos > start:
        out.append((start, pos))
    return out


def _check_params(steps, score, batch_size):
    if not isinstance(steps, int) or steps < 1:
        raise KneuronsError(f"steps must be an integer >= 1, got {steps!r}")
    if score not in SCORES:
        raise KneuronsError(f"score must be one of {', '.join(SCORES)}, got {score!r}")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise KneuronsError(f"batch_size must be an integer >= 1, got {batch_size!r}")


def integrated_gradients(handle, prompt: str, target: str, steps: int = 20, score: str = "prob",
                         batch_size: int | None = DEFAULT_BATCH_SIZE, layers=None, use_cache: bool = True,
                         replay: bool = True, slice_head: bool = True, fused_head: bool = True,
                         progress: Callable[[int], None] | None = None) -> Attribution:
    """Attribute ``target`` at the blank of ``prompt`` to every FFN neuron of ``layers`` (default all).

    ``batch_size`` bounds the rows (layer x step) per forward/backward pass — the memory budget; results do not
    depend on it. Chunks hold whole layers when ``batch_size >= steps``; the default (``None``) fills a pass with
    about ``DEFAULT_TOKENS_PER_PASS`` row-positions on CPU (more on a GPU; fewer rows where the model's own head
    must materialise logits) — the value used is in ``params["rows_per_pass"]``. ``use_cache``/``replay``/
    ``slice_head``/``fused_head`` switch the shortcuts off (the results are the same either way). ``progress(n)``
    is called with the number of rows just finished. Works inside ``torch.inference_mode()``; the model's
    train/eval mode and its parameters' ``requires_grad`` are restored afterwards, also on error.
    """
    return _engine(handle, [prompt], [target], steps, score, batch_size, layers, use_cache, replay, slice_head,
                   fused_head, False, progress)[0]


def attribute(handle, prompts, target, steps: int = 20, score: str = "prob", batch_size: int = DEFAULT_BATCH_SIZE,
              layers=None, progress: Callable[[int], None] | None = None, batch_prompts: bool = False,
              **kw) -> list[Attribution]:
    """:func:`integrated_gradients` for several prompts (``target`` may be one string or one per prompt).

    With ``batch_prompts`` the rows of compatible prompts share passes: causal prompts with the same target
    (their KV-cached prefixes are left-padded and masked) and masked prompts with the same target (right-padded
    and masked). Results equal one-prompt-at-a-time runs (tests); ``params["prompts_per_group"]`` says how many
    prompts shared the passes. Off by default: on a 2-core CPU one prompt's rows already fill the matrix units
    and the bigger passes were slower (4 paraphrases, seconds per prompt: SmolLM2-135M 2.5 vs 2.0, GPT-2 shape
    1.04 vs 0.80); on a GPU, where one prompt's rows leave it idle, it should pay — not measured yet
    (``benchmarks/attribution_speed.py --paraphrases --device cuda``).
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    targets = [target] * len(prompts) if isinstance(target, str) else list(target)
    if len(targets) != len(prompts):
        raise KneuronsError(f"{len(prompts)} prompts but {len(targets)} targets")
    if not prompts:
        return []
    use_cache, replay = kw.pop("use_cache", True), kw.pop("replay", True)
    slice_head, fused_head = kw.pop("slice_head", True), kw.pop("fused_head", True)
    if kw:
        raise KneuronsError(f"unknown option(s): {', '.join(sorted(kw))}")
    return _engine(handle, list(prompts), targets, steps, score, batch_size, layers, use_cache, replay, slice_head,
                   fused_head, bool(batch_prompts), progress)


def _engine(handle, prompts, targets, steps, score, batch_size, layers, use_cache, replay, slice_head, fused_head,
            batch_prompts, progress) -> list[Attribution]:
    was_training = handle.model.training
    try:
        with torch.inference_mode(False):
            _check_params(steps, score, batch_size)
            devices = set(map(str, (getattr(handle.model, "hf_device_map", None) or {}).values()))
            if len(devices) > 1:
                raise KneuronsError("integrated gradients needs the model on one device; it is split over "
                                    f"{sorted(devices)}")
            L = handle.arch.n_layers
            layers = list(range(L)) if layers is None else sorted(set(int(l) for l in layers))
            if not layers:
                raise KneuronsError("layers is empty: name at least one layer (or None for all)")
            if any(l < 0 or l >= L for l in layers):
                raise KneuronsError(f"layers must be in 0..{L - 1}")
            encs = [encode(handle, p, t) for p, t in zip(prompts, targets)]
            for enc in encs:
                _check_producible(handle, enc)
            handle.model.eval()
            out: list[Attribution | None] = [None] * len(prompts)
            groups: dict[object, list[int]] = {}
            for i, enc in enumerate(encs):
                prep = _prepare(handle, prompts[i], enc, score, layers, use_cache, slice_head, fused_head)
                if not batch_prompts:  # one prompt at a time: nothing of it is kept for later
                    out[i] = _attribute_rows(handle, [prep], steps, score, batch_size, layers, replay, progress)[0]
                    continue
                key = _group_key(handle, prep)
                groups.setdefault(key if key is not None else ("alone", i), []).append(i)
                out[i] = prep  # replaced by its Attribution below
            for members in groups.values():
                preps = [out[i] for i in members]
                try:
                    atts = _attribute_rows(handle, preps, steps, score, batch_size, layers, replay, progress)
                except _Ungroupable:
                    atts = [_attribute_rows(handle, [p], steps, score, batch_size, layers, replay, progress)[0]
                            for p in preps]
                for i, att in zip(members, atts):
                    out[i] = att
            return out
    finally:
        handle.model.train(was_training)


@dataclass
class _Prepared:
    """One prompt after its clean run: the blank activations, the block outputs, the score."""

    prompt: str
    enc: Encoded
    run: "_Runner"
    W: torch.Tensor  # [L, d_ff] clean activations at the blank
    outputs: dict  # block j -> its clean output (for replay)
    last_term: torch.Tensor  # [L, d_ff] w * dS/dw at alpha = 1 (from the clean row)
    base: float


def _prepare(handle, prompt, enc, score, layers, use_cache, slice_head, fused_head) -> _Prepared:
    arch = handle.arch
    L = arch.n_layers
    run = _Runner(handle, enc, use_cache, slice_head, fused_head)

    # the clean run: the blank activations of every layer, every block's output (for replay) and the score; the
    # alpha = 1 terms come later, from one "clean row" in the first pass (see _attribute_rows)
    acts: dict[int, torch.Tensor] = {}

    def grab(layer, x):
        acts[layer] = x[0, run.clean_blank].detach().clone()

    def clean_run():
        with torch.no_grad(), ffn_hooks(arch, grab), capture_layer_outputs(arch, range(L)) as outs, \
                run.clean_head_check():
            logits = run.clean_forward()
        return logits, run.rows_outputs(outs)

    try:
        try:
            logits, outputs = clean_run()
        except _MergeFailed:
            run.unmerge()
            logits, outputs = clean_run()
    except RuntimeError as exc:
        if _is_oom(exc) or not run.slice_ok:
            raise
        run.sliced = False
    if run.slice_ok and not run.sliced:  # the model reshapes after its last block: score the full sequence
        run.disable_slicing()
        logits, outputs = clean_run()
    run.validate_fused_head(logits)
    base_lp = run.logprob(logits)[0]
    del logits
    W = torch.stack([acts[l] for l in range(L)])  # [L, d_ff]
    base_lp = base_lp.float() if base_lp.dtype in (torch.float16, torch.bfloat16) else base_lp
    base_s = base_lp.exp() if score == "prob" else base_lp
    acc_dtype = torch.float64 if W.dtype == torch.float64 else torch.float32
    last_term = torch.zeros(L, arch.d_ff, dtype=acc_dtype, device=W.device)  # filled by _attribute_rows
    return _Prepared(prompt, enc, run, W, outputs, last_term, float(base_s))


def _group_key(handle, prep: _Prepared):
    """Prompts with equal keys can share passes (``None``: this prompt runs alone)."""
    run = prep.run
    if handle.arch.guessed or not handle.arch.spec.batch_prompts or not run.staircase_ok:
        return None
    if run.kv and all(type(layer).__name__ == "DynamicLayer" for layer in getattr(run.cache, "layers", [None])):
        # (sliding-window cache layers keep a model-dependent tail of the prefix: not padded together)
        return ("kv", run.ids.shape[1], tuple(run.positions), tuple(prep.enc.target_ids), run.fused)
    if not run.kv and handle.is_masked and run.slice_ok:
        return ("masked", tuple(prep.enc.target_ids), run.fused)
    return None


def _pad_dim(t: torch.Tensor, dim: int, size: int, front: bool) -> torch.Tensor:
    n = size - t.shape[dim]
    if n <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = n
    z = t.new_zeros(shape)
    return torch.cat([z, t] if front else [t, z], dim)


class _Ungroupable(Exception):
    """These prompts' clean runs cannot be stacked into one batch (they then run one at a time)."""


def _stack_prompts(objs: list, length: int):
    """Per-prompt block outputs (batch 1, ``[1, T_p, ...]``) stacked to ``[P, length, ...]`` (zeros after T_p)."""
    first = objs[0]
    if isinstance(first, torch.Tensor):
        if first.dim() >= 2 and first.shape[0] == 1:
            if any(o.dim() != first.dim() or o.shape[2:] != first.shape[2:] for o in objs):
                raise _Ungroupable("block outputs of different shapes")
            return torch.cat([_pad_dim(o, 1, length, front=False) for o in objs])
        if any(not torch.equal(o, first) for o in objs[1:]):
            raise _Ungroupable("block outputs differ in a non-batch tensor")
        return first
    if isinstance(first, tuple):
        items = [_stack_prompts([o[i] for o in objs], length) for i in range(len(first))]
        return type(first)(*items) if hasattr(first, "_fields") else tuple(items)
    return first


def _take_rows(obj, rows: torch.Tensor):
    if isinstance(obj, torch.Tensor):
        return obj[rows.to(obj.device)] if obj.dim() >= 2 else obj
    if isinstance(obj, tuple):
        items = [_take_rows(o, rows) for o in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
    return obj


class _Group:
    """Several prompts' rows in one batch: per-row inputs, padded KV caches / sequences and attention masks."""

    def __init__(self, handle, preps: list[_Prepared]):
        self.handle = handle
        self.preps = preps
        self.run = preps[0].run  # scoring (targets, positions, head) is the same for every member
        dev = handle.device
        self.kv = self.run.kv
        if self.kv:
            n = [p.enc.blank for p in preps]
            self.n_max = max(n)
            self.ids = torch.cat([p.run.ids for p in preps])  # [P, T]: the blank and target positions
            T = self.ids.shape[1]
            self.keys, self.values = [], []
            for j in range(len(self.run.cache.layers)):
                self.keys.append(torch.cat([_pad_dim(p.run.cache.layers[j].keys, -2, self.n_max, front=True)
                                            for p in preps]))
                self.values.append(torch.cat([_pad_dim(p.run.cache.layers[j].values, -2, self.n_max, front=True)
                                              for p in preps]))
            self.mask = torch.zeros(len(preps), self.n_max + T, dtype=torch.long, device=dev)
            for i, k in enumerate(n):
                self.mask[i, self.n_max - k:] = 1
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
            self.pos = torch.tensor([p.run.positions for p in preps], device=dev)  # [P, n] scored positions
        L = handle.arch.n_layers
        self.outputs = {j: _stack_prompts([p.outputs[j] for p in preps], length) for j in range(L)}
        self.W = torch.stack([p.W for p in preps])  # [P, L, d_ff]

    def forward(self, row_prompt: torch.Tensor, active: dict[int, int] | None = None):
        R = len(row_prompt)
        rp = row_prompt.to(self.ids.device)
        model = self.handle.model
        if self.kv:
            cache = copy.copy(self.run.cache)
            cache.layers = [copy.copy(layer) for layer in self.run.cache.layers]
            for j, layer in enumerate(cache.layers):
                n = (active or {}).get(j, R)
                rows = rp[:n] if 0 < n < R else rp
                layer.keys, layer.values = self.keys[j][rows], self.values[j][rows]
            return model(input_ids=self.ids[rp], attention_mask=self.mask[rp], position_ids=self.position_ids[rp],
                         use_cache=True, **{self.run.cache_kw: cache}).logits
        pos = self.pos[rp]

        def cut(mod, args, out):  # the LM head runs on each row's scored positions only
            rows = torch.arange(R, device=pos.device)[:, None]
            if isinstance(out, torch.Tensor) and out.dim() == 3:
                return out[rows, pos]
            if isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor) and out[0].dim() == 3:
                return (out[0][rows, pos],) + tuple(out[1:])
            raise KneuronsError("cannot cut the last block's output to the scored positions")

        hook = self.handle.arch.layers[-1].register_forward_hook(cut)
        try:
            return model(input_ids=self.ids[rp], attention_mask=self.mask[rp]).logits
        finally:
            hook.remove()


def _attribute_rows(handle, preps: list[_Prepared], steps, score, batch_size, layers, replay,
                    progress) -> list[Attribution]:
    """Every row of ``preps``' prompts: the clean rows (the k = m terms), the integration points k = 1..m-1 and
    the alpha = 0 diagnostic of every layer."""
    arch = handle.arch
    L = arch.n_layers
    P = len(preps)
    run = preps[0].run
    group = _Group(handle, preps) if P > 1 else None
    W0 = preps[0].W
    acc_dtype = torch.float64 if W0.dtype == torch.float64 else torch.float32
    grad_sum = torch.zeros(P, L, arch.d_ff, dtype=acc_dtype, device=W0.device)
    layer_zero = torch.full((P, L), float("nan"), dtype=torch.float64)

    # rows, sorted by layer: first the clean row of each prompt (layer CLEAN): alpha = 1 with its blank activation
    # multiplied by a unit vector at every chosen layer — its backward gives w * dS/dw at alpha = 1 of all layers
    # at once, the k = m terms; then (layer, prompt, k) for k = 0..steps-1: k >= 1 the integration points below
    # alpha = 1, k = 0 (alpha = 0) the completeness diagnostic, scored in the same passes, not differentiated
    CLEAN = -1
    row_layer = torch.tensor([CLEAN] * P + [l for l in layers for _ in range(P) for _ in range(steps)],
                             dtype=torch.long)
    row_prompt = torch.tensor(list(range(P)) + [p for _ in layers for p in range(P) for _ in range(steps)],
                              dtype=torch.long)
    row_k = torch.tensor([steps] * P + [k for _ in layers for _ in range(P) for k in range(steps)], dtype=torch.long)
    sizes = [P] + [P * steps] * len(layers)
    vocab = int(arch.unembedding().shape[0])
    positions = group.ids.shape[1] if group is not None else run.ids.shape[1]
    rows_per_pass = batch_size or default_rows_per_pass(
        steps, positions, handle.device.type, 0 if run.fused else len(run.positions) * vocab) + P
    Wrows = group.W if group is not None else W0[None]
    blanks = group.blank if group is not None else torch.tensor([run.blank], device=W0.device)
    unit_index = {l: i for i, l in enumerate(layers)}

    def forward(rp, R, active):
        return group.forward(rp, active) if group is not None else run.forward(R, active)

    def replayed(j, rp):
        return _take_rows(group.outputs[j], rp) if group is not None else preps[0].outputs[j]

    def run_rows(rl: torch.Tensor, rp: torch.Tensor, alpha: torch.Tensor, grad_rows: torch.Tensor):
        """Score rows (layer ``rl[r]`` of prompt ``rp[r]`` scaled by ``alpha[r]`` at the blank; clean rows
        unchanged); gradients of the ``grad_rows`` scores w.r.t. the scaled activations and the clean rows'
        unit scales."""
        R = len(rl)
        dev = Wrows.device
        clean = (rl == CLEAN).nonzero()[:, 0].to(dev)
        patched = rl >= 0
        need_grad = bool(grad_rows.any())
        scaled = alpha.to(Wrows.dtype).to(dev)[:, None] * Wrows[rp.to(dev), rl.clamp(min=0).to(dev)]
        if need_grad:
            scaled.requires_grad_(True)
        units = torch.ones(len(clean), len(layers), arch.d_ff, dtype=Wrows.dtype, device=dev,
                           requires_grad=need_grad) if len(clean) else None
        present = sorted(set(rl[patched].tolist()) | (set(layers) if units is not None else set()))
        sel_by_layer = {l: (rl == l).nonzero()[:, 0].to(dev) for l in present}
        row_blank = blanks[rp.to(blanks.device)].to(dev)

        def patch(layer, x):
            sel = sel_by_layer.get(layer)
            with_units = units is not None and layer in unit_index
            if (sel is None or not len(sel)) and not with_units:
                return None
            y = x.clone()
            if sel is not None and len(sel):
                y[sel, row_blank[sel]] = scaled[sel].to(x.dtype)
            if with_units:  # x * 1: the clean rows' values are unchanged
                b = row_blank[clean]
                y[clean, b] = x[clean, b] * units[:, unit_index[layer]].to(x.dtype)
            return y

        def attempt(active, cached):
            with (torch.enable_grad() if need_grad else torch.no_grad()), ffn_hooks(arch, patch, present), \
                    replay_layers(arch, cached, R, active):
                if run.fused:  # the model runs up to its LM head; the fused head scores the rows
                    with head_inputs(run.head, [], placeholder="expand") as head_in:
                        forward(rp, R, active)
                    lp = run.fused_logprob(head_in[-1], need_grad)
                else:
                    lp = run.logprob(forward(rp, R, active))
                g = gu = None
                if need_grad:
                    g, gu = torch.autograd.grad(lp[grad_rows.to(lp.device)].sum(),
                                                [scaled, units if units is not None else scaled], allow_unused=True)
                    gu = gu if units is not None else None
            lp = lp.detach().float() if lp.dtype in (torch.float16, torch.bfloat16) else lp.detach()
            s = lp.exp() if score == "prob" else lp
            if score == "prob":
                # dP/dw = P * dlogP/dw: the log-probability's gradient stays well scaled in half precision,
                # where P's own gradient underflows for unlikely targets
                if g is not None:
                    g = g.to(s.dtype) * s[:, None]
                if gu is not None:
                    gu = gu.to(s.dtype) * s[clean.to(s.device), None, None]
            return s, g, gu

        if not replay:
            return attempt({j: R for j in range(L)}, {})
        # block j runs only for the rows patched at or below j (rows are sorted by layer; clean rows run every
        # block); the others take block j's clean output from the cache
        first = int(rl.min().clamp(min=0))
        if all(p.run.staircase_ok for p in preps):
            active = {j: int((rl <= j).sum()) for j in range(L)}
            try:
                return attempt(active, {j: replayed(j, rp) for j in range(L) if active[j] < R})
            except RuntimeError as exc:
                if _is_oom(exc) or not any(0 < n < R for n in active.values()):
                    raise
                # this model passes batch-shaped data that cannot be cut to the active rows (e.g. BLOOM's
                # ALiBi bias, [batch * heads, ...]): run whole blocks from here on, replaying only below
                for p in preps:
                    p.run.staircase_ok = False
        return attempt({j: (0 if j < first else R) for j in range(L)}, {j: replayed(j, rp) for j in range(first)})

    with frozen_parameters(handle.model):
        for start, stop in _pack(sizes, rows_per_pass):
            rl, rp, rk = row_layer[start:stop], row_prompt[start:stop], row_k[start:stop]
            grad_rows = rk > 0  # the clean rows (k = steps) included
            s, g, gu = run_rows(rl, rp, rk.double() / steps, grad_rows)
            steps_rows = grad_rows & (rl >= 0)
            if g is not None and bool(steps_rows.any()):
                gr = steps_rows.to(g.device)
                grad_sum.index_put_((rp[steps_rows].to(grad_sum.device), rl[steps_rows].to(grad_sum.device)),
                                    g[gr].detach().to(grad_sum.dtype), accumulate=True)
            if gu is not None:
                for c, p in enumerate(rp[rl == CLEAN].tolist()):
                    preps[p].last_term[layers] = gu[c].detach().to(acc_dtype)
            zero = rk == 0
            for p, l, v in zip(rp[zero].tolist(), rl[zero].tolist(), s[zero.to(s.device)].tolist()):
                layer_zero[p, l] = float(v)  # the score with layer l's blank activation set to 0
            del g, gu
            if progress is not None:  # a clean row stands for the alpha = 1 row of every layer
                n_clean = int((rl == CLEAN).sum())
                progress(len(rl) - n_clean + n_clean * len(layers))
    mask = torch.zeros(L, dtype=torch.bool)
    mask[layers] = True
    out_dtype = torch.float64 if W0.dtype == torch.float64 else torch.float32
    results = []
    for i, prep in enumerate(preps):
        r = prep.run
        scores = (prep.W.to(acc_dtype) * grad_sum[i] + prep.last_term) / steps
        scores[~mask.to(scores.device)] = 0
        params = {"steps": steps, "score": score, "batch_size": batch_size, "rows_per_pass": rows_per_pass,
                  "layers": layers, "baseline": "zero", "position": "blank", "use_cache": r.kv, "replay": replay,
                  "head_on_scored_positions": r.slice_ok, "fused_head": r.fused, "prefix_from_clean_run": r.merged,
                  "partial_blocks": bool(replay and r.staircase_ok), "prompts_per_group": P}
        results.append(Attribution(scores.to(out_dtype).cpu(), prep.W.to(out_dtype).cpu(), prep.prompt,
                                   prep.enc.target, prep.enc.target_ids, prep.base, layer_zero[i], params,
                                   model_info(handle)))
    return results


def _check_producible(handle, enc: Encoded) -> None:
    vocab = handle.arch.unembedding().shape[0]
    bad = [t for t in enc.target_ids if t >= vocab]
    if bad:
        raise KneuronsError(f"target {enc.target!r} has token ids outside the model's output vocabulary ({vocab})")
    unk = getattr(handle.tokenizer, "unk_token_id", None)
    unk_tok = getattr(handle.tokenizer, "unk_token", None)
    if unk is not None and unk in enc.target_ids and (unk_tok or "") not in enc.target:
        raise KneuronsError(f"target {enc.target!r} cannot be produced by the model: the tokenizer maps it to the unknown token")


def rows_per_prompt(handle, steps: int, layers=None) -> int:
    n = handle.n_layers if layers is None else len(set(layers))
    return n * (steps + 1)
