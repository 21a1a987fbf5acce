import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(scope="session")
def smol():
    """The embedded SmolLM2-135M-Instruct (slow: dequantized once into the kneurons cache)."""
    import kneurons

    return kneurons.load_model("smollm2-135m")
