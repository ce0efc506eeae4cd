"""The CPU emulator of the GPU backend (minigd/testing/gpu_emu.py, kernels/gpu_emu.h).

The emulator is what lets tests/test_gpu_backend.py run the CUDA kernels without a GPU,
so it must itself be right: the CUDA execution model it claims (barriers, warp shuffles,
shared memory per block, grid/block indices), the misuses it reports, the argument checks
CuPy does not do, and the graph-capture rules of CuPy and the CUDA runtime.
"""

from __future__ import annotations

import collections
import os

import numpy as np
import pytest

from minigd.backends import available_backends
from minigd.testing import gpu_emu as E

pytestmark = pytest.mark.skipif(E.reason() is not None, reason=f"no GPU emulator: {E.reason()}")

CODE = r"""
extern "C" __global__ void ids(int* out) {
    const int t = (blockIdx.y * gridDim.x + blockIdx.x) * (blockDim.x * blockDim.y)
                  + threadIdx.y * blockDim.x + threadIdx.x;
    out[4 * t + 0] = threadIdx.x; out[4 * t + 1] = threadIdx.y;
    out[4 * t + 2] = blockIdx.x;  out[4 * t + 3] = blockIdx.y;
}
// reverse a block's values through shared memory; `sync` = 0 leaves out the barrier
extern "C" __global__ void reverse(const double* x, double* y, int sync) {
    __shared__ double sh[256];
    sh[threadIdx.x] = x[threadIdx.x];
    if (sync) __syncthreads();
    y[threadIdx.x] = sh[blockDim.x - 1 - threadIdx.x];
}
extern "C" __global__ void warp_sum(const float* x, float* y) {
    float v = x[threadIdx.x];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    y[threadIdx.x] = v;
}
extern "C" __global__ void divergent_sync(int* out) {
    if (threadIdx.x < 16) __syncthreads();
    out[threadIdx.x] = 1;
}
extern "C" __global__ void early_exit_sync(int* out) {
    if (threadIdx.x == 3) return;
    __syncthreads();
    out[threadIdx.x] = 1;
}
extern "C" __global__ void typed(long long n, double a, const double* x, double* y) {
    for (long long i = threadIdx.x; i < n; i += blockDim.x) y[i] = a * x[i];
}
extern "C" __global__ void flag(int* f) { if (threadIdx.x % 7 == 3) atomicOr(f, 1 << (threadIdx.x % 5)); }
extern "C" __global__ void bump(const int* st, double* out) { out[st[0]] += 1.0; }
extern "C" __global__ void broadcast(double* y) {   // missing barrier after thread 0's write
    __shared__ double v;
    if (threadIdx.x == 0) v = 42.0;
    y[threadIdx.x] = v;
}
template <typename T> __device__ void forms(double* y) {
    __shared__ T scalar;
    static __shared__ unsigned int multi_word[2];
    __shared__ T a[2][3], b[4];
    y[0] = (double)scalar; y[1] = (double)(int)multi_word[1]; y[2] = (double)a[1][2]; y[3] = (double)b[3];
    y[4] = y[1] == -1.0 ? y[0] : 0.0;   // 0xff bytes: unsigned -1 is 4294967295
}
extern "C" __global__ void shared_forms(double* y) { forms<double>(y); }
extern "C" __global__ void unsigned_args(unsigned int n, const unsigned char* x, unsigned long long* y) {
    for (unsigned int i = 0; i < n; ++i) y[i] = x[i] + 1ull;
}
"""


@pytest.fixture(scope="module")
def mod():
    return E.RawModule(code=CODE)


def test_grid_and_block_indices(mod):
    out = E.zeros(4 * 2 * 3 * 4 * 2, np.int32)
    mod.get_function("ids")((2, 3), (4, 2), (out,))
    got = out.get().reshape(-1, 4)
    want = [(tx, ty, bx, by) for by in range(3) for bx in range(2) for ty in range(2) for tx in range(4)]
    assert [tuple(r) for r in got] == want


def test_a_missing_barrier_shows_whichever_thread_writes(mod):
    """Thread 0 writes, the others read (the common bug): seen in the descending order,
    which every other block run uses."""
    k = mod.get_function("broadcast")
    results = []
    for _ in range(2):
        y = E.zeros(32, np.float64)
        k((1,), (32,), (y,))
        results.append(y.get())
    assert any(np.isnan(r[1:]).all() for r in results) and any((r == 42).all() for r in results)


def test_every_form_of_shared_declaration_starts_as_nan(mod):
    y = E.zeros(5, np.float64)
    mod.get_function("shared_forms")((1,), (1,), (y,))
    got = y.get()
    assert np.isnan(got[[0, 2, 3, 4]]).all() and got[1] == -1  # 0xff bytes; the unsigned one as int
    with pytest.raises(RuntimeError, match="extern __shared__"):
        E.build('extern "C" __global__ void d(float* x) { extern __shared__ float buf[]; x[0] = buf[0]; }')


