import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture
def one_thread():
    """Run the test on one torch thread (engine comparisons at float64 round-off), restoring the setting after."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def smol():
    """The embedded SmolLM2-135M-Instruct (slow: dequantized once into the kneurons cache)."""
    import kneurons

    return kneurons.load_model("smollm2-135m")


@pytest.fixture(scope="session")
def synthetic_run(tmp_path_factory):
    """A complete run of every experiment on a tiny GPT-2-type model trained on a synthetic world (~1 min).
    Returns the base directory: ``data/``, ``model/``, ``run/``."""
    from runs import make_run, world_and_model

    base = tmp_path_factory.mktemp("synthetic-run")
    _, handle = world_and_model(base)
    make_run(base, handle=handle)
    return base
