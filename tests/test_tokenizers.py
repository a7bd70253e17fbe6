"""Tokenizers: exact round trips, clear errors, JSON round trips, BPE training and GPT-2."""
import importlib.util
import json
import re

import numpy as np
import pytest

from conftest import shared_data_dir
from npgpt import bpe
from npgpt.errors import NpgptError
from npgpt.tokenizers import (BPETokenizer, CharTokenizer, GPT2Tokenizer, build_tokenizer,
                              encode_to_array, token_dtype, tokenizer_from_json,
                              tokenizer_from_pretrained)

SAMPLE = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
          "You are all resolved rather to die than to famish? We'll see 1,234 of them.\t") * 20
UNSEEN = ["naïve café, 日本語のテキスト 🤖🎉 e\u0301\u0302 \x00\x07\x1b[0m\r\n",
          "\u2028\u3000\ufeff\U0010ffff\U0001f468\u200d\U0001f469", "", " ", "____--__"]
needs_regex = pytest.mark.skipif(importlib.util.find_spec("regex") is None,
                                 reason="the gpt2 tokenizer needs `pip install regex`")


@pytest.fixture(scope="module")
def shakespeare():
    folder = shared_data_dir()
    if folder is None:
        pytest.skip("Tiny Shakespeare not found (set NPGPT_DATA_DIR)")
    return (folder / "tinyshakespeare.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def bpe512(shakespeare):
    """BPE trained on the first 200 kB of Shakespeare to 512 tokens."""
    return build_tokenizer("bpe", shakespeare[:200_000], vocab_size=512)


def random_strings(n, seed=0):
    """n random strings mixing ASCII, control characters, Latin-1, combining marks,
    Greek/Cyrillic, CJK, unusual spaces, emoji and other astral code points; never a
    surrogate (U+D800..U+DFFF is not in any range)."""
    ranges = [(0x20, 0x7F), (0x00, 0x20), (0xA0, 0x100), (0x300, 0x370), (0x370, 0x500),
              (0x4E00, 0xA000), (0x2000, 0x2030), (0x1F300, 0x1FB00), (0x10000, 0x110000)]
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        picks = rng.integers(len(ranges), size=rng.integers(1, 30))
        out.append("".join(chr(rng.integers(*ranges[k])) for k in picks))
    return out


# ---------------------------------------------------------------- char

def test_char_vocabulary_and_round_trip():
    tok = build_tokenizer("char", SAMPLE)
    assert tok.name == "char" and list(tok.chars) == sorted(set(SAMPLE))
    assert tok.vocab_size == len(set(SAMPLE))
    ids = tok.encode(SAMPLE)
    assert ids[:3] == [tok.chars.index(c) for c in "Fir"]
    assert tok.decode(ids) == SAMPLE and tok.decode(np.array(ids, dtype=np.uint16)) == SAMPLE
    arr = encode_to_array(tok, SAMPLE)
    assert arr.dtype == np.uint16 and arr.tolist() == ids
    assert tok.encode("") == [] and tok.decode([]) == ""


def test_char_unknown_characters_are_named():
    tok = build_tokenizer("char", "abc ")
    with pytest.raises(NpgptError) as e:
        tok.encode("a cab Ωé!")
    msg = str(e.value)
    assert "'Ω'" in msg and "'é'" in msg and "'!'" in msg and "3 character" in msg
    assert "trained on a corpus without them" in msg
    with pytest.raises(NpgptError, match=r"15 character.*and 5 more"):
        tok.encode("ABCDEFGHIJKLMNO")


def test_char_bad_ids_and_kinds():
    tok = build_tokenizer("char", "abc")
    for ids in ([3], [-1], np.array([0, 7])):
        with pytest.raises(NpgptError, match="out of range"):
            tok.decode(ids)
    with pytest.raises(ValueError, match="bpe only"):
        build_tokenizer("char", "abc", vocab_size=10)
    with pytest.raises(ValueError, match="empty"):
        build_tokenizer("char", "")
    with pytest.raises(ValueError, match="unknown tokenizer kind"):
        build_tokenizer("wordpiece", "abc")


def test_char_json_round_trip():
    tok = build_tokenizer("char", SAMPLE + "\x00\U0001f916")
    tok2 = tokenizer_from_json(tok.to_json())
    assert isinstance(tok2, CharTokenizer) and tok2.chars == tok.chars
    assert tok2.encode(SAMPLE) == tok.encode(SAMPLE)


def test_corrupt_json_is_a_clear_error():
    for text in ["not json", "{}", '{"kind": "char", "chars": "ba"}', '{"kind": "bpe"}',
                 '{"kind": "bpe", "pattern": " ", "merges": [[300, 1]]}',
                 '{"kind": "bpe", "pattern": "(", "merges": []}']:
        with pytest.raises(NpgptError):
            tokenizer_from_json(text)
    with pytest.raises(NpgptError, match="unknown tokenizer kind 'morse'"):
        tokenizer_from_json('{"kind": "morse"}')


# ---------------------------------------------------------------- bpe

def test_bpe_round_trips_training_text_and_unseen_text():
    tok = build_tokenizer("bpe", SAMPLE, vocab_size=300)
    assert tok.name == "bpe" and tok.vocab_size == 300
    assert tok.decode(tok.encode(SAMPLE)) == SAMPLE
    for s in UNSEEN + random_strings(300):
        ids = tok.encode(s)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == s, repr(s)
        assert tok.decode(encode_to_array(tok, s)) == s


def test_bpe_split_pattern_loses_nothing():
    for s in UNSEEN + random_strings(200, seed=1):
        assert "".join(re.findall(bpe.SPLIT_PATTERN, s)) == s
    assert re.findall(bpe.SPLIT_PATTERN, "We'll see  1,234 of_them!\n\n") == [
        "We", "'ll", " see", " ", " 1", ",", "234", " of", "_", "them", "!", "\n\n"]


def test_bpe_decode_of_a_split_character():
    tok = BPETokenizer([])  # bytes only: "🤖" is 4 tokens
    ids = tok.encode("é🤖")
    assert ids == list("é🤖".encode("utf-8"))
    assert tok.decode(ids) == "é🤖"
    assert tok.decode(ids[:-1]) == "é\ufffd"  # an incomplete character is replaced
    with pytest.raises(NpgptError, match="out of range"):
        tok.decode([256])
    with pytest.raises(NpgptError, match="surrogate"):
        tok.encode("a\ud800b")


def test_bpe_vocab_size_honoured(shakespeare, bpe512):
    assert bpe512.vocab_size == 512 and len(bpe512.merges) == 256
    ids = encode_to_array(bpe512, shakespeare[:50_000])
    assert ids.dtype == np.uint16 and ids.max() < 512 and ids.max() >= 400
    assert build_tokenizer("bpe", shakespeare[:20_000], vocab_size=256).encode("ab") == [97, 98]
    # a tiny text runs out of pairs: "aaaa" -> "aa aa" -> "aaaa", then nothing is left
    assert BPETokenizer.train("aaaa", vocab_size=1000).merges == [(97, 97), (256, 256)]
    with pytest.raises(ValueError, match=">= 256"):
        build_tokenizer("bpe", SAMPLE, vocab_size=255)


def test_bpe_compresses_shakespeare(shakespeare, bpe512):
    held_out = shakespeare[200_000:300_000]  # text the merges were not learned on
    ratio = len(held_out.encode("utf-8")) / len(bpe512.encode(held_out))
    assert ratio > 1.5, ratio
    assert bpe512.decode(bpe512.encode(held_out)) == held_out


def test_bpe_merges_stay_inside_chunks(bpe512):
    for i in range(256, bpe512.vocab_size):
        piece = bpe512.decode([i])  # Shakespeare is ASCII: every token is whole characters
        assert len(re.findall(bpe.SPLIT_PATTERN, piece)) == 1, repr(piece)
    assert bpe512.decode([bpe512.encode(" the")[0]]) == " the"


def naive_train(text, vocab_size):
    """Reference trainer: recount every pair of every chunk before each merge."""
    words = [list(c.encode("utf-8")) for c in re.findall(bpe.SPLIT_PATTERN, text)]
    merges = []
    while len(merges) < vocab_size - 256:
        counts = {}
        for w in words:
            for p in zip(w, w[1:]):
                counts[p] = counts.get(p, 0) + 1
        if not counts:
            break
        best = min(counts, key=lambda p: (-counts[p], p))  # documented tie-break
        merges.append(best)
        words = [bpe.merge_pair(w, best, 255 + len(merges)) for w in words]
    return merges


def test_bpe_incremental_training_matches_recounting():
    text = SAMPLE + " aaaaaaa bbb ééé aaa"  # overlapping runs and multi-byte characters
    assert BPETokenizer.train(text, vocab_size=330).merges == naive_train(text, 330)


def test_bpe_training_is_deterministic_with_documented_ties():
    assert BPETokenizer.train(SAMPLE, 320).merges == BPETokenizer.train(SAMPLE, 320).merges
    # chunks "ab", " cd": every pair occurs once, so the smallest pair wins each tie:
    # (32, 99) " c" -> 256, then (97, 98) "ab" -> 257, then (256, 100) " cd" -> 258
    assert BPETokenizer.train("ab cd", vocab_size=300).merges == [(32, 99), (97, 98), (256, 100)]


def test_bpe_json_round_trip(bpe512, shakespeare):
    tok2 = tokenizer_from_json(bpe512.to_json())
    assert isinstance(tok2, BPETokenizer) and tok2.merges == bpe512.merges
    assert tok2.to_json() == bpe512.to_json()
    text = shakespeare[:30_000] + "".join(UNSEEN)
    assert tok2.encode(text) == bpe512.encode(text)


def test_token_dtype():
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


# ---------------------------------------------------------------- gpt2
# A hand-made GPT-2 style vocabulary ('Ġ' is GPT-2's character for a space byte):
HAND_VOCAB = {"h": 0, "e": 1, "l": 2, "o": 3, "w": 4, "r": 5, "d": 6, "Ġ": 7,
              "he": 8, "ll": 9, "hell": 10, "hello": 11, "Ġw": 12, "or": 13, "Ġwor": 14,
              "ld": 15, "lo": 16, "<|endoftext|>": 17}
HAND_MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "l o"]  # rank 0..8
HAND_CASES = {
    # h e l l o: "h e" (rank 0) -> he l l o; "l l" (1) beats "l o" (8) -> he ll o;
    # "he ll" (2) -> hell o; "hell o" (3) -> hello
    "hello": [11],
    # chunks "hello", " world"; Ġ w o r l d: "Ġ w" (4) -> Ġw o r l d; "o r" (5) ->
    # Ġw or l d; "Ġw or" (6) -> Ġwor l d; "l d" (7) -> Ġwor ld
    "hello world": [11, 14, 15],
    # GPT-2's \s+(?!\S) leaves the last space to the word: "hello", " ", " world"
    "hello  world": [11, 7, 14, 15],
    "lol": [16, 2],      # l o l: only "l o" (8) applies -> lo l
    "llo": [9, 3],       # "l l" (1) is applied before "l o" (8) -> ll o
    "lll": [9, 2],       # occurrences are merged left to right -> ll l
    "hold": [0, 3, 15],  # h o l d: only "l d" (7) applies -> h o ld
}