def test_a_missing_barrier_shows_as_a_wrong_result(mod):
    x = E.asarray(np.arange(64, dtype=np.float64))
    y = E.zeros(64, np.float64)
    k = mod.get_function("reverse")
    k((1,), (64,), (x, y, np.int32(1)))
    assert np.array_equal(y.get(), np.arange(64)[::-1])
    # each fiber runs to its next barrier (here: to the end): in ascending order thread t < 32
    # reads sh[63 - t] before thread 63 - t wrote it, in descending order thread t >= 32
    # does -- uninitialised shared memory, which is NaN.  Two launches see both orders.
    halves = set()
    for _ in range(2):
        y.fill(-1)
        k((1,), (64,), (x, y, np.int32(0)))
        got = y.get()
        bad = np.isnan(got)
        assert bad.sum() == 32 and np.array_equal(got[~bad], np.arange(64)[::-1][~bad])
        halves.add(bool(bad[0]))
    assert halves == {True, False}


def test_warp_shuffle_sums_within_each_warp(mod):
    x = np.random.default_rng(0).normal(size=96).astype(np.float32)
    y = E.zeros(96, np.float32)
    mod.get_function("warp_sum")((1,), (96,), (E.asarray(x), y))
    want = np.repeat(x.reshape(3, 32).sum(axis=1, dtype=np.float64), 32)
    np.testing.assert_allclose(y.get(), want, rtol=1e-5)


def test_a_partial_warp_shuffle_is_an_error(mod):
    with pytest.raises(RuntimeError, match="multiple of 32"):
        mod.get_function("warp_sum")((1,), (48,), (E.zeros(48, np.float32), E.zeros(48, np.float32)))


def test_divergent_barriers_are_reported(mod):
    with pytest.raises(RuntimeError, match=r"block \(0, 0, 0\).*__syncthreads"):
        mod.get_function("divergent_sync")((1,), (32,), (E.zeros(32, np.int32),))
    with pytest.raises(RuntimeError, match="after others had exited"):
        mod.get_function("early_exit_sync")((1,), (32,), (E.zeros(32, np.int32),))


def test_launch_configuration_is_checked(mod):
    with pytest.raises(RuntimeError, match="1 to 1024 threads"):
        mod.get_function("ids")((1,), (2048,), (E.zeros(8, np.int32),))
    with pytest.raises(RuntimeError, match="non-empty grid"):
        mod.get_function("ids")((0,), (1,), (E.zeros(8, np.int32),))
    with pytest.raises(RuntimeError, match="y and z <= 65535"):
        mod.get_function("ids")((1, 70000), (1,), (E.zeros(8, np.int32),))


def test_arguments_are_checked_against_the_kernel_signature(mod):
    k = mod.get_function("typed")
    x, y = E.asarray(np.arange(5.0)), E.zeros(5, np.float64)
    k((1,), (4,), (np.int64(5), np.float64(2.0), x, y))
    assert np.array_equal(y.get(), 2 * np.arange(5.0))
    bad = [
        ((np.int32(5), np.float64(2.0), x, y), "takes a int64 value, got int32"),
        ((5, np.float64(2.0), x, y), "sized numpy scalar"),
        ((np.int64(5), np.float32(2.0), x, y), "takes a float64 value, got float32"),
        ((np.int64(5), np.float64(2.0), E.zeros(5, np.float32), y), r"takes float64\*, the array is float32"),
        ((np.int64(5), np.float64(2.0), np.arange(5.0), y), "host numpy array"),
        ((np.int64(5), np.float64(2.0), x), "takes 4 arguments, got 3"),
        ((np.int64(5), np.float64(2.0), E.zeros((5, 2))[:, 0], y), "non-contiguous"),
    ]
    for args, msg in bad:
        with pytest.raises((TypeError, ValueError), match=msg):
            k((1,), (4,), args)
    k((1,), (4,), (np.int64(0), np.float64(2.0), x, np.uint64(0)))  # np.uint64(0): a null pointer


def test_unsigned_and_byte_arguments(mod):
    k = mod.get_function("unsigned_args")
    x = E.asarray(np.array([1, 2, 255], np.uint8))
    y = E.zeros(3, np.uint64)
    k((1,), (1,), (np.uint32(3), x, y))
    assert y.get().tolist() == [2, 3, 256]
    with pytest.raises(TypeError, match="takes a uint32 value, got int32"):
        k((1,), (1,), (np.int32(3), x, y))
    with pytest.raises(TypeError, match=r"takes uint8\*, the array is int8"):
        k((1,), (1,), (np.uint32(3), E.zeros(3, np.int8), y))


def test_atomics(mod):
    f = E.zeros(1, np.int32)
    mod.get_function("flag")((1,), (64,), (f,))
    want = 0
    for t in range(64):
        if t % 7 == 3:
            want |= 1 << (t % 5)
    assert int(f.get()[0]) == want


