// minigd GPU emulator: runs the CUDA kernels of kernels/gpu_*.cu on the CPU.
//
// Host-only (compiled with the system C++ compiler by minigd/backends/gpu_emu.py, never by
// NVRTC).  The emulator compiles a CUDA source as C++ after this header, which maps the
// CUDA execution model onto cooperative fibers (ucontext):
//
//   * blocks run one after another; the threads of a block are fibers scheduled round-robin,
//     each running until it finishes or reaches a barrier;
//   * __syncthreads() releases the block when every thread of it waits there; if some thread
//     of the block has already returned, that is an error (CUDA leaves it undefined), and so
//     is a deadlock (a warp in a shuffle while the rest of the block waits in __syncthreads);
//   * __shfl_xor_sync exchanges values within a warp of 32 consecutive threads, which must all
//     be present (full mask, block size a multiple of 32) and all reach the shuffle;
//   * __shared__ variables are one copy per block run (placed by shared<S>(), below), filled
//     with 0xff bytes (NaN) at the start of each block;
//   * atomics are atomic read-modify-writes (relaxed).
//
// Because a fiber runs until its next barrier, a read of shared memory that another thread
// writes without a barrier in between sees the old value -- NaN, as shared memory is
// poisoned at each block start -- in one of the two scheduling orders the emulator uses
// (ascending thread ids in even blocks, descending in odd ones; a single-block kernel gets
// both orders over successive launches): missing __syncthreads show up as wrong results.
// Out-of-bounds accesses touch host memory: built with MINIGD_GPU_EMU_SANITIZE=address (and
// run with libasan preloaded) every access past the end of a device allocation is reported
// by AddressSanitizer; one inside an allocation but outside the view passed (the workspace
// is one buffer) is not.  Blocks never run concurrently here, but built with
// MINIGD_GPU_EMU_SANITIZE=thread (libtsan preloaded) ThreadSanitizer treats the threads of a
// launch as concurrent, ordered only by barriers, atomics and launch boundaries, and
// reports any race between blocks or between threads of one block (see below).  What this
// does NOT model: memory ordering beyond that (fences, volatile flags), warp-synchronous
// code without a shuffle, float32 flush-to-zero (CuPy compiles with -ftz=true), FMA
// contraction and the device's floating-point library (results agree to rounding).
#pragma once

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <ucontext.h>

#include <initializer_list>
#include <type_traits>
#include <utility>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct mgd_emu_dim3 {
    unsigned x, y, z;
};
static mgd_emu_dim3 threadIdx, blockIdx, blockDim, gridDim;

// ThreadSanitizer (MGD_EMU_TSAN, MINIGD_GPU_EMU_SANITIZE=thread): every CUDA thread of a
// launch is a TSan fiber of its own, created when its block starts and destroyed when it
// ends, and switched to without synchronisation, so TSan sees the threads of a launch as
// concurrent.  The happens-before edges it is told of are CUDA's: a __syncthreads orders
// the threads of one block (a release and an acquire on a per-block, per-phase object), a
// launch orders everything before it (fibers are created by the host) and is ordered before
// everything after it (each thread releases a launch object on exit; the host acquires it),
// and atomics are atomics.  Nothing orders two blocks of one launch: a global address that
// two blocks touch, one of them writing, without atomics, is reported as a data race -- the
// inter-block race no scheduling order of the plain emulator can show.  The emulator's own
// bookkeeping is not instrumented (MGD_EMU_NOTSAN).
#ifdef MGD_EMU_TSAN
extern "C" {
void* __tsan_get_current_fiber(void);
void* __tsan_create_fiber(unsigned flags);
void __tsan_switch_to_fiber(void* fiber, unsigned flags);
void __tsan_set_fiber_name(void* fiber, const char* name);
void __tsan_acquire(void* addr);
void __tsan_release(void* addr);
void __tsan_ignore_thread_begin(void);
void __tsan_ignore_thread_end(void);
}
#define MGD_EMU_NOTSAN __attribute__((no_sanitize_thread, noinline))
#else
#define MGD_EMU_NOTSAN
#endif

