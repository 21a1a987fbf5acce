"""Writing result files: refuse to overwrite unless told, and never leave a half-written file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from .errors import KneuronsError


def check_target(path, overwrite: bool = False) -> Path:
    """Fail early (one line) when ``path`` cannot be written."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise KneuronsError(f"{path} exists (pass overwrite=True / --overwrite to replace it)")
    if not path.parent.exists():
        raise KneuronsError(f"directory does not exist: {path.parent}")
    return path


def atomic_write(path, write: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Call ``write(tmp)`` on a temporary file next to ``path``, then rename it into place."""
    path = check_target(path, overwrite)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
