"""npgpt: a GPT built from first principles in NumPy, every backward pass derived by hand."""
from .checkpoint import load, save
from .errors import CheckpointError, NpgptError
from .model import GPT, GPTConfig
from .optim import AdamW, clip_grad_norm

__all__ = ["GPT", "GPTConfig", "AdamW", "clip_grad_norm", "save", "load",
           "NpgptError", "CheckpointError"]
__version__ = "0.1.0"
