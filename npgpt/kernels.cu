// Fused CUDA kernels for npgpt on a GPU (compiled by CuPy's RawModule; see kernels.py).
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
// Three launch shapes (kernels.py chooses the grid):
//   row kernels:  one warp (32 threads) per row of C (or T, or V) elements, WARPS warps
//                 per block; a row's sums and maxima are combined across the warp with
//                 __shfl_xor_sync (after it every lane holds the whole row's result).
//   flat kernels: one thread per element, in a grid-stride loop.
//   column kernels: one thread per column (grid x), blocks of rows in a stride (grid y).
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

// ---------------------------------------------------------------------------------------
// a bias added to every row of a (rows, C) row-major matrix, in place (linear_forward's
// out += b), one thread per column c over a stride of rows (a column kernel): b[c] is read
// once per thread, and a warp touches 32 neighbouring elements of each row. (CuPy's
// broadcasting add computes every element's index from the shape: slower than the memory.)
//   out[r, c] = out[r, c] + b[c]

template <typename T>
__device__ __forceinline__ void add_bias_columns(T* __restrict__ out,
                                                 const T* __restrict__ b, long long rows,
                                                 int C) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    float bc = ld(b, c);
    for (long long r = blockIdx.y; r < rows; r += gridDim.y)
        st(out, r * C + c, ld(out, r * C + c) + bc);
}

extern "C" __global__ void add_bias(float* __restrict__ out, const float* __restrict__ b,
                                    long long rows, int C) {
    add_bias_columns(out, b, rows, C);
}

extern "C" __global__ void add_bias_f16(half_t* __restrict__ out, const half_t* __restrict__ b,
                                        long long rows, int C) {
    add_bias_columns(out, b, rows, C);
}

// ---------------------------------------------------------------------------------------
// the token embedding's gradient, one thread per (token v, column c): the rows of dout
// whose token is v, added in a fixed order (by position), so that every run gets the same
// bits (a scatter-add with atomics would not). order lists the N rows sorted by (token,
// position); the rows of token v are order[starts[v]] .. order[starts[v + 1] - 1]:
//   dwte[v, c] = sum over those rows r of dout[r, c]       (0 for a token not in the batch)

template <typename T>
__device__ __forceinline__ void token_sums_columns(
        const T* __restrict__ dout, const long long* __restrict__ order,
        const long long* __restrict__ starts, float* __restrict__ dwte, long long V, int C) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < V * C;
         i += (long long)gridDim.x * blockDim.x) {
        long long v = i / C, c = i % C;
        float acc = 0.0f;
        for (long long k = starts[v]; k < starts[v + 1]; ++k) acc += ld(dout, order[k] * C + c);
        dwte[i] = acc;
    }
}

extern "C" __global__ void token_sums(const float* __restrict__ dout,
                                      const long long* __restrict__ order,
                                      const long long* __restrict__ starts,
                                      float* __restrict__ dwte, long long V, int C) {
    token_sums_columns(dout, order, starts, dwte, V, C);
}

extern "C" __global__ void token_sums_f16(const half_t* __restrict__ dout,
                                          const long long* __restrict__ order,
                                          const long long* __restrict__ starts,
                                          float* __restrict__ dwte, long long V, int C) {
    token_sums_columns(dout, order, starts, dwte, V, C);
}

// ---------------------------------------------------------------------------------------
// LayerNorm, one row of C per warp
//   mean = sum(x)/C;  var = sum((x - mean)^2)/C;  rstd = 1/sqrt(var + eps)
//   xhat = (x - mean) * rstd;  out = xhat * w + b

template <typename T>
__device__ __forceinline__ void layernorm_forward_rows(
        const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ b,
        T* __restrict__ out, T* __restrict__ xhat, float* __restrict__ rstd,
        int rows, int C, float eps) {
    long long row = warp_row();
    if (row >= rows) return;
    int lane = lane_id();
    long long r0 = row * C;  // the row's first element
    float sum = 0.0f;
    for (int c = lane; c < C; c += 32) sum += ld(x, r0 + c);
    float mean = warp_sum(sum) / C;
    float sq = 0.0f;
    for (int c = lane; c < C; c += 32) {
        float d = ld(x, r0 + c) - mean;
        sq += d * d;
    }
    float r = rsqrtf(warp_sum(sq) / C + eps);
    for (int c = lane; c < C; c += 32) {
        float h = (ld(x, r0 + c) - mean) * r;
        st(xhat, r0 + c, h);
        st(out, r0 + c, h * ld(w, c) + ld(b, c));
    }
    if (lane == 0) rstd[row] = r;
}

