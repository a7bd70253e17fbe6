"""The CUDA emulator (tests/emulated_cuda.py) that runs npgpt's kernels on the CPU: warps
and shuffles behave as on a GPU, and the mistakes it exists to catch are caught."""
import numpy as np
import pytest

from emulated_cuda import CompileError, EmulatedCudaError, RawModule, compiler_missing

if compiler_missing():
    pytest.skip(compiler_missing(), allow_module_level=True)

CODE = r"""
#define FULL 0xffffffffu

// out[r] = sum of row r, one warp per row, rows in a grid-stride loop over warps;
// lane r % 32 writes it, so every lane must hold the whole sum
extern "C" __global__ void row_sums(const float* __restrict__ x, float* __restrict__ out,
                                    int rows, int cols) {
    int lane = threadIdx.x % 32;
    int warps = gridDim.x * blockDim.x / 32;
    for (int r = (blockIdx.x * blockDim.x + threadIdx.x) / 32; r < rows; r += warps) {
        float s = 0.0f;
        for (int c = lane; c < cols; c += 32) s += x[(long long)r * cols + c];
        for (int offset = 16; offset > 0; offset >>= 1) s += __shfl_xor_sync(FULL, s, offset);
        if (lane == r % 32) out[r] = s;
    }
}

// out[i] = the linear id of thread i ^ mask, i = its id in the grid (any block shape)
extern "C" __global__ void partner_ids(long long* out, int mask) {
    unsigned t = (threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x;
    unsigned block = (blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
    long long id = block * (blockDim.x * blockDim.y * blockDim.z) + t;
    out[id] = __shfl_xor_sync(FULL, id, mask);
}

extern "C" __global__ void early_return(float* out) {
    if (threadIdx.x == 3) return;
    out[threadIdx.x] = __shfl_xor_sync(FULL, 1.0f, 1);
}

extern "C" __global__ void scale(const float* x, float* out, int n, float a) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = a * x[i];
}

extern "C" __global__ void add(const float* a, const float* b, float* out, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = a[i] + b[i];
}

extern "C" __global__ void write_one_past(float* out, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i <= n) out[i] = 1.0f;  // the bug: <=
}

extern "C" __global__ void read_one_past(const float* x, float* out, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = x[i + 1];  // the bug: i + 1 reads x[n]
}

extern "C" __global__ void write_const(const float* x) {
    if (threadIdx.x == 0) ((float*)x)[0] = 1.0f;
}
"""


@pytest.fixture(scope="module")
def module():
    return RawModule(code=CODE, options=("--std=c++17",))


def f32(n, seed=0):
    return np.random.default_rng(seed).standard_normal(n).astype(np.float32)


def test_warp_sums_over_several_warps_and_blocks(module):
    rows, cols = 37, 100  # more rows than the 3 blocks x 2 warps: the grid-stride loop runs
    x = f32(rows * cols).reshape(rows, cols)
    out = np.full(rows, np.nan, np.float32)
    module.get_function("row_sums")((3,), (64,), (x, out, np.int32(rows), np.int32(cols)))
    np.testing.assert_allclose(out, x.sum(axis=1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("grid, block, mask", [(1, 64, 16), ((2, 3), (16, 4), 31),
                                               (2, (8, 2, 4), 5)])
def test_lanes_are_consecutive_thread_ids_and_exchange_within_their_warp(module, grid, block,
                                                                         mask):
    n = int(np.prod(grid) * np.prod(block))
    out = np.full(n, -1, np.int64)
    module.get_function("partner_ids")(grid, block, (out, np.int32(mask)))
    np.testing.assert_array_equal(out, np.arange(n) ^ mask)


def test_a_lane_returning_while_its_warp_waits_at_a_shuffle_is_reported(module):
    with pytest.raises(EmulatedCudaError, match=r"early_return.*lane 3 returned while lanes "
                                                r"wait in __shfl_xor_sync"):
        module.get_function("early_return")(1, 32, (np.zeros(32, np.float32),))


def test_a_full_mask_shuffle_in_a_partial_warp_is_reported(module):
    with pytest.raises(EmulatedCudaError, match="partner_ids.*partial warp of 16 lanes"):
        module.get_function("partner_ids")(1, 48, (np.zeros(48, np.int64), np.int32(1)))


def test_scalars_must_be_numpy_scalars_of_the_parameters_type(module):
    x = f32(10)
    out = np.zeros(10, np.float32)
    kernel = module.get_function("scale")
    with pytest.raises(TypeError, match=r"scale: argument 2 \(int n\).*np.int32.*64-bit"):
        kernel(1, 32, (x, out, 10, np.float32(2)))
    with pytest.raises(TypeError, match=r"argument 3 \(float a\).*np.float32.*not float"):
        kernel(1, 32, (x, out, np.int32(10), 2.0))
    with pytest.raises(TypeError, match=r"argument 2 \(int n\).*np.int32.*not np.int64"):
        kernel(1, 32, (x, out, np.int64(10), np.float32(2)))
    kernel(1, 32, (x, out, np.int32(10), np.float32(2)))
    np.testing.assert_array_equal(out, 2 * x)


def test_arrays_must_have_the_pointees_dtype_and_be_contiguous(module):
    kernel = module.get_function("scale")
    out = np.zeros(10, np.float32)
    with pytest.raises(TypeError, match=r"argument 0 \(const float\* x\).*float32.*float64"):
        kernel(1, 32, (np.zeros(10), out, np.int32(10), np.float32(2)))
    with pytest.raises(ValueError, match=r"argument 0 .*not C-contiguous"):
        kernel(1, 32, (f32(20)[::2], out, np.int32(10), np.float32(2)))
    with pytest.raises(TypeError, match="takes 4 arguments"):
        kernel(1, 32, (f32(10), out, np.int32(10)))


def test_overlapping_arrays_are_refused_unless_both_are_const(module):
    x = f32(20)
    with pytest.raises(ValueError, match="arguments 0 and 1 overlap"):
        module.get_function("scale")(1, 32, (x[:10], x[5:15], np.int32(10), np.float32(2)))
    out = np.zeros(10, np.float32)
    module.get_function("add")(1, 32, (x[:10], x[:10], out, np.int32(10)))  # only read
    np.testing.assert_array_equal(out, 2 * x[:10])


def test_a_write_past_the_end_is_caught(module):
    out = np.zeros(10, np.float32)
    with pytest.raises(EmulatedCudaError, match=r"write_one_past wrote outside argument 0"):
        module.get_function("write_one_past")(1, 32, (out, np.int32(10)))
    module.get_function("write_one_past")(1, 32, (np.zeros(11, np.float32), np.int32(10)))


def test_a_read_past_the_end_reads_nan(module):
    out = np.zeros(10, np.float32)
    module.get_function("read_one_past")(1, 32, (f32(10), out, np.int32(10)))
    assert np.isfinite(out[:9]).all() and np.isnan(out[9])


def test_a_change_to_a_const_array_is_caught(module):
    x = np.zeros(4, np.float32)
    with pytest.raises(EmulatedCudaError, match="write_const changed const argument 0"):
        module.get_function("write_const")(1, 32, (x,))
    assert x[0] == 0


@pytest.mark.parametrize("body", ["__syncthreads();", "atomicAdd(out, 1.0f);",
                                  "__shared__ float s[32]; s[0] = 1.0f;"])
def test_what_the_emulation_cannot_run_does_not_compile(body):
    code = 'extern "C" __global__ void k(float* out) { %s }' % body
    word = body.split("(")[0].split()[0]
    with pytest.raises(CompileError, match=word):
        RawModule(code)
