// minigd CUDA kernels: the optimizer chain over the flat parameter vector.
//
// Same arithmetic, in the same order, as kernels/cpu.py (_opt_chain_generic for any chain,
// _opt_fused_slice for [clip] [decay] [trace | adam] [decay] [scale_by_lr]), reading the
// hyper-parameter table `hp` ((T + 1, 8) in the model dtype, minigd/optim/base.py) from
// device memory: columns 0..2 hold each primitive's hyper-parameters, columns 3.. the
// step's scalars cast to the model dtype (written by mgd_opt_prepare), and the spare last
// row the constants FLUSH (col 5), 1 (col 6) and 0 (col 7).
//
// Step protocol (st / sched / rec: see gpu_common.cuh): every kernel here does nothing
// once st[1] (stopped) is set; the update kernels set st[2] when params + update would be
// non-finite anywhere; mgd_apply_update adds the update only when neither is set, and
// mgd_step_end records the outcome and advances the step counter.  Optimizer state is
// updated even when the parameter update is then rejected (as on the CPU).
#include "gpu_common.cuh"

// ---------------------------------------------------------------- step scalars
// Single thread.  hp[i_lr, 3] = -lr; for Adam at i_adam: hp[k, 3..6] = 1 - b1^t, 1 - b2^t,
// 1 - b1, 1 - b2 (model dtype); clears st[2].  lr and t are sched[c, 0..1] (c = st[0]).
template <typename T>
__device__ void opt_prepare_body(T* __restrict__ hp, int i_lr, int i_adam,
                                 const double* __restrict__ sched, int* __restrict__ st) {
    if (threadIdx.x != 0 || blockIdx.x != 0) return;
    const mgd_i64 c = st[0];
    const double lr = sched[c * 2], t = sched[c * 2 + 1];
    if (i_lr >= 0) hp[i_lr * MGD_HP_COLS + 3] = (T)(-lr);
    if (i_adam >= 0) {
        T* h = hp + i_adam * MGD_HP_COLS;
        h[3] = (T)(1.0 - pow((double)h[0], t));
        h[4] = (T)(1.0 - pow((double)h[1], t));
        h[5] = T(1) - h[0];
        h[6] = T(1) - h[1];
    }
    st[2] = 0;
}

// Single block: the global-norm clip factor hp[k, 3] = min(1, max_norm / |g|) from the
// stage-1 partial sums of |g|^2 (see mgd_sumsq_partial_*); also writes |g|^2 to
// rec[c * 3 + 2] when rec is given (the raw gradient's norm, asked for by the caller).
template <typename T>
__device__ void clip_factor_body(const double* __restrict__ partial, int nparts, T* __restrict__ hp,
                                 int k, double* __restrict__ rec, const int* __restrict__ st) {
    __shared__ double sh[1024];
    double s = 0.0;
    for (int b = threadIdx.x; b < nparts; b += blockDim.x) s += partial[b];
    s = mgd_block_sum(s, sh);
    if (threadIdx.x == 0) {
        if (k >= 0) {
            const double nrm = sqrt(s);
            const T mx = hp[k * MGD_HP_COLS];
            hp[k * MGD_HP_COLS + 3] = nrm > (double)mx ? (T)((double)mx / nrm) : T(1);
        }
        if (rec && !st[1]) rec[(mgd_i64)st[0] * 3 + 2] = s;   // (a rejected loss keeps its NaN)
    }
}

