"""Make docs/explorer.png: ``kneurons serve`` on a model (default the embedded SmolLM2-135M), driven in Debian's
headless Chromium through Playwright: locate the built-in example fact, explain its neurons, suppress them.

    python docs/screenshot.py [--model M] [--out docs/explorer.png]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--out", default=str(ROOT / "docs" / "explorer.png"))
    ap.add_argument("--full", default=None, help="also a full-page screenshot here")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    cmd = [sys.executable, "-m", "kneurons", "serve", "--port", "0"] + (["--model", args.model] if args.model else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    try:
        url = re.search(r"(http://\S+/)", proc.stdout.readline()).group(1)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1300, "height": 1000})
            page.set_default_timeout(600_000)
            page.goto(url)
            page.wait_for_selector("#model-state.original")
            page.click("#predict-btn")
            page.wait_for_selector("#predict-summary")
            page.click("#locate-btn")
            page.wait_for_selector("#neurons-table tr:nth-child(2)")
            page.click("#explain-btn")
            page.wait_for_selector("#explain-table tr:nth-child(2)")
            page.click("#suppress-btn")
            page.wait_for_selector("#intervene-summary")
            page.evaluate("window.scrollTo(0, document.getElementById('locate-panel').offsetTop - 50)")
            box = page.locator("#heatmap").bounding_box()
            page.mouse.move(box["x"] + box["width"] * 0.6, box["y"] + box["height"] - 4)
            page.screenshot(path=args.out)
            if args.full:
                page.screenshot(path=args.full, full_page=True)
            browser.close()
    finally:
        proc.terminate()
        proc.wait(60)


if __name__ == "__main__":
    main()
