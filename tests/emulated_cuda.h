// CUDA C++ as plain C++17, for running npgpt's kernels on the CPU in the test suite.
//
// tests/emulated_cuda.py includes this header, then the kernels' source, then this header
// again with EMUCUDA_IMPLEMENTATION defined (the runtime: fibers and their scheduler), then
// one launcher per kernel. The kernels see only what the first part defines:
//   __global__ __device__ __host__ __forceinline__ (and g++'s own __restrict__)
//   threadIdx blockIdx blockDim gridDim    (.x .y .z, unsigned int, of the running thread)
//   __shfl_xor_sync(mask, var, laneMask, width = 32) for float, double, int, unsigned,
//       long long; the full mask 0xffffffff and width 32 only
//   expf logf tanhf sqrtf fmaxf fminf fabsf, and sqrt pow in double (libm's), rsqrtf,
//   INFINITY, size_t
//   f16_bits_to_float, float_to_f16_bits: what kernels_common.cu does with the GPU's cvt
//       instructions (inline PTX, compiled only where __CUDA_ARCH__ is defined), done by
//       g++'s _Float16: exact widening, rounding to nearest even
// Anything else a kernel uses (__syncthreads, __shared__, atomics, printf, other math)
// fails to compile: the emulation has no meaning for it.
//
// Execution: every thread is a fiber (ucontext) with its own 64 KiB stack. Blocks run one
// after another, and within a block its warps (32 consecutive linear thread ids) one after
// another; in a warp, lane 0 runs until it returns or reaches a shuffle, then lane 1, ...
// When every lane waits at a shuffle, lane i receives the var of lane i ^ laneMask and all
// resume. Without shared memory or __syncthreads this is a schedule a GPU could run.
// Errors (a lane returning while others wait at a shuffle, a full-mask shuffle in a partial
// warp, an unsupported mask or width) stop the launch: the message is kept and the
// scheduler abandons the fibers (no C++ exception crosses swapcontext).

#ifndef NPGPT_EMULATED_CUDA_H
#define NPGPT_EMULATED_CUDA_H

#include <cstddef>  // size_t

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline

// the math functions kernels may call: libm's, declared as <cmath> declares them
extern "C" {
float expf(float) noexcept;
float logf(float) noexcept;
float tanhf(float) noexcept;
float sqrtf(float) noexcept;
float fmaxf(float, float) noexcept;
float fminf(float, float) noexcept;
float fabsf(float) noexcept;
double sqrt(double) noexcept;
double pow(double, double) noexcept;
}
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
#define INFINITY (__builtin_inff())

// IEEE binary16 bits <-> float (kernels_common.cu's half_t holds the bits)
inline float f16_bits_to_float(unsigned short h) {
    _Float16 v;
    __builtin_memcpy(&v, &h, sizeof v);
    return static_cast<float>(v);
}
inline unsigned short float_to_f16_bits(float f) {
    _Float16 v = static_cast<_Float16>(f);
    unsigned short h;
    __builtin_memcpy(&h, &v, sizeof h);
    return h;
}

namespace emucuda {

struct uint3 { unsigned int x, y, z; };
struct ThreadState { uint3 thread_idx, block_idx, block_dim, grid_dim; };

// the emulated thread now running on this OS thread (set by the scheduler)
inline thread_local const ThreadState* running_thread = nullptr;
inline const ThreadState& current() { return *running_thread; }

// parks the calling lane until its whole warp has arrived; value is replaced by the
// partner lane's (defined in the implementation part)
void shuffle_xor(unsigned mask, int lane_mask, int width, void* value, int size);

template <class T> struct Shufflable { static constexpr bool value = false; };
template <> struct Shufflable<float> { static constexpr bool value = true; };
template <> struct Shufflable<double> { static constexpr bool value = true; };
template <> struct Shufflable<int> { static constexpr bool value = true; };
template <> struct Shufflable<unsigned> { static constexpr bool value = true; };
template <> struct Shufflable<long long> { static constexpr bool value = true; };

}  // namespace emucuda

