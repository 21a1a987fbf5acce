"""Knowledge neurons: coarse neurons per prompt, refined neurons per fact, and baselines.

* **Coarse** neurons of one prompt: attribution above ``threshold x max`` over all neurons of all layers (the
  paper's t = 0.2), or above an absolute threshold, or the top-k.
* **Refined** neurons of a fact: coarse in more than a fraction ``p`` (0.7) of its paraphrase prompts and in at
  least ``min_prompts`` (3, capped by the number of prompts). With ``adaptive=True`` p moves by 0.05 (at most 6
  rounds) until the fact has 2-5 neurons, as the authors did.
* **Baselines** with the same interface: neurons chosen by activation magnitude (``0.5 x max`` activation at the
  blank, same refining) and random neurons (same count, optionally the same layer distribution), seeded.

:func:`locate` takes any method of the registry :data:`kneurons.attribution.METHODS` (``method=``): the gradient
methods (integrated gradients, the default; gradient x activation) and the two baselines.
"""

from __future__ import annotations

import json
import numbers
import random
import time
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence  # noqa: F401
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import __version__
from .attribution import DEFAULT_BATCH_SIZE, Attribution, attribute, get_method, model_info
from .attribution.methods import check_steps
from ._io import atomic_write
from .errors import KneuronsError
from .hooks import ffn_hooks
from .prompts import encode

Neuron = tuple[int, int]  # (layer, index in the layer's FFN)


def _index(v, what: str) -> int:
    # bool is an int subclass and a float like 29.7 (or 5.0) is no neuron id: only real integers
    if isinstance(v, torch.Tensor) and v.dim() == 0 and not v.dtype.is_floating_point and v.dtype != torch.bool:
        return int(v)
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise KneuronsError(f"{what}: {v!r} is not an integer")
    return int(v)


def as_neurons(entries, where: str = "neurons") -> list[Neuron]:
    """Validate neuron entries — each a ``(layer, index)`` pair of integers — and return them as tuples (order
    kept). A one-line error names the first bad entry (a string, three numbers, a float or a bool id...)."""
    if isinstance(entries, (str, bytes)) or not isinstance(entries, Iterable):
        raise KneuronsError(f"{where} must be a list of [layer, index] pairs, got {type(entries).__name__}")
    out = []
    for k, n in enumerate(entries):
        if isinstance(n, (str, bytes, dict)) or not (hasattr(n, "__len__") and hasattr(n, "__getitem__")):
            raise KneuronsError(f"{where}[{k}] must be a [layer, index] pair, got {n!r}")
        if len(n) != 2:
            raise KneuronsError(f"{where}[{k}] must be a [layer, index] pair, got {len(n)} values: {list(n)!r}")
        out.append((_index(n[0], f"{where}[{k}] layer"), _index(n[1], f"{where}[{k}] index")))
    return out


def check_neurons(handle, neurons, where: str = "neurons") -> list[Neuron]:
    """The distinct neurons of ``neurons`` (a :class:`KnowledgeNeurons` or ``(layer, index)`` pairs), sorted and
    checked against the model's shape. A result located on another model is refused when the shape differs and
    accepted with a warning naming both models when only the name does."""
    info = getattr(neurons, "model", None)
    if isinstance(info, dict):
        shape = (info.get("n_layers"), info.get("d_ff"))
        other = info.get("name")
        if shape[0] is not None and shape != (handle.n_layers, handle.d_ff):
            raise KneuronsError(f"{where} were located on {other!r} ({shape[0]} layers x {shape[1]} FFN neurons); "
                                f"{handle.name!r} has {handle.n_layers} x {handle.d_ff}")
        if other and other != handle.name:
            warnings.warn(f"{where} were located on model {other!r}, and are used on {handle.name!r} (same shape)",
                          stacklevel=3)
    out = sorted(set(as_neurons(getattr(neurons, "neurons", neurons), where)))
    if not out:
        raise KneuronsError(f"{where}: empty neuron set")
    for l, i in out:
        if not (0 <= l < handle.n_layers) or not (0 <= i < handle.d_ff):
            raise KneuronsError(f"{where}: neuron ({l}, {i}) out of range: layers 0..{handle.n_layers - 1}, "
                                f"neurons 0..{handle.d_ff - 1}")
    return out


