"""eval.py and npgpt/evaluate.py: sliding-window scoring against transformers (a stored
fixture), the stride's edge cases, bits per character and per byte from first principles,
bad input through the command line; and generate.py --seed-file."""
import json
import math
import shutil

import numpy as np
import pytest

from npgpt import GPT, GPTConfig, ops, save
from npgpt import evaluate as evaluate_module
from npgpt.errors import NpgptError
from npgpt.evaluate import encode_text, evaluate, hidden_states, windows
from npgpt.tokenizers import BPETokenizer, CharTokenizer

from conftest import ROOT
from test_cli import assert_clean_error, run

FIXTURES = ROOT / "tests" / "fixtures"
TEXT = ("ROMEO: but soft, what light through yonder window breaks?\n"
        "JULIET: café, naïve — ok.\n") * 3


def tiny_model(vocab_size, block_size=16, dtype="float64"):
    return GPT(GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=2, n_head=2,
                         n_embd=16), seed=3, dtype=dtype)


def test_loss_matches_transformers_sliding_window():
    """Strides 24 (= block size), 12, 7 and 1 on the hf_tiny model: transformers'
    GPT2LMHeadModel with Hugging Face's recipe (make_eval_reference.py) gave these sums."""
    pytest.importorskip("safetensors", reason="reading a Hugging Face folder needs safetensors")
    from npgpt import from_pretrained
    expected = json.loads((FIXTURES / "eval_expected.json").read_text())
    model = from_pretrained(FIXTURES / "hf_tiny")  # float32, as transformers saved it
    for stride, want in expected["strides"].items():
        got = evaluate(model, expected["ids"], int(stride), batch_size=3)
        assert got.tokens == want["tokens"]
        assert got.loss == pytest.approx(want["nats"] / want["tokens"], rel=1e-5)


@pytest.mark.parametrize("n", [2, 5, 16, 17, 40, 61])
@pytest.mark.parametrize("stride", [1, 3, 8, 15, 16])
def test_windows_score_each_token_once(n, stride):
    T = 16
    spans = windows(n, T, stride)
    scored = np.zeros(n, dtype=int)
    for begin, end, first in spans:
        assert 0 <= begin < first <= end <= begin + T and end - begin <= T
        scored[first:end] += 1
    assert spans[-1][1] == n and scored[0] == 0  # reaches the end; t0 is never scored
    if stride < T:  # every other token exactly once
        assert (scored[1:] == 1).all()
    else:  # S = T: non-overlapping windows, each window's first token unscored
        assert [b for b, _, _ in spans] == list(range(0, n, T))
        assert all(first == begin + 1 for begin, _, first in spans)
        assert scored.sum() == n - len(spans) and (scored[[b for b, _, _ in spans]] == 0).all()


def test_evaluate_equals_the_training_forward():
    """Each window through GPT.forward (the layers, with their caches) and a log-softmax
    written here: evaluate's cache-free path gives the same sums, any batch size."""
    model, rng = tiny_model(20), np.random.default_rng(0)
    ids = rng.integers(0, 20, 45)
    x = rng.integers(0, 20, (2, 16))
    logits, _ = model.forward(x)
    h = hidden_states(model, x)
    assert h.shape == (2, 16, 16)
    for stride in (1, 5, 16):
        nats, count = 0.0, 0
        for begin, end, first in windows(len(ids), 16, stride):
            z = model.forward(ids[None, begin:end])[0][0]  # (L, V)
            logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
            for t in range(first, end):  # position t - 1 - begin predicts token t
                nats -= logp[t - 1 - begin, ids[t]]
                count += 1
        for batch_size in (1, 4):
            got = evaluate(model, ids, stride, batch_size)
            assert got.tokens == count and got.nats == pytest.approx(nats, rel=1e-12)
            assert got.windows == len(windows(len(ids), 16, stride))


