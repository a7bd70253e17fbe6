"""Generation speed of npgpt: the KV cache against recomputing the context, and a GPT-2
124M-sized model against Hugging Face transformers on the same weights.

    python benchmarks/generate.py            # KV cache vs recompute at contexts 64/128/256
    python benchmarks/generate.py --gpt2     # GPT-2 124M shape: npgpt vs transformers
    python benchmarks/generate.py --decode   # GPT-2 124M: decoding against its products,
                                             # sampling's cost, 8 samples in one pass
    python benchmarks/generate.py --bound --repeats 12   # GPT-2 124M greedy against its
                                             # products, in shuffled rounds (best, median)

Default mode: the lecture model (6 layers, 6 heads, 384 dims, context 256, vocab 65;
random weights), batch 1, sampling at temperature 1. For each context c the prompt has
c - n tokens and n tokens are generated, so the last token sees a context of c - 1; the
per-token rate counts every token after the first (the first is the prompt's prefill).
Both ways must produce the same tokens.

--gpt2: 12 layers, 12 heads, 768 dims, vocab 50257, context 1024 (random GPT-2 init),
a 32-token prompt, 200 greedy tokens with the KV cache, against
GPT2LMHeadModel.generate(use_cache=True, do_sample=False) holding npgpt's weights.
"""
import argparse
import os
import time

import common
from common import np

import npgpt.model
from npgpt import GPT, GPTConfig

LECTURE = GPTConfig(vocab_size=65, block_size=256, n_layer=6, n_head=6, n_embd=384)
GPT2 = GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768)


def timed_stream(stream):
    """(tokens, seconds to the first token, seconds for the rest) of a generator."""
    t0 = time.perf_counter()
    tokens = [next(stream)]
    t1 = time.perf_counter()
    tokens += list(stream)
    t2 = time.perf_counter()
    return np.stack(tokens, axis=1), t1 - t0, t2 - t1


def kv_cache_vs_recompute(contexts, n_new, repeats):
    model = GPT(LECTURE, seed=0, reuse_memory=True)  # as generate.py
    rng = np.random.default_rng(0)
    print(f"\n== KV cache vs recompute: lecture model ({LECTURE.n_layer} layers, "
          f"{LECTURE.n_embd} dims, context {LECTURE.block_size}), batch 1, {n_new} tokens "
          f"after a (context - {n_new})-token prompt; best of {repeats}")
    print(f"   {'context':>7s} {'cached tok/s':>13s} {'recompute tok/s':>16s} {'speed-up':>9s}"
          "  same tokens")
    for c in contexts:
        prompt = rng.integers(0, LECTURE.vocab_size, (1, c - n_new))
        best = {}
        toks = {}
        for _ in range(repeats):
            for use_cache in (True, False):
                stream = model.generate_stream(prompt, n_new, temperature=1.0, seed=1,
                                               use_cache=use_cache)
                toks[use_cache], _, rest = timed_stream(stream)
                best[use_cache] = min(best.get(use_cache, np.inf), rest)
        rate = {k: (n_new - 1) / v for k, v in best.items()}
        same = bool(np.array_equal(toks[True], toks[False]))
        print(f"   {c:7d} {rate[True]:13.0f} {rate[False]:16.1f} "
              f"{rate[True] / rate[False]:8.1f}x  {same}")


