"""The built-in fact set and its loader (no model needed)."""

import json

import pytest

from kneurons.data import Fact, FactSet, Relation, is_causal_template, load_facts
from kneurons.errors import KneuronsError


@pytest.fixture(scope="module")
def facts() -> FactSet:
    return load_facts()


def test_packaged_counts(facts):
    assert len(facts.relations) >= 12
    assert len(facts.facts()) >= 80
    ids = [r.id for r in facts.relations]
    assert len(ids) == len(set(ids))
    for r in facts.relations:
        assert r.type in ("1-1", "N-1", "N-M")
        assert len(r.templates) >= 4, r.id
        assert len(r.causal_templates) >= 4, r.id
        assert r.facts, r.id
        for t in r.templates:
            assert t.count("[X]") == 1 and t.count("[Y]") == 1, t
        for f in r.facts:
            assert f.relation == r.id and f.subject.strip() and f.object.strip()


def test_relation_lookup_and_facts(facts):
    rel = facts.relation("capital_of")
    assert isinstance(rel, Relation)
    assert Fact("capital_of", "France", "Paris") in rel.facts
    assert facts.facts("capital_of") == rel.facts
    assert len(facts.facts()) == sum(len(r.facts) for r in facts.relations) == len(facts)
    with pytest.raises(KneuronsError, match="unknown relation"):
        facts.relation("no_such_relation")


def test_prompts_substitution_and_causal_filter():
    rel = Relation("r", "test", "1-1", ["The capital of [X] is [Y].", "[Y] is the capital of [X].",
                                        "[X]'s capital: [Y]", "In [X], the capital is \"[Y]\"!"], [])
    fact = Fact("r", "France", "Paris")
    allp = rel.prompts(fact, causal=False)
    assert allp == ["The capital of France is [Y].", "[Y] is the capital of France.",
                    "France's capital: [Y]", "In France, the capital is \"[Y]\"!"]
    assert all("[X]" not in p and p.count("[Y]") == 1 for p in allp)
    assert rel.prompts(fact, causal=True) == ["The capital of France is [Y].", "France's capital: [Y]",
                                              "In France, the capital is \"[Y]\"!"]
    assert rel.prompts("Spain", causal=True)[0] == "The capital of Spain is [Y]."
    assert is_causal_template("A [X] is a [Y] .  ") and not is_causal_template("[Y] is [X].")


def test_packaged_prompts(facts):
    rel = facts.relation("capital_of")
    fact = rel.facts[0]
    causal = rel.prompts(fact, causal=True)
    assert causal and all(p.rstrip(" .").endswith("[Y]") for p in causal)
    assert fact.subject in causal[0]
    assert len(rel.prompts(fact)) == len(rel.templates) > len(causal)


def test_to_dataframe(facts):
    df = facts.to_dataframe()
    assert len(df) == len(facts.facts())
    assert {"relation", "subject", "object", "type"} <= set(df.columns)
    assert df["relation"].nunique() == len(facts.relations)


def _write(tmp_path, data, name="f.json"):
    p = tmp_path / name
    p.write_text(json.dumps(data) if not isinstance(data, str) else data, encoding="utf-8")
    return p


def _good():
    return {"version": 1, "relations": [{"id": "capital_of", "label": "capital", "type": "1-1",
                                          "templates": ["The capital of [X] is [Y].", "[Y] is the capital of [X]."],
                                          "facts": [{"subject": "France", "object": "Paris"}]}]}


def test_load_from_path(tmp_path):
    fs = load_facts(_write(tmp_path, _good()))
    assert fs.facts() == [Fact("capital_of", "France", "Paris")]
    assert load_facts(str(_write(tmp_path, _good(), "g.json"))).relation("capital_of").label == "capital"


def _one_line(err):
    msg = str(err.value)
    assert "\n" not in msg and msg
    return msg


def test_missing_file(tmp_path):
    with pytest.raises(KneuronsError, match="not found") as e:
        load_facts(tmp_path / "nope.json")
    _one_line(e)


def test_invalid_json(tmp_path):
    with pytest.raises(KneuronsError, match="invalid JSON") as e:
        load_facts(_write(tmp_path, '{"relations": [\n  {"id": "x",\n'))
    _one_line(e)


@pytest.mark.parametrize("template, what", [
    ("The capital of France is [Y].", r"exactly one \[X\] and one \[Y\]"),
    ("The capital of [X] is Paris.", r"exactly one \[X\] and one \[Y\]"),
    ("[X] and [X] have capital [Y].", r"exactly one \[X\] and one \[Y\]"),
    ("The capital of [X] is [Y] or [Y].", r"exactly one \[X\] and one \[Y\]"),
])
def test_bad_template(tmp_path, template, what):
    data = _good()
    data["relations"][0]["templates"].append(template)
    with pytest.raises(KneuronsError, match=what) as e:
        load_facts(_write(tmp_path, data))
    assert "capital_of" in _one_line(e)


@pytest.mark.parametrize("obj", ["", "   ", None])
def test_empty_object(tmp_path, obj):
    data = _good()
    data["relations"][0]["facts"].append({"subject": "Spain", "object": obj})
    with pytest.raises(KneuronsError, match="object") as e:
        load_facts(_write(tmp_path, data))
    assert "Spain" in _one_line(e)


@pytest.mark.parametrize("mutate, what", [
    (lambda d: d.pop("relations"), "relations"),
    (lambda d: d["relations"][0].update(type="many"), "type"),
    (lambda d: d["relations"][0].update(templates=[]), "templates"),
    (lambda d: d["relations"][0].update(facts=[]), "facts"),
    (lambda d: d["relations"][0]["facts"].append({"subject": "", "object": "X"}), "subject"),
    (lambda d: d["relations"].append(json.loads(json.dumps(d["relations"][0]))), "duplicate"),
])
def test_other_structure_errors(tmp_path, mutate, what):
    data = _good()
    mutate(data)
    with pytest.raises(KneuronsError, match=what) as e:
        load_facts(_write(tmp_path, data))
    _one_line(e)


def test_top_level_not_object(tmp_path):
    with pytest.raises(KneuronsError, match="top level"):
        load_facts(_write(tmp_path, "[1, 2]"))
