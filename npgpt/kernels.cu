// Fused CUDA kernels for npgpt on a GPU (compiled by CuPy's RawModule; see kernels.py).
//
// Each kernel does in one pass over memory what the plain array code in ops.py / optim.py
// does in several; the formulas are ops.py's, and tests/test_kernels.py checks each kernel
// against them. float32 only (float64 models use the plain code).
//
// Two launch shapes (kernels.py chooses the grid):
//   row kernels:  one warp (32 threads) per row of C (or T, or V) elements, WARPS warps
//                 per block; a row's sums and maxima are combined across the warp with
//                 __shfl_xor_sync (after it every lane holds the whole row's result).
//   flat kernels: one thread per element, in a grid-stride loop.
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

// the row this warp owns and this thread's lane in it
__device__ __forceinline__ long long warp_row() {
    return (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
}
__device__ __forceinline__ int lane_id() { return threadIdx.x % 32; }

// ---------------------------------------------------------------------------------------
// LayerNorm, one row of C per warp
//   mean = sum(x)/C;  var = sum((x - mean)^2)/C;  rstd = 1/sqrt(var + eps)
//   xhat = (x - mean) * rstd;  out = xhat * w + b

extern "C" __global__ void layernorm_forward(
        const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ b,
        float* __restrict__ out, float* __restrict__ xhat, float* __restrict__ rstd,
        int rows, int C, float eps) {
    long long row = warp_row();
    if (row >= rows) return;
    int lane = lane_id();
    const float* xr = x + row * C;
    float sum = 0.0f;
    for (int c = lane; c < C; c += 32) sum += xr[c];
    float mean = warp_sum(sum) / C;
    float sq = 0.0f;
    for (int c = lane; c < C; c += 32) {
        float d = xr[c] - mean;
        sq += d * d;
    }
    float r = rsqrtf(warp_sum(sq) / C + eps);
    for (int c = lane; c < C; c += 32) {
        float h = (xr[c] - mean) * r;
        xhat[row * C + c] = h;
        out[row * C + c] = h * w[c] + b[c];
    }
    if (lane == 0) rstd[row] = r;
}

// dxhat = dout * w;  dx = rstd * (dxhat - mean_C(dxhat) - xhat * mean_C(dxhat * xhat))
// (dw and db, sums over rows, are left to a column reduction)
extern "C" __global__ void layernorm_backward(
        const float* __restrict__ dout, const float* __restrict__ xhat,
        const float* __restrict__ rstd, const float* __restrict__ w,
        float* __restrict__ dx, int rows, int C) {
    long long row = warp_row();
    if (row >= rows) return;
    int lane = lane_id();
    const float* dr = dout + row * C;
    const float* hr = xhat + row * C;
    float s = 0.0f, p = 0.0f;
    for (int c = lane; c < C; c += 32) {
        float dh = dr[c] * w[c];
        s += dh;
        p += dh * hr[c];
    }
    float mean_dxhat = warp_sum(s) / C;
    float mean_proj = warp_sum(p) / C;
    float r = rstd[row];
    for (int c = lane; c < C; c += 32)
        dx[row * C + c] = r * (dr[c] * w[c] - mean_dxhat - hr[c] * mean_proj);
}

// ---------------------------------------------------------------------------------------
// column sums of a (N, C) row-major matrix (a bias's or a LayerNorm weight's gradient),
// one level of a tree, one thread per (chunk s, column c), c fastest, so that a warp reads
// 32 neighbouring columns of each row:
//   part[s, c] = a[sR, c] + a[sR + 1, c] + ... + a[min(N, sR + R) - 1, c]     (in row order)
// kernels.py repeats it on part until one row is left: the order of every sum is fixed by
// N and R alone. (A GPU's generic reduction down the columns of (8192, 384) ran 10x slower
// than the memory allows: one column per block, strided reads.)

extern "C" __global__ void column_sums(const float* __restrict__ a, float* __restrict__ part,
                                       long long N, int C, int R) {
    long long n = (N + R - 1) / R * C;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        long long s = i / C, c = i % C;
        long long end = (s + 1) * R < N ? (s + 1) * R : N;
        float acc = 0.0f;
        for (long long r = s * R; r < end; ++r) acc += a[r * C + c];
        part[i] = acc;
    }
}

// ---------------------------------------------------------------------------------------
// tanh-GELU, one thread per element
//   u = k (x + a x^3);  t = tanh(u);  out = 0.5 x (1 + t)
//   dx = dout * (0.5 (1 + t) + 0.5 x (1 - t^2) k (1 + 3 a x^2))

#define GELU_K 0.7978845608028654f  // sqrt(2 / pi)
#define GELU_A 0.044715f

extern "C" __global__ void gelu_forward(const float* __restrict__ x, float* __restrict__ out,
                                        long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        float v = x[i];
        float t = tanhf(GELU_K * v * (1.0f + GELU_A * v * v));
        out[i] = 0.5f * v * (1.0f + t);
    }
}

extern "C" __global__ void gelu_backward(const float* __restrict__ dout,
                                         const float* __restrict__ x, float* __restrict__ dx,
                                         long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        float v = x[i];
        float t = tanhf(GELU_K * v * (1.0f + GELU_A * v * v));
        float du = GELU_K * (1.0f + 3.0f * GELU_A * v * v);
        dx[i] = dout[i] * (0.5f * (1.0f + t) + 0.5f * v * (1.0f - t * t) * du);
    }
}

