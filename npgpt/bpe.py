"""Byte-level byte-pair encoding (BPE): the engine behind the "bpe" and "gpt2" tokenizers.

Text is first turned into UTF-8 bytes, so the base vocabulary is just the 256 byte
values and ANY string can be encoded: a character never seen in training simply
stays as its 1-4 bytes. Training then repeats one step: find the most frequent pair
of adjacent tokens and add a new token that stands for the pair (a "merge"), until
the vocabulary has the requested size. Frequent words and word pieces end up as single
tokens, so a text needs fewer tokens than it has bytes.

Before counting pairs, text is pre-tokenised into chunks (a word with its leading
space, a run of digits or punctuation, a run of whitespace) and merges never cross a
chunk boundary, so " the" can become one token but "e t" (end of one word, start of
the next) never does. Encoding applies the learned merges to each chunk in the order
they were learned (lowest rank first), exactly as GPT-2 does. Decoding concatenates
the tokens' bytes and decodes UTF-8 once at the end, so a token that holds half of a
multi-byte character is fine as long as the full sequence is decoded.

    chunks:  "Hello world" -> ["Hello", " world"]
    bytes:   " world" -> [32, 119, 111, 114, 108, 100]
    merges:  (32, 119) -> 256 " w",  (256, 111) -> 257 " wo", ...
"""
import heapq
import re
from collections import Counter, defaultdict

import numpy as np

from .errors import NpgptError

# npgpt's own pre-tokeniser, standard-library `re` only (GPT-2's pattern needs the
# third-party `regex` module for \p{L} and \p{N}). In order: English contractions, a
# run of letters, of digits, or of other symbols (each with an optional leading space),
# then whitespace: a run not followed by text (so the space before a word stays with
# the word), or any remaining run. [^\W\d_] is "a word character that is neither a
# digit nor '_'" (letters); together the alternatives match every character, so
# findall() loses nothing.
SPLIT_PATTERN = r"'(?i:[sdmt]|ll|ve|re)| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+"
CACHE_LIMIT = 1 << 18  # chunks whose encodings are memoised before the cache is reset
_NEVER = (float("inf"), None)  # the rank of a pair that has no merge


def utf8(chunk):
    """The UTF-8 bytes of a chunk; a lone surrogate (not valid Unicode) is a clear error."""
    try:
        return chunk.encode("utf-8")
    except UnicodeEncodeError as e:
        raise NpgptError(f"the text contains {chunk[e.start:e.end]!r}, a lone surrogate: "
                         "not valid Unicode, so it cannot be encoded as UTF-8") from None


def token_ids(ids, vocab_size):
    """ids (any iterable of ints, or an integer array) as a 1-D int64 NumPy array, each
    checked to be in 0..vocab_size-1; anything else raises NpgptError."""
    arr = np.asarray(ids if isinstance(ids, np.ndarray) else list(ids))
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise NpgptError(f"token ids must be a flat sequence of integers, got an array of "
                         f"shape {arr.shape} and dtype {arr.dtype}")
    bad = arr[(arr < 0) | (arr >= vocab_size)]
    if bad.size:
        raise NpgptError(f"token id {bad[0]} is out of range: this tokenizer's vocabulary "
                         f"has ids 0..{vocab_size - 1}")
    return arr.astype(np.int64)


