"""Shared by the benchmarks: the repository on sys.path, thread settings, machine facts,
resident memory, timing statistics. Benchmark-only: npgpt itself imports none of this."""
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402


def set_threads(n):
    """The same thread count for NumPy's BLAS and (if imported) PyTorch. Returns the
    threadpoolctl limiter, which must stay alive for the limit to hold."""
    from threadpoolctl import threadpool_limits
    limiter = threadpool_limits(limits=n)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)
    return limiter


def machine_info():
    """One line per fact: CPU, cores, NumPy and its BLAS (with the kernel in use), torch."""
    from threadpoolctl import threadpool_info
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    blas = [f"{i.get('internal_api')} {i.get('version')} ({i.get('architecture', '?')} kernels, "
            f"{i.get('num_threads')} threads, {os.path.basename(i.get('filepath', ''))})"
            for i in threadpool_info() if i.get("user_api") == "blas"]
    lines = [f"date: {time.strftime('%Y-%m-%d %H:%M %Z')}",
             f"cpu: {cpu}, {os.cpu_count()} cores; python {platform.python_version()}",
             f"numpy {np.__version__}; BLAS: {'; '.join(blas) or '?'}",
             "env: " + ", ".join(f"{k}={os.environ.get(k, '(unset)')}"
                                 for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE",
                                           "OMP_NUM_THREADS"))]
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        lines.append(f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
        if torch.cuda.is_available():
            lines.append(f"torch CUDA {torch.version.cuda}: {torch.cuda.get_device_name()}")
    cupy = sys.modules.get("cupy")
    if cupy is not None and cupy.is_available():
        name = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"]
        lines.append(f"cupy {cupy.__version__}, CUDA runtime {cupy.cuda.runtime.runtimeGetVersion()}"
                     f": {name.decode() if isinstance(name, bytes) else name}; CUPY_TF32="
                     f"{os.environ.get('CUPY_TF32', '(unset)')}")
    return lines


def rss_mb(field="VmRSS"):
    """Resident memory of this process in MB (VmRSS now, VmHWM the peak), Linux only."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def reset_peak_rss():
    """Make VmHWM start again from the current RSS (Linux >= 4.0); False if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def stats(times):
    """(median, min, max, spread) in ms; spread = (max - min) / median."""
    t = 1e3 * np.asarray(times)
    med = float(np.median(t))
    return med, float(t.min()), float(t.max()), float((t.max() - t.min()) / med)


def sgemm_rate(M, K, N, repeats=20):
    """Best GFLOP/s of an (M,K) @ (K,N) float32 product written into a reused buffer."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((M, K), dtype=np.float32)
    b = rng.standard_normal((K, N), dtype=np.float32)
    c = np.empty((M, N), dtype=np.float32)
    best = float("inf")
    for _ in range(repeats + 3):
        t = time.perf_counter()
        np.matmul(a, b, out=c)
        best = min(best, time.perf_counter() - t)
    return 2.0 * M * K * N / best / 1e9


def transformers_twin(model):
    """Hugging Face's GPT2LMHeadModel (eval mode) holding `model`'s weights: the same
    architecture (tanh GELU, no dropout, eps 1e-5, tied head). Needs torch and transformers."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    c = model.config
    cfg = GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd,
                     n_layer=c.n_layer, n_head=c.n_head, activation_function="gelu_new",
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     layer_norm_epsilon=1e-5, tie_word_embeddings=True)
    hf = GPT2LMHeadModel(cfg).eval()
    state = {n: torch.from_numpy(p.copy()) for n, p in model.state_dict().items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("lm_head" in n or ".attn.bias" in n or "masked_bias" in n
                                  for n in missing), (missing, unexpected)
    hf.tie_weights()
    assert torch.equal(hf.lm_head.weight, state["transformer.wte.weight"])
    return hf


def begin(threads, with_torch=False):
    """A benchmark's start: torch imported first when it runs (so set_threads gives it
    the same thread count), BLAS limited to `threads`, the machine printed. Returns the
    thread limiter, to keep alive for the run."""
    if with_torch:
        import torch  # noqa: F401
    limiter = set_threads(threads)
    print("\n".join(machine_info()))
    return limiter
