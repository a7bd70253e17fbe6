"""Hugging Face GPT-2 folders: import (against logits transformers computed, read from
tests/fixtures), export (round trip, the `python -m npgpt.export` command, and
transformers itself where it is installed) and clear refusals of what npgpt does not
implement. Needs the safetensors package (tests skip without it); never torch."""
import json
import os
import shutil
import subprocess
import sys
import numpy as np
import pytest

from conftest import ROOT
from npgpt import GPT, CheckpointError, GPTConfig, NpgptError, hf, save, tokenizer_from_pretrained
from npgpt.tokenizers import NPGPT_TOKENIZER_FILE
from npgpt.bpe import bytes_to_unicode
from npgpt.tokenizers import GPT2_EOT, GPT2Tokenizer, build_tokenizer
from test_cli import assert_clean_error

FIXTURE = ROOT / "tests" / "fixtures" / "hf_tiny"
EXPECTED = ROOT / "tests" / "fixtures" / "hf_tiny_expected.npz"
try:
    import safetensors  # noqa: F401  (only: is it installed?)
    HAVE_SAFETENSORS = True
except ImportError:
    HAVE_SAFETENSORS = False
needs_safetensors = pytest.mark.skipif(
    not HAVE_SAFETENSORS, reason="needs the safetensors package (pip install safetensors)")
CFG = GPTConfig(vocab_size=19, block_size=8, n_layer=2, n_head=2, n_embd=8, dropout=0.1)


def relative_error(a, b):
    return float(np.abs(np.asarray(a) - b).max() / np.abs(b).max())


