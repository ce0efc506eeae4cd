"""Smoke tests of the benchmark scripts in bench/: each one's quick mode (tiny sizes, one
round) runs to the end and writes its results, so that the benchmark code cannot rot.

The scripts run as subprocesses (they pin thread counts through the environment before
numpy is imported, and must not add compiled signatures to this process), all started at
once by one fixture so that the whole module takes a few seconds of wall time.  Optional
peers (PyTorch, BackPACK) may be missing: the benchmarks then report them as missing, and
so do these tests expect.  When PyTorch is installed, ``peers.py`` runs a second time with
``torch`` made unimportable, so that both paths stay covered.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
HAVE_TORCH = importlib.util.find_spec("torch") is not None
TIMEOUT_S = 300


def _env(**extra) -> dict:
    env = dict(os.environ)
    for k in ("NUMBA_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[k] = "1"
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Start every quick benchmark at once; {name: (outdir, Popen)}."""
    base = tmp_path_factory.mktemp("bench")
    jobs = {
        "step": ["step.py", "--quick", "--threads", "1", "--no-compile"],
        "gradstats": ["gradstats.py", "--quick"],
        "crossover": ["crossover.py", "--quick"],
        "peers": ["peers.py", "--quick", "--threads", "1"],
        "ghost_bn": ["ghost_bn.py", "--quick"],
        "adaptive": ["adaptive.py", "--quick"],
        "fit_loop": ["fit_loop.py", "--quick"],
        "moments_sweep": ["moments_sweep.py", "--batches", "16,130", "--rounds", "1"],
        "gradstats_ops": [
            "gradstats.py",
            "--rounds",
            "1",
            "--target",
            "0.001",
            "--batches",
            "16",
            "--dtypes",
            "float32",
        ]
        + ["--ops", "moments,moments-loops"],
    }
    envs = {}
    if HAVE_TORCH:
        # a package named torch that fails to import, first on the path: torch is "missing"
        shadow = base / "no-torch"
        (shadow / "torch").mkdir(parents=True)
        (shadow / "torch" / "__init__.py").write_text("raise ImportError('hidden by the smoke test')\n")
        jobs["peers-no-torch"] = ["peers.py", "--quick", "--threads", "1", "--sections", "step,stats"]
        pp = os.environ.get("PYTHONPATH")
        envs["peers-no-torch"] = {"PYTHONPATH": str(shadow) + (os.pathsep + pp if pp else "")}
    procs = {}
    for name, (script, *args) in jobs.items():
        out = base / name
        out.mkdir()
        if name not in ("crossover", "moments_sweep"):  # gradstats --quick writes nothing, but the flag must parse
            args += ["--out", str(out)]
        procs[name] = (
            out,
            subprocess.Popen(
                [sys.executable, str(BENCH / script), *args],
                cwd=str(ROOT),
                env=_env(**envs.get(name, {})),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            ),
        )
    yield procs
    for _, p in procs.values():
        if p.poll() is None:
            p.kill()
            p.wait()


def _finish(runs, name):
    out, p = runs[name]
    try:
        stdout, stderr = p.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        p.kill()
        stdout, stderr = p.communicate()
        pytest.fail(f"bench {name} --quick did not finish in {TIMEOUT_S} s\n{stderr[-3000:]}")
    assert p.returncode == 0, f"bench {name} --quick failed ({p.returncode}):\n{stderr[-4000:]}"
    return out, stdout, stderr


def test_step_quick(runs):
    out, stdout, _ = _finish(runs, "step")
    assert "Training-step benchmark" in stdout
    data = json.loads((out / "step.json").read_text())
    rows = data["runs"][0]["rows"]
    assert {r["batch"] for r in rows} == {1, 8}
    assert all(r["cpu_us"] > 0 and r["numpy_us"] > 0 for r in rows)
    assert (out / "step.md").read_text().startswith("# Training-step benchmark")


