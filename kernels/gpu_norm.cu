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

// The reductions over rows (a column's mean, variance, sum of dy, of dy xhat) run on blocks
// of (32, 8) threads: threadIdx.x picks one of 32 consecutive columns (coalesced reads of a
// row), threadIdx.y one of 8 stripes of rows (r0 + y, r0 + y + 8, ...), and stripe_sum
// combines the stripes' partial sums in a fixed order, so results are deterministic.  Grid
// (ceil(n / 32), ghost batches) -- grid-striding over ghost batches past 65535.  A thread
// per column looping over every row would leave a large batch to a handful of threads.
#define MGD_STRIPES 8

// Every thread passes its stripe's partial sums v[0..K-1] for its column and gets back the
// column's totals, added in stripe order (the same bits in every stripe).  Every thread of
// the block must call it: it has barriers.
template <int K>
__device__ void stripe_sum(double (&v)[K]) {
    __shared__ double part[K][MGD_STRIPES][33];
    for (int k = 0; k < K; ++k) part[k][threadIdx.y][threadIdx.x] = v[k];
    __syncthreads();
    for (int k = 0; k < K; ++k) {
        double t = 0.0;
        for (int y = 0; y < MGD_STRIPES; ++y) t += part[k][y][threadIdx.x];
        v[k] = t;
    }
    __syncthreads();   // part is reused by the next call
}

// Training forward, per ghost batch c and column j (see the file comment).
//   X (B, n) read   Y, Xhat (B, n) written   Inv (ceil(B / g), n) written
//   gamma, beta (n,) read
template <typename T>
__device__ void bn_train_fwd_body(const T* __restrict__ X, T* __restrict__ Y, T* __restrict__ Xhat,
                                  T* __restrict__ Inv, const T* __restrict__ gamma,
                                  const T* __restrict__ beta, int B, int n, int g, double eps) {
    const int nchunks = (B + g - 1) / g;
    const int j = blockIdx.x * 32 + threadIdx.x;
    const bool col = j < n;
    for (int c = blockIdx.y; c < nchunks; c += gridDim.y) {   // uniform over the block
        const int r0 = c * g, r1 = (r0 + g < B) ? r0 + g : B;
        const double cnt = (double)(r1 - r0);
        double mu[1] = {0.0};
        if (col)
            for (int r = r0 + threadIdx.y; r < r1; r += MGD_STRIPES) mu[0] += (double)X[(mgd_i64)r * n + j];
        stripe_sum<1>(mu);
        const double m = mu[0] / cnt;
        double var[1] = {0.0};
        if (col)
            for (int r = r0 + threadIdx.y; r < r1; r += MGD_STRIPES) {
                const double dv = (double)X[(mgd_i64)r * n + j] - m;
                var[0] += dv * dv;
            }
        stripe_sum<1>(var);
        if (!col) continue;
        const double inv = 1.0 / sqrt(var[0] / cnt + eps);
        if (threadIdx.y == 0) Inv[(mgd_i64)c * n + j] = (T)inv;
        const double ga = (double)gamma[j], be = (double)beta[j];
        for (int r = r0 + threadIdx.y; r < r1; r += MGD_STRIPES) {
            const mgd_i64 o = (mgd_i64)r * n + j;
            const double xh = ((double)X[o] - m) * inv;
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
    const int j = blockIdx.x * 32 + threadIdx.x;
    const bool col = j < n;
    for (int c = blockIdx.y; c < nchunks; c += gridDim.y) {
        const int r0 = c * g, r1 = (r0 + g < B) ? r0 + g : B;
        const double cnt = (double)(r1 - r0);
        double s[2] = {0.0, 0.0};   // sum dy, sum dy xhat
        if (col)
            for (int r = r0 + threadIdx.y; r < r1; r += MGD_STRIPES) {
                const mgd_i64 o = (mgd_i64)r * n + j;
                s[0] += (double)dY[o];
                s[1] += (double)dY[o] * (double)Xhat[o];
            }
        stripe_sum<2>(s);
        if (!col) continue;
        const double mdy = s[0] / cnt, mdyx = s[1] / cnt;
        const double k = (double)gamma[j] * (double)Inv[(mgd_i64)c * n + j];
        for (int r = r0 + threadIdx.y; r < r1; r += MGD_STRIPES) {
            const mgd_i64 o = (mgd_i64)r * n + j;
            dX[o] = (T)(k * ((double)dY[o] - mdy - (double)Xhat[o] * mdyx));
        }
    }
}

// dgamma[j] = sum_r dY[r, j] Xhat[r, j];  dbeta[j] = sum_r dY[r, j]  (whole batch).
// Grid (ceil(n / 32)), block (32, 8).
//   dY, Xhat (B, n) read   dgamma, dbeta (n,) written (views into the gradient vector)
template <typename T>
__device__ void bn_param_grad_body(const T* __restrict__ dY, const T* __restrict__ Xhat, int B, int n,
                                   T* __restrict__ dgamma, T* __restrict__ dbeta) {
    const int j = blockIdx.x * 32 + threadIdx.x;
    const bool col = j < n;
    double s[2] = {0.0, 0.0};
    if (col)
        for (int r = threadIdx.y; r < B; r += MGD_STRIPES) {
            const mgd_i64 o = (mgd_i64)r * n + j;
            s[0] += (double)dY[o] * (double)Xhat[o];
            s[1] += (double)dY[o];
        }
    stripe_sum<2>(s);
    if (col && threadIdx.y == 0) {
        dgamma[j] = (T)s[0];
        dbeta[j] = (T)s[1];
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
// rvar = (1 - m) rvar + m var_unbiased (PyTorch's BatchNorm1d).  Grid (ceil(n / 32)),
// block (32, 8).
//   X (B, n) read   rmean, rvar (n,) read+written
// With the step control block `st` (a captured training step), nothing is updated when the
// step was rejected (st[1] or st[2], as mgd_apply_update); st null: always.
template <typename T>
__device__ void bn_running_body(const T* __restrict__ X, int B, int n, double momentum,
                                T* __restrict__ rmean, T* __restrict__ rvar, const int* __restrict__ st) {
    if (st && (st[1] || st[2])) return;   // uniform over the grid
    const int j = blockIdx.x * 32 + threadIdx.x;
    const bool col = j < n;
    double mu[1] = {0.0};
    if (col)
        for (int r = threadIdx.y; r < B; r += MGD_STRIPES) mu[0] += (double)X[(mgd_i64)r * n + j];
    stripe_sum<1>(mu);
    const double m = mu[0] / (double)B;
    double ss[1] = {0.0};
    if (col)
        for (int r = threadIdx.y; r < B; r += MGD_STRIPES) {
            const double dv = (double)X[(mgd_i64)r * n + j] - m;
            ss[0] += dv * dv;
        }
    stripe_sum<1>(ss);
    if (col && threadIdx.y == 0) {
        const double var = ss[0] / (double)(B - 1);
        rmean[j] = (T)((1.0 - momentum) * (double)rmean[j] + momentum * m);
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
