"""Where a GPU training step's time goes, kernel by kernel.

PyTorch's profiler reads the GPU's activity through CUPTI, which sees every kernel in
the process: CuPy's element-wise and reduction kernels, cuBLAS's products and npgpt's
fused kernels alike. This runs npgpt's training step (benchmarks' lecture config by
default, TF32 with --tf32) under it and prints the kernels by GPU time per step, with
the step's wall time beside their sum: a sum close to the wall time means the step is
GPU-bound, a smaller one that the host's queueing is the limit.

    python benchmarks/gpu_profile.py --tf32             # the lecture step, fused, TF32
    NPGPT_FUSED=0 python benchmarks/gpu_profile.py      # the plain CuPy array code
    python benchmarks/gpu_profile.py --tf32 --host      # the host's side: where the Python
                                                        # time of a step goes (cProfile)

--host answers the other question: when the GPU waits for the host, which calls take the
host's time. It times the steps without any profiler first (the step's true wall time),
then runs them under cProfile and lists the functions by their own time.

Needs a GPU, CuPy and a CUDA build of PyTorch (for its profiler only).
"""
import argparse
import time

import common  # noqa: F401 - the repository on sys.path

from npgpt.backend import enable_tf32, gpu_available
from npgpt.trainconfig import PRESETS, TrainConfig
from npgpt.training import Trainer


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="lecture", choices=sorted(PRESETS))
    p.add_argument("--tf32", action="store_true", help="TF32 matrix products")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    p.add_argument("--steps", type=int, default=4, help="profiled steps (after 5 warm-up)")
    p.add_argument("--top", type=int, default=12, help="kernels to list")
    p.add_argument("--data", default=None, help="corpus (default: the preset's)")
    p.add_argument("--host", action="store_true",
                   help="profile the host's Python time (cProfile) instead of the GPU's")
    args = p.parse_args()
    if not gpu_available():
        raise SystemExit("gpu_profile.py: needs a GPU that CuPy can use")
    import cupy
    from torch.profiler import ProfilerActivity, profile
    if args.tf32:
        enable_tf32()
    extra = {"data": args.data} if args.data else {}
    cfg = TrainConfig(**{**PRESETS[args.preset], "device": "gpu", "dtype": args.dtype,
                         "dropout": 0.0, "out_dir": "/tmp/npgpt_gpu_profile", **extra})
    trainer = Trainer(cfg, progress=False, out=lambda *_: None)
    sync = cupy.cuda.Device().synchronize
    for _ in range(5):
        trainer.train_step()
    sync()
    if args.host:
        host_profile(trainer, sync, args)
        return
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(args.steps):
            trainer.train_step()
        sync()
        wall_ms = (time.perf_counter() - start) * 1e3 / args.steps
    rows = [(e.key, e.self_device_time_total / 1e3 / args.steps, e.count / args.steps)
            for e in prof.key_averages()]
    rows = sorted((r for r in rows if r[1] > 0), key=lambda r: -r[1])
    gpu_ms = sum(ms for _, ms, _ in rows)
    print(f"{args.preset}, {args.dtype}{', TF32' if args.tf32 else ''}: wall {wall_ms:.1f} ms "
          f"per step, GPU kernels {gpu_ms:.1f} ms per step ({args.steps} steps profiled)")
    for name, ms, count in rows[:args.top]:
        print(f"  {ms:7.2f} ms {100 * ms / gpu_ms:4.0f}%  {count:5.0f} calls  {name[:70]}")


def host_profile(trainer, sync, args):
    """The steps' wall time with no profiler, then their host time under cProfile."""
    import cProfile
    import pstats
    start = time.perf_counter()
    for _ in range(args.steps):
        trainer.train_step()
    sync()
    wall_ms = (time.perf_counter() - start) * 1e3 / args.steps
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    for _ in range(args.steps):
        trainer.train_step()
    sync()
    profiler.disable()
    profiled_ms = (time.perf_counter() - start) * 1e3 / args.steps
    stats = pstats.Stats(profiler)
    calls = sum(n for n, *_ in stats.stats.values()) / args.steps
    print(f"{args.preset}, {args.dtype}: wall {wall_ms:.1f} ms per step without a profiler, "
          f"{profiled_ms:.1f} ms under cProfile; {calls:,.0f} Python-level calls per step")
    def show(rows):
        for (path, line, name), (_, n, own, cum, _) in rows[:args.top]:
            where = f"{path.rsplit('/', 1)[-1]}:{line}" if line else path
            print(f"  own {own * 1e3 / args.steps:6.2f} ms  cum {cum * 1e3 / args.steps:6.2f} ms  "
                  f"{n / args.steps:6.0f} calls  {name} ({where})"[:118])

    print("by own time (CuPy's and Python's internals included):")
    show(sorted(stats.stats.items(), key=lambda kv: -kv[1][2]))
    print("npgpt's functions by cumulative time:")
    show(sorted(((k, v) for k, v in stats.stats.items() if "/npgpt/" in k[0]),
                key=lambda kv: -kv[1][3]))


if __name__ == "__main__":
    main()
