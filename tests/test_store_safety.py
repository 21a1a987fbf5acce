"""Nothing lost, nothing half-written, nothing silently wrong (issue 12, sections 1-5): export/report targets, the
run lock, integrity checks, the configuration's identity, skipped data, cache checksums, up-front checks of what
will be written, the one atomic write path under full disks, SIGTERM and SIGKILL, and stale temporaries.

Full disks and read-only directories are real where this machine allows it (a small tmpfs and a read-only bind
mount need root); the same paths are also driven by an injected failing writer, which runs everywhere."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import signal
import sqlite3
import struct
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from kneurons import _io
from kneurons.cli import main
from kneurons.errors import KneuronsError
from kneurons.experiments.export import export
from kneurons.experiments.store import CONFIG, DATABASE, LOCK, RunStore
from kneurons.report import summary, write_report
from runs import config

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "TOKENIZERS_PARALLELISM": "false"}


# ------------------------------------------------------------------------------------------------ helpers
def tree(d: Path) -> dict[str, str]:
    """Every file below ``d``: relative path -> SHA-256 (directories as "dir")."""
    out = {}
    for p in sorted(Path(d).rglob("*")):
        rel = str(p.relative_to(d))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in Path(d).iterdir() if ".kntmp-" in p.name or ".knold-" in p.name)


def one_line_error(capsys, fragment: str) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kneurons: error: "), captured.err
    assert "Traceback" not in captured.err
    assert fragment in lines[0], lines[0]
    return lines[0]


def copy_run(synthetic_run: Path, dst: Path) -> Path:
    """A copy of the fixture's finished run as one database file: if a reader of the original still had it open
    (a write-ahead log beside it), the copy's log is checkpointed into it, as closing the last reader would."""
    shutil.copytree(synthetic_run / "run", dst, ignore=shutil.ignore_patterns("report", "export", LOCK))
    con = sqlite3.connect(dst / DATABASE)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    for side in ("-wal", "-shm"):
        assert not (dst / (DATABASE + side)).exists(), side
    return dst


def run_args(base: Path, out: Path, **extra) -> list[str]:
    cfg = config(base)
    args = ["run", "--model", cfg.model, "--data", cfg.data, "--out", str(out), "--facts-per-relation",
            str(cfg.facts_per_relation), "--erase-relations", *cfg.erase_relations, "--erase-top-k",
            str(cfg.erase_top_k), "--min-prompts", str(cfg.min_prompts), "--quiet"]
    for k, v in extra.items():
        args += [f"--{k.replace('_', '-')}", *([str(x) for x in v] if isinstance(v, list) else [str(v)])]
    return args


@pytest.fixture
def no_model(monkeypatch):
    """Every check below must come before the model loads: loading it fails the test."""
    import kneurons.cli

    def refuse(args):
        raise AssertionError("the model was loaded before the check")

    monkeypatch.setattr(kneurons.cli, "_load", refuse)


def _mount_works() -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    probe = Path(f"/tmp/kneurons-mount-probe-{os.getpid()}")
    probe.mkdir(exist_ok=True)
    try:
        ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)],
                            capture_output=True).returncode == 0
        if ok:
            subprocess.run(["umount", str(probe)], check=True)
        return ok
    finally:
        probe.rmdir()


MOUNT = _mount_works()
needs_mount = pytest.mark.skipif(not MOUNT, reason="needs root and mount (a real tmpfs / read-only bind mount); "
                                                   "the injected-failure tests cover the same code paths")


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def fill(d: Path, leave: int = 0) -> None:
    """Fill the file system of ``d`` until at most ``leave`` bytes are free."""
    with open(d / "filler", "wb") as f:
        block = b"\0" * 65536
        with contextlib.suppress(OSError):
            while True:
                vfs = os.statvfs(d)
                free = vfs.f_bavail * vfs.f_frsize
                if free <= leave:
                    break
                f.write(block[: min(len(block), max(free - leave, 4096))])
                f.flush()


@contextlib.contextmanager
def read_only(path: Path):
    """``path`` read-only for this process — a read-only bind mount (root), or permission bits (others)."""
    if MOUNT:
        subprocess.run(["mount", "--bind", str(path), str(path)], check=True)
        try:
            subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], check=True)
            yield path
        finally:
            subprocess.run(["umount", "-l", str(path)], check=True)
    elif os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in [path, *path.rglob("*")]}
        for p in modes:
            p.chmod(0o555 if p.is_dir() else 0o444)
        try:
            yield path
        finally:
            for p, m in modes.items():
                p.chmod(m)
    else:
        pytest.skip("root without mount: nothing can make a directory read-only for this process")


