"""A small real run for tests: a tiny model trained on a synthetic fact world, written in the PARAREL layout."""

from __future__ import annotations

from pathlib import Path

from kneurons.experiments import RunConfig, run
from kneurons.synthetic import TRAINING, make_world, train_model

RELATIONS = ["born_in", "citizen_of", "works_as", "speaks"]


def world_and_model(base: Path, kind: str = "causal"):
    """Train and save a tiny model and its world's data under ``base``; returns (world, handle). Trained with
    the science tests' settings (``TRAINING``: on one thread, so the model is the same at any thread setting of the
    test process)."""
    world = make_world(n_subjects=30, n_objects=5, relations=RELATIONS, seed=0)
    h = train_model(world, kind, seed=0, **TRAINING[kind])
    world.to_pararel(base / "data")
    h.model.save_pretrained(base / "model")
    h.tokenizer.save_pretrained(base / "model")
    return world, h


def config(base: Path, **kw) -> RunConfig:
    settings = dict(model=str(base / "model"), data=str(base / "data"), facts_per_relation=5,
                    erase_relations=["born_in", "speaks"], erase_top_k=5, min_prompts=2)
    settings.update(kw)
    return RunConfig(**settings)


def make_run(base: Path, handle=None, **kw):
    """Run every experiment into ``base/run`` (the model is loaded from disk unless ``handle`` is given)."""
    return run(config(base, **kw), base / "run", handle=handle, progress=False)
