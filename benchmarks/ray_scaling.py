"""What Ray costs and what it buys: ``kneurons run`` on the synthetic world in process vs on a local Ray pool.

    .venv/bin/python benchmarks/ray_scaling.py                 # ~5 min on 2 CPU cores
    .venv/bin/python benchmarks/ray_scaling.py --facts 10      # smaller

Trains the tests' tiny synthetic world (GPT-2 type, 4 relations; one thread, ~20 s), saves it, then in this one
process, every compute on one torch thread:

- overhead: the whole run (model load and every experiment, as ``kneurons run`` does it) in process vs with
  ``RayPool("local:1")`` (1 worker, launched before the driver loads its model); per phase, and Ray's fixed costs
  (starting the local cluster, waiting for the worker, stopping it);
- scaling: the locate phase (timed inside ``--experiments assess locate``) with 1 worker vs 2
  workers: facts per hour, and the driver's own CPU time (``time.process_time``) over the phase's wall time
  while the 2 workers run.

Ratios are measured in the same process, back to back; the machine's other load adds noise (rerun to compare).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from kneurons import load_model  # noqa: E402
from kneurons.experiments import RunConfig, RunStore, registry, run  # noqa: E402
from kneurons.experiments.ray_pool import RayPool  # noqa: E402


class Timed:
    """Wall and driver-CPU seconds spent in each experiment's ``run`` (its units included: it joins them)."""

    def __init__(self):
        self.wall, self.cpu = {}, {}
        self.orig = dict(registry.EXPERIMENTS)
        for name, e in self.orig.items():
            registry.EXPERIMENTS[name] = dataclasses.replace(e, run=self._wrap(name, e.run))

    def _wrap(self, name, fn):
        def timed(runner):
            w, c = time.perf_counter(), time.process_time()
            fn(runner)
            self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - w
            self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - c
        return timed

    def reset(self):
        self.wall, self.cpu = {}, {}


class TimedPool(RayPool):
    """A pool that remembers how long its fixed costs took: connecting (for ``local:N``: starting the cluster),
    waiting for the workers once the driver is ready (what their start and model load did not overlap), closing
    (stopping the workers and the local cluster)."""

    def connect(self):
        t = time.perf_counter()
        super().connect()
        self.connect_seconds = time.perf_counter() - t

    def start(self, *a, **kw):
        t = time.perf_counter()
        super().start(*a, **kw)
        self.start_seconds = time.perf_counter() - t

    def close(self):
        t = time.perf_counter()
        super().close()
        self.close_seconds = time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--facts", type=int, default=20, help="known facts per relation (4 relations)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=2, help="runs of each setting (the fastest is reported)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from runs import world_and_model

    base = Path(tempfile.mkdtemp(prefix="kneurons-ray-bench-"))
    world_and_model(base)
    cfg = RunConfig(model=str(base / "model"), data=str(base / "data"), facts_per_relation=args.facts,
                    steps=args.steps, erase_relations=["born_in", "speaks"], erase_top_k=5, min_prompts=2,
                    max_candidates=30)
    timed = Timed()

    def one(out, executor=None, **kw):
        """The whole command as ``kneurons run`` does it: (with Ray: connect, launch the workers,) load the
        driver's model, run every phase (with Ray: wait for the workers, check their weights; close the pool)."""
        c = dataclasses.replace(cfg, **kw)
        timed.reset()
        t = time.perf_counter()
        if executor is not None:
            executor.connect()
            executor.launch(c)
        h = load_model(c.model, device="cpu")
        st = run(c, base / out, handle=h, progress=False, executor=executor)
        wall = time.perf_counter() - t
        n = st.counts()
        st.close()
        return wall, dict(timed.wall), dict(timed.cpu), n

    print(f"synthetic world: 4 relations, up to {args.facts} known facts each, m = {args.steps}; torch threads 1 "
          f"(driver and workers); {os.cpu_count()} cores, load average before: {os.getloadavg()[0]:.2f}")
    best: dict[str, tuple] = {}
    for r in range(args.repeats):  # interleaved, the fastest of each kept: the machine's other load varies
        for name in ("in process", "ray 1 worker"):
            pool = TimedPool("local:1", threads_per_worker=1) if name != "in process" else None
            wall, ph, _, n = one(f"all-{name[:3]}-{r}", pool)
            if name not in best or wall < best[name][0]:
                best[name] = (wall, ph, n, (pool.connect_seconds, pool.start_seconds, pool.close_seconds)
                              if pool else None)
    (w0, ph0, n0, _), (w1, ph1, n1, (conn1, start1, close1)) = best["in process"], best["ray 1 worker"]
    assert n0 == n1, (n0, n1)
    print(f"\n## overhead: the whole run ({sum(n0.values())} units), in process vs 1 Ray worker (best of "
          f"{args.repeats}, interleaved)")
    print(f"{'phase':<12} {'in process s':>12} {'ray 1 worker s':>15} {'ratio':>6}")
    for name in ph0:
        print(f"{name:<12} {ph0[name]:>12.1f} {ph1[name]:>15.1f} {ph1[name] / ph0[name]:>6.2f}")
    print(f"{'all phases':<12} {sum(ph0.values()):>12.1f} {sum(ph1.values()):>15.1f} "
          f"{sum(ph1.values()) / sum(ph0.values()):>6.2f}")
    print(f"{'whole run':<12} {w0:>12.1f} {w1:>15.1f} {w1 / w0:>6.2f}   (model load and every phase)")
    print(f"Ray's fixed costs in the whole run: start the local cluster {conn1:.1f} s, wait for the worker after the "
          f"driver's own load {start1:.1f} s, stop it {close1:.1f} s")

    print(f"\n## scaling: the locate phase, 1 vs 2 workers (1 thread each; best of {args.repeats}, interleaved)")
    rows = {}
    for r in range(args.repeats):
        for k in (1, 2):
            pool = TimedPool(f"local:{k}", threads_per_worker=1)
            _, ph, cpu, n = one(f"loc{k}-{r}", pool, experiments=["assess", "locate"])
            with RunStore(base / f"loc{k}-{r}") as st:
                # the workers' compute time of the units (measured around each unit in the worker)
                busy = st.db.execute("SELECT sum(seconds) FROM results WHERE experiment = 'locate'").fetchone()[0]
            if k not in rows or ph["locate"] < rows[k][2]:
                rows[k] = (k, n["locate"], ph["locate"], cpu["locate"], busy)
    print(f"{'workers':>7} {'facts':>5} {'locate s':>9} {'facts/hour':>10} {'driver CPU share':>16} "
          f"{'workers busy':>12}")
    for k, facts, wall, cpu, busy in rows.values():
        print(f"{k:>7} {facts:>5} {wall:>9.1f} {facts / wall * 3600:>10.0f} {cpu / wall:>16.1%} "
              f"{busy / (k * wall):>12.0%}")
    print(f"speed-up 2 vs 1 worker: {rows[1][2] / rows[2][2]:.2f}x facts/hour (target >= 1.7x)")
    print(f"(in process, same phase: {n0['locate']} facts in {ph0['locate']:.1f} s = "
          f"{n0['locate'] / ph0['locate'] * 3600:.0f} facts/hour); load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