# ------------------------------------------------------------------------------------------------ 1. data loss
def test_export_never_replaces_a_run_directory_or_foreign_files(synthetic_run, tmp_path, capsys):
    """Issue 12 §1: `export RUN --out RUN --overwrite` deleted results.sqlite, config.json and report/; `export
    --out DIR --overwrite` deleted every other file in DIR. Both are refused now, and nothing changes."""
    run = copy_run(synthetic_run, tmp_path / "run")
    write_report(run)
    before = tree(run)
    for out in (run, run / "report", run / "sub", run / "report" / "x"):
        assert main(["export", str(run), "--out", str(out), "--format", "csv", "--overwrite"]) == 2
        one_line_error(capsys, "run directory")
    other = copy_run(synthetic_run, tmp_path / "other-run")
    assert main(["export", str(run), "--out", str(other / "export"), "--format", "csv", "--overwrite"]) == 2
    one_line_error(capsys, f"inside the run directory {other.resolve()}")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    (mine / "locate.csv").write_text("my own table")
    assert main(["export", str(run), "--out", str(mine), "--format", "csv", "--overwrite"]) == 2
    one_line_error(capsys, "not a kneurons export (notes.txt)")  # locate.csv may be an old export's
    assert tree(run) == before and tree(mine) == {"locate.csv": hashlib.sha256(b"my own table").hexdigest(),
                                                  "notes.txt": hashlib.sha256(b"keep me").hexdigest()}
    assert leftovers(tmp_path) == [] and leftovers(run) == []
    # the run's own export directory and an earlier export elsewhere are replaced (with --overwrite), whole
    assert main(["export", str(run), "--format", "csv"]) == 0
    assert main(["export", str(run), "--format", "csv"]) == 2
    one_line_error(capsys, "exists and is not empty (pass --overwrite")
    assert main(["export", str(run), "--format", "parquet", "--overwrite"]) == 0
    names = {p.name for p in (run / "export").iterdir()}
    assert CONFIG in names and _io.MANIFEST in names and not any(n.endswith(".csv") for n in names)
    ext = tmp_path / "ext"
    assert main(["export", str(run), "--out", str(ext), "--format", "csv"]) == 0
    (ext / "stray.txt").write_text("added later by hand")
    assert main(["export", str(run), "--out", str(ext), "--format", "csv", "--overwrite"]) == 2
    one_line_error(capsys, "stray.txt")
    assert (ext / "stray.txt").read_text() == "added later by hand"


def test_report_follows_the_same_rule(synthetic_run, tmp_path, capsys):
    run = copy_run(synthetic_run, tmp_path / "run")
    before = tree(run)
    for out in (run, run / "export", tmp_path):  # tmp_path holds the run directory: foreign
        assert main(["report", str(run), "--out", str(out)]) == 2
        one_line_error(capsys, "report")
    assert tree(run) == before
    other = copy_run(synthetic_run, tmp_path / "other")
    _io.atomic_dir(other / "report", lambda t: (t / "report.html").write_text("theirs"), manifest="report")
    other_report = tree(other / "report")
    with pytest.raises(KneuronsError, match="inside the run directory"):
        write_report(run, other / "report")  # another run's report is that run's, not ours to replace
    assert tree(other / "report") == other_report
    _io.atomic_dir(run / "report", lambda t: (t / "report.html").write_text("old"), manifest="report")
    assert main(["report", str(run)]) == 0  # the run's own report directory, replaced: its manifest says "report"
    assert (run / "report" / "report.html").read_text() != "old" and leftovers(run) == []


# ------------------------------------------------------------------------------------------------ 5. one writer
def _wait_for(cond, timeout: float, what: str, proc=None):
    deadline = time.time() + timeout
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: process ended: {proc.stderr.read()[-2000:]}")
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_second_run_is_refused_at_once_naming_the_holder(synthetic_run, tmp_path, capsys, no_model):
    """Issue 12 §5: a second `kneurons run` into the same --out worked 144 s and then died. It is refused before
    it loads the model, naming the PID of the run that holds the directory; a killed holder frees it (the OS drops
    its lock)."""
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-m", "kneurons.cli", *run_args(synthetic_run, out)], env=ENV,
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: str(holder.pid) in _io.lock_holder(out / LOCK), 60, "the first run's lock", holder)
        t = time.time()
        assert main(run_args(synthetic_run, out)) == 2
        line = one_line_error(capsys, f"is in use by another kneurons process (PID {holder.pid} on ")
        assert time.time() - t < 10, line
        with pytest.raises(KneuronsError, match=f"PID {holder.pid}"):
            RunStore.open(out, config(synthetic_run).identity())  # the Python API is refused the same way
    finally:
        holder.kill()
        holder.wait(timeout=60)
        holder.stderr.close()
    with RunStore.open(out, config(synthetic_run).identity()) as st:  # the killed holder's lock is gone
        assert str(os.getpid()) in _io.lock_holder(out / LOCK) and st.writable


def test_readers_see_a_snapshot_and_never_write(synthetic_run, tmp_path):
    run = copy_run(synthetic_run, tmp_path / "run")
    before = tree(run)
    export(run, "csv", tmp_path / "csv")
    write_report(run, tmp_path / "rep")
    assert tree(run) == before  # not a byte written, no side file left (a finished run is one database file)
    with RunStore(run) as reader:
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            reader.db.execute("DELETE FROM results")
        with pytest.raises(KneuronsError, match="read-only"):
            reader.put("x", "y", "z", [])
    with RunStore(run) as st:
        cfg = st.config
    with RunStore.open(run, cfg) as writer:  # a run writing while a report reads
        reader = RunStore(run)
        n = sum(reader.counts().values())
        writer.put("extra", "u1", "r", [{"a": 1}])
        assert sum(reader.counts().values()) == n  # the reader's snapshot does not move
        with RunStore(run) as fresh:
            assert sum(fresh.counts().values()) == n + 1  # a new reader sees the committed unit
        reader.close()


# ------------------------------------------------------------------------------------------------ 2. integrity
def _garbage_over_last_page(db: Path) -> None:
    page = struct.unpack(">H", db.read_bytes()[16:18])[0]
    page = 65536 if page == 1 else page
    size = db.stat().st_size
    with open(db, "r+b") as f:
        f.seek(size - page)
        f.write(os.urandom(page))