@pytest.mark.parametrize("query_block,score_elements", [(5, 1), (4, 10**6), (16, 1)])
def test_causal_attention_in_blocks_equals_attention_forward(monkeypatch, query_block,
                                                             score_elements):
    """Query blocks of 5 or 4 (a short last block), one window row or all at a time."""
    monkeypatch.setattr(evaluate_module, "QUERY_BLOCK", query_block)
    monkeypatch.setattr(evaluate_module, "SCORE_ELEMENTS", score_elements)
    qkv = np.random.default_rng(1).standard_normal((3, 14, 3 * 8))  # (B,T,3C), nh 2
    want, _ = ops.attention_forward(qkv, 2)
    np.testing.assert_allclose(evaluate_module.causal_attention(qkv, 2), want, rtol=1e-12,
                               atol=1e-14)


def test_bits_per_char_and_byte_from_first_principles():
    """bits = nats / ln 2, divided by the characters (or UTF-8 bytes) of the text the scored
    tokens are: all of it but the first token (stride < block size scores the rest once)."""
    char = CharTokenizer.train(TEXT)
    bpe = BPETokenizer.train(TEXT, vocab_size=300)
    for tok in (char, bpe):
        ids, _ = encode_text(tok, TEXT)
        got = evaluate(tiny_model(tok.vocab_size), ids, stride=5, tokenizer=tok)
        head = tok.decode(ids[:1])  # the first token: ASCII "R" or "ROMEO", never scored
        chars, nbytes = len(TEXT) - len(head), len(TEXT.encode("utf-8")) - len(head)
        assert got.tokens == len(ids) - 1 and (got.chars, got.bytes) == (chars, nbytes)
        assert got.bits_per_char == pytest.approx(got.loss * got.tokens / chars / math.log(2))
        assert got.bits_per_byte == pytest.approx(got.loss * got.tokens / nbytes / math.log(2))
        assert got.perplexity == pytest.approx(math.exp(got.loss))
    # "é" as its two byte tokens (0xC3 starts the character, 0xA9 continues it): one character
    got = evaluate(tiny_model(bpe.vocab_size), [ord("a"), 0xC3, 0xA9, ord("b")], tokenizer=bpe)
    assert (got.tokens, got.chars, got.bytes) == (3, 2, 3)


def test_unknown_characters_are_named_or_skipped():
    tok = CharTokenizer.train("abc ")
    with pytest.raises(NpgptError, match=r"3 character\(s\), 2 distinct.*'é', 'z'"):
        encode_text(tok, "a é b z é")
    ids, dropped = encode_text(tok, "a é b z é", skip_unknown=True)
    assert dropped == 3 and tok.decode(ids) == "a  b  "  # the text closes up
    with pytest.raises(NpgptError, match="stride"):
        evaluate(tiny_model(4), [0, 1, 2], stride=17)