def write_hand_files(folder, hugging_face):
    folder.mkdir()
    names = ("vocab.json", "merges.txt") if hugging_face else ("encoder.json", "vocab.bpe")
    (folder / names[0]).write_text(json.dumps(HAND_VOCAB), encoding="utf-8")
    (folder / names[1]).write_text("#version: 0.2\n" + "\n".join(HAND_MERGES) + "\n",
                                   encoding="utf-8")
    return folder


@needs_regex
@pytest.mark.parametrize("hugging_face", [True, False])
def test_gpt2_hand_made_vocabulary(tmp_path, hugging_face):
    tok = tokenizer_from_pretrained(write_hand_files(tmp_path / "tok", hugging_face))
    assert tok.name == "gpt2" and tok.vocab_size == 18 and tok.eot_token == 17
    for text, ids in HAND_CASES.items():
        assert tok.encode(text) == ids, text
        assert tok.decode(ids) == text
    assert tok.decode([17]) == "<|endoftext|>"
    with pytest.raises(NpgptError, match="byte 0x21"):
        tok.encode("hello!")  # "!" is not in this tiny vocabulary
    tok2 = tokenizer_from_json(tok.to_json())
    assert [tok2.encode(t) for t in HAND_CASES] == list(HAND_CASES.values())


@needs_regex
def test_gpt2_ids_between_the_vocabulary_ids_are_refused():
    tok = GPT2Tokenizer({"a": 0, "b": 2}, [])  # no token has id 1
    assert tok.decode([0, 2]) == "ab"
    with pytest.raises(NpgptError, match="token id 1 is not in"):
        tok.decode([0, 1, 2])


