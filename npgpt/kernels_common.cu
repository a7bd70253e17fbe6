// Fused CUDA kernels for npgpt on a GPU (compiled by CuPy's RawModule; see kernels.py).
// kernels.py compiles the kernels_*.cu files as one program: this one, which the others
// use, first; then kernels_layers.cu, kernels_attention.cu, kernels_loss.cu.
//
// Each kernel does in one pass over memory what the plain array code in ops.py / optim.py
// does in several; the formulas are ops.py's, and tests/test_kernels.py checks each kernel
// against them. Each kernel computes in float and comes in two storage types: `name` reads
// and writes float arrays (a float32 model), `name_f16` half_t ones (a float16 model's
// activations, rounded once, to nearest even, when written; the row statistics rstd,
// rowdot and nll and every column sum stay float, as ops.sum_dtype says). kernels.py picks
// the version from its first array's dtype; float64 models use the plain code, and AdamW
// (the float32 master weights) has no float16 version.
//
// Four launch shapes (kernels.py chooses the grid):
//   row kernels:  one warp (32 threads) per row of C (or T, or V) elements, WARPS warps
//                 per block; a row's sums and maxima are combined across the warp with
//                 __shfl_xor_sync (after it every lane holds the whole row's result).
//   flat kernels: one thread per element, in a grid-stride loop.
//   column kernels: one thread per column (grid x), blocks of rows in a stride (grid y).
//   one warp:     a small job (the mean loss) in one block of 32 threads.
// Only registers and warp shuffles: no shared memory, no __syncthreads, no atomics, so
// every result is computed in one fixed order (the same bits on every run).

#define FULL_MASK 0xffffffffu

__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset >>= 1)
        v += __shfl_xor_sync(FULL_MASK, v, offset);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int offset = 16; offset > 0; offset >>= 1)
        v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, offset));
    return v;
}

// float16 storage: the 16 bits of an IEEE binary16, converted by the GPU's cvt instructions
// (no header needed). tests/emulated_cuda.h defines the same two functions for the emulator.
struct half_t { unsigned short bits; };

#ifdef __CUDA_ARCH__
__device__ __forceinline__ float f16_bits_to_float(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ unsigned short float_to_f16_bits(float f) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
#endif

// ld(p, i): element i as a float; st(p, i, v): v stored in p's type (float16: rounded)
__device__ __forceinline__ float ld(const float* p, long long i) { return p[i]; }
__device__ __forceinline__ float ld(const half_t* p, long long i) {
    return f16_bits_to_float(p[i].bits);
}
__device__ __forceinline__ void st(float* p, long long i, float v) { p[i] = v; }
__device__ __forceinline__ void st(half_t* p, long long i, float v) {
    p[i].bits = float_to_f16_bits(v);
}

// the row this warp owns and this thread's lane in it
__device__ __forceinline__ long long warp_row() {
    return (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
}
__device__ __forceinline__ int lane_id() { return threadIdx.x % 32; }
