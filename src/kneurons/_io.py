"""Everything kneurons writes goes through here: up-front checks, one atomic path, leftovers, locks, SIGTERM.

**One atomic path.** A file (results JSON, safetensors, a run's ``config.json``) is written by
:func:`atomic_write`, a directory (report, export, edited model, model-cache entry) by :func:`atomic_dir`: the
content goes into a temporary sibling named ``.NAME.kntmp-PID-RANDOM``, every file is fsynced, and one rename
publishes it (then the parent directory is fsynced). A directory that replaces an earlier one is swapped in with
one atomic exchange (Linux ``renameat2(RENAME_EXCHANGE)``), so there is no moment without it; file systems
without the exchange get rename-aside-then-rename (the aside copy is put back by the next start if a crash hits
in between). On any failure — an exception, a full disk, Ctrl-C, SIGTERM — the temporary is removed and the
target is untouched. Permissions follow the process's umask (0644 files / 0755 directories under the usual
022), whatever mode a library used for its temporary.

**Leftovers** of a killed process are removed by :func:`clean_stale` whenever kneurons writes into a directory:
a temporary is stale when its owner process (the PID in its name) no longer runs, or when nothing in it changed
for :data:`STALE_SECONDS` (the PID was reused). Temporaries of a live process are never removed, symlinks never
followed, other users' files never touched.

**Up-front checks** (:func:`check_writable_file`, :func:`check_new_dir`, :func:`check_output_dir`,
:func:`check_writable_dir`) say in one line why a target cannot be written — a file in the way, a missing or
read-only directory, a full disk — before any computation; they create and remove a small probe file.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import time
from pathlib import Path
from typing import Callable, Iterable

from .errors import KneuronsError

#: a temporary whose owner PID still runs is removed only after this long without a change (PID reuse)
STALE_SECONDS = 3600
#: the probe of a target directory wants at least this much free space
MIN_FREE_BYTES = 1 << 20
#: the file naming what an output directory (report, export) holds, so that only kneurons' own files are replaced
MANIFEST = ".kneurons-output.json"

_TMP = re.compile(r"^\.(?P<name>.+)\.kntmp-(?P<pid>\d+)-[0-9a-f]{8}$")
_ASIDE = re.compile(r"^\.(?P<name>.+)\.knold-(?P<pid>\d+)-[0-9a-f]{8}$")


def _legacy(name: str) -> list[re.Pattern]:
    """Temporaries that kneurons wrote for target ``name`` before this module named them (no reliable PID:
    removed by age only): ``.NAME.tmp<pid>`` files, ``.NAME.tmpXXXXXXXX`` directories, ``.NAME.old<pid>`` asides."""
    n = re.escape(name)
    return [re.compile(rf"^\.{n}\.tmp\d+$"), re.compile(rf"^\.{n}\.tmp[a-z0-9_]{{8}}$"),
            re.compile(rf"^\.(?P<name>{n})\.old\d+$")]


class TargetExists(KneuronsError):
    """The target of :func:`atomic_dir` exists and may not be replaced."""


# ------------------------------------------------------------------------------------------------ small helpers
def _why(exc: OSError) -> str:
    return exc.strerror or str(exc)


def umask() -> int:
    """The process's umask, read without changing it where the kernel says it (Linux >= 4.7)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def _normalize_modes(path: Path) -> None:
    """Give ``path`` (and, for a directory, everything below it) the modes the umask gives new files."""
    mask = umask()
    fmode, dmode = 0o666 & ~mask, 0o777 & ~mask
    entries = [path] + (list(path.rglob("*")) if path.is_dir() and not path.is_symlink() else [])
    for p in entries:
        st = p.lstat()
        if stat.S_ISLNK(st.st_mode):
            continue
        want = dmode if stat.S_ISDIR(st.st_mode) else fmode
        if stat.S_IMODE(st.st_mode) != want:
            os.chmod(p, want)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    except OSError as exc:  # some file systems cannot fsync a directory
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    if path.is_dir():
        for p in sorted(path.rglob("*"), key=lambda q: -len(q.parts)):  # deepest first
            if not p.is_symlink():
                _fsync_path(p)
    _fsync_path(path)


