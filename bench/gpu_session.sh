#!/usr/bin/env bash
# Everything a session that is lent a GPU should run (see README.md, "Backends" -> "gpu"):
# from the repository root on the device machine,
#
#     bash bench/gpu_session.sh            # all steps, results under $OUT (or /tmp/minigd-gpu-out)
#     bash bench/gpu_session.sh tests bench  # only some steps: tests, bench, sanitize
#
# The device image has Python with numpy, numba, scipy, scikit-learn, pytest, hypothesis and
# CuPy (cupy-cuda13x) but no network, so minigd is installed from this checkout without
# dependencies and without build isolation.  Steps, each logged to $OUT and each under its
# own time limit so that all of them fit one 10-minute device call:
#   tests     the device and what minigd.available_backends() says; the GPU test suite on
#             real CUDA (NVRTC compile checks, parity with the NumPy reference -- the same
#             tests pass on the CPU emulator in CI --, batch norm / dropout, bench smoke);
#   bench     bench/gpu.py: µs per step for the two bench MLPs at batch 1..8192, gpu vs cpu
#             vs PyTorch CUDA, and the graph/cuBLAS crossover graph_max_batch should be;
#   sanitize  compute-sanitizer memcheck, then racecheck, over cases that launch every
#             kernel: out-of-bounds accesses and shared-memory races, which the CPU
#             emulator cannot see (last: the slowest and least important for the figures).
# It goes on after a failing step (the later ones still say something) and exits non-zero
# if any failed.  Copy $OUT/gpu.md into bench/results/ and the figures into the issue note.
set -uo pipefail
OUT=${OUT:-/tmp/minigd-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
STEPS=${*:-tests bench sanitize}
status=0

$PY -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$OUT/install.log" 2>&1 \
    || { echo "install failed:"; cat "$OUT/install.log"; exit 1; }

for step in $STEPS; do
    case $step in
    tests)
        { nvidia-smi -L; $PY -c "import minigd, cupy; print('available:', minigd.available_backends()); print('cupy', cupy.__version__)"; } \
            2>&1 | tee "$OUT/device.txt"
        timeout 150 $PY -m pytest -q -rs -p no:cacheprovider tests/test_gpu_sources.py tests/test_gpu_backend.py \
            tests/test_gpu_norm.py tests/test_gpu_bench.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -40
        [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
        ;;
    bench)
        timeout 330 $PY bench/gpu.py --out "$OUT" 2>&1 | tee "$OUT/bench.log" | tail -40
        [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
        ;;
    sanitize)
        # cases that launch every kernel (graph + cuBLAS regimes, training steps, BN + dropout,
        # the device loop's step tables and running statistics; checked by tracing on the emulator)
        SAN_CASES='cuda: and ((float32 and not tiled and (relu-ce or tanh-mse-2hidden or sgd-clip or adam-clip or generic-chain or bn-before-dropout or bn-after-ghost4-dropout)) or ((run_steps_with_norm or fit_in_device_chunks_with_norm) and graph))'
        if command -v compute-sanitizer >/dev/null; then
            for tool in memcheck racecheck; do
                timeout 90 compute-sanitizer --tool $tool --error-exitcode 99 --print-limit 20 \
                    $PY -m pytest -q -x -p no:cacheprovider tests/test_gpu_backend.py tests/test_gpu_norm.py \
                    -k "$SAN_CASES" 2>&1 | tee "$OUT/sanitizer_$tool.log" | tail -15
                [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
            done
        else
            echo "compute-sanitizer not found: skipped" | tee "$OUT/sanitizer_memcheck.log"
        fi
        ;;
    *)
        echo "unknown step $step (expected tests, bench, sanitize)"; exit 2 ;;
    esac
done
exit $status
