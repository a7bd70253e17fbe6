"""Data parallelism on one machine: 1 rank x 2 BLAS threads against 2 ranks x 1 thread
at the same global batch (and 1 rank x 1 thread for reference), and the all-reduce's
share of a step.

    pip install -e ".[mpi]"
    python benchmarks/data_parallel.py [--steps 30] [--warmup 5] [--data FILE]

Both runs are the real train.py on the small config (4 layers, 4 heads, 128 dims,
context 128, global batch 32 sequences: --batch-size 32 on one process, 16 per rank on
two), launched as subprocesses; their step times come from out/log.jsonl (ms_per_iter,
and allreduce_ms on the ranks). Then mpiexec times bare all-reduces of float32 buffers
(the small model's gradient buffer and 40 MB) to separate the transfer from the wait
for the slower rank that the in-step figure includes. Medians over the steps after
the warmup. Needs Tiny Shakespeare ($NPGPT_DATA_DIR, ../shared/data) or --data FILE.
"""
import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import common  # the repository on sys.path; machine facts
from npgpt.distributed import LAUNCH_SIZE_VARS

ROOT = Path(common.ROOT)
GLOBAL_BATCH, BLOCK = 32, 128


def mpiexec():
    beside = Path(sys.executable).parent / "mpiexec"
    found = str(beside) if beside.exists() else shutil.which("mpiexec")
    if found is None:
        sys.exit("mpiexec not found: pip install -e \".[mpi]\"")
    return found


def env_with(threads, data_dir):
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_SIZE_VARS}
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[name] = str(threads)
    if data_dir:
        env["NPGPT_DATA_DIR"] = str(data_dir)
    return env


def timed_run(ranks, threads, args, data_dir, warmup):
    """Median step time (s), all-reduce time (s, or None) and stdout of one train.py run."""
    with tempfile.TemporaryDirectory() as folder:
        cmd = [sys.executable, str(ROOT / "train.py"), *args,
               "--batch-size", str(GLOBAL_BATCH // ranks)]
        if ranks > 1:
            cmd = [mpiexec(), "-n", str(ranks), *cmd]
        proc = subprocess.run(cmd, cwd=folder, capture_output=True, text=True,
                              env=env_with(threads, data_dir), timeout=3600)
        if proc.returncode != 0:
            sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
        log = Path(folder, "out", "log.jsonl").read_text().splitlines()
        steps = [r for r in map(json.loads, log) if "loss" in r][warmup:]
        step_s = statistics.median(r["ms_per_iter"] for r in steps) / 1000
        comm = [r["allreduce_ms"] for r in steps if "allreduce_ms" in r]
        return step_s, (statistics.median(comm) / 1000 if comm else None), proc.stdout


def allreduce_worker(sizes_mb, repeats):
    """Under mpiexec: time in-place all-reduces; rank 0 prints {MB: median seconds}."""
    import time

    import numpy as np
    from mpi4py import MPI

    comm, result = MPI.COMM_WORLD, {}
    for mb in sizes_mb:
        buf = np.ones(int(mb * 1e6) // 4, dtype=np.float32)
        times = []
        for _ in range(repeats + 2):
            comm.Barrier()
            t0 = time.perf_counter()
            comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
            times.append(time.perf_counter() - t0)
        result[mb] = statistics.median(times[2:])
    if comm.rank == 0:
        print(json.dumps(result))


def shared_data_dir():
    for candidate in (os.environ.get("NPGPT_DATA_DIR"), ROOT.parent / "shared" / "data"):
        if candidate and (Path(candidate) / "tinyshakespeare.txt").exists():
            return Path(candidate)
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out")
    parser.add_argument("--data", default=None, help="a UTF-8 text file (default: shakespeare)")
    parser.add_argument("--allreduce-worker", nargs="*", type=float, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.allreduce_worker is not None:
        return allreduce_worker(opts.allreduce_worker, repeats=20)

    print("\n".join(common.machine_info()))
    data_dir = None if opts.data else shared_data_dir()
    args = ["--preset", "small", "--max-iters", str(opts.steps), "--eval-interval", "1000000",
            "--eval-iters", "1", "--log-interval", "1", "--data",
            str(Path(opts.data).resolve()) if opts.data else "shakespeare"]
    tokens = GLOBAL_BATCH * BLOCK
    one_s, _, out = timed_run(1, 2, args, data_dir, opts.warmup)
    single_s, _, _ = timed_run(1, 1, args, data_dir, opts.warmup)
    two_s, comm_s, _ = timed_run(2, 1, args, data_dir, opts.warmup)
    n_params = int(re.search(r"npgpt: ([\d,]+) parameters", out).group(1).replace(",", ""))
    grad_mb = n_params * 4 / 1e6
    sizes = [round(grad_mb, 2), 40.0]
    proc = subprocess.run([mpiexec(), "-n", "2", sys.executable, __file__, "--allreduce-worker",
                           *map(str, sizes)], capture_output=True, text=True,
                          env=env_with(1, None), timeout=600)
    bare = json.loads(proc.stdout.strip().splitlines()[-1])

    print(f"small config: {n_params:,} parameters ({grad_mb:.2f} MB float32 gradient), "
          f"global batch {GLOBAL_BATCH} x {BLOCK} tokens; medians of steps "
          f"{opts.warmup}..{opts.steps - 1}")
    print(f"1 rank  x 1 BLAS thread : {1000 * single_s:7.1f} ms/step  "
          f"{tokens / single_s:9,.0f} tokens/s  (reference)")
    print(f"1 rank  x 2 BLAS threads: {1000 * one_s:7.1f} ms/step  {tokens / one_s:9,.0f} tokens/s"
          f"  ({single_s / one_s:.2f}x)")
    print(f"2 ranks x 1 BLAS thread : {1000 * two_s:7.1f} ms/step  {tokens / two_s:9,.0f} tokens/s"
          f"  ({single_s / two_s:.2f}x; {one_s / two_s:.2f}x the 2-thread rank)")
    print(f"  all-reduce in the step: {1000 * comm_s:.2f} ms = {100 * comm_s / two_s:.1f}% of "
          "the step (includes waiting for the slower rank)")
    for mb, seconds in bare.items():  # ring bus bandwidth: size/t x 2(N-1)/N, = size/t at N=2
        print(f"  bare all-reduce of {float(mb):6.2f} MB between 2 ranks: {1000 * seconds:7.2f} ms "
              f"({float(mb) / 1000 / seconds:.2f} GB/s bus bandwidth)")


if __name__ == "__main__":
    main()
