"""The explorer's API (``kneurons serve``) on a tiny model: every endpoint answers what the library computes,
bad input is one inline line and the server stays up, requests that use the model are serialised, an edit reverts
bit-exactly (also when the request fails inside it), and Ctrl-C stops the command cleanly."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import numpy as np
import torch

import kneurons
from helpers import handle_for, word_tokenizer
from kneurons import interventions
from kneurons.attribution import METHODS, SCORES
from serving import Served
from tiny import tiny_model

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["the capital of france is ___ .", "france has its capital in ___", "the capital city of france is ___"]
CONTROLS = [{"group": "same_relation", "prompt": "the capital of italy is ___ .", "target": "rome"},
            {"group": "other_relation", "prompt": "paris speaks ___", "target": "french"}]
LOCATE = {"prompts": PROMPTS, "target": "paris", "steps": 4, "p": 0.3, "min_prompts": 1, "adaptive": False}


@pytest.fixture(scope="module")
def served():
    torch.manual_seed(0)
    s = Served(handle_for("llama", seed=3))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def located(served):
    """The page's first step: a located neuron set (and the library's own answer for the same request)."""
    job = served.wait_job(served.ok("/api/locate", LOCATE))
    assert job["state"] == "done", job
    return job


def _floats(b64: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(b64), dtype="<f4")


def test_info_offers_what_the_library_offers(served):
    info = served.ok("/api/info")
    h = served.handle
    assert info["model"]["n_layers"] == h.n_layers and info["model"]["d_ff"] == h.d_ff
    assert [m["name"] for m in info["methods"]] == list(METHODS)
    assert [s["name"] for s in info["scores"]] == list(SCORES)
    assert info["spaces"] == list(interventions.SPACES)
    assert info["update_methods"] == list(getattr(interventions, "UPDATE_METHODS", ()))
    assert info["runs"] is False and served.ok("/api/runs") == {"runs_dir": None, "runs": []}


def test_page_and_assets_need_nothing_from_the_network(served):
    status, html = served.call("/")
    assert status == 200 and "<canvas" in html
    for src in re.findall(r'(?:src|href)="([^"]+)"', html):
        assert src.startswith(("/static/", "data:")), src
        if src.startswith("/static/"):
            status, text = served.call(src)
            assert status == 200 and text
            assert not re.search(r"https?://|//cdn|@import", text), src


def test_predict_is_assess(served):
    out = served.ok("/api/predict", {"prompt": PROMPTS[0], "target": "paris", "top_k": 7})
    ref = kneurons.assess(served.handle, PROMPTS[0], "paris", top_k=7)[0]
    assert out["prob"] == pytest.approx(ref.prob, rel=1e-6) and out["rank"] == ref.rank
    assert [t["token"] for t in out["top"]] == [p.token for p in ref.top]
    assert [t["prob"] for t in out["top"]] == pytest.approx([p.prob for p in ref.top], rel=1e-6)
    assert out["edited"] is False


def test_predict_without_a_target_gives_the_top_k_at_the_blank(served):
    out = served.ok("/api/predict", {"prompt": PROMPTS[0], "top_k": 6})
    ref = kneurons.assess(served.handle, PROMPTS[0], "paris", top_k=6)[0]  # the top-k do not depend on the answer
    assert [t["token"] for t in out["top"]] == [p.token for p in ref.top]
    assert [t["prob"] for t in out["top"]] == pytest.approx([p.prob for p in ref.top], rel=1e-6)
    assert out["target"] is None and out["prob"] is None and out["rank"] is None


def test_locate_job_is_locate_with_progress_and_heatmap(served, located):
    h = served.handle
    ref = kneurons.locate(h, PROMPTS, "paris", steps=4, p=0.3, min_prompts=1, adaptive=False)
    res = located["result"]
    assert [tuple(n) for n in res["set"]["neurons"]] == ref.neurons and ref.neurons
    assert located["done"] == located["total"] == kneurons.attribution.rows_per_prompt(h, 4) * len(PROMPTS)
    heat = res["heatmap"]
    assert (heat["n_layers"], heat["d_ff"]) == (h.n_layers, h.d_ff)
    mean = torch.stack([a.scores.float() for a in ref.attributions]).mean(0)
    assert np.allclose(_floats(heat["scores"]), mean.flatten().numpy(), rtol=1e-5, atol=1e-8)
    acts = torch.stack([a.activations.float() for a in ref.attributions]).mean(0)
    assert np.allclose(_floats(heat["activations"]), acts.flatten().numpy(), rtol=1e-5, atol=1e-8)
    assert [(r["layer"], r["neuron"]) for r in res["table"]] == ref.neurons
    assert res["set"]["kind"] == "kneurons.KnowledgeNeurons"


def test_locate_with_the_contrastive_score(served):
    h = served.handle
    body = {**LOCATE, "score": "contrastive", "foils": ["berlin", "rome"]}
    res = served.wait_job(served.ok("/api/locate", body))["result"]
    ref = kneurons.locate(h, PROMPTS, "paris", steps=4, p=0.3, min_prompts=1, adaptive=False, score="contrastive",
                          foils=["berlin", "rome"])
    assert [tuple(n) for n in res["set"]["neurons"]] == ref.neurons
    assert res["set"]["params"]["foils"] == ["berlin", "rome"] and res["heatmap"]["score"] == "contrastive"


def test_locate_one_prompt_gives_its_coarse_neurons(served):
    job = served.wait_job(served.ok("/api/locate", {**LOCATE, "prompts": PROMPTS[:1]}))
    assert job["state"] == "done", job
    attr = kneurons.integrated_gradients(served.handle, PROMPTS[0], "paris", steps=4)
    assert [tuple(n) for n in job["result"]["set"]["neurons"]] == sorted(kneurons.coarse_neurons(attr, 0.2))


def test_predict_during_an_attribution_waits_and_is_not_corrupted(served):
    """Predicts arrive while an attribution is queued and running: each equals the predict alone, a second
    attribution is refused with a message, and the attribution equals the library's. (The test holds the model
    while it submits, so the attribution is still under way when the second one and the predicts arrive.)"""
    alone = served.ok("/api/predict", {"prompt": PROMPTS[1], "target": "paris", "top_k": 5})
    big = {**LOCATE, "steps": 50}
    answers = []
    threads = [threading.Thread(target=lambda: answers.append(
        served.ok("/api/predict", {"prompt": PROMPTS[1], "target": "paris", "top_k": 5}))) for _ in range(4)]
    with served.explorer.lock:
        job = served.ok("/api/locate", big)
        status, refused = served.call("/api/locate", big)
        assert status == 409 and "already running" in refused["error"]
        threads[0].start()
        threads[1].start()
    while served.ok(f"/api/jobs/{job['id']}")["state"] == "queued":
        time.sleep(0.01)
    threads[2].start()
    threads[3].start()
    job = served.wait_job(job)
    for t in threads:
        t.join(120)
    assert job["state"] == "done" and len(answers) == 4
    for a in answers:
        assert a["prob"] == pytest.approx(alone["prob"], rel=1e-6) and a["top"] == alone["top"]
    ref = kneurons.locate(served.handle, PROMPTS, "paris", steps=50, p=0.3, min_prompts=1, adaptive=False)
    assert [tuple(n) for n in job["result"]["set"]["neurons"]] == ref.neurons


def test_requests_wait_for_the_model_lock(served):
    """While something holds the model (as an attribution does), a predict is not answered; it is answered, the
    same as alone, once the model is free."""
    alone = served.ok("/api/predict", {"prompt": PROMPTS[0], "target": "paris"})
    done = threading.Event()
    out = {}
    with served.explorer.lock:
        t = threading.Thread(target=lambda: (out.update(served.ok("/api/predict", {"prompt": PROMPTS[0],
                                                                                  "target": "paris"})), done.set()))
        t.start()
        assert not done.wait(1.0)
    t.join(60)
    assert done.is_set() and out["prob"] == alone["prob"]


def test_explain_is_explain_neurons(served, located):
    neurons = located["result"]["set"]["neurons"]
    out = served.ok("/api/explain", {"neurons": neurons, "prompt": PROMPTS[0], "target": "paris", "top_k": 4,
                                     "top_facts": 0})
    ref = kneurons.explain_neurons(served.handle, neurons, top_k=4, prompt=PROMPTS[0], target="paris", top_facts=0)
    assert [(r["layer"], r["neuron"]) for r in out["rows"]] == list(zip(ref.layer, ref.neuron))
    assert [r["promotes"] for r in out["rows"]] == list(ref.promotes)
    assert [r["demotes"] for r in out["rows"]] == list(ref.demotes)
    assert [r["activation"] for r in out["rows"]] == pytest.approx(list(ref.activation), rel=1e-6)
    with_facts = served.ok("/api/explain", {"neurons": neurons, "top_facts": 2})
    assert all(isinstance(r["top_facts"], list) for r in with_facts["rows"])  # the tiny tokenizer spells none


def test_intervene_is_measure_intervention(served, located):
    neurons = located["result"]["set"]["neurons"]
    for factor in (0.0, 2.5):
        out = served.ok("/api/intervene", {"neurons": neurons, "prompts": PROMPTS, "target": "paris",
                                           "factor": factor, "controls": CONTROLS})
        ctrl = [(c["group"], c["prompt"], c["target"]) for c in CONTROLS]
        ref = kneurons.measure_intervention(served.handle, neurons, PROMPTS, "paris", factor, ctrl)
        assert [r["after"] for r in out["rows"]] == pytest.approx([r["after"] for r in ref.rows], rel=1e-6)
        assert [r["group"] for r in out["rows"]] == ["fact"] * 3 + ["same_relation", "other_relation"]
        assert out["summary"]["specificity"] == pytest.approx(ref.specificity, rel=1e-6)
        with kneurons.amplify(served.handle, neurons, factor):
            after = kneurons.assess(served.handle, PROMPTS[0], "paris", top_k=5)[0]
        assert out["after"]["prob"] == pytest.approx(after.prob, rel=1e-6)
        assert [t["token"] for t in out["after"]["top"]] == [p.token for p in after.top]
        assert out["before"]["prob"] == pytest.approx(out["rows"][0]["before"], rel=1e-5)  # batch of 5 vs 1
    assert served.ok("/api/predict", {"prompt": PROMPTS[0], "target": "paris"})["prob"] == pytest.approx(
        out["before"]["prob"], rel=1e-6)  # nothing left switched off


def test_update_then_revert_is_bit_exact(served, located):
    h = served.handle
    neurons = located["result"]["set"]["neurons"]
    digest = interventions.weights_digest(h.model)
    body = {"neurons": neurons, "prompts": PROMPTS, "target": "paris", "new": "rome", "controls": CONTROLS,
            "lambda1": 1.0, "lambda2": 4.0, "space": "embedding"}
    with kneurons.update_fact(h, neurons, "paris", "rome", prompt=PROMPTS[0], lambda2=4.0):
        ref = kneurons.assess(h, PROMPTS, "rome")
    out = served.ok("/api/update", body)
    assert out["edited"] is True and out["edit"]["new"] == "rome" and out["edit"]["slots"] == len(neurons)
    assert [r["p_new"] for r in out["after"]["prompts"]] == pytest.approx([a.prob for a in ref], rel=1e-6)
    assert interventions.weights_digest(h.model) != digest
    assert served.ok("/api/state")["edited"] is True
    assert served.ok("/api/predict", {"prompt": PROMPTS[0], "target": "rome"})["edited"] is True
    status, again = served.call("/api/update", body)
    assert status == 400 and "revert" in again["error"]
    state = served.ok("/api/revert", {})
    assert state["edited"] is False and state["last_check"] == {"digest": digest, "identical": True}
    assert interventions.weights_digest(h.model) == digest == state["original_digest"]
    status, none = served.call("/api/revert", {})
    assert status == 400 and "not edited" in none["error"]


def test_update_with_each_space_and_method_the_info_lists(served, located):
    neurons = located["result"]["set"]["neurons"]
    digest = served.explorer.original_digest
    info = served.ok("/api/info")
    for space in info["spaces"]:
        out = served.ok("/api/update", {"neurons": neurons, "prompts": PROMPTS[:2], "target": "paris", "new": "rome",
                                        "space": space, "lambda2": 2.0})
        assert out["edit"]["space"] == space
        assert served.ok("/api/revert", {})["last_check"]["identical"] is True
    for method in info["update_methods"]:  # the library's own list, where it has one
        out = served.ok("/api/update", {"neurons": neurons, "prompts": PROMPTS[:2], "target": "paris", "new": "rome",
                                        "method": method})
        assert out["edited"] is True and out["edit"].get("method", method) == method
        assert served.ok("/api/revert", {})["last_check"]["identical"] is True
    assert interventions.weights_digest(served.handle.model) == digest


def test_an_exception_inside_an_edit_leaves_the_model_unedited(served, located, monkeypatch):
    from kneurons.experiments import update as update_mod

    real = update_mod.measure_update
    calls = []

    def failing(*a, **kw):  # the scoring after the edit fails
        calls.append(1)
        if len(calls) == 2:
            assert interventions.applied_edits(served.handle)  # the edit was applied at this point
            raise RuntimeError("boom inside the edit")
        return real(*a, **kw)

    monkeypatch.setattr(update_mod, "measure_update", failing)
    status, out = served.call("/api/update", {"neurons": located["result"]["set"]["neurons"], "prompts": PROMPTS,
                                              "target": "paris", "new": "rome"})
    assert status == 500 and "boom inside the edit" in out["error"] and len(calls) == 2
    assert served.ok("/api/state")["edited"] is False
    assert not interventions.applied_edits(served.handle)
    assert interventions.weights_digest(served.handle.model) == served.explorer.original_digest


def test_neuron_set_upload_is_the_library_json(served, located, tmp_path):
    as_dict = located["result"]["set"]
    out = served.ok("/api/neurons/load", as_dict)
    assert out["set"]["neurons"] == as_dict["neurons"] and out["set"]["prompts"] == PROMPTS
    assert out["heatmap"] is None  # a saved set has no attributions
    path = tmp_path / "kn.json"  # what the browser downloads is what KnowledgeNeurons.load reads
    path.write_text(json.dumps(as_dict))
    assert kneurons.KnowledgeNeurons.load(path).neurons == [tuple(n) for n in as_dict["neurons"]]
    for raw, fragment in ((b"{not json", "not a readable"), (b'{"kind": "other"}', "not a kneurons"),
                          (json.dumps({**as_dict, "neurons": [[0, 999]]}).encode(), "out of range"),
                          (b"  ", "empty neuron file")):
        status, err = served.call("/api/neurons/load", raw=raw)
        assert status == 400 and fragment in err["error"] and "\n" not in err["error"], (raw, err)


BAD = [
    ("/api/predict", {"prompt": "no blank here", "target": "paris"}, 400, "no blank"),
    ("/api/predict", {"prompt": PROMPTS[0], "target": "  "}, 400, "empty target"),
    ("/api/predict", {"prompt": "no blank"}, 400, "no blank"),
    ("/api/predict", {"prompt": PROMPTS[0], "target": "paris", "top_k": 0}, 400, "top_k"),
    ("/api/predict", {"prompt": PROMPTS[0], "target": "paris", "bogus": 1}, 400, "bogus"),
    ("/api/predict", {"prompt": "the ___ is the capital .", "target": "paris"}, 400, "blank must end"),
    ("/api/predict", {"prompt": "x " * 1500 + "___", "target": "paris"}, 400, "prompt"),
    ("/api/locate", {**LOCATE, "method": "magic"}, 400, "magic"),
    ("/api/locate", {**LOCATE, "score": "magic"}, 400, "magic"),
    ("/api/locate", {**LOCATE, "score": "contrastive"}, 400, "needs foils"),
    ("/api/locate", {**LOCATE, "foils": ["rome"]}, 400, "only by a contrastive"),
    ("/api/locate", {**LOCATE, "p": 1.5}, 400, "p must be in (0, 1]"),
    ("/api/locate", {**LOCATE, "threshold": 0}, 400, "threshold must be in (0, 1]"),
    ("/api/locate", {**LOCATE, "steps": 0}, 400, "steps"),
    ("/api/locate", {**LOCATE, "steps": 10_000}, 400, "steps"),
    ("/api/locate", {**LOCATE, "prompts": []}, 400, "prompts"),
    ("/api/locate", {**LOCATE, "prompts": PROMPTS * 10}, 400, "prompts"),
    ("/api/locate", {**LOCATE, "target": ""}, 400, "empty target"),
    ("/api/explain", {"neurons": [[0, 999]]}, 400, "out of range"),
    ("/api/explain", {"neurons": [[0, 1, 2]]}, 400, "pair"),
    ("/api/explain", {"neurons": []}, 400, "neurons"),
    ("/api/explain", {"neurons": [[0, 1]], "prompt": PROMPTS[0]}, 400, "needs its target"),
    ("/api/intervene", {"neurons": [[0, 1]], "prompts": PROMPTS, "target": "paris", "factor": 1e9}, 400,
     "factor must be"),
    ("/api/intervene", {"neurons": [[5, 1]], "prompts": PROMPTS, "target": "paris", "factor": 0}, 400,
     "out of range"),
    ("/api/intervene", {"neurons": [[0, 1]], "prompts": PROMPTS, "target": "paris", "factor": 0,
                        "controls": [{"group": "nonsense", "prompt": PROMPTS[0], "target": "paris"}]}, 400,
     "control group"),
    ("/api/intervene", {"neurons": [[0, 1]], "prompts": PROMPTS, "target": "paris", "factor": 0,
                        "controls": [{"group": "same_relation", "prompt": "no blank", "target": "rome"}]}, 400,
     "no blank"),
    ("/api/update", {"neurons": [[0, 1]], "prompts": PROMPTS, "target": "paris", "new": "paris"}, 400,
     "equals the old one"),
    ("/api/update", {"neurons": [[0, 1]], "prompts": PROMPTS, "target": "paris", "new": "rome", "space": "x"},
     400, "space must be"),
    ("/api/update", {"neurons": [[0, 1]], "prompts": PROMPTS, "target": "paris", "new": "rome", "method": "x"},
     400, "update method"),
    ("/api/update", {"neurons": [[0, 1]], "prompts": PROMPTS, "target": "paris", "new": "rome", "lambda2": 1e12},
     400, "lambda2"),
    ("/api/update", {"neurons": [[0, 1]], "prompts": PROMPTS, "target": "paris", "new": " "}, 400, "empty target"),
    ("/api/jobs/nope", None, 404, "no such job"),
    ("/api/nothing", None, 404, "Not Found"),
    ("/runs/x/report/report.html", None, 404, "no run"),
]


@pytest.mark.parametrize("path, body, status, fragment", BAD, ids=[f"{b[0]} {b[3]}" for b in BAD])
def test_bad_input_is_one_inline_line_and_the_server_stays_up(served, path, body, status, fragment):
    digest = served.explorer.original_digest
    got, out = served.call(path, body)
    assert got == status, out
    assert fragment in out["error"] and "\n" not in out["error"] and "Traceback" not in out["error"], out
    assert served.ok("/api/predict", {"prompt": PROMPTS[0], "target": "paris"})["rank"] >= 1
    assert served.ok("/api/state")["edited"] is False
    assert interventions.weights_digest(served.handle.model) == digest


def test_oversized_and_malformed_requests(served):
    status, out = served.call("/api/predict", raw=b'{"prompt": "' + b"x" * (3 << 20) + b'"}')
    assert status == 413 and "too large" in out["error"]
    status, out = served.call("/api/predict", raw=b"{not json")
    assert status == 400 and "JSON" in out["error"]
    status, out = served.call("/api/intervene", raw=b'{"neurons": [[0, 1]], "prompts": ["a ___"], "target": "a", '
                                                   b'"factor": NaN}')
    assert status == 400 and "factor must be" in out["error"]
    assert served.ok("/api/state")["edited"] is False


def test_runs_are_listed_and_their_reports_served(tmp_path):
    from kneurons.experiments import RunStore

    runs = tmp_path / "runs"
    with RunStore.open(runs / "first", {"model": "tiny", "steps": 20}) as st:
        st.put("assess", "a:0", "a", [{"fact_id": "a:0", "known": True}])
    (runs / "first" / "report").mkdir()
    (runs / "first" / "report" / "report.html").write_text("<html>the report</html>")
    RunStore.open(runs / "second", {"model": "tiny"}).close()
    (runs / "not-a-run").mkdir()
    (tmp_path / "secret.txt").write_text("TOP-SECRET-CONTENT")
    s = Served(handle_for("gpt2"), runs)
    try:
        listing = s.ok("/api/runs")
        assert listing["runs_dir"] == "runs" and [r["name"] for r in listing["runs"]] == ["first", "second"]
        assert listing["runs"][0]["report"] == "/runs/first/report/report.html"
        assert listing["runs"][1]["report"] is None
        status, page = s.call(listing["runs"][0]["report"])
        assert status == 200 and "the report" in page
        for path in ("/runs/first/report/../../../secret.txt", "/runs/first/report/%2e%2e/%2e%2e/%2e%2e/secret.txt",
                     "/runs/not-a-run/report/x", "/runs/second/report/report.html"):
            status, out = s.call(path)
            assert status == 404 and "TOP-SECRET" not in json.dumps(out), (path, out)
        assert s.ok("/api/info")["runs"] is True
    finally:
        s.stop()


def test_serve_prints_its_url_and_stops_cleanly_on_ctrl_c(tmp_path):
    model = tmp_path / "model"
    tiny_model("llama").save_pretrained(model)
    word_tokenizer("causal").save_pretrained(model)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "kneurons", "serve", "--model", str(model), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # not inherited SIG_IGN
    try:
        line = proc.stdout.readline()  # printed once the model is loaded and the app built
        m = re.search(r"(http://127\.0\.0\.1:\d+/)", line)
        assert m, (line, proc.stderr.read() if proc.poll() is not None else "")
        import urllib.request

        with urllib.request.urlopen(m.group(1) + "api/info", timeout=60) as res:
            assert json.loads(res.read())["model"]["type"] == "llama"
        import urllib.error

        foreign = urllib.request.Request(m.group(1) + "api/info", headers={"Host": "attacker.example"})
        with pytest.raises(urllib.error.HTTPError) as refused:  # a page on another name (DNS rebinding)
            urllib.request.urlopen(foreign, timeout=60)
        assert refused.value.code == 400
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = proc.stderr.read()
    assert rc == 0, err
    assert "explorer stopped" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # nothing written


def test_serve_refuses_a_busy_port_before_loading(tmp_path, capsys):
    from kneurons.cli import main
    from kneurons.server import bind

    busy = bind("127.0.0.1", 0)
    try:
        port = busy.getsockname()[1]
        code = main(["serve", "--model", str(tmp_path / "no-model-here"), "--port", str(port)])
    finally:
        busy.close()
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.startswith(f"kneurons: error: cannot listen on 127.0.0.1:{port}") and len(err.splitlines()) == 1


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "bert"])
def test_observing_blocks_changes_no_attribution(model_type, one_thread):
    """The explorer's heartbeat (kneurons.hooks.observe_blocks) sees every block forward and backward during an
    attribution and leaves its numbers bit-identical."""
    from kneurons.hooks import observe_blocks

    h = handle_for(model_type, dtype=torch.float64)
    prompt = "the capital of france is [MASK] ." if h.is_masked else PROMPTS[0]
    plain = kneurons.integrated_gradients(h, prompt, "paris", steps=5)
    seen = []
    with observe_blocks(h.arch, lambda layer, direction: seen.append((layer, direction))):
        observed = kneurons.integrated_gradients(h, prompt, "paris", steps=5)
    assert torch.equal(plain.scores, observed.scores) and plain.base_score == observed.base_score
    assert {(l, d) for l in range(h.n_layers) for d in ("forward", "backward")} <= set(seen)
    n = len(seen)
    kneurons.assess(h, prompt, "paris")
    assert len(seen) == n  # removed on exit
