"""Sample text from a trained npgpt checkpoint.   python generate.py --seed "ROMEO:"   (--help)"""
import argparse
import sys

import numpy as np

from npgpt.backend import auto_device_note, to_numpy
from npgpt.cli import load_model, run_cli
from npgpt.data import read_text
from npgpt.errors import NpgptError


def build_parser():
    p = argparse.ArgumentParser(prog="generate.py", description="Sample from an npgpt checkpoint.")
    p.add_argument("--ckpt", default="out/ckpt.npz", help="checkpoint to load (default: out/ckpt.npz)")
    p.add_argument("--model", default=None, metavar="DIR",
                   help="sample from a Hugging Face GPT-2 folder (config.json + model.safetensors "
                        "+ tokenizer files) instead of --ckpt")
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--seed", default="\n", help="the prompt text (default: a newline)")
    prompt.add_argument("--seed-file", default=None, metavar="PATH",
                        help="read the prompt from a UTF-8 text file (nanoGPT's "
                             "--start=FILE:prompt.txt), used exactly as written")
    p.add_argument("--max-new-tokens", type=int, default=500, help="tokens to generate (default: 500)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 means greedy (default: 1.0)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: smallest set with mass >= p")
    p.add_argument("--num-samples", type=int, default=1,
                   help="independent samples (default: 1), drawn --batch-size at a time")
    p.add_argument("--batch-size", type=int, default=None,
                   help="samples drawn together as the rows of one batched forward pass "
                        "(default: all of them, at most 8). Each is printed when it is "
                        "complete; a batch of one streams token by token. Every sample has "
                        "its own random stream, so in a float64 model a sample is the same "
                        "text in any batch; in float32 the batched and single products "
                        "round differently, so a near-tie between two tokens may flip and "
                        "a batched sample can differ from the same one drawn alone")
    p.add_argument("--rng-seed", type=int, default=None,
                   help="seed of the sampler: sample i uses the seed [S, i] (default: random)")
    p.add_argument("--ignore-eos", action="store_true",
                   help="GPT-2 tokenizers: go on past <|endoftext|> (printed as that text). "
                        "By default a sample ends there, as in transformers, and is printed "
                        "without it; char and bpe tokenizers have no such token")
    p.add_argument("--device", default="cpu", choices=["cpu", "gpu", "auto"], help="default: cpu")
    return p


class StreamDecoder:
    """Turns a growing list of ids into the text not yet printed. A multi-byte character
    split across tokens is held back until it is complete."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.printed = tokenizer, [], 0

    def push(self, token):
        self.ids.append(int(token))
        text = self.tokenizer.decode(self.ids)
        end = len(text.rstrip("\ufffd"))
        new, self.printed = text[self.printed:end], max(self.printed, end)
        return new

    def flush(self):
        return self.tokenizer.decode(self.ids)[self.printed:]


def end_sample(i, n):
    """Close sample i of n: a newline, then the separator unless it is the last."""
    sys.stdout.write("\n" + ("-" * 40 + "\n" if i + 1 < n else ""))
    sys.stdout.flush()


def stream_one(stream, tokenizer, seed_text, stop, i, n):
    """Print sample i of n (a batch of one) token by token, as it is sampled."""
    decoder = StreamDecoder(tokenizer)
    sys.stdout.write(seed_text)
    for token in stream:
        token = int(to_numpy(token)[0])
        if token == stop:  # <|endoftext|>: the sample ends before it
            break
        sys.stdout.write(decoder.push(token))
        sys.stdout.flush()
    sys.stdout.write(decoder.flush())
    end_sample(i, n)


def print_batch(stream, tokenizer, seed_text, stop, rows, n):
    """Print samples rows[0], rows[1], ... (the rows of one batched stream) in order, each
    as soon as it and the ones before it are complete: a row is complete at its
    <|endoftext|> (stop, not printed) or when the stream ends."""
    ids = [[] for _ in rows]         # each row's new ids
    complete = [False for _ in rows]  # the rows that reached stop
    printed = 0                       # rows printed so far

    def print_complete():  # the complete rows not yet printed, up to the first incomplete one
        nonlocal printed
        while printed < len(rows) and complete[printed]:
            sys.stdout.write(seed_text + tokenizer.decode(ids[printed]))
            end_sample(rows[printed], n)
            printed += 1

    for token in stream:
        for b, t in enumerate(to_numpy(token).tolist()):  # (B,) one new id per row
            if complete[b]:
                continue  # a finished row is padded with stop: nothing more to keep
            if t == stop:
                complete[b] = True
            else:
                ids[b].append(t)
        print_complete()
    complete[:] = [True] * len(rows)  # the stream has ended: every row is complete
    print_complete()


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.max_new_tokens < 0 or args.num_samples < 1:
        raise NpgptError("--max-new-tokens must be >= 0 and --num-samples >= 1")
    if args.batch_size is not None and args.batch_size < 1:
        raise NpgptError(f"--batch-size must be >= 1 (the samples drawn in one batched pass), "
                         f"got {args.batch_size}")
    if args.seed_file is not None:  # checked as eval.py checks --data (empty, binary, UTF-8)
        args.seed = read_text(args.seed_file)
    model, tokenizer, _ = load_model(args.ckpt, args.model, args.device)
    model.reuse_memory = True  # sampling keeps no layer output: reuse the memory (faster)
    note = auto_device_note(args.device, model.device)
    if note:
        print(note, file=sys.stderr)
    prompt = tokenizer.encode(args.seed)
    if not prompt:
        raise NpgptError("the prompt encodes to no tokens; pass a non-empty --seed")
    # GPT-2's tokenizer has <|endoftext|> (eot_token); char and bpe tokenizers have none
    stop = None if args.ignore_eos else getattr(tokenizer, "eot_token", None)
    n = args.num_samples
    batch_size = min(n, 8) if args.batch_size is None else args.batch_size
    for first in range(0, n, batch_size):
        rows = range(first, min(first + batch_size, n))  # the sample numbers i of this batch
        # sample i's own stream, the one it has when drawn alone: a row's draws do not
        # depend on the batch (None: fresh randomness for every row)
        seeds = [None if args.rng_seed is None else [args.rng_seed, i] for i in rows]
        idx = np.repeat(np.asarray([prompt], dtype=np.int64), len(rows), axis=0)  # (B,T)
        stream = model.generate_stream(idx, args.max_new_tokens, args.temperature, args.top_k,
                                       args.top_p, seeds=seeds, stop_token=stop)
        if len(rows) == 1:
            stream_one(stream, tokenizer, args.seed, stop, rows[0], n)
        else:
            print_batch(stream, tokenizer, args.seed, stop, rows, n)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
