// minigd CUDA kernels: batch norm with ghost batches, and inverted dropout (issue 5's
// definitions, see minigd/backends/numpy_ref.py).  Statistics are accumulated in double.
//
// Batch norm of a hidden layer's (B, n) input x (z_l when placed before the activation,
// a_l after it), in training mode per ghost batch of g consecutive rows (the last one may
// be smaller): mu = mean, var = biased mean of squared deviations, inv = 1/sqrt(var + eps),
// xhat = (x - mu) inv, y = gamma xhat + beta.  Backward per ghost batch:
// dx = gamma inv (dy - mean(dy) - xhat mean(dy xhat)); dgamma = sum dy xhat, dbeta = sum dy
// over the whole batch.  Evaluation mode uses the running mean / variance.
#include "gpu_common.cuh"

// Training forward.  One thread per (ghost batch c, column j), j fastest (coalesced rows).
//   X (B, n) read   Y, Xhat (B, n) written   Inv (ceil(B / g), n) written
//   gamma, beta (n,) read
template <typename T>
__device__ void bn_train_fwd_body(const T* __restrict__ X, T* __restrict__ Y, T* __restrict__ Xhat,
                                  T* __restrict__ Inv, const T* __restrict__ gamma,
                                  const T* __restrict__ beta, int B, int n, int g, double eps) {
    const int nchunks = (B + g - 1) / g;
    const mgd_i64 total = (mgd_i64)nchunks * n;
    for (mgd_i64 e = mgd_gtid(); e < total; e += mgd_gstride()) {
        const int c = (int)(e / n), j = (int)(e - (mgd_i64)c * n);
        const int r0 = c * g, r1 = (r0 + g < B) ? r0 + g : B;
        const double cnt = (double)(r1 - r0);
        double mu = 0.0;
        for (int r = r0; r < r1; ++r) mu += (double)X[(mgd_i64)r * n + j];
        mu /= cnt;
        double var = 0.0;
        for (int r = r0; r < r1; ++r) {
            const double dv = (double)X[(mgd_i64)r * n + j] - mu;
            var += dv * dv;
        }
        var /= cnt;
        const double inv = 1.0 / sqrt(var + eps);
        Inv[e] = (T)inv;
        const double ga = (double)gamma[j], be = (double)beta[j];
        for (int r = r0; r < r1; ++r) {
            const mgd_i64 o = (mgd_i64)r * n + j;
            const double xh = ((double)X[o] - mu) * inv;
            Xhat[o] = (T)xh;
            Y[o] = (T)(ga * xh + be);
        }
    }
}

// Training backward, dx per ghost batch (see the file comment).
//   dY, Xhat (B, n) read   Inv (ceil(B / g), n) read   gamma (n,) read   dX (B, n) written
template <typename T>
__device__ void bn_train_bwd_body(const T* __restrict__ dY, const T* __restrict__ Xhat,
                                  const T* __restrict__ Inv, const T* __restrict__ gamma,
                                  T* __restrict__ dX, int B, int n, int g) {
    const int nchunks = (B + g - 1) / g;
    const mgd_i64 total = (mgd_i64)nchunks * n;
    for (mgd_i64 e = mgd_gtid(); e < total; e += mgd_gstride()) {
        const int c = (int)(e / n), j = (int)(e - (mgd_i64)c * n);
        const int r0 = c * g, r1 = (r0 + g < B) ? r0 + g : B;
        const double cnt = (double)(r1 - r0);
        double mdy = 0.0, mdyx = 0.0;
        for (int r = r0; r < r1; ++r) {
            const mgd_i64 o = (mgd_i64)r * n + j;
            mdy += (double)dY[o];
            mdyx += (double)dY[o] * (double)Xhat[o];
        }
        mdy /= cnt;
        mdyx /= cnt;
        const double k = (double)gamma[j] * (double)Inv[e];
        for (int r = r0; r < r1; ++r) {
            const mgd_i64 o = (mgd_i64)r * n + j;
            dX[o] = (T)(k * ((double)dY[o] - mdy - (double)Xhat[o] * mdyx));
        }
    }
}

// dgamma[j] = sum_r dY[r, j] Xhat[r, j];  dbeta[j] = sum_r dY[r, j]  (whole batch).
//   dY, Xhat (B, n) read   dgamma, dbeta (n,) written (views into the gradient vector)
template <typename T>
__device__ void bn_param_grad_body(const T* __restrict__ dY, const T* __restrict__ Xhat, int B, int n,
                                   T* __restrict__ dgamma, T* __restrict__ dbeta) {
    for (mgd_i64 j = mgd_gtid(); j < n; j += mgd_gstride()) {
        double sg = 0.0, sb = 0.0;
        for (int r = 0; r < B; ++r) {
            const mgd_i64 o = (mgd_i64)r * n + j;
            sg += (double)dY[o] * (double)Xhat[o];
            sb += (double)dY[o];
        }
        dgamma[j] = (T)sg;
        dbeta[j] = (T)sb;
    }
}

// Evaluation forward: y = gamma (x - rmean) / sqrt(rvar + eps) + beta.
//   X (B, n) read   Y (B, n) written   rmean, rvar, gamma, beta (n,) read
template <typename T>
__device__ void bn_eval_fwd_body(const T* __restrict__ X, T* __restrict__ Y, const T* __restrict__ rmean,
                                 const T* __restrict__ rvar, const T* __restrict__ gamma,
                                 const T* __restrict__ beta, int B, int n, double eps) {
    const mgd_i64 total = (mgd_i64)B * n;
    for (mgd_i64 e = mgd_gtid(); e < total; e += mgd_gstride()) {
        const int j = (int)(e % n);
        const double inv = 1.0 / sqrt((double)rvar[j] + eps);
        Y[e] = (T)((double)gamma[j] * (((double)X[e] - (double)rmean[j]) * inv) + (double)beta[j]);
    }
}