@needs_regex
def test_gpt2_bytes_only_vocabulary_round_trips():
    encoder = {c: b for b, c in bpe.bytes_to_unicode().items()}
    tok = GPT2Tokenizer(encoder, [])
    for s in UNSEEN + random_strings(200, seed=2):
        assert tok.encode(s) == list(s.encode("utf-8")) and tok.decode(tok.encode(s)) == s


@needs_regex
def test_gpt2_bad_files_are_named(tmp_path):
    folder = write_hand_files(tmp_path / "tok", hugging_face=True)
    with pytest.raises(NpgptError, match="no GPT-2 tokenizer files"):
        tokenizer_from_pretrained(tmp_path)
    (folder / "merges.txt").unlink()
    with pytest.raises(NpgptError, match="merges.txt: no such file"):
        tokenizer_from_pretrained(folder)
    (folder / "merges.txt").write_text("#version: 0.2\nh e\nhe l l\n", encoding="utf-8")
    with pytest.raises(NpgptError, match="merges.txt, line 3"):
        tokenizer_from_pretrained(folder)
    (folder / "merges.txt").write_text("h e\nh o\n", encoding="utf-8")  # "ho" is no token
    with pytest.raises(NpgptError, match="merges.txt does not match.*'ho'"):
        tokenizer_from_pretrained(folder)
    (folder / "vocab.json").write_text('{"h": 0, "e": ', encoding="utf-8")
    with pytest.raises(NpgptError, match="vocab.json: not valid JSON"):
        tokenizer_from_pretrained(folder)
    (folder / "vocab.json").write_text('["h", "e"]', encoding="utf-8")
    with pytest.raises(NpgptError, match="vocab.json: not a GPT-2 vocabulary"):
        tokenizer_from_pretrained(folder)


