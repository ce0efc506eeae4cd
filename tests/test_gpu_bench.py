"""Smoke test of bench/gpu.py: its quick mode runs to the end -- measuring where there is
a GPU, and otherwise exiting cleanly (status 0) with the reason and writing nothing."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from minigd.backends import available_backends

BENCH = Path(__file__).resolve().parent.parent / "bench" / "gpu.py"


def test_gpu_bench_quick(tmp_path):
    env = dict(os.environ, NUMBA_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, str(BENCH), "--quick", "--out", str(tmp_path)], env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    reason = available_backends()["gpu"]
    if reason is not None:
        assert "no usable GPU here, nothing measured" in p.stdout and reason in p.stdout
        assert list(tmp_path.iterdir()) == []
    else:
        assert (tmp_path / "gpu.md").exists() and (tmp_path / "gpu.json").exists()
