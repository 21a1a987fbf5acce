"""The paper's experiments, the run store and ``kneurons run/export``: a real run on a tiny model trained on a
synthetic fact world (the ``synthetic_run`` fixture), a SIGKILL-and-resume test, and bad input."""

from __future__ import annotations

from collections import Counter

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from helpers import handle_for
from kneurons.errors import KneuronsError
from kneurons.experiments import RunStore, fact_items, neuron_activations
from kneurons.experiments.export import export
from kneurons.experiments.store import CONFIG, DATABASE, DB_SIDE, LOCK
from kneurons.hooks import capture
from kneurons.prompts import assess
from paired import median_lower_bound, sign_test_p
from runs import config, make_run

ROOT = Path(__file__).resolve().parents[1]
VOLATILE = {"seconds", "created"}


# ------------------------------------------------------------------------------------------------ run store

def test_store_roundtrip_resume_and_refusals(tmp_path):
    cfg = {"model": "m", "seed": 0}
    with RunStore.open(tmp_path / "run", cfg) as st:
        st.put("locate", "P1:0", "P1", [{"a": 1, "x": [1, 2]}, {"a": 2}])
        st.put("locate", "P1:1", "P1", [{"a": 3}])
        with pytest.raises(KneuronsError, match="already in the run store"):
            st.put("locate", "P1:0", "P1", [{"a": 9}])
        assert st.done("locate") == {"P1:0", "P1:1"} and st.has("locate", "P1:1")
    with RunStore.open(tmp_path / "run", cfg) as st:  # same configuration: resumed, nothing lost
        assert [r["a"] for r in st.rows("locate")] == [1, 2, 3]
        assert st.table("locate")["unit"].tolist() == ["P1:0", "P1:0", "P1:1"]
    with pytest.raises(KneuronsError, match=r"different configuration \(seed: 0 -> 1\)"):
        RunStore.open(tmp_path / "run", {"model": "m", "seed": 1})
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(KneuronsError, match="not empty and is not a kneurons run"):
        RunStore.open(tmp_path / "other", cfg)
    with pytest.raises(KneuronsError, match="does not exist"):
        RunStore(tmp_path / "missing")
    # killed between creating the database and renaming the config into place: the next open starts cleanly
    killed = tmp_path / "killed"
    RunStore.open(killed, cfg).close()
    (killed / CONFIG).rename(killed / f".{CONFIG}.tmp123")
    with RunStore.open(killed, cfg) as st:
        names = {p.name for p in killed.iterdir()}
        assert st.config == cfg and {CONFIG, DATABASE, LOCK} <= names <= {CONFIG, DATABASE, LOCK, *DB_SIDE}
    with pytest.raises(KneuronsError, match="not a kneurons run directory"):
        RunStore(tmp_path / "other")


def test_store_refuses_corrupt_files(tmp_path):
    RunStore.open(tmp_path / "a", {"k": 1}).close()
    (tmp_path / "a" / DATABASE).write_bytes(b"this is not a database" * 100)
    with pytest.raises(KneuronsError, match="corrupt results database"):
        RunStore(tmp_path / "a")
    RunStore.open(tmp_path / "b", {"k": 1}).close()
    (tmp_path / "b" / CONFIG).write_text("{not json")
    with pytest.raises(KneuronsError, match="corrupt run configuration"):
        RunStore(tmp_path / "b")


# ------------------------------------------------------------------------------------------- experiment parts

def test_candidate_rank_matches_brute_force():
    h = handle_for("gpt2", dtype=torch.float64)
    prompts = ["the capital of france is [Y] .", "germany lives in [Y] ."]
    cands = ["paris", "berlin", "rome", "madrid", "city"]
    res = assess(h, prompts, ["paris", "rome"], candidates=cands)
    for a, p in zip(res, prompts):
        probs = {c: assess(h, [p], c)[0].prob for c in cands}  # one-token answers: prob = first-token prob
        assert a.candidate_rank == 1 + sum(v > probs[a.target] for c, v in probs.items() if c != a.target)
    with pytest.raises(KneuronsError, match="candidate"):
        assess(h, prompts, "paris", candidates=[])


