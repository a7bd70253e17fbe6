"""Batched matrix products on a GPU: npgpt's (cuBLAS direct, npgpt/gemm.py) against CuPy's.

Attention multiplies stacks of B x nh matrices (q k^T and att v). CuPy's batched matmul
multiplies float32 without TF32 and float16 by way of float32 copies (issue 17; measured
on an H200: float16 at 11 TFLOP/s, a tenth of PyTorch's bmm). npgpt's matmul hands such
stacks to cublasGemmStridedBatchedEx itself. This times, for the attention products of a
config: npgpt float32, npgpt float32 with TF32, npgpt float16, CuPy's float32 and float16
batched matmul, and PyTorch's float16 bmm on the same GPU as the reference. One line per
product; then the fused attention's forward + backward, its products over whole (T,T)
rows against query tiles (fused_attention.GPU_TILE rows: the blocks above the diagonal
skipped, plain float32's default), in float32, TF32 and float16.

    python benchmarks/gpu_products.py                    # lecture: B 64, nh 6, T 256, hs 64
    python benchmarks/gpu_products.py --device cpu       # dry run with NumPy, tiny shapes
"""
import argparse
import contextlib
import os
import time

import common  # noqa: F401 - the repository on sys.path
from common import np

from npgpt import fused_attention, ops
from npgpt.arrays import Workspace


def timed(fn, sync, repeats):
    fn()
    sync()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return 1e3 * (time.perf_counter() - t) / repeats


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["gpu", "cpu"], default="gpu")
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    if args.device == "gpu":
        import cupy as xp
        sync = xp.cuda.Device().synchronize
        B, nh, T, hs = 64, 6, 256, 64
    else:
        xp, sync = np, (lambda: None)
        B, nh, T, hs = 2, 2, 32, 16
    rng = np.random.default_rng(0)
    shapes = {"q k^T": ((B * nh, T, hs), (B * nh, hs, T)),
              "att v": ((B * nh, T, T), (B * nh, T, hs))}
    torch = None
    if args.device == "gpu":
        try:
            import torch
        except ImportError:
            pass
    for name, (sa, sb) in shapes.items():
        a32 = xp.asarray(rng.standard_normal(sa), dtype=xp.float32)
        b32 = xp.asarray(rng.standard_normal(sb), dtype=xp.float32)
        a16, b16 = a32.astype(xp.float16), b32.astype(xp.float16)
        out16 = xp.empty((sa[0], sa[1], sb[2]), dtype=xp.float16)

        def tf32():
            with tf32_env(True):
                return ops.matmul(a32, b32)

        ms = {"npgpt float32": timed(lambda: ops.matmul(a32, b32), sync, args.repeats),
              "npgpt TF32": timed(tf32, sync, args.repeats),
              "npgpt float16": timed(lambda: ops.matmul(a16, b16, out=out16), sync,
                                     args.repeats),
              "CuPy float32": timed(lambda: xp.matmul(a32, b32), sync, args.repeats),
              "CuPy float16": timed(lambda: xp.matmul(a16, b16), sync, args.repeats)}
        if torch is not None and torch.cuda.is_available():
            ta = torch.as_tensor(np.asarray(a16.get()), device="cuda")
            tb = torch.as_tensor(np.asarray(b16.get()), device="cuda")
            ms["torch float16 bmm"] = timed(lambda: torch.bmm(ta, tb), torch.cuda.synchronize,
                                            args.repeats)
        flops = 2.0 * sa[0] * sa[1] * sa[2] * sb[2]
        exact = a16.astype(xp.float64) @ b16.astype(xp.float64)
        err = float(xp.abs(ops.matmul(a16, b16) - exact).max() / xp.abs(exact).max())
        print(f"{name} {sa} @ {sb}: " + ", ".join(
            f"{k} {v:.3f} ms ({flops / v / 1e9:.1f} TFLOP/s)" for k, v in ms.items())
            + f"; npgpt float16 max error {err:.1e} of the largest entry")
    if args.device == "gpu":
        attention_tiles(xp, sync, (B, nh, T, hs), args.repeats)


@contextlib.contextmanager
def tf32_env(on):
    """CUPY_TF32 set (on) or unset in the block: npgpt's products read it at each call."""
    before = os.environ.pop("CUPY_TF32", None)
    if on:
        os.environ["CUPY_TF32"] = "1"
    try:
        yield
    finally:
        os.environ.pop("CUPY_TF32", None)
        if before is not None:
            os.environ["CUPY_TF32"] = before


def attention_tiles(xp, sync, shape, repeats):
    """One line: the fused attention (forward + backward) on whole rows against query
    tiles of fused_attention.GPU_TILE rows, timed in turn, in float32, TF32 and float16
    (the model uses tiles in plain float32 only: this says whether the others should)."""
    B, nh, T, hs = shape
    rng = np.random.default_rng(1)
    qkv = rng.standard_normal((B, T, 3 * nh * hs))
    dy = rng.standard_normal((B, T, nh * hs))
    parts = []
    for name, dtype, on in [("float32", xp.float32, False), ("TF32", xp.float32, True),
                            ("float16", xp.float16, False)]:
        q, d = xp.asarray(qkv, dtype=dtype), xp.asarray(dy, dtype=dtype)
        ms = []
        for tile in (None, fused_attention.GPU_TILE):
            fws, bws = Workspace(), Workspace()

            def step():
                _, cache = fused_attention.attention_forward(q, nh, None, fws, tile=tile)
                fused_attention.attention_backward(d, cache, bws, tile=tile)

            with tf32_env(on):
                ms.append(timed(step, sync, repeats))
        parts.append(f"{name} {ms[0]:.3f} / {ms[1]:.3f} ms ({ms[0] / ms[1]:.2f}x)")
    print(f"fused attention, forward + backward, (B, nh, T, hs) = {shape}, whole rows / "
          f"tiles of {fused_attention.GPU_TILE} rows: " + ", ".join(parts))


if __name__ == "__main__":
    main()