def _check_fraction(name: str, value) -> None:
    if value is None:
        return
    if not isinstance(value, (int, float)) or not (0 < float(value) <= 1):
        raise KneuronsError(f"{name} must be in (0, 1], got {value!r}")


def coarse_neurons(scores, threshold: float | None = 0.2, abs_threshold: float | None = None,
                   top_k: int | None = None) -> list[Neuron]:
    """Neurons of one prompt whose score exceeds ``threshold x max`` (or ``abs_threshold``, or the ``top_k``)."""
    if isinstance(scores, Attribution):
        scores = scores.scores
    scores = torch.as_tensor(scores)
    if scores.dim() != 2:
        raise KneuronsError("scores must be a [n_layers, d_ff] matrix")
    d = scores.shape[1]
    if top_k is not None:
        if int(top_k) < 1:
            raise KneuronsError(f"top_k must be >= 1, got {top_k!r}")
        idx = scores.flatten().topk(min(int(top_k), scores.numel())).indices
    elif abs_threshold is not None:
        idx = (scores.flatten() > float(abs_threshold)).nonzero()[:, 0]
    else:
        _check_fraction("threshold", threshold)
        top = scores.max()
        if top <= 0:
            return []
        idx = (scores.flatten() > float(threshold) * top).nonzero()[:, 0]
    return sorted((int(i) // d, int(i) % d) for i in idx)


def refine(coarse_sets: Sequence[Sequence[Neuron]], p: float = 0.7, min_prompts: int = 3) -> list[Neuron]:
    """Neurons coarse in more than ``p`` of the prompts and in at least ``min(min_prompts, n_prompts)``."""
    _check_fraction("p", p)
    n = len(coarse_sets)
    if n < 2:
        raise KneuronsError(f"refining needs at least 2 prompts of the fact, got {n}")
    counts = Counter(nrn for s in coarse_sets for nrn in set(map(tuple, s)))
    need = min(int(min_prompts), n)
    return sorted(nrn for nrn, c in counts.items() if c > p * n and c >= need)


def refine_adaptive(coarse_sets, p: float = 0.7, min_prompts: int = 3, lo: int = 2, hi: int = 5,
                    step: float = 0.05, rounds: int = 6) -> tuple[list[Neuron], float]:
    """:func:`refine`, moving ``p`` by ``step`` (at most ``rounds`` times) until ``lo <= len <= hi``.

    Raising ``p`` never empties the set: when the next step up would leave no neuron (every neuron shared by the
    same number of prompts), the last non-empty set is kept, even if it has more than ``hi`` neurons."""
    chosen = refine(coarse_sets, p, min_prompts)
    for _ in range(rounds):
        if len(chosen) < lo and p - step > 0:
            p = round(p - step, 10)
        elif len(chosen) > hi and p + step < 1:
            nxt = refine(coarse_sets, round(p + step, 10), min_prompts)
            if not nxt:
                break
            p = round(p + step, 10)
            chosen = nxt
            continue
        else:
            break
        chosen = refine(coarse_sets, p, min_prompts)
    return chosen, p


@dataclass
class KnowledgeNeurons:
    """The knowledge neurons of one fact, with how they were found."""

    neurons: list[Neuron]
    prompts: list[str]
    target: str
    coarse: list[list[Neuron]]
    base_probs: list[float]
    params: dict
    model: dict
    method: str = "integrated_gradients"  # a name of kneurons.attribution.METHODS
    version: str = __version__
    created: float = field(default_factory=time.time)
    attributions: list[Attribution] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.neurons)

    def __iter__(self):
        return iter(self.neurons)

    def layers(self) -> dict[int, int]:
        """Layer histogram: layer -> number of neurons."""
        return dict(sorted(Counter(l for l, _ in self.neurons).items()))

    def to_dataframe(self):
        import pandas as pd

        rows = []
        for l, i in self.neurons:
            row = {"target": self.target, "layer": l, "neuron": i, "method": self.method,
                   "n_prompts_coarse": sum((l, i) in set(map(tuple, c)) for c in self.coarse)}
            if self.attributions:
                row["mean_score"] = float(sum(a.scores[l, i] for a in self.attributions) / len(self.attributions))
            rows.append(row)
        return pd.DataFrame(rows, columns=None if rows else ["target", "layer", "neuron", "method", "n_prompts_coarse"])

    def as_dict(self) -> dict:
        return {"kind": "kneurons.KnowledgeNeurons", "method": self.method, "target": self.target,
                "prompts": self.prompts, "neurons": [list(n) for n in self.neurons],
                "coarse": [[list(n) for n in c] for c in self.coarse], "base_probs": self.base_probs,
                "params": self.params, "model": self.model, "version": self.version, "created": self.created}

    def save(self, path, overwrite: bool = False) -> Path:
        return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(self.as_dict(), indent=1)), overwrite)

    @classmethod
    def load(cls, path) -> "KnowledgeNeurons":
        path = Path(path)
        if not path.exists():
            raise KneuronsError(f"neurons file does not exist: {path}")
        if not path.is_file():
            raise KneuronsError(f"neurons file is not a file: {path}")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise KneuronsError(f"not a readable kneurons neurons file: {path} ({type(exc).__name__})") from None
        if not isinstance(d, dict) or d.get("kind") != "kneurons.KnowledgeNeurons":
            raise KneuronsError(f"not a readable kneurons neurons file: {path} (not a kneurons.KnowledgeNeurons "
                                "object)")
        where = f"{path.name}"
        try:
            prompts, coarse = d.get("prompts", []), d.get("coarse", [])
            if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
                raise KneuronsError(f"{where}: prompts must be a list of strings")
            if not isinstance(d.get("target", ""), str):
                raise KneuronsError(f"{where}: target must be a string")
            if not isinstance(coarse, list):
                raise KneuronsError(f"{where}: coarse must be a list of neuron lists")
            for key in ("params", "model"):
                if not isinstance(d.get(key, {}), dict):
                    raise KneuronsError(f"{where}: {key} must be an object")
            return cls(as_neurons(d["neurons"], f"{where}: neurons"), prompts, d.get("target", ""),
                       [as_neurons(c, f"{where}: coarse[{k}]") for k, c in enumerate(coarse)],
                       [float(b) for b in d.get("base_probs", [])], dict(d.get("params", {})),
                       dict(d.get("model", {})), str(d.get("method", "integrated_gradients")),
                       str(d.get("version", "")), float(d.get("created", 0.0)))
        except KeyError as exc:
            raise KneuronsError(f"{where}: missing field {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            if isinstance(exc, KneuronsError):
                raise
            raise KneuronsError(f"{where}: malformed field ({type(exc).__name__}: {exc})") from None


def _targets_one_fact(prompts, target) -> str:
    if isinstance(prompts, str):
        raise KneuronsError("give a list of paraphrase prompts of one fact")
    if target is None:
        raise KneuronsError("no target given (--target)")
    if not isinstance(target, str):
        targets = {str(t).strip() for t in target}
        if len(targets) != 1:
            raise KneuronsError(f"prompts of different facts mixed (targets {sorted(targets)}); locate one fact at a time")
        target = targets.pop()
    if len(prompts) < 2:
        raise KneuronsError(f"locating refined neurons needs at least 2 paraphrase prompts, got {len(prompts)}")
    return target


def locate(handle, prompts: Sequence[str], target, steps: int = 20, threshold: float | None = None,
           abs_threshold: float | None = None, top_k: int | None = None, p: float = 0.7, min_prompts: int = 3,
           adaptive: bool = False, score: str = "prob", batch_size: int = DEFAULT_BATCH_SIZE,
           keep_attributions: bool = True, progress: Callable[[int], None] | None = None,
           batch_prompts: bool = False, method: str = "integrated_gradients", seed: int = 0,
           foils: Sequence[str] | None = None) -> KnowledgeNeurons:
    """Refined knowledge neurons of the fact expressed by ``prompts`` (paraphrases) with answer ``target``.

    ``method`` (a name of :data:`kneurons.attribution.METHODS`): ``"integrated_gradients"`` (the paper's) or
    ``"gradient_x_activation"`` score every neuron per prompt; ``"activation"`` uses the blank activation as the
    score (the paper's baseline); the coarse neurons of each prompt are those above ``threshold x max`` (default:
    the method's, 0.2 for attributions and 0.5 for activations; or ``abs_threshold``, or the ``top_k``), refined
    over the prompts (``p``, ``min_prompts``, ``adaptive``). ``"random"`` returns as many random neurons as
    integrated gradients finds (or ``top_k``), seeded by ``seed``. ``batch_prompts``: let the paraphrases' rows
    share passes (see :func:`attribute`). ``score="contrastive"`` with ``foils`` (other answers of the relation)
    finds neurons that raise *this* answer rather than every answer of the relation (see
    :mod:`kneurons.attribution.methods`)."""
    m = get_method(method)
    check_steps(steps)
    target = _targets_one_fact(prompts, target)
    threshold = (m.threshold if m.threshold is not None else 0.2) if threshold is None else threshold
    _check_fraction("threshold", threshold)
    _check_fraction("p", p)
    for pr in prompts:  # fail fast on bad prompts before any compute
        encode(handle, pr, target)
    if m.kind == "random":
        like = top_k if top_k is not None else locate(
            handle, prompts, target, steps, threshold, abs_threshold, None, p, min_prompts, adaptive, score,
            batch_size, False, progress, batch_prompts, foils=foils)
        rnd = random_neurons(handle, like, seed=seed)
        rnd.params["count_from"] = "top_k" if top_k is not None else "integrated_gradients"
        return rnd
    params = {"method": m.name, "threshold": threshold, "abs_threshold": abs_threshold, "top_k": top_k, "p": p}
    if m.kind == "activation":
        from .prompts import assess

        attrs = None
        scores = [blank_activations(handle, pr, target) for pr in prompts]
        base_probs = [a.prob for a in assess(handle, list(prompts), target)]
    else:
        attrs = attribute(handle, list(prompts), target, steps=steps, score=score, batch_size=batch_size,
                          progress=progress, batch_prompts=batch_prompts, method=m.name, foils=foils)
        scores = attrs
        base_probs = [a.base_prob for a in attrs]
        params.update(steps=steps, score=score, batch_size=batch_size)
        if foils:
            params["foils"] = list(attrs[0].params.get("foils_given", []))
    coarse = [coarse_neurons(sc, threshold, abs_threshold, top_k) for sc in scores]
    if adaptive:
        neurons, p_used = refine_adaptive(coarse, p, min_prompts)
    else:
        neurons, p_used = refine(coarse, p, min_prompts), p
    params.update(p_used=p_used, min_prompts=min_prompts, adaptive=adaptive)
    return KnowledgeNeurons(neurons, list(prompts), target, coarse, base_probs, params, model_info(handle), m.name,
                            attributions=attrs if keep_attributions else None)


def blank_activations(handle, prompt: str, target: str) -> torch.Tensor:
    """FFN activations ``[n_layers, d_ff]`` at the blank position of one prompt (clean forward)."""
    enc = encode(handle, prompt, target)
    acts = {}

    def grab(layer, x):
        acts[layer] = x[0, enc.blank].detach().float().cpu().clone()

    with torch.inference_mode(), ffn_hooks(handle.arch, grab):
        handle.model(input_ids=torch.tensor([enc.input_ids], device=handle.device))
    return torch.stack([acts[l] for l in range(handle.n_layers)])


def activation_baseline(handle, prompts: Sequence[str], target, threshold: float = 0.5, p: float = 0.7,
                        min_prompts: int = 3, adaptive: bool = False) -> KnowledgeNeurons:
    """Baseline of the paper: neurons whose *activation* exceeds ``threshold x max``, refined the same way
    (:func:`locate` with ``method="activation"``)."""
    return locate(handle, prompts, target, threshold=threshold, p=p, min_prompts=min_prompts, adaptive=adaptive,
                  method="activation")


def random_neurons(handle, like: KnowledgeNeurons | int, seed: int = 0, same_layers: bool = False,
                   exclude: Sequence[Neuron] = ()) -> KnowledgeNeurons:
    """Random neurons: as many as ``like`` (a count or a result), optionally in the same layers, seeded."""
    rng = random.Random(seed)
    L, D = handle.n_layers, handle.d_ff
    excluded = set(map(tuple, exclude))
    if isinstance(like, KnowledgeNeurons):
        excluded |= set(like.neurons)
        layers = [l for l, _ in like.neurons]
        prompts, target = like.prompts, like.target
    else:
        if int(like) < 1:
            raise KneuronsError("random neurons: count must be >= 1")
        layers, prompts, target = [None] * int(like), [], ""
        if same_layers:
            raise KneuronsError("same_layers needs a KnowledgeNeurons result to copy the layers from")
    if len(layers) + len(excluded) > L * D or (same_layers and any(
            layers.count(l) > D - sum(1 for x in excluded if x[0] == l) for l in set(layers) if l is not None)):
        raise KneuronsError("random neurons: asked for more neurons than the model has outside the excluded ones")
    chosen: set[Neuron] = set()
    for l in layers:
        while True:
            layer = l if (same_layers and l is not None) else rng.randrange(L)
            nrn = (layer, rng.randrange(D))
            if nrn not in chosen and nrn not in excluded:
                chosen.add(nrn)
                break
    params = {"seed": seed, "same_layers": same_layers, "count": len(layers)}
    return KnowledgeNeurons(sorted(chosen), list(prompts), target, [], [], params, model_info(handle), "random")


# ------------------------------------------------------------------------------------ relation neurons

def relation_neurons(neuron_sets: Sequence[KnowledgeNeurons], q: float = 0.5, level: str = "refined",
                     relation: str = "", min_facts: int = 2) -> KnowledgeNeurons:
    """Neurons of a relation rather than of one fact: those found for more than a fraction ``q`` of the
    relation's facts and for at least ``min_facts`` of them (a neuron of one fact is no relation neuron, however
    few the facts; ``neuron_sets``: each fact's :class:`KnowledgeNeurons`, from :func:`locate`). ``level``:
    ``"refined"`` counts a fact's refined neurons, ``"coarse"`` the neurons coarse in any of its prompts.

    A :class:`KnowledgeNeurons` (``method="relation"``; ``params`` has ``q``, ``level``, the number of facts and
    each neuron's fact count) that saves, loads and becomes a DataFrame like any other; :func:`fact_specific`
    takes it away from a fact's set, :func:`kneurons.erase_relation` (``neurons=``) erases it."""
    sets = list(neuron_sets)
    _check_fraction("q", q)
    if level not in ("refined", "coarse"):
        raise KneuronsError(f"level must be 'refined' or 'coarse', got {level!r}")
    if len(sets) < 2:
        raise KneuronsError(f"relation neurons need the neuron sets of at least 2 facts, got {len(sets)}")
    if isinstance(min_facts, bool) or not isinstance(min_facts, int) or min_facts < 1:
        raise KneuronsError(f"min_facts must be an integer >= 1, got {min_facts!r}")
    for k, kn in enumerate(sets):
        if not isinstance(kn, KnowledgeNeurons):
            raise KneuronsError(f"neuron set {k} is not a KnowledgeNeurons result (from locate)")
    models = {json.dumps(kn.model, sort_keys=True) for kn in sets if kn.model}
    if len(models) > 1:
        raise KneuronsError("the neuron sets come from different models")

    def of(kn):
        return set(kn.neurons) if level == "refined" else {n for c in kn.coarse for n in map(tuple, c)}

    counts = Counter(n for kn in sets for n in of(kn))
    chosen = sorted(n for n, c in counts.items() if c > q * len(sets) and c >= min_facts)
    params = {"q": q, "min_facts": min_facts, "level": level, "relation": relation, "facts": len(sets),
              "targets": [kn.target for kn in sets], "fact_counts": [[l, i, counts[(l, i)]] for l, i in chosen],
              "from_method": sorted({kn.method for kn in sets})}
    return KnowledgeNeurons(chosen, [], "", [], [], params, dict(sets[0].model), "relation")


def fact_specific(kn: KnowledgeNeurons, relation: KnowledgeNeurons | Iterable[Neuron]) -> KnowledgeNeurons:
    """``kn``'s neurons that are not relation neurons: ``refined - relation`` (the authors' update filter, which
    drops neurons shared by more than 10 % of the relation's facts, generalised to any ``q``)."""
    rel = set(relation.neurons if isinstance(relation, KnowledgeNeurons) else as_neurons(relation, "relation"))
    kept = [n for n in kn.neurons if n not in rel]
    params = dict(kn.params, from_method=kn.method, relation_neurons_removed=len(kn.neurons) - len(kept))
    if isinstance(relation, KnowledgeNeurons):
        params["relation_q"] = relation.params.get("q")
    return KnowledgeNeurons(kept, list(kn.prompts), kn.target, [list(c) for c in kn.coarse], list(kn.base_probs),
                            params, dict(kn.model), "fact_specific")
