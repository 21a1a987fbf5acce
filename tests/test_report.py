"""kneurons.report: write_report / summary on a real run (the synthetic_run fixture) and on a hand-made run with
every section populated (errors and skipped rows included); bad input; the page in headless Chromium."""

from __future__ import annotations

import html
import json
import math
import random
import re
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path

import pandas as pd
import pytest

from kneurons import _io
from kneurons.errors import KneuronsError
from kneurons.experiments.paper import PAPER, PAPER_MODEL
from kneurons.experiments.store import RunStore
from kneurons.report import format_summary, summary, write_report

CHROMIUM = "/usr/bin/chromium"
N_LAYERS = 6


# ------------------------------------------------------------------------------------------------ a hand-made run
def make_fake_run(run_dir: Path) -> Path:
    """A run store written directly (no model): 3 relations, every experiment populated, with an error row or a
    skipped row in each experiment, NaN activations for a fact without neurons, and a skipped erase relation."""
    rng = random.Random(0)
    store = RunStore.open(run_dir, {"model": "fake/model", "data": "fake/data", "seed": 0, "erase_top_k": 20,
                                    "erase_mode": "unk", "version": "0.1.0", "experiments": ["assess", "locate"]})
    rels = {"P19": ["P19:0", "P19:1", "P19:2"], "P27": ["P27:0", "P27:1", "P27:2"], "P106": ["P106:0", "P106:1"]}
    no_kn = {"P27:2"}          # located, no knowledge neurons
    locate_error = {"P106:1"}  # locate failed
    for rid, facts in rels.items():
        for fid in facts:
            store.put("assess", fid, rid, [{"fact_id": fid, "relation": rid, "subject": "s", "object": "o",
                                            "n_prompts": 4, "error": "", "n_right": 4, "mean_prob": 0.5,
                                            "mean_rank": 1.0, "known": True}])
        store.put("assess", f"{rid}:9", rid, [{"fact_id": f"{rid}:9", "relation": rid, "subject": "s", "object": "o",
                                               "n_prompts": 4, "error": "", "n_right": 1, "mean_prob": 0.1,
                                               "mean_rank": 7.0, "known": False}])
    store.put("assess", "P19:8", "P19", [{"fact_id": "P19:8", "relation": "P19", "subject": "s", "object": "o",
                                          "n_prompts": 4, "error": "answer cannot be encoded", "n_right": 0,
                                          "mean_prob": float("nan"), "mean_rank": float("nan"), "known": False}])
    known = {rid: list(f) for rid, f in rels.items()}

    def neurons(k):
        return [[rng.randrange(N_LAYERS), rng.randrange(64)] for _ in range(k)]

    kn_sets = {}
    for rid, facts in rels.items():
        for fid in facts:
            if fid in locate_error:
                store.put("locate", fid, rid, [{"error": "integrated gradients failed"}])
                continue
            kn = [] if fid in no_kn else [[N_LAYERS - 1, 7], [N_LAYERS - 2, rng.randrange(64)]] + neurons(
                rng.randrange(0, 4))
            kn_sets[fid] = kn
            act = neurons(rng.randrange(1, 5))
            rows = [{"method": "kn", "n_neurons": len(kn), "neurons": kn, "p_used": 0.7, "mean_base_prob": 0.5,
                     "seconds": 1.0 + rng.random()},
                    {"method": "activation", "n_neurons": len(act), "neurons": act, "p_used": 0.7,
                     "mean_base_prob": 0.5, "seconds": 0.1},
                    {"method": "random", "n_neurons": len(kn), "neurons": neurons(len(kn)), "p_used": None,
                     "mean_base_prob": 0.5, "seconds": 0.0}]
            store.put("locate", fid, rid, rows)
    for rid, facts in rels.items():
        for fid in facts:
            if fid in locate_error:
                continue
            if fid == "P19:2":
                store.put("suppress", fid, rid, [{"error": "out of memory"}])
                continue
            rows = []
            for method in ("kn", "activation", "random"):
                if method != "activation" and not kn_sets[fid]:
                    continue
                for op, factor in (("suppress", 0.0), ("amplify", 2.0)):
                    for group in ("fact", "same_relation", "other_relation"):
                        rc = rng.uniform(-0.6, 0.1) if op == "suppress" else rng.uniform(-0.1, 0.6)
                        rows.append({"method": method, "op": op, "factor": factor, "group": group, "n_neurons": 3,
                                     "n_prompts": 4, "before": 0.5, "after": 0.5 * (1 + rc), "rel_change": rc})
            store.put("suppress", fid, rid, rows)
            n = len(kn_sets[fid])
            store.put("activations", fid, rid, [
                {"bag": bag, "n_sentences": 10, "n_neurons": n,
                 "mean_activation": rng.uniform(lo, hi) if n else float("nan")}
                for bag, lo, hi in (("head_tail", 0.2, 0.8), ("head_only", -0.1, 0.2), ("random", -0.2, 0.1))])
            if not kn_sets[fid]:
                store.put("update", fid, rid, [{"method": "kn", "n_neurons": 0,
                                                "skipped": "no knowledge neurons to edit"}])
                continue
            rows = []
            for method in ("kn", "random"):
                row = {"method": method, "old": "o", "new": "n", "n_neurons": n, "n_intra": 4, "n_inter": 10}
                for q in ("p_old", "p_new", "success1", "success5"):
                    row[f"{q}_before"], row[f"{q}_after"] = rng.random(), rng.random()
                for q in ("ppl_intra", "ppl_inter"):
                    row[f"{q}_before"], row[f"{q}_after"] = rng.uniform(2, 20), rng.uniform(2, 30)
                rows.append(row)
            store.put("update", fid, rid, rows)
    for rid in ("P19", "P27"):
        rows = []
        for method in ("kn", "random"):
            for group in ("erased", "other"):
                rows.append({"method": method, "group": group, "n_neurons": 5, "mode": "unk", "n_prompts": 12,
                             "mean_facts_per_neuron": 1.5, "ppl_before": rng.uniform(2, 10),
                             "ppl_after": rng.uniform(2, 30), "acc_before": rng.random(), "acc_after": rng.random()})
        store.put("erase", rid, rid, rows)
    store.put("erase", "P106", "P106", [{"method": "kn", "n_neurons": 0,
                                          "skipped": "no knowledge neurons in the relation"}])
    meta = {"model_info": {"name": "fake-model", "model_type": "gpt2", "kind": "causal", "n_layers": N_LAYERS,
                           "d_ff": 64, "dtype": "float32", "source": "hand-made"},
            "device": "cpu", "skipped_relations": {"P31": "1 usable template(s); refining needs 2"},
            "known_facts": known, "activations_missing_relations": [], "erase_not_in_run": ["P937"],
            "weights_restored": True, "last_run_seconds": 12.5, "complete": True}
    for k, v in meta.items():
        store.set_meta(k, v)
    store.close()
    return run_dir