def gpt2_vs_transformers(n_prompt, n_new, repeats):
    import torch
    import transformers

    model = GPT(GPT2, seed=0, reuse_memory=True)  # as generate.py
    hf = common.transformers_twin(model)

    prompt = np.random.default_rng(0).integers(0, GPT2.vocab_size, (1, n_prompt))
    tprompt = torch.from_numpy(prompt)
    kwargs = dict(do_sample=False, use_cache=True, pad_token_id=0, eos_token_id=None,
                  attention_mask=torch.ones_like(tprompt))

    def run_hf(n):
        with torch.inference_mode():
            t = time.perf_counter()
            out = hf.generate(tprompt, max_new_tokens=n, min_new_tokens=n, **kwargs)
            return out[0, n_prompt:].numpy(), time.perf_counter() - t

    def run_np():
        stream = model.generate_stream(prompt, n_new, temperature=0.0)
        toks, first, rest = timed_stream(stream)
        return toks[0], first, first + rest

    print(f"\n== GPT-2 124M shape ({model.num_params() / 1e6:.1f}M parameters, "
          f"{4 * model.num_params() / 1e6:.0f} MB float32), random weights: "
          f"{n_prompt}-token prompt, {n_new} greedy tokens, KV cache; best of {repeats}, "
          f"alternating; transformers {transformers.__version__} "
          f"(attention: {hf.config._attn_implementation})")
    res = {"npgpt": [], "transformers": []}
    ttft = {"npgpt": [], "transformers": []}
    for i in range(repeats + 1):  # the first round warms up
        np_toks, np_first, np_total = run_np()
        hf_first = run_hf(1)[1]
        hf_toks, hf_total = run_hf(n_new)
        if i:
            res["npgpt"].append(np_total)
            res["transformers"].append(hf_total)
            ttft["npgpt"].append(np_first)
            ttft["transformers"].append(hf_first)
    rate = {k: n_new / min(v) for k, v in res.items()}
    for k in res:
        spread = (max(res[k]) - min(res[k])) / min(res[k])
        print(f"   {k:13s} {rate[k]:6.1f} tok/s  ({1e3 / rate[k]:.1f} ms/token, spread "
              f"{100 * spread:.0f}%); time to first token {1e3 * min(ttft[k]):.0f} ms")
    print(f"   ratio npgpt / transformers tok/s = {rate['npgpt'] / rate['transformers']:.2f}x")
    agree = int(np.argmin(np.append(np_toks == hf_toks, False)))
    print(f"   greedy tokens agree: {agree} of {n_new} "
          f"({'all' if agree == n_new else f'first difference at token {agree}'})")
    if agree < n_new:  # float32 rounding can flip a near-tie of the two best logits
        logits, _ = model.forward(np.concatenate([prompt, np_toks[None, :agree + 1]], axis=1))
        top2 = np.sort(logits[0, n_prompt + agree - 1])[-2:]
        print(f"   (at that position the two best logits differ by {top2[1] - top2[0]:.2e})")


