"""Batched float16 matrix products on a GPU: does CuPy's batched float16 matmul pay?

Issue 17 notes that CuPy's batched (3-D and more) float16 products may be computed by
upcasting to float32, which would cost float16 its speed in attention (q k^T and att v are
products over B x nh matrices). This times, for the attention products of a config, on
CuPy: float32 batched, float16 batched, and float16 as one 2-D product per (batch, head);
PyTorch's float16 bmm on the same GPU is the reference. One line per product.

    python benchmarks/gpu_products.py                    # lecture: B 64, nh 6, T 256, hs 64
    python benchmarks/gpu_products.py --device cpu       # dry run with NumPy, tiny shapes
"""
import argparse
import time

import common  # noqa: F401 - the repository on sys.path
from common import np

from npgpt import ops


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

        def per_matrix():
            for i in range(sa[0]):
                ops.matmul(a16[i], b16[i], out=out16[i])

        ms = {"float32 batched": timed(lambda: ops.matmul(a32, b32), sync, args.repeats),
              "float16 batched": timed(lambda: ops.matmul(a16, b16, out=out16), sync,
                                       args.repeats),
              f"float16, {sa[0]} 2-D products": timed(per_matrix, sync, max(1, args.repeats // 4))}
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
            + f"; float16 batched max error {err:.1e} of the largest entry")


if __name__ == "__main__":
    main()
