"""``kneurons run --ray``: units computed by a pool of Ray workers give the single-process run's results, survive a
killed worker and a killed driver, place workers on (logical) GPUs, and refuse workers with other weights.

A local Ray cluster (2 CPUs, 2 logical GPUs) is started once for the module; the reference is the session's
``synthetic_run`` (every experiment, in process). The driver-kill test runs first, on its own ``local:2`` cluster
started by the command it kills. Runs take ~20-40 s each on two cores.
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import ray
import torch

from kneurons import load_model
from kneurons.errors import KneuronsError
from kneurons.experiments import RunStore, run
from kneurons.experiments.ray_pool import RayPool
from kneurons.experiments.store import DATABASE
from runs import config

ROOT = Path(__file__).resolve().parents[1]
VOLATILE = {"seconds", "created"}
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster for the module: 2 CPUs and 2 logical GPUs (no real GPU needed)."""
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False, logging_level="warning")
    yield
    ray.shutdown()


def _tables(run_dir) -> dict[str, pd.DataFrame]:
    with RunStore(run_dir) as st:
        assert st.meta("complete") and st.meta("weights_restored")
        return {e: st.table(e).drop(columns=[c for c in VOLATILE if c in st.table(e)]) for e in st.experiments()}


def _assert_same_results(ref_dir, run_dir) -> None:
    """Every table of both runs: the same units, known facts and neurons exactly; floats to float32 noise (the
    reference ran in the test process on the in-memory model with eager attention at the process's thread
    setting, the workers on the saved copy with its default kernel on one thread each): rtol 1e-4, atol 1e-5."""
    ref, got = _tables(ref_dir), _tables(run_dir)
    assert ref.keys() == got.keys() and len(ref) == 6
    for e in ref:
        assert len(ref[e]) == len(got[e]), e
        a = ref[e].sort_values(list(ref[e].columns[:3])).reset_index(drop=True)
        b = got[e].sort_values(list(got[e].columns[:3])).reset_index(drop=True)
        pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-4, atol=1e-5)


def _units(db: Path, experiment: str | None = None) -> int:
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
        try:
            if experiment is None:
                return con.execute("SELECT count(*) FROM results").fetchone()[0]
            return con.execute("SELECT count(*) FROM results WHERE experiment = ?", (experiment,)).fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error:
        return 0


def _cli_args(base: Path, out: Path, *extra) -> list[str]:
    cfg = config(base)
    return [sys.executable, "-m", "kneurons", "run", "--model", cfg.model, "--data", cfg.data, "--out", str(out),
            "--facts-per-relation", str(cfg.facts_per_relation), "--erase-relations", *cfg.erase_relations,
            "--erase-top-k", str(cfg.erase_top_k), "--min-prompts", str(cfg.min_prompts), "--quiet", *extra]


# ------------------------------------------------------------------------- the driver killed (its own cluster)

