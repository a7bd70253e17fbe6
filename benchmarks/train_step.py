"""Training-step speed of npgpt against PyTorch eager on the same model, side by side.

One step = forward + backward + AdamW on a random (B, T) batch, float32. In one process,
npgpt and two PyTorch eager models built from the same initial weights take turns on the
same batches (the order rotates every step, so all three see the same machine load);
after warm-up, the median of the timed steps is reported. Before each timed step of
tiny and small, a 0.1 s pause lets the previous library's idle worker threads go to
sleep and an untimed step on the same batch wakes the next one's (so neither pays for
the other's thread pool). PyTorch runs nanoGPT's model:
"sdpa" uses F.scaled_dot_product_attention(is_causal=True), "manual" the explicit
softmax(q k^T) v that npgpt computes. Peak resident memory is measured in a fresh child
process per framework (PyTorch's import alone is ~10x NumPy's, so the step's own memory
is the peak minus the RSS after imports).

    python benchmarks/train_step.py                      # tiny, small, one lecture step
    python benchmarks/train_step.py --config small --steps 20
    python benchmarks/train_step.py --profile            # npgpt per-layer profile (small)
    python benchmarks/train_step.py --config gpt2-ft     # GPT-2 124M fine-tuning step, B 1, T 256
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/train_step.py
        # lets OpenBLAS pick its kernels for this CPU (check the "BLAS:" line)
    python benchmarks/train_step.py --device gpu --config lecture   # CuPy against CUDA
    python benchmarks/train_step.py --device gpu --tf32             # both with TF32 products

With --device gpu npgpt runs on CuPy and PyTorch on CUDA, float32; each timed step ends
by reading its loss (float(loss) / loss.item()), which waits for the device, so a step's
time is its whole device time. Memory is measured on the CPU only.
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

CONFIGS = {  # name: (GPTConfig, batch size)
    "tiny": (GPTConfig(vocab_size=65, block_size=32, n_layer=2, n_head=2, n_embd=64), 8),
    "small": (GPTConfig(vocab_size=65, block_size=128, n_layer=4, n_head=4, n_embd=128), 32),
    "lecture": (GPTConfig(vocab_size=65, block_size=256, n_layer=6, n_head=6, n_embd=384), 64),
    # fine-tuning GPT-2 124M at batch 1, context 256 (train.py --init-from): run by name only
    "gpt2-ft": (GPTConfig(vocab_size=50257, block_size=256, n_layer=12, n_head=12, n_embd=768), 1),
}
STEPS = {"tiny": 30, "small": 12, "lecture": 1, "gpt2-ft": 3}   # timed steps per framework
WARMUP = {"tiny": 5, "small": 3, "lecture": 1, "gpt2-ft": 1}
GPU_STEPS, GPU_WARMUP = 50, 5  # every config (the first CuPy steps compile its kernels)
BY_NAME_ONLY = ("gpt2-ft",)
HP = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def batches(cfg, B, n, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        data = rng.integers(0, cfg.vocab_size, (B, cfg.block_size + 1))
        yield np.ascontiguousarray(data[:, :-1]), np.ascontiguousarray(data[:, 1:])


def make_npgpt(cfg, device="cpu"):
    model = GPT(cfg, seed=0, device=device)
    opt = AdamW(model.params, **HP)

    def step(x, y):
        _, loss = model.forward(x, y, train=True)
        opt.step(model.backward())
        return float(loss)  # waits for the device, as PyTorch's loss.item()
    return model, opt, step


def make_torch(model, manual, device="cpu"):
    """A step function for TorchGPT built from an npgpt GPT's weights (or a GPTConfig)."""
    import torch
    from torch_gpt import TorchGPT
    if isinstance(model, GPTConfig):  # memory children: PyTorch's own init
        tm = TorchGPT(model, manual_attention=manual)
    else:
        tm = TorchGPT.from_npgpt(model, manual_attention=manual)
    dev = "cuda" if device == "gpu" else "cpu"
    tm = tm.to(dev)
    opt = tm.adamw(**HP)

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        loss = tm(torch.from_numpy(x).to(dev), torch.from_numpy(y).to(dev))
        loss.backward()
        opt.step()
        return loss.item()
    return step


def time_config(name, steps, device="cpu"):
    """Step times of npgpt and both PyTorch models (threads: main's set_threads)."""
    cfg, B = CONFIGS[name]
    model, _, np_step = make_npgpt(cfg, device)
    runners = {"npgpt": np_step, "torch sdpa": make_torch(model, False, device),
               "torch manual": make_torch(model, True, device)}
    names = list(runners)
    times = {n: [] for n in names}
    first_loss = {}
    warmup = WARMUP[name] if device == "cpu" else GPU_WARMUP
    for i, (x, y) in enumerate(batches(cfg, B, warmup + steps)):
        order = names[i % 3:] + names[:i % 3]  # rotate who goes first
        for n in order:
            if device == "cpu" and name in ("tiny", "small"):  # (a longer step needs no such care)
                time.sleep(0.1)         # the other library's idle threads stop spinning,
                runners[n](x, y)        # and an untimed step wakes this one's threads
            t = time.perf_counter()
            loss = runners[n](x, y)
            dt = time.perf_counter() - t
            first_loss.setdefault(n, loss)
            if i >= warmup:
                times[n].append(dt)
    return cfg, B, times, first_loss, warmup


def memory_child(name, framework):
    """Runs in a child process: peak RSS over two training steps of one framework."""
    cfg, B = CONFIGS[name]
    if framework != "npgpt":
        import torch  # noqa: F401
    limiter = common.set_threads(int(os.environ.get("NPGPT_BENCH_THREADS", os.cpu_count())))  # noqa
    data = list(batches(cfg, B, 2))
    base = common.rss_mb()
    common.reset_peak_rss()
    if framework == "npgpt":
        step = make_npgpt(cfg)[2]
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


