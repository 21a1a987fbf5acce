"""``kneurons export``: a run's tables as parquet or CSV files, one per experiment, for pandas.

List-valued columns (e.g. ``neurons``) are written as JSON text in CSV; parquet keeps them as lists.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import KneuronsError
from .store import RunStore

FORMATS = ("parquet", "csv")


def export(run_dir, fmt: str = "parquet", out=None, overwrite: bool = False) -> list[Path]:
    """Write ``<experiment>.<fmt>`` for every experiment of the run into ``out`` (default ``RUN_DIR/export``).
    All files appear together or not at all."""
    if fmt not in FORMATS:
        raise KneuronsError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == "parquet":
        import importlib.util

        if importlib.util.find_spec("pyarrow") is None:  # pandas writes parquet through pyarrow
            raise KneuronsError("parquet export needs pyarrow (pip install pyarrow), or use --format csv")
    with RunStore(run_dir) as store:
        out = Path(out) if out is not None else store.dir / "export"
        if out.exists() and not out.is_dir():
            raise KneuronsError(f"{out} is a file, not a directory")
        if out.exists() and any(out.iterdir()) and not overwrite:
            raise KneuronsError(f"{out} exists and is not empty (pass --overwrite to replace it)")
        if not out.parent.is_dir():
            raise KneuronsError(f"directory does not exist: {out.parent}")
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp", dir=out.parent))
        try:
            names = []
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
            (tmp / "config.json").write_text(json.dumps(store.config, indent=1, sort_keys=True))
            names.append("config.json")
            if out.exists():
                old = out.with_name(f".{out.name}.old{os.getpid()}")
                os.replace(out, old)
                os.replace(tmp, out)
                shutil.rmtree(old)
            else:
                os.replace(tmp, out)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
    return [out / n for n in names]
