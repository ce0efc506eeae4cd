// minigd CUDA kernels: per-example gradient statistics of one dense layer, read from the
// workspace a loss/gradient pass has just filled (as kernels/cpu_stats.py): A (B, nin) the
// layer input, D (B, nout) the deltas of the MEAN batch loss.  Example r's own gradient is
// B * outer(A[r], D[r]) for the weights and B * D[r] for the bias; per-example gradients
// are never stored, except by mgd_per_example_fill (which is asked to).
#include "gpu_common.cuh"

// G[r, woff + i * nout + j] = B * A[r, i] * D[r, j];  G[r, boff + j] = B * D[r, j].
//   A (B, nin) read   D (B, nout) read   G (B, P) row-major written (this layer's columns)
template <typename T>
__device__ void per_example_fill_body(const T* __restrict__ A, const T* __restrict__ D, int B, int nin,
                                      int nout, mgd_i64 woff, mgd_i64 boff, mgd_i64 P, T* __restrict__ G) {
    const mgd_i64 per = (mgd_i64)nin * nout + nout;
    const mgd_i64 total = per * B;
    const T sb = (T)B;
    for (mgd_i64 e = mgd_gtid(); e < total; e += mgd_gstride()) {
        const mgd_i64 r = e / per;
        const mgd_i64 q = e - r * per;
        if (q < (mgd_i64)nin * nout) {
            const mgd_i64 i = q / nout, j = q - i * nout;
            G[r * P + woff + q] = sb * A[r * nin + i] * D[r * nout + j];
        } else {
            const mgd_i64 j = q - (mgd_i64)nin * nout;
            G[r * P + boff + j] = sb * D[r * nout + j];
        }
    }
}

// Folds the B per-example gradients of this layer's parameters into float64 running
// moments by Chan et al.'s rule.  One thread per parameter q (weights then bias):
// mu = grad[q] (the batch mean of the per-example gradients, written by the gradient pass),
// m2b = sum_r (g_r - mu)^2 - (sum_r (g_r - mu))^2 / B (the corrected two-pass form in double:
// each deviation formed before it is squared, and the centre's own error -- grad holds the
// mean rounded to the model dtype, off by e, which adds B e^2 -- taken out; without the
// correction a float32 model's M2 was 6e-5 off at a signal-to-noise ratio of 4e9), then
// n_old == 0: mean = mu, m2 = m2b;  else d = mu - mean; mean += d * w; m2 += m2b + d^2 c
// with w = B / (n_old + B), c = n_old * B / (n_old + B).
//   A, D read   grad (P,) read   mean, m2 (P,) double read+written (this layer's entries)
template <typename T>
__device__ void moments_body(const T* __restrict__ A, const T* __restrict__ D, const T* __restrict__ grad,
                             int B, int nin, int nout, mgd_i64 woff, mgd_i64 boff, mgd_i64 n_old,
                             double w, double c, double* __restrict__ mean, double* __restrict__ m2) {
    const mgd_i64 nw = (mgd_i64)nin * nout;
    const double sb = (double)B;
    for (mgd_i64 q = mgd_gtid(); q < nw + nout; q += mgd_gstride()) {
        mgd_i64 p;
        double acc = 0.0, sum = 0.0, mu;
        if (q < nw) {
            const mgd_i64 i = q / nout, j = q - i * nout;
            p = woff + q;
            mu = (double)grad[p];
            for (int r = 0; r < B; ++r) {
                const double t = sb * (double)A[(mgd_i64)r * nin + i] * (double)D[(mgd_i64)r * nout + j] - mu;
                acc += t * t;
                sum += t;
            }
        } else {
            const mgd_i64 j = q - nw;
            p = boff + j;
            mu = (double)grad[p];
            for (int r = 0; r < B; ++r) {
                const double t = sb * (double)D[(mgd_i64)r * nout + j] - mu;
                acc += t * t;
                sum += t;
            }
        }
        acc = fmax(acc - sum * sum / sb, 0.0);
        mu += sum / sb;  // (the exact chunk mean, to double rounding)
        if (n_old == 0) {
            mean[p] = mu;
            m2[p] = acc;
        } else {
            const double d = mu - mean[p];
            mean[p] += d * w;
            m2[p] += acc + d * d * c;
        }
    }
}

#define MGD_EXPORT_STATS(T, S)                                                                       \
    extern "C" __global__ void __launch_bounds__(MGD_THREADS)                                        \
    mgd_per_example_fill_##S(const T* A, const T* D, int B, int nin, int nout, mgd_i64 woff,         \
                             mgd_i64 boff, mgd_i64 P, T* G) {                                        \
        per_example_fill_body<T>(A, D, B, nin, nout, woff, boff, P, G);                              \
    }                                                                                                \
    extern "C" __global__ void __launch_bounds__(MGD_THREADS)                                        \
    mgd_moments_update_##S(const T* A, const T* D, const T* grad, int B, int nin, int nout,          \
                           mgd_i64 woff, mgd_i64 boff, mgd_i64 n_old, double w, double c,            \
                           double* mean, double* m2) {                                               \
        moments_body<T>(A, D, grad, B, nin, nout, woff, boff, n_old, w, c, mean, m2);                \
    }

MGD_EXPORT_STATS(float, f32)
MGD_EXPORT_STATS(double, f64)