extern "C" __global__ void layernorm_forward(
        const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ b,
        float* __restrict__ out, float* __restrict__ xhat, float* __restrict__ rstd,
        int rows, int C, float eps) {
    layernorm_forward_rows(x, w, b, out, xhat, rstd, rows, C, eps);
}

extern "C" __global__ void layernorm_forward_f16(
        const half_t* __restrict__ x, const half_t* __restrict__ w,
        const half_t* __restrict__ b, half_t* __restrict__ out, half_t* __restrict__ xhat,
        float* __restrict__ rstd, int rows, int C, float eps) {
    layernorm_forward_rows(x, w, b, out, xhat, rstd, rows, C, eps);
}

// dxhat = dout * w;  dx = rstd * (dxhat - mean_C(dxhat) - xhat * mean_C(dxhat * xhat))
// (dw and db, sums over rows, are left to a column reduction)
template <typename T>
__device__ __forceinline__ void layernorm_backward_rows(
        const T* __restrict__ dout, const T* __restrict__ xhat,
        const float* __restrict__ rstd, const T* __restrict__ w,
        T* __restrict__ dx, int rows, int C) {
    long long row = warp_row();
    if (row >= rows) return;
    int lane = lane_id();
    long long r0 = row * C;
    float s = 0.0f, p = 0.0f;
    for (int c = lane; c < C; c += 32) {
        float dh = ld(dout, r0 + c) * ld(w, c);
        s += dh;
        p += dh * ld(xhat, r0 + c);
    }
    float mean_dxhat = warp_sum(s) / C;
    float mean_proj = warp_sum(p) / C;
    float r = rstd[row];
    for (int c = lane; c < C; c += 32)
        st(dx, r0 + c, r * (ld(dout, r0 + c) * ld(w, c) - mean_dxhat
                            - ld(xhat, r0 + c) * mean_proj));
}

extern "C" __global__ void layernorm_backward(
        const float* __restrict__ dout, const float* __restrict__ xhat,
        const float* __restrict__ rstd, const float* __restrict__ w,
        float* __restrict__ dx, int rows, int C) {
    layernorm_backward_rows(dout, xhat, rstd, w, dx, rows, C);
}

extern "C" __global__ void layernorm_backward_f16(
        const half_t* __restrict__ dout, const half_t* __restrict__ xhat,
        const float* __restrict__ rstd, const half_t* __restrict__ w,
        half_t* __restrict__ dx, int rows, int C) {
    layernorm_backward_rows(dout, xhat, rstd, w, dx, rows, C);
}

// ---------------------------------------------------------------------------------------
// column sums of a (N, C) row-major matrix (a bias's or a LayerNorm weight's gradient),
// one level of a tree, one thread per (chunk s, column c), c fastest, so that a warp reads
// 32 neighbouring columns of each row:
//   part[s, c] = a[sR, c] + a[sR + 1, c] + ... + a[min(N, sR + R) - 1, c]     (in row order)
// kernels.py repeats it on part until one row is left: the order of every sum is fixed by
// N and R alone. (A GPU's generic reduction down the columns of (8192, 384) ran 10x slower
// than the memory allows: one column per block, strided reads.) The sums are float for
// float16 rows too: only the first level reads half_t.

template <typename T>
__device__ __forceinline__ void column_sums_level(const T* __restrict__ a,
                                                  float* __restrict__ part,
                                                  long long N, int C, int R) {
    long long n = (N + R - 1) / R * C;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        long long s = i / C, c = i % C;
        long long end = (s + 1) * R < N ? (s + 1) * R : N;
        float acc = 0.0f;
        for (long long r = s * R; r < end; ++r) acc += ld(a, r * C + c);
        part[i] = acc;
    }
}

extern "C" __global__ void column_sums(const float* __restrict__ a, float* __restrict__ part,
                                       long long N, int C, int R) {
    column_sums_level(a, part, N, C, R);
}

extern "C" __global__ void column_sums_f16(const half_t* __restrict__ a,
                                           float* __restrict__ part, long long N, int C,
                                           int R) {
    column_sums_level(a, part, N, C, R);
}

