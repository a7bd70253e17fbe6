"""Score a model on a whole text: loss, perplexity, bits per character and per byte.

    python eval.py                                   # out/ckpt.npz on its run's val split
    python eval.py --ckpt out/ckpt.npz --data FILE   # on any UTF-8 text file
    python eval.py --model gpt2-folder --data FILE   # a Hugging Face GPT-2 folder
(--help; the method is in npgpt/evaluate.py)
"""
import argparse
import json
import os
import sys
import time

import numpy as np

from npgpt import data as datasets
from npgpt.backend import auto_device_note
from npgpt.cli import load_model, run_cli
from npgpt.errors import NpgptError
from npgpt.evaluate import check_stride, encode_text, evaluate, windows

_EPILOG = """\
windows: a window of block_size tokens slides by --stride S, as in Hugging Face's
"Perplexity of fixed-length models". Each window scores only the tokens the previous one
did not reach, each predicted from the tokens before it in the window, so every scored
token sees at least block_size - S tokens of context. The file's first token is never
scored. With S < block_size every other token is scored exactly once; with S = block_size
the windows do not overlap and each window's first token goes unscored. A smaller S
gives more context (usually a lower loss) and costs block_size / S times the forwards
of non-overlapping windows.

bits per char / byte: the scored tokens' total nats / ln 2 / the characters (or UTF-8
bytes) those tokens decode to; they compare char, BPE and GPT-2 tokenizers."""


def build_parser():
    p = argparse.ArgumentParser(prog="eval.py", description="Score a model on a whole text "
                                "file: loss, perplexity, bits per character and per byte.",
                                epilog=_EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="out/ckpt.npz", help="checkpoint to score (default: "
                   "out/ckpt.npz)")
    p.add_argument("--model", default=None, metavar="DIR",
                   help="score a Hugging Face GPT-2 folder (config.json + model.safetensors "
                        "+ tokenizer files) instead of --ckpt; needs --data")
    p.add_argument("--data", default=None, metavar="FILE",
                   help="UTF-8 text file to score, or 'shakespeare' (default: the validation "
                        "split of the checkpoint's own run, the last 10%% of its corpus's "
                        "tokens, as train.py splits it)")
    p.add_argument("--stride", type=int, default=None, metavar="S",
                   help="tokens each window moves, 1 to block_size (default: half the block "
                        "size); S = block_size: non-overlapping windows, whose first tokens "
                        "go unscored (see below)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward (default: 8)")
    p.add_argument("--skip-unknown", action="store_true",
                   help="char-level models: drop the characters the model never saw (the "
                        "text closes up around them) instead of stopping")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    p.add_argument("--device", default="cpu", choices=["cpu", "gpu", "auto"], help="default: cpu")
    return p


def run_split(args, extra):
    """(ids, description) of the validation split of the run that wrote args.ckpt: its
    corpus encoded into the run's token cache (OUT_DIR/data, reused as train.py reuses it)."""
    config = extra.get("train_config")
    if not isinstance(config, dict) or "data" not in config:
        raise NpgptError(f"{args.ckpt} records no training corpus (no train_config); pass "
                         "--data FILE")
    corpus = config["data"]
    if corpus != "shakespeare" and not os.path.isfile(corpus):
        raise NpgptError(f"{args.ckpt} was trained on {corpus}, which is not here (paths are "
                         "relative to where train.py ran); pass --data FILE")
    tokens = datasets.prepare_tokens(datasets.resolve_corpus(corpus), args.tokenizer,
                                     os.path.join(os.path.dirname(args.ckpt) or ".", "data"))
    return np.asarray(tokens.splits["val"], dtype=np.int64), f"{corpus} (val split)"


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.model and args.data is None:
        raise NpgptError("--model needs --data FILE: a Hugging Face folder has no training "
                         "split of its own to score")
    if args.batch_size < 1:
        raise NpgptError(f"--batch-size must be positive, got {args.batch_size}")
    model, args.tokenizer, extra = load_model(args.ckpt, args.model, args.device)
    note = auto_device_note(args.device, model.device)
    if note:
        print(note, file=sys.stderr)
    T = model.config.block_size
    try:
        stride = check_stride(max(1, T // 2) if args.stride is None else args.stride, T)
    except NpgptError:
        raise NpgptError(f"--stride must be from 1 to the model's block size ({T}), got "
                         f"{args.stride}") from None
    dropped = 0
    if args.data is None:
        ids, source = run_split(args, extra)
    else:
        text = datasets.read_text(datasets.resolve_corpus(args.data))
        ids, dropped = encode_text(args.tokenizer, text, args.skip_unknown)
        source = args.data
    if len(ids) < 2:
        raise NpgptError(f"{source}: {len(ids)} token(s); scoring needs at least two (the "
                         "first token is never scored: nothing comes before it)")
    result, seconds = score(model, ids, stride, args)
    report = {"model": args.model or args.ckpt, "data": source, **result.as_dict(),
              "dropped_chars": dropped, "seconds": round(seconds, 3),
              "tokens_per_s": round(result.tokens / seconds, 1)}
    if args.json:
        print(json.dumps(report))
    else:
        print_report(report)
    return 0


def score(model, ids, stride, args):
    """(evaluate()'s result, seconds) with a progress bar of tokens per second on stderr."""
    from tqdm import tqdm

    total = sum(end - first for _, end, first in windows(len(ids), model.config.block_size,
                                                           stride))
    with tqdm(total=total, unit="tok", unit_scale=True, desc="eval", dynamic_ncols=True,
              disable=None) as bar:  # (None: no bar when stderr is not a terminal)
        t0 = time.perf_counter()
        result = evaluate(model, ids, stride, args.batch_size, args.tokenizer, bar.update)
        return result, time.perf_counter() - t0


def print_report(r):
    print(f"{r['model']} on {r['data']}: {r['windows']:,} windows of up to "
          f"{r['block_size']} tokens, stride {r['stride']}")
    if r["dropped_chars"]:
        print(f"dropped {r['dropped_chars']:,} character(s) the model never saw "
              "(--skip-unknown); they are not counted")
    print(f"tokens scored   {r['tokens']:,} ({r['chars']:,} characters, {r['bytes']:,} bytes)")
    print(f"loss            {r['loss']:.4f} nats per token")
    print(f"perplexity      {r['perplexity']:.4f}")
    print(f"bits per char   {r['bits_per_char']:.4f}")
    print(f"bits per byte   {r['bits_per_byte']:.4f}")
    print(f"time            {r['seconds']:.1f} s ({r['tokens_per_s']:,.0f} tokens/s)")


if __name__ == "__main__":
    sys.exit(run_cli(main))