namespace mgd_emu {

enum { RUNNABLE = 0, AT_SYNCTHREADS = 1, AT_SHUFFLE = 2, EXITED = 3 };
static const int MAX_THREADS = 1024;
static const size_t STACK_BYTES = 128 * 1024;

struct Fiber {
    ucontext_t ctx;
    int state;
    unsigned tx, ty, tz;
    void* tsan;        // its TSan fiber (MGD_EMU_TSAN)
    char* stack;       // its stack (MGD_EMU_TSAN: the TSan fiber's own; else the slot's)
    unsigned phase;    // barriers passed, mod 2 (which of the block's two sync objects)
};

static ucontext_t g_sched;
static Fiber g_fibers[MAX_THREADS];
static char* g_stacks[MAX_THREADS];
static bool g_ctx_ready[MAX_THREADS];
static int g_cur = -1;
static void (*g_call)(void**) = nullptr;
static void** g_args = nullptr;
static unsigned long long g_slots[MAX_THREADS];   // one shuffle slot per thread
static char g_error[1024];
static unsigned long long g_block_serial = 0;       // bumped for every block run
static void* g_sched_fiber = nullptr;               // the host's TSan fiber
static char g_launch_sync;                          // TSan: a launch happens before the host's next step
static char g_host_sync;                            // TSan: the host's steps happen before a launch
static char* g_block_sync = nullptr;                // TSan: this block's two barrier objects
static void* g_block_mem[64];                       // TSan: this block's shared memory, freed at its end
static int g_block_nmem = 0;

static void fail(const char* msg) {
    if (!g_error[0]) snprintf(g_error, sizeof g_error, "%s", msg);
}

MGD_EMU_NOTSAN static void fiber_main() {
#ifdef MGD_EMU_TSAN
    __tsan_acquire(&g_host_sync);
#endif
    g_call(g_args);
    g_fibers[g_cur].state = EXITED;
#ifdef MGD_EMU_TSAN
    __tsan_release(&g_launch_sync);
    __tsan_switch_to_fiber(g_sched_fiber, 1);   // 1: no synchronisation
#endif
    // returning switches to uc_link (the scheduler)
}

MGD_EMU_NOTSAN static void wait_at(int where) {
    g_fibers[g_cur].state = where;
#ifdef MGD_EMU_TSAN
    __tsan_switch_to_fiber(g_sched_fiber, 1);
#endif
    swapcontext(&g_fibers[g_cur].ctx, &g_sched);
}

// Shared memory is per block and uninitialised when a block starts.  The Python side
// rewrites every `__shared__ T a[n], b[m];` into a local struct of those members, placed by
// shared<S>() and bound by references of the same names: one copy per block run, filled
// with 0xff bytes (NaN for floating point, -1 for integers) when the first thread of a new
// block reaches the declaration, so a read before any write is visible.  Under TSan each
// block's copy is a fresh allocation (made and freed unseen), so the accesses of one block
// never meet those of the previous one.
MGD_EMU_NOTSAN static void* block_alloc(size_t bytes) {
#ifdef MGD_EMU_TSAN
    if (g_block_nmem == (int)(sizeof g_block_mem / sizeof g_block_mem[0])) {
        fail("too many __shared__ declarations in one kernel");
        return nullptr;
    }
    __tsan_ignore_thread_begin();
    void* p = malloc(bytes);
    if (p) memset(p, 0xff, bytes);
    __tsan_ignore_thread_end();
    if (!p) fail("out of memory for __shared__ variables");
    g_block_mem[g_block_nmem++] = p;
    return p;
#else
    (void)bytes;
    return nullptr;
#endif
}

template <typename S>
MGD_EMU_NOTSAN static S& shared() {
    static_assert(std::is_trivially_copyable<S>::value, "__shared__ variables must be plain data");
    static unsigned long long serial = 0;
#ifdef MGD_EMU_TSAN
    static S* p = nullptr;
    if (serial != g_block_serial) {
        serial = g_block_serial;
        p = (S*)block_alloc(sizeof(S));
    }
    return *p;
#else
    static S s;
    if (serial != g_block_serial) {
        serial = g_block_serial;
        memset((void*)&s, 0xff, sizeof s);
    }
    return s;
#endif
}

static inline int linear_tid() { return g_cur; }

#ifdef MGD_EMU_TSAN
// The threads of one launch need TSan fibers of their own (one fiber is program-ordered,
// which would hide races between the blocks that shared it).  Creating a fiber costs system
// calls, so fibers are pooled and reused across launches: a launch orders everything anyway.
// Each thread acquires what the host did before the launch (g_host_sync) when it starts and
// releases to the launch object when it ends, which the host acquires after the launch.
// TSan has room for about 8000 fibers: a launch of more threads than the pool holds reuses
// the fibers of its earlier blocks (and says so once), so only blocks that close together
// are compared.  Each pooled fiber has its own stack: a stack shared by the same thread
// slot of two blocks would make their locals look like one address touched by two
// unordered threads.
static const int TSAN_POOL = 6144;
static void* g_tsan_pool[TSAN_POOL];
static char* g_tsan_stacks[TSAN_POOL];
static int g_tsan_npool = 0;      // fibers created so far
static int g_tsan_next = 0;       // the next fiber this launch takes
static bool g_tsan_told = false;

MGD_EMU_NOTSAN static void block_begin_tsan(int n, unsigned bx, unsigned by) {
    if (g_tsan_next + n > TSAN_POOL) {
        if (!g_tsan_told) {
            fprintf(stderr, "minigd GPU emulator (ThreadSanitizer): a launch of more than %d threads; "
                    "blocks further apart than that are not checked against each other\n", TSAN_POOL);
            g_tsan_told = true;
        }
        g_tsan_next = 0;
    }
    for (int t = 0; t < n; ++t, ++g_tsan_next) {
        if (g_tsan_next == g_tsan_npool) {
            __tsan_ignore_thread_begin();
            g_tsan_stacks[g_tsan_npool] = (char*)malloc(STACK_BYTES);
            __tsan_ignore_thread_end();
            if (!g_tsan_stacks[g_tsan_npool]) { fail("out of memory for fiber stacks"); return; }
            g_tsan_pool[g_tsan_npool++] = __tsan_create_fiber(0);
        }
        g_fibers[t].tsan = g_tsan_pool[g_tsan_next];
        g_fibers[t].stack = g_tsan_stacks[g_tsan_next];
        char name[96];
        snprintf(name, sizeof name, "block (%u, %u, %u) thread (%u, %u, %u)", blockIdx.x, blockIdx.y,
                 blockIdx.z, t % bx, (t / bx) % by, t / (bx * by));
        __tsan_set_fiber_name(g_fibers[t].tsan, name);
    }
    __tsan_ignore_thread_begin();
    g_block_sync = (char*)malloc(2);
    __tsan_ignore_thread_end();
}

// The block's shared memory and barrier objects are freed unseen when it ends.
MGD_EMU_NOTSAN static void block_end_tsan() {
    __tsan_ignore_thread_begin();
    for (int i = 0; i < g_block_nmem; ++i) free(g_block_mem[i]);
    free(g_block_sync);
    __tsan_ignore_thread_end();
    g_block_nmem = 0;
    g_block_sync = nullptr;
}
#endif

// One block: every thread a fiber, round-robin until all exited.  Returns 0 or -1 (g_error).
MGD_EMU_NOTSAN static int run_block_fibers(unsigned bx, unsigned by, unsigned bz);

MGD_EMU_NOTSAN static int run_block(unsigned bx, unsigned by, unsigned bz) {
    ++g_block_serial;
#ifdef MGD_EMU_TSAN
    const int n = (int)(bx * by * bz);
    block_begin_tsan(n, bx, by);
    const int rc = g_error[0] ? -1 : run_block_fibers(bx, by, bz);
    block_end_tsan();
    return rc;
#else
    return run_block_fibers(bx, by, bz);
#endif
}

MGD_EMU_NOTSAN static int run_block_fibers(unsigned bx, unsigned by, unsigned bz) {
    const int n = (int)(bx * by * bz);
    for (int t = 0; t < n; ++t) {
        Fiber& f = g_fibers[t];
#ifndef MGD_EMU_TSAN
        if (!g_stacks[t]) {
            g_stacks[t] = (char*)malloc(STACK_BYTES);
            if (!g_stacks[t]) { fail("out of memory for fiber stacks"); return -1; }
        }
        f.stack = g_stacks[t];
#endif
        f.state = RUNNABLE;
        f.phase = 0;
        f.tx = t % bx;
        f.ty = (t / bx) % by;
        f.tz = t / (bx * by);
        if (!g_ctx_ready[t]) {   // getcontext costs a system call: once per fiber slot
            getcontext(&f.ctx);
            g_ctx_ready[t] = true;
        }
        f.ctx.uc_stack.ss_sp = f.stack;
        f.ctx.uc_stack.ss_size = STACK_BYTES;
        f.ctx.uc_link = &g_sched;
        makecontext(&f.ctx, fiber_main, 0);
    }
    // Odd-numbered blocks schedule their threads in descending order: a missing barrier
    // between a write by one thread and a read by another shows as a stale (NaN) read in
    // one of the two orders, whichever thread writes.  Single-block kernels alternate
    // between launches (the serial counts every block run).
    const bool down = (g_block_serial & 1) != 0;
    for (;;) {
        bool ran = false;
        for (int i = 0; i < n; ++i) {
            const int t = down ? n - 1 - i : i;
            if (g_fibers[t].state != RUNNABLE) continue;
            g_cur = t;
            threadIdx = {g_fibers[t].tx, g_fibers[t].ty, g_fibers[t].tz};
#ifdef MGD_EMU_TSAN
            __tsan_switch_to_fiber(g_fibers[t].tsan, 1);
#endif
            swapcontext(&g_sched, &g_fibers[t].ctx);
            ran = true;
            if (g_error[0]) return -1;
        }
        int exited = 0, at_sync = 0;
        for (int t = 0; t < n; ++t) {
            exited += g_fibers[t].state == EXITED;
            at_sync += g_fibers[t].state == AT_SYNCTHREADS;
        }
        if (exited == n) return 0;
        bool released = false;
        for (int w = 0; w * 32 < n; ++w) {   // warps whose every lane waits in a shuffle
            int at_shfl = 0, gone = 0;
            for (int t = w * 32; t < w * 32 + 32; ++t) {
                at_shfl += g_fibers[t].state == AT_SHUFFLE;
                gone += g_fibers[t].state == EXITED;
            }
            if (at_shfl == 32) {
                for (int t = w * 32; t < w * 32 + 32; ++t) g_fibers[t].state = RUNNABLE;
                released = true;
            } else if (at_shfl > 0 && at_shfl + gone == 32) {
                fail("__shfl_xor_sync with the full mask reached while other lanes of the warp had exited");
                return -1;
            }
        }
        if (at_sync > 0 && at_sync + exited == n) {
            if (exited) {
                fail("__syncthreads reached by some threads of a block after others had exited");
                return -1;
            }
            for (int t = 0; t < n; ++t) g_fibers[t].state = RUNNABLE;
            released = true;
        }
        if (!released && !ran) {
            snprintf(g_error, sizeof g_error,
                     "deadlock: %d threads wait in __syncthreads, %d exited, the rest wait in a warp "
                     "shuffle that not all lanes reach", at_sync, exited);
            return -1;
        }
    }
}

}  // namespace mgd_emu

