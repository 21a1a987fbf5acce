"""Reading the data files the loaders share: JSON and JSON-lines, with one-line errors naming the file and line."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from ..errors import KneuronsError


def _read_json(path: Path, what: str):
    if not path.is_file():
        raise KneuronsError(f"{what} not found: {path}")
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rt", encoding="utf-8") as fh:
                text = fh.read()
        else:
            text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise KneuronsError(f"cannot read {what} {path}: {e}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise KneuronsError(f"invalid JSON in {path}: {e.msg} at line {e.lineno} column {e.colno}") from None


def _read_jsonl(path: Path, what: str) -> list[tuple[int, dict]]:
    """``(line number, object)`` for each non-blank line."""
    if not path.is_file():
        raise KneuronsError(f"{what} not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise KneuronsError(f"cannot read {what} {path}: {e}") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise KneuronsError(f"invalid JSON in {path} line {n}: {e.msg} at column {e.colno}") from None
        if not isinstance(obj, dict):
            raise KneuronsError(f"{path} line {n}: expected a JSON object")
        out.append((n, obj))
    return out
