"""gemm.batched_matmul: matrices and stacks of them through cuBLAS (gemmEx and
gemmStridedBatchedEx), views and transposed views passed as they are. On the stand-in GPU
the call is emulated on the same memory (stand_in_gpu.EmulatedCublas, column-major as
cuBLAS), so these tests check the row-major to column-major mapping: flags, leading
dimensions, strides and offsets."""
import numpy as np
import pytest

import stand_in_gpu
from npgpt import attention, gemm
from npgpt.arrays import matmul
from npgpt.backend import gpu_available, to_numpy
from npgpt.gemm import batched_matmul

rng = np.random.default_rng(0)
B, nh, T, hs = 3, 4, 10, 6
C = nh * hs


@pytest.fixture
def fake(monkeypatch):
    return stand_in_gpu.install(monkeypatch)


@pytest.fixture(params=["stand-in", "cuda"])
def gpu(request, monkeypatch):
    """The stand-in GPU (emulated cuBLAS), or CuPy on a real GPU (skipped without one)."""
    if request.param == "stand-in":
        return stand_in_gpu.install(monkeypatch)
    if not gpu_available():
        pytest.skip("no CuPy-visible NVIDIA GPU here")
    monkeypatch.delenv("CUPY_TF32", raising=False)
    import cupy
    return cupy


def device(fake, a, dtype=np.float32):
    return fake.asarray(np.asarray(a, dtype=dtype))


def heads(x):
    """(B,T,nh*hs) -> the (B,nh,T,hs) view of its heads (non-contiguous)."""
    return x.reshape(B, T, nh, hs).transpose(0, 2, 1, 3)


def cases(fake, dtype):
    """(name, a, b, out): the layouts attention hands over, and a few more."""
    qkv = device(fake, rng.standard_normal((B, T, 3 * C)), dtype)
    q, k, v = (heads(qkv[..., i * C:(i + 1) * C]) for i in range(3))  # (B,nh,T,hs) views
    att = device(fake, rng.standard_normal((B, nh, T, T)), dtype)
    y = fake.zeros((B, T, C), dtype=dtype)
    dqkv = fake.zeros((B, T, 3 * C), dtype=dtype)
    return [
        ("q k^T: head views, k transposed", q, k.transpose(0, 1, 3, 2), None),
        ("att v into y's (B,T,nh,hs) layout", att, v, heads(y)),
        ("att^T dy: a transposed contiguous stack", att.transpose(0, 1, 3, 2), q,
         heads(dqkv[..., C:2 * C])),
        ("a tile: rows 4..9 against keys 0..9", att[:, :, 4:], k, heads(dqkv[..., :C])[:, :, 4:]),
        ("batch rows 1..2 only", q[1:], k[1:].transpose(0, 1, 3, 2), None),
        ("3-D contiguous", device(fake, rng.standard_normal((5, 7, 3)), dtype),
         device(fake, rng.standard_normal((5, 3, 2)), dtype), None),
        ("one row, one column", device(fake, rng.standard_normal((2, 3, 1, 4)), dtype),
         device(fake, rng.standard_normal((2, 3, 4, 1)), dtype), None),
        # single products, as the linear layers' x @ w, dout @ w^T and x^T @ dout
        ("2-D", qkv.reshape(B * T, 3 * C), device(fake, rng.standard_normal((3 * C, 5)), dtype),
         None),
        ("2-D, b a transposed view", qkv.reshape(B * T, 3 * C),
         device(fake, rng.standard_normal((5, 3 * C)), dtype).T, None),
        ("2-D, a a transposed view, into a block of out", qkv.reshape(B * T, 3 * C).T,
         dqkv.reshape(B * T, 3 * C)[:, :C], fake.zeros((3 * C, 2 * C), dtype=dtype)[:, C:]),
    ]


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_every_layout_equals_numpy(gpu, dtype):
    """Bit for bit on the stand-in; to float32 (float16) rounding on a real GPU."""
    calls = getattr(gpu.cuda.cublas, "calls", None)  # the stand-in's record
    for name, a, b, out in cases(gpu, dtype):
        before = None if calls is None else len(calls)
        got = batched_matmul(gpu, a, b, out)
        assert got is not None, name
        if calls is not None:
            assert len(calls) > before, name
        if out is not None:
            assert got is out, name
        want = np.matmul(to_numpy(a).astype(np.float32), to_numpy(b).astype(np.float32))
        assert got.dtype == dtype, name
        if calls is not None:
            np.testing.assert_array_equal(to_numpy(got), want.astype(dtype), err_msg=name)
        else:
            tol = (1e-5 if dtype == np.float32 else 2e-3) * np.abs(want).max()
            np.testing.assert_allclose(to_numpy(got), want, rtol=0, atol=tol, err_msg=name)