// ---------------------------------------------------------------- the CUDA intrinsics used
MGD_EMU_NOTSAN static void __syncthreads() {
#ifdef MGD_EMU_TSAN
    // phase parity: a thread already past this barrier releases the other object, so a
    // thread still leaving the barrier acquires only what came before it
    mgd_emu::Fiber& f = mgd_emu::g_fibers[mgd_emu::g_cur];
    char* sync = mgd_emu::g_block_sync + (f.phase & 1);
    __tsan_release(sync);
    mgd_emu::wait_at(mgd_emu::AT_SYNCTHREADS);
    __tsan_acquire(sync);
    ++f.phase;
#else
    mgd_emu::wait_at(mgd_emu::AT_SYNCTHREADS);
#endif
}

// A shuffle exchanges values, not memory: it orders nothing for TSan (as on the device).
template <typename T>
MGD_EMU_NOTSAN static T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
    static_assert(sizeof(T) <= sizeof(unsigned long long), "shuffle of a type wider than 8 bytes");
    if (mask != 0xffffffffu) mgd_emu::fail("__shfl_xor_sync: only the full mask is emulated");
    if (blockDim.x * blockDim.y * blockDim.z % 32 != 0)
        mgd_emu::fail("__shfl_xor_sync in a block whose size is not a multiple of 32 (partial warp)");
    const int me = mgd_emu::linear_tid();
    memcpy(&mgd_emu::g_slots[me], &v, sizeof(T));
    mgd_emu::wait_at(mgd_emu::AT_SHUFFLE);                  // every lane has written
    const int src = (me & ~31) | ((me & 31) ^ (lane_mask & 31));
    T r;
    memcpy(&r, &mgd_emu::g_slots[src], sizeof(T));
    mgd_emu::wait_at(mgd_emu::AT_SHUFFLE);                  // every lane has read
    return r;
}

