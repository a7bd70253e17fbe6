// The loss and the update: softmax cross-entropy and AdamW. (kernels_common.cu comes
// first: see there.)

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

// the mean loss over the rows whose target is kept, by one warp (a fixed order: the same
// bits every run), float:
//   out[0] = sum_r nll[r] / count,   out[1] = count = #{r : targets[r] != ignore_index}
// (in place of two CuPy reductions, whose host side cost about 90 us each on an H200)
extern "C" __global__ void nll_mean(const float* __restrict__ nll,
                                    const long long* __restrict__ targets,
                                    float* __restrict__ out, int rows,
                                    long long ignore_index) {
    int lane = lane_id();
    float sum = 0.0f, count = 0.0f;
    for (int r = lane; r < rows; r += 32) {
        sum += nll[r];
        count += targets[r] != ignore_index ? 1.0f : 0.0f;
    }
    sum = warp_sum(sum);
    count = warp_sum(count);
    if (lane == 0) {
        out[0] = sum / count;
        out[1] = count;
    }
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
