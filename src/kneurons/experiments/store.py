"""The run store: a run directory holding its configuration and a SQLite database of results.

``RUN_DIR/config.json``   the run's configuration (written once, atomically; a different configuration into the
                          same directory is refused)
``RUN_DIR/results.sqlite`` one row per (experiment, unit), where a unit is a fact (``P19:17``) or a relation;
                          the row holds that unit's result rows as JSON and is written in one transaction

A unit is either wholly in the database or not at all: SQLite commits atomically (rollback journal,
``synchronous=FULL``), so a run killed at any moment — SIGKILL included — resumes with nothing lost that was
committed and nothing half-written. Rerunning skips the units already there.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

from .._io import atomic_write
from ..errors import KneuronsError

CONFIG = "config.json"
DATABASE = "results.sqlite"
SCHEMA = 1

_TABLES = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS results (
    experiment TEXT NOT NULL,
    unit       TEXT NOT NULL,
    relation   TEXT NOT NULL,
    rows       TEXT NOT NULL,
    seconds    REAL NOT NULL,
    created    REAL NOT NULL,
    PRIMARY KEY (experiment, unit)
);
"""


def _diff(old: dict, new: dict) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}" for k in keys if old.get(k) != new.get(k)]


class RunStore:
    """Results of one run. ``RunStore.open(run_dir, config)`` creates or resumes; ``RunStore(run_dir)`` reads."""

    def __init__(self, run_dir, _create: bool = False):
        self.dir = Path(run_dir)
        cfg_path = self.dir / CONFIG
        db_path = self.dir / DATABASE
        if not _create:
            if not self.dir.is_dir():
                raise KneuronsError(f"run directory does not exist: {self.dir}")
            if not cfg_path.is_file() or not db_path.is_file():
                raise KneuronsError(f"not a kneurons run directory (no {CONFIG} / {DATABASE}): {self.dir}")
        try:
            self.config = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
            if not isinstance(self.config, dict):
                raise ValueError("config is not an object")
        except (ValueError, OSError) as exc:
            raise KneuronsError(f"corrupt run configuration {cfg_path}: {exc}") from None
        if not _create and not db_path.is_file():
            raise KneuronsError(f"no results database in {self.dir}")
        try:
            self.db = sqlite3.connect(str(db_path), timeout=30, isolation_level=None)
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(_TABLES)
            self.db.execute("SELECT count(*) FROM results").fetchone()
        except sqlite3.DatabaseError as exc:
            raise KneuronsError(f"corrupt results database {db_path}: {exc}") from None

    # ------------------------------------------------------------------------------------------- opening
    @classmethod
    def open(cls, run_dir, config: dict) -> "RunStore":
        """Create ``run_dir`` for ``config``, or resume it if it holds the same configuration."""
        d = Path(run_dir)
        if d.exists() and not d.is_dir():
            raise KneuronsError(f"run directory is a file: {d}")
        cfg_path = d / CONFIG
        if cfg_path.is_file():
            with cls(d) as existing:
                old = existing.config
            diff = _diff(old, config)
            if diff:
                raise KneuronsError(f"{d} holds a run with a different configuration ({'; '.join(diff)}); use "
                                    "another --out directory")
        elif d.is_dir():
            # a run killed before its config was in place leaves only the database (and maybe a temp config)
            leftovers = [p for p in d.iterdir() if p.name.startswith(f".{CONFIG}.tmp")]
            if any(p.name not in (DATABASE, DATABASE + "-journal") and p not in leftovers for p in d.iterdir()):
                raise KneuronsError(f"{d} is not empty and is not a kneurons run directory")
            for p in leftovers:
                p.unlink()
        d.mkdir(parents=True, exist_ok=True)
        store = cls(d, _create=True)
        if not cfg_path.is_file() and store.db.execute("SELECT count(*) FROM results").fetchone()[0]:
            store.close()
            raise KneuronsError(f"{d} holds results but no {CONFIG}: not resumable; use another --out")
        if not cfg_path.is_file():
            # the database exists before the config: a crash in between leaves an empty database, reused above
            atomic_write(cfg_path, lambda tmp: tmp.write_text(json.dumps(config, indent=1, sort_keys=True)),
                         overwrite=False)
            store.config = config
            store.set_meta("schema", SCHEMA)
            store.set_meta("created", time.time())
        return store

    def close(self) -> None:
        self.db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    # ------------------------------------------------------------------------------------------- writing
    def put(self, experiment: str, unit: str, relation: str, rows: list[dict], seconds: float = 0.0) -> None:
        """Store one unit's rows in one transaction (a unit already stored is an error: results never change)."""
        payload = json.dumps(rows, allow_nan=True)
        try:
            with self.db:  # one transaction
                self.db.execute("BEGIN IMMEDIATE")
                self.db.execute("INSERT INTO results VALUES (?, ?, ?, ?, ?, ?)",
                                (experiment, unit, relation, payload, float(seconds), time.time()))
        except sqlite3.IntegrityError:
            raise KneuronsError(f"{experiment}/{unit} is already in the run store") from None

    def set_meta(self, key: str, value) -> None:
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))

    # ------------------------------------------------------------------------------------------- reading
    def meta(self, key: str, default=None):
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    def has(self, experiment: str, unit: str) -> bool:
        return self.db.execute("SELECT 1 FROM results WHERE experiment = ? AND unit = ?",
                               (experiment, unit)).fetchone() is not None

    def done(self, experiment: str) -> set[str]:
        return {r[0] for r in self.db.execute("SELECT unit FROM results WHERE experiment = ?", (experiment,))}

    def get(self, experiment: str, unit: str) -> list[dict] | None:
        row = self.db.execute("SELECT rows FROM results WHERE experiment = ? AND unit = ?",
                              (experiment, unit)).fetchone()
        return json.loads(row[0]) if row else None

    def rows(self, experiment: str) -> list[dict]:
        """All rows of one experiment, in the order the units were stored."""
        out = []
        for unit, relation, rows in self.db.execute(
                "SELECT unit, relation, rows FROM results WHERE experiment = ? ORDER BY rowid", (experiment,)):
            for r in json.loads(rows):
                out.append({"unit": unit, "relation": relation, **r})
        return out

    def experiments(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT DISTINCT experiment FROM results ORDER BY experiment")]

    def counts(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT experiment, count(*) FROM results GROUP BY experiment").fetchall())

    def table(self, experiment: str):
        """One experiment's rows as a pandas DataFrame."""
        import pandas as pd

        return pd.DataFrame(self.rows(experiment))
