"""The row plan: which rows a prompt group runs, and in which passes. Pure — no model, no state.

A *row* is one copy of a prompt in a batch. A patched row scales layer ``l``'s blank activation to the path
point ``alpha`` (all other layers unchanged); the *clean row* of a prompt (layer :data:`CLEAN`) runs the prompt
unchanged, with its blank activation multiplied by a unit vector at every attributed layer, so that its
gradient w.r.t. those units is ``(w - b) * dS/dw`` at ``alpha = 1`` for all layers at once (used when the path
has the point ``alpha = 1``). Every layer also gets a row at ``alpha = 0`` (the baseline), scored in the same
passes — the completeness diagnostic — and differentiated only if ``alpha = 0`` is a point of the path.

Rows are sorted by layer (the clean rows first), so that in a pass block ``j`` is needed only by the leading
rows patched at or below ``j`` (:func:`block_schedule`); :func:`pack` cuts them into passes of whole layers
(a layer whose rows exceed the pass size in pieces).

**Pass size** (:func:`plan_passes`, the one place of this rule): ``batch_size`` rows if the caller gives it;
by default as many rows as a budget of row-positions allows (rows x positions each row runs, so a long prompt's
layer is split over several passes, down to one row per pass), fewer where the model's own head materialises
logits, and no more than :data:`MEMORY_SHARE` of the available memory. The peak memory of the largest planned
pass is estimated from the model's sizes (:func:`pass_memory`, calibrated against measured peak RSS by
``benchmarks/attribution_memory.py``); a plan estimated beyond the available memory is refused with one line
before anything runs. Results do not depend on the pass size.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..errors import KneuronsError
from .methods import IntegrationPath

CLEAN = -1  # the layer of a clean row
DEFAULT_TOKENS_PER_PASS = 2048  # at most this many row-positions per pass on CPU (memory ~ this x layers)
DEFAULT_TOKENS_PER_PASS_GPU = 16384  # on a GPU bigger passes win (H200: all 252 rows of BERT-base in one pass)
DEFAULT_LOGITS_PER_PASS = 1 << 22  # without the fused head: at most this many logits ([rows, positions, vocab])
MEMORY_SHARE = 0.5  # a default pass is planned within this share of the available memory
#: factors of :func:`pass_memory`, calibrated against peak RSS on CPU (float32/64, eager and sdpa attention):
#: per position and block a row keeps about ``ACT_PER_D x d_model + ACT_PER_FF x d_ff`` elements for its
#: backward pass (measured on 21 architectures at d_model 128, d_ff 352: 950-2150 elements, the most GPT-2's;
#: Llama 4 x d_model + 3 x d_ff, BERT 6 x d_model + 1 x d_ff), eager attention ``ATTN_PER_HEAD x
#: heads x attended positions`` more (measured 1.0-1.15); attention masks (sliding windows, padding) up to
#: ``MASK_BYTES`` per row, position and attended position (measured up to 6); the allocator's and BLAS
#: libraries' workspaces about ``WORKSPACE_BYTES`` (measured 15 MB). ``benchmarks/attribution_memory.py`` checks
#: the whole estimate.
ACT_PER_D, ACT_PER_FF, ATTN_PER_HEAD, MASK_BYTES = 6, 4, 1.25, 8
WORKSPACE_BYTES = 24 << 20


def layer_points(path: IntegrationPath) -> tuple[tuple[float, float], ...]:
    """``(alpha, weight numerator)`` of the rows of one layer of one prompt, in row order: ``alpha = 0`` first
    (weight 0 when it is only the diagnostic), then the path's points below 1 (``alpha = 1`` is the clean
    row's)."""
    numerators, _ = path.factored()
    points = dict(zip(path.alphas, numerators))
    out = [(0.0, points.pop(0.0, 0.0))]
    points.pop(1.0, None)
    return tuple(out + sorted(points.items()))


def clean_weight(path: IntegrationPath) -> float | None:
    """The weight numerator of the point ``alpha = 1`` (the clean row's), or ``None`` without that point."""
    numerators, _ = path.factored()
    return dict(zip(path.alphas, numerators)).get(1.0)


def rows_per_layer(path: IntegrationPath) -> int:
    """Rows per attributed layer and prompt, counting the clean row's share (``alpha = 1``) as one."""
    return len(layer_points(path)) + (clean_weight(path) is not None)


def pack(sizes: list[int], batch_size: int) -> list[tuple[int, int]]:
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


@dataclass(frozen=True)
class RowPlan:
    """Every row of a prompt group and the passes that run them."""

    layer: torch.Tensor  # [R] long: the patched layer, CLEAN for a clean row
    prompt: torch.Tensor  # [R] long: the row's prompt in the group
    alpha: torch.Tensor  # [R] double: the path point (1 for a clean row)
    weight: torch.Tensor  # [R] double: the point's weight numerator (0: scored, not differentiated)
    passes: tuple[tuple[int, int], ...]
    rows_per_pass: int
    bound: str = "batch_size"  # the rule that chose rows_per_pass (see plan_passes)
    estimate: int = 0  # estimated peak bytes of the largest pass (pass_memory)

    def __len__(self) -> int:
        return len(self.layer)


