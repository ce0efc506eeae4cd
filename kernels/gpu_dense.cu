// minigd CUDA kernels: dense layers (gather, GEMM with fused epilogues, bias + activation,
// activation backward, bias gradient).  Layout: every matrix row-major, batch-major
// activations (B, width), W_l (fan_in, fan_out), as in kernels/cpu.py.
#include "gpu_common.cuh"

#define MGD_TILE 16

// ---------------------------------------------------------------- gather
// x0[r, :] = X[idx[c * B + r], :] for r < B, c = st[0] (0 when st is null).
//   X   (N, n0)  read       idx (>= (c + 1) * B,) int64 read     st (4,) int or null
//   x0  (B, n0)  written
template <typename T>
__device__ void gather_body(const T* __restrict__ X, const mgd_i64* __restrict__ idx,
                            const int* __restrict__ st, int B, int n0, T* __restrict__ x0) {
    const mgd_i64 base = st ? (mgd_i64)st[0] * B : 0;
    const mgd_i64 total = (mgd_i64)B * n0;
    for (mgd_i64 e = mgd_gtid(); e < total; e += mgd_gstride()) {
        const mgd_i64 r = e / n0;
        const mgd_i64 i = e - r * n0;
        x0[e] = X[idx[base + r] * n0 + i];
    }
}

// ---------------------------------------------------------------- bias + activation (epilogue of cuBLAS)
// Z[r, j] += b[j]; A[r, j] = f(Z[r, j]) when act >= 0 (hidden layers; A may be null otherwise).
//   Z (B, n) read+written   b (n,) read   A (B, n) written or null
template <typename T>
__device__ void bias_act_body(T* __restrict__ Z, const T* __restrict__ b, T* __restrict__ A,
                              int B, int n, int act) {
    const mgd_i64 total = (mgd_i64)B * n;
    for (mgd_i64 e = mgd_gtid(); e < total; e += mgd_gstride()) {
        const T z = Z[e] + b[e % n];
        Z[e] = z;
        if (act >= 0) A[e] = mgd_act(act, z);
    }
}

// D[e] = D[e] * f'(Z[e]) for e < total (hidden layer l after D_l = D_{l+1} W_{l+1}^T).
//   Z, A (total,) read   D (total,) read+written
template <typename T>
__device__ void act_bwd_body(const T* __restrict__ Z, const T* __restrict__ A, T* __restrict__ D,
                             mgd_i64 total, int act) {
    for (mgd_i64 e = mgd_gtid(); e < total; e += mgd_gstride()) D[e] = mgd_act_bwd(act, Z[e], A[e], D[e]);
}

// ---------------------------------------------------------------- bias gradient
// gb[j] = sum_r D[r, j].  Block (32, 8): threadIdx.x picks the column (coalesced reads),
// threadIdx.y a stripe of rows; the 8 partial sums are added in a fixed order.
//   D (B, n) read   gb (n,) written
template <typename T>
__device__ void bias_grad_body(const T* __restrict__ D, int B, int n, T* __restrict__ gb) {
    __shared__ T part[8][33];
    const int j = blockIdx.x * 32 + threadIdx.x;
    T s = T(0);
    if (j < n)
        for (int r = threadIdx.y; r < B; r += 8) s += D[(mgd_i64)r * n + j];
    part[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && j < n) {
        T t = part[0][threadIdx.x];
        for (int y = 1; y < 8; ++y) t += part[y][threadIdx.x];
        gb[j] = t;
    }
}