def token_products(model, rng):
    """A function that runs one token's matrix products at batch 1, back to back: the 48
    of GPT-2 124M's blocks (random inputs, the model's weights) and the tied head."""
    P, C = model.params, model.config.n_embd
    weights = [P[f"transformer.h.{i}.{n}.weight"] for i in range(model.config.n_layer)
               for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    xs = [rng.standard_normal((1, w.shape[0]), dtype=np.float32) for w in weights]
    outs = [np.empty((1, w.shape[1]), dtype=np.float32) for w in weights]
    wte_t, x_head = P["transformer.wte.weight"].T, xs[0][:, :C]

    def products():
        for x, w, o in zip(xs, weights, outs):
            np.matmul(x, w, out=o)
        np.matmul(x_head, wte_t)
    return products


def decode_floor(n_prompt, n_new, repeats):
    """GPT-2 124M greedy decoding at batch 1 against its matrix products alone; sampling's
    cost against greedy at batch 1 and 8; N = 8 samples in one batched pass against one.
    No torch needed."""
    model = GPT(GPT2, seed=0, reuse_memory=True)  # as generate.py
    rng = np.random.default_rng(0)
    products = token_products(model, rng)
    big = rng.standard_normal((GPT2.vocab_size * 5 // 2, 1024), dtype=np.float32)  # ~515 MB
    v = rng.standard_normal(1024, dtype=np.float32)
    prompt = rng.integers(0, GPT2.vocab_size, (1, n_prompt))

    choosing = {}  # (B, sampled): seconds inside sample_next per step, the best run's

    def per_token(B=1, **kw):  # seconds per step of B rows after the prefill
        seeds = None if kw.get("temperature", 1.0) == 0 else list(range(B))
        spent = []
        sample_next = npgpt.model.sample_next

        def timed_sample_next(*args):  # the token choice's own time, inside the loop
            t = time.perf_counter()
            ids = sample_next(*args)
            spent.append(time.perf_counter() - t)
            return ids

        npgpt.model.sample_next = timed_sample_next
        try:
            stream = model.generate_stream(np.repeat(prompt, B, axis=0), n_new, seeds=seeds,
                                           **kw)
            _, _, rest = timed_stream(stream)
        finally:
            npgpt.model.sample_next = sample_next
        key = (B, seeds is not None)
        choosing[key] = min(choosing.get(key, np.inf), sum(spent[1:]) / (n_new - 1))
        return rest / (n_new - 1)

    sampling = dict(temperature=0.8, top_k=40, top_p=0.9)
    best = {}
    for i in range(repeats + 1):  # alternating; the first round warms up
        for name, f in [("floor", lambda: loop_time(products, n_new - 1)),
                        ("read", lambda: common_time(lambda: big @ v, 5)),
                        ("greedy", lambda: per_token(temperature=0.0)),
                        ("sampled", lambda: per_token(**sampling)),
                        ("greedy8", lambda: per_token(8, temperature=0.0)),
                        ("sampled8", lambda: per_token(8, **sampling))]:
            t = f()
            if i:
                best[name] = min(best.get(name, np.inf), t)
    mb = 4 * model.num_params() / 1e6
    print(f"\n== GPT-2 124M shape ({mb:.0f} MB float32), random weights: {n_prompt}-token "
          f"prompt, {n_new} tokens with the KV cache; best of {repeats}, alternating")
    print(f"   read bandwidth (a {big.nbytes / 1e6:.0f} MB matrix-vector product): "
          f"{big.nbytes / best['read'] / 1e9:.1f} GB/s")
    print(f"   products alone (48 + head), a loop of {n_new - 1} as greedy's tokens: "
          f"{1e3 * best['floor']:.2f} ms = {1 / best['floor']:.1f} tok/s")
    print(f"   greedy, batch 1: {1e3 * best['greedy']:.2f} ms = {1 / best['greedy']:.1f} tok/s: "
          f"{best['floor'] / best['greedy']:.2f} of the products' rate, "
          f"{mb / 1e3 / best['greedy'] / (big.nbytes / best['read'] / 1e9):.2f} of the read "
          "bandwidth")
    for b, g, s_ in [(1, "greedy", "sampled"), (8, "greedy8", "sampled8")]:
        extra = choosing[b, True] - choosing[b, False]  # sampling's time beyond argmax's
        print(f"   sampling {sampling} at batch {b}: {1e3 * choosing[b, True]:.2f} ms per step "
              f"choosing tokens (argmax {1e3 * choosing[b, False]:.2f} ms): "
              f"+{100 * extra / best[g]:.1f}% of a greedy step; the two steps' times differ "
              f"by {100 * (best[s_] / best[g] - 1):+.1f}% (noisy)")
    print(f"   8 samples in one pass: {8 / best['sampled8']:.1f} tok/s in aggregate, "
          f"{best['sampled'] / best['sampled8'] * 8:.2f}x one sample's {1 / best['sampled']:.1f}")


def decode_bound(n_prompt, n_new, rounds):
    """GPT-2 124M greedy decoding at batch 1 against its matrix products alone, each
    round in a shuffled order (what runs just before a way changes its time: which
    caches and BLAS threads are warm). Best and median of the rounds: the median is the
    steadier figure on a noisy host."""
    model = GPT(GPT2, seed=0, reuse_memory=True)  # as generate.py
    rng = np.random.default_rng(0)
    products = token_products(model, rng)
    prompt = rng.integers(0, GPT2.vocab_size, (1, n_prompt))

    def model_greedy():
        stream = model.generate_stream(prompt, n_new, temperature=0.0)
        return timed_stream(stream)[2] / (n_new - 1)

    ways = {"greedy": model_greedy, "products": lambda: loop_time(products, n_new - 1)}
    times = {name: [] for name in ways}
    order = np.random.default_rng(1)
    for i in range(rounds + 1):  # the first round warms up
        for name in order.permutation(list(ways)):
            t = ways[name]()
            if i:
                times[name].append(t)
    print(f"\n== GPT-2 124M shape, random weights: {n_prompt}-token prompt, {n_new} greedy "
          f"tokens at batch 1; {rounds} rounds, each in a shuffled order")
    floor = {s: stat(times["products"]) for s, stat in (("best", min), ("median", np.median))}
    for name, ts in times.items():
        print(f"   {name:10s} best {1e3 * min(ts):6.2f} ms ({floor['best'] / min(ts):.3f} of "
              f"the products' rate), median {1e3 * np.median(ts):6.2f} ms "
              f"({floor['median'] / np.median(ts):.3f})")


def loop_time(f, n):
    """Mean seconds of one call of f over n back-to-back calls (after one untimed call):
    the statistic a decoding loop's time per token is, over as many tokens."""
    f()
    t = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - t) / n


def common_time(f, n):
    """Best seconds of one call of f over n back-to-back calls."""
    f()
    best = np.inf
    for _ in range(n):
        t = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t)
    return best


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpt2", action="store_true")
    p.add_argument("--decode", action="store_true")
    p.add_argument("--bound", action="store_true")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    limiter = common.begin(args.threads, with_torch=args.gpt2)  # noqa: F841
    if args.decode:
        decode_floor(32, 128, args.repeats)
    elif args.bound:
        decode_bound(32, 128, args.repeats)
    elif args.gpt2:
        gpt2_vs_transformers(32, 200, args.repeats)
    else:
        kv_cache_vs_recompute((64, 128, 256), 32, args.repeats)


if __name__ == "__main__":
    main()
