// Attention's kernels: the heads' layout, the causal softmax and its backward.
// (kernels_common.cu comes first: see there.)

// ---------------------------------------------------------------------------------------
// the heads' layout, one row of hs elements per warp (a row kernel). c_attn's output holds,
// for each position, `parts` blocks of C = nh hs columns (q | k | v: parts = 3);
// attention's batched products want each (part, batch, head) matrix of (T, hs)
// contiguous, so that cuBLAS multiplies all B nh of them in one launch:
//   tokens (B, T, parts, nh, hs)  <->  heads (parts, B, nh, T, hs)
//   to_heads = 1:  heads[s, b, h, t, :] = tokens[b, t, s, h, :] * (s == 0 ? scale0 : 1)
//   to_heads = 0:  tokens[b, t, s, h, :] = heads[s, b, h, t, :] * (s == 0 ? scale0 : 1)
// (part 0 is q, or dq on the way back: attention's 1/sqrt(hs) rides along; each result is
// rounded once). The warp of heads' row r = ((s B + b) nh + h) T + t works out (s, b, h, t)
// once (64-bit divisions cost tens of instructions: once per element they made this a
// compute-bound kernel), then its lanes copy the row, hs contiguous elements on both sides.

template <typename T>
__device__ __forceinline__ void heads_transpose_rows(
        const T* __restrict__ src, T* __restrict__ dst, long long rows, int B, int T_, int nh,
        int hs, int parts, float scale0, int to_heads) {
    long long row = warp_row();
    if (row >= rows) return;
    long long t = row % T_, bh = row / T_;
    long long h = bh % nh, sb = bh / nh;
    long long b = sb % B, s = sb / B;
    long long i0 = row * hs;                                          // heads' index
    long long j0 = ((b * T_ + t) * parts + s) * ((long long)nh * hs) + h * hs;  // tokens'
    float f = s == 0 ? scale0 : 1.0f;
    for (int d = lane_id(); d < hs; d += 32) {
        if (to_heads) st(dst, i0 + d, ld(src, j0 + d) * f);
        else st(dst, j0 + d, ld(src, i0 + d) * f);
    }
}

extern "C" __global__ void heads_transpose(const float* __restrict__ src,
                                           float* __restrict__ dst, long long rows, int B,
                                           int T, int nh, int hs, int parts, float scale0,
                                           int to_heads) {
    heads_transpose_rows(src, dst, rows, B, T, nh, hs, parts, scale0, to_heads);
}

extern "C" __global__ void heads_transpose_f16(const half_t* __restrict__ src,
                                               half_t* __restrict__ dst, long long rows,
                                               int B, int T, int nh, int hs, int parts,
                                               float scale0, int to_heads) {
    heads_transpose_rows(src, dst, rows, B, T, nh, hs, parts, scale0, to_heads);
}

// ---------------------------------------------------------------------------------------
// the dot product of each row of two (rows, n) matrices, one row per warp, in float:
//   out[r] = sum_j a[r, j] b[r, j]
// (attention's backward: rowdot_i = dy_i . y_i for each (batch, head, query) row)

template <typename T>
__device__ __forceinline__ void row_dots_rows(const T* __restrict__ a, const T* __restrict__ b,
                                              float* __restrict__ out, int rows, int n) {
    long long row = warp_row();
    if (row >= rows) return;
    long long r0 = row * n;
    float sum = 0.0f;
    for (int j = lane_id(); j < n; j += 32) sum += ld(a, r0 + j) * ld(b, r0 + j);
    sum = warp_sum(sum);
    if (lane_id() == 0) out[row] = sum;
}

extern "C" __global__ void row_dots(const float* __restrict__ a, const float* __restrict__ b,
                                    float* __restrict__ out, int rows, int n) {
    row_dots_rows(a, b, out, rows, n);
}

extern "C" __global__ void row_dots_f16(const half_t* __restrict__ a,
                                        const half_t* __restrict__ b, float* __restrict__ out,
                                        int rows, int n) {
    row_dots_rows(a, b, out, rows, n);
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
// row r = ((b nh + h) T + t) is query position t; its rowdot_i = dy_i . y_i is rowdot[r]
// (float, (B, nh, T) as row_dots writes it), read once per row. Keys j > t have att = 0:
// ds is 0 there, and neither att nor da is read. has_mask = 0: no dropout (mask unread).
template <typename T>
__device__ __forceinline__ void causal_softmax_backward_rows(
        T* __restrict__ ds, const T* __restrict__ att, const float* __restrict__ rowdot,
        const T* __restrict__ mask, int has_mask, int rows, int T_) {
    long long row = warp_row();
    if (row >= rows) return;
    int lane = lane_id();
    long long t = row % T_;
    float rd = rowdot[row];
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
        int rows, int T) {
    causal_softmax_backward_rows(ds, att, rowdot, mask, has_mask, rows, T);
}

extern "C" __global__ void causal_softmax_backward_f16(
        half_t* __restrict__ ds, const half_t* __restrict__ att,
        const float* __restrict__ rowdot, const half_t* __restrict__ mask, int has_mask,
        int rows, int T) {
    causal_softmax_backward_rows(ds, att, rowdot, mask, has_mask, rows, T);
}