static inline int atomicOr(int* a, int v) { return __atomic_fetch_or(a, v, __ATOMIC_RELAXED); }

// ---------------------------------------------------------------- kernel entries
// MGD_EMU_ENTRY(k) exports `mgd_emu_entry_<k>`, a description of kernel k that the Python
// side reads with ctypes: how to call it from an array of argument pointers (CUDA's launch
// convention), and each parameter's kind and size, checked against every launch.
namespace mgd_emu {

struct Entry {
    void (*call)(void**);
    int nargs;
    char kinds[32];   // 'p' pointer, 'i' signed / 'u' unsigned integer, 'f' floating point
    int sizes[32];    // bytes of the value (of the pointee for pointers)
    char pointee[32]; // for pointers: 'i', 'u' or 'f'
};

template <typename A>
static void describe(Entry& e, int i) {
    typedef typename std::remove_cv<A>::type U;
    if (std::is_pointer<U>::value) {
        typedef typename std::remove_cv<typename std::remove_pointer<U>::type>::type P;
        e.kinds[i] = 'p';
        e.sizes[i] = (int)sizeof(typename std::conditional<std::is_void<P>::value, char, P>::type);
        e.pointee[i] = std::is_floating_point<P>::value ? 'f' : std::is_unsigned<P>::value ? 'u' : 'i';
    } else {
        e.kinds[i] = std::is_floating_point<U>::value ? 'f' : std::is_unsigned<U>::value ? 'u' : 'i';
        e.sizes[i] = (int)sizeof(U);
        e.pointee[i] = 0;
    }
}

template <typename F, F f, typename... A, size_t... I>
static void invoke(void** args, std::index_sequence<I...>) {
    f(*static_cast<typename std::remove_reference<A>::type*>(args[I])...);
}

template <typename F, F f, typename... A>
static void call_with(void** args) {
    invoke<F, f, A...>(args, std::index_sequence_for<A...>{});
}

template <typename F, F f, typename... A>
static Entry make_entry(void (*)(A...)) {
    Entry e;
    memset(&e, 0, sizeof e);
    e.call = &call_with<F, f, A...>;
    e.nargs = (int)sizeof...(A);
    int i = 0;
    (void)std::initializer_list<int>{(describe<A>(e, i++), 0)...};
    return e;
}

}  // namespace mgd_emu

