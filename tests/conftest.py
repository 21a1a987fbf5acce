import os
import platform
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

# The suite trains tiny models (tests/worlds.py, the synthetic_run fixture) and asserts what they learned. Their
# training is deterministic on one machine, but ATen picks its vectorised kernels (softmax, norms, reductions) by the
# CPU: on an AVX-512 machine the same seeds trained other models than on an AVX2 one (the masked world model learned
# its facts worse, and thin-margin claims flipped). Pinning ATen's AVX2 kernels — before torch is imported, for this
# process and the commands and Ray workers it starts — makes them the same models on both kinds of x86-64 machine.
# An explicit ATEN_CPU_CAPABILITY is kept.
if platform.machine().lower() in ("x86_64", "amd64"):
    os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")


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
