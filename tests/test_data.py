"""Corpora, token files, the 90/10 split and batches; bad files get clear errors."""
import numpy as np
import pytest

from npgpt import data
from npgpt.errors import NpgptError
from npgpt.tokenizers import build_tokenizer

from conftest import shared_data_dir


def prepared(tmp_path, text):
    path = tmp_path / "c.txt"
    path.write_text(text, encoding="utf-8")
    tok = build_tokenizer("char", text)
    return tok, data.prepare_tokens(str(path), tok, str(tmp_path / "data"))


def test_split_is_contiguous_90_10_and_compact(tmp_path):
    text = "".join(chr(97 + i % 26) for i in range(1000))
    tok, d = prepared(tmp_path, text)
    assert d.tokens.dtype == np.uint16 and isinstance(d.tokens, np.memmap)
    assert len(d.splits["train"]) == 900 and len(d.splits["val"]) == 100
    assert tok.decode(d.splits["train"]) + tok.decode(d.splits["val"]) == text


def test_batches_are_windows_shifted_by_one(tmp_path):
    text = "".join(chr(33 + i % 90) for i in range(5000))
    tok, d = prepared(tmp_path, text)
    x, y = d.get_batch("train", 6, 16, np.random.default_rng(0))
    assert x.shape == y.shape == (6, 16) and x.dtype == np.int64
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
    train = np.asarray(d.splits["train"])
    for row_x, row_y in zip(x, y):
        start = np.flatnonzero(np.all(np.lib.stride_tricks.sliding_window_view(train, 16) == row_x, axis=1))
        assert start.size and np.array_equal(train[start[0] + 1:start[0] + 17], row_y)
    xv, _ = d.get_batch("val", 3, 16, np.random.default_rng(0))
    val = tok.decode(d.splits["val"])
    assert all(tok.decode(r) in val for r in xv)


def test_token_file_is_reused_while_corpus_and_tokenizer_are_unchanged(tmp_path):
    text = "hello world " * 100
    tok, d = prepared(tmp_path, text)
    stamp = (tmp_path / "data" / "tokens.bin").stat().st_mtime_ns
    data.prepare_tokens(str(tmp_path / "c.txt"), tok, str(tmp_path / "data"))
    assert (tmp_path / "data" / "tokens.bin").stat().st_mtime_ns == stamp
    (tmp_path / "c.txt").write_text(text + "more", encoding="utf-8")
    tok2 = build_tokenizer("char", text + "more")
    d2 = data.prepare_tokens(str(tmp_path / "c.txt"), tok2, str(tmp_path / "data"))
    assert len(d2.tokens) == len(text) + 4


@pytest.mark.parametrize("content,match", [
    (b"", "empty"),
    (b"abc\x00\x01\x02binary", "binary"),
    (b"caf\xe9 latin-1 text", "UTF-8"),
])
def test_bad_files(tmp_path, content, match):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(NpgptError, match=match):
        data.read_text(str(path))


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(NpgptError, match="no such file"):
        data.resolve_corpus(str(tmp_path / "nope.txt"))
    with pytest.raises(NpgptError, match="folder"):
        data.resolve_corpus(str(tmp_path))


def test_too_short_for_one_batch(tmp_path):
    _, d = prepared(tmp_path, "short text" * 3)
    with pytest.raises(NpgptError, match="too short"):
        d.check_fits(32)


def test_shakespeare_from_npgpt_data_dir(monkeypatch):
    folder = shared_data_dir()
    if folder is None:
        pytest.skip("no copy of tinyshakespeare.txt (set NPGPT_DATA_DIR)")
    monkeypatch.setenv("NPGPT_DATA_DIR", str(folder))
    monkeypatch.setattr(data.urllib.request, "urlopen", _no_network)
    assert data.resolve_corpus("shakespeare") == str(folder / "tinyshakespeare.txt")


def _no_network(*args, **kwargs):
    raise OSError("network is unreachable")


def test_offline_without_a_copy_says_where_to_put_it(monkeypatch, tmp_path):
    monkeypatch.delenv("NPGPT_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(data.urllib.request, "urlopen", _no_network)
    with pytest.raises(NpgptError, match="NPGPT_DATA_DIR") as e:
        data.resolve_corpus("shakespeare")
    assert "--data" in str(e.value) and "could not download" in str(e.value)


def test_a_wrong_file_in_the_data_dir_is_refused(monkeypatch, tmp_path):
    (tmp_path / "tinyshakespeare.txt").write_text("not shakespeare")
    monkeypatch.setenv("NPGPT_DATA_DIR", str(tmp_path))
    with pytest.raises(NpgptError, match="sha256"):
        data.resolve_corpus("shakespeare")


def test_download_is_verified_and_cached(monkeypatch, tmp_path):
    folder = shared_data_dir()
    if folder is None:
        pytest.skip("no copy of tinyshakespeare.txt to serve as the download")
    payload = (folder / "tinyshakespeare.txt").read_bytes()

    class Response:
        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def read(self):
            return payload

    monkeypatch.delenv("NPGPT_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    calls = []
    monkeypatch.setattr(data.urllib.request, "urlopen", lambda *a, **k: calls.append(a) or Response())
    path = data.resolve_corpus("shakespeare")
    assert path == str(tmp_path / "cache" / "npgpt" / "tinyshakespeare.txt")
    assert data.resolve_corpus("shakespeare") == path and len(calls) == 1  # cached
    payload = b"tampered"
    (tmp_path / "cache" / "npgpt" / "tinyshakespeare.txt").unlink()
    with pytest.raises(NpgptError, match="sha256"):
        data.resolve_corpus("shakespeare")