# ------------------------------------------------------------------------------------------------ recomputation
def _good(df: pd.DataFrame) -> pd.DataFrame:
    """Rows that are neither errors nor skipped (recomputed here independently of the report's own filter)."""
    keep = pd.Series(True, index=df.index)
    if "error" in df:
        keep &= ~df["error"].apply(lambda v: isinstance(v, str) and v != "")
    if "skipped" in df:
        keep &= ~df["skipped"].apply(lambda v: isinstance(v, str) and v != "")
    return df[keep]


def _close(ours, expected, what):
    if expected is None or (isinstance(expected, float) and not math.isfinite(expected)):
        assert ours is None, f"{what}: {ours} != no value"
    else:
        assert ours == pytest.approx(float(expected), rel=1e-9, abs=1e-12), what


def check_summary_against_tables(run_dir: Path, s: dict) -> int:
    """Recompute the report's key numbers from ``store.table`` with pandas; returns how many were checked."""
    store = RunStore(run_dir)
    t = {e: store.table(e) for e in ("assess", "locate", "suppress", "activations", "update", "erase")}
    store.close()
    checked = 0
    a = t["assess"]
    assert s["facts"]["assessed"] == len(a)
    assert s["facts"]["known"] == int(a["known"].fillna(False).astype(bool).sum())
    checked += 2

    loc = _good(t["locate"])
    for m, key in (("kn", "neurons_per_fact"), ("activation", "neurons_per_fact_activation")):
        sub = loc[loc["method"] == m]
        row = next(r for r in s["compare"] if r["section"] == "locate" and r["key"] == key)
        _close(row["ours"], sub["neurons"].map(len).mean() if len(sub) else None, f"locate {m}")
        assert row["paper"] == PAPER["locate"][key]
        if len(sub):
            assert s["locate"]["methods"][m]["facts_without_neurons"] == int((sub["n_neurons"] == 0).sum())
        checked += 1

    sup = _good(t["suppress"])
    for op in ("suppress", "amplify"):
        for m in ("kn", "activation", "random"):
            sub = sup[(sup["op"] == op) & (sup["method"] == m) & (sup["group"] == "fact")] if len(sup) else sup
            row = next(r for r in s["compare"] if r["section"] == op and r["key"] == m)
            _close(row["ours"], sub["rel_change"].mean() if len(sub) else None, f"{op} {m}")
            assert row["paper"] == PAPER[op].get(m)
            checked += 1
            if len(sub):
                per = sub.groupby("relation")["rel_change"].mean()
                cell = s["suppress"]["ops"][op][m]["fact"]
                for rid, v in per.items():
                    _close(cell["per_relation"][rid]["mean"], v, f"{op} {m} {rid}")
                    checked += 1
                _close(cell["mean_of_relations"], per.mean(), f"{op} {m} mean of relations")
                for g in ("same_relation", "other_relation"):
                    ctl = sup[(sup["op"] == op) & (sup["method"] == m) & (sup["group"] == g)]
                    _close(s["suppress"]["ops"][op][m][g]["all_facts"], ctl["rel_change"].mean(), f"{op} {m} {g}")
                    checked += 1
                # per fact: |fact| / |same relation| of each fact that has both rows, written out with a loop
                ratios, beyond = [], 0
                for unit, f in zip(sub["unit"], sub["rel_change"]):
                    same = sup[(sup["op"] == op) & (sup["method"] == m) & (sup["group"] == "same_relation") &
                               (sup["unit"] == unit)]["rel_change"]
                    if len(same) and math.isfinite(f) and math.isfinite(same.iloc[0]):
                        ratios.append(abs(f) / max(abs(same.iloc[0]), 1e-12))
                        beyond += abs(f) > abs(same.iloc[0])
                cell = s["suppress"]["ops"][op][m]
                _close(cell.get("relation_specificity_median"), statistics.median(ratios) if ratios else None,
                       f"{op} {m} per-fact median")
                assert (cell.get("facts_beyond_relation"), cell.get("facts_paired")) == \
                    ((beyond, len(ratios)) if ratios else (None, None))
                checked += 1

    act = _good(t["activations"])
    for bag in ("head_tail", "head_only", "random"):
        sub = act[(act["bag"] == bag) & act["mean_activation"].notna()] if len(act) else act
        row = next(r for r in s["compare"] if r["section"] == "activations" and r["key"] == bag)
        _close(row["ours"], sub["mean_activation"].mean() if len(sub) else None, f"activation {bag}")
        assert row["paper"] == PAPER["activations"][bag]
        checked += 1

    upd = _good(t["update"])
    n_skipped = t["update"]["skipped"].apply(lambda v: isinstance(v, str)).sum() if "skipped" in t["update"] else 0
    assert s["update"]["facts_without_neurons"] == n_skipped
    for m in ("kn", "random"):
        sub = upd[upd["method"] == m] if len(upd) else upd
        row = next(r for r in s["compare"] if r["key"] == f"success1_{m}")
        _close(row["ours"], sub["success1_after"].mean() if len(sub) else None, f"success1 {m}")
        row = next(r for r in s["compare"] if r["key"] == f"delta_ppl_inter_{m}")
        _close(row["ours"], (sub["ppl_inter_after"] - sub["ppl_inter_before"]).mean() if len(sub) else None,
               f"delta ppl inter {m}")
        if len(sub):
            rel = ((sub["ppl_intra_after"] - sub["ppl_intra_before"]) / sub["ppl_intra_before"]).mean()
            _close(s["update"]["methods"][m]["rel_delta_ppl_intra"], rel, f"relative delta ppl intra {m}")
            checked += 1
        checked += 2

    er = _good(t["erase"])
    for g, key in (("erased", "erased_ppl_change"), ("other", "other_ppl_change")):
        sub = er[(er["method"] == "kn") & (er["group"] == g)] if len(er) else er
        change = sub["ppl_after"] / sub["ppl_before"] - 1 if len(sub) else pd.Series(dtype=float)
        row = next(r for r in s["compare"] if r["section"] == "erase" and r["key"] == key)
        if len(change):
            assert row["ours"] == pytest.approx([change.min(), change.max()])
            for unit, v in zip(sub["unit"], change):
                _close(s["erase"]["relations"][unit]["kn"][g]["ppl_change"], v, f"erase {unit} {g}")
                checked += 1
        else:
            assert row["ours"] is None
        assert row["paper"] == list(PAPER["erase"][key])
        checked += 1
    return checked