def test_garbage_over_the_last_page_is_refused_by_every_command(synthetic_run, tmp_path, capsys, no_model):
    """Issue 12 §2: with garbage over the last page of results.sqlite, `run` said "run complete" while `report`
    refused the file. Every command that opens a store refuses it now, in one line, before any work."""
    run = copy_run(synthetic_run, tmp_path / "run")
    _garbage_over_last_page(run / DATABASE)
    before = tree(run)
    assert main(run_args(synthetic_run, run)) == 2
    one_line_error(capsys, f"corrupt results database {run / DATABASE}")
    assert main(["report", str(run)]) == 2
    one_line_error(capsys, "corrupt results database")
    assert main(["export", str(run), "--format", "csv"]) == 2
    one_line_error(capsys, "corrupt results database")
    assert tree(run) == before
    # garbage over the primary-key index only: every stored row still reads back and matches its checksum, but
    # lookups (which units are done) would be wrong — SQLite's own check catches it
    run2 = copy_run(synthetic_run, tmp_path / "run2")
    db = run2 / DATABASE
    con = sqlite3.connect(db)
    root = con.execute("SELECT rootpage FROM sqlite_master WHERE type = 'index' AND tbl_name = 'results'").fetchone()[0]
    con.close()
    page = struct.unpack(">H", db.read_bytes()[16:18])[0]
    with open(db, "r+b") as f:
        f.seek((root - 1) * page)
        f.write(os.urandom(page))
    assert len(sqlite3.connect(db).execute("SELECT rows FROM results").fetchall()) > 100
    assert main(["report", str(run2)]) == 2
    one_line_error(capsys, "integrity check failed")


def test_a_changed_value_is_caught_by_its_checksum(synthetic_run, tmp_path, capsys):
    """A damaged value that SQLite's own check cannot see (a changed number in a stored row) is caught by the
    row's SHA-256; a row computed under another configuration by its identity."""
    run = copy_run(synthetic_run, tmp_path / "run")
    con = sqlite3.connect(run / DATABASE)
    unit, rows = con.execute("SELECT unit, rows FROM results WHERE experiment = 'suppress' LIMIT 1").fetchone()
    data = json.loads(rows)
    data[0]["rel_change"] = -0.99
    with con:
        con.execute("UPDATE results SET rows = ? WHERE experiment = 'suppress' AND unit = ?", (json.dumps(data), unit))
    con.close()
    assert sqlite3.connect(run / DATABASE).execute("PRAGMA quick_check").fetchone()[0] == "ok"
    assert main(["export", str(run), "--format", "csv"]) == 2
    one_line_error(capsys, f"stored result suppress/{unit} does not match its checksum")
    # a unit that claims another configuration (stores merged by hand), with a consistent checksum
    from kneurons.experiments import store as store_mod

    run2 = copy_run(synthetic_run, tmp_path / "run2")
    con = sqlite3.connect(run2 / DATABASE)
    e, u, r, payload = con.execute("SELECT experiment, unit, relation, rows FROM results LIMIT 1").fetchone()
    with RunStore(synthetic_run / "run") as st:
        other = store_mod.config_hash({**st.config, "steps": 2})
    with con:
        con.execute("UPDATE results SET config = ?, digest = ? WHERE experiment = ? AND unit = ?",
                    (other, store_mod._unit_digest(e, u, r, payload, other), e, u))
    con.close()
    with pytest.raises(KneuronsError, match=f"result {e}/{u} was computed under another configuration"):
        RunStore(run2)


def test_hand_edited_config_is_refused_never_mixed(synthetic_run, tmp_path, capsys, no_model):
    """Issue 12 §2: steps 2 -> 20 in config.json, rerun with --steps 20: "run complete", the report said 20,
    the neurons were computed at 2. The database records the configuration; the edited copy is refused."""
    run = copy_run(synthetic_run, tmp_path / "run")
    recorded = json.loads((run / CONFIG).read_text())
    assert recorded["steps"] == 20
    (run / CONFIG).write_text(json.dumps({**recorded, "steps": 2}, indent=1, sort_keys=True))
    before = tree(run)
    assert main(run_args(synthetic_run, run, steps=2)) == 2
    one_line_error(capsys, "config.json differs from the configuration recorded in results.sqlite (steps: 20 "
                           "recorded, 2 in config.json)")
    for argv in (["report", str(run)], ["export", str(run), "--format", "csv"]):
        assert main(argv) == 2
        one_line_error(capsys, "edited by hand")
    assert tree(run) == before
    (run / CONFIG).unlink()  # the recorded configuration rules: reports work, and a resume rewrites the copy
    assert summary(run)["run"]["config"]["steps"] == 20
    with RunStore.open(run, recorded):
        assert json.loads((run / CONFIG).read_text()) == recorded
    with pytest.raises(KneuronsError, match="different configuration.*steps: 20 -> 2"):
        RunStore.open(run, {**recorded, "steps": 2})


def test_store_from_before_checksums_is_read_and_migrated(tmp_path):
    """A store written by the previous schema (no identity, no checksums) still reports; resuming it records its
    config.json as the identity and adds every checksum."""
    d = tmp_path / "old"
    d.mkdir()
    con = sqlite3.connect(d / DATABASE)
    con.executescript("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
                      "CREATE TABLE results (experiment TEXT NOT NULL, unit TEXT NOT NULL, relation TEXT NOT NULL,"
                      " rows TEXT NOT NULL, seconds REAL NOT NULL, created REAL NOT NULL,"
                      " PRIMARY KEY (experiment, unit));")
    con.execute("INSERT INTO results VALUES ('locate', 'P1:0', 'P1', '[{\"a\": 1}]', 0.5, 0)")
    con.execute("INSERT INTO meta VALUES ('schema', '1')")
    con.commit()
    con.close()
    (d / CONFIG).write_text(json.dumps({"model": "m", "seed": 0}))
    with RunStore(d) as st:
        assert st.legacy and st.rows("locate") == [{"unit": "P1:0", "relation": "P1", "a": 1}]
    with RunStore.open(d, {"model": "m", "seed": 0}) as st:
        st.put("locate", "P1:1", "P1", [{"a": 2}])
    with RunStore(d) as st:
        assert not st.legacy and st.config == {"model": "m", "seed": 0} and len(st.rows("locate")) == 2


