"""Training-step speed of npgpt against PyTorch eager on the same model, side by side.

One step = forward + backward + AdamW on a random (B, T) batch, float32. In one process,
npgpt (with its worker threads, --workers auto: one per core; and with one worker, to
show what the threads give) and two PyTorch eager models built from the same initial
weights take turns on the same batches: each runs a block of BLOCK consecutive steps, as
a training loop runs them, with no pause in between (a pause lets BLAS's idle threads go
to sleep and flatters the figure), and the order of the blocks rotates every round, so
all of them see the same machine load. A block's first step is not timed (it pays for
the previous library's threads still spinning); the median of the timed steps is
reported. PyTorch runs nanoGPT's model: "sdpa" uses
F.scaled_dot_product_attention(is_causal=True), "manual" the explicit softmax(q k^T) v
that npgpt computes. Peak resident memory is measured in a fresh child process per
framework (PyTorch's import alone is ~10x NumPy's, so the step's own memory is the peak
minus the RSS after imports).

    python benchmarks/train_step.py                      # tiny, small, one lecture step
    python benchmarks/train_step.py --config small --steps 20
    python benchmarks/train_step.py --loop               # the real loop: Trainer vs a torch loop
    python benchmarks/train_step.py --profile            # npgpt per-layer profile, small and
                                                         # lecture, against the causal floor
    python benchmarks/train_step.py --config gpt2-ft     # GPT-2 124M fine-tuning step, B 1, T 256
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/train_step.py
        # lets OpenBLAS pick its kernels for this CPU (check the "BLAS:" line)
    python benchmarks/train_step.py --device gpu --config lecture   # CuPy against CUDA
    python benchmarks/train_step.py --device gpu --tf32             # both with TF32 products
    python benchmarks/train_step.py --device gpu --config lecture --dtype float16
        # mixed precision: npgpt float16 (and float32) against torch.autocast + GradScaler

--loop times what `python train.py` runs: npgpt's Trainer (small preset, Tiny Shakespeare,
its batches, clipping, schedule and logging) over 100 iterations, against a PyTorch loop
over the same batches with the same clipping, schedule and AdamW.

With --device gpu npgpt runs on CuPy (one worker) and PyTorch on CUDA, float32; each
timed step ends by reading its loss (float(loss) / loss.item()), which waits for the
device, so a step's time is its whole device time. Memory is measured on the CPU only.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import common
from common import np

from npgpt import GPT, AdamW, GPTConfig
from npgpt.errors import NpgptError
from npgpt.mixed import MixedPrecision
from npgpt.parallel import Workers, resolve_workers

CONFIGS = {  # name: (GPTConfig, batch size)
    "tiny": (GPTConfig(vocab_size=65, block_size=32, n_layer=2, n_head=2, n_embd=64), 8),
    "small": (GPTConfig(vocab_size=65, block_size=128, n_layer=4, n_head=4, n_embd=128), 32),
    "lecture": (GPTConfig(vocab_size=65, block_size=256, n_layer=6, n_head=6, n_embd=384), 64),
    # fine-tuning GPT-2 124M at batch 1, context 256 (train.py --init-from): run by name only
    "gpt2-ft": (GPTConfig(vocab_size=50257, block_size=256, n_layer=12, n_head=12, n_embd=768), 1),
}
STEPS = {"tiny": 40, "small": 16, "lecture": 2, "gpt2-ft": 4}   # timed steps per framework
WARMUP = {"tiny": 5, "small": 2, "lecture": 1, "gpt2-ft": 1}     # untimed steps first
BLOCK = {"tiny": 9, "small": 5, "lecture": 3, "gpt2-ft": 3}      # consecutive steps per turn
GPU_STEPS, GPU_WARMUP, GPU_BLOCK = 50, 5, 11  # (the first CuPy steps compile its kernels)
BY_NAME_ONLY = ("gpt2-ft",)
PROFILE_STEPS = {"tiny": 20, "small": 10, "lecture": 3, "gpt2-ft": 3}  # --profile's timed steps
HP = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def attention_flops(cfg, rows):
    """Forward FLOPs of attention's two products over `rows` batch rows, where a causal
    model needs them: the T (T + 1) / 2 (query, key) pairs at or below the diagonal,
    2 hs FLOPs each for q.k and as many for the weights times v, per head and layer."""
    T, hs = cfg.block_size, cfg.n_embd // cfg.n_head
    return 2 * 2 * hs * (T * (T + 1) // 2) * rows * cfg.n_head * cfg.n_layer


def causal_floor(cfg, B, n_workers):
    """The matrix products one step needs, per worker (worker 0's rows, the larger share;
    the workers run side by side), at the sgemm rate measured here with a worker's BLAS
    threads: (GFLOP, ms at that rate, rate in GFLOP/s). Counted: every linear layer and the
    tied head, forward (2 N Cin Cout) and backward (twice that), and attention's two
    products only where a causal model needs them (attention_flops)."""
    from threadpoolctl import threadpool_limits
    T, C, V = cfg.block_size, cfg.n_embd, cfg.vocab_size
    rows = -(-B // n_workers)
    N = rows * T
    linears = 2 * N * (C * 3 * C + C * C + C * 4 * C + 4 * C * C) * cfg.n_layer + 2 * N * C * V
    gflop = 3e-9 * (linears + attention_flops(cfg, rows))  # forward + backward (two per product)
    with threadpool_limits(max(1, os.cpu_count() // n_workers) if n_workers > 1 else None,
                           user_api="blas"):
        rate = common.sgemm_rate(N, C, 4 * C)
    return gflop, gflop / rate * 1e3, rate


def batches(cfg, B, n, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        data = rng.integers(0, cfg.vocab_size, (B, cfg.block_size + 1))
        yield np.ascontiguousarray(data[:, :-1]), np.ascontiguousarray(data[:, 1:])


def make_npgpt(cfg, device="cpu", workers="auto", dtype="float32"):
    """(float32 model, AdamW, step function); float16: mixed precision (npgpt/mixed.py)
    from that model's weights."""
    model = GPT(cfg, seed=0, device=device, reuse_memory=True)  # the Trainer's setting
    mixed = MixedPrecision(model) if dtype == "float16" else None
    net = mixed.model if mixed else model  # the model that runs forward and backward
    opt = AdamW(mixed.params if mixed else model.params, **HP)
    pool = None  # built at the first step: its batch size decides "auto"

    def step(x, y):
        nonlocal pool
        if pool is None:
            n = resolve_workers(workers, x.shape[0], device, x.shape[1] * cfg.n_embd)
            pool = Workers(net, n)
        loss = pool.forward_backward(x, y, dloss=mixed.scale if mixed else 1.0)
        if mixed:
            mixed.step(opt)
        else:
            opt.step(model.grads)
        return float(loss)  # waits for the device, as PyTorch's loss.item()
    return model, opt, step


