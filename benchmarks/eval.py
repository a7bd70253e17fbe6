"""Scoring speed (eval.py's npgpt.evaluate): the small preset on Tiny Shakespeare's
validation split, and a GPT-2 124M-sized model against Hugging Face transformers.

    python benchmarks/eval.py [--ckpt out/ckpt.npz]   # small preset, val split, stride 64
    python benchmarks/eval.py --gpt2                  # GPT-2 124M shape: npgpt vs transformers

Default mode: the checkpoint's model (default out/ckpt.npz, the default run's), or where
there is none a random model of the small preset's shape (4 layers, 4 heads, 128 dims,
context 128, vocab 65: the same cost), on the val split of Tiny Shakespeare (the last 10%
of its characters, 111,540 tokens) at stride 64, batch 8, as `python eval.py --stride 64`.

--gpt2: 12 layers, 12 heads, 768 dims, vocab 50257, context 1024 (random GPT-2 init in
npgpt, copied into GPT2LMHeadModel), --tokens random token ids at stride 512, batch 8.
transformers scores the same windows in the same batches with Hugging Face's recipe
(labels -100 on the targets an earlier window scored; its loss times the scored count);
both must agree on the loss. Also the peak resident memory while npgpt scores (VmHWM,
reset first): the process holds torch's libraries and both models' weights besides.
"""
import argparse
import os
import time

import common
from common import np

from npgpt import GPT, GPTConfig, load
from npgpt.data import TRAIN_FRACTION, read_text, shakespeare_path
from npgpt.evaluate import batches, evaluate, windows
from npgpt.tokenizers import CharTokenizer, tokenizer_from_json

SMALL = GPTConfig(vocab_size=65, block_size=128, n_layer=4, n_head=4, n_embd=128)
GPT2 = GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768)


def small_on_shakespeare(ckpt, repeats):
    text = read_text(shakespeare_path())
    if os.path.exists(ckpt):
        model, extra = load(ckpt)
        tok, what = tokenizer_from_json(extra["tokenizer"]), ckpt
    else:
        model, tok = GPT(SMALL, seed=0), CharTokenizer.train(text)
        what = f"no {ckpt}: a random model of the small preset's shape"
    ids = tok.encode_array(text)
    val = ids[int(TRAIN_FRACTION * len(ids)):]  # as train.py splits the default run's tokens
    print(f"\n== {what}: Tiny Shakespeare's val split ({len(val):,} tokens), stride 64, "
          f"batch 8; best of {repeats}")
    best = np.inf
    for _ in range(repeats):
        t = time.perf_counter()
        result = evaluate(model, val, 64, 8, tok)
        best = min(best, time.perf_counter() - t)
    print(f"   {best:.2f} s ({result.tokens / best:,.0f} tokens/s): loss {result.loss:.4f}, "
          f"perplexity {result.perplexity:.3f}, {result.bits_per_char:.4f} bits per char")


def gpt2_vs_transformers(n_tokens, stride, batch_size, repeats):
    import torch
    import transformers

    model = GPT(GPT2, seed=0)
    ids = np.random.default_rng(0).integers(0, GPT2.vocab_size, n_tokens)
    spans = windows(n_tokens, GPT2.block_size, stride)
    n_scored = sum(end - first for _, end, first in spans)

    common.reset_peak_rss()
    before = common.rss_mb()
    result = evaluate(model, ids, stride, batch_size)
    peak = common.rss_mb("VmHWM")

    hf = common.transformers_twin(model)

    def run_hf():
        """Hugging Face's recipe on the same windows, batched as npgpt batches them."""
        nats = 0.0
        for group in batches(spans, batch_size):
            x = torch.from_numpy(np.stack([ids[b:e] for b, e, _ in group]))  # (B,L)
            labels = x.clone()
            for i, (b, e, f) in enumerate(group):
                labels[i, :f - b] = -100  # the targets an earlier window scored
            with torch.inference_mode():
                loss = hf(x, labels=labels).loss  # mean over the shifted valid labels
            nats += float(loss) * int((labels[:, 1:] != -100).sum())
        return nats

    def run_np():
        return evaluate(model, ids, stride, batch_size).nats

    print(f"\n== GPT-2 124M shape ({model.num_params() / 1e6:.1f}M parameters), random "
          f"weights: {n_tokens:,} tokens, {len(spans)} windows of {GPT2.block_size}, stride "
          f"{stride} ({n_scored:,} scored), batch {batch_size}; best of {repeats}, "
          f"alternating; transformers {transformers.__version__} "
          f"(attention: {hf.config._attn_implementation})")
    print(f"   npgpt peak RSS while scoring: {peak:.0f} MB ({before:.0f} MB before: Python, "
          "NumPy, torch's libraries, the weights)")
    times = {"npgpt": [], "transformers": []}
    nats = {}
    for i in range(repeats + 1):  # the first round warms up
        for name, fn in (("npgpt", run_np), ("transformers", run_hf)):
            t = time.perf_counter()
            nats[name] = fn()
            if i:
                times[name].append(time.perf_counter() - t)
    rate = {k: n_scored / min(v) for k, v in times.items()}
    for k, v in times.items():
        spread = (max(v) - min(v)) / min(v)
        print(f"   {k:13s} {rate[k]:8.0f} tokens/s  ({min(v):.2f} s, spread {100 * spread:.0f}%)")
    print(f"   ratio npgpt / transformers tokens/s = {rate['npgpt'] / rate['transformers']:.2f}x")
    print(f"   loss: npgpt {nats['npgpt'] / n_scored:.6f}, transformers "
          f"{nats['transformers'] / n_scored:.6f} (first pass {result.loss:.6f})")


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpt2", action="store_true")
    p.add_argument("--ckpt", default="out/ckpt.npz")
    p.add_argument("--tokens", type=int, default=8 * 512 + 512, help="--gpt2: tokens scored "
                   "(default: 8 windows of 1024 at stride 512, one batch)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    limiter = common.begin(args.threads, with_torch=args.gpt2)  # noqa: F841
    if args.gpt2:
        gpt2_vs_transformers(args.tokens, 512, 8, args.repeats)
    else:
        small_on_shakespeare(args.ckpt, args.repeats)


if __name__ == "__main__":
    main()