def test_graph_capture_records_and_replays_with_the_captured_arguments(mod):
    st, out = E.zeros(1, np.int32), E.zeros(4, np.float64)
    mm = [E.zeros((2, 2)) for _ in range(3)]
    k = mod.get_function("bump")
    s = E.cuda.Stream(non_blocking=True)
    with s:
        s.begin_capture()
        k((1,), (1,), (st, out))
        k((1,), (1,), (st, out))
        with pytest.raises(NotImplementedError, match="cuBLAS"):
            E.matmul(mm[0], mm[1], out=mm[2])
        for call in (
            lambda: out.get(),
            lambda: out.set(np.zeros(4)),
            s.synchronize,
            lambda: E.zeros(3),
            lambda: E.asarray(np.zeros(3)),
        ):
            with pytest.raises(RuntimeError, match="captured"):
                call()
        g = s.end_capture()
    assert np.array_equal(out.get(), np.zeros(4))  # capture does not run anything
    g.launch(s)
    st.set(np.array([2], np.int32))  # device data the graph reads, not its arguments
    g.launch(s)
    assert np.array_equal(out.get(), [2, 0, 2, 0])
    with pytest.raises(RuntimeError, match="not capturing"):
        s.end_capture()


def test_only_the_capturing_stream_records_and_memsets_are_captured(mod):
    st, out = E.zeros(1, np.int32), E.zeros(4, np.float64)
    k = mod.get_function("bump")
    s, t = E.cuda.Stream(non_blocking=True), E.cuda.Stream(non_blocking=True)
    with s:
        s.begin_capture()
        with t:
            k((1,), (1,), (st, out))  # stream t: runs now
        out.fill(5.0)  # stream s: a captured memset
        k((1,), (1,), (st, out))
        g = s.end_capture()
    assert np.array_equal(out.get(), [1, 0, 0, 0])
    g.launch()
    assert np.array_equal(out.get(), [6, 5, 5, 5])


def test_replaying_a_graph_whose_memory_was_freed_is_an_error(mod):
    st, out = E.zeros(1, np.int32), E.zeros(4, np.float64)
    s = E.cuda.Stream()
    with s:
        s.begin_capture()
        mod.get_function("bump")((1,), (1,), (st, out[1:]))  # a view: its allocation counts
        g = s.end_capture()
    g.launch()
    del out
    with pytest.raises(RuntimeError, match="freed since the capture"):
        g.launch()


def test_launches_from_several_threads_take_turns(mod):
    import threading

    x = E.asarray(np.arange(64, dtype=np.float64))
    outs = [E.zeros(64, np.float64) for _ in range(4)]
    k = mod.get_function("reverse")
    errors = []

    def work(y):
        try:
            for _ in range(30):
                k((1,), (64,), (x, y, np.int32(1)))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(y,)) for y in outs]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    for y in outs:
        assert np.array_equal(y.get(), np.arange(64)[::-1])


def test_device_memory_transfers_are_strict():
    a = E.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match="shape mismatch"):
        a.set(np.zeros(6, np.float32))
    with pytest.raises(TypeError, match="dtype mismatch"):
        a.set(np.zeros((2, 3)))
    host = np.arange(6, dtype=np.float32).reshape(2, 3)
    d = E.asarray(host)
    host[0, 0] = 99  # a device copy, not a view
    assert d.get()[0, 0] == 0 and type(d.get()) is np.ndarray
    out = np.empty((2, 3), np.float32)
    assert d.get(out=out) is out and out[1, 2] == 5
    with pytest.raises(TypeError, match="host array"):
        E.matmul(host, d.T, out=E.zeros((2, 2), np.float32))
    with pytest.raises(TypeError, match="expected a host numpy.ndarray"):
        a.set([[0, 0, 0], [0, 0, 0]])
    with pytest.raises(RuntimeError, match="contiguous"):
        E.zeros((3, 3), np.float32)[:, :2].set(np.zeros((3, 2), np.float32))
    with pytest.raises(TypeError):  # no implicit NumPy on device memory
        d + 1
    with pytest.raises(TypeError, match="device arrays are not host arrays"):
        np.sum(d)