def fixture_copy(tmp_path, config=None, tensors=None):
    """A copy of the transformers-written fixture folder; `config(dict)` and
    `tensors(dict)` may edit its config.json and weights in place."""
    from safetensors.numpy import load_file, save_file
    folder = tmp_path / "hf"
    shutil.copytree(FIXTURE, folder)
    if config:
        data = json.loads((folder / "config.json").read_text())
        config(data)
        (folder / "config.json").write_text(json.dumps(data))
    if tensors:
        data = load_file(folder / "model.safetensors")
        tensors(data)
        save_file({k: np.ascontiguousarray(v) for k, v in data.items()},
                  folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def assert_same_params(a, b):
    assert a.config == b.config
    for name in a.params:
        np.testing.assert_array_equal(a.params[name], b.params[name])


# ---------------------------------------------------------------------- import
@needs_safetensors
def test_transformers_fixture_gives_transformers_logits():
    ref = np.load(EXPECTED)
    model = hf.from_pretrained(FIXTURE)
    assert model.config == GPTConfig(vocab_size=61, block_size=24, n_layer=2, n_head=3,
                                     n_embd=24, dropout=0.1)
    assert model.dtype == np.float32
    logits, _ = model.forward(ref["idx"])
    assert relative_error(logits, ref["logits"]) < 1e-5
    model64 = hf.from_pretrained(FIXTURE, dtype="float64", dropout=0.0)
    assert model64.config.dropout == 0.0
    logits64, _ = model64.forward(ref["idx"])
    assert relative_error(logits64, ref["logits64"]) < 1e-10


def _without_prefix(t):
    for k in list(t):
        t[k[len("transformer."):]] = t.pop(k)


def _with_buffers_and_head(t):
    for i in range(2):
        t[f"transformer.h.{i}.attn.bias"] = np.tril(np.ones((1, 1, 24, 24), np.float32))
        t[f"transformer.h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
    t["lm_head.weight"] = t["transformer.wte.weight"].copy()


def _as_float16(t):
    for k in t:
        t[k] = t[k].astype(np.float16)


@needs_safetensors
@pytest.mark.parametrize("edit", [_without_prefix, _with_buffers_and_head])
def test_accepts_what_other_transformers_versions_write(tmp_path, edit):
    """OpenAI's GPT-2 on the Hub: names without "transformer.", attn.bias buffers;
    some conversions: an lm_head.weight equal to wte."""
    model = hf.from_pretrained(fixture_copy(tmp_path, tensors=edit))
    assert_same_params(model, hf.from_pretrained(FIXTURE))


@needs_safetensors
def test_old_config_and_float16_weights(tmp_path):
    def old(c):  # n_ctx instead of n_positions, differing dropouts, no architectures
        c["n_ctx"] = c.pop("n_positions")
        c["attn_pdrop"], c["resid_pdrop"] = 0.0, 0.2
        del c["architectures"]
    model = hf.from_pretrained(fixture_copy(tmp_path, config=old, tensors=_as_float16))
    assert model.config.block_size == 24 and model.config.dropout == 0.0
    ref = hf.from_pretrained(FIXTURE)
    w = ref.params["transformer.wte.weight"].astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(model.params["transformer.wte.weight"], w)


@needs_safetensors
def test_sharded_weights(tmp_path):
    """Large models come as model.safetensors.index.json + shards."""
    from safetensors.numpy import load_file, save_file
    folder = fixture_copy(tmp_path)
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:10],
              "model-00002-of-00002.safetensors": names[10:]}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, folder / shard, metadata={"format": "pt"})
    index = {"weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_same_params(hf.from_pretrained(folder), hf.from_pretrained(FIXTURE))


# -------------------------------------------------------------------- refusals
def _set(key, value):
    return lambda c: c.__setitem__(key, value)


@needs_safetensors
@pytest.mark.parametrize("edit, message", [
    (_set("activation_function", "relu"), "activation_function 'relu'"),
    (_set("activation_function", "gelu"), "tanh GELU"),
    (_set("tie_word_embeddings", False), "tie_word_embeddings"),
    (_set("model_type", "gptj"), "model_type 'gptj'"),
    (_set("architectures", ["GPT2ForSequenceClassification"]), "GPT2ForSequenceClassification"),
    (_set("layer_norm_epsilon", 1e-6), "layer_norm_epsilon"),
    (_set("scale_attn_by_inverse_layer_idx", True), "scale_attn_by_inverse_layer_idx"),
    (_set("reorder_and_upcast_attn", True), "reorder_and_upcast_attn"),
    (_set("n_inner", 64), "n_inner 64"),
    (_set("n_embd", 30), "shape"),
    (_set("n_layer", 3), "transformer.h.2"),
    (_set("n_head", 5), "divisible"),
])
def test_refuses_configs_npgpt_does_not_compute(tmp_path, edit, message):
    with pytest.raises(CheckpointError, match=message):
        hf.from_pretrained(fixture_copy(tmp_path, config=edit))


def _untied_head(t):
    t["lm_head.weight"] = t["transformer.wte.weight"] + 1.0


def _wrong_shape(t):
    t["transformer.h.0.mlp.c_fc.weight"] = np.zeros((24, 90), np.float32)


def _transposed(t):
    t["transformer.h.1.attn.c_attn.weight"] = t["transformer.h.1.attn.c_attn.weight"].T


def _missing(t):
    del t["transformer.ln_f.bias"]


def _unexpected(t):
    t["score.weight"] = np.zeros((24, 2), np.float32)


def _integer(t):
    t["transformer.wpe.weight"] = np.zeros((24, 24), np.int32)


@needs_safetensors
@pytest.mark.parametrize("edit, message", [
    (_untied_head, "lm_head.weight differs"), (_wrong_shape, r"\(24, 90\)"),
    (_transposed, r"\(72, 24\)"), (_missing, "transformer.ln_f.bias"),
    (_unexpected, "score.weight"), (_integer, "I32"),
])
def test_refuses_weights_that_do_not_fit(tmp_path, edit, message):
    with pytest.raises(CheckpointError, match=message):
        hf.from_pretrained(fixture_copy(tmp_path, tensors=edit))


@needs_safetensors
def test_refuses_missing_and_corrupt_files(tmp_path):
    with pytest.raises(CheckpointError, match="no such folder"):
        hf.from_pretrained(tmp_path / "nope")
    folder = fixture_copy(tmp_path)
    weights = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        hf.from_pretrained(folder)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(CheckpointError, match="model.safetensors: missing.*pickle"):
        hf.from_pretrained(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: not a readable JSON"):
        hf.from_pretrained(folder)
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json: missing"):
        hf.from_pretrained(folder)


def test_without_safetensors_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors", None)  # makes `import safetensors` fail
    with pytest.raises(NpgptError, match="pip install safetensors"):
        hf.from_pretrained(FIXTURE)
    with pytest.raises(NpgptError, match="pip install safetensors"):
        hf.save_pretrained(GPT(CFG), "unused")


# ---------------------------------------------------------------------- export
@needs_safetensors
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_save_then_load_is_exact(tmp_path, dtype):
    model = GPT(CFG, seed=3, dtype=dtype)
    model.params.flat[...] = np.random.default_rng(0).normal(size=model.params.flat.shape)
    hf.save_pretrained(model, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["architectures"] == ["GPT2LMHeadModel"]
    assert config["n_positions"] == config["n_ctx"] == 8 and config["vocab_size"] == 19
    assert config["attn_pdrop"] == config["resid_pdrop"] == config["embd_pdrop"] == 0.1
    assert config["tie_word_embeddings"] is True and config["bos_token_id"] is None
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "model.safetensors"]
    assert_same_params(model, hf.from_pretrained(tmp_path / "out", dtype=dtype))


@needs_safetensors
def test_export_command_line(tmp_path):
    tok = build_tokenizer("char", "abcdefghijklmnopqrs")
    model = GPT(CFG, seed=5)
    save(tmp_path / "ckpt.npz", model, tokenizer=tok.to_json(), step=3)
    out = tmp_path / "hf"
    run = subprocess.run([sys.executable, "-m", "npgpt.export", str(tmp_path / "ckpt.npz"),
                          str(out)], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "wrote" in run.stdout
    assert_same_params(model, hf.from_pretrained(out))
    assert tokenizer_from_pretrained(out).to_json() == tok.to_json()
    run = subprocess.run([sys.executable, "-m", "npgpt.export", str(tmp_path / "nope.npz"),
                          str(out)], cwd=ROOT, capture_output=True, text=True)
    assert_clean_error(run, "nope.npz")
    run = subprocess.run([sys.executable, "-m", "npgpt.export", str(out), str(tmp_path / "x")],
                         cwd=ROOT, capture_output=True, text=True)
    assert_clean_error(run, "is a folder")


def tiny_gpt2_tokenizer():
    """A GPT-2-format tokenizer of 260 tokens: the 256 byte characters, three merges and
    <|endoftext|> (id 259). Models below pad the vocabulary to 264, as nanoGPT does."""
    pytest.importorskip("regex", reason="the gpt2 tokenizer needs the regex package")
    chars = [c for _, c in sorted(bytes_to_unicode().items())]
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he")]
    encoder = {c: i for i, c in enumerate(chars + ["Ġt", "he", "Ġthe", GPT2_EOT])}
    return GPT2Tokenizer(encoder, merges)


@needs_safetensors
def test_gpt2_tokenizer_is_written_as_vocab_and_merges(tmp_path):
    tok = tiny_gpt2_tokenizer()
    model = GPT(GPTConfig(vocab_size=264, block_size=8, n_layer=1, n_head=2, n_embd=8))
    hf.save_pretrained(model, tmp_path / "out", tokenizer=tok)
    names = set(os.listdir(tmp_path / "out"))
    assert {"vocab.json", "merges.txt", "tokenizer_config.json"} <= names
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["eos_token_id"] == config["bos_token_id"] == 259
    again = tokenizer_from_pretrained(tmp_path / "out")
    assert again.name == "gpt2" and again.encode(" the then") == tok.encode(" the then")
    # exporting npgpt's own tokenizer later leaves no stale GPT-2 files behind
    hf.save_pretrained(model, tmp_path / "out", tokenizer=build_tokenizer("bpe", "ab" * 50, 260))
    assert not names & set(os.listdir(tmp_path / "out")) - {"config.json", "model.safetensors"}
    assert tokenizer_from_pretrained(tmp_path / "out").name == "bpe"
    (tmp_path / "out" / NPGPT_TOKENIZER_FILE).write_bytes(b"\xff\xfe{")
    with pytest.raises(NpgptError, match="npgpt_tokenizer.json: not valid UTF-8"):
        tokenizer_from_pretrained(tmp_path / "out")
    with pytest.raises(NpgptError, match="260 tokens but the model only 19"):
        hf.save_pretrained(GPT(CFG), tmp_path / "small", tokenizer=tok)


@needs_safetensors
def test_transformers_loads_the_export_and_agrees(tmp_path):
    torch = pytest.importorskip("torch", reason="comparing with transformers needs torch")
    transformers = pytest.importorskip("transformers", reason="needs transformers")
    tok = tiny_gpt2_tokenizer()
    config = GPTConfig(vocab_size=264, block_size=16, n_layer=2, n_head=4, n_embd=16)
    model = GPT(config, seed=7)
    rng = np.random.default_rng(1)
    model.params.flat[...] += rng.normal(0, 0.1, model.params.flat.shape).astype(np.float32)
    hf.save_pretrained(model, tmp_path / "out", tokenizer=tok)
    theirs, info = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out",
                                                                output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    idx = rng.integers(0, 264, (2, 16))
    with torch.no_grad():
        expected = theirs.eval()(torch.from_numpy(idx)).logits.numpy()
    assert relative_error(model.forward(idx)[0], expected) < 1e-5
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert hf_tok(" the then")["input_ids"] == tok.encode(" the then")
    assert hf_tok.eos_token_id == 259
