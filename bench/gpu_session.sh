#!/usr/bin/env bash
# Everything a session that is lent a GPU should run, in one device call (see README.md,
# "Backends" -> "gpu"): from the repository root on the device machine,
#
#     bash bench/gpu_session.sh            # results under $OUT (or /tmp/minigd-gpu-out)
#
# The device image has Python with numpy, numba, scipy, scikit-learn, pytest, hypothesis and
# CuPy (cupy-cuda13x) but no network, so minigd is installed from this checkout without
# dependencies and without build isolation.  Steps, each logged to $OUT:
#   1. the device and what minigd.available_backends() says;
#   2. the GPU test suite: NVRTC compile checks, parity with the NumPy reference on real
#      CUDA (the same tests pass on the CPU emulator in CI), batch norm / dropout, bench smoke;
#   3. compute-sanitizer (memcheck, then racecheck) over a few parity cases: out-of-bounds
#      accesses and shared-memory races, which the CPU emulator cannot see;
#   4. bench/gpu.py: µs per step for the two bench MLPs at batch 1..8192, gpu vs cpu vs
#      PyTorch CUDA, and the graph/cuBLAS crossover that graph_max_batch should be.
# It goes on after a failing step (the later ones still say something) and exits non-zero
# if any failed.  Copy $OUT/gpu.md into bench/results/ and the figures into the issue note.
set -uo pipefail
OUT=${OUT:-/tmp/minigd-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
status=0

$PY -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$OUT/install.log" 2>&1 \
    || { echo "install failed:"; cat "$OUT/install.log"; exit 1; }
{ nvidia-smi -L; $PY -c "import minigd, cupy; print('available:', minigd.available_backends()); print('cupy', cupy.__version__)"; } \
    2>&1 | tee "$OUT/device.txt"

$PY -m pytest -q -rs -p no:cacheprovider tests/test_gpu_sources.py tests/test_gpu_backend.py \
    tests/test_gpu_norm.py tests/test_gpu_bench.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -40
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

# cases through every kernel (graph + cuBLAS regimes, training steps, BN + dropout, the device
# loop's step tables and running statistics), under the sanitizer
SAN_CASES='cuda: and ((float32 and not tiled and (relu-ce or tanh-mse-2hidden or sgd-clip or adam-clip or generic-chain or bn-before-dropout or bn-after-ghost4-dropout)) or ((run_steps_with_norm or fit_in_device_chunks_with_norm) and graph))'
if command -v compute-sanitizer >/dev/null; then
    for tool in memcheck racecheck; do
        compute-sanitizer --tool $tool --error-exitcode 99 --print-limit 20 \
            $PY -m pytest -q -x -p no:cacheprovider tests/test_gpu_backend.py tests/test_gpu_norm.py \
            -k "$SAN_CASES" 2>&1 | tee "$OUT/sanitizer_$tool.log" | tail -15
        [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
    done
else
    echo "compute-sanitizer not found: skipped" | tee "$OUT/sanitizer_memcheck.log"
fi

$PY bench/gpu.py --out "$OUT" 2>&1 | tee "$OUT/bench.log" | tail -40
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
exit $status