# ------------------------------------------------------------------------------------------------ 2. skipped data
def test_unreadable_bingrel_file_is_said_in_the_last_line_and_the_report(synthetic_run, tmp_path, capsys):
    """Issue 12 §2: an unreadable BingRel file — run and report both said "complete"."""
    data = tmp_path / "data"
    shutil.copytree(synthetic_run / "data", data)
    bad = sorted((data / "bingrel").iterdir())[0]
    bad.write_bytes(b"\x1f\x8b this is not gzip")
    rel = bad.name[len("final_distant_allbags_"):-len("_new.json.gz")]
    out = tmp_path / "run"
    cfg = config(synthetic_run)
    args = ["run", "--model", cfg.model, "--data", str(data), "--out", str(out), "--relations", rel,
            "--facts-per-relation", "2", "--max-candidates", "8", "--experiments", "assess", "activations",
            "--steps", "2", "--min-prompts", "2", "--quiet"]
    assert main(args) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("run complete in ") and "with skipped data" in last and last.endswith(str(out))
    assert f"unreadable BingRel file ({rel}: " in last, last
    s = summary(out)
    assert any(rel in m and "unreadable BingRel" in m for m in s["run"]["skipped_data"])
    assert list(s["activations"]["bad_files"]) == [rel]
    page = write_report(out).read_text()
    assert "The run skipped data" in page and "could not be read" in page and rel in page


# ------------------------------------------------------------------------------------------------ 2. cache checksums
def _fake_gguf(path: Path, n_floats: int = 1000) -> Path:
    """A GGUF header declaring one tensor of ``n_floats`` values (the cache's size check reads only the header)."""
    name = b"w"
    header = b"GGUF" + struct.pack("<IQQ", 3, 1, 0) + struct.pack("<Q", len(name)) + name
    header += struct.pack("<IQIQ", 1, n_floats, 0, 0)
    path.write_bytes(header + os.urandom(64))
    return path


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """A GGUF file whose "dequantizing" yields a tiny llama model (counted), and an empty KNEURONS_CACHE."""
    from helpers import handle_for
    from kneurons import models

    calls = []

    def dequantize(path):
        calls.append(path)
        h = handle_for("llama", seed=0)
        return h.model, h.tokenizer

    monkeypatch.setattr(models, "_dequantize", dequantize)
    monkeypatch.setenv("KNEURONS_CACHE", str(tmp_path / "cache"))
    return _fake_gguf(tmp_path / "tiny.gguf"), calls


def _params(h) -> dict:
    return {k: v.clone() for k, v in h.model.state_dict().items()}


def test_damaged_cache_entry_is_rebuilt(fake_gguf, monkeypatch):
    """Issue 12 §2: garbage inside a cached weights file (same size) loaded and answered NaN. Every file of an
    entry has a recorded SHA-256: a damaged entry is rebuilt from the GGUF file."""
    from kneurons import load_model, models

    gguf, calls = fake_gguf
    ref = _params(load_model(str(gguf)))
    entry = next((Path(os.environ["KNEURONS_CACHE"]) / "models").iterdir())
    record = json.loads((entry / models.CACHE_RECORD).read_text())
    assert set(record["files"]) >= {"model.safetensors", "config.json", "tokenizer.json"} and len(calls) == 1
    hashed = []
    real = models.file_sha256
    monkeypatch.setattr(models, "file_sha256", lambda p: hashed.append(Path(p).name) or real(p))
    load_model(str(gguf))  # unchanged files: no re-hashing (their stamps match), no rebuild
    assert hashed == [gguf.name] and len(calls) == 1
    weights = entry / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:  # same size, garbage in the tensor data (0xFF bytes are NaN floats)
        f.seek(size - 4096)
        f.write(b"\xff" * 4096)
    assert weights.stat().st_size == size
    h = load_model(str(gguf))
    assert len(calls) == 2  # rebuilt
    got = _params(h)
    assert all(torch.equal(got[k], ref[k]) for k in ref) and all(bool(torch.isfinite(v).all()) for v in got.values())
    assert leftovers(entry.parent) == []


@needs_mount
def test_damaged_cache_entry_in_a_read_only_cache_is_named(fake_gguf, tmp_path):
    from kneurons import load_model, models

    gguf, calls = fake_gguf
    load_model(str(gguf))
    cache = Path(os.environ["KNEURONS_CACHE"])
    entry = next((cache / "models").iterdir())
    (entry / "config.json").write_text((entry / "config.json").read_text().replace("llama", "llamb"))
    with read_only(cache):
        with pytest.raises(KneuronsError, match=rf"model cache entry {entry} is damaged \(config.json does not "
                                                r"match its SHA-256 checksum\), and it cannot be rebuilt") as e:
            load_model(str(gguf))
    assert "Read-only file system" in str(e.value) and "delete the entry" in str(e.value)
    assert len(calls) == 1 and models.CACHE_RECORD in {p.name for p in entry.iterdir()}


def test_cache_entry_from_before_checksums_is_adopted_or_rebuilt(fake_gguf):
    from kneurons import load_model, models

    gguf, calls = fake_gguf
    load_model(str(gguf))
    entry = next((Path(os.environ["KNEURONS_CACHE"]) / "models").iterdir())
    rec = entry / models.CACHE_RECORD
    old = {k: v for k, v in json.loads(rec.read_text()).items() if k != "files"}
    rec.write_text(json.dumps(old))  # as written before checksums
    load_model(str(gguf))
    assert "files" in json.loads(rec.read_text()) and len(calls) == 1  # adopted: its weights are finite
    rec.write_text(json.dumps(old))
    from safetensors.torch import load_file, save_file

    w = load_file(entry / "model.safetensors")
    first = sorted(w)[0]
    w[first] = torch.full_like(w[first], float("nan"))
    save_file(w, entry / "model.safetensors", metadata={"format": "pt"})
    h = load_model(str(gguf))
    assert len(calls) == 2 and all(bool(torch.isfinite(v).all()) for v in h.model.state_dict().values())