// ---------------------------------------------------------------- the fused chain
// One pass: g0 = clip * grad[p]; g = g0 + wd1 * params[p]; trace (momentum / Nesterov) or
// Adam on the state slots; u = -lr * (direction + wd2 * params[p]); grad[p] = u; flags
// st[2] if params[p] + u is non-finite.  mid: -1 none, 2 trace, 3 adam (optimizer codes).
//   params (P,) read   grad (P,) read, written with the update   s1, s2 (P,) state slots
//   (momentum / Adam moments; unused ones may be null)   hp read
template <typename T>
__device__ void opt_fused_body(const T* __restrict__ params, T* __restrict__ grad, T* __restrict__ s1,
                               T* __restrict__ s2, mgd_i64 P, const T* __restrict__ hp, int nrows,
                               int i_clip, int i_wd1, int i_mid, int mid, int i_wd2, int i_lr,
                               int* __restrict__ st) {
    if (st[1]) return;
    const T* spare = hp + (mgd_i64)(nrows - 1) * MGD_HP_COLS;
    const T zero = spare[7], fl = spare[5];
    const T clip = i_clip >= 0 ? hp[i_clip * MGD_HP_COLS + 3] : spare[6];
    const T wd1 = i_wd1 >= 0 ? hp[i_wd1 * MGD_HP_COLS] : zero;
    const T wd2 = i_wd2 >= 0 ? hp[i_wd2 * MGD_HP_COLS] : zero;
    const T nlr = i_lr >= 0 ? hp[i_lr * MGD_HP_COLS + 3] : spare[6];
    bool bad = false;
    for (mgd_i64 p = mgd_gtid(); p < P; p += mgd_gstride()) {
        const T pp = params[p];
        T g0 = grad[p];
        if (i_clip >= 0) g0 = g0 * clip;
        const T g = g0 + wd1 * pp;
        T u;
        if (mid == 2) {   // trace
            const T m = hp[i_mid * MGD_HP_COLS];
            T vp = m * s1[p] + g;
            vp = mgd_abs(vp) > fl ? vp : vp * T(0);
            s1[p] = vp;
            u = hp[i_mid * MGD_HP_COLS + 1] != T(0) ? nlr * ((g + m * vp) + wd2 * pp)
                                                    : nlr * (vp + wd2 * pp);
        } else if (mid == 3) {   // adam
            const T* h = hp + i_mid * MGD_HP_COLS;
            const T a0 = h[0] * s1[p] + h[5] * g;
            const T sv0 = h[1] * s2[p] + h[6] * g * g;
            const T a = mgd_abs(a0) > fl ? a0 : a0 * T(0);
            const T sv = sv0 > fl ? sv0 : sv0 * T(0);
            s1[p] = a;
            s2[p] = sv;
            u = nlr * ((a / h[3]) / (mgd_sqrt(sv / h[4]) + h[2]) + wd2 * pp);
        } else {
            u = nlr * ((g0 + wd1 * pp) + wd2 * pp);
        }
        grad[p] = u;
        if (!mgd_finite(pp + u)) bad = true;
    }
    if (bad) atomicOr(st + 2, 1);   // a flag: the order of the atomics does not matter
}

// ---------------------------------------------------------------- one primitive per pass (any chain)
// op: 0 clip / scale_by_lr (u *= hp[k, 3]), 1 decay (u += hp[k, 0] * params), 2 trace,
// 3 adam, 5 scale (u *= hp[k, 0]).  Arithmetic as kernels/cpu.py::_opt_chain_generic.
template <typename T>
__device__ void opt_primitive_body(const T* __restrict__ params, T* __restrict__ grad, T* __restrict__ s1,
                                   T* __restrict__ s2, mgd_i64 P, const T* __restrict__ hp, int nrows,
                                   int k, int op, const int* __restrict__ st) {
    if (st[1]) return;
    const T* h = hp + k * MGD_HP_COLS;
    const T fl = hp[(mgd_i64)(nrows - 1) * MGD_HP_COLS + 5];
    for (mgd_i64 p = mgd_gtid(); p < P; p += mgd_gstride()) {
        if (op == 0) {
            grad[p] *= h[3];
        } else if (op == 1) {
            grad[p] += h[0] * params[p];
        } else if (op == 2) {
            const T m = h[0];
            T vp = m * s1[p] + grad[p];
            vp = mgd_abs(vp) > fl ? vp : vp * T(0);
            s1[p] = vp;
            grad[p] = h[1] != T(0) ? grad[p] + m * vp : vp;
        } else if (op == 3) {
            const T g = grad[p];
            T a = h[0] * s1[p] + h[5] * g;
            T s = h[1] * s2[p] + h[6] * g * g;
            a = mgd_abs(a) > fl ? a : a * T(0);
            s = s > fl ? s : s * T(0);
            s1[p] = a;
            s2[p] = s;
            grad[p] = (a / h[3]) / (mgd_sqrt(s / h[4]) + h[2]);
        } else {
            grad[p] *= h[0];
        }
    }
}

