"""Speed of the explorer (``kneurons serve``) on a model, against the library and the command line in the same run.

* **predict round trip**: ``POST /api/predict`` over HTTP on the loopback (JSON in, JSON out), against
  :func:`kneurons.assess` called directly on the same loaded model;
* **locate from 3 paraphrases**: the explorer's job (``POST /api/locate``, then polling ``/api/jobs/{id}`` every
  0.1 s as a client would, until done) against :func:`kneurons.locate` in-process and against ``kneurons locate``
  (the time it prints for locating; its model load is not counted), alternated so that load from other work
  falls on both; plus the longest gap between two progress updates a polling client saw.

    python benchmarks/serve_speed.py [--model smollm2-135m] [--repeats 2]

Numbers go in README.md ("Explorer"); nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["The capital of France is [Y].", "The capital city of France is [Y].",
           "The capital of France is the city of [Y]."]


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as res:
        return json.loads(res.read())


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=600) as res:
        return json.loads(res.read())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--repeats", type=int, default=2, help="locate runs per way (alternated)")
    ap.add_argument("--predicts", type=int, default=30)
    args = ap.parse_args()

    import torch
    import uvicorn

    import kneurons
    from kneurons.server import bind, create_app, url_of

    h = kneurons.load_model(args.model)
    print(f"model {h.name}: {h.n_layers} layers x {h.d_ff}, torch threads {torch.get_num_threads()}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, load average {os.getloadavg()[0]:.2f}")
    sock = bind("127.0.0.1", 0)
    url = url_of(sock)
    server = uvicorn.Server(uvicorn.Config(create_app(h), log_level="warning", access_log=False, lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)

    # predict: round trip vs the library
    body = {"prompt": PROMPTS[0], "target": "Paris", "top_k": 10}
    post(url + "api/predict", body)
    kneurons.assess(h, PROMPTS[0], "Paris", top_k=10)
    rt, lib = [], []
    for _ in range(args.predicts):
        t = time.perf_counter()
        post(url + "api/predict", body)
        rt.append(time.perf_counter() - t)
        t = time.perf_counter()
        kneurons.assess(h, PROMPTS[0], "Paris", top_k=10)
        lib.append(time.perf_counter() - t)
    q = lambda xs, f: sorted(xs)[min(len(xs) - 1, int(f * len(xs)))] * 1000  # noqa: E731
    print(f"predict round trip: median {statistics.median(rt) * 1000:.1f} ms, p90 {q(rt, 0.9):.1f} ms, max "
          f"{max(rt) * 1000:.1f} ms; kneurons.assess alone: median {statistics.median(lib) * 1000:.1f} ms "
          f"({args.predicts} each, alternated)")

    # locate from 3 paraphrases: server job vs library vs CLI
    loc = {"prompts": PROMPTS, "target": "Paris", "steps": 20, "adaptive": True}
    server_t, lib_t, cli_t, gaps = [], [], [], []
    server_c, lib_c = [], []  # CPU time of this process (the server's threads included): less sensitive to other load
    neurons = {}
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    for r in range(args.repeats):
        t, c = time.perf_counter(), time.process_time()
        job = post(url + "api/locate", loc)
        seen = {"rows": (-1, time.perf_counter(), 0.0), "shown": (None, time.perf_counter(), 0.0)}
        while job["state"] in ("queued", "running"):
            time.sleep(0.1)
            job = get(url + f"api/jobs/{job['id']}")
            now = time.perf_counter()
            for what, value in (("rows", job["done"]), ("shown", (job["done"], job["beats"]))):
                last, last_t, gap = seen[what]
                if value != last:  # the rows done (per pass), or what the page shows (rows, block heartbeat)
                    seen[what] = (value, now, max(gap, now - last_t) if job["state"] == "running" and last not in
                                  (-1, None) else gap)
        server_t.append(time.perf_counter() - t)
        server_c.append(time.process_time() - c)
        gaps.append((seen["rows"][2], seen["shown"][2]))
        assert job["state"] == "done", job
        neurons["server"] = [tuple(n) for n in job["result"]["set"]["neurons"]]
        t, c = time.perf_counter(), time.process_time()
        kn = kneurons.locate(h, PROMPTS, "Paris", steps=20, adaptive=True)
        lib_t.append(time.perf_counter() - t)
        lib_c.append(time.process_time() - c)
        neurons["library"] = kn.neurons
        if r == 0:  # the CLI loads its own model: once, after the first pair
            cmd = [sys.executable, "-m", "kneurons", "locate", "--target", "Paris", "--adaptive", *PROMPTS]
            if args.model:
                cmd[3:3] = ["--model", args.model]
            res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
            m = re.search(r"in ([\d.]+)s \(", res.stdout)
            assert res.returncode == 0 and m, res.stderr[-2000:]
            cli_t.append(float(m.group(1)))
    server.should_exit = True
    thread.join(30)
    same = neurons["server"] == neurons["library"]
    print(f"locate, 3 paraphrases, 20 steps: explorer job {' '.join(f'{x:.2f}' for x in server_t)} s (client "
          f"wall, polling 0.1 s); kneurons.locate {' '.join(f'{x:.2f}' for x in lib_t)} s; kneurons locate (its "
          f"printed time) {' '.join(f'{x:.2f}' for x in cli_t)} s")
    print(f"CPU seconds: explorer job {' '.join(f'{x:.2f}' for x in server_c)}; kneurons.locate "
          f"{' '.join(f'{x:.2f}' for x in lib_c)}; ratio of medians {statistics.median(server_c) / statistics.median(lib_c):.3f}")
    print(f"explorer / library: {min(server_t) / min(lib_t):.3f} (best of {args.repeats} each); explorer / CLI: "
          f"{min(server_t) / min(cli_t):.3f}; same neurons: {same}; longest gap between updates seen by a client "
          f"polling every 0.1 s: of the rows done {max(g[0] for g in gaps):.2f} s, of the progress shown (rows and "
          f"block heartbeat) {max(g[1] for g in gaps):.2f} s")


if __name__ == "__main__":
    main()
