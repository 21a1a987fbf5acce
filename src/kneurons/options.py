"""Options declared once: a configuration dataclass's fields carry their help, range and command-line flag, and
both the command line (generated from the dataclass) and the configuration's own check validate with them.

::

    @dataclass
    class Config:
        steps: int = option(20, help="integration steps", lo=1, hi=10_000)

    add_arguments(parser, Config)                  # --steps, parsed and range-checked
    config = from_arguments(Config, parser.parse_args(argv))

A bad value is one line naming the option and the rule (:class:`~kneurons.errors.KneuronsError`; on the command
line argparse's ``argument --steps: ...``). This module itself imports nothing heavy.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from typing import Any

from .errors import KneuronsError

_KIND = {"int": int, "float": float, "str": str, "bool": bool}


def option(default: Any = dataclasses.MISSING, *, help: str, flag: str | None = None, short: str | None = None,
           lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False,
           choices=None, many: bool = False, zero_means_none: bool = False, negate: str | None = None,
           cli: bool = True, cli_default: Any = dataclasses.MISSING, default_factory=dataclasses.MISSING):
    """A dataclass field with what the command line and the checks need.

    ``lo``/``hi`` (with ``lo_open``/``hi_open``) bound numbers; ``choices`` (a sequence, or a callable returning
    one, for registries filled later) bound strings; ``many`` makes a list (``nargs="+"``);
    ``zero_means_none``: ``0`` on the command line means ``None`` (e.g. "no top-k"); ``negate``: a boolean that
    defaults to True gets a ``--negate`` switch setting it False; ``cli_default``: the command line's default where
    the dataclass has none (e.g. the embedded model)."""
    meta = {"help": help, "flag": flag, "short": short, "lo": lo, "hi": hi, "lo_open": lo_open, "hi_open": hi_open,
            "choices": choices, "many": many, "zero_means_none": zero_means_none, "negate": negate, "cli": cli,
            "cli_default": cli_default}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _kind(f: dataclasses.Field, owner) -> tuple[type, bool]:
    """(scalar type, optional) of a field from its annotation (``int``, ``float | None``, ``list[str] | None``)."""
    hint = typing.get_type_hints(owner)[f.name]
    optional = False
    args = typing.get_args(hint)
    if type(None) in args:
        optional = True
        hint = next(a for a in args if a is not type(None))
    if typing.get_origin(hint) is list:
        hint = typing.get_args(hint)[0]
    return hint, optional


def choices_of(meta) -> list | None:
    c = meta.get("choices")
    return list(c() if callable(c) else c) if c is not None else None


def _rule(meta) -> str:
    lo, hi = meta["lo"], meta["hi"]
    if lo is not None and hi is not None:
        return f"in {'(' if meta['lo_open'] else '['}{lo:g}, {hi:g}{')' if meta['hi_open'] else ']'}"
    if lo is not None:
        return f"{'>' if meta['lo_open'] else '>='} {lo:g}"
    return f"{'<' if meta['hi_open'] else '<='} {hi:g}"


def check_value(name: str, value, kind: type, meta: dict, optional: bool = False) -> None:
    """Raise a one-line :class:`KneuronsError` unless ``value`` fits the field (type, range, choices)."""
    if value is None:
        if optional:
            return
        raise KneuronsError(f"{name} must be given")
    if meta.get("many"):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise KneuronsError(f"{name} must be a list, got {value!r}")
        if not value:
            raise KneuronsError(f"{name}: give at least one value (or none at all for the default)")
        for v in value:
            check_value(name, v, kind, {**meta, "many": False})
        return
    if kind is bool:
        if not isinstance(value, bool):
            raise KneuronsError(f"{name} must be true or false, got {value!r}")
        return
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise KneuronsError(f"{name} must be an integer, got {value!r}")
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise KneuronsError(f"{name} must be a finite number, got {value!r}")
    if kind is str and not isinstance(value, str):
        raise KneuronsError(f"{name} must be a string, got {value!r}")
    choices = choices_of(meta)
    if choices is not None and value not in choices:
        raise KneuronsError(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}")
    lo, hi = meta.get("lo"), meta.get("hi")
    if (lo is not None and (value < lo or meta["lo_open"] and value == lo)) or \
            (hi is not None and (value > hi or meta["hi_open"] and value == hi)):
        raise KneuronsError(f"{name} must be {_rule(meta)}, got {value!r}")


def check_fields(obj) -> None:
    """Check every field of the dataclass instance ``obj`` declared with :func:`option`."""
    for f in dataclasses.fields(obj):
        if "help" in f.metadata:
            kind, optional = _kind(f, type(obj))
            check_value(f.name, getattr(obj, f.name), kind, f.metadata, optional)


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _parser_type(name: str, kind: type, meta: dict):
    """An argparse ``type=`` that parses and checks one value (argparse prints ``argument --x: <message>``)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got "
                                             f"{text!r}") from None
        if meta.get("zero_means_none") and value == 0:
            return None
        try:
            check_value(name, value, kind, {**meta, "many": False, "choices": None})
        except KneuronsError as exc:  # "p must be in (0, 1], got 1.5" -> argparse's "argument --p: must be ..."
            msg = str(exc)
            raise argparse.ArgumentTypeError(msg[len(name) + 1:] if msg.startswith(name + " ") else msg) from None
        return value
    parse.__name__ = kind.__name__
    return parse


def add_arguments(parser: argparse.ArgumentParser, owner, skip=()) -> None:
    """One command-line option per field of the dataclass ``owner`` declared with :func:`option` (``cli=True``),
    named ``--field-name`` unless the field says otherwise, with its help, default, choices and checks."""
    for f in dataclasses.fields(owner):
        meta = f.metadata
        if "help" not in meta or not meta["cli"] or f.name in skip:
            continue
        kind, optional = _kind(f, owner)
        names = [_flag(f)] + ([meta["short"]] if meta.get("short") else [])
        default = meta["cli_default"] if meta["cli_default"] is not dataclasses.MISSING else (
            f.default if f.default is not dataclasses.MISSING else
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and \
            meta["cli_default"] is dataclasses.MISSING
        text = meta["help"] + ("" if required or default is None or kind is bool else f" (default: {_show(default)})")
        if kind is bool:
            if meta.get("negate"):
                parser.add_argument("--" + meta["negate"], dest=f.name, action="store_false", help=text)
            else:
                parser.add_argument(*names, dest=f.name, action="store_true", default=bool(default), help=text)
            continue
        kw: dict = {"dest": f.name, "help": text, "required": required,
                    "metavar": None if choices_of(meta) is not None else names[0].lstrip("-").upper().replace("-", "_")}
        if not required:
            kw["default"] = default
        choices = choices_of(meta)
        if choices is not None:
            kw["choices"] = choices
        elif kind in (int, float):
            kw["type"] = _parser_type(f.name, kind, meta)
        if meta.get("many"):
            kw["nargs"] = "+"
        parser.add_argument(*names, **kw)


def _show(v) -> str:
    return " ".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)


def from_arguments(owner, args: argparse.Namespace, **extra):
    """An instance of the dataclass ``owner`` from parsed arguments (fields without an option keep their
    defaults; ``extra`` sets fields directly)."""
    values = {}
    for f in dataclasses.fields(owner):
        if f.name in extra:
            values[f.name] = extra[f.name]
        elif "help" in f.metadata and f.metadata["cli"] and hasattr(args, f.name):
            values[f.name] = getattr(args, f.name)
    return owner(**values)
