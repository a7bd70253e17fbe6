"""Sample text from a trained npgpt checkpoint.   python generate.py --seed "ROMEO:"   (--help)"""
import argparse
import sys

import numpy as np

from npgpt.backend import auto_device_note
from npgpt.checkpoint import load
from npgpt.cli import run_cli
from npgpt.data import read_text
from npgpt.errors import NpgptError
from npgpt import from_pretrained, tokenizer_from_pretrained
from npgpt.tokenizers import tokenizer_from_json


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
    p.add_argument("--num-samples", type=int, default=1, help="independent samples (default: 1)")
    p.add_argument("--rng-seed", type=int, default=None, help="seed of the sampler (default: random)")
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


def load_model(args):
    """(model, tokenizer) from --model DIR (Hugging Face GPT-2) or --ckpt (train.py's)."""
    if args.model:
        model = from_pretrained(args.model, device=args.device)
        return model, tokenizer_from_pretrained(args.model)
    model, extra = load(args.ckpt, device=args.device)
    if "tokenizer" not in extra:
        raise NpgptError(f"{args.ckpt} holds no tokenizer; it was not written by train.py")
    return model, tokenizer_from_json(extra["tokenizer"])


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.max_new_tokens < 0 or args.num_samples < 1:
        raise NpgptError("--max-new-tokens must be >= 0 and --num-samples >= 1")
    if args.seed_file is not None:  # checked as eval.py checks --data (empty, binary, UTF-8)
        args.seed = read_text(args.seed_file)
    model, tokenizer = load_model(args)
    model.reuse_memory = True  # sampling keeps no layer output: reuse the memory (faster)
    note = auto_device_note(args.device, model.device)
    if note:
        print(note, file=sys.stderr)
    prompt = tokenizer.encode(args.seed)
    if not prompt:
        raise NpgptError("the prompt encodes to no tokens; pass a non-empty --seed")
    idx = np.asarray([prompt], dtype=np.int64)
    for i in range(args.num_samples):
        seed = None if args.rng_seed is None else [args.rng_seed, i]
        decoder = StreamDecoder(tokenizer)
        sys.stdout.write(args.seed)
        for token in model.generate_stream(idx, args.max_new_tokens, args.temperature,
                                           args.top_k, args.top_p, seed=seed):
            sys.stdout.write(decoder.push(token[0]))
            sys.stdout.flush()
        sys.stdout.write(decoder.flush() + "\n")
        if i + 1 < args.num_samples:
            sys.stdout.write("-" * 40 + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
