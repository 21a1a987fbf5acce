"""What a neuron writes (kneurons.explain_neurons, kneurons explain): the value slot read through the model's own
output head equals the head written out by hand; activations equal the blank activations; the most active facts are
ordered by activation (batched scoring sees no padding)."""

from __future__ import annotations

import json

import pytest
import torch

import kneurons
from helpers import handle_for, word_tokenizer
from kneurons.cli import main
from kneurons.data import Fact, FactSet, Relation
from kneurons.errors import KneuronsError
from kneurons.explain import explain_neurons, fact_activations, fact_prompts, vocabulary_projection
from kneurons.neurons import blank_activations
from tiny import tiny_model

NEURONS = [(1, 5), (0, 3), (1, 40)]


def _by_hand(h, v: torch.Tensor) -> torch.Tensor:
    """The output head of each tiny model written out: final norm (or BERT's MLM transform) then unembedding."""
    m = h.model
    if h.model_type == "llama":
        return m.lm_head(m.model.norm(v))
    if h.model_type == "gpt2":
        return m.lm_head(m.transformer.ln_f(v))
    if h.model_type == "bert":
        return m.cls.predictions.decoder(m.cls.predictions.transform(v))
    raise AssertionError(h.model_type)


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "bert"])
def test_vocabulary_projection_is_the_head_written_out(model_type):
    h = handle_for(model_type, dtype=torch.float64)
    got = vocabulary_projection(h, NEURONS)
    for row, (l, i) in zip(got, sorted(NEURONS)):
        v = h.arch.value_slots(l)[i].detach()
        with torch.no_grad():
            ref = _by_hand(h, v[None, None])[0, 0]
        assert torch.allclose(row.double(), ref, rtol=1e-5, atol=1e-6)


def _facts() -> FactSet:
    rel = Relation("capital", "capital", "1-1", ["the capital of [X] is [Y] .", "[X] has its capital in [Y]"])
    rel.facts = [Fact("capital", s, o) for s, o in
                 (("france", "paris"), ("italy", "rome"), ("germany", "berlin"), ("spain", "madrid"))]
    lang = Relation("speaks", "language", "N-1", ["[X] speaks [Y]"], [Fact("speaks", "france", "french"),
                                                                     Fact("speaks", "germany", "german")])
    return FactSet([rel, lang])


def test_explain_neurons_columns_and_values():
    h = handle_for("llama", dtype=torch.float64)
    prompt = "the capital of france is ___ ."
    df = explain_neurons(h, NEURONS, top_k=4, prompt=prompt, target="paris", facts=_facts(), top_facts=3)
    assert list(zip(df.layer, df.neuron)) == sorted(NEURONS)
    acts = blank_activations(h, prompt, "paris")
    logits = vocabulary_projection(h, NEURONS)
    items = fact_prompts(h, _facts())
    # causal: the first template whose blank ends the prompt; one item per fact
    assert [p for _, p, _ in items][:2] == ["the capital of france is [Y] .", "the capital of italy is [Y] ."]
    assert len(items) == 6
    one_by_one = torch.stack([blank_activations(h, p, t) for _, p, t in items])
    assert torch.allclose(fact_activations(h, items).double(), one_by_one.double(), atol=1e-6)  # padding changes nothing
    for r, row in df.iterrows():
        l, i = row.layer, row.neuron
        assert row.activation == pytest.approx(float(acts[l, i]))
        assert row.promote_logits == pytest.approx(logits[r].topk(4).values.tolist(), rel=1e-6)
        assert row.demote_logits == pytest.approx(logits[r].topk(4, largest=False).values.tolist(), rel=1e-6)
        assert row.promote_logits == sorted(row.promote_logits, reverse=True)
        order = one_by_one[:, l, i].argsort(descending=True)[:3].tolist()
        assert row.top_facts == [items[j][0] for j in order]
        assert row.top_fact_activations == sorted(row.top_fact_activations, reverse=True)
        assert row.slot_norm == pytest.approx(float(h.arch.value_slots(l)[i].detach().norm()))


def test_explain_takes_a_located_set_and_its_prompt():
    h = handle_for("llama")
    kn = kneurons.locate(h, ["the capital of france is ___ .", "france has its capital in ___",
                             "the capital city of france is ___"], "paris", steps=3, p=0.3, min_prompts=1)
    assert kn.neurons
    df = kneurons.explain_neurons(h, kn, top_k=2, top_facts=0)
    acts = blank_activations(h, kn.prompts[0], "paris")
    assert list(zip(df.layer, df.neuron)) == kn.neurons
    assert list(df.activation) == pytest.approx([float(acts[l, i]) for l, i in kn.neurons])
    assert "top_facts" not in df


@pytest.mark.parametrize("kwargs, fragment", [
    ({"top_k": 0}, "top_k must be"),
    ({"top_k": True}, "top_k must be"),
    ({"top_facts": -1}, "top_facts must be"),
    ({"neurons": [(0, 999)]}, "out of range"),
    ({"neurons": []}, "empty neuron set"),
    ({"prompt": "the capital of france is ___ ."}, "needs its target"),
    ({"prompt": "no blank", "target": "paris"}, "no blank"),
    ({"facts": ["not", "a", "fact set"]}, "FactSet"),
])
def test_explain_bad_input(kwargs, fragment):
    h = handle_for("llama")
    kwargs = {"neurons": NEURONS, **kwargs}
    with pytest.raises(KneuronsError, match=None) as exc:
        explain_neurons(h, kwargs.pop("neurons"), **kwargs)
    assert fragment in str(exc.value) and "\n" not in str(exc.value)


def test_explain_command(tmp_path, capsys):
    model = tmp_path / "model"
    tiny_model("llama").save_pretrained(model)
    word_tokenizer("causal").save_pretrained(model)
    kn_file = tmp_path / "kn.json"
    kn_file.write_text(json.dumps({"kind": "kneurons.KnowledgeNeurons", "target": "paris",
                                   "prompts": ["the capital of france is ___ ."], "neurons": [[0, 3], [1, 5]],
                                   "coarse": [], "params": {}, "model": {"n_layers": 2, "d_ff": 48}}))
    code = main(["explain", "--model", str(model), "--neurons", str(kn_file), "--top-k", "3", "--top-facts", "0"])
    out, err = capsys.readouterr()
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0].split() == ["layer", "neuron", "activation", "promotes", "demotes"]
    assert [ln.split()[:2] for ln in lines[2:4]] == [["0", "3"], ["1", "5"]]
    assert "'the capital of france is ___ .'" in lines[-1]
    h = kneurons.load_model(str(model))
    ref = explain_neurons(h, [(0, 3), (1, 5)], top_k=3, prompt="the capital of france is ___ .", target="paris",
                          top_facts=0)
    assert " ".join(repr(t) for t in ref.promotes[0]) in lines[2]
    code = main(["explain", "--model", str(model), "--neurons", str(kn_file), "--top-k", "2"])
    out, err = capsys.readouterr()
    assert code == 0 and "most active on" in out.splitlines()[0]
