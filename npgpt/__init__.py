"""npgpt: a GPT built from first principles in NumPy, every backward pass derived by hand."""
from .checkpoint import load, save
from .errors import CheckpointError, NpgptError
from .hf import from_pretrained
from .model import GPT, GPTConfig
from .optim import AdamW, clip_grad_norm
from .tokenizers import tokenizer_from_pretrained

__all__ = ["GPT", "GPTConfig", "AdamW", "clip_grad_norm", "save", "load", "from_pretrained",
           "tokenizer_from_pretrained", "NpgptError", "CheckpointError"]
__version__ = "0.1.0"