def plan_rows(n_prompts: int, layers: list[int], path: IntegrationPath, rows_per_pass: int) -> RowPlan:
    """The rows of ``n_prompts`` prompts over ``layers``: the clean rows first (when the path has ``alpha =
    1``), then per layer, per prompt, :func:`layer_points`."""
    P = n_prompts
    points = layer_points(path)
    w_clean = clean_weight(path)
    layer, prompt, alpha, weight = [], [], [], []
    if w_clean is not None:
        layer += [CLEAN] * P
        prompt += list(range(P))
        alpha += [1.0] * P
        weight += [w_clean] * P
    for l in layers:
        for p in range(P):
            for a, w in points:
                layer.append(l)
                prompt.append(p)
                alpha.append(a)
                weight.append(w)
    sizes = ([P] if w_clean is not None else []) + [P * len(points)] * len(layers)
    return RowPlan(torch.tensor(layer, dtype=torch.long), torch.tensor(prompt, dtype=torch.long),
                   torch.tensor(alpha, dtype=torch.float64), torch.tensor(weight, dtype=torch.float64),
                   tuple(pack(sizes, rows_per_pass)), rows_per_pass)


def block_schedule(row_layer: torch.Tensor, n_layers: int, replay: bool,
                   partial_blocks: bool) -> tuple[dict[int, int], list[int]]:
    """For one pass (rows sorted by layer): ``active[j]``, how many leading rows run block ``j``, and the blocks
    whose clean output is replayed for the other rows.

    Without replay every row runs every block. With partial blocks, block ``j`` runs only for the rows patched
    at or below ``j`` (clean rows run every block) and the others take block ``j``'s clean output; without
    them, blocks below the pass's lowest patched layer are replayed for all rows and the rest run whole.
    """
    R = len(row_layer)
    if not replay:
        return {j: R for j in range(n_layers)}, []
    if partial_blocks:
        active = {j: int((row_layer <= j).sum()) for j in range(n_layers)}
        return active, [j for j in range(n_layers) if active[j] < R]
    first = int(row_layer.min().clamp(min=0))
    return {j: (0 if j < first else R) for j in range(n_layers)}, list(range(first))


# ------------------------------------------------------------------------------------------- pass size

@dataclass(frozen=True)
class PassShape:
    """What the memory of a pass depends on: the model's sizes and what each row runs (from
    :func:`kneurons.attribution.plan.pass_shape`)."""

    tokens: int  # the prompt's tokens (the longest prompt of a group)
    positions: int  # positions each row runs through the blocks
    prefix: int  # KV-cached positions each row attends to besides those (0 without a cache)
    prompts: int  # prompts sharing the passes
    n_layers: int
    d_model: int
    d_ff: int
    heads: int
    kv_width: int  # key and value elements per position and block
    vocab: int
    itemsize: int  # bytes per element of the model's dtype
    eager_attention: bool  # the attention weights are materialised ([heads, positions, attended] per block)
    logit_positions: int  # positions per row whose logits the model's own head materialises (0: the fused head)
    scored: int  # positions per row the fused head scores (0: the model's own head)
    head_chunk: int  # vocabulary rows per chunk of the fused head
    cache_copies: int = 1  # copies of the repeated prefix cache per row (2: a deep copy per pass)


def block_bytes(s: PassShape) -> int:
    """One row in one block it runs: the activations kept for the backward pass (the d_model-wide ones at least
    float32: norms upcast half precision), the eager attention weights, and the keys and values of the cached
    prefix joined to the row's own (with eager attention also repeated to every head)."""
    wide = max(s.itemsize, 4)
    act = s.positions * (ACT_PER_D * s.d_model * wide + ACT_PER_FF * s.d_ff * s.itemsize)
    attn = ATTN_PER_HEAD * s.heads * s.positions * (s.positions + s.prefix) * s.itemsize if s.eager_attention else 0
    cache = s.prefix * (s.kv_width + (2 * s.d_model if s.eager_attention else 0)) * s.itemsize
    return int(act + attn + cache)


def row_bytes(s: PassShape) -> int:
    """One row, whatever blocks it runs: its copies of the prefix cache (every block), its attention masks and its
    LM head (the fused head's vocabulary chunk, or the model's logits with their log-sum-exp and gradient)."""
    cache = s.cache_copies * s.n_layers * s.prefix * s.kv_width * s.itemsize
    mask = MASK_BYTES * s.positions * (s.positions + s.prefix)
    fused = s.scored * (2 * min(s.vocab, s.head_chunk) + 3 * s.d_model) * s.itemsize
    logits = s.logit_positions * s.vocab * (s.itemsize + 2 * max(s.itemsize, 4))
    return int(cache + mask + fused + logits)


def kept_bytes(s: PassShape) -> int:
    """Kept from the clean runs while the passes run: every block's output (replayed) and the prefix cache."""
    return int(s.prompts * s.n_layers * (s.positions * s.d_model + s.prefix * s.kv_width) * s.itemsize)


