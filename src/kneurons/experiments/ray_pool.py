"""A pool of Ray actors that compute a run's units (``kneurons run --ray``).

Each actor loads the model once from the run's model spec (same dtype; on the GPU Ray gives it, or on CPU) and
checks that its weights digest equals the driver's before it gets any work. The driver submits each unit as a
:class:`~kneurons.experiments.units.Task` (the data travels with it), keeps a bounded number of units in flight
(at most ``depth`` queued on each actor, ``max_in_flight`` not yet stored in all), and runs each unit's callback —
which stores its rows — in submission order: the driver stays the single writer of the run store, in the same
transactions as in process, so resume, configuration identity and the SIGKILL guarantees are unchanged. An actor
whose process dies is replaced by a new one (which is checked the same way) and its units are retried, each at
most ``retries`` times; then the run stops with an error naming the unit.

Ray is imported only here, and only when a pool starts (``pip install 'kneurons[ray]'``).
"""

from __future__ import annotations

import collections
import math
import os
import re
import socket
from dataclasses import dataclass, field
from typing import Callable

from .._io import kept_signal_handlers
from ..errors import KneuronsError
from .units import Outcome, Task, compute

INSTALL = "--ray needs Ray: pip install 'kneurons[ray]' (or pip install ray)"
#: the custom resource that marks a ``local:N`` cluster as one command's own (suffix: the command's pid)
PRIVATE = "kneurons_local_pid_"
#: how long the pool waits for its workers to load the model (a cluster without room for them never starts them)
STARTUP_TIMEOUT = 900.0


def import_ray():
    """The ``ray`` module, or a one-line error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise KneuronsError(INSTALL) from None
    return ray


def parse_address(text: str) -> str:
    """``auto``, ``local:N`` (N >= 1) or a cluster address (``host:port``, ``ray://host:port``); refused otherwise."""
    text = str(text).strip()
    m = re.fullmatch(r"local:(\d+)", text)
    if m:
        if int(m.group(1)) < 1:
            raise KneuronsError(f"--ray local:N needs N >= 1 workers, got {text!r}")
        return text
    if text == "auto" or re.fullmatch(r"(ray://)?[A-Za-z0-9_.\-\[\]:]+:\d+", text):
        return text
    raise KneuronsError(f"--ray takes auto, local:N or a cluster address host:port (or ray://host:port), got {text!r}")


def tensor_digests(model) -> dict[str, str]:
    """SHA-256 of each parameter and buffer (names the tensors two copies of a model differ in)."""
    import hashlib

    import torch

    out = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        h = hashlib.sha256(str(t.dtype).encode())
        h.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()
                 if t.numel() else b"")
        out[name] = h.hexdigest()
    return out


class UnitWorker:
    """The actor: loads the model once and computes tasks on it. A model that cannot be loaded is reported by
    :meth:`ready` (the driver refuses the run by name), not raised from the constructor."""

    def __init__(self, model: str, dtype: str | None, device: str | None, threads: int):
        import torch

        import ray

        from ..interventions import weights_digest
        from ..models import load_model

        if threads > 0:
            torch.set_num_threads(threads)
        self.info = {"pid": os.getpid(), "host": socket.gethostname(), "ip": ray.util.get_node_ip_address(),
                     "gpus": [str(g) for g in ray.get_gpu_ids()], "device": device, "error": None, "digest": None}
        self.handle = None
        try:  # any failure to load is reported to the driver as one line
            self.handle = load_model(model, dtype=dtype, device=device)
        except Exception as exc:  # noqa: BLE001 - reported by ready(), the driver stops the run with it
            self.info["error"] = f"{type(exc).__name__}: {_first_line(exc)}"
            return
        self.info["digest"] = weights_digest(self.handle.model)
        self.info["device"] = str(self.handle.device)

    def ready(self) -> dict:
        return self.info

    def tensor_digests(self) -> dict[str, str]:
        return tensor_digests(self.handle.model)

    def run(self, t: Task) -> Outcome:
        return compute(t, self.handle)


