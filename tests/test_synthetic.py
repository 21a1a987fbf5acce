"""The synthetic world's training is reproducible: the same weights whatever the process's thread setting."""

from __future__ import annotations

import pytest
import torch

from kneurons.errors import KneuronsError
from kneurons.interventions import weights_digest
from kneurons.synthetic import build_model, make_world, train


@pytest.mark.parametrize("kind", ["causal", "masked"])
def test_training_does_not_depend_on_the_thread_setting(kind):
    world = make_world(n_subjects=12, n_objects=4, relations=["born_in", "speaks"], seed=3)
    before = torch.get_num_threads()
    digests = []
    try:
        for outer in (1, 2):
            torch.set_num_threads(outer)
            tr = train(world, kind, seed=3, steps=60, batch_size=16, target_accuracy=None)
            assert torch.get_num_threads() == outer  # restored
            digests.append(weights_digest(tr.handle.model))
            assert tr.steps == 60
    finally:
        torch.set_num_threads(before)
    assert digests[0] == digests[1]
    # and the result really is the training: a different seed gives other weights
    assert weights_digest(train(world, kind, seed=4, steps=60, batch_size=16, target_accuracy=None)
                          .handle.model) != digests[0]


@pytest.mark.parametrize("kind", ["causal", "masked"])
def test_attention_implementation_is_fixed_at_construction(kind):
    h = build_model(make_world(n_subjects=4, n_objects=2, seed=0), kind)
    assert h.model.config._attn_implementation == "eager"


def test_training_refuses_nonsense():
    with pytest.raises(KneuronsError, match="at least 1"):
        train(make_world(n_subjects=4, n_objects=2, seed=0), "causal", steps=0)
