// minigd CUDA kernels: definitions shared by every kernels/gpu_*.cu source.
//
// The loader (kernels/gpu.py) pastes this file in place of the `#include "gpu_common.cuh"`
// line of each source, so every compiled unit is one self-contained text.  NVRTC (the
// compiler CuPy uses at run time) has no C++ standard library: no <cmath>, <cstdint> or
// any other system header may appear here or in a source -- only CUDA's built-in device
// math (expf/exp, tanhf/tanh, erff/erf, ...), which NVRTC provides without a header.
//
// The kernel contract is the CPU backend's (kernels/cpu.py): kernels are procedures over
// caller-owned, C-contiguous, batch-major buffers; activation and loss arrive as the integer
// codes of minigd/nn.py; every kernel exists for float (suffix _f32) and double (_f64);
// loss values and reductions accumulate in double; deltas of the mean loss carry 1/B.
//
// Step control block (for the CUDA-graph-captured training step, see minigd/backends/gpu/_step.py):
//   int    st[4]     st[0] = step counter c (which row of `sched`/`rec`/`idx` this step uses),
//                    st[1] = stopped (sticky: a step was rejected; later steps change nothing),
//                    st[2] = this step's "update would be non-finite" flag, st[3] unused.
//   double sched[]   (steps, 2): [lr, t] of step c.
//   double rec[]     (steps, 3): [mean loss, applied (1/0), |raw gradient|^2] of step c.
// Kernels that take `st` read the step counter from it, so one captured graph replays any
// step: the host only advances data in device memory, never kernel arguments.

#define MGD_THREADS 256

// activation codes (minigd/nn.py)
#define MGD_IDENTITY 0
#define MGD_RELU 1
#define MGD_LEAKY_RELU 2
#define MGD_TANH 3
#define MGD_SIGMOID 4
#define MGD_GELU 5
// loss codes (minigd/nn.py)
#define MGD_CROSS_ENTROPY 0
#define MGD_MSE 1
#define MGD_BINARY_CROSS_ENTROPY 2

#define MGD_LEAKY_SLOPE 0.01
// loss gradients and optimizer state below this magnitude are flushed to 0 (kernels/cpu.py FLUSH)
#define MGD_FLUSH 1e-30
#define MGD_SQRT_HALF 0.70710678118654752440
#define MGD_INV_SQRT_2PI 0.39894228040143267794
// columns of the optimizer's hyper-parameter table (minigd/optim/base.py: (T + 1, 8))
#define MGD_HP_COLS 8

typedef long long mgd_i64;

// ---------------------------------------------------------------- typed math (no headers)
__device__ __forceinline__ float mgd_exp(float x) { return expf(x); }
__device__ __forceinline__ double mgd_exp(double x) { return exp(x); }
__device__ __forceinline__ float mgd_tanh(float x) { return tanhf(x); }
__device__ __forceinline__ double mgd_tanh(double x) { return tanh(x); }
__device__ __forceinline__ float mgd_erf(float x) { return erff(x); }
__device__ __forceinline__ double mgd_erf(double x) { return erf(x); }
__device__ __forceinline__ float mgd_sqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ double mgd_sqrt(double x) { return sqrt(x); }
__device__ __forceinline__ float mgd_abs(float x) { return fabsf(x); }
__device__ __forceinline__ double mgd_abs(double x) { return fabs(x); }

// finite iff x - x == 0 (inf - inf and NaN - NaN are NaN); no isfinite() needed
template <typename T>
__device__ __forceinline__ bool mgd_finite(T x) { return (x - x) == T(0); }

// x if |x| > FLUSH else x * 0 (NaN stays NaN)
template <typename T>
__device__ __forceinline__ T mgd_flush(T x) { return mgd_abs(x) > T(MGD_FLUSH) ? x : x * T(0); }

// ---------------------------------------------------------------- activations
// a = f(z).  relu keeps NaN and maps -inf to 0 (as np.maximum(z, 0)).
template <typename T>
__device__ __forceinline__ T mgd_act(int code, T z) {
    switch (code) {
    case MGD_RELU: return (z > T(0) || z != z) ? z : T(0);
    case MGD_LEAKY_RELU: return z > T(0) ? z : z * T(MGD_LEAKY_SLOPE);
    case MGD_TANH: return mgd_tanh(z);
    case MGD_SIGMOID: return T(1) / (T(1) + mgd_exp(-z));
    case MGD_GELU: return T(0.5) * z * (T(1) + mgd_erf(z * T(MGD_SQRT_HALF)));
    default: return z;
    }
}

// d * f'(z), with f' from z (relu, leaky relu, gelu) or from a = f(z) (tanh, sigmoid).
// relu sets d to 0 where z <= 0 (not d * 0: an infinite d must not become NaN).
template <typename T>
__device__ __forceinline__ T mgd_act_bwd(int code, T z, T a, T d) {
    switch (code) {
    case MGD_RELU: return z > T(0) ? d : T(0);
    case MGD_LEAKY_RELU: return z > T(0) ? d : d * T(MGD_LEAKY_SLOPE);
    case MGD_TANH: return d * (T(1) - a * a);
    case MGD_SIGMOID: return d * (a * (T(1) - a));
    case MGD_GELU:
        return d * (T(0.5) * (T(1) + mgd_erf(z * T(MGD_SQRT_HALF)))
                    + z * mgd_exp(T(-0.5) * z * z) * T(MGD_INV_SQRT_2PI));
    default: return d;
    }
}

// ---------------------------------------------------------------- reductions
__device__ __forceinline__ double mgd_warp_sum(double v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

template <typename T>
__device__ __forceinline__ T mgd_warp_max(T v) {
    for (int o = 16; o > 0; o >>= 1) {
        T w = __shfl_xor_sync(0xffffffffu, v, o);
        v = w > v ? w : v;
    }
    return v;
}

// Sum of `v` over a block of blockDim.x threads (a power of two <= 1024), in a fixed
// order (deterministic); every thread gets the result.  `sh` holds blockDim.x doubles.
__device__ __forceinline__ double mgd_block_sum(double v, double* sh) {
    sh[threadIdx.x] = v;
    __syncthreads();
    for (int s = blockDim.x >> 1; s > 0; s >>= 1) {
        if (threadIdx.x < s) sh[threadIdx.x] += sh[threadIdx.x + s];
        __syncthreads();
    }
    double r = sh[0];
    __syncthreads();
    return r;
}

__device__ __forceinline__ mgd_i64 mgd_gtid() { return (mgd_i64)blockIdx.x * blockDim.x + threadIdx.x; }
__device__ __forceinline__ mgd_i64 mgd_gstride() { return (mgd_i64)gridDim.x * blockDim.x; }
