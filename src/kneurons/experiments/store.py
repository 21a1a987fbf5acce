"""The run store: a run directory holding its configuration and a SQLite database of results.

``RUN_DIR/results.sqlite`` one row per (experiment, unit), where a unit is a fact (``P19:17``) or a relation;
                          the row holds that unit's result rows as JSON and is written in one transaction. The
                          database also records the run's configuration (its *identity*) and its SHA-256; every
                          unit row carries that hash and a SHA-256 of its own content, every meta row a SHA-256
``RUN_DIR/config.json``   a copy of the recorded configuration for people; a copy that differs from the database
                          (edited by hand) is refused by every command, a missing one is rewritten by ``run``
``RUN_DIR/run.lock``      the lock of the one process writing the run (``flock``: the OS releases it on a crash)

A unit is either wholly in the database or not at all: SQLite commits atomically (write-ahead log while a run
writes, ``synchronous=FULL``; one self-contained file again when it ends), so a run killed at any moment — SIGKILL included — resumes with nothing lost that was
committed and nothing half-written. Rerunning skips the units already there.

Opening checks, in every command: ``PRAGMA quick_check`` (a damaged file), every row's checksum (a damaged
value), that every unit was computed under the recorded configuration, and that ``config.json`` says the same as
the database. Readers (:class:`RunStore` ``(run_dir)``: report, export) open the database read-only and read one
consistent snapshot, also while a run writes; only :meth:`RunStore.open` writes, holding the run's lock.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import time
import urllib.parse
from pathlib import Path

from .. import _io
from ..errors import KneuronsError

CONFIG = "config.json"
DATABASE = "results.sqlite"
LOCK = "run.lock"
SCHEMA = 2
#: files SQLite keeps beside the database
DB_SIDE = (DATABASE + "-wal", DATABASE + "-shm", DATABASE + "-journal")

_TABLES = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL, digest TEXT);
CREATE TABLE IF NOT EXISTS results (
    experiment TEXT NOT NULL,
    unit       TEXT NOT NULL,
    relation   TEXT NOT NULL,
    rows       TEXT NOT NULL,
    seconds    REAL NOT NULL,
    created    REAL NOT NULL,
    config     TEXT,
    digest     TEXT,
    PRIMARY KEY (experiment, unit)
);
"""


def _diff(old: dict, new: dict) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}" for k in keys if old.get(k) != new.get(k)]


def _canonical(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=True)


def config_hash(config: dict) -> str:
    """SHA-256 of a configuration (canonical JSON): a run's identity."""
    return hashlib.sha256(_canonical(config).encode()).hexdigest()


def _unit_digest(experiment: str, unit: str, relation: str, rows: str, config: str) -> str:
    return hashlib.sha256(_canonical([experiment, unit, relation, rows, config]).encode()).hexdigest()


def _meta_digest(key: str, value: str) -> str:
    return hashlib.sha256(_canonical(["meta", key, value]).encode()).hexdigest()


def is_run_dir(path) -> bool:
    """Whether ``path`` is a run directory (holds a results database or a run lock)."""
    p = Path(path)
    return (p / DATABASE).exists() or (p / LOCK).exists()


def check_output_target(run_dir, out, kind: str, replace: bool, legacy=None) -> Path:
    """The one rule for a run's outputs (``report``, ``export``): never a run directory or anything inside one —
    except the run's own ``RUN_DIR/<kind>`` — and never a directory holding files kneurons did not write as such
    an output (:func:`kneurons._io.check_output_dir`); checked before anything is computed."""
    out = Path(out)
    own = Path(run_dir).resolve() / kind
    target = out.absolute() if out.is_symlink() else out.resolve()
    if target != own:
        for p in (target, *target.parents):
            if is_run_dir(p):
                where = "is a run directory" if p == target else f"is inside the run directory {p}"
                raise KneuronsError(f"{kind} output {out} {where}; nothing there is replaced: write to {own} (the "
                                    "default) or to a directory outside any run")
    return _io.check_output_dir(out, kind, replace, legacy)


def _db_error(path: Path, exc: sqlite3.Error) -> str:
    """One line for a database error: damage (SQLite's corrupt / not-a-database) or the cause SQLite names."""
    if type(exc) is sqlite3.DatabaseError:
        return f"corrupt results database {path}: {exc}"
    return f"cannot use the results database {path}: {exc}"


