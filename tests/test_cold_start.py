"""Cold start (issue 20): what the first run on a machine compiles, and what it says.

* A warm-up that takes longer than ``NOTICE_AFTER_S`` says "compiling kernels (first run
  only)" on stderr, then how long it took; a fast one (kernels loaded from numba's cache)
  prints nothing, not even later.
* The first fit with a named optimizer never compiles the generic optimizer chain: a chain
  that does not fuse runs the ``*_generic`` kernels, compiled only when a run uses one
  (bench/results/cold_start.md measures the saving).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

import minigd as mg
from minigd.backends import cpu as cpu_backend
from minigd.kernels import cpu as K
from minigd.optim import add_decayed_weights, chain, clip_by_global_norm, scale_by_lr, trace

NOTICE = "compiling kernels (first run only)"


def _data(n=64, d=5, k=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)).astype(np.float32), rng.integers(0, k, n)


def _fit(batch_size=8, optimizer=None, backend="cpu", steps=3):
    X, y = _data()
    m = mg.MLP([5, 7, 3], seed=0, backend=backend)
    mg.fit(m, X, y, batch_size=batch_size, steps=steps, optimizer=optimizer or mg.SGD(lr=0.1), seed=0)
    return m


def test_slow_warm_up_says_it_compiles(monkeypatch, capsys):
    _fit()  # kernels compiled (or loaded) here
    ref = _fit().params.copy()
    capsys.readouterr()
    real = cpu_backend._STEP[False, True]

    def slow(*args):  # a kernel that compiles for 0.4 s
        time.sleep(0.4)
        return real(*args)

    monkeypatch.setattr(cpu_backend, "NOTICE_AFTER_S", 0.1)
    monkeypatch.setitem(cpu_backend._STEP, (False, True), slow)
    m = _fit()
    err = capsys.readouterr().err
    assert NOTICE in err
    lines = [ln for ln in err.splitlines() if ln.startswith("minigd:")]
    assert len(lines) == 2 and NOTICE in lines[0], err
    assert lines[1].startswith("minigd: kernels ready in ") and lines[1].endswith(" s (cached for later runs)")
    assert float(lines[1].split("ready in ")[1].split(" s")[0]) >= 0.4
    np.testing.assert_array_equal(m.params, ref)  # the notice changes nothing


def test_fast_warm_up_prints_nothing(monkeypatch, capsys):
    _fit()
    capsys.readouterr()
    monkeypatch.setattr(cpu_backend, "NOTICE_AFTER_S", 0.3)
    _fit()
    time.sleep(0.6)  # the timer was cancelled: nothing arrives late either
    assert "minigd:" not in capsys.readouterr().err


def test_notice_threshold_is_one_second():
    assert cpu_backend.NOTICE_AFTER_S == 1.0


@pytest.mark.parametrize("batch_size", [1, 8], ids=["loops", "blas"])
def test_non_fusing_chain_runs_the_generic_kernels(batch_size):
    """decay -> clip -> trace -> lr does not fuse (the fused pass clips first): it runs
    train_step_*_generic, with the NumPy reference's results."""
    opt = lambda: chain(add_decayed_weights(1e-2), clip_by_global_norm(0.5), trace(0.9), scale_by_lr(), lr=0.05)  # noqa: E731
    assert opt().init(np.zeros(3, np.float32)).plan[0] == 0
    got = _fit(batch_size, opt(), steps=4)
    ref = _fit(batch_size, opt(), backend="numpy", steps=4)
    np.testing.assert_allclose(got.params, ref.params, rtol=2e-5, atol=2e-6)
    assert not np.array_equal(got.params, _fit(batch_size, mg.SGD(lr=0.05), steps=4).params)


def test_fused_kernels_refuse_a_non_fusing_chain():
    """Called with plan[0] == 0 (a chain that must run the generic kernels), the fused
    entry points apply nothing rather than skip the optimizer silently."""
    m = mg.MLP([3, 4, 2], seed=0)
    st = chain(add_decayed_weights(1e-2), clip_by_global_norm(0.5), trace(0.9), scale_by_lr(), lr=0.1).init(m.params)
    g = np.ones_like(m.params)
    before = m.params.copy()
    applied, _ = K.opt_apply(m.params, g, st.codes, st.hp, st.soff, st.state, st.plan, 0.1, 1)
    assert applied == 0
    np.testing.assert_array_equal(m.params, before)
    applied, _ = K.opt_apply_generic(m.params, g.copy(), st.codes, st.hp, st.soff, st.state, st.plan, 0.1, 1)
    assert applied == 1 and not np.array_equal(m.params, before)


_COLD = """
import json, sys, time
t0 = time.perf_counter()
import numpy as np
import minigd as mg
from minigd.kernels import cpu as K
X = np.random.default_rng(0).standard_normal((256, 64)).astype(np.float32)
y = np.arange(256) % 10
mg.fit(mg.MLP([64, 128, 10]), X, y, batch_size=32, steps=5)
print(json.dumps({"seconds": time.perf_counter() - t0, "compiled": sorted(
    name for name in ("_opt_chain_generic", "_opt_update_generic", "train_step_blas_generic",
                      "train_step_loops_generic", "train_step_loops", "train_step_blas")
    if sum(getattr(K, name).stats.cache_misses.values()))}))
"""


def test_cold_first_fit_says_so_and_skips_what_it_does_not_use(tmp_path):
    """A fresh process with an empty numba cache: the first fit compiles (and says so) only
    the kernels its regime and optimizer use; a second process loads them from the cache
    (compiles nothing) and is silent."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    env.pop("MINIGD_NO_CACHE", None)
    runs = []
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", _COLD], env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        runs.append((json.loads(out.stdout.strip().splitlines()[-1]), out.stderr))
    (cold, cold_err), (warm, warm_err) = runs
    assert cold["compiled"] == ["train_step_blas"], cold
    assert NOTICE in cold_err and "kernels ready in" in cold_err
    assert warm["compiled"] == [] and "minigd:" not in warm_err, warm_err
    assert warm["seconds"] < cold["seconds"]


def test_warmup_speaks_once_for_all_its_fits(monkeypatch, capsys):
    """``minigd.warmup.warmup`` runs many fits under one notice: nested warm-ups are silent."""
    from minigd.warmup import warmup

    warmup(("float32",))
    capsys.readouterr()
    monkeypatch.setattr(cpu_backend, "NOTICE_AFTER_S", 0.1)
    for key in ((True, True), (False, True)):
        real = cpu_backend._STEP[key]
        monkeypatch.setitem(cpu_backend._STEP, key, lambda *a, _real=real: (time.sleep(0.15), _real(*a))[1])
    warmup(("float32",))
    err = capsys.readouterr().err
    assert err.count(NOTICE) == 1 and err.count("kernels ready in") == 1, err
    assert cpu_backend._CompileNotice._depth == 0