def test_cache_temporaries_are_cleaned_on_every_load(fake_gguf):
    """Issue 12 §4: a killed dequantization's `.tmp-*` directories (151 MB) were removed only when a new entry was
    written. Every load removes the stale ones now, also on a cache hit."""
    from kneurons import load_model

    gguf, calls = fake_gguf
    load_model(str(gguf))
    root = Path(os.environ["KNEURONS_CACHE"]) / "models"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    killed, older = root / f".{'0' * 32}.kntmp-{dead.pid}-0123abcd", root / ".tmp-k1ll3d_x"
    recent = root / ".tmp-r3c3nt_x"  # an older kneurons' temporary that may still be being written
    for d in (killed, older, recent):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"partial")
    old = time.time() - _io.STALE_SECONDS - 60
    for f in (older / "model.safetensors", older):
        os.utime(f, (old, old))
    load_model(str(gguf))
    assert len(calls) == 1 and not killed.exists() and not older.exists() and recent.exists()


def test_kneurons_cache_that_is_a_file_is_one_line(fake_gguf, tmp_path, monkeypatch, capsys):
    gguf, calls = fake_gguf
    (tmp_path / "a-file").write_text("x")
    monkeypatch.setenv("KNEURONS_CACHE", str(tmp_path / "a-file"))
    assert main(["predict", "--model", str(gguf), "--target", "b", "a ___"]) == 2
    one_line_error(capsys, f"KNEURONS_CACHE={tmp_path / 'a-file'} is unusable")
    monkeypatch.setenv("KNEURONS_CACHE", str(tmp_path / "a-file" / "below"))
    assert main(["predict", "--model", str(gguf), "--target", "b", "a ___"]) == 2
    one_line_error(capsys, "is a file, not a directory")
    assert calls == []


@needs_mount
def test_kneurons_cache_read_only_or_full_is_one_line_before_dequantizing(fake_gguf, tmp_path, monkeypatch, capsys):
    from kneurons import models

    gguf, calls = fake_gguf
    ro = tmp_path / "ro-cache"
    (ro / "models").mkdir(parents=True)
    monkeypatch.setenv("KNEURONS_CACHE", str(ro))
    with read_only(ro):
        assert main(["predict", "--model", str(gguf), "--target", "b", "a ___"]) == 2
        one_line_error(capsys, "Read-only file system; set KNEURONS_CACHE to a writable directory")
    big = _fake_gguf(tmp_path / "big.gguf", n_floats=4 << 20)  # 16 MiB of float32 weights
    assert models._gguf_float32_bytes(big) == 16 << 20
    with tmpfs(tmp_path / "small", "8m") as small:
        monkeypatch.setenv("KNEURONS_CACHE", str(small))
        assert main(["predict", "--model", str(big), "--target", "b", "a ___"]) == 2
        one_line_error(capsys, "no space left on device")
        assert [p.name for p in (small / "models").iterdir()] == []
    assert calls == []


# ------------------------------------------------------------------------------------------------ 3. up-front checks
def test_save_targets_are_checked_before_any_computation(tmp_path, capsys, no_model):
    """Issue 12 §3: `locate --save` onto a directory with --overwrite, below a file, ... failed only after the
    computation; `--save-model` onto a file; `run --out FILE/sub`."""
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("x")
    locate = ["locate", "--target", "Paris", "The capital of France is ___.", "France's capital is ___."]
    cases = [(locate + ["--save", str(tmp_path / "dir"), "--overwrite"], "is a directory, not a file"),
             (locate + ["--save", str(tmp_path / "file" / "x.json")], "is a file, not a directory"),
             (locate + ["--save", str(tmp_path / "no" / "such" / "x.json")], "directory does not exist"),
             (locate + ["--save", str(tmp_path / "file")], "exists (pass overwrite=True / --overwrite"),
             (["update", "--new", "Lyon", "--save-model", str(tmp_path / "file")], "is a file, not a directory"),
             (["update", "--new", "Lyon", "--save-model", str(tmp_path / "file" / "m")], "is a file, not a directory"),
             (["erase", "--relation", "capital_of", "--save-model", str(tmp_path / "file")], "is a file")]
    for argv, fragment in cases:
        assert main(argv) == 2, argv
        one_line_error(capsys, fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "file"]


def test_run_out_below_a_file_is_refused(synthetic_run, tmp_path, capsys, no_model):
    (tmp_path / "file").write_text("x")
    assert main(run_args(synthetic_run, tmp_path / "file" / "sub")) == 2
    one_line_error(capsys, f"cannot create {tmp_path / 'file' / 'sub'}: {tmp_path / 'file'} is a file")
    assert main(run_args(synthetic_run, tmp_path / "file")) == 2
    one_line_error(capsys, "run directory is a file")


@needs_mount
def test_unwritable_or_full_targets_are_refused_up_front(synthetic_run, tmp_path, capsys, no_model):
    """Read-only directories and full disks, for real: `locate --save`, `--save-model`, `run`, `export`."""
    locate = ["locate", "--target", "Paris", "The capital of France is ___.", "France's capital is ___."]
    ro = tmp_path / "ro"
    ro.mkdir()
    run = copy_run(synthetic_run, tmp_path / "ro" / "run")
    with read_only(ro):
        before = tree(ro)
        assert main(locate + ["--save", str(ro / "x.json")]) == 2
        one_line_error(capsys, "Read-only file system")
        assert main(["update", "--new", "Lyon", "--save-model", str(ro / "m")]) == 2
        one_line_error(capsys, "Read-only file system")
        assert main(run_args(synthetic_run, run)) == 2
        one_line_error(capsys, "Read-only file system")
        assert main(["export", str(run), "--format", "csv"]) == 2  # default RUN/export: the run is read-only
        one_line_error(capsys, "Read-only file system")
        assert main(["export", str(run), "--out", str(tmp_path / "csv"), "--format", "csv"]) == 0  # reading works
        assert main(["report", str(run), "--out", str(tmp_path / "rep")]) == 0
        assert tree(ro) == before
    with tmpfs(tmp_path / "full", "4m") as full:
        run = copy_run(synthetic_run, full / "run")
        fill(full, leave=64 << 10)
        capsys.readouterr()
        for argv in (locate + ["--save", str(full / "x.json")], ["update", "--new", "Lyon", "--save-model",
                                                                 str(full / "m")], run_args(synthetic_run, run),
                     ["export", str(run), "--format", "csv"], ["report", str(run)]):
            assert main(argv) == 2
            one_line_error(capsys, "no space left on device")
        assert sorted(p.name for p in full.iterdir()) == ["filler", "run"] and leftovers(run) == []


