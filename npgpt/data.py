"""Text corpora -> token files on disk -> random training batches.

    text file --(tokenizer, once)--> out/data/tokens.bin (uint16 when V <= 65536)
              --(np.memmap)--> train = first 90% of tokens, val = last 10%
              --(get_batch)--> x (B,T), y (B,T) = x shifted by one

Batches are gathered from a memory map, so a corpus larger than memory trains.
The default corpus, Tiny Shakespeare, is looked up in $NPGPT_DATA_DIR, then in the
user cache folder, and downloaded once (verified by its sha256) if it is in neither.
"""
import hashlib
import json
import os
import urllib.request

import numpy as np

from .checkpoint import atomic_write
from .errors import NpgptError
from .tokenizers import encode_to_array, token_dtype

SHAKESPEARE = "tinyshakespeare.txt"
SHAKESPEARE_URL = ("https://raw.githubusercontent.com/karpathy/char-rnn/master/"
                   "data/tinyshakespeare/input.txt")
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
TRAIN_FRACTION = 0.9
CHUNK_CHARS = 1 << 24  # text is read and encoded 16M characters at a time


def cache_dir():
    """~/.cache/npgpt (or $XDG_CACHE_HOME/npgpt)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "npgpt")


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def shakespeare_path(download=True):
    """Path of a verified copy of Tiny Shakespeare, downloading it once if needed."""
    candidates = []
    if os.environ.get("NPGPT_DATA_DIR"):
        candidates.append(os.path.join(os.environ["NPGPT_DATA_DIR"], SHAKESPEARE))
    cached = os.path.join(cache_dir(), SHAKESPEARE)
    candidates.append(cached)
    for path in candidates:
        if os.path.exists(path):
            if sha256_of(path) != SHAKESPEARE_SHA256:
                raise NpgptError(f"{path} is not Tiny Shakespeare (sha256 mismatch); delete it "
                                 "so it can be downloaded again, or pass --data FILE")
            return path
    if not download:
        raise NpgptError(_where_to_put_it(candidates))
    try:
        with urllib.request.urlopen(SHAKESPEARE_URL, timeout=30) as response:
            payload = response.read()
    except OSError as e:
        raise NpgptError(f"could not download Tiny Shakespeare ({e}).\n"
                         + _where_to_put_it(candidates)) from None
    if hashlib.sha256(payload).hexdigest() != SHAKESPEARE_SHA256:
        raise NpgptError(f"the download from {SHAKESPEARE_URL} failed its sha256 check; "
                         "try again later, or pass --data FILE")
    atomic_write(cached, lambda f: f.write(payload),
                 elsewhere="a folder of your choice named by NPGPT_DATA_DIR")
    return cached


def _where_to_put_it(candidates):
    return (f"Tiny Shakespeare was not found (looked in {', '.join(candidates)}). Put "
            f"{SHAKESPEARE} (sha256 {SHAKESPEARE_SHA256[:12]}...) in a folder and set "
            "NPGPT_DATA_DIR to it, or train on your own text with --data FILE")


def resolve_corpus(data):
    """'shakespeare' or a path -> the path of a readable UTF-8 text file."""
    if data == "shakespeare":
        return shakespeare_path()
    if not os.path.exists(data):
        raise NpgptError(f"--data {data}: no such file (use 'shakespeare' or a UTF-8 text file)")
    if os.path.isdir(data):
        raise NpgptError(f"--data {data}: is a folder; pass a UTF-8 text file")
    return data


def iter_text(path):
    """The file's text in chunks of CHUNK_CHARS characters, with clear errors for empty,
    binary or non-UTF-8 files."""
    empty = True
    try:
        with open(path, encoding="utf-8", newline="") as f:
            for chunk in iter(lambda: f.read(CHUNK_CHARS), ""):
                if "\x00" in chunk:
                    raise NpgptError(f"{path}: looks binary (it contains NUL bytes); "
                                     "pass a UTF-8 text file")
                empty = False
                yield chunk
    except UnicodeDecodeError as e:
        raise NpgptError(f"{path}: not valid UTF-8 (byte {e.start} of a chunk: {e.reason}); "
                         "convert it to UTF-8 first, e.g. iconv -t UTF-8") from None
    except OSError as e:
        raise NpgptError(f"{path}: cannot be read ({e.strerror or e})") from None
    if empty:
        raise NpgptError(f"{path}: the file is empty; pass a file with some text in it")


def read_text(path, max_chars=None):
    """The text of a file (up to max_chars characters), checked as in iter_text."""
    parts, n = [], 0
    for chunk in iter_text(path):
        parts.append(chunk)
        n += len(chunk)
        if max_chars is not None and n >= max_chars:
            break
    text = "".join(parts)
    return text if max_chars is None else text[:max_chars]


class TokenData:
    """A corpus encoded once into a token file, split 90/10 into train and val.
    `fingerprint`: the sha256 of the corpus and of the tokenizer, the token dtype, and the
    size and sha256 of the token file."""

    def __init__(self, path, fingerprint):
        self.fingerprint = fingerprint
        self.tokens = np.memmap(path, dtype=fingerprint["dtype"], mode="r")  # 1-D tokens
        n_train = int(TRAIN_FRACTION * len(self.tokens))
        self.splits = {"train": self.tokens[:n_train], "val": self.tokens[n_train:]}

    def check_fits(self, block_size):
        for name, split in self.splits.items():
            if len(split) < block_size + 1:
                raise NpgptError(f"the corpus is too short: its {name} split has {len(split)} "
                                 f"tokens, but one example needs block_size + 1 = "
                                 f"{block_size + 1}; use more text or a smaller --block-size")

    def get_batch(self, split, batch_size, block_size, rng, part=slice(None)):
        """x, y of shape (B,T) int64 (NumPy); y is x shifted one token to the right.

        `part` keeps a slice of the batch_size drawn rows: a data-parallel rank draws the
        whole global batch's offsets (the same on every rank) and gathers only its slice."""
        data = self.splits[split]
        ix = rng.integers(0, len(data) - block_size, size=batch_size)[part]  # (B,) start offsets
        windows = np.lib.stride_tricks.sliding_window_view(data, block_size + 1)  # (N-T, T+1)
        rows = windows[ix].astype(np.int64)  # (B, T+1), gathered from the memory map
        return rows[:, :-1], rows[:, 1:]