def test_builds_are_cached_by_content(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIGD_CACHE_DIR", str(tmp_path))
    code = 'extern "C" __global__ void one(int* x) { x[0] = 1; }'
    lib, names = E.build(code)
    assert names == ("one",)
    files = sorted(p.name for p in (tmp_path / "gpu_emu").iterdir())
    assert len(files) == 2 and files[0].endswith(".names") and files[1].endswith(".so")
    assert E.build(code)[0] is lib
    with pytest.raises(RuntimeError, match="compiling failed|preprocessing failed"):
        E.build('extern "C" __global__ void broken(int* x) { x[0] = ; }')
    with pytest.raises(KeyError, match="no kernel 'two'"):
        E.RawModule(code=code).get_function("two")


def test_switching_the_emulator_on_and_off(monkeypatch):
    monkeypatch.setenv(E.ENV, "1")
    assert E.enabled() and available_backends()["gpu"] is None
    with E.emulated(False):
        assert not E.enabled()
    monkeypatch.setenv(E.ENV, "yes")
    with pytest.raises(ValueError, match="MINIGD_GPU_EMULATE: expected '1'"):
        E.enabled()
    monkeypatch.setenv(E.ENV, "1")
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    assert "C++ compiler" in E.reason()
    assert "MINIGD_GPU_EMULATE is set but" in available_backends()["gpu"]


def test_the_gpu_backend_runs_on_the_emulator():
    import minigd as mg

    with E.emulated():
        m = mg.MLP([4, 8, 3], seed=0, dtype="float64", backend="gpu")
    assert m.backend_impl.cp is E
    X = np.random.default_rng(1).normal(size=(10, 4))
    np.testing.assert_allclose(m.forward(X), m.to("numpy").forward(X), rtol=1e-12, atol=1e-12)


def test_a_gpu_checkpoint_loads_elsewhere_with_a_clear_error_or_backend(tmp_path):
    import minigd as mg

    X = np.random.default_rng(0).normal(size=(12, 3))
    y = np.arange(12) % 2
    with E.emulated():
        m = mg.MLP([3, 4, 2], seed=0, dtype="float64", backend="gpu")
    mg.fit(m, X, y, batch_size=4, epochs=1, checkpoint=tmp_path / "g.npz")
    with E.emulated(False):
        if available_backends()["gpu"] is not None:  # no real GPU here
            with pytest.raises(mg.BackendUnavailable, match=r"backend='cpu'"):
                mg.load_checkpoint(tmp_path / "g.npz")
        ck = mg.load_checkpoint(tmp_path / "g.npz", backend="cpu")
        assert np.array_equal(ck.model.params, m.params)
        # and the run resumes on the cpu backend
        c = mg.MLP([3, 4, 2], seed=0, dtype="float64", backend="cpu")
        h = mg.fit(c, X, y, batch_size=4, epochs=2, checkpoint=tmp_path / "g.npz", resume=True)
        assert h.n_steps == 6


def test_minigd_backends_says_when_the_gpu_is_emulated(monkeypatch, capsys):
    from minigd.cli import main

    monkeypatch.setenv(E.ENV, "1")
    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    assert "gpu    available -- EMULATED on the CPU (MINIGD_GPU_EMULATE=1)" in out
    monkeypatch.setenv(E.ENV, "0")
    assert main(["backends"]) == 0
    gpu_line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("gpu")][0]
    assert "EMULATED" not in gpu_line


def test_a_malformed_switch_is_reported_not_raised_by_the_probe(monkeypatch):
    monkeypatch.setenv(E.ENV, "yes")
    assert "MINIGD_GPU_EMULATE: expected '1'" in available_backends()["gpu"]


def test_loading_on_an_unavailable_backend_says_how_to_choose_another(tmp_path):
    import minigd as mg

    m = mg.MLP([3, 2], seed=0)
    mg.save_checkpoint(tmp_path / "c.npz", m)
    with E.emulated(False):
        if available_backends()["gpu"] is None:
            pytest.skip("a GPU is available here")
        with pytest.raises(mg.BackendUnavailable, match=r"ask for another backend") as ei:
            mg.load_checkpoint(tmp_path / "c.npz", backend="gpu")
    assert "saved from" not in str(ei.value)


# ============================================================================ devices, order, capture errors
def test_streams_kernels_and_memory_belong_to_a_device(mod):
    """As CuPy: entering a stream of another device raises.  Device memory is used with its
    own device current, or it is an error (on a GPU, another device's pointer); kernels
    are not tied to a device (CuPy loads a module once per device)."""
    with E.cuda.Device(1):
        s1 = E.cuda.Stream(non_blocking=True)
        x1 = E.zeros(256, np.float64)
        assert E.cuda.runtime.getDevice() == 1 and E.cuda.Device().id == 1
    assert E.cuda.runtime.getDevice() == 0
    with pytest.raises(RuntimeError, match=r"stream is created on \(1\) does not match with the current device \(0\)"):
        with s1:
            pass
    y = E.zeros(256, np.float64)
    with pytest.raises(RuntimeError, match="memory of device 1 used while device 0"):
        mod.get_function("reverse")((1,), (256,), (x1, y, np.int32(1)))
    with E.cuda.Device(1):
        y1 = E.zeros(256, np.float64)
        mod.get_function("reverse")((1,), (256,), (x1, y1, np.int32(1)))
        with pytest.raises(RuntimeError, match="memory of device 0"):
            E.matmul(x1.reshape(16, 16), y.reshape(16, 16))
    with pytest.raises(RuntimeError, match="invalid device ordinal 2"):
        E.cuda.Device(2)