#define MGD_EMU_ENTRY(k)                                                                      \
    extern "C" const mgd_emu::Entry* mgd_emu_entry_##k() {                                    \
        static const mgd_emu::Entry e = mgd_emu::make_entry<decltype(&k), &k>(&k);            \
        return &e;                                                                            \
    }

// Run kernel `e` over grid (gx, gy, gz) of blocks (bx, by, bz).  Returns 0, or -1 with the
// reason in `err` (a deadlock, a barrier misuse, a bad launch configuration).
extern "C" MGD_EMU_NOTSAN int mgd_emu_launch(const mgd_emu::Entry* e, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                              unsigned by, unsigned bz, void** args, char* err, int errlen) {
    using namespace mgd_emu;
    g_error[0] = 0;
    const unsigned long long nt = (unsigned long long)bx * by * bz;
    if (nt == 0 || nt > (unsigned long long)MAX_THREADS || gx == 0 || gy == 0 || gz == 0 || gx > 2147483647u ||
        gy > 65535u || gz > 65535u || bz > 64u) {
        snprintf(err, errlen, "invalid launch configuration: grid (%u, %u, %u), block (%u, %u, %u) "
                 "(CUDA allows 1 to 1024 threads per block, block z <= 64, and a non-empty grid with "
                 "x < 2^31, y and z <= 65535)", gx, gy, gz, bx, by, bz);
        return -1;
    }
    g_call = e->call;
    g_args = args;
#ifdef MGD_EMU_TSAN
    g_sched_fiber = __tsan_get_current_fiber();
    g_tsan_next = 0;
    __tsan_release(&g_host_sync);
    struct Joined {   // the host continues after every thread of the launch, however it ends
        ~Joined() { __tsan_acquire(&g_launch_sync); }
    } joined;
#endif
    gridDim = {gx, gy, gz};
    blockDim = {bx, by, bz};
    for (unsigned z = 0; z < gz; ++z)
        for (unsigned y = 0; y < gy; ++y)
            for (unsigned x = 0; x < gx; ++x) {
                blockIdx = {x, y, z};
                if (run_block(bx, by, bz) != 0) {
                    snprintf(err, errlen, "block (%u, %u, %u): %s", x, y, z, g_error);
                    return -1;
                }
            }
    return 0;
}
