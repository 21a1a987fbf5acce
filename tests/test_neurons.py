"""Coarse/refined knowledge neurons, baselines and the result object."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import handle_for
from kneurons.errors import KneuronsError
from kneurons.neurons import (KnowledgeNeurons, activation_baseline, coarse_neurons, locate, random_neurons, refine,
                              refine_adaptive)

PROMPTS = ["the capital of france is ___ .", "france has its capital in ___", "the capital city of france is ___"]


def test_coarse_threshold_topk_absolute():
    s = torch.zeros(3, 5)
    s[0, 1], s[2, 4], s[1, 0], s[1, 2] = 1.0, 0.5, 0.19, -3.0
    assert coarse_neurons(s, 0.2) == [(0, 1), (2, 4)]
    assert coarse_neurons(s, 0.1) == [(0, 1), (1, 0), (2, 4)]
    assert coarse_neurons(s, top_k=1) == [(0, 1)]
    assert coarse_neurons(s, abs_threshold=0.4) == [(0, 1), (2, 4)]
    assert coarse_neurons(torch.zeros(2, 2), 0.2) == []
    for bad in (0, -0.1, 1.5):
        with pytest.raises(KneuronsError, match="threshold"):
            coarse_neurons(s, bad)


def test_refine_sharing_fraction_and_min_prompts():
    a, b, c = (0, 1), (1, 2), (2, 3)
    sets = [[a, b], [a, b], [a, c], [a]]
    assert refine(sets, p=0.7) == [a]  # b in 2/4 = 0.5, not > 0.7
    assert refine(sets, p=0.4) == [a]  # b in 2 of 4 > 0.4, but min_prompts 3 -> only a
    assert refine(sets, p=0.4, min_prompts=2) == [a, b]
    assert refine([[a], [a]], p=0.7, min_prompts=3) == [a]  # min_prompts capped by number of prompts
    with pytest.raises(KneuronsError, match="at least 2"):
        refine([[a]])
    with pytest.raises(KneuronsError, match="p must be"):
        refine(sets, p=0)


def test_refine_adaptive_moves_p_until_2_to_5():
    many = [[(0, i) for i in range(10)]] * 3 + [[(0, i) for i in range(3)]]
    neurons, p = refine_adaptive(many, p=0.5, min_prompts=1)
    assert 2 <= len(neurons) <= 5 and p > 0.5
    few = [[(0, 0), (0, 1)], [(0, 0), (0, 1)], [(0, 0), (0, 1)], [(0, 0)], [(0, 2)]]  # (0, 1) in 3 of 5
    neurons, p = refine_adaptive(few, p=0.7, min_prompts=1)
    assert neurons == [(0, 0), (0, 1)] and p == pytest.approx(0.55)
    stuck = [[(0, 0)], [(0, 0)], [(0, 0)], [(0, 1)], [(0, 2)]]  # 6 rounds of -0.05 cannot reach 2 neurons
    assert refine_adaptive(stuck, p=0.7, min_prompts=1) == ([(0, 0)], pytest.approx(0.4))
    # 8 neurons coarse in every prompt: raising p would empty the set (c > p*n fails for all at p = 1), so the
    # 8 are kept rather than none
    shared = [[(0, i) for i in range(8)]] * 4
    assert refine_adaptive(shared, p=0.7, min_prompts=1) == ([(0, i) for i in range(8)], pytest.approx(0.95))
    assert refine(shared, p=1.0, min_prompts=1) == []


def test_locate_on_tiny_model_and_roundtrip(tmp_path):
    h = handle_for("llama", dtype=torch.float64)
    kn = locate(h, PROMPTS, "paris", steps=5, threshold=0.2, p=0.5, min_prompts=2)
    assert len(kn.coarse) == 3 and all(kn.coarse)
    # refined = coarse in more than half of the prompts
    counts = {}
    for c in kn.coarse:
        for n in c:
            counts[n] = counts.get(n, 0) + 1
    assert kn.neurons == sorted(n for n, k in counts.items() if k >= 2)
    for a, c in zip(kn.attributions, kn.coarse):
        assert c == coarse_neurons(a, 0.2)
    assert all(0 < p <= 1 for p in kn.base_probs)
    path = kn.save(tmp_path / "kn.json")
    back = KnowledgeNeurons.load(path)
    assert back.neurons == kn.neurons and back.coarse == kn.coarse and back.params == kn.params
    assert back.model["model_type"] == "llama" and json.loads(path.read_text())["version"]
    with pytest.raises(KneuronsError, match="exists"):
        kn.save(path)
    df = kn.to_dataframe()
    assert list(df.layer) == [l for l, _ in kn.neurons] and "mean_score" in df
    assert sum(kn.layers().values()) == len(kn)


def test_locate_bad_input():
    h = handle_for("gpt2")
    with pytest.raises(KneuronsError, match="at least 2"):
        locate(h, PROMPTS[:1], "paris")
    with pytest.raises(KneuronsError, match="different facts"):
        locate(h, PROMPTS[:2], ["paris", "berlin"])
    with pytest.raises(KneuronsError, match="threshold"):
        locate(h, PROMPTS, "paris", threshold=1.5)
    with pytest.raises(KneuronsError, match="p must"):
        locate(h, PROMPTS, "paris", p=0)
    with pytest.raises(KneuronsError, match="steps"):
        locate(h, PROMPTS, "paris", steps=0)
    with pytest.raises(KneuronsError, match="blank must end"):
        locate(h, PROMPTS + ["___ is the capital ."], "paris")


def test_activation_baseline_picks_high_activations():
    h = handle_for("gpt2", dtype=torch.float64)
    kn = activation_baseline(h, PROMPTS, "paris", threshold=0.5, p=0.5, min_prompts=2)
    assert kn.method == "activation"
    from kneurons.neurons import blank_activations

    acts = blank_activations(h, PROMPTS[0], "paris")
    assert kn.coarse[0] == coarse_neurons(acts, 0.5)
    for l, i in kn.coarse[0]:
        assert acts[l, i] > 0.5 * acts.max()


def test_random_neurons_seeded_same_count_and_layers():
    h = handle_for("llama")
    like = KnowledgeNeurons([(0, 3), (1, 5), (1, 7)], PROMPTS, "paris", [], [], {}, {})
    r1 = random_neurons(h, like, seed=1)
    r2 = random_neurons(h, like, seed=1)
    r3 = random_neurons(h, like, seed=2)
    assert r1.neurons == r2.neurons and r1.neurons != r3.neurons and len(r1) == 3
    assert not set(r1.neurons) & set(like.neurons)
    same = random_neurons(h, like, seed=0, same_layers=True)
    assert sorted(l for l, _ in same.neurons) == [0, 1, 1]
    assert len(random_neurons(h, 4, seed=0)) == 4
    with pytest.raises(KneuronsError):
        random_neurons(h, 0)


def test_corrupt_neurons_file(tmp_path):
    p = tmp_path / "kn.json"
    p.write_text("{not json")
    with pytest.raises(KneuronsError, match="not a readable"):
        KnowledgeNeurons.load(p)
    p.write_text(json.dumps({"kind": "something else"}))
    with pytest.raises(KneuronsError, match="not a readable"):
        KnowledgeNeurons.load(p)