def test_neuron_activations_are_position_means_of_the_ffn_input():
    h = handle_for("llama", dtype=torch.float64)
    texts = ["the capital of france is paris .", "berlin"]
    neurons = [(1, 3), (0, 5), (1, 0)]
    got = neuron_activations(h, texts, neurons, batch_size=1)
    for r, t in enumerate(texts):
        ids = h.tokenizer(t, return_tensors="pt")["input_ids"]
        with capture(h.arch) as cap:
            h.model(input_ids=ids)
        for c, (l, i) in enumerate(neurons):
            assert got[r, c].item() == pytest.approx(cap.acts[l][0, :, i].mean().item(), rel=1e-6)
    both = neuron_activations(h, texts, neurons, batch_size=8)  # padding does not change the means
    assert torch.allclose(both, got, rtol=1e-5, atol=1e-6)

    def poison_padding(mod, args):  # a model that leaves NaN at padded positions must not spoil the means
        x = args[0].clone()
        if x.shape[0] == 2:  # the batch of both texts: row 1 ("berlin") is 1 token, padded to the other's length
            x[1, 1:] = float("nan")
        return (x,)

    # the last layer only: NaN written at an earlier layer reaches real positions through attention (0 · NaN)
    hooks = [h.arch.ffn_out[h.n_layers - 1].register_forward_pre_hook(poison_padding)]
    try:
        for reduce in ("mean", "max"):
            poisoned = neuron_activations(h, texts, neurons, batch_size=8, reduce=reduce)
            assert torch.allclose(poisoned, neuron_activations(h, texts, neurons, batch_size=1, reduce=reduce),
                                  rtol=1e-5, atol=1e-6)
    finally:
        for hk in hooks:
            hk.remove()


def test_fact_items_and_bad_options(tmp_path):
    from kneurons.data import load_facts
    from kneurons.experiments.runner import RunConfig

    rel = load_facts().relation("capital_of")
    items = fact_items(rel, causal=True, max_prompts=2, indices=[0, 3])
    assert [it.fact_id for it in items] == ["capital_of:0", "capital_of:3"]
    assert all(len(it.prompts) == 2 and all(p.rstrip(" .").endswith("[Y]") for p in it.prompts) for it in items)
    with pytest.raises(KneuronsError, match="experiments must be one of"):
        RunConfig(model="m", data=".", experiments=["assess", "teleport"]).check()
    with pytest.raises(KneuronsError, match="known_among"):
        RunConfig(model="m", data=".", known_among="vibes").check()
    with pytest.raises(KneuronsError, match="update_space"):
        RunConfig(model="m", data=".", update_space="sideways").check()
    from kneurons.experiments.runner import pararel_dirs
    with pytest.raises(KneuronsError, match="neither pararel/query_pairs.json"):
        pararel_dirs(tmp_path)


# ------------------------------------------------------------------------------------------ the complete run

def _tables(run_dir) -> dict[str, pd.DataFrame]:
    with RunStore(run_dir) as st:
        return {e: st.table(e).drop(columns=[c for c in VOLATILE if c in st.table(e)]) for e in st.experiments()}


def test_run_reproduces_the_papers_patterns_on_the_synthetic_world(synthetic_run):
    """The run's tables show the paper's patterns against their controls, per fact and paired (the claims
    themselves, with more facts and seeds, are tested in test_synthetic_world.py): suppressing a fact's knowledge
    neurons lowers it more than as many random neurons and more than other relations' facts (99 % lower bounds of
    the median per-fact difference above 0), updates through them succeed where random neurons fail (exact sign
    test), erasing a relation raises its perplexity more than the others' and more than a random erasure."""
    with RunStore(synthetic_run / "run") as st:  # closed even when an assertion fails (the next tests reuse it)
        _check_patterns(st)


