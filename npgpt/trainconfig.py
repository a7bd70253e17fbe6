"""Training settings: one commented dataclass, three presets, and the argparse built from them.

Every field of TrainConfig is a command-line flag of train.py (`n_layer` -> `--n-layer`);
a preset fills the fields, and flags given on the command line override the preset.
"""
import argparse
import inspect
from dataclasses import dataclass, fields

from .errors import NpgptError
from .parallel import resolve_workers


@dataclass
class TrainConfig:
    # data
    data: str = "shakespeare"       # 'shakespeare' (Tiny Shakespeare) or the path of a UTF-8 text file
    tokenizer: str = "char"         # 'char' (sorted characters of the corpus) or 'bpe' (byte-level BPE trained here)
    init_from: str = ""             # fine-tune from a Hugging Face GPT-2 folder (config.json + model.safetensors) with its tokenizer
    vocab_size: int = 512           # vocabulary of the bpe tokenizer (>= 256; ignored for char)
    # model
    n_layer: int = 4                # transformer blocks
    n_head: int = 4                 # attention heads per block
    n_embd: int = 128               # embedding width
    block_size: int = 128           # context length in tokens
    dropout: float = 0.0            # dropout probability while training
    # optimisation
    batch_size: int = 32            # sequences per micro-batch
    grad_accum: int = 1             # micro-batches per optimizer step (same update as one batch grad_accum times larger)
    max_iters: int = 2000           # total optimizer steps (a resumed run continues up to this)
    lr: float = 3e-3                # peak learning rate, reached after warmup
    min_lr: float = 3e-4            # learning rate at the end of the cosine decay
    warmup_iters: int = 100         # linear warmup steps
    lr_decay_iters: int = 0         # cosine horizon; 0 means max_iters (as in nanoGPT), after it lr stays at min_lr
    weight_decay: float = 0.1       # AdamW decoupled weight decay, on 2-D matrices only
    beta1: float = 0.9              # AdamW first-moment decay
    beta2: float = 0.99             # AdamW second-moment decay
    grad_clip: float = 1.0          # clip the global gradient norm to this (0 disables)
    # evaluation, logging, checkpoints
    eval_interval: int = 250        # evaluate train/val loss and save a checkpoint every this many steps
    eval_iters: int = 20            # batches averaged per evaluation
    log_interval: int = 10          # write a step record to log.jsonl every this many steps
    out_dir: str = "out"            # where ckpt.npz, log.jsonl, loss.png and the token cache go
    # runtime
    seed: int = 1337                # seeds initialisation, batches and dropout
    device: str = "cpu"             # 'cpu', 'gpu' (CuPy) or 'auto' (GPU when CuPy sees one)
    dtype: str = "float32"          # 'float32', 'float64' or 'float16' (mixed precision for GPUs: float16 model, float32 master weights, loss scaling; slower than float32 on a CPU)
    tf32: bool = False              # GPU only: TF32 matrix products (faster; inputs rounded to 10 mantissa bits)
    workers: str = "auto"           # CPU threads that split each batch by rows: 'auto' (one per core) or a count

    def validate(self):
        """Raise NpgptError naming the first impossible setting."""
        positive = ("vocab_size", "n_layer", "n_head", "n_embd", "block_size", "batch_size",
                    "grad_accum", "eval_interval", "eval_iters", "log_interval")
        for name in positive:
            if getattr(self, name) <= 0:
                raise NpgptError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        checks = [
            (self.n_embd % self.n_head == 0,
             f"--n-embd ({self.n_embd}) must be divisible by --n-head ({self.n_head})"),
            (self.tokenizer in ("char", "bpe") or self.init_from,
             f"--tokenizer must be char or bpe, got {self.tokenizer!r}"),
            (self.tokenizer != "bpe" or self.vocab_size >= 256,
             f"--vocab-size must be at least 256 for the byte-level bpe tokenizer, got {self.vocab_size}"),
            (0.0 <= self.dropout < 1.0, f"--dropout must be in [0, 1), got {self.dropout}"),
            (self.max_iters >= 0, f"--max-iters must be >= 0, got {self.max_iters}"),
            (self.lr > 0 and self.min_lr >= 0, f"--lr must be > 0 and --min-lr >= 0, got {self.lr}, {self.min_lr}"),
            (self.warmup_iters >= 0 and self.lr_decay_iters >= 0, "--warmup-iters and --lr-decay-iters must be >= 0"),
            (0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0, "--beta1 and --beta2 must be in [0, 1)"),
            (self.weight_decay >= 0 and self.grad_clip >= 0, "--weight-decay and --grad-clip must be >= 0"),
            (self.dtype in ("float32", "float64", "float16"),
             f"--dtype must be float32, float64 or float16, got {self.dtype!r}"),
            (self.device in ("cpu", "gpu", "auto"), f"--device must be cpu, gpu or auto, got {self.device!r}"),
            (not self.tf32 or (self.device != "cpu" and self.dtype == "float32"),
             "--tf32 applies to float32 matrix products on a GPU: use it with --device gpu "
             "(or auto) and --dtype float32"),
        ]
        try:
            resolve_workers(self.workers, self.batch_size, "cpu")
        except ValueError as e:
            raise NpgptError(str(e)) from None
        for ok, message in checks:
            if not ok:
                raise NpgptError(message)