# ------------------------------------------------------------------------------------------------ 4. full disks
class _Boom(OSError):
    pass


def test_injected_write_failures_leave_the_target_untouched(tmp_path, monkeypatch):
    """The one atomic path, with a writer that fails (ENOSPC) at each step: the temporary is removed and the
    target keeps its old content — files and directories."""
    target = tmp_path / "x.json"
    target.write_text("old")
    d = tmp_path / "rep"
    _io.atomic_dir(d, lambda t: (t / "report.html").write_text("old"), manifest="report")
    old_dir = tree(d)
    enospc = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def failing_write(tmp):
        tmp.write_text("half")
        raise enospc

    for step in ("write", "fsync", "publish"):
        with monkeypatch.context() as m:
            if step == "fsync":
                m.setattr(_io, "_fsync_path", lambda p: (_ for _ in ()).throw(enospc))
            if step == "publish":
                m.setattr(_io, "_publish_file", lambda *a: (_ for _ in ()).throw(enospc))
                m.setattr(_io, "_publish_dir", lambda *a: (_ for _ in ()).throw(enospc))
            writer = failing_write if step == "write" else (lambda tmp: tmp.write_text("new"))
            with pytest.raises(KneuronsError, match=f"cannot write {target}: No space left on device"):
                _io.atomic_write(target, writer, overwrite=True)
            build = (lambda t: failing_write(t / "a")) if step == "write" else (lambda t: (t / "a").write_text("n"))
            with pytest.raises(KneuronsError, match=f"cannot write {d}: No space left on device"):
                _io.atomic_dir(d, build, replace=True, manifest="report")
        assert target.read_text() == "old" and tree(d) == old_dir
        assert sorted(p.name for p in tmp_path.iterdir()) == ["rep", "x.json"], step
    # an interrupt (Ctrl-C / SIGTERM) inside the writer: the same
    with pytest.raises(KeyboardInterrupt):
        _io.atomic_dir(d, lambda t: (_ for _ in ()).throw(_io.Terminated()), replace=True)
    assert tree(d) == old_dir and sorted(p.name for p in tmp_path.iterdir()) == ["rep", "x.json"]


def test_store_write_failure_is_one_line_and_loses_nothing(tmp_path, monkeypatch):
    st = RunStore.open(tmp_path / "run", {"k": 1})
    st.put("locate", "u0", "r", [{"a": 0}])

    class FullDB:
        def __init__(self, db):
            self.db = db

        def execute(self, sql, *a):
            if sql.startswith("INSERT"):
                raise sqlite3.OperationalError("database or disk is full")
            return self.db.execute(sql, *a)

        def __enter__(self):
            return self.db.__enter__()

        def __exit__(self, *exc):
            return self.db.__exit__(*exc)

    real = st.db
    st.db = FullDB(real)
    with pytest.raises(KneuronsError, match=r"cannot write locate/u1 to .*: database or disk is full; free space"):
        st.put("locate", "u1", "r", [{"a": 1}])
    st.db = real
    st.close()
    with RunStore(tmp_path / "run") as r:
        assert r.done("locate") == {"u0"}


@needs_mount
def test_real_full_disk(tmp_path):
    """A real ENOSPC (a small tmpfs) in the middle of writing a file, a directory and the run store."""
    with tmpfs(tmp_path / "fs", "2m") as fs:
        (fs / "x.json").write_text("old")
        with pytest.raises(KneuronsError, match="No space left on device"):
            _io.atomic_write(fs / "x.json", lambda t: t.write_bytes(b"\1" * (4 << 20)), overwrite=True)
        with pytest.raises(KneuronsError, match="No space left on device"):
            _io.atomic_dir(fs / "model", lambda t: (t / "w.bin").write_bytes(b"\1" * (4 << 20)))
        assert sorted(p.name for p in fs.iterdir()) == ["x.json"] and (fs / "x.json").read_text() == "old"
        st = RunStore.open(fs / "run", {"k": 1})
        n = 0
        with pytest.raises(KneuronsError, match=r"cannot write locate/u\d+ to .*(full|disk I/O)"):
            for n in range(1000):
                st.put("locate", f"u{n}", "r", [{"blob": "x" * 100_000}])
        st.close()
        (fs / "x.json").unlink()
        with RunStore(fs / "run") as r:  # everything committed before the disk filled is there, intact
            assert len(r.done("locate")) == n


def test_save_edited_full_disk_leaves_nothing_and_a_retry_works(tmp_path, monkeypatch):
    """Issue 12 §4: `--save-model` onto a full disk left configs without weights, and a retry was refused as
    "not empty". Now the directory appears whole or not at all."""
    from helpers import handle_for
    from kneurons import load_model
    from kneurons.interventions import save_edited

    h = handle_for("llama")
    out = tmp_path / "edited"
    real = type(h.model).save_pretrained

    def full(self, d, *a, **k):
        (Path(d) / "config.json").write_text("{}")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(type(h.model), "save_pretrained", full)
    with pytest.raises(KneuronsError, match="No space left on device"):
        save_edited(h, out)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(type(h.model), "save_pretrained", real)
    save_edited(h, out)
    back = load_model(str(out))
    assert all(torch.equal(a, b) for a, b in zip(back.model.state_dict().values(), h.model.state_dict().values()))


