"""Where a run's units are computed: in this process (the default) or in a pool of workers (Ray, see
:mod:`kneurons.experiments.ray_pool`).

An experiment describes each unit as a :class:`Task` — a module-level function of the loaded model plus the unit's
inputs, picklable, so that a worker process holding its own copy of the model can run it — and hands it to
:meth:`Runner.submit <kneurons.experiments.runner.Runner.submit>` with a callback that stores the result. The
executor is chosen once, before the run starts; every experiment uses it the same way. Callbacks run on the
driver, one at a time, in the order the tasks were submitted, so the driver stays the single writer of the run
store and stores in the same transactions and the same order whichever executor computed the units.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from ..errors import KneuronsError


@dataclass(frozen=True)
class Task:
    """``fn(handle, *args, **kwargs)``: one unit's computation. ``fn`` is a module-level function (workers import
    it by name) and the arguments carry all the data the unit needs; ``label`` names the unit in errors."""

    fn: Callable
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    label: str = ""

    def __call__(self, handle):
        return self.fn(handle, *self.args, **self.kwargs)


def task(fn: Callable, *args, label: str = "", **kwargs) -> Task:
    return Task(fn, args, kwargs, label)


@dataclass(frozen=True)
class Outcome:
    """A task's result: its rows, or the one-line :class:`KneuronsError` it ended with, and its compute time."""

    rows: list | None
    error: str | None
    seconds: float


def compute(t: Task, handle) -> Outcome:
    """Run ``t`` on ``handle``; a :class:`KneuronsError` (the method cannot handle this unit) becomes the outcome's
    ``error``, anything else propagates (a bug: the run stops)."""
    start = time.perf_counter()
    try:
        rows = t(handle)
    except KneuronsError as exc:
        return Outcome(None, str(exc), time.perf_counter() - start)
    return Outcome(rows, None, time.perf_counter() - start)


def constant_rows(handle, rows: list[dict]) -> list[dict]:
    """A task whose rows were decided on the driver (e.g. a fact skipped for want of neurons)."""
    return rows


def refuse(handle, message: str):
    """A task that ends with ``message`` as its error (a unit the method cannot handle)."""
    raise KneuronsError(message)


class InProcess:
    """Units computed at once, in this process, on the run's model: ``submit`` returns after the callback ran."""

    description = "in this process"

    def __init__(self):
        self.handle = None

    def start(self, handle, config, digest: str, log=None) -> None:
        self.handle = handle

    def device(self) -> str:
        return str(self.handle.device)

    def submit(self, t: Task, done: Callable[[Outcome], None]) -> None:
        done(compute(t, self.handle))

    def join(self) -> None:
        pass

    def close(self) -> None:
        self.handle = None