def _remove(path: Path) -> None:
    """Remove a file or a directory tree (never following symlinks); missing is fine."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        pass


@contextlib.contextmanager
def _signals_deferred():
    """Hold Ctrl-C / SIGTERM / SIGHUP while a publish or a clean-up runs; they are delivered right after (so an
    interrupted command still removes its temporary and never stops between the two renames of a fallback)."""
    import threading

    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    sigs = {signal.SIGINT, signal.SIGTERM} | ({signal.SIGHUP} if hasattr(signal, "SIGHUP") else set())
    old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _tmp_sibling(path: Path, kind: str = "kntmp") -> Path:
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")


# rename flags of Linux renameat2(2)
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
try:
    _renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
except (AttributeError, OSError, TypeError):  # not Linux/glibc: the fallbacks below
    _renameat2 = None
_AT_FDCWD = -100
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP}


def _rename2(src: Path, dst: Path, flags: int) -> bool:
    """renameat2(src, dst, flags); False when the system or file system does not support the flag."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in _UNSUPPORTED:
        return False
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


def _publish_file(tmp: Path, path: Path, overwrite: bool) -> None:
    if overwrite:
        os.replace(tmp, path)
    elif not _rename2(tmp, path, _RENAME_NOREPLACE):
        if path.exists() or path.is_symlink():  # no atomic no-replace rename here: check, then rename
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(path))
        os.rename(tmp, path)


def _publish_dir(tmp: Path, path: Path) -> None:
    """Put the finished directory ``tmp`` at ``path``; an existing ``path`` ends up at ``tmp`` (removed by the
    caller). One atomic exchange where the file system has it; else rename aside, rename in, and put the aside
    copy back if the second rename fails."""
    if not (path.exists() or path.is_symlink()):
        os.rename(tmp, path)
        return
    if _rename2(tmp, path, _RENAME_EXCHANGE):
        return
    aside = _tmp_sibling(path, "knold")
    os.rename(path, aside)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(aside, path)
        raise
    os.rename(aside, tmp)


# ------------------------------------------------------------------------------------------------ leftovers
def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except OSError:
        return False
    return True


def _newest_mtime(path: Path) -> float:
    stamps = [path.lstat().st_mtime]
    if path.is_dir() and not path.is_symlink():
        for p in path.rglob("*"):
            with contextlib.suppress(OSError):
                stamps.append(p.lstat().st_mtime)
    return max(stamps)


def is_temporary(name: str) -> bool:
    """Whether a directory entry's name is one of kneurons' temporaries."""
    return bool(_TMP.match(name) or _ASIDE.match(name))


def clean_stale(directory, legacy_for: Iterable[str] = (), legacy: Iterable[re.Pattern] = (),
                now: float | None = None) -> list[Path]:
    """Remove the stale temporaries kneurons left in ``directory`` (not below it); returns what was removed or
    put back. ``legacy_for`` names targets whose temporaries of older kneurons versions are recognised too
    (``legacy``: more such patterns); those carry no reliable PID and go by age only — and only for names kneurons
    writes, so that another program's ``.x.tmp123`` is never touched. A directory set aside while being replaced
    (``.NAME.knold-*``, ``.NAME.old<pid>``) is renamed back to ``NAME`` when ``NAME`` is missing. Best effort:
    errors are ignored."""
    directory = Path(directory)
    now = time.time() if now is None else now
    old_style = [r for n in legacy_for for r in _legacy(n)] + list(legacy)
    done = []
    try:
        entries = list(directory.iterdir())
    except OSError:
        return done
    euid = os.geteuid() if hasattr(os, "geteuid") else None
    for p in entries:
        name = p.name
        m = _TMP.match(name) or _ASIDE.match(name)
        lm = None if m else next((x for x in (r.match(name) for r in old_style) if x), None)
        if m is None and lm is None:
            continue
        try:
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode) or (euid not in (None, 0) and st.st_uid != euid):
                continue
            if m is not None:
                pid = int(m["pid"])
                if pid == os.getpid():
                    continue
                stale = not _pid_alive(pid) or now - _newest_mtime(p) > STALE_SECONDS
            else:
                stale = now - _newest_mtime(p) > STALE_SECONDS
            if not stale:
                continue
            aside = _ASIDE.match(name) if m is not None else (lm if "name" in lm.groupdict() else None)
            target = directory / aside["name"] if aside else None
            if target is not None and stat.S_ISDIR(st.st_mode) and not (target.exists() or target.is_symlink()):
                os.rename(p, target)  # a crash between the two renames of a replacement: put the old one back
            else:
                _remove(p)
            done.append(p)
        except OSError:
            continue
    return done


# ------------------------------------------------------------------------------------------------ checks
def _first_existing(path: Path) -> Path:
    """The deepest existing ancestor of ``path`` (``path`` itself when it exists); a file in the way raises."""
    for p in [path, *path.parents]:
        if p.is_symlink() and not p.exists():
            raise KneuronsError(f"{p} is a broken symbolic link")
        if p.exists():
            if p != path and not p.is_dir():
                raise KneuronsError(f"cannot create {path}: {p} is a file, not a directory")
            return p
    return Path(path.anchor or ".")