def test_one_permission_mode_follows_the_umask(synthetic_run, tmp_path):
    run = copy_run(synthetic_run, tmp_path / "run")
    old = os.umask(0o022)
    try:
        export(run, "csv", tmp_path / "csv")
        write_report(run, tmp_path / "rep")
        for d in (tmp_path / "csv", tmp_path / "rep"):
            assert d.stat().st_mode & 0o777 == 0o755
            assert {p.stat().st_mode & 0o777 for p in d.iterdir()} == {0o644}
        os.umask(0o077)
        export(run, "csv", tmp_path / "private")
        assert (tmp_path / "private").stat().st_mode & 0o777 == 0o700
        assert {p.stat().st_mode & 0o777 for p in (tmp_path / "private").iterdir()} == {0o600}
    finally:
        os.umask(old)


def test_a_replaced_report_directory_exists_at_every_moment(synthetic_run, tmp_path, monkeypatch):
    """Issue 12 §4: between two renames the report directory did not exist at all. Replacing it now swaps the
    directories in one step: after every rename kneurons makes, and for a reader polling meanwhile, the report is
    there. Where the file system cannot swap, the fallback's aside copy is put back if a crash hits between its
    two renames."""
    run = copy_run(synthetic_run, tmp_path / "run")
    target = run / "report" / "report.html"
    _io.atomic_dir(target.parent, lambda t: (t / "report.html").write_text("old"), manifest="report")
    gaps, renames = [], []
    real_rename, real_rename2 = os.rename, _io._rename2

    def checked(fn, name):
        def call(*a, **k):
            out = fn(*a, **k)
            renames.append(name)
            if not target.is_file():
                gaps.append(name)
            return out
        return call

    monkeypatch.setattr(os, "rename", checked(real_rename, "rename"))
    monkeypatch.setattr(_io, "_rename2", checked(real_rename2, "renameat2"))
    polls, stop = [0], threading.Event()

    def poll():
        while not stop.is_set():
            polls[0] += 1
            if not target.is_file():
                gaps.append("poll")

    t = threading.Thread(target=poll)
    t.start()
    try:
        write_report(run)
    finally:
        stop.set()
        t.join()
    assert renames == ["renameat2"] and gaps == [] and polls[0] > 100 and leftovers(run) == []
    # no exchange (another file system): rename aside, rename in — a gap, and a crash in it leaves only the aside
    monkeypatch.setattr(_io, "_rename2", lambda *a: False)
    renames.clear()
    _io.atomic_dir(target.parent, lambda t: (t / "report.html").write_text("new"), replace=True, manifest="report")
    assert renames == ["rename"] * 3 and gaps == ["rename"] and target.is_file() and leftovers(run) == []
    monkeypatch.setattr(os, "rename", real_rename)
    page = target.read_bytes()
    aside = run / ".report.knold-999999999-0123abcd"
    os.rename(target.parent, aside)  # as a SIGKILL between the two renames leaves it
    assert _io.clean_stale(run) == [aside]  # the next start puts it back
    assert target.read_bytes() == page and leftovers(run) == []


# ------------------------------------------------------------------------------------------------ 4. signals
CHILD = textwrap.dedent("""
    import json, os, sys, time, types, pathlib
    point, go, mode = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3]
    if mode != "cli":  # the atomic path alone: load kneurons._io without the package's heavy imports
        pkg = types.ModuleType("kneurons")
        pkg.__path__ = [sys.argv[4]]
        sys.modules["kneurons"] = pkg
    from kneurons import _io

    def pause():
        print("PAUSED", flush=True)
        while not go.exists():
            time.sleep(0.01)

    if point == "write":  # after the first file in the temporary: half-written
        for name in ("write_text", "write_bytes"):
            real = getattr(pathlib.Path, name)

            def patched(self, data, *a, _real=real, **k):
                n = _real(self, data, *a, **k)
                if ".kntmp-" in str(self) and not getattr(pause, "done", False):
                    pause.done = True
                    pause()
                return n
            setattr(pathlib.Path, name, patched)
    elif point == "rename":  # inside the publish, just before the rename
        for name in ("_publish_file", "_publish_dir"):
            real = getattr(_io, name)
            setattr(_io, name, lambda *a, _real=real: (pause(), _real(*a))[1])
    elif point == "swap":  # published; the replaced directory not yet removed
        real_publish, real_remove = _io._publish_dir, _io._remove
        state = {}
        _io._publish_dir = lambda tmp, path: (real_publish(tmp, path), state.setdefault("tmp", tmp))[0]
        _io._remove = lambda p: ((pause() if p == state.get("tmp") else None), real_remove(p))[1]
    if mode == "cli":
        from kneurons.cli import main
        sys.exit(main(sys.argv[4:]))
    _io.handle_sigterm()  # as the command line does
    target = pathlib.Path(sys.argv[5])
    try:
        if mode == "file":
            _io.atomic_write(target, lambda t: t.write_text(json.dumps({"new": True})), overwrite=True)
        else:
            _io.atomic_dir(target, lambda t: [(t / f"f{i}").write_text("new") for i in range(3)], replace=True)
    except KeyboardInterrupt:
        sys.exit(143)
""")