def clean_run_bytes(s: PassShape) -> int:
    """The probe and the clean run of one whole prompt (no gradient): the logits of every position (a copy and a
    two-row trial in the probe), every block's output and cache, and one block's temporaries for two rows."""
    whole = dataclasses.replace(s, positions=s.tokens, prefix=0)
    return int(3 * s.tokens * s.vocab * s.itemsize + s.n_layers * s.tokens * (s.d_model + s.kv_width) * s.itemsize
               + 2 * block_bytes(whole))


def pass_memory(s: PassShape, rows: int, row_blocks: int) -> int:
    """Estimated peak bytes of a pass of ``rows`` rows that run ``row_blocks`` (row, block) pairs in all: the
    libraries' workspaces and the clean runs' peak, or what they keep plus the pass — each row's own memory,
    each (row, block) pair's, and one block's temporaries for every row."""
    b = block_bytes(s)
    return WORKSPACE_BYTES + max(clean_run_bytes(s), kept_bytes(s) + rows * (row_bytes(s) + b) + row_blocks * b)


def rows_that_fit(s: PassShape, budget: float) -> int:
    """The most rows of any layers whose pass is estimated within ``budget`` bytes (0 if not even one)."""
    if pass_memory(s, 1, s.n_layers) > budget:
        return 0
    worst = row_bytes(s) + (s.n_layers + 1) * block_bytes(s)  # a row that runs every block
    return max(1, int((budget - WORKSPACE_BYTES - kept_bytes(s)) // max(1, worst)))


def _bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} bytes"


def plan_passes(n_prompts: int, layers: list[int], path: IntegrationPath, shape: PassShape,
                batch_size: int | None, available: int | None, gpu: bool, replay: bool,
                partial_blocks: bool) -> RowPlan:
    """The row plan with its pass size, decided once: ``batch_size`` rows per pass if given; else a budget of
    row-positions (:data:`DEFAULT_TOKENS_PER_PASS`, more on a GPU: a long prompt's layer is split over several
    passes, down to one row), of logits where the model's own head materialises them
    (:data:`DEFAULT_LOGITS_PER_PASS`) and :data:`MEMORY_SHARE` of the ``available`` memory. The largest planned
    pass is estimated (:func:`pass_memory`); beyond ``available`` bytes the plan is refused with one line
    (``None``: memory unknown, no check). ``bound`` says which rule chose the pass size."""
    if batch_size is not None:
        rows, bound = batch_size, "batch_size"
    else:
        budget = DEFAULT_TOKENS_PER_PASS_GPU if gpu else DEFAULT_TOKENS_PER_PASS
        rows, bound = budget // max(1, shape.positions), "row_positions"
        if shape.logit_positions:
            cap = DEFAULT_LOGITS_PER_PASS // (shape.logit_positions * shape.vocab)
            rows, bound = (cap, "logits") if cap < rows else (rows, bound)
        if available is not None:
            cap = rows_that_fit(shape, MEMORY_SHARE * available)
            rows, bound = (cap, "memory") if cap < rows else (rows, bound)
        rows = max(1, rows)
    plan = plan_rows(n_prompts, layers, path, rows)
    L = shape.n_layers
    blocks = (L - plan.layer.clamp(min=0)).tolist()  # blocks a row runs with partial blocks
    per_row, per_block = row_bytes(shape) + block_bytes(shape), block_bytes(shape)
    largest, size = (1, L), -1  # the pass with the largest estimate: (rows, row-blocks)
    for start, stop in plan.passes:
        n = stop - start
        if not replay:
            row_blocks = n * L
        elif partial_blocks:
            row_blocks = sum(blocks[start:stop])
        else:  # blocks below the pass's lowest patched layer replayed for all rows (rows sorted by layer)
            row_blocks = n * blocks[start]
        if n * per_row + row_blocks * per_block > size:  # pass_memory grows with this
            largest, size = (n, row_blocks), n * per_row + row_blocks * per_block
    estimate = pass_memory(shape, *largest)
    if available is not None and estimate > available:
        prompt = f"a {shape.tokens}-token prompt" + (f" ({shape.prompts} prompts sharing passes)"
                                                    if shape.prompts > 1 else "")
        have = f"(estimated; {_bytes(available)} of memory available)"
        fit = rows_that_fit(shape, available)
        if batch_size is not None and fit >= 1:
            most = max(stop - start for start, stop in plan.passes)
            raise KneuronsError(f"batch_size={batch_size} plans passes of {most} rows of {prompt}, about "
                                f"{_bytes(estimate)} {have}: lower --batch-size / batch_size= (about {fit} rows "
                                "fit), use fewer --steps or a shorter prompt")
        raise KneuronsError(f"{prompt} needs about {_bytes(pass_memory(shape, 1, L))} per pass even at "
                            f"batch_size=1 {have}: use a shorter prompt (or a smaller --dtype / dtype=)")
    return dataclasses.replace(plan, bound=bound, estimate=estimate)