// st[2] |= any(params + grad non-finite)  (after a generic chain)
template <typename T>
__device__ void check_finite_body(const T* __restrict__ params, const T* __restrict__ grad, mgd_i64 P,
                                  int* __restrict__ st) {
    if (st[1]) return;
    bool bad = false;
    for (mgd_i64 p = mgd_gtid(); p < P; p += mgd_gstride())
        if (!mgd_finite(params[p] + grad[p])) bad = true;
    if (bad) atomicOr(st + 2, 1);
}

// params += grad unless the step was rejected (st[1] or st[2]).
template <typename T>
__device__ void apply_update_body(T* __restrict__ params, const T* __restrict__ grad, mgd_i64 P,
                                  const int* __restrict__ st) {
    if (st[1] || st[2]) return;
    for (mgd_i64 p = mgd_gtid(); p < P; p += mgd_gstride()) params[p] += grad[p];
}

// ---------------------------------------------------------------- exported entry points
// Single thread: rec[c, 1] = applied; a rejected update stops the run (st[1], sticky);
// the step counter advances.
extern "C" __global__ void mgd_step_end(int* st, double* rec) {
    if (threadIdx.x != 0 || blockIdx.x != 0) return;
    const mgd_i64 c = st[0];
    const int ok = !(st[1] || st[2]);
    rec[c * 3 + 1] = ok ? 1.0 : 0.0;
    if (!ok) st[1] = 1;
    st[0] = (int)(c + 1);
}

#define MGD_EXPORT_OPT(T, S)                                                                         \
    extern "C" __global__ void mgd_opt_prepare_##S(T* hp, int i_lr, int i_adam, const double* sched,  \
                                                   int* st) {                                        \
        opt_prepare_body<T>(hp, i_lr, i_adam, sched, st);                                            \
    }                                                                                                \
    extern "C" __global__ void __launch_bounds__(1024)                                               \
    mgd_clip_factor_##S(const double* partial, int nparts, T* hp, int k, double* rec, const int* st) { \
        clip_factor_body<T>(partial, nparts, hp, k, rec, st);                                        \
    }                                                                                                \
    extern "C" __global__ void __launch_bounds__(MGD_THREADS)                                        \
    mgd_opt_fused_##S(const T* params, T* grad, T* s1, T* s2, mgd_i64 P, const T* hp, int nrows,     \
                      int i_clip, int i_wd1, int i_mid, int mid, int i_wd2, int i_lr, int* st) {     \
        opt_fused_body<T>(params, grad, s1, s2, P, hp, nrows, i_clip, i_wd1, i_mid, mid, i_wd2,      \
                          i_lr, st);                                                                 \
    }                                                                                                \
    extern "C" __global__ void __launch_bounds__(MGD_THREADS)                                        \
    mgd_opt_primitive_##S(const T* params, T* grad, T* s1, T* s2, mgd_i64 P, const T* hp, int nrows, \
                          int k, int op, const int* st) {                                            \
        opt_primitive_body<T>(params, grad, s1, s2, P, hp, nrows, k, op, st);                        \
    }                                                                                                \
    extern "C" __global__ void __launch_bounds__(MGD_THREADS)                                        \
    mgd_check_finite_##S(const T* params, const T* grad, mgd_i64 P, int* st) {                       \
        check_finite_body<T>(params, grad, P, st);                                                   \
    }                                                                                                \
    extern "C" __global__ void __launch_bounds__(MGD_THREADS)                                        \
    mgd_apply_update_##S(T* params, const T* grad, mgd_i64 P, const int* st) {                       \
        apply_update_body<T>(params, grad, P, st);                                                   \
    }

MGD_EXPORT_OPT(float, f32)
MGD_EXPORT_OPT(double, f64)
