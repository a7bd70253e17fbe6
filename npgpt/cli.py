"""What the command-line scripts share: one clear line on a user error, no traceback."""
import sys

from .errors import NpgptError


def run_cli(main, argv=None):
    """Run main(argv); print `error: ...` and exit non-zero for a user error (bad
    file, flag, config, checkpoint), 130 on Ctrl-C."""
    try:
        return main(argv)
    except (NpgptError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except MemoryError:
        print("error: out of memory; use a smaller --batch-size, --block-size or model",
              file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


def load_model(ckpt, model_dir=None, device="cpu"):
    """(model, tokenizer, extra) for generate.py and eval.py: a Hugging Face GPT-2 folder
    (model_dir, with its own tokenizer; extra is {}) or a train.py checkpoint (ckpt, whose
    tokenizer travels inside; extra holds the rest, e.g. its train_config)."""
    from .checkpoint import load
    from .hf import from_pretrained
    from .tokenizers import tokenizer_from_json, tokenizer_from_pretrained

    if model_dir:
        return (from_pretrained(model_dir, device=device),
                tokenizer_from_pretrained(model_dir), {})
    model, extra = load(ckpt, device=device)
    if "tokenizer" not in extra:
        raise NpgptError(f"{ckpt} holds no tokenizer; it was not written by train.py")
    return model, tokenizer_from_json(extra["tokenizer"]), extra
