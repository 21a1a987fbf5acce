"""GPU check of ``kneurons run`` (run on a machine with CUDA): every experiment on a tiny model trained on the
synthetic fact world, once with the model on the CPU and once on CUDA, through the CLI the way a user runs it;
the two runs must find the same knowledge neurons and agree on every number to float32 noise.

    PYTHONPATH=src:tests python benchmarks/device_run_check.py OUT_DIR
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, "tests")
from runs import config, world_and_model  # noqa: E402

from kneurons.experiments import RunStore  # noqa: E402


def cli_run(base: Path, out: Path, device: str) -> float:
    cfg = config(base)
    args = [sys.executable, "-m", "kneurons.cli", "run", "--model", cfg.model, "--data", cfg.data, "--out", str(out),
            "--facts-per-relation", str(cfg.facts_per_relation), "--erase-relations", *cfg.erase_relations,
            "--erase-top-k", str(cfg.erase_top_k), "--min-prompts", str(cfg.min_prompts), "--quiet",
            "--device", device]
    t = time.time()
    subprocess.run(args, check=True)
    return time.time() - t


def main(base: Path) -> int:
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 1
    print(torch.__version__, torch.cuda.get_device_name(0))
    base.mkdir(parents=True, exist_ok=True)
    world_and_model(base)
    secs = {d: cli_run(base, base / f"run-{d}", d) for d in ("cpu", "cuda")}
    ok = True
    a, b = RunStore(base / "run-cpu"), RunStore(base / "run-cuda")
    print("device meta:", a.meta("device"), b.meta("device"), "weights restored:", a.meta("weights_restored"),
          b.meta("weights_restored"))
    for e in a.experiments():
        x = a.table(e).drop(columns=["seconds"], errors="ignore")
        y = b.table(e).drop(columns=["seconds"], errors="ignore")
        try:
            pd.testing.assert_frame_equal(x, y, check_exact=False, rtol=1e-3, atol=1e-5)
            print(f"{e}: {len(x)} rows, CPU == CUDA")
        except AssertionError as exc:
            ok = False
            print(f"{e}: DIFFERENT: {str(exc)[:600]}")
    print(f"seconds (incl. process start): cpu {secs['cpu']:.1f}, cuda {secs['cuda']:.1f}")
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
