"""PARAREL, CounterFact, zsRE and BingRel loaders (no model needed).

Most tests use small files written to tmp_path; the real-data tests read ../shared/data and are skipped
when that folder is missing.
"""

import gzip
import json
from pathlib import Path

import pytest

from kneurons.data import Fact, FactSet, Relation
from kneurons.data.bingrel import BingRelBags, load_bingrel
from kneurons.data.editing import EditCase, load_counterfact, load_zsre
from kneurons.data.pararel import Pararel, load_pararel
from kneurons.errors import KneuronsError
from kneurons.prompts import parse_cloze

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not (SHARED / "pararel" / "query_pairs.json").is_file(),
                                  reason=f"shared data folder not present at {SHARED}")


# ------------------------------------------------------------------------------------------------ fixtures

PAIRS = {
    "P19": [["Alice Smith", "Paris"], ["Bob Jones", "Rome"]],
    "P36": [["France", "Paris"]],
    "P999": [["Nothing", "Here"]],          # no pattern file: dropped
}
PATTERNS = {
    "P19": ["[X] was born in [Y].", "[Y] is the birthplace of [X].", "[X] is originally from [Y] ."],
    "P36": ["The capital of [X] is [Y].", "[X]'s capital is \"[Y]\"!", "[Y], the capital of [X], is nice."],
    "P1": ["[X] is a [Y]."],                # pattern file but no facts: dropped
}
META = [
    {"relation": "P19", "template": "[X] was born in [Y] .", "label": "place of birth", "type": "N-1"},
    {"relation": "P36", "template": "The capital of [X] is [Y] .", "label": "capital", "type": "1-1"},
    {"relation": "P1", "template": "[X] is [Y] .", "label": "other", "type": "N-M"},
]


def _write_jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def make_pararel(root: Path, pairs=PAIRS, patterns=PATTERNS, meta=META) -> Path:
    d = root / "pararel"
    (d / "patterns").mkdir(parents=True)
    (d / "query_pairs.json").write_text(json.dumps(pairs), encoding="utf-8")
    for rid, pats in patterns.items():
        _write_jsonl(d / "patterns" / f"{rid}.jsonl",
                     [{"pattern": p, "lemma": "x", "extended_lemma": "x", "tense": "present"} for p in pats])
    if meta is not None:
        _write_jsonl(root / "lama" / "relations.jsonl", meta)
    return d


@pytest.fixture
def small(tmp_path) -> Pararel:
    return load_pararel(make_pararel(tmp_path))


# ------------------------------------------------------------------------------------------------ PARAREL

def test_small_pararel_structure(small):
    assert small.relations == ["P19", "P36"]          # query_pairs order; P999 (no patterns), P1 (no facts) dropped
    r = small.relation("P19")
    assert isinstance(r, Relation)
    assert (r.label, r.type) == ("place of birth", "N-1")
    assert small.relation("P36").type == "1-1"
    assert r.templates == PATTERNS["P19"]
    assert small.facts("P19") == [Fact("P19", "Alice Smith", "Paris"), Fact("P19", "Bob Jones", "Rome")]
    assert len(small.facts()) == len(small) == 3
    assert small.summary() == {"relations": 2, "facts": 3, "templates": 6, "causal_templates": 4,
                               "prompts": 2 * 3 + 1 * 3, "causal_prompts": 2 * 2 + 1 * 2}
    assert "2 relations" in repr(small)


def test_small_pararel_prompts_and_causal_filter(small):
    assert small.prompts("P19", "Alice Smith") == ["Alice Smith was born in [Y].",
                                                   "[Y] is the birthplace of Alice Smith.",
                                                   "Alice Smith is originally from [Y] ."]
    assert small.prompts("P19", "Alice Smith", causal=True) == ["Alice Smith was born in [Y].",
                                                                "Alice Smith is originally from [Y] ."]
    assert small.prompts("P36", Fact("P36", "France", "Paris"), causal=True) == [
        "The capital of France is [Y].", "France's capital is \"[Y]\"!"]
    for p in small.prompts("P36", "France"):
        c = parse_cloze(p)
        assert "[X]" not in p and "France" in c.before + c.after
    assert small.causal_template_counts() == {"P19": (2, 3), "P36": (2, 3)}