// LayerNorm's parameter gradients, the first level of column_sums for two sums at once,
// reading dout and xhat once (the products are float: exact for float16 inputs):
//   part[s, c] = sum over the chunk's rows of dout[r, c]              (-> db)
//   part[s, C + c] = sum over the chunk's rows of dout[r, c] xhat[r, c]   (-> dw)

template <typename T>
__device__ __forceinline__ void layernorm_param_grads_level(
        const T* __restrict__ dout, const T* __restrict__ xhat, float* __restrict__ part,
        long long N, int C, int R) {
    long long n = (N + R - 1) / R * C;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        long long s = i / C, c = i % C;
        long long end = (s + 1) * R < N ? (s + 1) * R : N;
        float db = 0.0f, dw = 0.0f;
        for (long long r = s * R; r < end; ++r) {
            float d = ld(dout, r * C + c);
            db += d;
            dw += d * ld(xhat, r * C + c);
        }
        part[s * 2 * C + c] = db;
        part[s * 2 * C + C + c] = dw;
    }
}

extern "C" __global__ void layernorm_param_grads(const float* __restrict__ dout,
                                                 const float* __restrict__ xhat,
                                                 float* __restrict__ part, long long N, int C,
                                                 int R) {
    layernorm_param_grads_level(dout, xhat, part, N, C, R);
}

extern "C" __global__ void layernorm_param_grads_f16(const half_t* __restrict__ dout,
                                                     const half_t* __restrict__ xhat,
                                                     float* __restrict__ part, long long N,
                                                     int C, int R) {
    layernorm_param_grads_level(dout, xhat, part, N, C, R);
}

// ---------------------------------------------------------------------------------------
// tanh-GELU, one thread per element
//   u = k (x + a x^3);  t = tanh(u);  out = 0.5 x (1 + t)
//   dx = dout * (0.5 (1 + t) + 0.5 x (1 - t^2) k (1 + 3 a x^2))
// (float inside: the float16 versions do not overflow at x^2 > 65504, as float16 math would)

#define GELU_K 0.7978845608028654f  // sqrt(2 / pi)
#define GELU_A 0.044715f

template <typename T>
__device__ __forceinline__ void gelu_forward_elements(const T* __restrict__ x,
                                                      T* __restrict__ out, long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        float v = ld(x, i);
        float t = tanhf(GELU_K * v * (1.0f + GELU_A * v * v));
        st(out, i, 0.5f * v * (1.0f + t));
    }
}

extern "C" __global__ void gelu_forward(const float* __restrict__ x, float* __restrict__ out,
                                        long long n) {
    gelu_forward_elements(x, out, n);
}

extern "C" __global__ void gelu_forward_f16(const half_t* __restrict__ x,
                                            half_t* __restrict__ out, long long n) {
    gelu_forward_elements(x, out, n);
}

template <typename T>
__device__ __forceinline__ void gelu_backward_elements(const T* __restrict__ dout,
                                                       const T* __restrict__ x,
                                                       T* __restrict__ dx, long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        float v = ld(x, i);
        float t = tanhf(GELU_K * v * (1.0f + GELU_A * v * v));
        float du = GELU_K * (1.0f + 3.0f * GELU_A * v * v);
        st(dx, i, ld(dout, i) * (0.5f * (1.0f + t) + 0.5f * v * (1.0f - t * t) * du));
    }
}

extern "C" __global__ void gelu_backward(const float* __restrict__ dout,
                                         const float* __restrict__ x, float* __restrict__ dx,
                                         long long n) {
    gelu_backward_elements(dout, x, dx, n);
}

extern "C" __global__ void gelu_backward_f16(const half_t* __restrict__ dout,
                                             const half_t* __restrict__ x,
                                             half_t* __restrict__ dx, long long n) {
    gelu_backward_elements(dout, x, dx, n);
}

// ---------------------------------------------------------------------------------------
// causal softmax of attention scores, in place, one row of T per warp
// row r of the (B*nh*T, T) scores is query position t = r % T, which sees keys j <= t:
//   att[j] = exp(s[j] - max) / sum_{k <= t} exp(s[k] - max) for j <= t, and 0 for j > t
// (the last pass recomputes each exp rather than reread it: a float16 row rounds once)