def check_writable_dir(directory, min_free: int = MIN_FREE_BYTES, what: str | None = None) -> Path:
    """Fail (one line) unless a file can be created in the existing ``directory`` and ``min_free`` bytes are free:
    creates, writes, fsyncs and removes a small probe file (so read-only mounts and full disks are caught as they
    are, also for root)."""
    directory = Path(directory)
    what = what or str(directory)
    if not directory.is_dir():
        raise KneuronsError(f"{what}: not a directory")
    try:
        vfs = os.statvfs(directory)
        free = vfs.f_bavail * vfs.f_frsize
    except (OSError, AttributeError):
        free = None
    if free is not None and free < min_free:
        raise KneuronsError(f"cannot write in {what}: no space left on device ({free // 1024} KiB free, "
                            f"{-(-min_free // 1024)} KiB needed)")
    probe = directory / f".kneurons-probe.kntmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
        try:
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise KneuronsError(f"cannot write in {what}: {_why(exc)}") from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    return directory


def check_writable_file(path, overwrite: bool = False, probe: bool = True, min_free: int = MIN_FREE_BYTES) -> Path:
    """Fail early (one line) when the file ``path`` cannot be written: it exists (unless ``overwrite``), it is a
    directory or a symlink, its directory is missing, is a file or is not writable, or the disk is full."""
    path = Path(path)
    if path.is_symlink():
        raise KneuronsError(f"{path} is a symbolic link; give the real path")
    if path.is_dir():
        raise KneuronsError(f"{path} is a directory, not a file")
    if path.exists() and not overwrite:
        raise KneuronsError(f"{path} exists (pass overwrite=True / --overwrite to replace it)")
    parent = path.parent
    if not parent.exists():
        _first_existing(parent)  # a file in the way is named
        raise KneuronsError(f"directory does not exist: {parent}")
    if not parent.is_dir():
        raise KneuronsError(f"cannot write {path}: {parent} is a file, not a directory")
    if probe:
        check_writable_dir(parent, min_free)
    return path


#: the name older code used
check_target = check_writable_file


def check_new_dir(path, allow_empty: bool = True, probe: bool = True, min_free: int = MIN_FREE_BYTES,
                  parents: bool = True) -> Path:
    """Fail early (one line) unless the directory ``path`` can be created: it does not exist (or is an empty
    directory, with ``allow_empty``), nothing on the way to it is a file, its parent exists (unless ``parents``:
    missing ones are created), and the nearest existing directory above it is writable with ``min_free`` bytes
    free."""
    path = Path(path)
    if path.is_symlink():
        raise KneuronsError(f"{path} is a symbolic link; give the real directory")
    if not parents and not path.exists() and not path.parent.is_dir():
        if path.parent.exists():
            raise KneuronsError(f"{path.parent} is a file, not a directory")
        raise KneuronsError(f"directory does not exist: {path.parent}")
    if path.exists():
        if not path.is_dir():
            raise KneuronsError(f"{path} is a file, not a directory")
        if not allow_empty or any(path.iterdir()):
            raise KneuronsError(f"directory {path} is not empty")
    base = _first_existing(path.parent if path.exists() else path)
    if probe:
        check_writable_dir(base, min_free)
    return path


def _listing(path: Path) -> list[Path]:
    try:
        return list(path.iterdir())
    except OSError as exc:
        raise KneuronsError(f"cannot read {path}: {_why(exc)}") from None


def foreign_entries(path, kind: str, legacy: Callable[[str], bool] | None = None) -> list[str]:
    """The entries of the directory ``path`` that kneurons did not write there as a ``kind`` output: anything not
    listed in its manifest (:data:`MANIFEST`) — or, for outputs written before manifests, not accepted by
    ``legacy(name)`` — and anything that is not a plain file."""
    entries = _listing(Path(path))
    man = Path(path) / MANIFEST
    listed = None
    if man.is_file() and not man.is_symlink():
        try:
            record = json.loads(man.read_text())
            if record.get("kind") == kind:
                listed = set(record["files"]) | {MANIFEST}
        except (ValueError, KeyError, TypeError, OSError, AttributeError):
            pass
    if listed is None and man.exists():
        return sorted(p.name for p in entries)  # another kind's output, or a manifest we cannot read
    ok = (lambda n: n in listed) if listed is not None else (legacy or (lambda n: False))
    return sorted(p.name for p in entries if p.is_symlink() or not p.is_file() or not ok(p.name))