def test_fit_loop_quick(runs):
    out, stdout, _ = _finish(runs, "fit_loop")
    assert stdout.startswith("# The fit loop's cost per step")
    rows = json.loads((out / "fit_loop.json").read_text())["rows"]
    assert [(r["model"], r["B"]) for r in rows] == [("64-128-128-10", 1), ("64-128-128-10", 32)]
    for r in rows:
        assert set(r["us_per_step"]) == {"kernel", "fit, compiled runs", "fit, Python loop"}
        assert all(v > 0 for v in r["us_per_step"].values()) and r["python_over_compiled"] > 0
    assert (out / "fit_loop.md").read_text().startswith("# The fit loop's cost per step")


def test_gradstats_quick(runs):
    _, stdout, _ = _finish(runs, "gradstats")
    assert "Gradient-statistics benchmark" in stdout
    assert "| 4-3-2 | 8 |" in stdout


def test_gradstats_ops_times_only_those_named(runs):
    out, stdout, _ = _finish(runs, "gradstats_ops")
    rows = json.loads((out / "gradstats.json").read_text())["rows"]
    assert {(r["model"], r["batch"]) for r in rows} == {("64-128-128-10", 16), ("784-256-256-10", 16)}
    for r in rows:
        assert r["moments_x"] > 0 and r["moments-loops_x"] > 0
        assert "norms_x" not in r and "per-example_x" not in r
    assert "| - |" in stdout  # the operations not timed


def test_moments_sweep_reports_both_sweeps(runs):
    _, stdout, _ = _finish(runs, "moments_sweep")
    lines = stdout.strip().splitlines()
    assert lines[0].startswith("| B | n_o x n_j | loops")
    assert len(lines) == 2 + 2 * 6  # header, rule, 2 batch sizes x 6 layer shapes
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert float(cells[2]) > 0 and float(cells[3]) > 0 and float(cells[5]) > 0


def test_crossover_quick(runs):
    _, stdout, _ = _finish(runs, "crossover")
    assert "loops µs" in stdout
    assert len(stdout.strip().splitlines()) == 3  # header + batch sizes 1 and 4


