"""generate.py's batched samples: --num-samples drawn --batch-size at a time as the rows of
one forward pass, each row with sample i's own random stream; GPT-2's <|endoftext|> stop;
bad --batch-size."""
import importlib.util

import numpy as np
import pytest

from npgpt import GPT, GPTConfig, load, save
from npgpt.tokenizers import CharTokenizer, tokenizer_from_json

from conftest import ROOT
from test_cli import assert_clean_error, run
from test_hf import tiny_gpt2_tokenizer

spec = importlib.util.spec_from_file_location("generate_script", ROOT / "generate.py")
generate_script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(generate_script)

SEPARATOR = "-" * 40 + "\n"
PROMPT = "ROMEO: but soft"  # 15 characters: longer than the block size, so it is cropped


def write_checkpoint(path, tokenizer, vocab_size):
    """A random float64 model (block size 8) and its tokenizer, as train.py saves them:
    in float64 a batched product and a single one agree, so a batch draws the same tokens."""
    model = GPT(GPTConfig(vocab_size=vocab_size, block_size=8, n_layer=2, n_head=2, n_embd=16),
                seed=3, dtype="float64")
    save(path, model, tokenizer=tokenizer.to_json())
    return str(path)


@pytest.fixture(scope="module")
def char_ckpt(tmp_path_factory):
    tok = CharTokenizer.train("ROMEO: but soft, what light.\nJULIET: ay me!")
    return write_checkpoint(tmp_path_factory.mktemp("char") / "ckpt.npz", tok, tok.vocab_size)


def samples(capsys, monkeypatch, *args):
    """(the samples generate.py prints, the batch size of each forward stream it opens)."""
    rows, stream = [], GPT.generate_stream

    def spy(self, idx, *a, **kw):
        rows.append(idx.shape[0])
        return stream(self, idx, *a, **kw)

    with monkeypatch.context() as m:
        m.setattr(GPT, "generate_stream", spy)
        assert generate_script.main(list(args)) == 0
    out = capsys.readouterr().out
    assert out.endswith("\n")
    return out[:-1].split("\n" + SEPARATOR), rows


def test_a_batched_sample_is_the_sample_drawn_alone(char_ckpt, capsys, monkeypatch):
    """Sample i is seeded [S, i] in any batch; batches of 5 (the default), 2, 2 + 1 (the last
    one streamed) and 1 print the same text, the prompt cropped to the block size alike."""
    common = ["--ckpt", char_ckpt, "--seed", PROMPT, "--max-new-tokens", "20",
              "--num-samples", "5", "--rng-seed", "7", "--top-k", "10"]
    batched, rows = samples(capsys, monkeypatch, *common)
    assert rows == [5]
    assert samples(capsys, monkeypatch, *common, "--batch-size", "2") == (batched, [2, 2, 1])
    assert samples(capsys, monkeypatch, *common, "--batch-size", "1") == (batched, [1] * 5)
    model, extra = load(char_ckpt)
    tok = tokenizer_from_json(extra["tokenizer"])
    prompt = np.array([tok.encode(PROMPT)])
    for i, text in enumerate(batched):  # today's single sample i: seed [S, i]
        ids = model.generate(prompt, 20, top_k=10, seed=[7, i])[0, prompt.shape[1]:]
        assert text == PROMPT + tok.decode(ids.tolist())
        assert len(text) == len(PROMPT) + 20  # rows stop at --max-new-tokens
    assert len(set(batched)) == 5
    nine, rows = samples(capsys, monkeypatch, "--ckpt", char_ckpt, "--max-new-tokens", "2",
                         "--num-samples", "9")
    assert len(nine) == 9 and rows == [8, 1]  # the default batch: at most 8 rows


def test_gpt2_samples_end_at_endoftext(tmp_path, capsys, monkeypatch):
    """A GPT-2 tokenizer's <|endoftext|> ends a sample (not printed), batched or alone;
    --ignore-eos goes on past it and prints it as text."""
    tok = tiny_gpt2_tokenizer()  # 260 tokens, <|endoftext|> = 259
    ckpt = write_checkpoint(tmp_path / "ckpt.npz", tok, 260)
    common = ["--ckpt", ckpt, "--seed", " the", "--max-new-tokens", "60", "--num-samples", "6",
              "--rng-seed", "0"]
    free, _ = samples(capsys, monkeypatch, *common, "--ignore-eos")
    stopped, rows = samples(capsys, monkeypatch, *common)
    assert rows == [6]
    assert samples(capsys, monkeypatch, *common, "--batch-size", "1")[0] == stopped
    ends = [text.find("<|endoftext|>") for text in free]
    assert any(e >= 0 for e in ends) and any(e < 0 for e in ends)  # the test's premise
    for text, end, cut in zip(free, ends, stopped):
        assert cut == (text if end < 0 else text[:end])


def test_help_and_bad_batch_size(char_ckpt, tmp_path, capsys):
    with pytest.raises(SystemExit):
        generate_script.main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "float32" in help_text and "near-tie" in help_text and "--ignore-eos" in help_text
    for bad in ("0", "-3"):
        proc = run("generate.py", "--ckpt", char_ckpt, "--batch-size", bad, cwd=tmp_path,
                   check=False)
        assert_clean_error(proc, "--batch-size", bad)
        assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and proc.stdout == ""