def check_written(html_path: Path) -> tuple[str, list[Path]]:
    out = html_path.parent
    assert html_path.name == "report.html" and html_path.is_file()
    page = html_path.read_text(encoding="utf-8")
    pngs = sorted(out.glob("*.png"))
    imgs = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(imgs) == len(pngs) == page.count("<img"), (len(imgs), [p.name for p in pngs])
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert p.name in page  # each file is named in its caption
    import base64

    assert sorted(base64.b64decode(i) for i in imgs) == sorted(p.read_bytes() for p in pngs)
    # self-contained: no external resource, no script
    assert not re.search(r'(src|href)\s*=\s*"(?!data:)', page), "external resource"
    assert "<script" not in page.lower() and "url(" not in page
    json.loads((out / "summary.json").read_text())
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")], "temporary files left"
    return page, pngs


# ------------------------------------------------------------------------------------------------ browser
VERDICT = """<script>
window.__errors = [];
window.addEventListener('error', function (e) {
  window.__errors.push(String(e.message || (e.target && (e.target.src || e.target.href)) || 'error'));
}, true);
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var broken = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); })
                   .map(function (i) { return i.alt || 'img'; });
  var d = document.createElement('pre');
  d.id = '__verdict';
  d.textContent = JSON.stringify({images: imgs.length, broken: broken, errors: window.__errors,
                                  widths: imgs.map(function (i) { return i.naturalWidth; })});
  document.body.appendChild(d);
});
</script>"""