def _peers_result(out):
    data = json.loads((out / "peers.json").read_text())
    md = (out / "peers.md").read_text()
    png = (out / "peers.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    assert md.startswith("# minigd against its peers")
    return data, md


def test_peers_quick(runs):
    out, stdout, _ = _finish(runs, "peers")
    data, md = _peers_result(out)
    assert "## Targets (issues 7 and 20)" in stdout
    run = data["runs"][0]
    assert run["threads"] == 1
    assert run["pinned"]["numba"] == 1
    assert [r["batch"] for r in run["step"]] == [1, 8]
    assert all(r["minigd_us"] > 0 and r["numpy_us"] > 0 for r in run["step"])
    assert run["gemm"] and run["gemm"][0]["gemm_chain_gflops"] > 0
    assert data["stats"] and data["stats"][0]["minigd_norms_x"] > 0
    e2e = run["e2e"][0]
    if "skipped" not in e2e:
        assert e2e["minigd_reached"] == "1/1"
    torch_status = data["peers"]["torch"]
    if HAVE_TORCH:
        assert torch_status.startswith("torch ")
        assert all(r["torch_us"] > 0 for r in run["step"])
        assert "torchfunc_norms_x" in data["stats"][0]
        assert "torch_over_minigd" in e2e
    else:
        assert torch_status.startswith("missing")
        assert all("torch_us" not in r for r in run["step"])
        assert "| missing |" in md


@pytest.mark.skipif(not HAVE_TORCH, reason="torch is not installed: test_peers_quick covers the missing path")
def test_peers_quick_without_torch(runs):
    out, _, _ = _finish(runs, "peers-no-torch")
    data, md = _peers_result(out)
    assert data["peers"]["torch"].startswith("missing (ImportError")
    assert data["peers"]["backpack"].startswith(("missing", "skipped"))
    assert all("torch_us" not in r and r["minigd_us"] > 0 for r in data["runs"][0]["step"])
    assert "torchfunc_norms_x" not in data["stats"][0]
    assert "PyTorch: missing" in md
    assert "| missing |" in md


def test_ghost_bn_quick_writes_accuracy_and_cost(runs):
    out, stdout, _ = _finish(runs, "ghost_bn")
    res = json.loads((out / "ghost_bn.json").read_text())
    names = [r["variant"] for r in res["accuracy"]]
    assert names[:2] == ["plain", "BN"] and "BN ghost 8" in names and "dropout 0.1" in names
    for r in res["accuracy"]:
        assert 0 <= r["test_mean"] <= 1 and len(r["test"]) == 1
    cost = {r["variant"]: r for r in res["cost"]}
    assert cost["plain"]["vs_plain"] == 1.0 and cost["BN ghost 8"]["us_per_step"] > 0
    assert "BN ghost 32" not in cost  # a ghost >= the batch is not a variant of its own
    assert "| BN ghost 8 |" in (out / "ghost_bn.md").read_text()


def test_adaptive_quick_writes_the_comparison(runs):
    out, stdout, _ = _finish(runs, "adaptive")
    res = json.loads((out / "adaptive.json").read_text())
    (summ,) = res["summary"]
    assert summ["problem"] == "digits" and res["meta"]["seeds"] == [0, 1]
    assert [f["B"] for f in summ["fixed"]] == [16, 32, 128]
    arms = {a["arm"]: a for a in summ["adaptive"]}
    assert set(arms) == {"adaptive adascale", "adaptive adascale, flops model"}
    measured, flops = arms["adaptive adascale"], arms["adaptive adascale, flops model"]
    # the flops model probes nothing; the measured table probes at decisions only (digits
    # reaches its target before the first one here: nothing timed either)
    assert flops["probe_s"] == 0 and measured["probe_s"] >= 0
    # the verdict's unbiased rows: the sweep's choices re-run on held-out seeds beside the arms
    assert res["meta"]["verdict"]["held_robust"]["ratios"][0] == measured["held_robust_ratio"]
    assert summ["held_seeds"] == [1000, 1001] and summ["held_best"]["B"] == summ["best_robust"]["B"]
    assert set(summ["held_fixed"]) <= {"16", "32", "128"} and len(res["held_out_runs"]["digits"]["adaptive"]) == 2
    assert all(len(a["held_final_B"]) == 2 and a["held_robust"] > 0 for a in arms.values())
    for a in arms.values():
        assert 0 <= a["reached"] <= 2 and len(a["final_B"]) == 2
        if a["reached"] == 2:
            assert a["time"] > 0 and 0 < a["robust"] <= a["robust+ctrl"] <= a["all-in"]
            assert a["all-in"] >= a["robust"] + a["probe_s"] * 0.5  # medians over seeds: not additive
            lo, hi = a["time_ci"]
            assert lo <= a["time"] <= hi
    # every run of every fixed cell is on record, with the learning rate it used
    cells = res["cells"]["digits"]
    assert {c["B"] for c in cells} == {16, 32, 128}
    assert all(c["lr"] > 0 and len(c["runs"]) <= 2 for c in cells)
    (ovh,) = res["overhead"]
    assert ovh["B"] == 32 and ovh["robust_ratio"] > 0 and ovh["cpu_ratio"] > 0
    md = (out / "adaptive.md").read_text()
    assert md.startswith("# Adaptive batch size against every fixed batch size")
    assert "| adaptive adascale |" in md and "## Controller overhead" in md
    assert (out / "adaptive.png").read_bytes().startswith(b"\x89PNG")
    assert "## Verdict" in stdout


def test_cpu_crossover_default_follows_the_recorded_measurement():
    """``CpuBackend.default_blas_min_batch`` encodes bench/results/crossover.json: at every
    measured (shape, batch) the default path is at most 20% slower than the faster of loops
    and compiled BLAS (ties within noise go either way; a wrong rule costs 1.5x or more)."""
    from minigd.backends.cpu import CpuBackend

    rows = json.loads((BENCH / "results" / "crossover.json").read_text())["rows"]
    assert {tuple(r["sizes"]) for r in rows} >= {(64, 128, 128, 10), (784, 256, 256, 10), (64, 512, 512, 10)}
    for r in rows:
        mb = CpuBackend.default_blas_min_batch(tuple(r["sizes"]), compiled_blas=True)
        chosen = r["blas"] if r["batch"] >= mb else r["loops"]
        assert chosen <= 1.2 * min(r["blas"], r["loops"]), r