def test_driver_killed_then_rerun_resumes_to_the_same_result(synthetic_run, tmp_path):
    """``kneurons run --ray local:2`` killed with SIGKILL while its workers locate facts; the same command again
    resumes (what was stored is kept, nothing is stored twice) and ends with the uninterrupted run's results."""
    out = tmp_path / "run"
    args = _cli_args(synthetic_run, out, "--ray", "local:2")
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV, cwd=ROOT,
                            start_new_session=True)  # its Ray processes in its own group, cleaned up below
    deadline = time.time() + 300
    try:
        while _units(out / DATABASE, "locate") < 3:
            assert proc.poll() is None, f"run ended before the kill point: {proc.stderr.read().decode()[-2000:]}"
            assert time.time() < deadline, "run too slow to reach the kill point"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
        proc.stderr.close()
        try:  # the local cluster's own processes (its workers end by themselves when their raylet is gone)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode == -signal.SIGKILL
    killed_at = _units(out / DATABASE)
    with RunStore(synthetic_run / "run") as st:  # closed at once: later tests copy this run's files
        total = sum(st.counts().values())
    assert 64 + 3 <= killed_at < total  # assess done, some facts located
    # local:N starts its own cluster even where RAY_ADDRESS names another one (here: an address nothing serves)
    done = subprocess.run(args, capture_output=True, text=True, env={**ENV, "RAY_ADDRESS": "127.0.0.1:9"},
                          cwd=ROOT, timeout=600, start_new_session=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ray: units computed by 2 Ray workers" in done.stderr
    assert _units(out / DATABASE) == total
    _assert_same_results(synthetic_run / "run", out)


def test_sigterm_ends_a_ray_run_like_one_without_ray(synthetic_run, tmp_path):
    """``ray.init`` installs its own SIGTERM handler (which aborted the driver with a stack dump); the command keeps
    its own: SIGTERM while the workers locate facts ends it with ``kneurons: terminated (signal 15)`` and 143.
    While it runs, ``--ray auto`` elsewhere refuses to join its private local cluster."""
    out = tmp_path / "run"
    # 200 integration steps: a locate phase long enough for the probe below
    proc = subprocess.Popen(_cli_args(synthetic_run, out, "--ray", "local:2", "--steps", "200"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT,
                            start_new_session=True)
    deadline = time.time() + 300

    def wait_for(experiment: str, n: int) -> None:
        while _units(out / DATABASE, experiment) < n:
            assert proc.poll() is None, f"run ended before {n} {experiment} units: {proc.stderr.read()[-2000:]}"
            assert time.time() < deadline, "run too slow"
            time.sleep(0.05)

    try:
        wait_for("assess", 1)  # the run's cluster is up
        # --ray auto of another command finds that cluster (Ray's rule) and refuses to join it
        probe = subprocess.run([sys.executable, "-c", "from kneurons.experiments.ray_pool import RayPool\n"
                                "from kneurons.errors import KneuronsError\n"
                                "try:\n    RayPool('auto').connect()\nexcept KneuronsError as e:\n    print(e)"],
                               capture_output=True, text=True, env={k: v for k, v in ENV.items() if k != "RAY_ADDRESS"},
                               timeout=120)
        assert "found the private local cluster of another kneurons run" in probe.stdout, probe.stdout + probe.stderr
        wait_for("locate", 1)
        locate_at_signal = _units(out / DATABASE, "locate")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        try:  # whatever the command left of its cluster (nothing, when it ended as it should)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode == 143, err[-3000:]
    assert err.strip().splitlines()[-1] == "kneurons: terminated (signal 15)" and "Traceback" not in err
    with RunStore(synthetic_run / "run") as st:
        total = sum(st.counts().values())
    assert locate_at_signal <= _units(out / DATABASE) < total  # stopped while the workers computed units


# ------------------------------------------------------------------------------- on the module's cluster

def test_logical_gpus_one_per_worker_and_the_same_results(synthetic_run, ray_cluster, tmp_path):
    """The GPU placement path without a GPU: the cluster has 2 logical GPUs, so each of the 2 workers gets one
    (its own GPU id, a GPU by default on a cluster with GPUs) and keeps the model on ``device=cpu``. The run
    equals the single-process run."""
    pool = RayPool(None, workers=2)
    run(config(synthetic_run, device="cpu"), tmp_path / "r", handle=load_model(str(synthetic_run / "model")),
        progress=False, executor=pool)
    assert pool.gpus == 1
    assert sorted(g for w in pool.started for g in w["gpus"]) == ["0", "1"]
    assert [w["device"] for w in pool.started] == ["cpu", "cpu"]
    assert pool.stats() == {"started": 2, "replaced": 0, "retried": 0}
    with RunStore(tmp_path / "r") as st:
        assert st.meta("device") == "cpu" and st.meta("executor").startswith("2 Ray workers")
    _assert_same_results(synthetic_run / "run", tmp_path / "r")


def test_worker_killed_mid_unit_is_replaced_and_the_run_equals_the_uninterrupted_one(synthetic_run, ray_cluster,
                                                                                      tmp_path):
    """SIGKILL one worker's process while the pool locates facts: its units go to a new worker (checked like the
    first ones), the run finishes, and its results equal the uninterrupted run's (nothing lost, nothing twice)."""
    pool = RayPool(None, workers=2, gpus_per_worker=0)
    out = tmp_path / "r"
    killed = []

    def killer():
        deadline = time.time() + 300
        while not killed and time.time() < deadline:
            if pool.slots and _units(out / DATABASE, "locate") >= 3:
                pid = pool.slots[0].info["pid"]
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.05)

    th = threading.Thread(target=killer, daemon=True)
    th.start()
    run(config(synthetic_run), out, handle=load_model(str(synthetic_run / "model")), progress=False,
        executor=pool)
    th.join(timeout=10)
    assert killed, "the run ended before the kill point"
    stats = pool.stats()
    assert stats["started"] == 3 and stats["replaced"] == 1
    assert stats["retried"] >= 1  # the killed worker had units queued (up to 2 per worker): they were redone
    assert killed[0] in [w["pid"] for w in pool.started[:2]] and pool.started[2]["pid"] != killed[0]
    _assert_same_results(synthetic_run / "run", out)


def _die(handle, code: int):
    """A unit whose worker process dies every time it computes it."""
    os._exit(code)


def test_a_unit_whose_worker_always_dies_stops_the_run_naming_it(synthetic_run, ray_cluster):
    from kneurons.experiments.units import task
    from kneurons.interventions import weights_digest
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module
    pool = RayPool(None, workers=1, gpus_per_worker=0, retries=1)
    pool.launch(config(synthetic_run))  # as the CLI does: the worker loads the model while the driver loads its copy
    try:
        assert len(pool.slots) == 1 and pool.slots[0].info == {}  # launched, not waited for
        h = load_model(str(synthetic_run / "model"))
        with pytest.raises(KneuronsError, match="launched for"):  # workers hold one model spec
            pool.start(h, config(synthetic_run, dtype="float64"), weights_digest(h.model))
        pool.start(h, config(synthetic_run), weights_digest(h.model))
        assert pool.slots[0].info["digest"] == weights_digest(h.model)
        pool.submit(task(_die, 3, label="locate born_in:7"), lambda outcome: pytest.fail("no outcome expected"))
        with pytest.raises(KneuronsError, match=r"^unit locate born_in:7 failed 2 times: its Ray worker died each "
                                                r"time \(last on node "):
            pool.join()
        assert pool.stats() == {"started": 2, "replaced": 1, "retried": 1}
    finally:
        pool.close()
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def _refused(base: Path, model_dir: Path, out: Path) -> str:
    """The one-line error of a run whose workers load ``model_dir`` while the driver holds ``base``'s model."""
    pool = RayPool(None, workers=2, gpus_per_worker=0)
    with pytest.raises(KneuronsError) as exc:
        run(config(base, model=str(model_dir)), out, handle=load_model(str(base / "model")), progress=False,
            executor=pool)
    assert _units(out / DATABASE) == 0  # refused before any unit: no rows
    assert pool.slots == [] and pool.ray is None  # workers stopped
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_worker_with_other_weights_is_refused_by_name(synthetic_run, ray_cluster, tmp_path):
    h = load_model(str(synthetic_run / "model"))
    with torch.no_grad():
        h.arch.ffn_out[1].weight[0, 0] += 1.0
    h.model.save_pretrained(tmp_path / "other")
    h.tokenizer.save_pretrained(tmp_path / "other")
    msg = _refused(synthetic_run, tmp_path / "other", tmp_path / "r")
    assert "loaded other weights" in msg and socket.gethostname() in msg
    assert "1 of" in msg and "h.1.mlp.c_proj.weight" in msg  # the one tensor that differs, by name


def test_worker_that_cannot_load_the_model_stops_the_run(synthetic_run, ray_cluster, tmp_path):
    bad = tmp_path / "broken"
    bad.mkdir()
    for f in (synthetic_run / "model").iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    weights = next(bad.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:200])  # a truncated weights file
    msg = _refused(synthetic_run, bad, tmp_path / "r")
    assert "cannot load the model" in msg and socket.gethostname() in msg


# -------------------------------------------------------------------------------------------- without Ray

def test_without_ray_installed_the_option_says_how_to_install_it(synthetic_run, tmp_path, monkeypatch, capsys):
    from kneurons.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails as if it were not installed
    args = _cli_args(synthetic_run, tmp_path / "r", "--ray", "local:2")[3:]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["kneurons: error: --ray needs Ray: pip install 'kneurons[ray]' (or pip install ray)"]
    assert not (tmp_path / "r").exists()


def test_plain_kneurons_does_not_import_ray():
    code = ("import sys, kneurons, kneurons.cli, kneurons.experiments; "
            "kneurons.cli.build_parser().parse_args(['run', '--data', 'd', '--out', 'o', '--ray', 'local:2']); "
            "print('ray' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"