def report(name, steps, threads, memory, device="cpu"):
    load = os.getloadavg()[0]
    cfg, B, times, first_loss, warmup = time_config(name, steps, device)
    tokens = B * cfg.block_size
    print(f"\n== {name} on the {device.upper()}: {cfg.n_layer} layers, {cfg.n_head} heads, "
          f"{cfg.n_embd} dims, context {cfg.block_size}, batch {B}, vocab {cfg.vocab_size}; "
          f"{len(times['npgpt'])} timed steps each after {warmup} warm-up; "
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
        print(f"   {n:13s} {med[n]:9.1f} ms/step  {tokens / med[n] * 1e3:9.0f} tok/s  "
              f"[min {lo:.1f}, max {hi:.1f}, spread {100 * spread:.0f}%]{mem}")
    for n in ("torch sdpa", "torch manual"):
        print(f"   ratio {n} ms / npgpt ms = {med[n] / med['npgpt']:.2f}x")


# ------------------------------------------------------------------------- profile
def profile(name, steps):
    """Per layer type: forward and backward ms, share of the step, and GFLOP/s of its
    matrix products against this machine's sgemm rate (threads: main's set_threads)."""
    from npgpt import ops
    cfg, B = CONFIGS[name]
    model, opt, step = make_npgpt(cfg)
    T, C, V, nh = cfg.block_size, cfg.n_embd, cfg.vocab_size, cfg.n_head
    N = B * T
    acc = {}

    def timed(key, fn):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            out = fn(*args, **kwargs)
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
    flops["attention (softmax(qk^T)v)"] = cfg.n_layer * 4e-9 * B * nh * T * T * (C // nh)
    for op, kind in (("attention", "attention (softmax(qk^T)v)"), ("gelu", "gelu"),
                     ("cross_entropy", "cross-entropy")):
        setattr(ops, op + "_forward", timed((kind, "fwd"), getattr(ops, op + "_forward")))
        setattr(ops, op + "_backward", timed((kind, "bwd"), getattr(ops, op + "_backward")))
    opt.step = timed(("AdamW", "step"), opt.step)

    rate = common.sgemm_rate(N, C, 4 * C)
    rate_sq = common.sgemm_rate(1024, 1024, 1024)
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
          f"load average {os.getloadavg()[0]:.2f})")
    print(f"   sgemm rate here: {rate:.0f} GFLOP/s for ({N},{C})@({C},{4 * C}), "
          f"{rate_sq:.0f} GFLOP/s for 1024^3")
    print(f"   {'layer type':28s} {'fwd ms':>8s} {'bwd ms':>8s} {'share':>6s} "
          f"{'GFLOP':>7s} {'GFLOP/s':>8s} {'of sgemm':>8s}")
    kinds = sorted({k for k, _ in med},
                   key=lambda k: -sum(v for (kk, _), v in med.items() if kk == k))
    mm_ms = mm_flops = 0.0
    for kind in kinds:
        f = med.get((kind, "fwd"), 0.0)
        b = med.get((kind, "bwd"), 0.0) + med.get((kind, "step"), 0.0)
        line = f"   {kind:28s} {f:8.2f} {b:8.2f} {100 * (f + b) / total:5.1f}%"
        if kind in flops:
            gf = 3 * flops[kind]
            mm_ms, mm_flops = mm_ms + f + b, mm_flops + gf
            rate_here = gf / (f + b) * 1e3
            line += f" {gf:7.2f} {rate_here:8.0f} {100 * rate_here / rate:7.0f}%"
        print(line)
    other = total - sum(med.values())
    print(f"   {'other (residual adds, glue)':28s} {other:8.2f} {'':8s} "
          f"{100 * other / total:5.1f}%")
    print(f"   matrix products: {mm_flops:.1f} GFLOP, {mm_flops / rate * 1e3:.1f} ms at the sgemm "
          f"rate; the layers that hold them took {mm_ms:.1f} ms "
          f"(attention's figure includes its softmax)")


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=["all", *CONFIGS], default="all")
    p.add_argument("--steps", type=int, help="timed steps per framework (default per config)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--no-memory", action="store_true",
                   help="skip the peak-memory children (lecture: only with --config lecture)")
    p.add_argument("--profile", action="store_true", help="npgpt per-layer profile instead")
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu",
                   help="gpu: npgpt on CuPy against PyTorch on CUDA (step times only)")
    p.add_argument("--tf32", action="store_true",
                   help="with --device gpu: TF32 matrix products in both (npgpt --tf32, "
                        "torch.backends.cuda.matmul.allow_tf32)")
    p.add_argument("--memory-child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_child:
        return memory_child(*args.memory_child)
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
    limiter = common.set_threads(args.threads)  # noqa: F841
    print("\n".join(common.machine_info()))
    names = [n for n in CONFIGS if n not in BY_NAME_ONLY] if args.config == "all" else [args.config]
    if args.profile:
        for name in (["small"] if args.config == "all" else names):
            profile(name, args.steps or 10)
        return
    for name in names:
        # a lecture step takes seconds: its memory children only when asked for by name
        memory = (args.device == "cpu" and not args.no_memory
                  and (name in ("tiny", "small") or args.config == name))
        steps = args.steps or (STEPS[name] if args.device == "cpu" else GPU_STEPS)
        report(name, steps, args.threads, memory, args.device)


if __name__ == "__main__":
    main()
