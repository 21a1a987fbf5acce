"""kneurons: knowledge neurons (Dai et al., ACL 2022) for any Hugging Face transformer.

The public names below are imported on first use (PEP 562), so ``import kneurons`` and the command line start
without loading torch and transformers until they are needed.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

#: public name -> the submodule that defines it
_EXPORTS = {
    "KneuronsError": "errors",
    "ARCHITECTURES": "architectures", "ArchSpec": "architectures", "register_architecture": "architectures",
    "resolve": "architectures",
    "DEFAULT_MODEL": "models", "ModelHandle": "models", "load_model": "models",
    "Assessment": "prompts", "assess": "prompts", "encode": "prompts", "parse_cloze": "prompts",
    "Attribution": "attribution", "attribute": "attribution", "integrated_gradients": "attribution",
    "KnowledgeNeurons": "neurons", "activation_baseline": "neurons", "coarse_neurons": "neurons",
    "locate": "neurons", "random_neurons": "neurons", "refine": "neurons", "relation_neurons": "neurons",
    "fact_specific": "neurons", "OptimizeSettings": "interventions",
    "Edit": "interventions", "Intervention": "interventions", "amplify": "interventions",
    "erase_relation": "interventions", "measure_intervention": "interventions", "suppress": "interventions",
    "update_fact": "interventions",
    "explain_neurons": "explain",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kneurons' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