def chromium(args: list[str], profile: Path, timeout: int = 90) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def browser_verdict(html_path: Path, screenshot: Path | None = None) -> dict:
    """Load a copy of the page (with a probe script injected) in headless Chromium; the probe reports how many
    images there are, which did not load, and any JS error."""
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} is not installed: apt-get install -y --no-install-recommends chromium "
                    "(make test installs it)")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        page = html_path.read_text(encoding="utf-8")
        assert "<head>" in page
        probe = tmp / "probe.html"  # alone in its directory: images must come from the page itself
        probe.write_text(page.replace("<head>", "<head>" + VERDICT, 1), encoding="utf-8")
        res = chromium(["--dump-dom", "--virtual-time-budget=10000", probe.as_uri()], tmp / "profile")
        assert res.returncode == 0, res.stderr[-2000:]
        m = re.search(r'<pre id="__verdict">(.*?)</pre>', res.stdout, re.S)
        assert m, f"no verdict in the dumped DOM (page did not load?): {res.stderr[-2000:]}"
        if screenshot is not None:
            shutil.copy(html_path, tmp / "shot.html")
            chromium([f"--screenshot={screenshot}", "--window-size=1280,4000", "--hide-scrollbars",
                      (tmp / "shot.html").as_uri()], tmp / "profile2")
        return json.loads(html.unescape(m.group(1)))


# ------------------------------------------------------------------------------------------------ tests
@pytest.fixture(scope="module")
def fake_run(tmp_path_factory):
    return make_fake_run(tmp_path_factory.mktemp("fake") / "run")


def test_report_on_real_run(synthetic_run, tmp_path):
    run_dir = synthetic_run / "run"
    path = write_report(run_dir, tmp_path / "rep")
    assert path == tmp_path / "rep" / "report.html"
    page, pngs = check_written(path)
    assert pngs, "a real run has at least the activation-baseline layer figure"
    s = summary(run_dir)
    assert json.loads((path.parent / "summary.json").read_text()) == s
    assert check_summary_against_tables(run_dir, s) >= 10
    assert s["run"]["complete"] and s["run"]["paper_model"] == PAPER_MODEL
    assert PAPER_MODEL in page and s["run"]["model"] in page
    if s["locate"]["methods"]["kn"]["facts_without_neurons"] == s["locate"]["facts"]:
        assert "No knowledge neurons were found" in page
    text = format_summary(s)
    assert "knowledge neurons per fact" in text and "4.13" in text
    v = browser_verdict(path)
    assert v["images"] == len(pngs) and not v["broken"] and not v["errors"], v