template <typename T>
__device__ __forceinline__ void causal_softmax_rows(T* __restrict__ att, int rows, int T_) {
    long long row = warp_row();
    if (row >= rows) return;
    int lane = lane_id();
    int t = (int)(row % T_);
    long long r0 = row * T_;
    float m = ld(att, r0);  // every row sees key 0
    for (int j = lane; j <= t; j += 32) m = fmaxf(m, ld(att, r0 + j));
    m = warp_max(m);
    float sum = 0.0f;
    for (int j = lane; j <= t; j += 32) sum += expf(ld(att, r0 + j) - m);
    float inv = 1.0f / warp_sum(sum);
    for (int j = lane; j < T_; j += 32)
        st(att, r0 + j, j <= t ? expf(ld(att, r0 + j) - m) * inv : 0.0f);
}

extern "C" __global__ void causal_softmax(float* __restrict__ att, int rows, int T) {
    causal_softmax_rows(att, rows, T);
}

extern "C" __global__ void causal_softmax_f16(half_t* __restrict__ att, int rows, int T) {
    causal_softmax_rows(att, rows, T);
}

// softmax backward with the attention dropout, in place, one row of T per warp:
//   ds = att * (da * mask - rowdot)      (ops.causal_softmax_backward)
// row r = ((b nh + h) T + t) is query position t; its rowdot_i = dy_i . y_i is stored
// (B, T, nh), float, and read once per row. Keys j > t have att = 0: ds is 0 there, and
// neither att nor da is read. has_mask = 0: no dropout (mask is not read).
template <typename T>
__device__ __forceinline__ void causal_softmax_backward_rows(
        T* __restrict__ ds, const T* __restrict__ att, const float* __restrict__ rowdot,
        const T* __restrict__ mask, int has_mask, int rows, int T_, int nh) {
    long long row = warp_row();
    if (row >= rows) return;
    int lane = lane_id();
    long long t = row % T_, h = (row / T_) % nh, b = row / ((long long)T_ * nh);
    float rd = rowdot[(b * T_ + t) * nh + h];
    long long r0 = row * T_;
    for (int j = lane; j < T_; j += 32) {
        if (j <= t) {
            float da = has_mask ? ld(ds, r0 + j) * ld(mask, r0 + j) : ld(ds, r0 + j);
            st(ds, r0 + j, ld(att, r0 + j) * (da - rd));
        } else {
            st(ds, r0 + j, 0.0f);
        }
    }
}

extern "C" __global__ void causal_softmax_backward(
        float* __restrict__ ds, const float* __restrict__ att,
        const float* __restrict__ rowdot, const float* __restrict__ mask, int has_mask,
        int rows, int T, int nh) {
    causal_softmax_backward_rows(ds, att, rowdot, mask, has_mask, rows, T, nh);
}

extern "C" __global__ void causal_softmax_backward_f16(
        half_t* __restrict__ ds, const half_t* __restrict__ att,
        const float* __restrict__ rowdot, const half_t* __restrict__ mask, int has_mask,
        int rows, int T, int nh) {
    causal_softmax_backward_rows(ds, att, rowdot, mask, has_mask, rows, T, nh);
}

// ---------------------------------------------------------------------------------------
// softmax cross-entropy, one row of V logits per warp
//   probs = softmax(z);  nll = log(sum exp(z - max)) - (z[t] - max);  nll = 0 if t ignored
// (nll is float for float16 logits; probs are written once, from recomputed exps)

template <typename T>
__device__ __forceinline__ void cross_entropy_forward_rows(
        const T* __restrict__ logits, const long long* __restrict__ targets,
        T* __restrict__ probs, float* __restrict__ nll, int rows, int V,
        long long ignore_index) {
    long long row = warp_row();
    if (row >= rows) return;
    int lane = lane_id();
    long long r0 = row * V;
    float m = ld(logits, r0);
    for (int j = lane; j < V; j += 32) m = fmaxf(m, ld(logits, r0 + j));
    m = warp_max(m);
    float sum = 0.0f;
    for (int j = lane; j < V; j += 32) sum += expf(ld(logits, r0 + j) - m);
    sum = warp_sum(sum);
    float inv = 1.0f / sum;
    for (int j = lane; j < V; j += 32) st(probs, r0 + j, expf(ld(logits, r0 + j) - m) * inv);
    if (lane == 0) {
        long long t = targets[row];
        nll[row] = t == ignore_index ? 0.0f : logf(sum) - (ld(logits, r0 + t) - m);
    }
}