def merge_pair(ids, pair, new_id):
    """ids with every non-overlapping occurrence of `pair` (scanning left to right)
    replaced by new_id: merge_pair([1, 1, 1], (1, 1), 9) == [9, 1]."""
    a, b = pair
    out, i, n = [], 0, len(ids)
    while i < n:
        if i + 1 < n and ids[i] == a and ids[i + 1] == b:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def train(text, vocab_size, pattern=SPLIT_PATTERN):
    """Learn merges on `text` until the vocabulary has vocab_size tokens: a list of
    (a, b) pairs, merge i creating token 256 + i.

    Ties are broken deterministically: the pair with the highest count wins, and among
    equal counts the smallest (a, b) (compared as a tuple of token ids). Training stops
    early when no pair is left (every chunk is a single token), so the vocabulary can be
    smaller than requested on a tiny text.

    Each distinct chunk is counted once with its frequency; pair counts are updated
    only for the chunks that contain the merged pair, and the best pair is found with a
    heap of (-count, pair) whose stale entries are skipped when popped."""
    if vocab_size < 256:
        raise ValueError(f"a byte-level BPE vocabulary has the 256 byte values plus merges: "
                         f"vocab_size must be >= 256, got {vocab_size}")
    freqs = Counter(re.findall(pattern, text))
    words = [list(utf8(chunk)) for chunk in freqs]   # each distinct chunk as token ids
    counts = list(freqs.values())                     # how often that chunk occurs
    pair_count = defaultdict(int)                     # pair -> occurrences in the text
    where = defaultdict(set)                          # pair -> chunks that may contain it
    for i, w in enumerate(words):
        for pair in zip(w, w[1:]):
            pair_count[pair] += counts[i]
            where[pair].add(i)
    heap = [(-c, pair) for pair, c in pair_count.items()]
    heapq.heapify(heap)
    merges = []
    while heap and len(merges) < vocab_size - 256:
        neg, pair = heapq.heappop(heap)
        if pair_count.get(pair) != -neg:
            continue  # stale: this pair's count changed since the entry was pushed
        new_id = 256 + len(merges)
        merges.append(pair)
        delta = defaultdict(int)
        for i in where.pop(pair):
            w = words[i]
            merged = merge_pair(w, pair, new_id)
            if len(merged) == len(w):
                continue  # stale index: an earlier merge already consumed the pair here
            for p in zip(w, w[1:]):
                delta[p] -= counts[i]
            for p in zip(merged, merged[1:]):
                delta[p] += counts[i]
                where[p].add(i)
            words[i] = merged
        for p, d in delta.items():
            if d:
                pair_count[p] += d
                if pair_count[p] > 0:
                    heapq.heappush(heap, (-pair_count[p], p))
                else:
                    del pair_count[p]
                    where.pop(p, None)
    return merges


def bytes_to_unicode():
    """GPT-2's reversible map byte -> printable character, used in its vocabulary files.

    Printable Latin-1 bytes map to themselves; the other 68 (control characters, space,
    ...) map to chr(256), chr(257), ... in byte order, so a space is 'Ġ' (chr(288))
    and a newline 'Ċ' (chr(266))."""
    keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
            + list(range(ord("®"), ord("ÿ") + 1)))
    mapping, extra = {}, 0
    for b in range(256):
        if b in keep:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


class ByteLevelBPE:
    """Encode and decode with merges: the part shared by BPETokenizer and GPT2Tokenizer.

    split:       text -> list of chunks (the pre-tokeniser)
    token_bytes: token id -> its bytes (None for an id not in the vocabulary)
    byte_ids:    byte value -> its token id (None for a byte the vocabulary lacks)
    merges:      (a, b, new_id) triples in priority order (rank 0 first)
    """

    def __init__(self, split, token_bytes, byte_ids, merges):
        self._split = split
        self._token_bytes = list(token_bytes)
        self._byte_ids = list(byte_ids)
        self._ranks = {}  # (a, b) -> (rank, new_id); the first rule for a pair wins
        for rank, (a, b, new_id) in enumerate(merges):
            self._ranks.setdefault((a, b), (rank, new_id))
        self._cache = {}  # chunk -> tuple of token ids

    @property
    def vocab_size(self):
        return len(self._token_bytes)

    def encode(self, text):
        """Token ids (list of int) of `text`."""
        ids, cache = [], self._cache
        for chunk in self._split(text):
            toks = cache.get(chunk)
            if toks is None:
                if len(cache) >= CACHE_LIMIT:
                    cache.clear()
                toks = cache[chunk] = self._encode_chunk(chunk)
            ids.extend(toks)
        return ids

    def _encode_chunk(self, chunk):
        """Apply the merges to one chunk: repeatedly merge the lowest-ranked pair present."""
        data = utf8(chunk)
        ids = [self._byte_ids[b] for b in data]
        if None in ids:
            b = data[ids.index(None)]
            raise NpgptError(f"byte 0x{b:02x} (in {chunk!r}) has no token in this "
                             "vocabulary, so the text cannot be encoded")
        ranks = self._ranks
        while len(ids) > 1:
            pair = min(zip(ids, ids[1:]), key=lambda p: ranks.get(p, _NEVER))
            if pair not in ranks:
                break  # no pair left that has a merge
            ids = merge_pair(ids, pair, ranks[pair][1])
        return tuple(ids)

    def decode_bytes(self, ids):
        """The concatenated bytes of the tokens (ids checked by token_ids)."""
        table = self._token_bytes
        ids = token_ids(ids, len(table)).tolist()
        try:
            return b"".join([table[i] for i in ids])
        except TypeError:  # a None: an id between the vocabulary's ids that names no token
            missing = next(i for i in ids if table[i] is None)
            raise NpgptError(f"token id {missing} is not in this tokenizer's vocabulary") from None

    def decode(self, ids):
        """Text of the tokens: bytes joined first, then UTF-8-decoded once (an incomplete
        character, e.g. from a truncated sequence, becomes U+FFFD)."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")
