"""kneurons: knowledge neurons (Dai et al., ACL 2022) for any Hugging Face transformer."""

__version__ = "0.1.0"

from .errors import KneuronsError  # noqa: E402
from .architectures import ARCHITECTURES, ArchSpec, register_architecture, resolve  # noqa: E402
from .models import DEFAULT_MODEL, ModelHandle, load_model  # noqa: E402
from .prompts import Assessment, assess, encode, parse_cloze  # noqa: E402
from .attribution import Attribution, attribute, integrated_gradients  # noqa: E402
from .neurons import (KnowledgeNeurons, activation_baseline, coarse_neurons, locate, random_neurons,  # noqa: E402
                      refine)
from .interventions import (Edit, Intervention, amplify, erase_relation, measure_intervention,  # noqa: E402
                            suppress, update_fact)

__all__ = [
    "__version__", "KneuronsError", "ARCHITECTURES", "ArchSpec", "register_architecture", "resolve",
    "DEFAULT_MODEL", "ModelHandle", "load_model", "Assessment", "assess", "encode", "parse_cloze",
    "Attribution", "attribute", "integrated_gradients", "KnowledgeNeurons", "activation_baseline", "coarse_neurons",
    "locate", "random_neurons", "refine", "Edit", "Intervention", "amplify", "erase_relation",
    "measure_intervention", "suppress", "update_fact",
]