def test_a_gpu_model_keeps_to_its_device_whatever_is_current():
    """A model made on device 0 works while device 1 is current, and one made on device
    1 works from device 0 (every public method makes the model's device current)."""
    import minigd as mg

    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(40, 5)), rng.integers(0, 3, 40)
    ref = mg.MLP([5, 8, 3], seed=0, dtype="float64", backend="numpy")
    h_ref = mg.fit(ref, X, y, batch_size=8, epochs=2, optimizer=mg.SGD(0.1, momentum=0.9), seed=0)
    with E.emulated():
        m0 = mg.MLP([5, 8, 3], seed=0, dtype="float64", backend="gpu")
        with E.cuda.Device(1):
            m1 = mg.MLP([5, 8, 3], seed=0, dtype="float64", backend="gpu")
            h0 = mg.fit(m0, X, y, batch_size=8, epochs=2, optimizer=mg.SGD(0.1, momentum=0.9), seed=0)
        h1 = mg.fit(m1, X, y, batch_size=8, epochs=2, optimizer=mg.SGD(0.1, momentum=0.9), seed=0)
    assert m0.backend_impl.device.id == 0 and m1.backend_impl.device.id == 1
    for m, h in ((m0, h0), (m1, h1)):
        np.testing.assert_allclose(m.params, ref.params, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(h.column("loss"), h_ref.column("loss"), rtol=1e-10)


def test_no_work_of_the_gpu_backend_reaches_the_null_stream():
    """Every launch, memset, matmul and copy of the backend goes to the model's own
    (non-blocking) stream: work on the legacy null stream would not be ordered with it.
    Covers creation, fits in the three regimes (graph capture, tiled, cuBLAS), batch norm
    with dropout, evaluation and the gradient statistics."""
    import minigd as mg

    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(96, 5)), rng.integers(0, 3, 96)
    E.counts.clear()
    with E.emulated():
        for graphs, gmax, kw in (
            (True, 64, {}),
            (False, 64, {}),
            (True, 8, {}),
            (True, 64, dict(batch_norm=True, ghost_batch_size=4, dropout=0.2)),
        ):
            m = mg.MLP([5, 8, 3], seed=0, dtype="float64", backend="gpu", **kw)
            m.backend_impl.use_graphs, m.backend_impl.graph_max_batch = graphs, gmax
            mg.fit(
                m,
                X,
                y,
                batch_size=16,
                epochs=2,
                optimizer=mg.SGD(0.05, momentum=0.9),
                seed=0,
                validation=(X[:32], y[:32]),
                eval_every=3,
            )
            m.evaluate(X, y)
            m.loss_and_grad(X[:16], y[:16])
            if not kw:
                mg.per_example_grad_norms(m, X[:16], y[:16])
                mg.grad_moments(m, X, y, chunk_size=32)
    assert E.counts["launch"] > 100 and E.counts["graph_launch"] > 0 and E.counts["matmul"] > 0
    assert E.counts["null_stream"] == 0


def test_asarray_keeps_fortran_order_as_cupy_does_and_the_backend_uploads_c_order():
    """cupy.asarray keeps a Fortran-ordered host array Fortran-ordered, and a raw kernel sees
    only its data pointer: the backend must upload training data in C order."""
    import minigd as mg

    F = np.asfortranarray(np.arange(12.0).reshape(3, 4))
    assert E.asarray(F).flags.f_contiguous and not E.asarray(F).flags.c_contiguous
    assert E.ascontiguousarray(F).flags.c_contiguous
    np.testing.assert_array_equal(E.ascontiguousarray(F).get(), F)
    rng = np.random.default_rng(3)
    X, yf = rng.normal(size=(32, 5)), rng.normal(size=(32, 2))
    idx = rng.integers(0, 32, size=4 * 8)
    out = []
    for order in ("C", "F"):
        with E.emulated():
            m = mg.MLP([5, 6, 2], loss="mse", seed=0, dtype="float64", backend="gpu")
        b = m.backend_impl
        opt = mg.SGD(0.05).init(m.params)
        p = m.params.copy()
        b.reserve(8)
        b.run_steps(
            p,
            np.asarray(X, order=order),
            np.zeros(0, np.int64),
            np.asarray(yf, order=order),
            idx,
            8,
            4,
            opt,
            np.full(4, 0.05),
            1,
        )
        out.append(p)
    np.testing.assert_array_equal(out[0], out[1])


def test_the_step_tables_are_sized_by_the_run_not_the_workspace():
    """A whole-dataset pass (training-mode forward of a batch-norm model, say) grows the
    workspace; the step index table stays n_steps x B (it was n_steps x capacity)."""
    import minigd as mg

    with E.emulated():
        m = mg.MLP([3, 4, 2], seed=0, dtype="float64", backend="gpu")
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(3000, 3)), rng.integers(0, 2, 3000)
    m.backend_impl.reserve(3000)  # as one pass over 3000 rows does
    assert m.backend_impl.ws.capacity >= 3000
    mg.fit(m, X[:64], y[:64], batch_size=8, epochs=1)
    assert m.backend_impl._idx.size <= m.backend_impl.read_every * 8


