"""The row plan: which rows a prompt group runs, and in which passes. Pure — no model, no state.

A *row* is one copy of a prompt in a batch. A patched row scales layer ``l``'s blank activation to the path
point ``alpha`` (all other layers unchanged); the *clean row* of a prompt (layer :data:`CLEAN`) runs the prompt
unchanged, with its blank activation multiplied by a unit vector at every attributed layer, so that its
gradient w.r.t. those units is ``(w - b) * dS/dw`` at ``alpha = 1`` for all layers at once (used when the path
has the point ``alpha = 1``). Every layer also gets a row at ``alpha = 0`` (the baseline), scored in the same
passes — the completeness diagnostic — and differentiated only if ``alpha = 0`` is a point of the path.

Rows are sorted by layer (the clean rows first), so that in a pass block ``j`` is needed only by the leading
rows patched at or below ``j`` (:func:`block_schedule`); :func:`pack` cuts them into passes of whole layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .methods import IntegrationPath

CLEAN = -1  # the layer of a clean row
DEFAULT_TOKENS_PER_PASS = 2048  # at most this many row-positions per pass on CPU (memory ~ this x layers)
DEFAULT_TOKENS_PER_PASS_GPU = 16384  # on a GPU bigger passes win (H200: all 252 rows of BERT-base in one pass)
DEFAULT_LOGITS_PER_PASS = 1 << 22  # without the fused head: at most this many logits ([rows, positions, vocab])


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


def default_rows_per_pass(steps: int, positions: int, device: str = "cpu", logits_per_row: int = 0) -> int:
    """Rows per forward/backward pass when ``batch_size`` is not given: a budget of row-positions (each row
    runs ``positions`` positions through the blocks) and, where the model's own head materialises logits,
    of logits (``logits_per_row`` = scored positions x vocabulary; 0 with the fused head); at least ``steps``
    (one layer's rows)."""
    tokens = DEFAULT_TOKENS_PER_PASS_GPU if str(device).startswith("cuda") else DEFAULT_TOKENS_PER_PASS
    rows = tokens // max(1, positions)
    if logits_per_row:
        rows = min(rows, DEFAULT_LOGITS_PER_PASS // logits_per_row)
    return max(steps, rows)


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