def make_torch(model, manual, device="cpu", dtype="float32"):
    """A step function for TorchGPT built from an npgpt GPT's weights (or a GPTConfig);
    float16: torch.autocast(float16) with a GradScaler, as nanoGPT's dtype='float16'."""
    import torch
    from torch_gpt import TorchGPT
    if isinstance(model, GPTConfig):  # memory children: PyTorch's own init
        tm = TorchGPT(model, manual_attention=manual)
    else:
        tm = TorchGPT.from_npgpt(model, manual_attention=manual)
    dev = "cuda" if device == "gpu" else "cpu"
    tm = tm.to(dev)
    opt = tm.adamw(**HP)
    half = dtype == "float16"
    scaler = torch.amp.GradScaler(dev, enabled=half)

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev, dtype=torch.float16, enabled=half):
            loss = tm(torch.from_numpy(x).to(dev), torch.from_numpy(y).to(dev))
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        return loss.item()
    return step


def time_config(name, steps, device="cpu", dtype="float32"):
    """Step times of npgpt and both PyTorch models (threads: main's set_threads): rounds
    of one block of consecutive steps per framework, the order rotating every round.
    float16: npgpt's and PyTorch's mixed precision, and npgpt in float32 beside them."""
    cfg, B = CONFIGS[name]
    model, _, np_step = make_npgpt(cfg, device, dtype=dtype)
    runners = {"npgpt": np_step}
    if dtype == "float16":
        runners["npgpt float32"] = make_npgpt(cfg, device)[2]
    if device == "cpu":
        runners["npgpt 1 worker"] = make_npgpt(cfg, device, workers=1, dtype=dtype)[2]
    runners.update({"torch sdpa": make_torch(model, False, device, dtype),
                    "torch manual": make_torch(model, True, device, dtype)})
    names = list(runners)
    times = {n: [] for n in names}
    first_loss = {}
    warmup, block = (WARMUP[name], BLOCK[name]) if device == "cpu" else (GPU_WARMUP, GPU_BLOCK)
    data = list(batches(cfg, B, warmup + steps))
    for n in names:  # the same first batches, untimed: a loss to compare, caches warm
        for x, y in data[:warmup]:
            first_loss.setdefault(n, runners[n](x, y))
    timed = data[warmup:]
    per_block = block - 1  # a block's first step is not timed
    for r in range(0, len(timed), per_block):
        order = names[r // per_block % len(names):] + names[:r // per_block % len(names)]
        chunk = timed[r:r + per_block]
        for n in order:
            runners[n](*chunk[0])  # untimed: the previous library's threads settle
            for x, y in chunk:
                t = time.perf_counter()
                runners[n](x, y)
                times[n].append(time.perf_counter() - t)
    return cfg, B, times, first_loss, warmup, block


def loop_throughput(iters=100):
    """ms per iteration of npgpt's Trainer (train.py's loop, small preset) and of a PyTorch
    loop over the same batches with the same schedule, clipping and AdamW."""
    import tempfile

    import torch
    from torch_gpt import TorchGPT

    from npgpt.trainconfig import TrainConfig
    from npgpt.training import Trainer, get_lr

    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(max_iters=iters, eval_interval=10 * iters, eval_iters=1,
                          out_dir=out)
        trainer = Trainer(cfg, progress=False, out=lambda *_: None)
        tm = TorchGPT.from_npgpt(trainer.model)
        opt = tm.adamw(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8,
                       weight_decay=cfg.weight_decay)
        rng = np.random.default_rng(cfg.seed)
        t0 = time.perf_counter()
        for it in range(iters):
            x, y = trainer.batch("train", rng)
            for group in opt.param_groups:
                group["lr"] = get_lr(it, cfg)
            opt.zero_grad(set_to_none=True)
            loss = tm(torch.from_numpy(x.astype(np.int64)), torch.from_numpy(y.astype(np.int64)))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(tm.parameters(), cfg.grad_clip)
            opt.step()
            if it % cfg.log_interval == 0:
                loss.item()
        torch_ms = 1e3 * (time.perf_counter() - t0) / iters
        summary = trainer.run()  # train.py's loop; elapsed_s counts the steps, not the evals
        npgpt_ms = 1e3 * summary["elapsed_s"] / iters
        print(f"\n== the training loop, small preset, {iters} iterations each "
              f"(npgpt: Trainer, {trainer.workers.n} worker threads; load average "
              f"{os.getloadavg()[0]:.2f})")
        print(f"   npgpt Trainer   {npgpt_ms:8.1f} ms/iter   (train loss at the last eval: "
              f"{summary['train_loss']:.4f})")
        print(f"   torch sdpa loop {torch_ms:8.1f} ms/iter   (last batch's loss: {loss.item():.4f})")
        print(f"   ratio torch ms / npgpt ms = {torch_ms / npgpt_ms:.2f}x")


def memory_child(name, framework):
    """Runs in a child process: peak RSS over two training steps of one framework."""
    cfg, B = CONFIGS[name]
    if not framework.startswith("npgpt"):
        import torch  # noqa: F401
    limiter = common.set_threads(int(os.environ.get("NPGPT_BENCH_THREADS", os.cpu_count())))  # noqa
    data = list(batches(cfg, B, 2))
    base = common.rss_mb()
    common.reset_peak_rss()
    if framework.startswith("npgpt"):
        step = make_npgpt(cfg, workers=1 if framework == "npgpt 1 worker" else "auto")[2]
    else:
        step = make_torch(cfg, manual=framework == "torch manual")
    for x, y in data:
        step(x, y)
    print(json.dumps({"base": base, "peak": common.rss_mb("VmHWM")}))


def measure_memory(name, framework, threads):
    env = dict(os.environ, NPGPT_BENCH_THREADS=str(threads))
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory-child",
                          name, framework], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(name, steps, threads, memory, device="cpu", dtype="float32"):
    load = os.getloadavg()[0]
    cfg, B, times, first_loss, warmup, block = time_config(name, steps, device, dtype)
    tokens = B * cfg.block_size
    print(f"\n== {name} on the {device.upper()}, {dtype}: {cfg.n_layer} layers, {cfg.n_head} heads, "
          f"{cfg.n_embd} dims, context {cfg.block_size}, batch {B}, vocab {cfg.vocab_size}; "
          f"{len(times['npgpt'])} timed steps each (blocks of {block} consecutive steps, the "
          f"first untimed) after {warmup} warm-up; "
          f"load average {load:.2f} before, {os.getloadavg()[0]:.2f} after")
    print("   loss on the first batch (same weights, same updates): "
          + ", ".join(f"{n} {v:.6f}" for n, v in first_loss.items()))
    med = {}
    for n, ts in times.items():
        med[n], lo, hi, spread = common.stats(ts)
        mem = ""
        if memory:
            m = measure_memory(name, n, threads)
            mem = f"  peak RSS {m['peak']:7.1f} MB (step: {m['peak'] - m['base']:6.1f} MB)"
        print(f"   {n:14s} {med[n]:8.1f} ms/step  {tokens / med[n] * 1e3:9.0f} tok/s  "
              f"[min {lo:.1f}, max {hi:.1f}, spread {100 * spread:.0f}%]{mem}")
    if device == "cpu":
        n_workers = resolve_workers("auto", B, "cpu", cfg.block_size * cfg.n_embd)
        gflop, floor_ms, rate = causal_floor(cfg, B, n_workers)
        print(f"   npgpt ms / causal floor = {med['npgpt'] / floor_ms:.2f}x   (floor "
              f"{floor_ms:.1f} ms: {gflop:.2f} GFLOP of matrix products per worker, "
              f"{n_workers} worker(s), at the {rate:.0f} GFLOP/s sgemm rate measured here)")
    for n in ("torch sdpa", "torch manual"):
        print(f"   ratio {n} ms / npgpt ms = {med[n] / med['npgpt']:.2f}x"
              + (f"   (npgpt 1 worker: {med[n] / med['npgpt 1 worker']:.2f}x)"
                 if "npgpt 1 worker" in med else ""))
    if "npgpt float32" in med:
        print(f"   ratio npgpt float32 ms / npgpt float16 ms = "
              f"{med['npgpt float32'] / med['npgpt']:.2f}x")


