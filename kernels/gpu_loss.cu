// minigd CUDA kernels: output losses with their deltas in one pass, deterministic
// reductions, and the fused per-example squared gradient norms.
#include "gpu_common.cuh"

// ---------------------------------------------------------------- loss forward + backward
// One warp per example r < B (row = idx[c * B + r], c = st[0] or 0 when st is null):
// the per-example loss (accumulated in double, see minigd/nn.py for the formulas) goes to
// rowloss[r], and D[r, :] = scale * dloss_r / dz_r (scale = 1/B for the mean loss; entries
// smaller than FLUSH flushed to 0 for the classification losses, as kernels/cpu.py does).
//   Z (B, n) read           D (B, n) written            rowloss (B,) double written
//   yi (N,) int64 read (cross-entropy; else may be null)
//   yf (N, n) read (mse / binary cross-entropy; else may be null)
// Block MGD_THREADS (8 warps = 8 rows), grid ceil(B / 8).
template <typename T>
__device__ void loss_body(const T* __restrict__ Z, T* __restrict__ D, const mgd_i64* __restrict__ yi,
                          const T* __restrict__ yf, const mgd_i64* __restrict__ idx,
                          const int* __restrict__ st, int B, int n, int code, double scale,
                          double* __restrict__ rowloss) {
    const int r = (int)(mgd_gtid() >> 5);
    const int lane = threadIdx.x & 31;
    if (r >= B) return;                      // whole warps leave together
    const mgd_i64 base = st ? (mgd_i64)st[0] * B : 0;
    const mgd_i64 row = idx[base + r];
    const T* z = Z + (mgd_i64)r * n;
    T* d = D + (mgd_i64)r * n;
    double loss = 0.0;
    if (code == MGD_CROSS_ENTROPY) {
        T m = z[0];
        for (int k = lane; k < n; k += 32) m = z[k] > m ? z[k] : m;
        m = mgd_warp_max(m);
        double s = 0.0;
        for (int k = lane; k < n; k += 32) {
            const T e = mgd_exp(z[k] - m);
            d[k] = e;
            s += (double)e;
        }
        s = mgd_warp_sum(s);
        const mgd_i64 lab = yi[row];
        const double inv = scale / s;
        for (int k = lane; k < n; k += 32) {
            const double v = (double)d[k] * inv;
            T dv = (T)(v > MGD_FLUSH ? v : v * 0.0);
            if (k == lab) dv = (T)((double)dv - scale);
            d[k] = dv;
        }
        if (lane == 0) loss = log(s) + (double)m - (double)z[lab];
    } else if (code == MGD_MSE) {
        const T* y = yf + row * n;
        for (int k = lane; k < n; k += 32) {
            const T diff = z[k] - y[k];
            loss += 0.5 * (double)diff * (double)diff;
            d[k] = (T)((double)diff * scale);
        }
        loss = mgd_warp_sum(loss);
    } else {   // binary cross-entropy with logits: softplus(z) - y z
        const T* y = yf + row * n;
        for (int k = lane; k < n; k += 32) {
            const T v = z[k];
            const T t = y[k];
            const double v64 = (double)v;
            loss += (v64 > 0.0 ? v64 : 0.0) + log1p(exp(-fabs(v64))) - (double)t * v64;
            const double g = (double)(T(1) / (T(1) + mgd_exp(-v)) - t) * scale;
            d[k] = (T)(fabs(g) > MGD_FLUSH ? g : g * 0.0);
        }
        loss = mgd_warp_sum(loss);
    }
    if (lane == 0) rowloss[r] = loss;
}

// ---------------------------------------------------------------- deterministic sums
// One block of blockDim.x (power of two) threads: out = mult * sum_r v[r] (r < n), in a
// fixed order.  The result goes to rec[c * 3 + slot] (c = st[0]) when st is given, else
// to out[slot].  With stop_on_nonfinite (training) a non-finite sum sets st[1] (the step
// is rejected: the optimizer kernels then change nothing) and rec[c * 3 + 2] = NaN.
//   v (n,) double read   out / rec double written   st (4,) int read (+ written)
__device__ void sum_rows_body(const double* __restrict__ v, int n, double mult, double* __restrict__ out,
                              int* __restrict__ st, int slot, int stop_on_nonfinite) {
    __shared__ double sh[1024];
    double s = 0.0;
    for (int r = threadIdx.x; r < n; r += blockDim.x) s += v[r];
    s = mgd_block_sum(s, sh) * mult;
    if (threadIdx.x == 0) {
        if (st) {
            const mgd_i64 c = st[0];
            out[c * 3 + slot] = s;
            if (stop_on_nonfinite && !mgd_finite(s)) {
                st[1] = 1;
                out[c * 3 + 2] = s - s;   // NaN
            }
        } else {
            out[slot] = s;
        }
    }
}