def test_report_on_full_run(fake_run, tmp_path):
    path = write_report(fake_run)  # default: RUN_DIR/report
    assert path == fake_run / "report" / "report.html"
    page, pngs = check_written(path)
    assert [p.name for p in pngs] == ["fig1-locate-layers.png", "fig2-suppress-amplify.png",
                                      "fig3-suppress-controls.png", "fig4-activations.png", "fig5-update.png",
                                      "fig6-erase.png"]
    s = summary(fake_run)
    assert check_summary_against_tables(fake_run, s) >= 40
    # errors and skipped rows are counted, and shown
    iss = s["issues"]
    assert (iss["locate"]["errors"], iss["suppress"]["errors"], iss["update"]["skipped"],
            iss["erase"]["skipped"], iss["assess"]["errors"]) == (1, 1, 1, 1, 1)
    for msg in ("integrated gradients failed", "out of memory", "no knowledge neurons in the relation", "P937",
                "1 usable template(s)"):
        assert html.escape(msg) in page, msg
    assert s["erase"]["skipped"] == {"P106": "no knowledge neurons in the relation"}
    assert s["update"]["facts_without_neurons"] == 1
    assert s["activations"]["facts_with_neurons"] == 5  # the fact without neurons has NaN activations
    # the layer histogram, recomputed from the table
    with RunStore(fake_run) as store:
        loc = store.table("locate")
    layers = loc[loc["method"] == "kn"]["neurons"].explode().dropna().map(lambda n: n[0])
    expected = [float((layers == i).mean()) for i in range(N_LAYERS)]
    assert s["locate"]["methods"]["kn"]["layer_fraction"] == pytest.approx(expected)
    # a second report replaces the first, whole; a file the report did not write makes the directory foreign
    # (even one named like a figure), unless the report predates manifests (then the report's names count)
    (fake_run / "report" / "fig9-stale.png").write_bytes(b"x")
    with pytest.raises(KneuronsError, match=r"not a kneurons report \(fig9-stale.png\)"):
        write_report(fake_run)
    (fake_run / "report" / _io.MANIFEST).unlink()  # as written before manifests
    write_report(fake_run)
    assert not (fake_run / "report" / "fig9-stale.png").exists()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(KneuronsError, match="not a kneurons report"):
        write_report(fake_run, foreign)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    v = browser_verdict(path)
    assert v["images"] == 6 and not v["broken"] and not v["errors"], v
    assert min(v["widths"]) > 300


def test_bad_input(tmp_path, fake_run):
    out = tmp_path / "out"
    with pytest.raises(KneuronsError, match="does not exist"):
        write_report(tmp_path / "missing", out)
    (tmp_path / "notarun").mkdir()
    (tmp_path / "notarun" / "x.txt").write_text("x")
    with pytest.raises(KneuronsError, match="not a kneurons run"):
        write_report(tmp_path / "notarun", out)
    with pytest.raises(KneuronsError):
        summary(tmp_path / "notarun")
    bad = tmp_path / "corrupt"
    shutil.copytree(fake_run, bad, ignore=shutil.ignore_patterns("report"))
    (bad / "results.sqlite").write_bytes(b"this is not a database \x00\xff" * 200)
    with pytest.raises(KneuronsError, match="corrupt"):
        write_report(bad, out)
    with pytest.raises(KneuronsError, match="corrupt"):
        write_report(bad)
    assert not out.exists() and not (bad / "report").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt", "notarun"]  # no temporary directory left


def test_failure_leaves_previous_report(fake_run, tmp_path, monkeypatch):
    out = tmp_path / "rep"
    write_report(fake_run, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    import kneurons.report.render as render

    def boom(s, figs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(render, "render_html", boom)
    with pytest.raises(RuntimeError):
        write_report(fake_run, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    monkeypatch.undo()

    def half(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_io, "_publish_dir", half)
    with pytest.raises(KneuronsError, match="No space left on device"):
        write_report(fake_run, tmp_path / "new")
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep"]


def test_number_formats():
    from kneurons.report.numbers import format_value
    from kneurons.report.render import NA, fmt

    assert [format_value(v, u) for v, u in [(-1e-7, "fraction"), (-0.0, "activation"), (-0.001, "count"),
                                            (999.999, "ppl"), (999.99, "ppl"), (0.5, "fraction"),
                                            (-2e5, "fraction"), (None, "count"), ((-0.25, 1.5), "fraction_range")]] \
        == ["+0.00%", "0", "0.00", "1e+03", "999.99", "+50.00%", "-2e+07%", "n/a", "-25.00% .. +150.00%"]
    assert fmt(-0.25, "fraction") == "−25.00%" and fmt(-3.2e-5, "act") == "−3.2e−05"
    assert fmt((None, 0.1), "fraction_range") == f"{NA} .. +10.00%"