def test_an_error_inside_a_graph_capture_is_reported_not_the_broken_capture(monkeypatch):
    import minigd as mg

    with E.emulated():
        m = mg.MLP([3, 4, 2], seed=0, dtype="float64", backend="gpu")
    b = m.backend_impl

    def broken(*a, **k):
        raise ZeroDivisionError("planted")

    monkeypatch.setattr(b, "_enqueue_step", broken)
    monkeypatch.setattr(
        E.Stream,
        "end_capture",
        lambda self, _orig=E.Stream.end_capture: (
            _orig(self),
            (_ for _ in ()).throw(RuntimeError("cudaErrorStreamCaptureInvalidated")),
        )[1],
    )
    X, y = np.zeros((8, 3)), np.zeros(8, np.int64)
    with pytest.raises(ZeroDivisionError, match="planted"):
        mg.fit(m, X, y, batch_size=4, epochs=1)
    assert E._capturing_here() is None  # the capture was ended


# ============================================================================ AddressSanitizer
#: parity cases that launch every kernel (all regimes, CE/MSE/BCE, training steps with
#: clipping and the unfused optimizer chain, batch norm with ghost batches and dropout, the
#: step tables of the device loop, the running statistics), run under each sanitizer
SANITIZER_CASES = (
    "emu: and ((float32 and (relu-ce or tanh-mse-2hidden or gelu-bce or sgd-clip or generic-chain or "
    "test_forward_loss_and_gradient)) or run_steps_with_norm or fit_in_device_chunks_with_norm or "
    "update_running)"
)


def _runtime(lib):
    """The path of gcc's sanitizer runtime ``lib`` (libasan.so, libtsan.so), or None."""
    import shutil
    import subprocess

    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        return None
    path = subprocess.run([cc, f"-print-file-name={lib}"], capture_output=True, text=True).stdout.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else None


def _sanitizer_env(tmp_path, which):
    """The environment of a subprocess whose emulated kernels are built with sanitizer
    ``which`` ("address", "thread"), its runtime preloaded, and a private build cache."""
    lib, opts = {
        "address": ("libasan.so", {"ASAN_OPTIONS": "detect_leaks=0"}),
        "thread": ("libtsan.so", {"TSAN_OPTIONS": "exitcode=66"}),
    }[which]
    return dict(
        os.environ,
        MINIGD_GPU_EMU_SANITIZE=which,
        LD_PRELOAD=_runtime(lib),
        MINIGD_CACHE_DIR=str(tmp_path),
        NUMBA_NUM_THREADS="1",
        OPENBLAS_NUM_THREADS="1",
        **opts,
    )


def _libasan():
    return _runtime("libasan.so")


def _asan_env(tmp_path):
    return _sanitizer_env(tmp_path, "address")


@pytest.mark.skipif(_libasan() is None, reason="no libasan (gcc's AddressSanitizer runtime) here")
def test_an_out_of_bounds_write_is_caught_under_address_sanitizer(tmp_path):
    import subprocess
    import sys

    script = (
        "import numpy as np\n"
        "from minigd.testing import gpu_emu as E\n"
        "m = E.RawModule(code='extern \"C\" __global__ void w(double* x, long long n) { x[n] = 1.0; }')\n"
        "x = E.zeros(300, np.float64)\n"
        "m.get_function('w')((1,), (1,), (x, np.int64(300)))\n"
        "print('not caught')\n"
    )
    p = subprocess.run(
        [sys.executable, "-c", script], env=_asan_env(tmp_path), capture_output=True, text=True, timeout=300
    )
    assert p.returncode != 0 and "not caught" not in p.stdout
    assert "heap-buffer-overflow" in p.stderr and "0 bytes to the right of 2400-byte region" in p.stderr


# ============================================================================ ThreadSanitizer
def _libtsan():
    return _runtime("libtsan.so")


def _tsan_env(tmp_path):
    return _sanitizer_env(tmp_path, "thread")


RACES = r"""
extern "C" __global__ void inter_block(double* x) { if (threadIdx.x == 0) x[0] += 1.0; }   // every block
extern "C" __global__ void intra_block(double* y) {        // thread 1 reads thread 0's write, no barrier
    __shared__ double v;
    if (threadIdx.x == 0) v = 1.0;
    if (threadIdx.x == 1) y[0] = v;
}
__attribute__((noinline)) __device__ void bump(double (&v)[1], double x) { v[0] += x; }   // a local, by reference
extern "C" __global__ void clean(const double* x, double* y, int* f) {
    __shared__ double sh[64];
    double local[1] = {0.0};                                // on the thread's stack, in every block
    bump(local, x[threadIdx.x]);
    sh[threadIdx.x] = x[blockIdx.x * 64 + threadIdx.x];
    __syncthreads();
    y[blockIdx.x * 64 + threadIdx.x] = sh[63 - threadIdx.x];
    __syncthreads();
    sh[threadIdx.x] = 2.0;                                  // after the barrier: no race with the reads
    atomicOr(f, 1 << (threadIdx.x % 5));                    // atomics from every block: no race
    if (local[0] != x[threadIdx.x]) y[0] = -1.0;
}
"""