def _start(script: Path, point: str, go: Path, argv: list[str]):
    return subprocess.Popen([sys.executable, str(script), point, str(go), *argv], env=ENV, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _signal_paused(procs: dict, tmp_path: Path, check_live=None) -> dict:
    """Wait for each child to pause, (check that its temporary survives a clean-up while it lives,) send it its
    signal and let it go on; returns {signal: (returncode, stderr)}."""
    out = {}
    for sig, proc in procs.items():
        line = proc.stdout.readline()
        assert line.strip() == "PAUSED", (line, proc.stderr.read()[-3000:] if proc.poll() is not None else "")
        if check_live is not None:
            check_live(sig)
        os.kill(proc.pid, signal.SIGTERM if sig == "TERM" else signal.SIGKILL)
        (tmp_path / f"go-{sig}").touch()  # a signal held during a publish is delivered right after it
        proc.wait(timeout=120)
        out[sig] = (proc.returncode, proc.stderr.read())
        proc.stdout.close()
        proc.stderr.close()
    return out


@pytest.mark.parametrize("kind,point", [("file", "write"), ("file", "rename"), ("dir", "write"), ("dir", "rename"),
                                        ("dir", "swap")])
def test_sigterm_and_sigkill_while_writing(tmp_path, kind, point):
    """SIGTERM is handled like Ctrl-C: the temporary is removed, the target is old or new, whole. SIGKILL leaves
    the temporary (never half a target), which the next start removes — but not while its writer lives."""
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    procs, dirs = {}, {}
    for sig in ("TERM", "KILL"):
        d = dirs[sig] = tmp_path / sig
        d.mkdir()
        target = d / ("paris.json" if kind == "file" else "report")
        if kind == "file":
            target.write_text("old")
        else:
            _io.atomic_dir(target, lambda t: (t / "f0").write_text("old"))
        procs[sig] = _start(script, point, tmp_path / f"go-{sig}", [kind, str(ROOT / "src" / "kneurons"),
                                                                   str(target)])

    def live(sig):
        assert leftovers(dirs[sig]) and _io.clean_stale(dirs[sig]) == [] and leftovers(dirs[sig])

    results = _signal_paused(procs, tmp_path, live)
    for sig, (code, err) in results.items():
        d = dirs[sig]
        content = (tree(d / "report") if kind == "dir" else (d / "paris.json").read_text())
        old = "old" if kind == "file" else {"f0": hashlib.sha256(b"old").hexdigest(), _io.MANIFEST: None}
        new = json.dumps({"new": True}) if kind == "file" else {f"f{i}": hashlib.sha256(b"new").hexdigest()
                                                               for i in range(3)}
        if kind == "dir":
            content.pop(_io.MANIFEST, None)
            old.pop(_io.MANIFEST)
        published = point == "swap" or (point == "rename" and sig == "TERM")
        assert content == (new if published else old), (sig, content)
        if sig == "TERM":
            assert code == 143 and leftovers(d) == [], err
        else:
            assert code == -signal.SIGKILL and leftovers(d)
            _io.clean_stale(d)  # what the next command that writes there does first
            assert leftovers(d) == []
        assert sorted(p.name for p in d.iterdir()) == [("paris.json" if kind == "file" else "report")]


def test_sigterm_during_kneurons_report(synthetic_run, tmp_path):
    """The same through the command line: SIGTERM while `kneurons report` writes the report that replaces an
    earlier one — exit 143 with "terminated", the old report whole, no temporary left."""
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    run = copy_run(synthetic_run, tmp_path / "run")
    _io.atomic_dir(run / "report", lambda t: (t / "report.html").write_text("old"), manifest="report")
    old = tree(run / "report")
    proc = _start(script, "write", tmp_path / "go-TERM", ["cli", "report", str(run)])
    code, err = _signal_paused({"TERM": proc}, tmp_path)["TERM"]
    assert code == 143 and err.strip().endswith("kneurons: terminated (signal 15)"), err
    assert tree(run / "report") == old and leftovers(run) == []


# ------------------------------------------------------------------------------------------------ 4. stale temporaries
def test_stale_temporaries_are_cleaned_and_nothing_else(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        old = time.time() - _io.STALE_SECONDS - 60
        (tmp_path / "outside").mkdir()
        entries = {
            f".paris.json.kntmp-{dead.pid}-0123abcd": ("file", True),        # owner gone
            f".report.kntmp-{dead.pid}-0123abcd": ("dir", True),
            f".report.kntmp-{live.pid}-0123abcd": ("dir", False),            # owner running
            f".x.json.kntmp-{live.pid}-0123abcd": ("old file", True),        # owner's PID reused: old
            f".y.json.kntmp-{os.getpid()}-0123abcd": ("old file", False),    # ours
            f".z.json.kntmp-{dead.pid}-0123abcd": ("symlink", False),        # never followed nor removed
            ".paris.json.tmp123": ("old file", True),                        # an older kneurons' temporary
            ".paris.json.tmp124": ("file", False),                           # ... recent: maybe live
            ".notes.txt.tmp123": ("old file", False),                        # not ours: never touched
            ".report.tmpab_cd123": ("old dir", True),
            "report.tmp123": ("old file", False),
        }
        for name, (kind, _) in entries.items():
            p = tmp_path / name
            if kind == "symlink":
                p.symlink_to(tmp_path / "outside")
                continue
            if "dir" in kind:
                p.mkdir()
                (p / "report.html").write_text("x")
                if "old" in kind:
                    os.utime(p / "report.html", (old, old))
            else:
                p.write_text("x")
            if "old" in kind:
                os.utime(p, (old, old))
        removed = _io.clean_stale(tmp_path, legacy_for=["paris.json", "report"])
        assert sorted(p.name for p in removed) == sorted(n for n, (_, gone) in entries.items() if gone)
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            ["outside"] + [n for n, (_, gone) in entries.items() if not gone])
        assert list((tmp_path / "outside").iterdir()) == []
    finally:
        live.kill()
        live.wait()
