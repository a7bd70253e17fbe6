"""Batched matrix products on a GPU: npgpt's (cuBLAS direct, npgpt/gemm.py) against CuPy's.

Attention multiplies stacks of B x nh matrices (q k^T and att v). CuPy's batched matmul
multiplies float32 without TF32 and float16 by way of float32 copies (issue 17; measured
on an H200: float16 at 11 TFLOP/s, a tenth of PyTorch's bmm). npgpt's matmul hands such
stacks to cublasGemmStridedBatchedEx itself. This times, for the attention products of a
config: npgpt float32, npgpt float32 with TF32, npgpt float16, CuPy's float32 and float16
batched matmul, and PyTorch's float16 bmm on the same GPU as the reference. One line per
product; then the fused attention's forward + backward in float32, its products over
whole (T,T) rows against query tiles (fused_attention.GPU_TILE rows, plain float32's default: the
blocks above the diagonal skipped).

    python benchmarks/gpu_products.py                    # lecture: B 64, nh 6, T 256, hs 64
    python benchmarks/gpu_products.py --device cpu       # dry run with NumPy, tiny shapes
"""
import argparse
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
            before = os.environ.get("CUPY_TF32")
            os.environ["CUPY_TF32"] = "1"  # read by npgpt's batched products at each call
            try:
                return ops.matmul(a32, b32)
            finally:
                if before is None:
                    del os.environ["CUPY_TF32"]
                else:
                    os.environ["CUPY_TF32"] = before

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


def attention_tiles(xp, sync, shape, repeats):
    """One line: the fused float32 attention (forward + backward) on whole rows and in
    query tiles of fused_attention.GPU_TILE rows, timed in turn."""
    B, nh, T, hs = shape
    rng = np.random.default_rng(1)
    qkv = xp.asarray(rng.standard_normal((B, T, 3 * nh * hs)), dtype=xp.float32)
    dy = xp.asarray(rng.standard_normal((B, T, nh * hs)), dtype=xp.float32)
    ms = {}
    tiles = [("whole rows", None), (f"tiles of {fused_attention.GPU_TILE}", fused_attention.GPU_TILE)]
    for label, tile in tiles:
        fws, bws = Workspace(), Workspace()

        def step():
            _, cache = fused_attention.attention_forward(qkv, nh, None, fws, tile=tile)
            fused_attention.attention_backward(dy, cache, bws, tile=tile)

        ms[label] = timed(step, sync, repeats)
    (a, ta), (b, tb) = ms.items()
    print(f"fused attention float32, forward + backward, (B, nh, T, hs) = {shape}: "
          f"{a} {ta:.3f} ms, {b} {tb:.3f} ms: {ta / tb:.2f}x")


if __name__ == "__main__":
    main()