def owned_output(path, kind: str, legacy: Callable[[str], bool] | None = None) -> bool:
    """Whether the directory ``path`` holds only what kneurons wrote there as a ``kind`` output."""
    return not foreign_entries(path, kind, legacy)


def check_output_dir(out, kind: str, replace: bool, legacy: Callable[[str], bool] | None = None,
                     probe: bool = True) -> Path:
    """Fail early (one line) unless the output directory ``out`` (a ``kind`` output: report, export) can be
    written: it does not exist, is empty, or — when ``replace`` — holds only what kneurons wrote there as a
    ``kind`` output (:func:`owned_output`); never a file, a symlink, or a directory with anything else."""
    out = Path(out)
    if out.is_symlink():
        raise KneuronsError(f"{kind} output {out} is a symbolic link; give the real directory")
    if out.exists() and not out.is_dir():
        raise KneuronsError(f"{kind} output {out} is a file, not a directory")
    if out.is_dir():
        entries = _listing(out)
        foreign = foreign_entries(out, kind, legacy) if entries else []
        if foreign:
            raise KneuronsError(f"{out} holds files that are not a kneurons {kind} ({', '.join(foreign[:3])}"
                                f"{', ...' if len(foreign) > 3 else ''}); nothing there is replaced: choose another "
                                "output directory")
        if entries and not replace:
            raise KneuronsError(f"{out} exists and is not empty (pass --overwrite to replace it)")
    base = _first_existing(out.parent)
    if probe:
        check_writable_dir(base)
    return out


# ------------------------------------------------------------------------------------------------ writing
def atomic_write(path, write: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, fsync it and rename it into place (without
    ``overwrite`` an existing ``path`` is never replaced, also when it appears meanwhile). Any failure removes the
    temporary and leaves ``path`` as it was; an OS error becomes one line naming ``path``."""
    path = check_writable_file(path, overwrite, probe=False)
    clean_stale(path.parent, legacy_for=[path.name])
    tmp = _tmp_sibling(path)
    try:
        write(tmp)
        if not tmp.is_file():
            raise KneuronsError(f"nothing was written for {path}")
        _normalize_modes(tmp)
        _fsync_path(tmp)
        with _signals_deferred():
            _publish_file(tmp, path, overwrite)
            _fsync_path(path.parent)
    except FileExistsError:
        raise KneuronsError(f"{path} exists (pass overwrite=True / --overwrite to replace it)") from None
    except OSError as exc:
        raise KneuronsError(f"cannot write {path}: {_why(exc)}") from None
    finally:
        with _signals_deferred():
            _remove(tmp)
    return path


def atomic_write_text(path, text: str, overwrite: bool = False) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), overwrite)


def atomic_dir(path, build: Callable[[Path], None], replace: Callable[[Path], bool] | bool = False,
               manifest: str | None = None) -> Path:
    """Build a directory at ``path`` atomically: ``build(tmp)`` fills a temporary sibling directory, which is
    fsynced and published with one rename. An existing ``path`` is replaced only when it is empty or ``replace``
    (a bool, or a predicate on the existing directory, checked again just before the swap) allows it; the old
    directory is removed after the new one is in place. With ``manifest`` (an output kind), a :data:`MANIFEST`
    listing the files is written too (see :func:`owned_output`)."""
    path = Path(path)
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise KneuronsError(f"{path} exists and is not a directory")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KneuronsError(f"cannot create {path.parent}: {_why(exc)}") from None
    clean_stale(path.parent, legacy_for=[path.name])
    tmp = _tmp_sibling(path)

    def allowed(existing: Path) -> bool:
        if not any(existing.iterdir()):
            return True
        return replace(existing) if callable(replace) else bool(replace)

    try:
        os.mkdir(tmp, 0o777)
        build(tmp)
        if manifest is not None:
            files = sorted(p.name for p in tmp.iterdir())
            (tmp / MANIFEST).write_text(json.dumps({"kind": manifest, "files": files, "written": time.time()},
                                                   indent=1) + "\n")
        _normalize_modes(tmp)
        _fsync_tree(tmp)
        with _signals_deferred():
            if path.is_dir() and not allowed(path):
                raise TargetExists(f"{path} exists and is not empty; nothing was replaced")
            _publish_dir(tmp, path)
            _fsync_path(path.parent)
    except OSError as exc:
        raise KneuronsError(f"cannot write {path}: {_why(exc)}") from None
    finally:
        with _signals_deferred():
            _remove(tmp)  # the temporary, or after a swap the directory it replaced
    return path


# ------------------------------------------------------------------------------------------------ locks
_HELD: dict[str, list] = {}  # lock file (resolved) -> [fd, users in this process]


class Lock:
    """An exclusive ``flock`` on a lock file, held by this process (re-entrant within it); the operating system
    releases it when the process ends, however it ends. :meth:`release` once per :func:`lock_exclusive`."""

    def __init__(self, key: str):
        self.key = key
        self.released = False

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        held = _HELD.get(self.key)
        if held is None:
            return
        held[1] -= 1
        if held[1] <= 0:
            import fcntl

            del _HELD[self.key]
            with contextlib.suppress(OSError):
                os.ftruncate(held[0], 0)
                fcntl.flock(held[0], fcntl.LOCK_UN)
            os.close(held[0])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
        return False


def lock_holder(path) -> str:
    """What the lock file says about its holder ("PID 123 on host, since 12:00:01"), or "" when it says nothing."""
    try:
        fields = Path(path).read_text().split()
        pid, host, since = int(fields[0]), fields[1], float(fields[2])
    except (OSError, ValueError, IndexError):
        return ""
    return f"PID {pid} on {host}, since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))}"


def lock_exclusive(lock_path, what: str) -> Lock:
    """Take the exclusive lock ``lock_path`` (its directory must exist) without waiting: held by another process,
    it is a one-line error naming the holder's PID. ``what`` names the locked thing in that message."""
    import fcntl

    lock_path = Path(lock_path)
    key = str(lock_path.parent.resolve() / lock_path.name)
    if key in _HELD:
        _HELD[key][1] += 1
        return Lock(key)
    for _ in range(20):
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0), 0o666)
        except OSError as exc:
            raise KneuronsError(f"cannot lock {what} ({lock_path}): {_why(exc)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = ""
            for _ in range(40):  # the holder writes its PID right after locking
                holder = lock_holder(lock_path)
                if holder:
                    break
                time.sleep(0.05)
            os.close(fd)
            raise KneuronsError(f"{what} is in use by another kneurons process ({holder or 'PID unknown'}); wait for "
                                "it to finish or use another directory") from None
        except OSError as exc:
            os.close(fd)
            raise KneuronsError(f"cannot lock {what} ({lock_path}): {_why(exc)}") from None
        try:  # the file may have been removed or replaced between open and flock: lock the one that is there
            same = os.path.samestat(os.fstat(fd), os.stat(lock_path, follow_symlinks=False))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    else:
        raise KneuronsError(f"cannot lock {what} ({lock_path}): it keeps being replaced")
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname() or 'localhost'} {time.time():.3f}\n".encode(), 0)
    except OSError as exc:
        os.close(fd)
        raise KneuronsError(f"cannot write {lock_path}: {_why(exc)}") from None
    _HELD[key] = [fd, 1]
    return Lock(key)


