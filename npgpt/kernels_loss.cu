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

// dlogits = scale * (probs - onehot(t)) for kept rows, 0 for ignored ones; one row of V
// per warp (a row kernel: the row's target is read once, and no 64-bit division per
// element works out which row an element is in); scale = dloss / (number of kept rows),
// a float device scalar (read without a sync)
template <typename T>
__device__ __forceinline__ void cross_entropy_backward_rows(
        const T* __restrict__ probs, const long long* __restrict__ targets,
        const float* __restrict__ scale, T* __restrict__ dlogits, int rows, int V,
        long long ignore_index) {
    long long row = warp_row();
    if (row >= rows) return;
    long long t = targets[row], r0 = row * V;
    float s = scale[0];
    for (int j = lane_id(); j < V; j += 32)
        st(dlogits, r0 + j,
           t == ignore_index ? 0.0f : (ld(probs, r0 + j) - (j == t ? 1.0f : 0.0f)) * s);
}

extern "C" __global__ void cross_entropy_backward(
        const float* __restrict__ probs, const long long* __restrict__ targets,
        const float* __restrict__ scale, float* __restrict__ dlogits, int rows, int V,
        long long ignore_index) {
    cross_entropy_backward_rows(probs, targets, scale, dlogits, rows, V, ignore_index);
}

extern "C" __global__ void cross_entropy_backward_f16(
        const half_t* __restrict__ probs, const long long* __restrict__ targets,
        const float* __restrict__ scale, half_t* __restrict__ dlogits, int rows, int V,
        long long ignore_index) {
    cross_entropy_backward_rows(probs, targets, scale, dlogits, rows, V, ignore_index);
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

// ---------------------------------------------------------------------------------------
// the gradients' global norm and what a step does with it (fused_optim.py), in three
// launches over the float32 flat gradient buffer g (n elements) instead of one CuPy
// launch per scalar expression:
// sum_squares, one warp per chunk of `chunk` elements (a row kernel):
//   parts[w] = sum over the chunk's elements of g[i]^2

extern "C" __global__ void sum_squares(const float* __restrict__ g, float* __restrict__ parts,
                                       long long n, int chunk) {
    long long w = warp_row(), begin = w * chunk;
    if (begin >= n) return;
    long long end = begin + chunk < n ? begin + chunk : n;
    float acc = 0.0f;
    for (long long i = begin + lane_id(); i < end; i += 32) acc += g[i] * g[i];
    acc = warp_sum(acc);
    if (lane_id() == 0) parts[w] = acc;
}

// the sum of the parts, by one warp in a fixed order (each lane every 32nd part)
__device__ __forceinline__ float sum_parts(const float* __restrict__ parts, int nparts) {
    float acc = 0.0f;
    for (int w = lane_id(); w < nparts; w += 32) acc += parts[w];
    return warp_sum(acc);
}

// clipping (optim.clip_grad_norm), one warp:
//   norm = sqrt(sum g^2);  mul = [1, min(1, max_norm / (norm + 1e-6)), 0]  (see scale_grads)
extern "C" __global__ void clip_scalars(const float* __restrict__ parts, int nparts,
                                        float max_norm, float* __restrict__ norm,
                                        float* __restrict__ mul) {
    float total = sum_parts(parts, nparts);
    if (lane_id() != 0) return;
    float nrm = sqrtf(total);
    norm[0] = nrm;
    mul[0] = 1.0f;
    mul[1] = fminf(1.0f, max_norm / (nrm + 1e-6f));
    mul[2] = 0.0f;
}

// the rest of a mixed-precision step's scalars (mixed.py, optim.py), one warp; g holds
// scale x the gradients:
//   skip = sum g^2 is inf or NaN            (an inf or NaN anywhere makes it one)
//   mul = [1 / scale, clip, skip]           clip = min(1, max_norm / (norm + 1e-6)) of the
//                                           unscaled norm (1 if max_norm = 0 or skip)
//   keep = 1 - skip;  t += keep;  tt = max(t, 1)
//   coef = [1 - keep lr wd, keep (1 - b1), keep (1 - b2), 1 / sqrt(1 - b2^tt),
//           keep lr / (1 - b1^tt)]          (adamw_skippable's; in double, as optim.py's
//                                           array code computes them, rounded to float)
//   skipped += skip;  good = skip ? 0 : good + 1;  grow = good >= interval
//   scale *= skip ? backoff : (grow ? growth : 1);  good = grow ? 0 : good
// (the scale is a power of two: g / scale is exact, and so is the unscaled sum of squares)
extern "C" __global__ void mixed_scalars(
        const float* __restrict__ parts, int nparts, float max_norm, double lr, double b1,
        double b2, double wd, long long interval, double growth, double backoff,
        float* __restrict__ scale, long long* __restrict__ good_steps,
        long long* __restrict__ skipped, long long* __restrict__ t,
        unsigned char* __restrict__ skip_out, float* __restrict__ mul,
        float* __restrict__ coef) {
    float total = sum_parts(parts, nparts);
    if (lane_id() != 0) return;
    int skip = !(total - total == 0.0f);  // inf - inf and NaN - NaN are NaN: not finite
    float inv = 1.0f / scale[0];
    float norm = skip ? 0.0f : sqrtf(total) * inv;
    mul[0] = inv;
    mul[1] = max_norm > 0.0f ? fminf(1.0f, max_norm / (norm + 1e-6f)) : 1.0f;
    mul[2] = (float)skip;
    skip_out[0] = (unsigned char)skip;
    long long keep = 1 - skip;
    t[0] += keep;
    double tt = (double)(t[0] > 1 ? t[0] : 1);
    coef[0] = (float)(1.0 - keep * lr * wd);
    coef[1] = (float)(keep * (1.0 - b1));
    coef[2] = (float)(keep * (1.0 - b2));
    coef[3] = (float)(1.0 / sqrt(1.0 - pow(b2, tt)));
    coef[4] = (float)(keep * lr / (1.0 - pow(b1, tt)));
    skipped[0] += skip;
    long long good = skip ? 0 : good_steps[0] + 1;
    int grow = good >= interval;
    scale[0] = scale[0] * (float)(skip ? backoff : (grow ? growth : 1.0));
    good_steps[0] = grow ? 0 : good;
}

// the gradients scaled in place, one thread per element:
//   g = mul[2] != 0 ? 0 : (g * mul[0]) * mul[1]
// (unscaled, exactly, then clipped; a skipped step's gradients, which may hold an inf,
// become 0, so that AdamW's keep = 0 multiplies finite numbers)
extern "C" __global__ void scale_grads(float* __restrict__ g, const float* __restrict__ mul,
                                       long long n) {
    float a = mul[0], b = mul[1];
    int zero = mul[2] != 0.0f;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        g[i] = zero ? 0.0f : (g[i] * a) * b;
}