def prepare_tokens(corpus_path, tokenizer, folder):
    """Encode the corpus into folder/tokens.bin once, chunk by chunk (the whole corpus
    is never in memory); reuse the file while corpus and tokenizer are unchanged."""
    os.makedirs(folder, exist_ok=True)
    path, meta_path = os.path.join(folder, "tokens.bin"), os.path.join(folder, "tokens.json")
    fingerprint = {"corpus_sha256": sha256_of(corpus_path),
                   "dtype": token_dtype(tokenizer.vocab_size).name,
                   "tokenizer_sha256": hashlib.sha256(tokenizer.to_json().encode()).hexdigest()}
    cached = _read_cache_meta(meta_path)
    # reused only when made from this corpus and tokenizer and still whole: the size and
    # hash of tokens.bin as written (a truncated or replaced file is encoded again)
    if (cached is not None and os.path.exists(path)
            and {k: cached.get(k) for k in fingerprint} == fingerprint
            and os.path.getsize(path) == cached.get("tokens_bytes")
            and sha256_of(path) == cached.get("tokens_sha256")):
        return TokenData(path, cached)
    digest, size = hashlib.sha256(), 0

    def write(f):
        nonlocal size
        for chunk in iter_text(corpus_path):
            data = encode_to_array(tokenizer, chunk).tobytes()  # token_dtype
            digest.update(data)
            size += len(data)
            f.write(data)

    if os.path.exists(meta_path):
        os.unlink(meta_path)  # no description of a tokens.bin that is being replaced
    atomic_write(path, write)
    fingerprint.update(tokens_bytes=size, tokens_sha256=digest.hexdigest())
    atomic_write(meta_path, lambda f: f.write(json.dumps(fingerprint).encode()))
    return TokenData(path, fingerprint)


def _read_cache_meta(meta_path):
    """tokens.json's dict, or None where it is missing or unreadable (then rebuilt)."""
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None
