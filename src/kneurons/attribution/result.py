"""The result of an attribution: one score per FFN neuron, with provenance, that saves, loads and becomes a
DataFrame."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from .._io import atomic_write
from ..errors import KneuronsError


def model_info(handle) -> dict:
    """The model's provenance recorded in results (:meth:`kneurons.ModelHandle.info`)."""
    return handle.info()


@dataclass
class Attribution:
    """Attribution scores of every FFN neuron for one prompt and target (integrated gradients unless
    ``params["method"]`` says otherwise; ``params`` also records the execution plan that computed them)."""

    scores: torch.Tensor  # [n_layers, d_ff]
    activations: torch.Tensor  # [n_layers, d_ff] clean activations at the blank
    prompt: str
    target: str
    target_ids: list[int]
    base_score: float  # P(target) (or log P) with nothing changed
    baseline_scores: torch.Tensor  # [n_layers] score with layer l's blank activation set to the baseline (0)
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