// ---------------------------------------------------------------------------------------
// causal softmax of attention scores, in place, one row of T per warp
// row r of the (B*nh*T, T) scores is query position t = r % T, which sees keys j <= t:
//   att[j] = exp(s[j] - max) / sum_{k <= t} exp(s[k] - max) for j <= t, and 0 for j > t

extern "C" __global__ void causal_softmax(float* __restrict__ att, int rows, int T) {
    long long row = warp_row();
    if (row >= rows) return;
    int lane = lane_id();
    int t = (int)(row % T);
    float* a = att + row * T;
    float m = a[0];  // every row sees key 0
    for (int j = lane; j <= t; j += 32) m = fmaxf(m, a[j]);
    m = warp_max(m);
    float sum = 0.0f;
    for (int j = lane; j <= t; j += 32) {
        float e = expf(a[j] - m);
        a[j] = e;
        sum += e;
    }
    float inv = 1.0f / warp_sum(sum);
    for (int j = lane; j < T; j += 32) a[j] = j <= t ? a[j] * inv : 0.0f;
}

// softmax backward with the attention dropout, in place, one row of T per warp:
//   ds = att * (da * mask - rowdot)      (ops.causal_softmax_backward)
// row r = ((b nh + h) T + t) is query position t; its rowdot_i = dy_i . y_i is stored
// (B, T, nh) and read once per row. Keys j > t have att = 0: ds is 0 there, and
// neither att nor da is read. has_mask = 0: no dropout (mask is not read).
extern "C" __global__ void causal_softmax_backward(
        float* __restrict__ ds, const float* __restrict__ att,
        const float* __restrict__ rowdot, const float* __restrict__ mask, int has_mask,
        int rows, int T, int nh) {
    long long row = warp_row();
    if (row >= rows) return;
    int lane = lane_id();
    long long t = row % T, h = (row / T) % nh, b = row / ((long long)T * nh);
    float rd = rowdot[(b * T + t) * nh + h];
    float* d = ds + row * T;
    const float* a = att + row * T;
    const float* m = mask + (has_mask ? row * T : 0);
    for (int j = lane; j < T; j += 32) {
        if (j <= t) {
            float da = has_mask ? d[j] * m[j] : d[j];
            d[j] = a[j] * (da - rd);
        } else {
            d[j] = 0.0f;
        }
    }
}

// ---------------------------------------------------------------------------------------
// softmax cross-entropy, one row of V logits per warp
//   probs = softmax(z);  nll = log(sum exp(z - max)) - (z[t] - max);  nll = 0 if t ignored

extern "C" __global__ void cross_entropy_forward(
        const float* __restrict__ logits, const long long* __restrict__ targets,
        float* __restrict__ probs, float* __restrict__ nll, int rows, int V,
        long long ignore_index) {
    long long row = warp_row();
    if (row >= rows) return;
    int lane = lane_id();
    const float* z = logits + row * V;
    float* p = probs + row * V;
    float m = z[0];
    for (int j = lane; j < V; j += 32) m = fmaxf(m, z[j]);
    m = warp_max(m);
    float sum = 0.0f;
    for (int j = lane; j < V; j += 32) {
        float e = expf(z[j] - m);
        p[j] = e;
        sum += e;
    }
    sum = warp_sum(sum);
    float inv = 1.0f / sum;
    for (int j = lane; j < V; j += 32) p[j] *= inv;
    if (lane == 0) {
        long long t = targets[row];
        nll[row] = t == ignore_index ? 0.0f : logf(sum) - (z[t] - m);
    }
}

// dlogits = scale * (probs - onehot(t)) for kept rows, 0 for ignored ones; one thread per
// element; scale = dloss / (number of kept rows), a device scalar (read without a sync)
extern "C" __global__ void cross_entropy_backward(
        const float* __restrict__ probs, const long long* __restrict__ targets,
        const float* __restrict__ scale, float* __restrict__ dlogits, long long n, int V,
        long long ignore_index) {
    float s = scale[0];
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        long long t = targets[i / V];
        float d = probs[i] - ((i % V) == t ? 1.0f : 0.0f);
        dlogits[i] = t == ignore_index ? 0.0f : d * s;
    }
}

// ---------------------------------------------------------------------------------------
// AdamW over a stretch of the flat parameter buffer, one thread per element (optim.py):
//   p *= decay                                (decay = 1 - lr wd for matrices, else 1)
//   m = b1 m + (1 - b1) g;   v = b2 v + (1 - b2) g^2
//   p -= lr_t * m / (sqrt(v) / bias2_sqrt + eps)     (lr_t = lr / (1 - b1^t))

extern "C" __global__ void adamw(float* __restrict__ p, const float* __restrict__ g,
                                 float* __restrict__ m, float* __restrict__ v, long long n,
                                 float decay, float b1, float b2, float eps, float lr_t,
                                 float inv_bias2_sqrt) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        float gi = g[i];
        float mi = b1 * m[i] + (1.0f - b1) * gi;
        float vi = b2 * v[i] + (1.0f - b2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        p[i] = p[i] * decay - lr_t * mi / (sqrtf(vi) * inv_bias2_sqrt + eps);
    }
}