@pytest.mark.skipif(_libtsan() is None, reason="no libtsan (gcc's ThreadSanitizer runtime) here")
@pytest.mark.parametrize(
    "kernel, grid, race", [("inter_block", 2, True), ("intra_block", 1, True), ("clean", 4, False)]
)
def test_thread_sanitizer_reports_races_between_blocks_and_within_one(tmp_path, kernel, grid, race):
    """Under MINIGD_GPU_EMU_SANITIZE=thread the threads of a launch are concurrent for TSan,
    ordered only by __syncthreads, atomics and launches: two blocks updating one address is
    a data race (which no scheduling order of the plain emulator shows), and so is a read of
    another thread's shared write without a barrier; the same kernel run twice (launches
    are ordered), barriers, atomics and the locals of threads that take turns on a stack
    are not."""
    import subprocess
    import sys

    args = {"inter_block": "(x,)", "intra_block": "(y,)", "clean": "(x, y, f)"}[kernel]
    script = (
        "import numpy as np\n"
        "from minigd.testing import gpu_emu as E\n"
        f"m = E.RawModule(code={RACES!r})\n"
        "x = E.zeros(256, np.float64); y = E.zeros(256, np.float64); f = E.zeros(1, np.int32)\n"
        f"for _ in range(2): m.get_function({kernel!r})(({grid},), (64,), {args})\n"
        "print('ran')\n"
    )
    p = subprocess.run(
        [sys.executable, "-c", script], env=_tsan_env(tmp_path), capture_output=True, text=True, timeout=300
    )
    assert "ran" in p.stdout, p.stderr[-3000:]
    if race:
        assert p.returncode == 66 and "WARNING: ThreadSanitizer: data race" in p.stderr, p.stderr[-3000:]
        assert f"#0 {kernel} " in p.stderr
    else:
        assert p.returncode == 0 and "ThreadSanitizer" not in p.stderr, p.stderr[-3000:]


@pytest.mark.parametrize("which, name", [("address", "AddressSanitizer"), ("thread", "ThreadSanitizer")])
def test_the_gpu_kernels_pass_the_parity_cases_under_each_sanitizer(tmp_path, which, name):
    """The parity cases of SANITIZER_CASES (every kernel), with every kernel built with the
    sanitizer.  AddressSanitizer: no access past any device allocation.  ThreadSanitizer: no
    two threads of a launch -- in one block without a barrier between them, or in two
    blocks -- touch one address, one of them writing, without atomics (the emulator's blind
    spot otherwise: it runs blocks one after another)."""
    import subprocess
    import sys
    from pathlib import Path

    if _runtime({"address": "libasan.so", "thread": "libtsan.so"}[which]) is None:
        pytest.skip(f"no {name} runtime (gcc's) here")
    tests = Path(__file__).resolve().parent
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-s",
            "-x",
            "-p",
            "no:cacheprovider",  # -s: reports
            str(tests / "test_gpu_backend.py"),
            str(tests / "test_gpu_norm.py"),
            "-k",
            SANITIZER_CASES,
        ],
        env=_sanitizer_env(tmp_path, which),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tests.parent,
    )
    assert p.returncode == 0 and name not in p.stderr, (p.stdout[-3000:], p.stderr[-3000:])
    assert " passed" in p.stdout and "failed" not in p.stdout