// Running statistics from the whole batch (B >= 2): rmean = (1 - m) rmean + m mean,
// rvar = (1 - m) rvar + m var_unbiased (PyTorch's BatchNorm1d).  One thread per column.
//   X (B, n) read   rmean, rvar (n,) read+written
// With the step control block `st` (a captured training step), nothing is updated when the
// step was rejected (st[1] or st[2], as mgd_apply_update); st null: always.
template <typename T>
__device__ void bn_running_body(const T* __restrict__ X, int B, int n, double momentum,
                                T* __restrict__ rmean, T* __restrict__ rvar, const int* __restrict__ st) {
    if (st && (st[1] || st[2])) return;
    for (mgd_i64 j = mgd_gtid(); j < n; j += mgd_gstride()) {
        double mu = 0.0;
        for (int r = 0; r < B; ++r) mu += (double)X[(mgd_i64)r * n + j];
        mu /= (double)B;
        double ss = 0.0;
        for (int r = 0; r < B; ++r) {
            const double dv = (double)X[(mgd_i64)r * n + j] - mu;
            ss += dv * dv;
        }
        const double var = ss / (double)(B - 1);
        rmean[j] = (T)((1.0 - momentum) * (double)rmean[j] + momentum * mu);
        rvar[j] = (T)((1.0 - momentum) * (double)rvar[j] + momentum * var);
    }
}

// Inverted dropout.  mask[e] = (U[e] >= p) / (1 - p) from the host's float64 uniforms U
// (those of Backend.draw_dropout, so the masks are bitwise the host's), then
// Out[e] = A[e] * mask[e] (training forward).  Out may be A itself (in place; batch norm
// after the activation) or a separate buffer (the backward pass needs the unmasked
// activation for tanh / sigmoid), hence no __restrict__ on A and Out.
//   U (total,) double read (st given: U + st[0] * ustride, step c's row of a table)
//   mask (total,) written   A (total,) read   Out (total,) written
template <typename T>
__device__ void dropout_fwd_body(const double* __restrict__ U, T* __restrict__ mask, const T* A, T* Out,
                                 mgd_i64 total, double p, const int* __restrict__ st, mgd_i64 ustride) {
    const T keep = (T)(1.0 / (1.0 - p));
    if (st) U += (mgd_i64)st[0] * ustride;   // a captured step: its own row of the uniforms table
    for (mgd_i64 e = mgd_gtid(); e < total; e += mgd_gstride()) {
        const T m = U[e] >= p ? keep : T(0);
        mask[e] = m;
        Out[e] = A[e] * m;
    }
}

// Backward of dropout: D[e] *= mask[e].
template <typename T>
__device__ void dropout_bwd_body(const T* __restrict__ mask, T* __restrict__ D, mgd_i64 total) {
    for (mgd_i64 e = mgd_gtid(); e < total; e += mgd_gstride()) D[e] = D[e] * mask[e];
}

#define MGD_EXPORT_NORM(T, S)                                                                        \
    extern "C" __global__ void __launch_bounds__(MGD_THREADS)                                        \
    mgd_bn_train_forward_##S(const T* X, T* Y, T* Xhat, T* Inv, const T* gamma, const T* beta,       \
                             int B, int n, int g, double eps) {                                      \
        bn_train_fwd_body<T>(X, Y, Xhat, Inv, gamma, beta, B, n, g, eps);                            \
    }                                                                                                \
    extern "C" __global__ void __launch_bounds__(MGD_THREADS)                                        \
    mgd_bn_train_backward_##S(const T* dY, const T* Xhat, const T* Inv, const T* gamma, T* dX,       \
                              int B, int n, int g) {                                                 \
        bn_train_bwd_body<T>(dY, Xhat, Inv, gamma, dX, B, n, g);                                     \
    }                                                                                                \
    extern "C" __global__ void __launch_bounds__(MGD_THREADS)                                        \
    mgd_bn_param_grad_##S(const T* dY, const T* Xhat, int B, int n, T* dgamma, T* dbeta) {           \
        bn_param_grad_body<T>(dY, Xhat, B, n, dgamma, dbeta);                                        \
    }                                                                                                \
    extern "C" __global__ void __launch_bounds__(MGD_THREADS)                                        \
    mgd_bn_eval_forward_##S(const T* X, T* Y, const T* rmean, const T* rvar, const T* gamma,         \
                            const T* beta, int B, int n, double eps) {                               \
        bn_eval_fwd_body<T>(X, Y, rmean, rvar, gamma, beta, B, n, eps);                              \
    }                                                                                                \
    extern "C" __global__ void __launch_bounds__(MGD_THREADS)                                        \
    mgd_bn_running_update_##S(const T* X, int B, int n, double momentum, T* rmean, T* rvar,          \
                              const int* st) {                                                       \
        bn_running_body<T>(X, B, n, momentum, rmean, rvar, st);                                      \
    }                                                                                                \
    extern "C" __global__ void __launch_bounds__(MGD_THREADS)                                        \
    mgd_dropout_forward_##S(const double* U, T* mask, const T* A, T* Out, mgd_i64 total, double p,   \
                            const int* st, mgd_i64 ustride) {                                        \
        dropout_fwd_body<T>(U, mask, A, Out, total, p, st, ustride);                                 \
    }                                                                                                \
    extern "C" __global__ void __launch_bounds__(MGD_THREADS)                                        \
    mgd_dropout_backward_##S(const T* mask, T* D, mgd_i64 total) { dropout_bwd_body<T>(mask, D, total); }

MGD_EXPORT_NORM(float, f32)
MGD_EXPORT_NORM(double, f64)