# ------------------------------------------------------------------------- profile
def profile(name, steps, workers="auto"):
    """Per layer type: forward and backward ms, share of the step, and GFLOP/s of its
    matrix products against this machine's sgemm rate (threads: main's set_threads).
    With W worker threads, the layers are worker 0's (B/W rows, the others run beside
    it) and the sgemm rate is measured with a worker's BLAS threads."""
    import threading

    from npgpt import ops
    cfg, B = CONFIGS[name]
    model, opt, step = make_npgpt(cfg, workers=workers)
    n_workers = resolve_workers(workers, B, "cpu", cfg.block_size * cfg.n_embd)
    T, C, V = cfg.block_size, cfg.n_embd, cfg.vocab_size
    rows = -(-B // n_workers)  # worker 0's rows (the larger share)
    N = rows * T
    acc = {}

    def timed(key, fn):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            if threading.current_thread() is threading.main_thread():  # worker 0's
                acc[key] = acc.get(key, 0.0) + time.perf_counter() - t
            return out
        return wrapper

    def wrap_layer(layer, kind):
        layer.forward = timed((kind, "fwd"), layer.forward)
        layer.backward = timed((kind, "bwd"), layer.backward)

    flops = {}  # kind: forward GFLOP per step (backward: twice that)
    for blk in model.blocks:
        for kind, lin in (("c_attn (C->3C)", blk.attn.c_attn),
                          ("attn c_proj (C->C)", blk.attn.c_proj),
                          ("c_fc (C->4C)", blk.mlp.c_fc), ("mlp c_proj (4C->C)", blk.mlp.c_proj)):
            wrap_layer(lin, kind)
            flops[kind] = flops.get(kind, 0.0) + 2e-9 * N * lin.w.shape[0] * lin.w.shape[1]
        wrap_layer(blk.ln_1, "layernorm")
        wrap_layer(blk.ln_2, "layernorm")
    wrap_layer(model.ln_f, "layernorm")
    wrap_layer(model.embedding, "embedding")
    wrap_layer(model.head, "tied head")
    flops["tied head"] = 2e-9 * N * C * V
    flops["attention (softmax(qk^T)v)"] = 1e-9 * attention_flops(cfg, rows)  # causal pairs
    for op, kind in (("attention", "attention (softmax(qk^T)v)"), ("gelu", "gelu"),
                     ("cross_entropy", "cross-entropy")):
        setattr(ops, op + "_forward", timed((kind, "fwd"), getattr(ops, op + "_forward")))
        setattr(ops, op + "_backward", timed((kind, "bwd"), getattr(ops, op + "_backward")))
    opt.step = timed(("AdamW", "step"), opt.step)

    gflop, floor_ms, rate = causal_floor(cfg, B, n_workers)  # the sgemm rate of a worker
    totals, per_step = [], []
    for i, (x, y) in enumerate(batches(cfg, B, WARMUP[name] + steps)):
        acc.clear()
        t = time.perf_counter()
        step(x, y)
        if i >= WARMUP[name]:
            totals.append(time.perf_counter() - t)
            per_step.append(dict(acc))
    total = 1e3 * float(np.median(totals))
    med = {k: 1e3 * float(np.median([s.get(k, 0.0) for s in per_step])) for k in per_step[0]}
    print(f"\n== npgpt per-layer profile, {name} (median of {steps} steps: {total:.1f} ms/step; "
          f"{n_workers} worker(s), the layers of worker 0: {rows} rows; "
          f"load average {os.getloadavg()[0]:.2f})")
    print(f"   sgemm rate here: {rate:.0f} GFLOP/s for ({N},{C})@({C},{4 * C}) at a worker's "
          f"BLAS threads")
    print(f"   {'layer type':28s} {'fwd ms':>8s} {'bwd ms':>8s} {'share':>6s} "
          f"{'GFLOP':>7s} {'GFLOP/s':>8s} {'of sgemm':>8s}")
    kinds = sorted({k for k, _ in med},
                   key=lambda k: -sum(v for (kk, _), v in med.items() if kk == k))
    mm_ms = 0.0
    for kind in kinds:
        f = med.get((kind, "fwd"), 0.0)
        b = med.get((kind, "bwd"), 0.0) + med.get((kind, "step"), 0.0)
        line = f"   {kind:28s} {f:8.2f} {b:8.2f} {100 * (f + b) / total:5.1f}%"
        if kind in flops:
            gf = 3 * flops[kind]
            mm_ms += f + b
            rate_here = gf / (f + b) * 1e3
            line += f" {gf:7.2f} {rate_here:8.0f} {100 * rate_here / rate:7.0f}%"
        print(line)
    other = total - sum(med.values())
    print(f"   {'other (residual adds, glue)':28s} {other:8.2f} {'':8s} "
          f"{100 * other / total:5.1f}%")
    print(f"   causal floor: {gflop:.1f} GFLOP of matrix products per worker (attention's "
          f"scores at or below the diagonal only) = {floor_ms:.1f} ms at {rate:.0f} GFLOP/s; "
          f"the layers that hold them took {mm_ms:.1f} ms (attention's with its softmax), "
          f"the step {total:.1f} ms: {total / floor_ms:.2f}x the floor")


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=["all", *CONFIGS], default="all")
    p.add_argument("--steps", type=int, help="timed steps per framework (default per config)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--no-memory", action="store_true",
                   help="skip the peak-memory children (lecture: only with --config lecture)")
    p.add_argument("--profile", action="store_true", help="npgpt per-layer profile instead")
    p.add_argument("--loop", action="store_true",
                   help="the training loop instead: Trainer (small) against a PyTorch loop")
    p.add_argument("--workers", default="auto",
                   help="npgpt's worker threads for --profile (default auto)")
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu",
                   help="gpu: npgpt on CuPy against PyTorch on CUDA (step times only)")
    p.add_argument("--tf32", action="store_true",
                   help="with --device gpu: TF32 matrix products in both (npgpt --tf32, "
                        "torch.backends.cuda.matmul.allow_tf32)")
    p.add_argument("--dtype", choices=["float32", "float16"], default="float32",
                   help="float16: mixed precision in both (npgpt --dtype float16; PyTorch "
                        "autocast + GradScaler), npgpt float32 beside them")
    p.add_argument("--memory-child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    names = [n for n in CONFIGS if n not in BY_NAME_ONLY] if args.config == "all" else [args.config]
    if args.memory_child:
        return memory_child(*args.memory_child)
    if args.profile:  # npgpt alone: runs without torch
        limiter = common.begin(args.threads)  # noqa: F841
        for name in (["small", "lecture"] if args.config == "all" else names):
            profile(name, args.steps or PROFILE_STEPS[name], args.workers)
        return
    import torch  # noqa: F401
    if args.device == "gpu":
        from npgpt.backend import enable_tf32, resolve_device
        try:
            resolve_device("gpu")
            if args.tf32:
                enable_tf32()
        except NpgptError as e:
            sys.exit(f"train_step.py: {e}")
        if not torch.cuda.is_available():
            sys.exit("train_step.py: PyTorch sees no CUDA device (install a CUDA build of torch)")
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
    elif args.tf32:
        sys.exit("train_step.py: --tf32 applies to --device gpu only")
    limiter = common.begin(args.threads)  # noqa: F841  (torch is imported above)
    if args.loop:
        return loop_throughput(args.steps or 100)
    for name in names:
        # a lecture step takes seconds: its memory children only when asked for by name
        memory = (args.device == "cpu" and not args.no_memory and args.dtype == "float32"
                  and (name in ("tiny", "small") or args.config == name))
        steps = args.steps or (STEPS[name] if args.device == "cpu" else GPU_STEPS)
        report(name, steps, args.threads, memory, args.device, args.dtype)


if __name__ == "__main__":
    main()