PRESETS = {
    # seconds on a laptop: for tests and smoke runs
    "tiny": dict(n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=8, max_iters=50,
                 lr=1e-3, min_lr=1e-4, warmup_iters=5, eval_interval=25, eval_iters=4,
                 log_interval=5),
    # the default: minutes on a laptop CPU
    "small": dict(),
    # Karpathy's lecture gpt.py: for a GPU
    "lecture": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=64,
                    max_iters=5000, lr=3e-4, min_lr=3e-5, warmup_iters=100, dropout=0.2,
                    eval_interval=500, eval_iters=200),
}

# fields that define the model or its data: fixed once a run has started
MODEL_FIELDS = ("data", "tokenizer", "init_from", "vocab_size", "n_layer", "n_head", "n_embd",
                "block_size")

_HELP_EPILOG = """\
learning-rate schedule: linear warmup over --warmup-iters to --lr, then cosine decay to
--min-lr at --lr-decay-iters (default: --max-iters), constant --min-lr after that.
Extending a finished run with --resume and a larger --max-iters therefore continues at
--min-lr unless you also raise --lr-decay-iters (its horizon was fixed when it started).

checkpoints: out/ckpt.npz is written atomically at every eval and at the end; Ctrl-C,
SIGTERM and SIGHUP save one and exit (130, 143, 129). --resume continues from it up to --max-iters in total, bit-identical
to an uninterrupted run on the same device, dtype and --workers."""


def build_parser():
    parser = argparse.ArgumentParser(
        prog="train.py", description="Train a GPT with npgpt (NumPy/CuPy, hand-written backward).",
        epilog=_HELP_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small",
                        help="a bundle of settings (default: small); flags override it")
    parser.add_argument("--resume", action="store_true",
                        help="continue from OUT_DIR/ckpt.npz with its settings")
    comments = _field_comments()
    for f in fields(TrainConfig):
        flag, help_text = "--" + f.name.replace("_", "-"), comments.get(f.name, "")
        if f.type is bool:  # a switch: given means True
            parser.add_argument(flag, action="store_const", const=True, default=None,
                                help=help_text)
        else:
            parser.add_argument(flag, type=f.type, default=None, metavar=f.name.upper(),
                                help=f"{help_text} (small: {f.default})")
    return parser


def _field_comments():
    """The comment after each field above, reused as its --help text."""
    comments = {}
    for line in inspect.getsource(TrainConfig).splitlines():
        if ":" in line and "#" in line:
            name = line.split(":")[0].strip()
            comments[name] = line.split("#", 1)[1].strip()
    return comments


def config_from_args(args):
    """TrainConfig from the preset, overridden by the flags actually given."""
    return TrainConfig(**{**PRESETS[args.preset], **given_flags(args)})


def given_flags(args):
    """{field: value} of the TrainConfig flags given on the command line."""
    return {f.name: getattr(args, f.name) for f in fields(TrainConfig)
            if getattr(args, f.name) is not None}