extern "C" __global__ void cross_entropy_forward(
        const float* __restrict__ logits, const long long* __restrict__ targets,
        float* __restrict__ probs, float* __restrict__ nll, int rows, int V,
        long long ignore_index) {
    cross_entropy_forward_rows(logits, targets, probs, nll, rows, V, ignore_index);
}

extern "C" __global__ void cross_entropy_forward_f16(
        const half_t* __restrict__ logits, const long long* __restrict__ targets,
        half_t* __restrict__ probs, float* __restrict__ nll, int rows, int V,
        long long ignore_index) {
    cross_entropy_forward_rows(logits, targets, probs, nll, rows, V, ignore_index);
}

// dlogits = scale * (probs - onehot(t)) for kept rows, 0 for ignored ones; one thread per
// element; scale = dloss / (number of kept rows), a float device scalar (read without a
// sync)
template <typename T>
__device__ __forceinline__ void cross_entropy_backward_elements(
        const T* __restrict__ probs, const long long* __restrict__ targets,
        const float* __restrict__ scale, T* __restrict__ dlogits, long long n, int V,
        long long ignore_index) {
    float s = scale[0];
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        long long t = targets[i / V];
        float d = ld(probs, i) - ((i % V) == t ? 1.0f : 0.0f);
        st(dlogits, i, t == ignore_index ? 0.0f : d * s);
    }
}

extern "C" __global__ void cross_entropy_backward(
        const float* __restrict__ probs, const long long* __restrict__ targets,
        const float* __restrict__ scale, float* __restrict__ dlogits, long long n, int V,
        long long ignore_index) {
    cross_entropy_backward_elements(probs, targets, scale, dlogits, n, V, ignore_index);
}

extern "C" __global__ void cross_entropy_backward_f16(
        const half_t* __restrict__ probs, const long long* __restrict__ targets,
        const float* __restrict__ scale, half_t* __restrict__ dlogits, long long n, int V,
        long long ignore_index) {
    cross_entropy_backward_elements(probs, targets, scale, dlogits, n, V, ignore_index);
}

// ---------------------------------------------------------------------------------------
// AdamW over the whole flat parameter buffer, one thread per element (optim.py), in one
// launch: decays[i] = 1 where element i belongs to a matrix (weight decay), else 0
//   p *= decay                                (decay = 1 - lr wd for matrices, else 1)
//   m = b1 m + (1 - b1) g;   v = b2 v + (1 - b2) g^2
//   p -= lr_t * m / (sqrt(v) / bias2_sqrt + eps)     (lr_t = lr / (1 - b1^t))

extern "C" __global__ void adamw(float* __restrict__ p, const float* __restrict__ g,
                                 float* __restrict__ m, float* __restrict__ v,
                                 const unsigned char* __restrict__ decays, long long n,
                                 float decay, float b1, float b2, float eps, float lr_t,
                                 float inv_bias2_sqrt) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        float gi = g[i];
        float mi = b1 * m[i] + (1.0f - b1) * gi;
        float vi = b2 * v[i] + (1.0f - b2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        p[i] = p[i] * (decays[i] ? decay : 1.0f) - lr_t * mi / (sqrtf(vi) * inv_bias2_sqrt + eps);
    }
}

// the same update for a step that may be skipped (mixed precision): its coefficients are
// on the device, each times keep (0 when the gradients overflowed, else 1), as optim.py's
// array code writes them, so that keep = 0 leaves p, m and v exactly as they were:
//   coef = [1 - keep lr wd, keep (1 - b1), keep (1 - b2), 1 / bias2_sqrt, keep lr_t]
//   m += c1 (g - m);  v += c2 (g^2 - v);  p = p * decay - step * m / (sqrt(v) unbias2 + eps)
extern "C" __global__ void adamw_skippable(float* __restrict__ p, const float* __restrict__ g,
                                           float* __restrict__ m, float* __restrict__ v,
                                           const unsigned char* __restrict__ decays,
                                           long long n, const float* __restrict__ coef,
                                           float eps) {
    float decay = coef[0], c1 = coef[1], c2 = coef[2], unbias2 = coef[3], step = coef[4];
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        float gi = g[i];
        float mi = m[i] + c1 * (gi - m[i]);
        float vi = v[i] + c2 * (gi * gi - v[i]);
        m[i] = mi;
        v[i] = vi;
        p[i] = p[i] * (decays[i] ? decay : 1.0f) - step * mi / (sqrtf(vi) * unbias2 + eps);
    }
}