def test_small_pararel_dataframe_and_factset(small):
    df = small.to_dataframe()
    assert list(df.columns) == ["relation", "label", "type", "subject", "object", "n_templates",
                                "n_causal_templates"]
    assert len(df) == 3
    row = df[df.subject == "France"].iloc[0]
    assert (row.relation, row.type, row.n_templates, row.n_causal_templates) == ("P36", "1-1", 3, 2)
    fs = small.to_factset()
    assert isinstance(fs, FactSet) and fs.relation_ids == ["P19", "P36"] and len(fs) == 3


def test_relation_filter_and_metadata_options(tmp_path):
    d = make_pararel(tmp_path)
    only = load_pararel(d, relations=["P36"])
    assert only.relations == ["P36"]
    assert load_pararel(d, relations="P19").relations == ["P19"]
    # explicit metadata path
    other = tmp_path / "meta.jsonl"
    _write_jsonl(other, [{"relation": "P19", "label": "born", "type": "N-M"}])
    pr = load_pararel(d, lama_relations=other)
    assert (pr.relation("P19").label, pr.relation("P19").type) == ("born", "N-M")
    assert (pr.relation("P36").label, pr.relation("P36").type) == ("", "")   # not in that file
    pr = load_pararel(d, lama_relations=False)
    assert pr.relation("P19").label == "" and pr.summary()["facts"] == 3


def test_blank_lines_in_patterns_are_ignored(tmp_path):
    d = make_pararel(tmp_path)
    f = d / "patterns" / "P19.jsonl"
    f.write_text("\n" + f.read_text() + "\n\n", encoding="utf-8")
    assert len(load_pararel(d).relation("P19").templates) == 3


def _err(match, fn, *a, **k):
    with pytest.raises(KneuronsError, match=match) as ei:
        fn(*a, **k)
    assert "\n" not in str(ei.value)
    return str(ei.value)


