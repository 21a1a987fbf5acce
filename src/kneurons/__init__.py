"""kneurons: knowledge neurons (Dai et al., ACL 2022) for any Hugging Face transformer."""

__version__ = "0.1.0"

from .errors import KneuronsError  # noqa: E402
from .architectures import ARCHITECTURES, ArchSpec, register_architecture, resolve  # noqa: E402
from .models import DEFAULT_MODEL, ModelHandle, load_model  # noqa: E402
from .prompts import Assessment, assess, encode, parse_cloze  # noqa: E402

__all__ = [
    "__version__", "KneuronsError", "ARCHITECTURES", "ArchSpec", "register_architecture", "resolve",
    "DEFAULT_MODEL", "ModelHandle", "load_model", "Assessment", "assess", "encode", "parse_cloze",
]