def _check_patterns(st):
    assert st.meta("complete") and st.meta("weights_restored")
    assess_t, loc = st.table("assess"), st.table("locate")
    chosen = st.meta("known_facts")  # the first 5 known facts of each relation in the seeded order
    assert [len(v) for v in chosen.values()] == [5, 5, 5, 5]
    assert set(sum(chosen.values(), [])) <= set(assess_t[assess_t.known].fact_id)
    assert set(loc.unit) == set(sum(chosen.values(), []))
    kn = loc[loc.method == "kn"].set_index("unit").n_neurons
    rnd = loc[loc.method == "random"].set_index("unit").n_neurons
    assert (kn == rnd).all() and (kn > 0).sum() >= 15  # random sets copy the count

    sup = st.table("suppress")
    per_fact = sup.groupby(["op", "method", "group", "unit"]).rel_change.mean()
    kn_sup = per_fact["suppress", "kn", "fact"]
    assert {(op, m) for op, m, _, _ in per_fact.index} - {(op, "fact_specific") for op in ("suppress", "amplify")} \
        == {(op, m) for op in ("suppress", "amplify") for m in ("kn", "random", "activation")}
    # fact-specific sets = the fact's kn minus the neurons of more than relation_q (0.3) of its relation's facts
    kn_sets = {u: {tuple(n) for n in ns} for u, ns in zip(loc[loc.method == "kn"].unit, loc[loc.method == "kn"].neurons)}
    for rel, units in chosen.items():
        counts = Counter(n for u in units for n in kn_sets[u])
        relation = {n for n, c in counts.items() if c > 0.3 * len(units)}
        for u in units:
            want = len(kn_sets[u] - relation)
            got = sup[(sup.unit == u) & (sup.method == "fact_specific")].n_neurons
            assert (got == want).all() and (len(got) > 0) == (want > 0), (u, want, list(got))
    vs_random = (per_fact["suppress", "random", "fact"] - kn_sup).dropna()
    vs_other = (per_fact["suppress", "kn", "other_relation"] - kn_sup).dropna()
    assert len(vs_random) >= 15 and len(vs_other) >= 15
    assert median_lower_bound(vs_random) > 0 and median_lower_bound(vs_other) > 0

    upd = st.table("update")
    upd = upd[upd.get("skipped").isna()] if "skipped" in upd else upd
    s1 = upd.groupby(["method", "unit"]).success1_after.mean()
    better = (s1["kn"] - s1["random"]).dropna()  # 20 facts, most of them ties at 0: a 5 % test here (the claim is
    # tested at 1 % on more facts in test_synthetic_world.py)
    assert sign_test_p(int((better > 0).sum()), int((better < 0).sum())) < 0.05

    er = st.table("erase").set_index(["unit", "method", "group"])
    change = (er.ppl_after - er.ppl_before) / er.ppl_before
    for rel in ("born_in", "speaks"):
        assert change[rel, "kn", "erased"] > max(change[rel, "kn", "other"], change[rel, "random", "erased"])

    act = st.table("activations").dropna(subset=["mean_activation"]).groupby("bag").mean_activation.mean()
    # measured: head_tail 0.77, head_only 0.14, random (other facts' sentences of the relation) 0.68
    assert act["head_tail"] > 0 and act["head_tail"] > 2 * act["head_only"] and act["head_tail"] > act["random"]

    base = loc[loc.method == "activation"].n_neurons
    assert (base > 0).sum() >= 15  # the activation baseline finds neurons too (its effect is measured above)
    assert per_fact["suppress", "activation", "fact"].mean() < per_fact["suppress", "random", "fact"].mean()


def test_rerun_is_a_no_op_and_other_config_refused(synthetic_run, tmp_path):
    before = _tables(synthetic_run / "run")
    make_run(synthetic_run)  # same configuration: everything is already stored
    after = _tables(synthetic_run / "run")
    assert before.keys() == after.keys()
    for e in before:
        pd.testing.assert_frame_equal(before[e], after[e])
    with pytest.raises(KneuronsError, match="different configuration.*steps: 20 -> 5"):
        make_run(synthetic_run, steps=5)