#define threadIdx (::emucuda::current().thread_idx)
#define blockIdx (::emucuda::current().block_idx)
#define blockDim (::emucuda::current().block_dim)
#define gridDim (::emucuda::current().grid_dim)

template <class T>
inline T __shfl_xor_sync(unsigned mask, T var, int laneMask, int width = 32) {
    static_assert(::emucuda::Shufflable<T>::value,
                  "emulated __shfl_xor_sync takes float, double, int, unsigned or long long");
    ::emucuda::shuffle_xor(mask, laneMask, width, &var, sizeof var);
    return var;
}

#endif  // NPGPT_EMULATED_CUDA_H

// ---------------------------------------------------------------------------------------
// the runtime, included after the kernels so that its system headers stay out of their way

#if defined(EMUCUDA_IMPLEMENTATION) && !defined(NPGPT_EMULATED_CUDA_IMPLEMENTATION)
#define NPGPT_EMULATED_CUDA_IMPLEMENTATION

#include <sys/mman.h>
#include <ucontext.h>

namespace emucuda {

constexpr int kWarp = 32;
constexpr size_t kStack = 64 * 1024;
constexpr size_t kGuard = 64 * 1024;  // PROT_NONE below each stack: overflow faults

enum class Status { ready, waiting, done };

struct Lane {
    ucontext_t context;
    ThreadState state;
    Status status;
    int lane_mask, size;  // of the shuffle it waits in
    unsigned char value[8];
};

struct Warp {
    Lane lanes[kWarp];
    int size = 0, running = 0;
    unsigned block_threads = 0;
    bool failed = false;
    ucontext_t scheduler;
    char* stacks = nullptr;
    void (*body)(void*) = nullptr;
    void* closure = nullptr;
};

inline thread_local Warp* the_warp = nullptr;  // made once per OS thread, reused
inline thread_local char error_message[1024];

// error_message = "block (..) thread (..): " + the formatted rest
inline void set_error(const ThreadState& s, const char* format, ...) {
    int n = __builtin_snprintf(error_message, sizeof error_message,
                               "block (%u,%u,%u) thread (%u,%u,%u): ", s.block_idx.x,
                               s.block_idx.y, s.block_idx.z, s.thread_idx.x, s.thread_idx.y,
                               s.thread_idx.z);
    __builtin_va_list args;
    __builtin_va_start(args, format);
    __builtin_vsnprintf(error_message + n, sizeof error_message - n, format, args);
    __builtin_va_end(args);
}

void shuffle_xor(unsigned mask, int lane_mask, int width, void* value, int size) {
    Warp& w = *the_warp;
    Lane& me = w.lanes[w.running];
    if (mask != 0xffffffffu)
        set_error(me.state, "__shfl_xor_sync mask 0x%x: only the full mask 0xffffffff is "
                  "emulated", mask);
    else if (width != kWarp)
        set_error(me.state, "__shfl_xor_sync width %d: only 32 is emulated", width);
    else if (w.size != kWarp)
        set_error(me.state, "__shfl_xor_sync with the full mask in a partial warp of %d "
                  "lanes (the block's %u threads are not a multiple of 32)", w.size,
                  w.block_threads);
    else {
        __builtin_memcpy(me.value, value, size);
        me.size = size;
        me.lane_mask = lane_mask;
        me.status = Status::waiting;
        swapcontext(&me.context, &w.scheduler);
        __builtin_memcpy(value, me.value, size);
        return;
    }
    w.failed = true;  // the scheduler abandons this warp's fibers
    setcontext(&w.scheduler);
}

inline void lane_main() {
    Warp& w = *the_warp;
    w.body(w.closure);
    w.lanes[w.running].status = Status::done;
    setcontext(&w.scheduler);
}

// runs one warp to completion; false (error_message set) on an error
inline bool run_warp(Warp& w) {
    for (;;) {
        for (int i = 0; i < w.size; ++i) {
            if (w.lanes[i].status != Status::ready) continue;
            w.running = i;
            running_thread = &w.lanes[i].state;
            swapcontext(&w.scheduler, &w.lanes[i].context);
            if (w.failed) return false;
        }
        int waiting = 0, returned = -1;
        for (int i = 0; i < w.size; ++i) {
            if (w.lanes[i].status == Status::waiting) ++waiting;
            else if (returned < 0) returned = i;
        }
        if (waiting == 0) return true;
        if (returned >= 0) {
            set_error(w.lanes[returned].state, "lane %d returned while lanes wait in "
                      "__shfl_xor_sync (%d of the warp's %d lanes wait there)",
                      returned, waiting, w.size);
            return false;
        }
        unsigned char sent[kWarp][8];
        for (int i = 0; i < kWarp; ++i) {
            if (w.lanes[i].size != w.lanes[0].size) {
                set_error(w.lanes[i].state, "lanes of a warp wait in __shfl_xor_sync with "
                          "values of %d and %d bytes (different call sites?)",
                          w.lanes[0].size, w.lanes[i].size);
                return false;
            }
            __builtin_memcpy(sent[i], w.lanes[i].value, 8);
        }
        for (int i = 0; i < kWarp; ++i) {
            int source = i ^ w.lanes[i].lane_mask;  // outside the warp: keeps its own
            if (source >= 0 && source < kWarp)
                __builtin_memcpy(w.lanes[i].value, sent[source], 8);
            w.lanes[i].status = Status::ready;
        }
    }
}

inline Warp* make_warp() {
    size_t each = kGuard + kStack;
    void* memory = mmap(nullptr, kWarp * each, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (memory == MAP_FAILED) return nullptr;
    char* stacks = static_cast<char*>(memory);
    for (int i = 0; i < kWarp; ++i) mprotect(stacks + i * each, kGuard, PROT_NONE);
    Warp* w = new Warp();
    w->stacks = stacks;
    return w;
}

// runs body(closure) as every thread of the grid; 0, or 1 with error_message set
inline int launch(uint3 grid, uint3 block, void (*body)(void*), void* closure) {
    error_message[0] = 0;
    if (!the_warp && !(the_warp = make_warp())) {
        __builtin_snprintf(error_message, sizeof error_message, "no memory for fiber stacks");
        return 1;
    }
    Warp& w = *the_warp;
    w.body = body;
    w.closure = closure;
    w.block_threads = block.x * block.y * block.z;
    int status = 0;
    for (unsigned bz = 0; bz < grid.z && !status; ++bz)
    for (unsigned by = 0; by < grid.y && !status; ++by)
    for (unsigned bx = 0; bx < grid.x && !status; ++bx)
    for (unsigned first = 0; first < w.block_threads && !status; first += kWarp) {
        unsigned left = w.block_threads - first;
        w.size = left < kWarp ? static_cast<int>(left) : kWarp;
        w.failed = false;
        for (int i = 0; i < w.size; ++i) {
            Lane& lane = w.lanes[i];
            unsigned t = first + i;
            lane.state = {{t % block.x, t / block.x % block.y, t / (block.x * block.y)},
                          {bx, by, bz}, block, grid};
            lane.status = Status::ready;
            getcontext(&lane.context);
            lane.context.uc_stack.ss_sp = w.stacks + i * (kGuard + kStack) + kGuard;
            lane.context.uc_stack.ss_size = kStack;
            lane.context.uc_link = nullptr;
            makecontext(&lane.context, lane_main, 0);
        }
        if (!run_warp(w)) status = 1;
    }
    running_thread = nullptr;
    return status;
}

template <class F> void call(void* f) { (*static_cast<F*>(f))(); }

}  // namespace emucuda

#endif  // EMUCUDA_IMPLEMENTATION
