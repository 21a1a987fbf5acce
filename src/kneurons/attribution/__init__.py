"""Attribution of a cloze prompt's answer to every FFN neuron: integrated gradients (Dai et al. 2022, eq. 3),
batched and exact, and the other methods of the same seam.

For layer ``l`` let ``w`` be the FFN activation (the input of the FFN output projection) at the blank position
of the clean run. The paper's attribution of neuron ``i`` is::

    Attr_i = w_i / m * sum_{k=1..m} dP(target | w_l := (k/m) w) / dw_i

with only layer ``l``'s activation at the blank replaced (all other layers and positions run normally), a zero
baseline and ``m`` steps (default 20). ``P`` is the target's probability (``score="prob"``, the paper's choice)
or log-probability (``score="logprob"``); multi-token targets are scored by their joint probability
(:mod:`kneurons.prompts`), attributed at the first blank position.

The package, one room per concept:

* :mod:`.methods` — the integration path (alphas, weights, baseline), the scores, the ``METHODS`` registry;
* :mod:`.plan` — options, the model's capabilities (declared in the architecture table or probed once), the
  frozen :class:`~.plan.ExecutionPlan` decided per prompt;
* :mod:`.rows` — the pure row plan: which rows, in which passes of what size (the memory estimate);
* :mod:`.executor` — the clean run and the passes;
* :mod:`.head` — the fused, vocabulary-chunked LM head;
* :mod:`.result` — :class:`Attribution` (save, load, DataFrame).
"""

from __future__ import annotations

from typing import Callable

from ..errors import KneuronsError
from .methods import (METHODS, RULES, SCORES, IntegrationPath, Method, Score, gauss_legendre, get_method,
                      get_score, one_point, riemann_left, riemann_middle, riemann_right, riemann_trapezoid)
from .plan import SHORTCUTS, ExecutionPlan, Options
from .result import Attribution, model_info
from .methods import MAX_STEPS
from .rows import DEFAULT_TOKENS_PER_PASS, DEFAULT_TOKENS_PER_PASS_GPU, MEMORY_SHARE, plan_passes, rows_per_layer

DEFAULT_BATCH_SIZE = None  # about DEFAULT_TOKENS_PER_PASS row-positions per pass, within the available memory

__all__ = [
    "Attribution", "attribute", "integrated_gradients", "rows_per_prompt", "DEFAULT_BATCH_SIZE", "METHODS",
    "SCORES", "RULES", "IntegrationPath", "Method", "Score", "Options", "ExecutionPlan", "SHORTCUTS",
    "riemann_right", "riemann_left", "riemann_middle", "riemann_trapezoid", "gauss_legendre", "one_point",
    "get_method", "get_score", "model_info", "plan_passes", "rows_per_layer", "DEFAULT_TOKENS_PER_PASS",
    "DEFAULT_TOKENS_PER_PASS_GPU", "MEMORY_SHARE", "MAX_STEPS",
]


def integrated_gradients(handle, prompt: str, target: str, steps: int = 20, score: str = "prob",
                         batch_size: int | None = DEFAULT_BATCH_SIZE, layers=None,
                         progress: Callable[[int], None] | None = None, *, method: str = "integrated_gradients",
                         path: IntegrationPath | None = None, foils=None, **shortcuts) -> Attribution:
    """Attribute ``target`` at the blank of ``prompt`` to every FFN neuron of ``layers`` (default all).

    ``method`` names an attribution method of :data:`METHODS` (``"integrated_gradients"``, the paper's, or
    ``"gradient_x_activation"``); ``path`` (an :class:`IntegrationPath`: alphas, weights, baseline) replaces
    the method's path and ``steps`` (1 to ``MAX_STEPS``). ``batch_size`` bounds the rows (layer x step) per
    forward/backward pass — the memory budget; results do not depend on it. Passes hold whole layers when
    ``batch_size >= steps``; the default (``None``) fills a pass with about ``DEFAULT_TOKENS_PER_PASS``
    row-positions on CPU (more on a GPU; a long prompt's layer is split over several passes, down to one row),
    fewer rows where the model's own head must materialise logits, and at most ``MEMORY_SHARE`` of the
    available memory — the value used is in ``params["rows_per_pass"]``, the rule that chose it in
    ``params["pass_size_bound"]``, the estimated peak bytes of the largest pass in
    ``params["pass_memory_estimate"]``. A plan estimated beyond the available memory (a ``batch_size`` too
    big, or a prompt too long for even one row per pass) is refused with a :class:`KneuronsError` before
    anything runs. The shortcuts ``use_cache``, ``prefix_from_clean_run``, ``replay``,
    ``partial_blocks``, ``head_on_scored_positions`` (older name ``slice_head``) and ``fused_head`` can be
    switched off (``=False``; the results are the same either way, see :mod:`.plan`); ``params`` records the
    execution plan used. ``progress(n)`` is called with the number of rows just finished. Works inside
    ``torch.inference_mode()``; the model's train/eval mode and its parameters' ``requires_grad`` are restored
    afterwards, also on error. ``score="contrastive"`` attributes ``log P(target) - log mean P(foil)`` over
    ``foils`` (other answers of the relation; see :mod:`.methods`).
    """
    return attribute(handle, [prompt], target, steps, score, batch_size, layers, progress, method=method,
                     path=path, foils=foils, **shortcuts)[0]


def attribute(handle, prompts, target, steps: int = 20, score: str = "prob", batch_size: int = DEFAULT_BATCH_SIZE,
              layers=None, progress: Callable[[int], None] | None = None, batch_prompts: bool = False, *,
              method: str = "integrated_gradients", path: IntegrationPath | None = None, foils=None,
              **shortcuts) -> list[Attribution]:
    """:func:`integrated_gradients` for several prompts (``target`` may be one string or one per prompt).

    With ``batch_prompts`` the rows of compatible prompts share passes: causal prompts with the same target
    (their KV-cached prefixes are left-padded and masked) and masked prompts with the same target (right-padded
    and masked). Results equal one-prompt-at-a-time runs (tests); ``params["prompts_per_group"]`` says how many
    prompts shared the passes. Off by default: on a 2-core CPU one prompt's rows already fill the matrix units
    and the bigger passes were slower (4 paraphrases, seconds per prompt: SmolLM2-135M 2.5 vs 2.0, GPT-2 shape
    1.04 vs 0.80); on a GPU, where one prompt's rows leave it idle, it should pay — not measured yet
    (``benchmarks/attribution_speed.py --paraphrases --device cuda``).
    """
    from .executor import run

    if isinstance(prompts, str):
        prompts = [prompts]
    targets = [target] * len(prompts) if isinstance(target, str) else list(target)
    if len(targets) != len(prompts):
        raise KneuronsError(f"{len(prompts)} prompts but {len(targets)} targets")
    options = Options.build(handle, steps, score, batch_size, layers, method, path, batch_prompts, foils,
                            **shortcuts)
    if not prompts:
        return []
    return run(handle, list(prompts), targets, options, progress)


def rows_per_prompt(handle, steps: int, layers=None, method: str = "integrated_gradients") -> int:
    """Rows one prompt costs (what ``progress`` counts): per attributed layer, the path's points and the
    ``alpha = 0`` diagnostic. ``"random"`` locates by integrated gradients first; ``"activation"`` runs none."""
    m = get_method(method)
    if m.kind == "activation":
        return 0
    path = (m.path if m.kind == "attribution" else METHODS["integrated_gradients"].path)(steps)
    n = handle.n_layers if layers is None else len(set(layers))
    return n * rows_per_layer(path)
