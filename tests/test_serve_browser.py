"""The explorer in a real browser: Debian's headless Chromium driven by Playwright (the system browser, nothing
downloaded), against ``kneurons serve``'s app on a tiny model. Types a prompt and a target, locates, checks the
heatmap is drawn and the neuron table filled, suppresses the neurons and sees the probability fall, updates and
reverts (the digest check shown), downloads and uploads the neuron set, shows an inline error — and the console
stays clean. Screenshots go to the test's temporary directory (``KNEURONS_SCREENSHOTS=DIR`` copies them there)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from playwright import sync_api  # the dev extra installs it; the browser is Debian's (make browser)

import kneurons
from helpers import handle_for
from kneurons.interventions import weights_digest
from serving import Served

CHROMIUM = "/usr/bin/chromium"
PROMPTS = ["the capital of france is ___ .", "france has its capital in ___", "the capital city of france is ___"]
CONTROLS = "same_relation | the capital of italy is ___ . | rome\nother_relation | paris speaks ___ | french"
TIMEOUT = 120_000  # ms: generous, never a speed assertion


def _number(text: str) -> float:
    return float(text.strip())


def test_explorer_in_chromium(tmp_path):
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} is not installed: apt-get install -y --no-install-recommends chromium (make browser)")
    from kneurons.experiments import RunStore

    runs = tmp_path / "runs"
    with RunStore.open(runs / "tiny-run", {"model": "tiny", "steps": 20}) as st:
        st.put("assess", "a:0", "a", [{"fact_id": "a:0", "known": True}])
    (runs / "tiny-run" / "report").mkdir()
    (runs / "tiny-run" / "report" / "report.html").write_text("<html><body><h1>the tiny run's report</h1></body></html>")
    served = Served(handle_for("llama", seed=3), runs)
    digest = weights_digest(served.handle.model)
    problems: list[str] = []
    expected_400 = []
    shots = []
    try:
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                         args=["--no-sandbox", "--disable-gpu", "--no-first-run"])
            page = browser.new_page(viewport={"width": 1300, "height": 900}, accept_downloads=True)
            page.set_default_timeout(TIMEOUT)
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
            page.goto(served.url)
            page.wait_for_function("document.getElementById('model-name').textContent.includes('llama')")
            # the state comes from a second request, after the model's name (under load it may not be there yet)
            page.wait_for_function("document.getElementById('model-state').textContent !== '…'")
            assert page.inner_text("#model-state") == "original weights"
            methods = page.eval_on_selector_all("#locate-method option", "os => os.map(o => o.value)")
            assert methods == list(kneurons.attribution.METHODS)

            # the runs under --runs, each report one click away
            page.wait_for_selector("#runs-table tr:nth-child(2)")
            assert "tiny-run" in page.inner_text("#runs-table")
            with page.context.expect_page() as report_page:
                page.click("#runs-table a")
            report_page.value.wait_for_selector("h1")
            assert report_page.value.inner_text("h1") == "the tiny run's report"
            report_page.value.close()

            # predict
            page.fill("#predict-prompt", PROMPTS[0])
            page.fill("#predict-target", "paris")
            page.click("#predict-btn")
            page.wait_for_selector("#predict-summary")
            ref = kneurons.assess(served.handle, PROMPTS[0], "paris")[0]
            assert f"rank {ref.rank}" in page.inner_text("#predict-summary")
            page.fill("#predict-target", "")  # no target: the top-k only
            page.click("#predict-btn")
            page.wait_for_function("document.getElementById('predict-summary').textContent.startsWith('top-10')")

            # attribute and locate
            page.fill("#locate-prompts", "\n".join(PROMPTS))
            page.fill("#locate-target", "paris")
            page.fill("#locate-steps", "4")
            page.fill("#locate-p", "0.3")
            page.fill("#locate-min", "1")
            page.uncheck("#locate-adaptive")
            page.fill("#controls", CONTROLS)
            page.click("#locate-btn")
            page.wait_for_selector("#neurons-table tr:nth-child(2)")
            assert page.inner_text("#locate-progress").startswith("done: ")
            kn = kneurons.locate(served.handle, PROMPTS, "paris", steps=4, p=0.3, min_prompts=1, adaptive=False)
            rows = page.eval_on_selector_all("#neurons-table tr", "rs => rs.slice(1).map(r => "
                                             "[...r.cells].slice(1, 3).map(c => Number(c.textContent)))")
            assert [tuple(r) for r in rows] == kn.neurons
            drawn = page.evaluate("""() => { const c = document.getElementById('heatmap');
                const d = c.getContext('2d').getImageData(36, 0, c.width - 36, c.height).data; let n = 0;
                for (let k = 0; k < d.length; k += 4) if (d[k] < 250 || d[k + 1] < 250 || d[k + 2] < 250) n++;
                return {w: c.width, h: c.height, colored: n}; }""")
            assert drawn["w"] > 36 and drawn["h"] > 0 and drawn["colored"] > 100, drawn
            box = page.locator("#heatmap").bounding_box()
            page.mouse.move(box["x"] + box["width"] - 3, box["y"] + 3)  # the last neuron of layer 0
            page.wait_for_selector("#tooltip:not([hidden])")
            tip = page.inner_text("#tooltip")
            d_ff = served.handle.d_ff
            assert f"layer 0, neuron {d_ff - 1}" in tip and "score" in tip and "activation" in tip, tip
            shots.append(tmp_path / "explorer-located.png")
            page.screenshot(path=str(shots[-1]), full_page=True)

            # what the neurons write
            page.click("#explain-btn")
            page.wait_for_selector("#explain-table tr:nth-child(2)")
            assert page.locator("#explain-table tr").count() == len(kn.neurons) + 1

            # suppress: the fact's probability falls
            page.click("#suppress-btn")
            page.wait_for_selector("#intervene-summary")
            cells = page.eval_on_selector_all("#intervene-rows tr", "rs => rs.slice(1).map(r => "
                                              "[r.cells[0].textContent, r.cells[3].textContent, r.cells[4].textContent])")
            facts = [(float(b), float(a)) for g, b, a in cells if g == "fact"]
            assert len(facts) == 3 and all(a < b for b, a in facts), cells
            assert [g for g, _, _ in cells][3:] == ["same_relation", "other_relation"]
            assert "specificity" in page.inner_text("#intervene-summary")
            shots.append(tmp_path / "explorer-suppressed.png")
            page.screenshot(path=str(shots[-1]), full_page=True)

            # update and revert
            page.fill("#update-new", "rome")
            page.fill("#update-l2", "4")
            page.click("#update-btn")
            page.wait_for_selector("#update-summary")
            assert "EDITED" in page.inner_text("#model-state")
            assert "edited" in page.get_attribute("#model-state", "class")
            assert weights_digest(served.handle.model) != digest
            shots.append(tmp_path / "explorer-edited.png")
            page.screenshot(path=str(shots[-1]), full_page=True)
            page.click("#revert-btn")
            page.wait_for_selector("#revert-summary")
            assert "bit-identical" in page.inner_text("#revert-summary")
            assert page.inner_text("#model-state") == "original weights"
            assert "bit-identical" in page.inner_text("#digest-check")
            assert weights_digest(served.handle.model) == digest

            # download the neuron set as the library's JSON, upload it again
            with page.expect_download() as dl:
                page.click("#save-btn")
            saved = tmp_path / "neurons.json"
            dl.value.save_as(saved)
            assert kneurons.KnowledgeNeurons.load(saved).neurons == kn.neurons
            page.click("#clear-btn")
            assert page.inner_text("#selection") == "none"
            page.set_input_files("#load-file", str(saved))
            page.wait_for_function(f"document.getElementById('selection').textContent.split(',').length == "
                                   f"{len(kn.neurons)}")

            # bad input: an inline error, the server stays up
            page.fill("#predict-target", " ")
            expected_400.append("/api/predict")
            page.click("#predict-btn")
            page.wait_for_selector("#predict-error:not(:empty)")
            assert "empty target" in page.inner_text("#predict-error")
            page.fill("#predict-target", "paris")
            page.click("#predict-btn")
            page.wait_for_function("document.getElementById('predict-error').textContent === ''")
            browser.close()
    finally:
        served.stop()
        keep = os.environ.get("KNEURONS_SCREENSHOTS")
        if keep:
            Path(keep).mkdir(parents=True, exist_ok=True)
            for s in shots:
                if s.exists():
                    shutil.copy(s, Path(keep) / s.name)
    # the one deliberate bad request is logged by Chromium as a failed resource (status 400); nothing else
    unexpected = [p for p in problems if not ("status of 400" in p and expected_400)]
    assert len(problems) - len(unexpected) <= len(expected_400)
    assert not unexpected, unexpected
