"""``kneurons export``: a run's tables as parquet or CSV files, one per experiment, for pandas.

List-valued columns (e.g. ``neurons``) are written as JSON text in CSV; parquet keeps them as lists. The
directory is written atomically (:func:`kneurons._io.atomic_dir`): all files appear together or not at all, and
an existing export is swapped out in one step. The target is checked first, by the rule the report uses too
(:func:`~kneurons.experiments.store.check_output_target`): never a run directory or anything inside one but
``RUN_DIR/export``, and never a directory holding anything but an earlier export.
"""

from __future__ import annotations

import json
from pathlib import Path

from .. import _io
from ..errors import KneuronsError
from .registry import EXPERIMENTS
from .store import CONFIG, RunStore, check_output_target

FORMATS = ("parquet", "csv")


def _legacy_export_file(name: str) -> bool:
    """Files an export wrote before exports recorded a manifest."""
    return name == CONFIG or any(name == f"{e}.{f}" for e in EXPERIMENTS for f in FORMATS)


def _is_export(directory: Path) -> bool:
    if not _io.owned_output(directory, "export", _legacy_export_file):
        return False
    man = directory / _io.MANIFEST
    # without a manifest, a lone config.json is not enough to call a directory an export
    return man.is_file() or any(p.name != CONFIG for p in directory.iterdir())


def export(run_dir, fmt: str = "parquet", out=None, overwrite: bool = False) -> list[Path]:
    """Write ``<experiment>.<fmt>`` for every experiment of the run, and the run's ``config.json``, into ``out``
    (default ``RUN_DIR/export``). All files appear together or not at all. An existing non-empty ``out`` is
    replaced only with ``overwrite`` and only when it holds an earlier export."""
    if fmt not in FORMATS:
        raise KneuronsError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == "parquet":
        import importlib.util

        if importlib.util.find_spec("pyarrow") is None:  # pandas writes parquet through pyarrow
            raise KneuronsError("parquet export needs pyarrow (pip install pyarrow), or use --format csv")
    with RunStore(run_dir) as store:  # read-only, one snapshot; integrity and checksums checked on open
        out = Path(out) if out is not None else store.dir / "export"
        check_output_target(store.dir, out, "export", overwrite, _legacy_export_file)
        if out.is_dir() and any(out.iterdir()) and not _is_export(out):
            raise KneuronsError(f"{out} holds files that are not a kneurons export; nothing there is replaced: "
                                "choose another output directory")
        names = []

        def build(tmp: Path) -> None:
            for exp in store.experiments():
                df = store.table(exp)
                for col in df.columns:
                    if df[col].map(lambda v: isinstance(v, (list, dict))).any():
                        if fmt == "csv":
                            df[col] = df[col].map(lambda v: json.dumps(v) if isinstance(v, (list, dict)) else v)
                        else:
                            df[col] = df[col].map(lambda v: json.dumps(v) if isinstance(v, dict) else v)
                target = tmp / f"{exp}.{fmt}"
                (df.to_parquet(target, index=False) if fmt == "parquet" else df.to_csv(target, index=False))
                names.append(target.name)
            (tmp / CONFIG).write_text(json.dumps(store.config, indent=1, sort_keys=True))
            names.append(CONFIG)

        _io.atomic_dir(out, build, replace=lambda d: overwrite and _is_export(d), manifest="export")
    return [out / n for n in names]