# ============================================================================ column reductions
def test_batch_norm_kernels_stride_over_ghost_batches_past_the_grid():
    """The batch-norm reductions run on (32 columns x 8 row stripes) blocks, one grid row per
    ghost batch, grid-striding when there are more ghost batches than grid rows (over 65535
    on a GPU): a grid of 2 rows over 5 ghost batches (the last one short) and a partial
    column block give the NumPy statistics and gradients (forward, backward, dgamma /
    dbeta), and the running update the unbiased variance."""
    from minigd.kernels import gpu_sources as S

    m = E.RawModule(code=S.source("gpu_norm.cu"))
    rng = np.random.default_rng(0)
    B, n, g, eps = 9, 40, 2, 1e-5
    X = rng.normal(size=(B, n)) * 3 + 1
    gamma, beta = rng.normal(size=n), rng.normal(size=n)
    dX, dY, dXh, dInv = (
        E.asarray(X),
        E.zeros((B, n), np.float64),
        E.zeros((B, n), np.float64),
        E.zeros((5, n), np.float64),
    )
    grid, block = S.grid_columns(n, 5)
    assert grid == (2, 5) and block == (32, 8)
    m.get_function("mgd_bn_train_forward_f64")(
        (2, 2),
        block,
        (dX, dY, dXh, dInv, E.asarray(gamma), E.asarray(beta), np.int32(B), np.int32(n), np.int32(g), np.float64(eps)),
    )
    want = np.empty_like(X)
    for c in range(5):
        x = X[c * g : (c + 1) * g]
        want[c * g : (c + 1) * g] = gamma * (x - x.mean(0)) / np.sqrt(x.var(0) + eps) + beta
    np.testing.assert_allclose(dY.get(), want, rtol=1e-12, atol=1e-12)
    # backward per ghost batch, and dgamma / dbeta over the whole batch
    G = rng.normal(size=(B, n))
    dDX, dg, db = E.zeros((B, n), np.float64), E.zeros(n, np.float64), E.zeros(n, np.float64)
    m.get_function("mgd_bn_train_backward_f64")(
        (2, 2), block, (E.asarray(G), dXh, dInv, E.asarray(gamma), dDX, np.int32(B), np.int32(n), np.int32(g))
    )
    m.get_function("mgd_bn_param_grad_f64")(*S.grid_columns(n), (E.asarray(G), dXh, np.int32(B), np.int32(n), dg, db))
    want_dx = np.empty_like(X)
    xh = dXh.get()
    for c in range(5):
        r = slice(c * g, (c + 1) * g)
        inv = 1 / np.sqrt(X[r].var(0) + eps)
        want_dx[r] = gamma * inv * (G[r] - G[r].mean(0) - xh[r] * (G[r] * xh[r]).mean(0))
    np.testing.assert_allclose(dDX.get(), want_dx, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dg.get(), (G * xh).sum(0), rtol=1e-12)
    np.testing.assert_allclose(db.get(), G.sum(0), rtol=1e-12)
    rm, rv = E.zeros(n, np.float64), E.asarray(np.ones(n))
    m.get_function("mgd_bn_running_update_f64")(
        *S.grid_columns(n), (dX, np.int32(B), np.int32(n), np.float64(0.1), rm, rv, np.uint64(0))
    )
    np.testing.assert_allclose(rm.get(), 0.1 * X.mean(0), rtol=1e-12)
    np.testing.assert_allclose(rv.get(), 0.9 + 0.1 * X.var(0, ddof=1), rtol=1e-12)


def test_fit_uploads_the_training_data_before_its_clock_starts(monkeypatch):
    """The gpu backend's warm-up uploads the data: the first timed step finds it there."""
    import minigd as mg

    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(40, 5)), rng.integers(0, 3, 40)
    with E.emulated():
        m = mg.MLP([5, 8, 3], seed=0, dtype="float64", backend="gpu")
    b = m.backend_impl
    uploads_in_steps = []
    run_steps = type(b).run_steps

    def counting(self, *a, **k):
        before = self._data
        out = run_steps(self, *a, **k)
        uploads_in_steps.append(self._data is not before)
        return out

    monkeypatch.setattr(type(b), "run_steps", counting)
    mg.fit(m, X, y, batch_size=8, epochs=2)
    assert uploads_in_steps and not any(uploads_in_steps)


@pytest.mark.parametrize(
    "kw", [{}, dict(batch_norm=True, ghost_batch_size=4, dropout=0.2)], ids=["plain", "bn-dropout"]
)
def test_fit_captures_its_graphs_before_its_clock_starts(monkeypatch, kw):
    """fit's warm-up captures the CUDA graph of a step of each batch size (the full one
    and the partial last one): no timed run_steps captures, allocates or uploads, and the
    result is bitwise that of a fit without the warm-up."""
    import minigd as mg

    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(44, 5)), rng.integers(0, 3, 44)

    def model():
        with E.emulated():
            return mg.MLP([5, 8, 3], seed=0, dtype="float64", backend="gpu", **kw)

    def go(m):
        return mg.fit(
            m,
            X,
            y,
            batch_size=8,
            epochs=3,
            optimizer=mg.SGD(0.05, momentum=0.9),
            seed=0,
            validation=(X[:16], y[:16]),
            eval_every=4,
        )

    ref = model()
    monkeypatch.setattr(type(ref.backend_impl), "warm_up", lambda self, *a, **k: None)
    h_ref = go(ref)
    monkeypatch.undo()
    m = model()
    b = m.backend_impl
    in_steps = collections.Counter()
    run_steps = type(b).run_steps

    def counting(self, *a, **k):
        before = (E.counts["capture"], E.counts["alloc"], self._data)
        out = run_steps(self, *a, **k)
        in_steps["capture"] += E.counts["capture"] - before[0]
        in_steps["alloc"] += E.counts["alloc"] - before[1]
        in_steps["upload"] += self._data is not before[2]
        return out

    monkeypatch.setattr(type(b), "run_steps", counting)
    E.counts.clear()
    h = go(m)
    assert E.counts["capture"] == 2  # batch 8 and the last batch of 4, in the warm-up
    assert in_steps == collections.Counter() or not any(in_steps.values())
    np.testing.assert_array_equal(m.params, ref.params)
    np.testing.assert_array_equal(h.column("loss"), h_ref.column("loss"))