// ---------------------------------------------------------------- tiled GEMM with fused epilogues
// C = op(A) op(B), all row-major: op(A) is (M, K) (stored (K, M) when transA), op(B) is
// (K, N) (stored (N, K) when transB), C is (M, N).  16 x 16 tiles through shared memory,
// one output per thread; tiles are loaded so that consecutive threads read consecutive
// addresses in both layouts.  For the graph-captured path (cuBLAS cannot run inside a CuPy
// stream capture).  Epilogues (epi):
//   0: C = acc                                  (weight gradient dW = A^T D)
//   1: C = acc + bias[j]; Aout = f(C) if act>=0 (forward: z_l, a_l)
//   2: C = acc * f'(Zp, Ap)                     (backward: D_{l-1} = (D_l W_l^T) * f'(z_{l-1}))
//   bias (N,) read (epi 1)   Aout (M, N) written (epi 1, act >= 0)   Zp, Ap (M, N) read (epi 2)
// Block (16, 16); grid (ceil(M / 16), ceil(N / 16)): rows on grid.x, which allows 2^31 - 1 blocks
// (grid.y allows 65535: rows there would cap a batch at about a million rows).
template <typename T>
__device__ void gemm_body(const T* __restrict__ A, const T* __restrict__ Bm, T* __restrict__ C,
                          int M, int N, int K, int transA, int transB, int epi,
                          const T* __restrict__ bias, T* __restrict__ Aout,
                          const T* __restrict__ Zp, const T* __restrict__ Ap, int act) {
    __shared__ T As[MGD_TILE][MGD_TILE + 1];   // As[i][k]
    __shared__ T Bs[MGD_TILE][MGD_TILE + 1];   // Bs[k][j]
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int i0 = blockIdx.x * MGD_TILE, j0 = blockIdx.y * MGD_TILE;
    const int row = i0 + ty, col = j0 + tx;
    T acc = T(0);
    for (int k0 = 0; k0 < K; k0 += MGD_TILE) {
        if (!transA) {
            const int i = i0 + ty, k = k0 + tx;
            As[ty][tx] = (i < M && k < K) ? A[(mgd_i64)i * K + k] : T(0);
        } else {
            const int i = i0 + tx, k = k0 + ty;
            As[tx][ty] = (i < M && k < K) ? A[(mgd_i64)k * M + i] : T(0);
        }
        if (!transB) {
            const int k = k0 + ty, j = j0 + tx;
            Bs[ty][tx] = (k < K && j < N) ? Bm[(mgd_i64)k * N + j] : T(0);
        } else {
            const int k = k0 + tx, j = j0 + ty;
            Bs[tx][ty] = (k < K && j < N) ? Bm[(mgd_i64)j * K + k] : T(0);
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < MGD_TILE; ++kk) acc += As[ty][kk] * Bs[kk][tx];
        __syncthreads();
    }
    if (row < M && col < N) {
        const mgd_i64 e = (mgd_i64)row * N + col;
        if (epi == 1) {
            const T z = acc + bias[col];
            C[e] = z;
            if (act >= 0) Aout[e] = mgd_act(act, z);
        } else if (epi == 2) {
            C[e] = mgd_act_bwd(act, Zp[e], Ap[e], acc);
        } else {
            C[e] = acc;
        }
    }
}

// ---------------------------------------------------------------- exported entry points
#define MGD_EXPORT_DENSE(T, S)                                                                       \
    extern "C" __global__ void __launch_bounds__(MGD_THREADS)                                        \
    mgd_gather_##S(const T* X, const mgd_i64* idx, const int* st, int B, int n0, T* x0) {            \
        gather_body<T>(X, idx, st, B, n0, x0);                                                       \
    }                                                                                                \
    extern "C" __global__ void __launch_bounds__(MGD_THREADS)                                        \
    mgd_bias_act_forward_##S(T* Z, const T* b, T* A, int B, int n, int act) {                         \
        bias_act_body<T>(Z, b, A, B, n, act);                                                        \
    }                                                                                                \
    extern "C" __global__ void __launch_bounds__(MGD_THREADS)                                        \
    mgd_act_backward_##S(const T* Z, const T* A, T* D, mgd_i64 total, int act) {                     \
        act_bwd_body<T>(Z, A, D, total, act);                                                        \
    }                                                                                                \
    extern "C" __global__ void __launch_bounds__(MGD_THREADS)                                        \
    mgd_bias_grad_##S(const T* D, int B, int n, T* gb) { bias_grad_body<T>(D, B, n, gb); }            \
    extern "C" __global__ void __launch_bounds__(MGD_THREADS)                                        \
    mgd_gemm_##S(const T* A, const T* Bm, T* C, int M, int N, int K, int transA, int transB,         \
                 int epi, const T* bias, T* Aout, const T* Zp, const T* Ap, int act) {               \
        gemm_body<T>(A, Bm, C, M, N, K, transA, transB, epi, bias, Aout, Zp, Ap, act);               \
    }

MGD_EXPORT_DENSE(float, f32)
MGD_EXPORT_DENSE(double, f64)
