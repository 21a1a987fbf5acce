"""The one registry of ``kneurons run``'s experiments, in the order they run.

The runner runs them (:meth:`Experiment.run`), the report summarizes and renders them (their ``summarize``,
``render`` and ``figures``), the command line offers their names (``--experiments``). To add an experiment,
write its module (the computation of one unit, a ``run(runner)`` that stores each unit through
``runner.unit(...)``, and an :class:`Experiment` entry) and :func:`register_experiment` it — see CONTRIBUTING.md.
"""

from __future__ import annotations

from ..errors import KneuronsError
from . import activations, assess, erase, locate, suppress, update
from .common import Experiment

EXPERIMENTS: dict[str, Experiment] = {e.name: e for e in (assess.EXPERIMENT, locate.EXPERIMENT, suppress.EXPERIMENT,
                                                           activations.EXPERIMENT, update.EXPERIMENT,
                                                           erase.EXPERIMENT)}


def register_experiment(experiment: Experiment, replace: bool = False) -> Experiment:
    """Add ``experiment`` to the registry (after the others); its ``needs`` must be registered already."""
    if not isinstance(experiment, Experiment):
        raise KneuronsError(f"register an Experiment, got {type(experiment).__name__}")
    if experiment.name in EXPERIMENTS and not replace:
        raise KneuronsError(f"experiment {experiment.name!r} is already registered (pass replace=True)")
    missing = [n for n in experiment.needs if n not in EXPERIMENTS]
    if missing:
        raise KneuronsError(f"experiment {experiment.name!r} needs unregistered experiment(s) {', '.join(missing)}")
    EXPERIMENTS[experiment.name] = experiment
    return experiment


def names() -> list[str]:
    return list(EXPERIMENTS)


def plan(chosen) -> list[Experiment]:
    """The experiments to run for the names ``chosen``, with what they need, in registry order."""
    unknown = [n for n in chosen if n not in EXPERIMENTS]
    if unknown:
        raise KneuronsError(f"unknown experiment(s) {', '.join(unknown)}; known: {', '.join(EXPERIMENTS)}")
    wanted: set[str] = set()

    def add(name):
        if name not in wanted:
            wanted.add(name)
            for dep in EXPERIMENTS[name].needs:
                add(dep)

    for n in chosen:
        add(n)
    return [e for name, e in EXPERIMENTS.items() if name in wanted]