def test_export_parquet_and_csv_match_the_store(synthetic_run, tmp_path, request):
    st = RunStore(synthetic_run / "run")
    request.addfinalizer(st.close)  # closed even when an assertion fails: later tests copy this run's files
    paths = export(synthetic_run / "run", "parquet", tmp_path / "pq")
    assert {p.name for p in paths} == {f"{e}.parquet" for e in st.experiments()} | {"config.json"}
    loc = pd.read_parquet(tmp_path / "pq" / "locate.parquet")
    assert [list(map(list, n)) for n in loc.neurons] == st.table("locate").neurons.tolist()
    export(synthetic_run / "run", "csv", tmp_path / "csv")
    sup = pd.read_csv(tmp_path / "csv" / "suppress.csv")
    pd.testing.assert_series_equal(sup.rel_change, st.table("suppress").rel_change, check_exact=False, rtol=1e-12)
    csv_loc = pd.read_csv(tmp_path / "csv" / "locate.csv")
    assert [json.loads(n) for n in csv_loc.neurons] == st.table("locate").neurons.tolist()
    with pytest.raises(KneuronsError, match="not empty"):
        export(synthetic_run / "run", "csv", tmp_path / "csv")
    with pytest.raises(KneuronsError, match="format"):
        export(synthetic_run / "run", "xlsx", tmp_path / "x")


# ------------------------------------------------------------------------------------------- kill and resume

def _cli_args(base: Path, out: Path) -> list[str]:
    cfg = config(base)
    return [sys.executable, "-m", "kneurons.cli", "run", "--model", cfg.model, "--data", cfg.data, "--out", str(out),
            "--facts-per-relation", str(cfg.facts_per_relation), "--erase-relations", *cfg.erase_relations,
            "--erase-top-k", str(cfg.erase_top_k), "--min-prompts", str(cfg.min_prompts), "--quiet"]


def _units(db: Path) -> int:
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
        try:
            return con.execute("SELECT count(*) FROM results").fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error:
        return 0


def _kill_when(args, db: Path, at_least: int, env) -> None:
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=ROOT)
    deadline = time.time() + 240
    try:
        while _units(db) < at_least:
            assert proc.poll() is None, f"run ended before the kill point: {proc.stderr.read().decode()[-2000:]}"
            assert time.time() < deadline, "run too slow to reach the kill point"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


def test_sigkill_at_any_phase_then_resume_equals_an_uninterrupted_run(synthetic_run, tmp_path):
    """Kill a ``kneurons run`` subprocess with SIGKILL three times (during assess, locate, then the later
    phases), resume it with the same command, and compare every table with the uninterrupted run."""
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "TOKENIZERS_PARALLELISM": "false"}
    args = _cli_args(synthetic_run, out)
    with RunStore(synthetic_run / "run") as st:  # closed at once: later tests copy this run's files
        total = sum(st.counts().values())
    _kill_when(args, out / DATABASE, 20, env)  # inside assess (64 units, stored in chunks of 16 facts)
    assert 20 <= _units(out / DATABASE) < total
    _kill_when(args, out / DATABASE, 70, env)  # a few located facts
    killed_at = _units(out / DATABASE)
    assert 70 <= killed_at < total
    _kill_when(args, out / DATABASE, killed_at + 45, env)  # somewhere in suppress/activations/update
    assert _units(out / DATABASE) < total
    done = subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _units(out / DATABASE) == total
    ref, got = _tables(synthetic_run / "run"), _tables(out)
    assert ref.keys() == got.keys()
    for e in ref:
        a = ref[e].sort_values(list(ref[e].columns[:3])).reset_index(drop=True)
        b = got[e].sort_values(list(got[e].columns[:3])).reset_index(drop=True)
        # neuron lists, counts and flags exactly; floats to float32 noise (the reference ran in this process on
        # the in-memory model with eager attention, the resumed run on the saved copy with its default kernel, in
        # other batches): Δp/p of a fact at p ~ 0.1 carries ~1e-6 of it
        pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bad", [["--experiments", "assess", "dance"], ["--p", "1.5"], ["--threshold", "0"],
                                 ["--max-prompts", "1"], ["--batch-size", "-3"], ["--known-rank", "0"],
                                 ["--steps", "0"], ["--lambda2", "nan"], ["--known-fraction", "1"]])