def test_pararel_errors_missing(tmp_path):
    _err("PARAREL directory not found", load_pararel, tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    _err("query pairs file not found", load_pararel, tmp_path / "empty")
    d = make_pararel(tmp_path / "a")
    _err("relation metadata file not found", load_pararel, d, lama_relations=tmp_path / "none.jsonl")
    d2 = make_pararel(tmp_path / "b", meta=None)
    msg = _err("relation metadata file not found", load_pararel, d2)
    assert "lama_relations=False" in msg
    d3 = make_pararel(tmp_path / "c")
    for f in (d3 / "patterns").iterdir():
        f.unlink()
    (d3 / "patterns").rmdir()
    _err("patterns directory not found", load_pararel, d3)
    d4 = make_pararel(tmp_path / "d", patterns={"P1": ["[X] is [Y]."]})
    _err("no relation of query_pairs.json has patterns", load_pararel, d4)


def test_pararel_errors_bad_json(tmp_path):
    d = make_pararel(tmp_path / "a")
    (d / "query_pairs.json").write_text('{"P19": [["a", "b"],}', encoding="utf-8")
    msg = _err("invalid JSON in .*query_pairs.json", load_pararel, d)
    assert "line 1" in msg
    d = make_pararel(tmp_path / "b")
    f = d / "patterns" / "P36.jsonl"
    f.write_text(f.read_text() + '{"pattern": "[X] is [Y]."\n', encoding="utf-8")
    _err(r"invalid JSON in .*P36.jsonl line 4", load_pararel, d)
    d = make_pararel(tmp_path / "c")
    (tmp_path / "c" / "lama" / "relations.jsonl").write_text('{"relation": "P19"\n', encoding="utf-8")
    _err(r"invalid JSON in .*relations.jsonl line 1", load_pararel, d)


def test_pararel_errors_bad_content(tmp_path):
    d = make_pararel(tmp_path / "a", pairs={"P19": [["Alice", "Paris", "extra"]]})
    _err("fact #0 must be a \\[subject, object\\] pair", load_pararel, d)
    d = make_pararel(tmp_path / "b", pairs={"P19": [["", "Paris"]]})
    _err("fact #0", load_pararel, d)
    d = make_pararel(tmp_path / "c", pairs=[["a", "b"]])
    _err("top level must be a non-empty object", load_pararel, d)
    d = make_pararel(tmp_path / "d", pairs={"P19": "Alice"})
    _err("must map to a list", load_pararel, d)
    d = make_pararel(tmp_path / "e", meta=[{"relation": "P19", "label": "x", "type": "1-N"}])
    _err(r"relations.jsonl line 1: type '1-N'", load_pararel, d)
    d = make_pararel(tmp_path / "f", meta=[{"label": "x", "type": "N-1"}])
    _err("'relation' is missing", load_pararel, d)
    d = make_pararel(tmp_path / "g")
    _write_jsonl(d / "patterns" / "P19.jsonl", [{"lemma": "x"}])
    _err(r"P19.jsonl line 1: pattern is missing", load_pararel, d)


@pytest.mark.parametrize("bad", ["[X] was born.", "born in [Y].", "[X] and [X] in [Y].", "[X] in [Y] or [Y]."])
def test_pararel_template_must_have_one_x_and_one_y(tmp_path, bad):
    d = make_pararel(tmp_path, patterns={"P19": ["[X] was born in [Y].", bad]})
    _err(r"P19.jsonl line 2: template .* must hold exactly one \[X\] and one \[Y\]", load_pararel, d)


def test_pararel_unknown_relation(tmp_path, small):
    _err("unknown relation 'P5'", small.relation, "P5")
    _err("unknown relation 'P5'", small.facts, "P5")
    _err("unknown relation 'P5'", small.prompts, "P5", "Alice")
    d = make_pararel(tmp_path / "other")
    _err("unknown relation 'P5'", load_pararel, d, relations=["P5"])
    _err("relation 'P999' has no pattern file", load_pararel, d, relations=["P999"])


# ------------------------------------------------------------------------------------------------ editing

CF = [
    {"case_id": 7, "prompt": "David Robinson professionally plays the sport", "target_new": "baseball",
     "subject": "David Robinson", "ground_truth": "basketball",
     "rephrase_prompt": "David Robinson is a professional", "locality_prompt": "Shaquille O'Neal plays",
     "locality_ground_truth": "basketball"},
    {"case_id": 8, "prompt": "{} is located in", "target_new": "Venezuela", "subject": "Kenya Union",
     "ground_truth": "Kenya", "rephrase_prompt": ["The HQ of {} is in", "{} sits in"],
     "locality_prompt": ["Kitale, located in", "Nairobi is in"], "locality_ground_truth": "Kenya"},
]
ZS = [
    {"subject": "UniFirst", "src": "What is the product made by UniFirst?", "pred": "uniforms",
     "rephrase": "What will be the product of UniFirst?", "alt": "unmanned aircraft", "answers": ["uniform"],
     "loc": "nq question: who broke away from ___ control", "loc_ans": "Dutch",
     "cond": "uniforms >> unmanned aircraft || What is the product made by UniFirst?"},
    {"subject": "Michaela S", "src": "What gender is Michaela S?", "pred": "female",
     "rephrase": "Which sex is Michaela S?", "alt": "", "answers": [],
     "loc": "nq question: who plays the cat in the hat movie", "loc_ans": "Mike Myers"},
]


def _write(tmp_path, name, obj) -> Path:
    p = tmp_path / name
    p.write_text(json.dumps(obj), encoding="utf-8")
    return p


def test_counterfact_normalization(tmp_path):
    cases = load_counterfact(_write(tmp_path, "cf.json", CF))
    assert len(cases) == 2 and all(isinstance(c, EditCase) for c in cases)
    a, b = cases
    assert (a.case_id, a.subject, a.prompt, a.target_true, a.target_new) == (
        7, "David Robinson", "David Robinson professionally plays the sport", "basketball", "baseball")
    assert a.rephrase_prompts == ["David Robinson is a professional"]
    assert a.locality_prompts == ["Shaquille O'Neal plays"] and a.locality_answers == ["basketball"]
    assert b.prompt == "Kenya Union is located in"                      # {} -> subject
    assert b.rephrase_prompts == ["The HQ of Kenya Union is in", "Kenya Union sits in"]
    assert b.locality_answers == ["Kenya", "Kenya"]                      # one answer shared
    assert a.cloze() == "David Robinson professionally plays the sport [Y]"
    cl = parse_cloze(b.cloze())
    assert cl.before == "Kenya Union is located in " and cl.after == ""
    assert b.clozes() == {"reliability": ["Kenya Union is located in [Y]"],
                          "generalization": ["The HQ of Kenya Union is in [Y]", "Kenya Union sits in [Y]"],
                          "locality": [("Kitale, located in [Y]", "Kenya"), ("Nairobi is in [Y]", "Kenya")]}


def test_zsre_normalization(tmp_path):
    p = _write(tmp_path, "zs.json", ZS)
    a, b = load_zsre(p)
    assert (a.case_id, a.subject, a.prompt) == (0, "UniFirst", "What is the product made by UniFirst?")
    assert a.target_true == "uniform" and a.target_new == "unmanned aircraft"      # answers[0], not pred
    assert a.meta["pred"] == "uniforms" and a.meta["answers"] == ["uniform"] and "cond" in a.meta
    assert a.rephrase_prompts == ["What will be the product of UniFirst?"]
    assert a.locality_prompts == ["nq question: who broke away from ___ control"]
    assert a.locality_answers == ["Dutch"]
    assert a.cloze() == "What is the product made by UniFirst? [Y]"
    loc_cloze, ans = a.clozes()["locality"][0]
    assert ans == "Dutch" and parse_cloze(loc_cloze).after == ""                  # '___' neutralized
    assert loc_cloze == "nq question: who broke away from __ control [Y]"
    assert (b.case_id, b.target_true, b.target_new) == (1, "female", "")          # pred fallback; empty alt kept
    assert [c.case_id for c in load_zsre(p, drop_empty_targets=True)] == [0]
    assert load_zsre(p, strip_nq_prefix=True)[1].locality_prompts == ["who plays the cat in the hat movie"]


def test_cloze_neutralizes_blank_markers():
    c = EditCase(1, "S", "S is [MASK] or [Y]", "a", "b")
    assert c.cloze() == "S is (MASK) or (Y) [Y]"
    assert parse_cloze(c.cloze()).after == ""
    with pytest.raises(KneuronsError, match="empty prompt"):
        c.cloze("   ")


@pytest.mark.parametrize("field", ["case_id", "prompt", "subject", "ground_truth", "target_new",
                                   "rephrase_prompt", "locality_prompt", "locality_ground_truth"])
def test_counterfact_missing_field(tmp_path, field):
    rec = dict(CF[1])
    del rec[field]
    msg = _err(f"field '{field}'", load_counterfact, _write(tmp_path, "cf.json", [CF[0], rec]))
    assert "case #1" in msg
    if field != "case_id":
        assert "case_id 8" in msg


def test_counterfact_other_errors(tmp_path):
    _err("CounterFact file not found", load_counterfact, tmp_path / "none.json")
    p = tmp_path / "bad.json"
    p.write_text('[{"case_id": 1,,}]', encoding="utf-8")
    _err("invalid JSON in .*bad.json.*line 1", load_counterfact, p)
    _err("top level must be a list", load_counterfact, _write(tmp_path, "d.json", {"a": 1}))
    _err("case #0 is not an object", load_counterfact, _write(tmp_path, "s.json", ["x"]))
    rec = dict(CF[0], prompt="Someone plays the sport")
    _err("case #0 \\(case_id 7\\): field 'prompt' does not contain the subject", load_counterfact,
         _write(tmp_path, "n.json", [rec]))
    rec = dict(CF[1], locality_ground_truth=["a", "b", "c"])
    _err("3 answers for 2 locality prompts", load_counterfact, _write(tmp_path, "l.json", [rec]))
    rec = dict(CF[0], target_new="  ")
    _err("field 'target_new' is missing or empty", load_counterfact, _write(tmp_path, "e.json", [rec]))


@pytest.mark.parametrize("field", ["subject", "src", "rephrase", "alt", "loc", "loc_ans"])
def test_zsre_missing_field(tmp_path, field):
    rec = dict(ZS[0])
    del rec[field]
    msg = _err(f"field '{field}'", load_zsre, _write(tmp_path, "zs.json", [ZS[1], rec]))
    assert "case #1" in msg


def test_zsre_other_errors(tmp_path):
    _err("zsRE file not found", load_zsre, tmp_path / "none.json")
    rec = {k: v for k, v in ZS[0].items() if k not in ("answers", "pred")}
    _err("case #0: field 'answers' \\(or 'pred'\\)", load_zsre, _write(tmp_path, "a.json", [rec]))
    rec = dict(ZS[0], answers="uniform")
    _err("field 'answers' must be a list", load_zsre, _write(tmp_path, "b.json", [rec]))
    rec = dict(ZS[0], src="What does it make?")
    _err("field 'src' does not contain the subject", load_zsre, _write(tmp_path, "c.json", [rec]))


# ------------------------------------------------------------------------------------------------ BingRel

def _write_bingrel(d: Path, rel: str, entries) -> None:
    d.mkdir(parents=True, exist_ok=True)
    with gzip.open(d / f"final_distant_allbags_{rel}_new.json.gz", "wt", encoding="utf-8") as fh:
        json.dump(entries, fh)


def test_bingrel_small(tmp_path):
    d = tmp_path / "bingrel"
    entries = [{"th_bags": ["Alice Smith was born in Paris."], "h_bags": ["Alice Smith is a cyclist."]},
               {"th_bags": [], "h_bags": []}]
    _write_bingrel(d, "P19", entries)
    bags = load_bingrel(d, "P19", n_facts=2)
    assert bags == [BingRelBags(["Alice Smith was born in Paris."], ["Alice Smith is a cyclist."]),
                    BingRelBags([], [])]
    assert load_bingrel(d, "P19") == bags


def test_bingrel_errors(tmp_path):
    d = tmp_path / "bingrel"
    _err("BingRel directory not found", load_bingrel, d, "P19")
    _write_bingrel(d, "P19", [{"th_bags": [], "h_bags": []}])
    _err("BingRel file for relation 'P36' not found", load_bingrel, d, "P36")
    _err("1 entries but relation 'P19' has 2 facts", load_bingrel, d, "P19", n_facts=2)
    _err("bad relation id", load_bingrel, d, "../P19")
    _write_bingrel(d, "P20", [{"th_bags": ["x"]}])
    _err("entry #0: field 'h_bags'", load_bingrel, d, "P20")
    _write_bingrel(d, "P21", {"th_bags": []})
    _err("top level must be a list", load_bingrel, d, "P21")
    (d / "final_distant_allbags_P22_new.json.gz").write_bytes(b"not gzip")
    _err("cannot read BingRel file", load_bingrel, d, "P22")
    with gzip.open(d / "final_distant_allbags_P23_new.json.gz", "wt") as fh:
        fh.write("[{]")
    _err("invalid JSON in .*P23", load_bingrel, d, "P23")


# ------------------------------------------------------------------------------------------------ real data

@pytest.fixture(scope="module")
def real() -> Pararel:
    if not (SHARED / "pararel" / "query_pairs.json").is_file():
        pytest.skip(f"shared data folder not present at {SHARED}")
    return load_pararel(SHARED / "pararel")


@needs_shared
def test_real_pararel_counts(real):
    s = real.summary()
    assert (s["relations"], s["facts"], s["templates"], s["prompts"]) == (34, 27738, 318, 253448)
    counts = real.causal_template_counts()
    assert set(counts) == set(real.relations)
    assert all(0 < u <= t for u, t in counts.values())
    assert sum(u for u, _ in counts.values()) == s["causal_templates"]
    types = {r: real.relation(r).type for r in real.relations}
    assert types["P36"] == types["P1376"] == "1-1"
    assert set(types.values()) == {"1-1", "N-1", "N-M"}
    assert real.relation("P19").label == "place of birth"
    assert all(4 <= len(real.relation(r).templates) <= 20 for r in real.relations)
    assert all(225 <= len(real.facts(r)) <= 996 for r in real.relations)
    assert "Allan Peiper was born in [Y]." in real.prompts("P19", "Allan Peiper", causal=True)
    assert len(real.to_dataframe()) == 27738


@needs_shared
def test_real_editing_benchmarks():
    cf = load_counterfact(SHARED / "editing" / "counterfact-edit-1k.json")
    zs = load_zsre(SHARED / "editing" / "zsre_mend_train-1k.json")
    assert len(cf) == 1000 and len(zs) == 1000
    assert len({c.case_id for c in cf}) == 1000
    for c in cf + zs:
        assert c.subject in c.prompt
        for key, items in c.clozes().items():
            for item in items:
                cl = parse_cloze(item[0] if key == "locality" else item)
                assert cl.before.strip() and not cl.after.strip()
        assert len(c.locality_prompts) == len(c.locality_answers) >= 1
    assert sum(not c.target_new for c in zs) == 2          # two published zsRE cases have an empty alt
    assert len(load_zsre(SHARED / "editing" / "zsre_mend_train-1k.json", drop_empty_targets=True)) == 998


@needs_shared
def test_real_bingrel_aligned(real):
    n = len(real.facts("P19"))
    bags = load_bingrel(SHARED / "bingrel", "P19", n_facts=n)
    assert len(bags) == n
    assert any(b.th_bags for b in bags) and all(len(b.th_bags) <= 10 and len(b.h_bags) <= 10 for b in bags)
    with pytest.raises(KneuronsError, match="entries but relation 'P19'"):
        load_bingrel(SHARED / "bingrel", "P19", n_facts=n + 1)