# ------------------------------------------------------------------------------------------------ signals
class Terminated(KeyboardInterrupt):
    """Raised in the main thread on SIGTERM, so that it unwinds like Ctrl-C (temporaries removed)."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(f"terminated by signal {signum}")
        self.signum = signum


_RECEIVED: list[int] = []  # the signals raised as exceptions since handle_sigterm()


def _raise_terminated(signum, frame):
    _RECEIVED.append(signum)
    raise Terminated(signum)


def _raise_interrupt(signum, frame):
    _RECEIVED.append(signum)
    raise KeyboardInterrupt


def termination_received() -> int | None:
    """The signal (SIGINT, SIGTERM, SIGHUP) received since :func:`handle_sigterm`, if any — also when the
    exception it raised was turned into another error on its way up (transformers' lazy imports did that while a
    model's config loaded), so that the command still ends as interrupted or terminated, not with that error."""
    return _RECEIVED[-1] if _RECEIVED else None


@contextlib.contextmanager
def kept_signal_handlers():
    """Restore this process's handlers of SIGINT, SIGTERM and SIGHUP on leaving (the command's own, around
    :func:`handle_sigterm`; ours, around ``ray.init``, which installs its own). Outside the main thread: nothing."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    sigs = [s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None]
    old = {s: signal.getsignal(s) for s in sigs}
    try:
        yield
    finally:
        for s, h in old.items():
            if h is not None:
                signal.signal(s, h)


def handle_sigterm() -> None:
    """Make SIGTERM (and SIGHUP) raise :class:`Terminated` in the main thread — handled like Ctrl-C — and remember
    every such signal and Ctrl-C (:func:`termination_received`)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return
    _RECEIVED.clear()
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # the same KeyboardInterrupt, remembered
        signal.signal(signal.SIGINT, _raise_interrupt)
    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None and signal.getsignal(sig) in (signal.SIG_DFL, None):
            signal.signal(sig, _raise_terminated)