# ---------------------------------------------------------------- the command line
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A folder with out/ckpt.npz (a random char model whose train_config names corpus.txt,
    as train.py's does) and the corpus."""
    folder = tmp_path_factory.mktemp("eval")
    (folder / "corpus.txt").write_text(TEXT * 4, encoding="utf-8")
    tok = CharTokenizer.train(TEXT)
    save(folder / "out" / "ckpt.npz", tiny_model(tok.vocab_size, dtype="float32"),
         tokenizer=tok.to_json(), train_config={"data": "corpus.txt", "out_dir": "out"})
    return folder


def test_eval_command_line(run_dir):
    """The default split is the run's val split (the last 10% of its tokens, in the token
    cache train.py would write); --json prints the figures on stdout."""
    proc = run("eval.py", "--json", "--stride", "4", cwd=run_dir)
    report = json.loads(proc.stdout)
    n_val = len(TEXT * 4) - int(0.9 * len(TEXT * 4))
    assert report["tokens"] == report["chars"] == n_val - 1 and report["stride"] == 4
    assert report["bits_per_char"] == pytest.approx(report["loss"] / math.log(2))
    assert (run_dir / "out" / "data" / "tokens.bin").exists()
    (run_dir / "text.txt").write_text("JULIET: oh\nRΩMEO€: é", encoding="utf-8")
    proc = run("eval.py", "--data", "text.txt", "--skip-unknown", cwd=run_dir)
    assert "dropped 2 character(s)" in proc.stdout and "bits per char" in proc.stdout
    assert "tokens scored   17 (17 characters, 18 bytes)" in proc.stdout


def test_eval_scores_a_hugging_face_folder(tmp_path):
    pytest.importorskip("safetensors", reason="reading a Hugging Face folder needs safetensors")
    shutil.copytree(FIXTURES / "hf_tiny", tmp_path / "hf")
    tok = CharTokenizer("\n" + "".join(chr(c) for c in range(32, 92)))  # 61 tokens
    (tmp_path / "hf" / "npgpt_tokenizer.json").write_text(tok.to_json())
    text = "ROMEO: BUT SOFT, WHAT LIGHT THROUGH YONDER WINDOW BREAKS?\n" * 4
    (tmp_path / "text.txt").write_text(text[:200], encoding="utf-8")
    report = json.loads(run("eval.py", "--model", "hf", "--data", "text.txt", "--json",
                            cwd=tmp_path).stdout)
    assert report["tokens"] == 199 and report["block_size"] == 24 and report["stride"] == 12
    assert_clean_error(run("eval.py", "--model", "hf", cwd=tmp_path, check=False), "--data")


@pytest.mark.parametrize("args,content,words", [
    (["--data", "missing.txt"], None, ["missing.txt", "no such file"]),
    (["--data", "bad.txt"], b"", ["empty"]),
    (["--data", "bad.txt"], b"\x00\x01\x02\x03", ["binary"]),
    (["--data", "bad.txt"], b"\xff\xfe bad", ["UTF-8"]),
    (["--data", "bad.txt"], b"R", ["1 token(s)", "at least two"]),
    (["--data", "bad.txt", "--stride", "0"], b"ROMEO", ["--stride", "1 to", "16"]),
    (["--data", "bad.txt", "--stride", "-3"], b"ROMEO", ["--stride", "-3"]),
    (["--data", "bad.txt", "--stride", "17"], b"ROMEO", ["--stride", "17"]),
    (["--data", "bad.txt"], "ROMEO Ω€ Ω".encode(), ["3 character(s)", "'Ω', '€'",
                                                    "--skip-unknown"]),
    (["--ckpt", "bad.txt", "--data", "corpus.txt"], b"not a checkpoint", ["bad.txt", ".npz"]),
])
def test_eval_bad_input(run_dir, tmp_path, args, content, words):
    """One `error:` line, exit 1, nothing written."""
    shutil.copytree(run_dir, tmp_path, dirs_exist_ok=True)
    if content is not None:
        (tmp_path / "bad.txt").write_bytes(content)
    before = sorted(tmp_path.rglob("*"))
    proc = run("eval.py", *args, cwd=tmp_path, check=False)
    assert_clean_error(proc, *words)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and proc.stdout == ""
    assert sorted(tmp_path.rglob("*")) == before


def test_generate_seed_file(run_dir, tmp_path):
    """--seed-file PATH: the prompt from a file, exactly as --seed would give it."""
    prompt = "ROMEO: but\nsoft"
    (tmp_path / "prompt.txt").write_text(prompt, encoding="utf-8")
    ckpt = str(run_dir / "out" / "ckpt.npz")
    common = ["--ckpt", ckpt, "--max-new-tokens", "8", "--rng-seed", "1"]
    from_file = run("generate.py", *common, "--seed-file", "prompt.txt", cwd=tmp_path).stdout
    assert from_file.startswith(prompt)
    assert from_file == run("generate.py", *common, "--seed", prompt, cwd=tmp_path).stdout
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe")
    assert_clean_error(run("generate.py", *common, "--seed-file", "bad.txt", cwd=tmp_path,
                           check=False), "bad.txt", "UTF-8")
    both = run("generate.py", *common, "--seed", "x", "--seed-file", "prompt.txt",
               cwd=tmp_path, check=False)
    assert both.returncode == 2 and "not allowed with" in both.stderr