def test_gpt2_without_regex_says_how_to_install(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "regex", None)  # import regex fails
    with pytest.raises(NpgptError, match="pip install regex"):
        GPT2Tokenizer({"a": 0}, [])


@pytest.fixture(scope="module")
def gpt2():
    if importlib.util.find_spec("regex") is None:
        pytest.skip("the gpt2 tokenizer needs `pip install regex`")
    folder = shared_data_dir()
    if folder is None or not (folder / "gpt2" / "encoder.json").exists():
        pytest.skip("GPT-2's encoder.json and vocab.bpe not found in $NPGPT_DATA_DIR/gpt2")
    return tokenizer_from_pretrained(folder / "gpt2")


def test_gpt2_real_vocabulary(gpt2):
    text = "Hello, I'm a language model,"
    assert gpt2.vocab_size == 50257 and gpt2.eot_token == 50256
    assert gpt2.encode(text) == [15496, 11, 314, 1101, 257, 3303, 2746, 11]
    assert gpt2.decode([15496, 11, 314, 1101, 257, 3303, 2746, 11]) == text
    assert 50256 not in gpt2.encode("<|endoftext|>")  # special tokens in text stay text
    assert gpt2.decode([50256]) == "<|endoftext|>"
    for s in UNSEEN + random_strings(200, seed=3):
        assert gpt2.decode(gpt2.encode(s)) == s, repr(s)


def test_gpt2_json_round_trip(gpt2, shakespeare):
    tok2 = tokenizer_from_json(gpt2.to_json())
    text = shakespeare[:20_000]
    assert tok2.encode(text) == gpt2.encode(text) and tok2.eot_token == 50256
    assert tok2.decode(encode_to_array(tok2, text)) == text
