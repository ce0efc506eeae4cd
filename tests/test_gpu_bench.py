"""Smoke test of bench/gpu.py: its quick mode runs to the end -- measuring where there is
a GPU, and otherwise exiting cleanly (status 0) with the reason and writing nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from minigd.backends import available_backends
from minigd.testing import gpu_emu

BENCH = Path(__file__).resolve().parent.parent / "bench" / "gpu.py"


def test_gpu_bench_quick(tmp_path):
    env = dict(os.environ, NUMBA_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    p = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--out", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr
    with gpu_emu.emulated(False):
        reason = available_backends()["gpu"]
    if reason is not None:
        assert "no usable GPU here, nothing measured" in p.stdout and reason in p.stdout
        assert list(tmp_path.iterdir()) == []
    else:
        assert (tmp_path / "gpu.md").exists() and (tmp_path / "gpu.json").exists()


@pytest.mark.skipif(gpu_emu.reason() is not None, reason=f"no GPU emulator: {gpu_emu.reason()}")
def test_gpu_bench_quick_runs_on_the_emulator(tmp_path):
    """Every timed path of the bench (train_step, run_steps, cpu) runs end to end; the
    output is labelled as emulator times, and the real results directory is refused."""
    env = dict(os.environ, NUMBA_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MINIGD_GPU_EMULATE="1")
    p = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--out", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr
    md = (tmp_path / "gpu.md").read_text()
    assert "NOT GPU timings" in md and "| 16-32-32-4 | 8 |" in md
    assert "gpu resident" in md and "cpu step" in md
    p = subprocess.run([sys.executable, str(BENCH), "--quick"], env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 2 and "not written into bench/results" in p.stderr