@dataclass
class _Pending:
    seq: int
    task: Task
    done: Callable[[Outcome], None]
    attempts: int = 0


@dataclass
class _Slot:
    actor: object
    info: dict
    running: list = field(default_factory=list)  # object refs of the tasks queued on this actor


class RayPool:
    """Units computed by ``workers`` Ray actors, each holding the model.

    ``address``: ``"local:N"`` (start a local cluster with N workers, shut down at the end), ``"auto"`` (the cluster
    of ``ray start``), a cluster address, or ``None`` (the Ray connection this process already has, e.g. from
    ``ray.init(...)``). ``workers``: how many (default: N of ``local:N``, else as many as the cluster's GPUs /
    ``gpus_per_worker``, or CPUs / ``threads_per_worker``). ``gpus_per_worker``: default 1 on a cluster with GPUs,
    0 without. ``threads_per_worker``: torch threads (and Ray CPUs) of each worker. ``retries``: attempts of a unit
    after the first whose worker died."""

    def __init__(self, address: str | None = "auto", workers: int | None = None, gpus_per_worker: float | None = None,
                 threads_per_worker: int = 1, retries: int = 2, depth: int = 2, max_in_flight: int | None = None):
        if address is not None:
            address = parse_address(address)
        for name, v, lo in (("workers", workers, 1), ("threads_per_worker", threads_per_worker, 1),
                            ("retries", retries, 0), ("depth", depth, 1), ("max_in_flight", max_in_flight, 1)):
            if v is not None and (not isinstance(v, int) or v < lo):
                raise KneuronsError(f"{name} must be an integer >= {lo}, got {v!r}")
        if gpus_per_worker is not None and not (isinstance(gpus_per_worker, (int, float)) and
                                                math.isfinite(gpus_per_worker) and gpus_per_worker >= 0):
            raise KneuronsError(f"gpus_per_worker must be a number >= 0, got {gpus_per_worker!r}")
        if gpus_per_worker is not None and gpus_per_worker > 1 and gpus_per_worker != int(gpus_per_worker):
            raise KneuronsError(f"gpus_per_worker above 1 must be a whole number of GPUs (Ray's rule), got "
                                f"{gpus_per_worker:g}")
        if address is not None and address.startswith("local:") and workers is not None and \
                workers > int(address.split(":")[1]):
            raise KneuronsError(f"--workers {workers} do not fit in --ray {address} (a local cluster with room for "
                                f"{address.split(':')[1]} workers): use --ray local:{workers}")
        self.address, self.workers, self.gpus = address, workers, gpus_per_worker
        self.threads, self.retries, self.depth, self.max_in_flight = threads_per_worker, retries, depth, max_in_flight
        self.description = f"a Ray pool ({address or 'this process’s Ray connection'})"
        self.ray = None
        self.owns_ray = False
        self.slots: list[_Slot] = []
        self.queue: collections.deque[_Pending] = collections.deque()
        self.inflight: dict = {}  # object ref -> (pending, slot index)
        self.finished: dict[int, tuple[_Pending, Outcome]] = {}
        self.next_seq = self.committed = 0
        self.replaced = self.retried = 0
        self.started: list[dict] = []  # what each worker reported when it started (replacements included)
        self.in_callback = False
        self.log: Callable[[str], None] = lambda msg: None

    # ------------------------------------------------------------------------------------------------ start
    def connect(self) -> None:
        """Connect to the cluster (or start the local one) and size the pool; :meth:`start` does it if not done
        (the CLI connects before it loads the model, so that a cluster it cannot reach is refused first)."""
        ray = self.ray = import_ray()
        local = self.address is not None and self.address.startswith("local:")
        if self.address is None:
            if not ray.is_initialized():
                raise KneuronsError("RayPool(address=None) needs ray.init(...) first (or give an address)")
        elif ray.is_initialized():
            raise KneuronsError("this process is already connected to Ray: use RayPool(address=None)")
        elif local:
            n = int(self.address.split(":")[1])
            # address "local": a new cluster even where RAY_ADDRESS or a `ray start` cluster would be joined
            # ray.init installs its own signal handlers (SIGTERM then aborted the driver with a C++ stack dump
            # instead of ending it like Ctrl-C, exit 143): ours are put back. Marked private: --ray auto of another
            # command must not join it
            with kept_signal_handlers():
                ray.init(address="local", num_cpus=n * self.threads, include_dashboard=False, log_to_driver=False,
                         logging_level="error", configure_logging=True,
                         resources={f"{PRIVATE}{os.getpid()}": 1})
            self.owns_ray = True
        else:
            _probe(self.address)
            try:
                with kept_signal_handlers():
                    ray.init(address=self.address, include_dashboard=False, log_to_driver=False,
                             logging_level="error")
            except ConnectionError as exc:
                raise KneuronsError(f"cannot connect to a Ray cluster at --ray {self.address} ({_first_line(exc)}); "
                                    f"start one with `ray start --head`, or use --ray local:N") from None
            self.owns_ray = True
            private = [k for k in ray.cluster_resources() if k.startswith(PRIVATE)]
            if private:  # Ray's `auto` also finds the local cluster of any process on this machine
                self.close()
                raise KneuronsError(f"--ray {self.address} found the private local cluster of another kneurons run "
                                    f"(pid {private[0][len(PRIVATE):]}), which stops with it: start a shared one with "
                                    f"`ray start --head`, or use --ray local:N")
        res = ray.cluster_resources()
        gpus = self.gpus if self.gpus is not None else (1 if res.get("GPU", 0) >= 1 else 0)
        self.gpus = gpus
        n = self.workers or (int(self.address.split(":")[1]) if local else
                             int(res.get("GPU", 0) // gpus) if gpus else int(res.get("CPU", 0) // self.threads))
        if n < 1:
            self.close()
            raise KneuronsError(f"the Ray cluster has no room for one worker with {gpus} GPU(s) and "
                                f"{self.threads} CPU(s) (its resources: {_resources(res)})")
        if local and gpus and n * gpus > res.get("GPU", 0):  # a local cluster does not grow: refuse, not wait
            self.close()
            raise KneuronsError(f"{n} workers with {gpus:g} GPU(s) each need {n * gpus:g} GPUs; this machine has "
                                f"{res.get('GPU', 0):g} (use --gpus-per-worker 0 for CPU workers)")
        self.workers = n
        if self.max_in_flight is None:
            self.max_in_flight = 2 * self.depth * n

    def launch(self, config) -> None:
        """Start the workers' processes, which load the model, without waiting for them (connecting first if
        needed): the CLI calls it before the driver loads its own copy, so that both loads overlap.
        :meth:`start` launches them if this was not called."""
        if self.ray is None:
            self.connect()
        device = config.device
        if self.gpus and (device is None or str(device).startswith("cuda")):
            device = "cuda"  # the GPU Ray assigned (CUDA_VISIBLE_DEVICES)
        spec = (config.model, config.dtype, device, self.threads)
        if self.slots:
            if spec != self.spec:
                raise KneuronsError(f"the Ray workers were launched for {self.spec}, not {spec} (a bug)")
            return
        self.spec = spec
        self.slots = [_Slot(self._new_actor(), {}) for _ in range(self.workers)]  # (stopped by close())

    def start(self, handle, config, digest: str, log=None) -> None:
        """Wait for the workers (launching them first if needed) and check each one's weights against
        ``digest``; a worker that cannot load the model, or loaded other weights, refuses the run by name."""
        self.log = log or self.log
        self.launch(config)
        gpus, n = self.gpus, self.workers
        self.digest = digest
        self.driver_handle = handle
        infos = self._ready([s.actor for s in self.slots])
        for s, info in zip(self.slots, infos):
            s.info = info
        where = collections.Counter(i["host"] for i in infos)
        self.description = (f"{n} Ray workers ({', '.join(f'{c} on {h}' for h, c in where.items())}; "
                            f"{gpus:g} GPU(s) and {self.threads} thread(s) each)")
        self.log(f"ray: units computed by {self.description}, model on {self.device()}")

    def _new_actor(self):
        ray = self.ray
        cls = ray.remote(UnitWorker).options(num_cpus=self.threads, num_gpus=self.gpus, max_restarts=0,
                                             max_task_retries=0)
        return cls.remote(*self.spec)

    def _ready(self, actors) -> list[dict]:
        """Each actor's report, once all loaded the model; refuses the run if one cannot, or has other weights."""
        ray = self.ray
        refs = [a.ready.remote() for a in actors]
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=STARTUP_TIMEOUT)
        if len(done) < len(refs):
            raise KneuronsError(f"only {len(done)} of {len(refs)} Ray workers started within {STARTUP_TIMEOUT:.0f}s "
                                f"(each needs {self.gpus} GPU(s) and {self.threads} CPU(s); the cluster has "
                                f"{_resources(ray.cluster_resources())})")
        infos = []
        for a, ref in zip(actors, refs):
            try:
                info = ray.get(ref)
            except ray.exceptions.RayActorError as exc:
                raise KneuronsError(f"a Ray worker died while loading the model {self.spec[0]!r}: "
                                    f"{_first_line(exc)}") from None
            where = f"Ray worker on node {info['host']} ({info['ip']}, pid {info['pid']})"
            if info["error"] is not None:
                raise KneuronsError(f"{where} cannot load the model {self.spec[0]!r}: {info['error']}")
            if info["digest"] != self.digest:
                raise KneuronsError(f"{where} loaded other weights of {self.spec[0]!r} than the driver "
                                    f"(SHA-256 {info['digest'][:12]}…, driver {self.digest[:12]}…; "
                                    f"{self._difference(a)})")
            infos.append(info)
        self.started += infos
        return infos

    def _difference(self, actor) -> str:
        """Which tensors differ between the worker's model and the driver's."""
        theirs = self.ray.get(actor.tensor_digests.remote())
        mine = tensor_digests(self.driver_handle.model)
        names = sorted(set(mine) | set(theirs))
        diff = [n for n in names if mine.get(n) != theirs.get(n)]
        missing = [n for n in diff if n not in theirs or n not in mine]
        if missing:
            return f"tensors present in one copy only: {', '.join(missing[:3])}"
        return f"{len(diff)} of {len(names)} tensors differ, first {diff[0]}" if diff else "same tensors, other order"

    def device(self) -> str:
        """The workers' device (``cpu``, ``cuda``, ...; several if they differ)."""
        return ", ".join(sorted({str(s.info.get("device")) for s in self.slots}))

    # ------------------------------------------------------------------------------------------------ units
    def submit(self, t: Task, done: Callable[[Outcome], None]) -> None:
        self.queue.append(_Pending(self.next_seq, t, done))
        self.next_seq += 1
        self._dispatch()
        if not self.in_callback:  # backpressure: a callback's own submissions are collected by its caller
            while len(self.queue) + len(self.inflight) + len(self.finished) >= self.max_in_flight:
                self._collect()

    def join(self) -> None:
        while self.queue or self.inflight or self.finished:
            self._collect()

    def _dispatch(self) -> None:
        while self.queue:
            i = min(range(len(self.slots)), key=lambda k: len(self.slots[k].running))
            slot = self.slots[i]
            if len(slot.running) >= self.depth:
                return
            p = self.queue.popleft()
            ref = slot.actor.run.remote(p.task)
            slot.running.append(ref)
            self.inflight[ref] = (p, i)

    def _collect(self) -> None:
        """Wait for one task, then run the callbacks that are next in submission order."""
        ray = self.ray
        self._dispatch()
        if self.inflight:
            (ref,), _ = ray.wait(list(self.inflight), num_returns=1)
            p, i = self.inflight.pop(ref)
            slot = self.slots[i]
            slot.running.remove(ref)
            try:
                outcome = ray.get(ref)
            except ray.exceptions.RayActorError as exc:  # the worker process died: retry on a new one
                self._retry(p, i, slot, exc)
                return
            except ray.exceptions.RayTaskError as exc:  # a bug in the unit's computation: as in process
                raise exc.as_instanceof_cause() from None
            self.finished[p.seq] = (p, outcome)
            self._dispatch()
        while self.committed in self.finished:
            p, outcome = self.finished.pop(self.committed)
            self.committed += 1
            self.in_callback = True
            try:
                p.done(outcome)
            finally:
                self.in_callback = False
            self._dispatch()

    def _retry(self, p: _Pending, i: int, slot: _Slot, exc) -> None:
        p.attempts += 1
        if p.attempts > self.retries:
            raise KneuronsError(f"unit {p.task.label or p.seq} failed {p.attempts} times: its Ray worker died each "
                                f"time (last on node {slot.info['host']}: {_first_line(exc)})")
        if self.slots[i] is slot:  # the first of its units to report the death: start a new worker in its place
            if self.replaced >= self.retries * len(self.slots):
                raise KneuronsError(f"Ray workers died {self.replaced + 1} times; stopped at unit "
                                    f"{p.task.label or p.seq} ({_first_line(exc)})")
            self.replaced += 1
            self.log(f"ray: worker pid {slot.info['pid']} on {slot.info['host']} died; starting another")
            self.slots[i] = _Slot(self._new_actor(), {})
            self.slots[i].info = self._ready([self.slots[i].actor])[0]
            for ref, (q, j) in list(self.inflight.items()):  # the dead actor's other units go back to the queue
                if j == i and ref in slot.running:
                    del self.inflight[ref]
                    q.attempts += 1
                    self.retried += 1
                    self.queue.appendleft(q)
            slot.running.clear()
        self.retried += 1
        self.queue.appendleft(p)
        self.queue = collections.deque(sorted(self.queue, key=lambda q: q.seq))
        self._dispatch()

    # ------------------------------------------------------------------------------------------------ end
    def worker_info(self) -> list[dict]:
        """What each current worker reported when it started: pid, host, ip, gpus, device, digest."""
        return [dict(s.info) for s in self.slots]

    def stats(self) -> dict:
        """Workers started (replacements included), workers replaced, unit attempts retried."""
        return {"started": len(self.started), "replaced": self.replaced, "retried": self.retried}

    def close(self) -> None:
        ray = self.ray
        if ray is None:
            return
        for s in self.slots:
            ray.kill(s.actor)
        self.slots = []
        self.queue.clear()
        self.inflight.clear()
        self.finished.clear()
        if self.owns_ray:
            ray.shutdown()
            self.owns_ray = False
        self.ray = None


#: how long a cluster address may take to accept a TCP connection before it is refused
PROBE_TIMEOUT = 10.0


def _probe(address: str) -> None:
    """Refuse at once a ``host:port`` (or ``ray://host:port``) where nothing accepts a connection: Ray itself
    retries such an address for minutes. ``auto`` is Ray's: ``RAY_ADDRESS`` if set (probed the same way), else a
    cluster of this machine (it fails at once without one)."""
    if address == "auto":
        env = os.environ.get("RAY_ADDRESS", "").strip()
        if env and env not in ("auto", "local"):
            try:
                target = parse_address(env)
            except KneuronsError:  # not host:port (e.g. a dashboard URL): Ray's to interpret
                return
            try:
                _probe(target)
            except KneuronsError as exc:
                raise KneuronsError(f"--ray auto uses RAY_ADDRESS={env}: {exc}") from None
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    host = host.strip("[]")  # an IPv6 literal
    try:
        socket.create_connection((host, int(port)), timeout=PROBE_TIMEOUT).close()
    except OSError as exc:
        if isinstance(exc, TimeoutError):
            reason = f"no answer within {PROBE_TIMEOUT:g}s"
        else:
            reason = exc.strerror or type(exc).__name__
        raise KneuronsError(f"no Ray cluster at --ray {address} ({reason}); start one with `ray start --head`, "
                            f"or use --ray local:N") from None


def _resources(res: dict) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in sorted(res.items()) if k in ("CPU", "GPU")) or "none"


def _first_line(exc) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