def _ro_uri(path: Path, immutable: bool = False) -> str:
    return f"file:{urllib.parse.quote(str(path.absolute()))}?mode=ro" + ("&immutable=1" if immutable else "")


def _read_only_fs(directory: Path) -> bool:
    try:
        return bool(os.statvfs(directory).f_flag & os.ST_RDONLY) or not os.access(directory, os.W_OK)
    except (OSError, AttributeError):
        return False


class RunStore:
    """Results of one run. ``RunStore(run_dir)`` reads (read-only, one consistent snapshot until :meth:`close`);
    ``RunStore.open(run_dir, config)`` creates or resumes, holding the run's lock until :meth:`close`."""

    def __init__(self, run_dir):
        d = Path(run_dir)
        if not d.is_dir():
            raise KneuronsError(f"run directory does not exist: {d}" if not d.exists() else
                                f"not a run directory (a file): {d}")
        db_path = d / DATABASE
        if not db_path.is_file():
            raise KneuronsError(f"not a kneurons run directory (no {DATABASE}): {d}")
        self._setup(d, writable=False)
        try:
            try:
                self.db = sqlite3.connect(_ro_uri(db_path), uri=True, timeout=30, isolation_level=None)
                self.db.execute("BEGIN")  # one snapshot for every read until close()
                self.db.execute("SELECT count(*) FROM sqlite_master").fetchone()
            except sqlite3.OperationalError:
                if not _read_only_fs(d):
                    raise
                # a read-only copy in write-ahead-log mode: nobody can write it, read it as immutable
                self.db = sqlite3.connect(_ro_uri(db_path, immutable=True), uri=True, isolation_level=None)
                self.db.execute("BEGIN")
            self._verify()
            self.config = self._config()
        except sqlite3.DatabaseError as exc:
            self.close()
            raise KneuronsError(_db_error(db_path, exc)) from None
        except BaseException:
            self.close()
            raise

    def _setup(self, d: Path, writable: bool) -> None:
        self.dir = d
        self.db_path = d / DATABASE
        self.writable = writable
        self.db = None
        self.config: dict = {}
        self.config_sha = None
        self.legacy = False
        self._lock = None
        self._created = False
        self._created_dir = False
        self._created_lock = False

    # ------------------------------------------------------------------------------------------- opening
    @classmethod
    def open(cls, run_dir, config: dict) -> "RunStore":
        """Create ``run_dir`` for ``config``, or resume it if it records the same configuration. Takes the run's
        lock first (a second writer is refused at once, naming the holder), then checks, before any work: that
        the directory can be written (not read-only, not a full disk), the database's integrity and checksums,
        and the configuration. Used as a context manager, a failure before any unit is stored removes what this
        call created."""
        d = Path(run_dir)
        if d.is_symlink() and not d.is_dir():
            raise KneuronsError(f"run directory {d} is a broken symbolic link")
        if d.exists() and not d.is_dir():
            raise KneuronsError(f"run directory is a file: {d}")
        if d.is_dir() and not (d / DATABASE).exists() and not (d / CONFIG).exists() and any(
                p.name != LOCK and not p.name.startswith(".") for p in d.iterdir()):
            # someone else's directory: refused before anything (a probe, a lock file) is put into it
            raise KneuronsError(f"{d} is not empty and is not a kneurons run directory")
        self = cls.__new__(cls)
        self._setup(d, writable=True)
        self._created_dir = not d.exists()
        if self._created_dir:
            _io.check_new_dir(d)
            try:
                d.mkdir(parents=True)
            except OSError as exc:
                raise KneuronsError(f"cannot create run directory {d}: {_io._why(exc)}") from None
        try:
            _io.check_writable_dir(d, what=f"run directory {d}")
            self._created_lock = not (d / LOCK).exists()
            self._lock = _io.lock_exclusive(d / LOCK, f"run directory {d}")
            self._open_locked(config)
        except BaseException as exc:
            self._abandon()
            if isinstance(exc, sqlite3.DatabaseError):
                raise KneuronsError(_db_error(self.db_path, exc)) from None
            raise
        return self

    def _open_locked(self, config: dict) -> None:
        d = self.dir
        for p in d.iterdir():  # a run killed while writing its config (only this run writes it: we hold the lock)
            if p.name.startswith(f".{CONFIG}."):
                _io._remove(p)
        _io.clean_stale(d, legacy_for=["report", "export"])
        fresh = not self.db_path.exists() or self.db_path.stat().st_size == 0
        if fresh:
            extra = [p.name for p in d.iterdir() if p.name not in (LOCK, CONFIG, DATABASE, *DB_SIDE)]
            if extra:
                raise KneuronsError(f"{d} is not empty and is not a kneurons run directory")
            if (d / CONFIG).exists() and not self.db_path.exists():
                raise KneuronsError(f"{d} holds a {CONFIG} but no {DATABASE}: its results are gone; use another --out")
        self.db = sqlite3.connect(str(self.db_path), timeout=30, isolation_level=None)
        tables = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "results" in tables:  # every check before the first write
            self._verify()
            recorded = self._config()
            diff = _diff(recorded, config)
            if diff:
                raise KneuronsError(f"{d} holds a run with a different configuration ({'; '.join(diff)}); use "
                                    "another --out directory")
        elif (d / CONFIG).exists() and not fresh:
            raise KneuronsError(f"{self.db_path} is not a kneurons results database")
        self.db.execute("PRAGMA journal_mode=WAL")  # readers (report, export) see a snapshot while we write
        self.db.execute("PRAGMA synchronous=FULL")
        if "results" not in tables:
            self._initialize(config)
        elif self.legacy:
            self._migrate()
        if not (d / CONFIG).is_file():
            _io.atomic_write_text(d / CONFIG, json.dumps(self.config, indent=1, sort_keys=True))
        self.set_meta("opened", time.time())  # a database we cannot write (read-only file, full disk) fails here

    def _initialize(self, config: dict) -> None:
        """Tables, the configuration and its hash in one transaction (a crash leaves no half-made store)."""
        if (self.dir / CONFIG).exists():
            _io._remove(self.dir / CONFIG)  # a copy without its database (ours: only this run writes it)
        self.config = dict(config)
        self.config_sha = config_hash(self.config)
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            for stmt in _TABLES.split(";"):
                if stmt.strip():
                    self.db.execute(stmt)
            for key, value in (("schema", SCHEMA), ("config", self.config), ("config_sha256", self.config_sha),
                               ("created", time.time())):
                self._put_meta(key, value)
        self._created = True

    def _migrate(self) -> None:
        """A store written before identities and checksums were recorded: adopt its config.json as the identity
        (nothing else records it) and add every row's checksum, in one transaction."""
        cfg_path = self.dir / CONFIG
        if not cfg_path.is_file():
            raise KneuronsError(f"{self.dir} holds results but no {CONFIG}: not resumable; use another --out")
        try:
            config = json.loads(cfg_path.read_text())
            if not isinstance(config, dict):
                raise ValueError("not an object")
        except (ValueError, OSError) as exc:
            raise KneuronsError(f"corrupt run configuration {cfg_path}: {exc}") from None
        sha = config_hash(config)
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            cols = {r[1] for r in self.db.execute("PRAGMA table_info(results)")}
            for col in ("config", "digest"):
                if col not in cols:
                    self.db.execute(f"ALTER TABLE results ADD COLUMN {col} TEXT")
            if "digest" not in {r[1] for r in self.db.execute("PRAGMA table_info(meta)")}:
                self.db.execute("ALTER TABLE meta ADD COLUMN digest TEXT")
            rows = self.db.execute("SELECT experiment, unit, relation, rows FROM results").fetchall()
            for e, u, r, payload in rows:
                self.db.execute("UPDATE results SET config = ?, digest = ? WHERE experiment = ? AND unit = ?",
                                (sha, _unit_digest(e, u, r, payload, sha), e, u))
            for key, value in self.db.execute("SELECT key, value FROM meta").fetchall():
                self.db.execute("UPDATE meta SET digest = ? WHERE key = ?", (_meta_digest(key, value), key))
            for key, value in (("schema", SCHEMA), ("config", config), ("config_sha256", sha)):
                self._put_meta(key, value)
        self.legacy = False
        self.config_sha = sha

    def _verify(self) -> None:
        """Integrity (``PRAGMA quick_check``), every row's checksum, one configuration for every unit."""
        bad = [r[0] for r in self.db.execute("PRAGMA quick_check(5)")]
        if bad != ["ok"]:
            raise KneuronsError(f"corrupt results database {self.db_path}: integrity check failed ({bad[0]})")
        tables = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if not {"meta", "results"} <= tables:
            raise KneuronsError(f"{self.db_path} is not a kneurons results database (no results table)")
        cols = {r[1] for r in self.db.execute("PRAGMA table_info(results)")}
        mcols = {r[1] for r in self.db.execute("PRAGMA table_info(meta)")}
        self.legacy = not ({"config", "digest"} <= cols and "digest" in mcols)
        if self.legacy:
            return
        for key, value, digest in self.db.execute("SELECT key, value, digest FROM meta"):
            if digest != _meta_digest(key, value):
                raise KneuronsError(f"corrupt results database {self.db_path}: run information {key!r} does not "
                                    "match its checksum")
        row = self.db.execute("SELECT value FROM meta WHERE key = 'config_sha256'").fetchone()
        self.config_sha = json.loads(row[0]) if row else None
        if self.config_sha is None:
            raise KneuronsError(f"corrupt results database {self.db_path}: no configuration recorded")
        for e, u, r, payload, cfg, digest in self.db.execute(
                "SELECT experiment, unit, relation, rows, config, digest FROM results"):
            if digest != _unit_digest(e, u, r, payload, cfg):
                raise KneuronsError(f"corrupt results database {self.db_path}: stored result {e}/{u} does not match "
                                    "its checksum")
            if cfg != self.config_sha:
                raise KneuronsError(f"{self.db_path}: result {e}/{u} was computed under another configuration "
                                    f"({cfg[:12]}…, the run's is {self.config_sha[:12]}…); the store mixes runs")

    def _config(self) -> dict:
        """The recorded configuration, checked against ``config.json`` (a hand-edited copy is refused; a missing
        copy is rewritten by :meth:`open`)."""
        cfg_path = self.dir / CONFIG
        on_disk = None
        if cfg_path.is_file():
            try:
                on_disk = json.loads(cfg_path.read_text())
                if not isinstance(on_disk, dict):
                    raise ValueError("config is not an object")
            except (ValueError, OSError) as exc:
                raise KneuronsError(f"corrupt run configuration {cfg_path}: {exc}") from None
        if self.legacy:  # nothing else records it
            if on_disk is None:
                raise KneuronsError(f"not a kneurons run directory (no {CONFIG}): {self.dir}")
            return on_disk
        recorded = self.meta("config")
        if not isinstance(recorded, dict) or config_hash(recorded) != self.config_sha:
            raise KneuronsError(f"corrupt results database {self.db_path}: the recorded configuration does not match "
                                "its hash")
        if on_disk is not None and on_disk != recorded:
            diff = "; ".join(f"{k}: {recorded.get(k, '<unset>')!r} recorded, {on_disk.get(k, '<unset>')!r} in "
                             f"{CONFIG}" for k in sorted(set(recorded) | set(on_disk))
                             if recorded.get(k) != on_disk.get(k))
            raise KneuronsError(f"{cfg_path} differs from the configuration recorded in {DATABASE} ({diff}): it was "
                                f"edited by hand and would misdescribe the results; restore it, or delete it and rerun "
                                f"`kneurons run` with the recorded options to rewrite it")
        self.config = recorded
        return recorded

    # ------------------------------------------------------------------------------------------- closing
    def close(self) -> None:
        if getattr(self, "db", None) is not None:
            try:
                if self.writable:  # back to one self-contained file (readers then leave no -wal/-shm behind);
                    with contextlib.suppress(sqlite3.Error):  # a reader still open keeps it in WAL mode: fine
                        self.db.execute("PRAGMA journal_mode=DELETE")
                self.db.close()
            finally:
                self.db = None
        if getattr(self, "_lock", None) is not None:
            self._lock.release()
            self._lock = None

    def _abandon(self) -> None:
        """Close after a failure, removing what this open created: a lock file, and — when no unit was stored —
        the store it created and its directory (nothing half-written, nothing left behind)."""
        empty = False
        if self.db is not None and self._created:
            try:
                empty = self.db.execute("SELECT count(*) FROM results").fetchone()[0] == 0
            except sqlite3.Error:
                empty = True
        if self.db is not None:
            with contextlib.suppress(sqlite3.Error):
                self.db.execute("PRAGMA journal_mode=DELETE")
            self.db.close()
            self.db = None
        if self._lock is not None:  # still held: nobody else is writing here
            if self._created and empty:
                for name in (CONFIG, DATABASE, *DB_SIDE):
                    _io._remove(self.dir / name)
            if self._created_lock:
                _io._remove(self.dir / LOCK)
            if self._created_dir:
                try:
                    self.dir.rmdir()
                except OSError:
                    pass
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None and self.writable:
            self._abandon()
        else:
            self.close()
        return False

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # ------------------------------------------------------------------------------------------- writing
    def _write(self, what: str, fn) -> None:
        if not self.writable or self.db is None:
            raise KneuronsError(f"{self.dir} is open read-only (use RunStore.open to write)")
        try:
            with self.db:  # one transaction
                self.db.execute("BEGIN IMMEDIATE")
                fn()
        except sqlite3.IntegrityError:
            raise
        except sqlite3.Error as exc:
            raise KneuronsError(f"cannot write {what} to {self.db_path}: {exc}; free space or fix the directory, "
                                "then rerun to resume") from None

    def put(self, experiment: str, unit: str, relation: str, rows: list[dict], seconds: float = 0.0) -> None:
        """Store one unit's rows in one transaction (a unit already stored is an error: results never change)."""
        payload = json.dumps(rows, allow_nan=True)
        digest = _unit_digest(experiment, unit, relation, payload, self.config_sha)
        try:
            self._write(f"{experiment}/{unit}", lambda: self.db.execute(
                "INSERT INTO results (experiment, unit, relation, rows, seconds, created, config, digest) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (experiment, unit, relation, payload, float(seconds), time.time(), self.config_sha, digest)))
        except sqlite3.IntegrityError:
            raise KneuronsError(f"{experiment}/{unit} is already in the run store") from None

    def _put_meta(self, key: str, value) -> None:
        text = json.dumps(value)
        self.db.execute("INSERT OR REPLACE INTO meta (key, value, digest) VALUES (?, ?, ?)",
                        (key, text, _meta_digest(key, text)))

    def set_meta(self, key: str, value) -> None:
        self._write(f"run information {key!r}", lambda: self._put_meta(key, value))

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

    def skipped_data(self) -> list[str]:
        """What the run left out, one short line each: relations without usable templates, missing or unreadable
        BingRel files, erase relations not in the run, and units whose computation failed (error rows)."""
        return describe_skipped({k: self.meta(k) for k in SKIP_KEYS}, self._error_units())

    def _error_units(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for experiment, rows in self.db.execute("SELECT experiment, rows FROM results"):
            try:
                bad = any(isinstance(r, dict) and isinstance(r.get("error"), str) and r["error"]
                          for r in json.loads(rows))
            except ValueError:
                bad = True
            if bad:
                out[experiment] = out.get(experiment, 0) + 1
        return out


SKIP_KEYS = ("skipped_relations", "activations_skipped", "activations_missing_relations", "activations_bad_files",
             "erase_not_in_run")


def _short(text, n: int = 160) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


def describe_skipped(meta: dict, error_units: dict[str, int] | None = None) -> list[str]:
    """Lines naming the data a run skipped, from its run information (``meta``) and per-experiment counts of units
    with error rows."""
    out = []
    rel = meta.get("skipped_relations") or {}
    if rel:
        out.append(f"assess skipped {len(rel)} relation(s) ("
                   + ", ".join(f"{r}: {_short(why, 60)}" for r, why in list(rel.items())[:3])
                   + (", ..." if len(rel) > 3 else "") + ")")
    if meta.get("activations_skipped"):
        out.append(f"activations skipped: {_short(meta['activations_skipped'])}")
    bad = meta.get("activations_bad_files") or {}
    if bad:
        out.append(f"activations skipped {len(bad)} relation(s) with an unreadable BingRel file ("
                   + "; ".join(f"{r}: {_short(why, 120)}" for r, why in list(bad.items())[:3])
                   + ("; ..." if len(bad) > 3 else "") + ")")
    missing = meta.get("activations_missing_relations") or []
    if missing:
        out.append(f"activations: no BingRel file for {', '.join(missing[:6])}{', ...' if len(missing) > 6 else ''}")
    not_in = meta.get("erase_not_in_run") or []
    if not_in:
        out.append(f"erase: relation(s) {', '.join(not_in[:6])}{', ...' if len(not_in) > 6 else ''} not in the run")
    for e, n in sorted((error_units or {}).items()):
        out.append(f"{e}: {n} unit(s) with errors")
    return out