// Stage 1 of |x|^2: block b writes partial[b] = sum of x[p]^2 (in double) over the
// p = b * blockDim.x + t + k * gridDim.x * blockDim.x it owns (a fixed assignment given the
// grid: deterministic).   x (n,) read   partial (gridDim.x,) double written
template <typename T>
__device__ void sumsq_partial_body(const T* __restrict__ x, mgd_i64 n, double* __restrict__ partial) {
    __shared__ double sh[1024];
    double s = 0.0;
    for (mgd_i64 p = mgd_gtid(); p < n; p += mgd_gstride()) {
        const double g = (double)x[p];
        s += g * g;
    }
    s = mgd_block_sum(s, sh);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

// ---------------------------------------------------------------- per-example squared norms
// sqn[r] = (first ? 0 : sqn[r]) + scale * (|A[r]|^2 + 1) * |D[r]|^2: the squared norm of
// example r's gradient of one dense layer (outer product a_r^T d_r plus the bias d_r;
// Goodfellow 2015), summed over layers by calling once per layer.  scale = B^2 turns the
// deltas of the mean loss into those of the per-example loss.  One warp per row.
//   A (B, nin) read   D (B, nout) read   sqn (B,) double read+written
template <typename T>
__device__ void sqnorm_body(const T* __restrict__ A, const T* __restrict__ D, int B, int nin, int nout,
                            double scale, int first, double* __restrict__ sqn) {
    const int r = (int)(mgd_gtid() >> 5);
    const int lane = threadIdx.x & 31;
    if (r >= B) return;
    const T* a = A + (mgd_i64)r * nin;
    const T* d = D + (mgd_i64)r * nout;
    double asq = 0.0, dsq = 0.0;
    for (int i = lane; i < nin; i += 32) asq += (double)a[i] * (double)a[i];
    for (int j = lane; j < nout; j += 32) dsq += (double)d[j] * (double)d[j];
    asq = mgd_warp_sum(asq);
    dsq = mgd_warp_sum(dsq);
    if (lane == 0) sqn[r] = (first ? 0.0 : sqn[r]) + scale * (1.0 + asq) * dsq;
}

// ---------------------------------------------------------------- exported entry points
extern "C" __global__ void __launch_bounds__(1024)
mgd_sum_rows(const double* v, int n, double mult, double* out, int* st, int slot, int stop_on_nonfinite) {
    sum_rows_body(v, n, mult, out, st, slot, stop_on_nonfinite);
}

#define MGD_EXPORT_LOSS(T, S)                                                                        \
    extern "C" __global__ void __launch_bounds__(MGD_THREADS)                                        \
    mgd_loss_fwd_bwd_##S(const T* Z, T* D, const mgd_i64* yi, const T* yf, const mgd_i64* idx,       \
                         const int* st, int B, int n, int code, double scale, double* rowloss) {     \
        loss_body<T>(Z, D, yi, yf, idx, st, B, n, code, scale, rowloss);                             \
    }                                                                                                \
    extern "C" __global__ void __launch_bounds__(MGD_THREADS)                                        \
    mgd_sumsq_partial_##S(const T* x, mgd_i64 n, double* partial) {                                  \
        sumsq_partial_body<T>(x, n, partial);                                                        \
    }                                                                                                \
    extern "C" __global__ void __launch_bounds__(MGD_THREADS)                                        \
    mgd_sqnorm_accumulate_##S(const T* A, const T* D, int B, int nin, int nout, double scale,        \
                              int first, double* sqn) {                                              \
        sqnorm_body<T>(A, D, B, nin, nout, scale, first, sqn);                                       \
    }

MGD_EXPORT_LOSS(float, f32)
MGD_EXPORT_LOSS(double, f64)
