"""Export an npgpt checkpoint as a Hugging Face GPT-2 folder.

    python -m npgpt.export out/ckpt.npz out/hf
    python -c "from transformers import GPT2LMHeadModel; GPT2LMHeadModel.from_pretrained('out/hf')"

The folder gets config.json, model.safetensors and the checkpoint's tokenizer: a GPT-2
tokenizer as vocab.json + merges.txt (transformers loads it), npgpt's own "char" or
"bpe" tokenizer as npgpt_tokenizer.json, which transformers cannot load but
`npgpt.tokenizers.tokenizer_from_json(open("out/hf/npgpt_tokenizer.json").read())`
can (see npgpt/hf.py). Needs the safetensors package (`pip install safetensors`).
"""
import argparse
import os
import sys

from .checkpoint import load
from .cli import run_cli
from .hf import save_pretrained
from .model import DTYPES


def export(checkpoint, folder, dtype=None):
    """Write the npgpt checkpoint `checkpoint` (from npgpt.save / train.py) to `folder`."""
    model, extra = load(checkpoint)
    save_pretrained(model, folder, tokenizer=extra.get("tokenizer"), dtype=dtype)
    return model, extra


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m npgpt.export",
        description="Write an npgpt checkpoint as a Hugging Face GPT-2 folder (config.json, "
                    "model.safetensors, tokenizer files) that transformers' "
                    "GPT2LMHeadModel.from_pretrained loads.")
    parser.add_argument("checkpoint", help="an npgpt checkpoint, e.g. out/ckpt.npz")
    parser.add_argument("folder", help="output folder (created if needed)")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="dtype of the exported weights (default: the checkpoint's)")
    args = parser.parse_args(argv)
    model, extra = export(args.checkpoint, args.folder, args.dtype)
    tok = "its tokenizer" if extra.get("tokenizer") else "no tokenizer (none in the checkpoint)"
    print(f"wrote {os.path.abspath(args.folder)}: {model.num_params():,} parameters and {tok}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
