// The layers' kernels: a linear layer's bias and its gradient (column sums), the token
// embedding's gradient, LayerNorm, GELU. (kernels_common.cu comes first: see there.)

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
//                         + res          (has_res: the skip connection's gradient)
// (dw and db, sums over rows, are left to a column reduction)
template <typename T>
__device__ __forceinline__ void layernorm_backward_rows(
        const T* __restrict__ dout, const T* __restrict__ xhat,
        const float* __restrict__ rstd, const T* __restrict__ w, const T* __restrict__ res,
        int has_res, T* __restrict__ dx, int rows, int C) {
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
                            - ld(xhat, r0 + c) * mean_proj)
                       + (has_res ? ld(res, r0 + c) : 0.0f));
}

extern "C" __global__ void layernorm_backward(
        const float* __restrict__ dout, const float* __restrict__ xhat,
        const float* __restrict__ rstd, const float* __restrict__ w,
        const float* __restrict__ res, int has_res, float* __restrict__ dx, int rows, int C) {
    layernorm_backward_rows(dout, xhat, rstd, w, res, has_res, dx, rows, C);
}

extern "C" __global__ void layernorm_backward_f16(
        const half_t* __restrict__ dout, const half_t* __restrict__ xhat,
        const float* __restrict__ rstd, const half_t* __restrict__ w,
        const half_t* __restrict__ res, int has_res, half_t* __restrict__ dx, int rows,
        int C) {
    layernorm_backward_rows(dout, xhat, rstd, w, res, has_res, dx, rows, C);
}

// ---------------------------------------------------------------------------------------
// column sums of a (N, C) row-major matrix (a bias's or a LayerNorm weight's gradient),
// one level of a tree, one thread per (chunk s, column c), c fastest, so that a warp reads
// 32 neighbouring columns of each row:
//   part[s, c] = a[sR, c] + a[sR + 1, c] + ... + a[min(N, sR + R) - 1, c]     (in row order)
// kernels.py repeats it on part until one row is left: the order of every sum is fixed by
// N and R alone. (A GPU's generic reduction down the columns of (8192, 384) ran 10x slower
// than the memory allows: one column per block, strided reads.) The sums are float for
// float16 rows too: only the first level reads half_t. add = 1 (the last level, one row):
//   part[0, c] = part[0, c] + (that sum)       (a gradient added into, as `grad += sum`)
// The last level may write two arrays: columns c < split to part, the others to part2
// at c - split (LayerNorm's db and dw, each added into its own gradient); split = C: part.

// thread i's share of a level: chunk s, column c, the chunk's rows begin .. end - 1
// (the last chunk may be short); a level has ceil(N / R) * C of them
struct ChunkColumn { long long s, c, begin, end; };

__device__ __forceinline__ ChunkColumn chunk_column(long long i, long long N, int C, int R) {
    long long s = i / C, end = (s + 1) * R < N ? (s + 1) * R : N;
    return {s, i % C, s * R, end};
}

template <typename T>
__device__ __forceinline__ void column_sums_level(const T* __restrict__ a, float* part,
                                                  float* part2, int split, long long N,
                                                  int C, int R, int add) {
    long long n = (N + R - 1) / R * C;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        ChunkColumn q = chunk_column(i, N, C, R);
        float acc = 0.0f;
        for (long long r = q.begin; r < q.end; ++r) acc += ld(a, r * C + q.c);
        float* dst = q.c < split ? part + i : part2 + (i - split);  // (split < C: one row)
        *dst = add ? *dst + acc : acc;  // add = 1: the last level adds into a gradient
    }
}

extern "C" __global__ void column_sums(const float* __restrict__ a, float* __restrict__ part,
                                       long long N, int C, int R, int add) {
    column_sums_level(a, part, part, C, N, C, R, add);
}

extern "C" __global__ void column_sums_f16(const half_t* __restrict__ a,
                                           float* __restrict__ part, long long N, int C,
                                           int R, int add) {
    column_sums_level(a, part, part, C, N, C, R, add);
}

extern "C" __global__ void column_sums_split(const float* __restrict__ a,
                                             float* __restrict__ part,
                                             float* __restrict__ part2, int split,
                                             long long N, int C, int R, int add) {
    column_sums_level(a, part, part2, split, N, C, R, add);
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
        ChunkColumn q = chunk_column(i, N, C, R);
        float db = 0.0f, dw = 0.0f;
        for (long long r = q.begin; r < q.end; ++r) {
            float d = ld(dout, r * C + q.c);
            db += d;
            dw += d * ld(xhat, r * C + q.c);
        }
        part[q.s * 2 * C + q.c] = db;
        part[q.s * 2 * C + C + q.c] = dw;
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
