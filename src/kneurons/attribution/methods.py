"""Attribution methods as data: the integration path, the score, and the registry of neuron-finding methods.

* :class:`IntegrationPath` — where gradients are taken and how they are weighted (Captum's approximation
  methods, as data): the blank activation ``w`` of the patched layer is replaced by ``b + alpha (w - b)`` for
  each ``alpha`` of the path (``b`` the baseline, zero by default) and::

      attribution_i = (w_i - b_i) * sum_k weights_k * dS/dx_i |_(alpha_k)

  The paper's integrated gradients (Dai et al. eq. 3) are :func:`riemann_right`: ``alpha = k/m``, ``k = 1..m``,
  weights ``1/m``; gradient x activation is :func:`one_point` (``alpha = 1``, weight 1). Any rule the engine
  gets is computed exactly as written (tests compare every rule with a naive loop).
* :class:`Score` — what is attributed, as a function of the log-probabilities of target sequences: the
  target's probability (``"prob"``, the paper's), log-probability (``"logprob"``) or its contrast to foil
  answers (``"contrastive"``, below). A score gets ``lp`` ``[rows, n_sequences]`` (column 0 the answer, then
  the foils) and gives its value and its derivative w.r.t. ``lp``, split into a well-scaled cotangent for the
  backward pass and a per-row factor applied after it (``dP = P dlogP``: the half-precision backward never sees
  a tiny ``P``).

  **Contrastive score** (fact-specific neurons, not relation neurons)::

      S = log P(t) - log( 1/|F| * sum_{f in F} P(f) )

  with ``F`` the foils: other answers of the same relation, given by the caller (``foils=``; ``kneurons run``
  uses the relation's other objects). A neuron that raises every answer of the relation raises ``P(t)`` and
  the foils' mean alike and scores about zero; one that raises *this* answer scores high. The answers part at
  the blank: each foil is scored by its **first token** in place of the target's first token, followed by the
  target's own continuation (the head scores several sequences at the same positions, and teacher forcing
  feeds every sequence the same input). The continuation's probability is the same in every term and cancels,
  so ``S = log p(t_1) - log mean_f p(f_1)`` at the blank: exactly the contrast of single-token answers, and of
  multi-token answers where they part. Foils are the distinct first tokens other than the target's (a foil
  that starts like the target cannot be told from it there and is dropped; the ones used are in
  ``params["foils"]``). Its derivative w.r.t. ``lp`` is ``[1, -softmax(lp_F)]``.
* :data:`METHODS` — the neuron-finding methods that :func:`kneurons.locate`, ``kneurons locate --method``
  and ``kneurons run --method`` accept: the two gradient methods above, and the paper's two baselines
  (``"activation"``: neurons by activation magnitude; ``"random"``: as many random neurons).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import KneuronsError


# ------------------------------------------------------------------------------------------- the path

@dataclass(frozen=True, eq=False)
class IntegrationPath:
    """Points ``alphas`` on the straight line from the ``baseline`` (``alpha = 0``) to the clean activation
    (``alpha = 1``), with quadrature ``weights``. ``baseline`` is ``"zero"`` (the paper's) or a tensor
    ``[n_layers, d_ff]`` of activations; ``rule`` names the quadrature for provenance."""

    alphas: tuple[float, ...]
    weights: tuple[float, ...]
    baseline: object = "zero"  # "zero" | torch.Tensor [n_layers, d_ff]
    rule: str = "custom"

    def __post_init__(self):
        alphas = tuple(float(a) for a in self.alphas)
        weights = tuple(float(w) for w in self.weights)
        object.__setattr__(self, "alphas", alphas)
        object.__setattr__(self, "weights", weights)
        if not alphas or len(alphas) != len(weights):
            raise KneuronsError(f"an integration path needs as many weights as alphas (>= 1), got {len(alphas)} "
                                f"alphas and {len(weights)} weights")
        if any(not (0.0 <= a <= 1.0) for a in alphas):
            raise KneuronsError(f"path alphas must lie in [0, 1], got {list(alphas)}")
        if len(set(alphas)) != len(alphas):
            raise KneuronsError(f"path alphas must be distinct, got {list(alphas)}")
        if any(not math.isfinite(w) for w in weights):
            raise KneuronsError(f"path weights must be finite, got {list(weights)}")
        if not (isinstance(self.baseline, torch.Tensor) or self.baseline == "zero"):
            raise KneuronsError(f"baseline must be 'zero' or a [n_layers, d_ff] tensor, got {self.baseline!r}")

    @property
    def steps(self) -> int:
        return len(self.alphas)

    @property
    def zero_baseline(self) -> bool:
        return not isinstance(self.baseline, torch.Tensor)

    def factored(self) -> tuple[tuple[float, ...], float]:
        """``(numerators, denominator)`` with ``weights = numerators / denominator``. Equal weights ``1/m`` become
        ``(1, ..., 1) / m``, so that the paper's sum is computed as written (``w/m * sum_k grad_k``)."""
        w = self.weights[0]
        if w > 0 and all(x == w for x in self.weights):
            m = round(1 / w)
            if m >= 1 and 1 / m == w:
                return (1.0,) * len(self.weights), float(m)
        return self.weights, 1.0

    def describe(self) -> dict:
        """JSON-ready provenance (``params["path"]``)."""
        return {"rule": self.rule, "alphas": list(self.alphas), "weights": list(self.weights),
                "baseline": "zero" if self.zero_baseline else "tensor"}

    def check_baseline(self, n_layers: int, d_ff: int) -> None:
        if not self.zero_baseline and tuple(self.baseline.shape) != (n_layers, d_ff):
            raise KneuronsError(f"baseline must have shape [n_layers, d_ff] = [{n_layers}, {d_ff}], got "
                                f"{list(self.baseline.shape)}")


MAX_STEPS = 10_000  # integration steps: the paper uses 20; beyond this the rows alone fill memory and hours


def check_steps(m) -> int:
    """``m`` if it is a number of integration steps the engine takes (1 to :data:`MAX_STEPS`), else one-line
    :class:`KneuronsError`."""
    if not isinstance(m, int) or isinstance(m, bool) or not 1 <= m <= MAX_STEPS:
        raise KneuronsError(f"steps must be an integer from 1 to {MAX_STEPS}, got {m!r}")
    return m


def riemann_right(m: int, baseline="zero") -> IntegrationPath:
    """The paper's rule (Dai et al. eq. 3): ``alpha = k/m``, ``k = 1..m``, weights ``1/m``."""
    m = check_steps(m)
    return IntegrationPath(tuple(k / m for k in range(1, m + 1)), (1 / m,) * m, baseline, "riemann_right")


def riemann_left(m: int, baseline="zero") -> IntegrationPath:
    """``alpha = k/m``, ``k = 0..m-1``, weights ``1/m``."""
    m = check_steps(m)
    return IntegrationPath(tuple(k / m for k in range(m)), (1 / m,) * m, baseline, "riemann_left")


def riemann_middle(m: int, baseline="zero") -> IntegrationPath:
    """``alpha = (k - 1/2)/m``, ``k = 1..m``, weights ``1/m``."""
    m = check_steps(m)
    return IntegrationPath(tuple((k - 0.5) / m for k in range(1, m + 1)), (1 / m,) * m, baseline,
                           "riemann_middle")


def riemann_trapezoid(m: int, baseline="zero") -> IntegrationPath:
    """Trapezoids over ``m`` intervals: ``alpha = k/m``, ``k = 0..m`` (m + 1 points), weights ``1/m`` and
    ``1/(2m)`` at both ends."""
    m = check_steps(m)
    weights = tuple((0.5 if k in (0, m) else 1.0) / m for k in range(m + 1))
    return IntegrationPath(tuple(k / m for k in range(m + 1)), weights, baseline, "riemann_trapezoid")


def gauss_legendre(m: int, baseline="zero") -> IntegrationPath:
    """Gauss-Legendre quadrature with ``m`` nodes on ``[0, 1]`` (exact for polynomials of degree ``2m - 1``)."""
    import numpy as np

    x, w = np.polynomial.legendre.leggauss(check_steps(m))
    return IntegrationPath(tuple(float(a) for a in (x + 1) / 2), tuple(float(v) for v in w / 2), baseline,
                           "gauss_legendre")


def one_point(baseline="zero") -> IntegrationPath:
    """Gradient x activation: the single point ``alpha = 1`` with weight 1."""
    return IntegrationPath((1.0,), (1.0,), baseline, "one_point")


RULES: dict[str, Callable[[int], IntegrationPath]] = {
    "riemann_right": riemann_right, "riemann_left": riemann_left, "riemann_middle": riemann_middle,
    "riemann_trapezoid": riemann_trapezoid, "gauss_legendre": gauss_legendre,
}


# ------------------------------------------------------------------------------------------- scores

@dataclass(frozen=True)
class Score:
    """What is attributed. ``value(lp)``: ``[rows, n_sequences]`` log-probabilities -> ``[rows]``.
    ``gradient(lp)``: ``(cotangent [rows, n_sequences], factor [rows])`` with ``dS/dlp = factor * cotangent``."""

    name: str
    description: str
    value: Callable[[torch.Tensor], torch.Tensor]
    gradient: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    is_probability: bool = False
    needs_foils: bool = False  # scores the foil sequences (columns 1.. of lp): foils must be given


def _prob_value(lp):
    return lp[:, 0].exp()


def _prob_gradient(lp):
    return torch.ones_like(lp[:, :1]), lp[:, 0].exp()  # dP/dlogP = P, applied after the backward pass


def _logprob_value(lp):
    return lp[:, 0]


def _logprob_gradient(lp):
    return torch.ones_like(lp[:, :1]), torch.ones_like(lp[:, 0])


def _contrastive_value(lp):
    return lp[:, 0] - (torch.logsumexp(lp[:, 1:], 1) - math.log(lp.shape[1] - 1))


def _contrastive_gradient(lp):
    return torch.cat([torch.ones_like(lp[:, :1]), -torch.softmax(lp[:, 1:], 1)], 1), torch.ones_like(lp[:, 0])


SCORES: dict[str, Score] = {
    "prob": Score("prob", "P(target): the target's (joint) probability, the paper's choice", _prob_value,
                  _prob_gradient, is_probability=True),
    "logprob": Score("logprob", "log P(target)", _logprob_value, _logprob_gradient),
    "contrastive": Score("contrastive", "log P(target) - log mean P(foil) over other answers of the relation "
                         "(foils), at the token where the answers part: fact-specific neurons",
                         _contrastive_value, _contrastive_gradient, needs_foils=True),
}


def get_score(name) -> Score:
    if isinstance(name, Score):
        return name
    if name not in SCORES:
        raise KneuronsError(f"score must be one of {', '.join(SCORES)}, got {name!r}")
    return SCORES[name]


# ------------------------------------------------------------------------------------------- methods

@dataclass(frozen=True)
class Method:
    """A way to find a fact's neurons. ``kind``: ``"attribution"`` (gradients along ``path(steps)``, then
    coarse neurons per prompt above ``threshold x max`` and refining), ``"activation"`` (the activation at the
    blank instead of an attribution, same coarse/refine rule) or ``"random"`` (as many random neurons as the
    integrated-gradients neurons, a control)."""

    name: str
    kind: str
    description: str
    threshold: float | None = None  # default coarse threshold (fraction of the per-prompt maximum)
    path: Callable[[int], IntegrationPath] | None = field(default=None, repr=False)


METHODS: dict[str, Method] = {
    "integrated_gradients": Method(
        "integrated_gradients", "attribution",
        "Dai et al. eq. 3: right Riemann sum over m = steps points alpha = k/m, zero baseline", 0.2,
        riemann_right),
    "gradient_x_activation": Method(
        "gradient_x_activation", "attribution",
        "activation x gradient at the clean activation (the one-point path alpha = 1)", 0.2,
        lambda steps: one_point()),
    "activation": Method(
        "activation", "activation", "the paper's activation baseline: activation above 0.5 x max, same refining",
        0.5),
    "random": Method(
        "random", "random", "as many random neurons as integrated gradients finds (seeded), the paper's control"),
}


def get_method(name) -> Method:
    if isinstance(name, Method):
        return name
    if name not in METHODS:
        raise KneuronsError(f"method must be one of {', '.join(METHODS)}, got {name!r}")
    return METHODS[name]
