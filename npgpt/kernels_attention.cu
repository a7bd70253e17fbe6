// Attention's kernels: the causal softmax and its backward. (kernels_common.cu comes
// first: see there.)

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