def test_a_view_out_gets_its_block_and_nothing_else(fake):
    qkv = device(fake, rng.standard_normal((B, T, 3 * C)))
    q, k = heads(qkv[..., :C]), heads(qkv[..., C:2 * C])
    y = fake.full((B, T, C), 7.0, dtype=np.float32)
    out = heads(y)[:, :, 2:5]  # rows 2..4 of every head
    batched_matmul(fake, q[:, :, 2:5], k.transpose(0, 1, 3, 2)[..., :hs], out)
    untouched = np.ones((B, T, C), dtype=bool)
    untouched[:, 2:5] = False
    assert (y.view(np.ndarray)[untouched] == 7.0).all()


def test_a_layout_is_worked_out_once_and_serves_other_arrays(fake):
    gemm._PLANS.clear()
    for _ in range(3):  # new arrays (new addresses) in the same layout
        qkv = device(fake, rng.standard_normal((B, T, 3 * C)))
        q, k = heads(qkv[..., :C]), heads(qkv[..., C:2 * C])
        out = fake.zeros((B, nh, T, 2 * T), dtype=np.float32)[..., T:]  # (B,nh,T,T) block
        got = batched_matmul(fake, q, k.transpose(0, 1, 3, 2), out)
        want = np.matmul(q.view(np.ndarray), k.view(np.ndarray).transpose(0, 1, 3, 2))
        np.testing.assert_allclose(got.view(np.ndarray), want, rtol=1e-6, atol=1e-6)
    assert len(gemm._PLANS) == 1


def test_tf32_when_cupy_would_use_it(fake, monkeypatch):
    a = device(fake, rng.standard_normal((2, 3, 4)))
    b = device(fake, rng.standard_normal((2, 4, 5)))
    calls = fake.cuda.cublas.calls
    batched_matmul(fake, a, b, None)
    monkeypatch.setenv("CUPY_TF32", "1")
    batched_matmul(fake, a, b, None)
    batched_matmul(fake, a.astype(np.float16), b.astype(np.float16), None)
    assert calls[-3:] == [68, 77, 68]  # float32, TF32, float16 with float32 sums


def test_what_cublas_cannot_take_goes_to_matmul(fake):
    a = device(fake, rng.standard_normal((2, 3, 4)))
    b = device(fake, rng.standard_normal((2, 4, 5)))
    assert batched_matmul(fake, a.astype(np.float64), b.astype(np.float64), None) is None
    assert batched_matmul(fake, a[:1], b, None) is None  # broadcast batch shapes
    wide = device(fake, rng.standard_normal((2, 3, 8)))
    assert batched_matmul(fake, wide[..., ::2], b, None) is None  # no unit stride
    assert batched_matmul(fake, a, b, fake.zeros((2, 5, 3)).transpose(0, 2, 1)) is None
    # and arrays.matmul still gives the product
    np.testing.assert_allclose(matmul(wide[..., ::2], b).view(np.ndarray),
                               np.matmul(wide.view(np.ndarray)[..., ::2], b.view(np.ndarray)),
                               rtol=1e-6)


@pytest.mark.parametrize("tile", [None, 4])
def test_attention_on_a_gpu_sends_every_product_to_cublas(fake, monkeypatch, tile):
    def no_batched_matmul(a, b, out=None):
        assert a.ndim == 2, "a batched product fell back to xp.matmul (CuPy would copy)"
        return np.matmul(a, b, out=out)

    monkeypatch.setattr(fake, "matmul", no_batched_matmul, raising=False)
    qkv = device(fake, rng.standard_normal((B, T, 3 * C)))
    dy = device(fake, rng.standard_normal((B, T, C)))
    y, cache = attention.attention_forward(qkv, nh, tile=tile)
    (dqkv,) = attention.attention_backward(dy, cache)
    y_ref, cache_ref = attention.attention_forward(qkv.view(np.ndarray), nh, tile=tile)
    (dqkv_ref,) = attention.attention_backward(dy.view(np.ndarray), cache_ref)
    np.testing.assert_allclose(y.view(np.ndarray), y_ref, rtol=0, atol=1e-6)
    np.testing.assert_allclose(dqkv.view(np.ndarray), dqkv_ref, rtol=0, atol=1e-5)