def test_cli_run_refuses_bad_options_before_writing_anything(synthetic_run, tmp_path, bad, capsys):
    from kneurons.cli import main

    base = synthetic_run
    assert main(["run", "--model", str(base / "model"), "--data", str(base / "data"), "--out", str(tmp_path / "r"),
                 *bad]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kneurons: error:")
    assert not (tmp_path / "r").exists()


def test_cli_run_bad_input(synthetic_run, tmp_path):
    from kneurons.cli import main

    base = synthetic_run
    assert main(["run", "--model", str(base / "model"), "--data", str(tmp_path / "nope"), "--out",
                 str(tmp_path / "r")]) == 2
    assert not (tmp_path / "r").exists()  # nothing written for a refused configuration
    (tmp_path / "f").write_text("x")
    assert main(["export", str(base / "run"), "--out", str(tmp_path / "f"), "--format", "csv"]) == 2
    assert main(["export", str(tmp_path / "nope")]) == 2


def test_resume_refuses_other_weights_and_orphan_results(synthetic_run, tmp_path):
    from kneurons import load_model
    from kneurons.experiments import run

    h = load_model(str(synthetic_run / "model"))
    cfg = config(synthetic_run, experiments=["assess"], facts_per_relation=2)
    run(cfg, tmp_path / "r", handle=h, progress=False)
    with torch.no_grad():
        h.arch.ffn_out[0].weight[0, 0] += 1.0  # "retrained" between two sessions
    with pytest.raises(KneuronsError, match="other weights"):
        run(cfg, tmp_path / "r", handle=h, progress=False)
    (tmp_path / "r" / CONFIG).unlink()  # the database records the configuration: another one is still refused,
    with pytest.raises(KneuronsError, match="different configuration.*k: '<unset>' -> 1"):
        RunStore.open(tmp_path / "r", {**cfg.identity(), "k": 1})
    with RunStore.open(tmp_path / "r", cfg.identity()):  # and the same one gets its config.json back
        assert json.loads((tmp_path / "r" / CONFIG).read_text()) == cfg.identity()


def test_known_among_candidates_on_the_trained_model(synthetic_run):
    from kneurons import load_model
    from kneurons.data.pararel import load_pararel
    from kneurons.experiments.assess import assess_facts

    h = load_model(str(synthetic_run / "model"))
    rel = load_pararel(synthetic_run / "data" / "pararel").relation("speaks")
    cands = sorted({f.object for f in rel.facts})
    items = fact_items(rel, causal=True, indices=range(6))
    rows = assess_facts(h, items, known_among="candidates", candidates=cands, known_rank=1)
    for it, row in zip(items, rows):
        right = 0
        for p in it.prompts:  # brute force: score every candidate answer
            probs = {c: assess(h, [p], c)[0].prob for c in cands}
            right += max(probs, key=probs.get) == it.object
        assert row["n_right"] == right and row["known"] == (right > 0.5 * len(it.prompts))


def test_update_drop_shared_rule():
    from kneurons.experiments.update import shared_by_more_than

    sets = [[(0, 1), (0, 2)], [(0, 1), (1, 5)], [(0, 1)], [(2, 2)]] + [[(3, i)] for i in range(6)]  # 10 facts
    assert shared_by_more_than(sets, 0.1) == {(0, 1)}  # in 3 > 1 of 10 facts
    assert shared_by_more_than(sets, 0.3) == set()  # 3 is not > 3
    assert shared_by_more_than(sets, None) == set()
    assert shared_by_more_than([[(0, 1)], [(0, 2)]], 0.1) == set()  # in 1 fact only: kept


def test_neuron_activations_of_a_text_without_tokens_are_nan():
    h = handle_for("llama", dtype=torch.float64)
    for reduce in ("mean", "max"):
        got = neuron_activations(h, ["the capital of france", ""], [(0, 2), (1, 7)], reduce=reduce)
        assert torch.isfinite(got[0]).all() and torch.isnan(got[1]).all()


def test_neuron_activations_skip_special_tokens():
    h = handle_for("bert", dtype=torch.float64)  # its tokenizer adds [CLS] ... [SEP]
    text = "the capital of france is paris ."
    got = neuron_activations(h, [text], [(0, 2), (1, 7)])
    enc = h.tokenizer(text, return_tensors="pt", return_special_tokens_mask=True)
    keep = enc["special_tokens_mask"][0] == 0
    assert keep.sum() == len(enc["input_ids"][0]) - 2
    with capture(h.arch) as cap:
        h.model(input_ids=enc["input_ids"])
    for c, (l, i) in enumerate([(0, 2), (1, 7)]):
        assert got[0, c].item() == pytest.approx(cap.acts[l][0, keep, i].mean().item(), rel=1e-9)


# ------------------------------------------------------------------------------------ editing benchmarks

def test_knowledge_neuron_edits_scored_like_other_editors(synthetic_run, tmp_path):
    """CounterFact-format cases written from the synthetic world, edited through their knowledge neurons on the
    trained model: reliability/generalization far above the random-neuron control, and the weights
    bit-identical afterwards. Locality (neighbour = another subject, same relation and template) is poor —
    measured 0.25 vs 1.0 for the control: the neurons carry the relation, and λ2 = 8 rewrites it."""
    from kneurons import load_model
    from kneurons.data.editing import load_counterfact
    from kneurons.data.pararel import load_pararel
    from kneurons.experiments.editing import evaluate_edits
    from kneurons.interventions import weights_digest

    pr = load_pararel(synthetic_run / "data" / "pararel")
    records = []
    for rid in ("born_in", "speaks"):
        rel = pr.relation(rid)
        objects = sorted({f.object for f in rel.facts})
        for j, f in enumerate(rel.facts[:4]):
            stems = [t.replace("[X]", f.subject).split("[Y]")[0].rstrip() for t in rel.templates]
            other = rel.facts[j + 10]
            records.append({"case_id": f"{rid}:{j}", "subject": f.subject, "prompt": stems[0],
                            "ground_truth": f.object, "target_new": next(o for o in objects if o != f.object),
                            "rephrase_prompt": stems[1:],
                            "locality_prompt": rel.templates[0].replace("[X]", other.subject).split("[Y]")[0].rstrip(),
                            "locality_ground_truth": other.object})
    path = tmp_path / "cf.json"
    path.write_text(json.dumps(records))
    cases = load_counterfact(path)
    h = load_model(str(synthetic_run / "model"))
    digest = weights_digest(h.model)
    df = evaluate_edits(h, cases)
    assert weights_digest(h.model) == digest
    done = df[df.get("skipped").isna()] if "skipped" in df else df
    assert done.case_id.nunique() >= 6
    by = done.groupby("method")[["reliability", "generalization", "locality", "reliability_before"]].mean()
    assert by.loc["kn", "reliability_before"] == 0  # the new answer was nowhere top-1 before
    assert by.loc["kn", "reliability"] >= 0.5 and by.loc["random", "reliability"] <= 0.1
    assert by.loc["kn", "generalization"] >= 0.5 and by.loc["random", "generalization"] <= 0.1
    assert by.loc["random", "locality"] >= 0.9 and by.loc["kn", "locality"] < by.loc["random", "locality"]
    head = evaluate_edits(h, cases, space="head")  # the head-space vectors: one search per case, shared by methods
    assert weights_digest(h.model) == digest
    head = head[head.get("skipped").isna()] if "skipped" in head else head
    by_head = head.groupby("method")[["reliability", "generalization"]].mean()
    print(f"editing: paper's vectors {by.to_dict()}, head space {by_head.to_dict()}")
    assert by_head.loc["kn", "reliability"] >= 0.5 and by_head.loc["random", "reliability"] <= 0.1
