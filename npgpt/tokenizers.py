"""Tokenizers: text <-> token ids. Three kinds, all with the same interface:

    "char"  one token per distinct character of the training corpus (Karpathy's
            lecture gpt.py); it cannot encode a character the corpus lacked
    "bpe"   byte-level BPE trained by npgpt on your corpus (see npgpt/bpe.py);
            encodes any string losslessly
    "gpt2"  OpenAI GPT-2's byte-level BPE (50257 tokens), read from its released files
            (encoder.json + vocab.bpe, or Hugging Face's vocab.json + merges.txt)

    tok = build_tokenizer("bpe", text, vocab_size=512)
    ids = tok.encode("To be, or not to be")     # list of int
    tok.decode(ids)                             # "To be, or not to be"
    tok = tokenizer_from_json(tok.to_json())    # what a checkpoint stores

Every tokenizer has encode(text), decode(ids), vocab_size, name and to_json().
"""
import json
import os
import re

import numpy as np

from . import bpe
from .errors import NpgptError

DEFAULT_BPE_VOCAB = 512
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_EOT = "<|endoftext|>"


def token_dtype(vocab_size):
    """The smallest unsigned dtype that holds every id: uint16 up to 65536 tokens."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


class CharTokenizer:
    """One token per character; ids follow the sorted characters of the corpus
    (sorted by code point, as `sorted(set(text))`)."""

    name = "char"

    def __init__(self, chars):
        chars = "".join(chars)
        if not chars or sorted(set(chars)) != list(chars):
            raise NpgptError("a char tokenizer needs a non-empty string of distinct, "
                             "sorted characters")
        self.chars = chars
        self._codes = np.frombuffer(chars.encode("utf-32-le", "surrogatepass"), dtype="<u4")

    @classmethod
    def train(cls, text):
        """The vocabulary of `text`: its distinct characters, sorted."""
        if not text:
            raise ValueError("cannot build a char tokenizer from an empty text")
        return cls(sorted(set(text)))

    @property
    def vocab_size(self):
        return len(self.chars)

    def encode_array(self, text):
        """Token ids of `text` as an int64 array, looked up for all characters at once."""
        codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")
        ids = np.searchsorted(self._codes, codes)  # position of each code in the vocabulary
        known = self._codes[np.minimum(ids, len(self._codes) - 1)] == codes
        if not known.all():
            unknown = sorted(set(chr(c) for c in codes[~known].tolist()))
            shown = ", ".join(repr(c) for c in unknown[:10])
            more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
            raise NpgptError(
                f"the text contains {len(unknown)} character(s) that are not in this char "
                f"tokenizer's vocabulary: {shown}{more}. The model was trained on a corpus "
                "without them; remove or replace them, or train with --tokenizer bpe, "
                "which encodes any text")
        return ids.astype(np.int64)

    def encode(self, text):
        return self.encode_array(text).tolist()

    def decode(self, ids):
        codes = self._codes[bpe.token_ids(ids, self.vocab_size)]
        return codes.tobytes().decode("utf-32-le", "surrogatepass")  # codes: <u4

    def to_json(self):
        return json.dumps({"kind": self.name, "chars": self.chars})

    def __repr__(self):
        return f"CharTokenizer(vocab_size={self.vocab_size})"


class BPETokenizer(bpe.ByteLevelBPE):
    """Byte-level BPE learned by npgpt: ids 0..255 are the bytes, id 256 + i is merge i.

    Text is split with a standard-library `re` pattern (bpe.SPLIT_PATTERN), stored in
    the JSON so a checkpoint keeps working if the default ever changes."""

    name = "bpe"

    def __init__(self, merges, pattern=bpe.SPLIT_PATTERN):
        token_bytes = [bytes([b]) for b in range(256)]
        triples = []
        for i, (a, b) in enumerate(merges):
            new_id = 256 + i
            if not (0 <= a < new_id and 0 <= b < new_id):
                raise NpgptError(f"BPE merge {i} ({a}, {b}) refers to a token that does not "
                                 "exist yet")
            token_bytes.append(token_bytes[a] + token_bytes[b])
            triples.append((a, b, new_id))
        self.merges = [(a, b) for a, b, _ in triples]
        self.pattern = pattern
        super().__init__(re.compile(pattern).findall, token_bytes, range(256), triples)

    @classmethod
    def train(cls, text, vocab_size=DEFAULT_BPE_VOCAB, pattern=bpe.SPLIT_PATTERN):
        """Learn vocab_size - 256 merges on `text` (fewer if the text runs out of pairs)."""
        if not text:
            raise ValueError("cannot train a BPE tokenizer on an empty text")
        return cls(bpe.train(text, vocab_size, pattern), pattern)

    def to_json(self):
        return json.dumps({"kind": self.name, "pattern": self.pattern,
                           "merges": [list(m) for m in self.merges]})

    def __repr__(self):
        return f"BPETokenizer(vocab_size={self.vocab_size})"


class GPT2Tokenizer(bpe.ByteLevelBPE):
    """OpenAI GPT-2's tokenizer: byte-level BPE over GPT-2's printable byte alphabet.

    encoder maps a token, written with bytes_to_unicode's characters ('Ġthe' is " the"),
    to its id; merges are (left, right) token pairs, most important first.

    A special token written in the input text ("<|endoftext|>") is encoded as ordinary
    text, never as its special id (tiktoken's default refuses such text instead), so
    user text cannot inject one; to mark a document boundary, append eot_token (50256
    for GPT-2, None if the vocabulary has no "<|endoftext|>") to the ids."""

    name = "gpt2"

    def __init__(self, encoder, merges):
        regex = _import_regex()
        byte_to_char = bpe.bytes_to_unicode()
        char_to_byte = {c: b for b, c in byte_to_char.items()}
        token_bytes = [None] * (max(encoder.values(), default=-1) + 1)
        for token, i in encoder.items():
            try:
                token_bytes[i] = bytes([char_to_byte[c] for c in token])
            except KeyError:
                raise NpgptError(f"token {token!r} uses a character outside GPT-2's byte "
                                 "alphabet") from None
        triples = []
        for rank, (a, b) in enumerate(merges):
            missing = [t for t in (a, b, a + b) if t not in encoder]
            if missing:
                raise NpgptError(f"merge {rank} {a!r} {b!r} needs token {missing[0]!r}, which "
                                 "is not in the vocabulary")
            triples.append((encoder[a], encoder[b], encoder[a + b]))
        self.encoder = dict(encoder)
        self.merges = [(a, b) for a, b in merges]
        self.eot_token = encoder.get(GPT2_EOT)
        byte_ids = [encoder.get(byte_to_char[b]) for b in range(256)]
        super().__init__(regex.compile(GPT2_PATTERN).findall, token_bytes, byte_ids, triples)

    @classmethod
    def from_files(cls, encoder_path, merges_path):
        """Read encoder.json / vocab.json and vocab.bpe / merges.txt; any problem raises
        NpgptError naming the file."""
        encoder = _check_encoder(_read_json(encoder_path), encoder_path)
        merges = _read_merges(merges_path)
        try:
            return cls(encoder, merges)
        except NpgptError as e:
            raise NpgptError(f"{merges_path} does not match {encoder_path}: {e}") from None

    def to_json(self):
        return json.dumps({"kind": self.name, "encoder": self.encoder,
                           "merges": [f"{a} {b}" for a, b in self.merges]})

    def __repr__(self):
        return f"GPT2Tokenizer(vocab_size={self.vocab_size})"


def _check_encoder(encoder, where):
    """encoder itself when it is a GPT-2 vocabulary ({token: id}, ids distinct and >= 0),
    else NpgptError naming `where`."""
    if not isinstance(encoder, dict) or not all(
            isinstance(t, str) and isinstance(i, int) and not isinstance(i, bool) and i >= 0
            for t, i in encoder.items()):
        raise NpgptError(f"{where}: not a GPT-2 vocabulary (a JSON object mapping each token "
                         "to a non-negative integer id)")
    if len(set(encoder.values())) != len(encoder):
        raise NpgptError(f"{where}: two tokens share an id")
    return encoder


def _import_regex():
    try:
        import regex
    except ImportError:
        raise NpgptError("the gpt2 tokenizer needs the `regex` package for GPT-2's "
                         "pre-tokenisation pattern: pip install regex (or the npgpt[hf] "
                         "extra)") from None
    return regex


def _read_text(path):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise NpgptError(f"{path}: no such file") from None
    except UnicodeDecodeError:
        raise NpgptError(f"{path}: not valid UTF-8; the file is corrupt") from None
    except OSError as e:
        raise NpgptError(f"{path}: cannot be read ({e.strerror or e})") from None


def _read_json(path):
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise NpgptError(f"{path}: not valid JSON ({e}); the file is corrupt") from None


def _read_merges(path):
    """The (left, right) pairs of a vocab.bpe / merges.txt, skipping its '#version' line."""
    merges = []
    for n, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip() or (n == 1 and line.startswith("#version")):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise NpgptError(f"{path}, line {n}: expected two tokens separated by a space, "
                             f"got {line!r}; the file is corrupt")
        merges.append(tuple(parts))
    return merges


NPGPT_TOKENIZER_FILE = "npgpt_tokenizer.json"  # an exported char/bpe tokenizer's to_json()


def tokenizer_from_pretrained(folder):
    """The tokenizer a model folder holds: npgpt_tokenizer.json (npgpt's own char or bpe
    tokenizer, as npgpt.hf.save_pretrained writes it) if present, else GPT-2's BPE from
    vocab.json + merges.txt (Hugging Face) or encoder.json + vocab.bpe (OpenAI)."""
    own = os.path.join(os.fspath(folder), NPGPT_TOKENIZER_FILE)
    if os.path.isfile(own):
        return tokenizer_from_json(_read_text(own))
    for vocab, merges in (("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe")):
        vocab_path, merges_path = os.path.join(folder, vocab), os.path.join(folder, merges)
        if os.path.exists(vocab_path) or os.path.exists(merges_path):
            return GPT2Tokenizer.from_files(vocab_path, merges_path)
    raise NpgptError(f"{folder}: no GPT-2 tokenizer files found; expected vocab.json + "
                     "merges.txt (Hugging Face) or encoder.json + vocab.bpe (OpenAI)")


def tokenizer_from_json(text):
    """The tokenizer described by to_json()'s text; corrupt text raises NpgptError."""
    try:
        spec = json.loads(text)
        kind = spec["kind"]
        if kind == "char":
            return CharTokenizer(spec["chars"])
        if kind == "bpe":
            return BPETokenizer([(int(a), int(b)) for a, b in spec["merges"]], spec["pattern"])
        if kind == "gpt2":  # checked as GPT2Tokenizer.from_files checks its files
            encoder = _check_encoder(spec["encoder"], "the tokenizer description")
            return GPT2Tokenizer(encoder, [tuple(m.split(" ")) for m in spec["merges"]])
    except (ValueError, KeyError, TypeError, AttributeError, re.error) as e:
        raise NpgptError(f"corrupt tokenizer description ({type(e).__name__}: {e})") from None
    raise NpgptError(f"unknown tokenizer kind {kind!r} (known: char, bpe, gpt2)")


def build_tokenizer(kind, text, vocab_size=None):
    """Train a "char" or "bpe" tokenizer on `text`. vocab_size is for "bpe" only
    (default DEFAULT_BPE_VOCAB); a char vocabulary is the text's characters."""
    if kind == "char":
        if vocab_size is not None:
            raise ValueError("the char tokenizer's vocabulary is the corpus's characters; "
                             "vocab_size applies to --tokenizer bpe only")
        return CharTokenizer.train(text)
    if kind == "bpe":
        return BPETokenizer.train(text, DEFAULT_BPE_VOCAB if vocab_size is None else vocab_size)
    if kind == "gpt2":
        raise ValueError("the gpt2 tokenizer is pretrained, not built from text: use "
                         "tokenizer_from_pretrained(folder)")
    raise ValueError(f"unknown tokenizer kind {kind!r} (choose char or bpe)")


def encode_to_array(tok, text):
    """The token ids of `text` as a uint16 array (uint32 for more than 65536 tokens)."""
    ids = tok.encode_array(text) if isinstance(tok, CharTokenizer) else tok.encode(text)
    return np.asarray(ids, dtype=token_dtype(tok.vocab_size))
