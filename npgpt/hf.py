"""Hugging Face GPT-2 folders in and out: `from_pretrained` and `save_pretrained`.

npgpt's parameters already have Hugging Face GPT-2's names and shapes (Conv1D weights
(in, out), used as x @ W + b; the head tied to `transformer.wte.weight`), so both
directions copy tensors under the same names; nothing is transposed or renamed.

    model = npgpt.hf.from_pretrained("gpt2-folder")          # config.json + model.safetensors
    npgpt.hf.save_pretrained(model, "out/hf", tokenizer=tok)  # loadable by transformers:
    # transformers.GPT2LMHeadModel.from_pretrained("out/hf") gives npgpt's logits

Weights are read and written with the `safetensors` package's NumPy API (the `hf`
extra: `pip install safetensors`); npgpt never reads `pytorch_model.bin` (a pickle).

What npgpt computes is plain GPT-2: tanh GELU, LayerNorm eps 1e-5, attention scaled by
1/sqrt(head size), MLP width 4 C, a tied head. A folder asking for anything else
(another model_type or architecture, another activation or eps, an untied head,
scale_attn_by_inverse_layer_idx, reorder_and_upcast_attn, cross-attention, ...) is
refused with a CheckpointError naming the setting, rather than loaded into a model that
would silently compute something else. The non-parameter buffers that older
transformers saved (`h.N.attn.bias`, `h.N.attn.masked_bias`) are ignored, tensor names
are accepted with or without the "transformer." prefix, and `lm_head.weight` is
accepted when it equals `transformer.wte.weight`.

Loading builds `GPT(config, init=False)` first (zeros, no random draw) and then copies
one tensor at a time into it, so peak memory is the model plus one tensor, not the
model plus the whole file.

Tokenizers: save_pretrained writes a GPT-2 tokenizer ("gpt2") as vocab.json +
merges.txt, which transformers' GPT2Tokenizer loads. npgpt's own "char" and "bpe"
tokenizers have no transformers equivalent: they are written as npgpt_tokenizer.json
(their to_json() text), which transformers cannot load but
`npgpt.tokenizer_from_pretrained(folder)` (or `npgpt.tokenizers.tokenizer_from_json`)
can.
"""
import contextlib
import json
import math
import os
import re

import numpy as np

from .backend import to_numpy
from .checkpoint import atomic_write
from .errors import CheckpointError, NpgptError
from .model import DTYPES, GPT, GPTConfig
from .params import gpt2_param_shapes
from .tokenizers import NPGPT_TOKENIZER_FILE

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", NPGPT_TOKENIZER_FILE)
ARCHITECTURES = ("GPT2LMHeadModel", "GPT2Model")
ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")  # both are the tanh approximation
LAYER_NORM_EPS = 1e-5
DROPOUT_KEYS = ("resid_pdrop", "embd_pdrop", "attn_pdrop")
ELSEWHERE = "another output folder"  # where a failed export's WriteError says to write
# what transformers' GPT2Config assumes for a key that config.json leaves out
HF_DEFAULTS = dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
                   activation_function="gelu_new", layer_norm_epsilon=1e-5,
                   resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1, n_inner=None,
                   tie_word_embeddings=True, scale_attn_weights=True,
                   scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False,
                   add_cross_attention=False)
# settings that would change what the model computes: (key, value npgpt implements, why)
UNSUPPORTED_FLAGS = (
    ("tie_word_embeddings", True, "npgpt's output head is always tied to wte"),
    ("scale_attn_weights", True, "npgpt always scales attention by 1/sqrt(head size)"),
    ("scale_attn_by_inverse_layer_idx", False, "npgpt does not scale attention by layer"),
    ("reorder_and_upcast_attn", False, "npgpt does not implement the reordered attention"),
    ("add_cross_attention", False, "npgpt is a decoder without cross-attention"),
)
SAFETENSORS_DTYPES = ("F16", "F32", "F64")  # NumPy has no bfloat16
_BUFFER = re.compile(r"transformer\.h\.\d+\.attn\.(bias|masked_bias)")
_SAFETENSORS_HINT = ("Hugging Face folders need the safetensors package: "
                     "pip install safetensors (or pip install -e \".[hf]\")")


def _safetensors():
    """The safetensors package (its NumPy API loaded), or an NpgptError saying what to
    install: it is an optional extra, imported only when a folder is read or written."""
    try:
        import safetensors
        import safetensors.numpy
    except ImportError:
        raise NpgptError(_SAFETENSORS_HINT) from None
    return safetensors


# ------------------------------------------------------------------------ import
def read_hf_config(folder):
    """The dict in `folder`/config.json, checked to describe a model npgpt computes."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder}: no such folder; pass a Hugging Face GPT-2 folder "
                              f"(with {CONFIG_FILE} and {WEIGHTS_FILE})")
    path = os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: missing; a Hugging Face model folder has a "
                              f"{CONFIG_FILE} beside its weights")
    try:
        with open(path, encoding="utf-8") as f:
            hf = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(hf, dict):
        raise CheckpointError(f"{path}: holds a {type(hf).__name__}, not a JSON object")
    _check_supported(hf, path)
    return hf


def _check_supported(hf, path):
    """Raise a CheckpointError naming the first setting npgpt does not implement."""
    if hf.get("model_type") != "gpt2":
        raise CheckpointError(f"{path}: model_type {hf.get('model_type')!r} is not supported; "
                              "npgpt loads GPT-2 models (model_type \"gpt2\") only")
    archs = hf.get("architectures") or []
    other = [a for a in archs if a not in ARCHITECTURES]
    if other:
        raise CheckpointError(f"{path}: architecture {other[0]!r} is not supported; npgpt "
                              f"loads {' or '.join(ARCHITECTURES)}")
    act = hf.get("activation_function", HF_DEFAULTS["activation_function"])
    if act not in ACTIVATIONS:
        raise CheckpointError(f"{path}: activation_function {act!r} is not supported; npgpt "
                              f"computes the tanh GELU ({' / '.join(ACTIVATIONS)})")
    eps = hf.get("layer_norm_epsilon", LAYER_NORM_EPS)
    if not isinstance(eps, (int, float)) or not math.isclose(eps, LAYER_NORM_EPS, rel_tol=1e-9):
        raise CheckpointError(f"{path}: layer_norm_epsilon {eps!r} is not supported; npgpt's "
                              f"LayerNorm uses {LAYER_NORM_EPS}")
    for key, want, why in UNSUPPORTED_FLAGS:
        if bool(hf.get(key, HF_DEFAULTS[key])) != want:
            raise CheckpointError(f"{path}: {key} = {hf.get(key)!r} is not supported ({why})")
    n_inner, n_embd = hf.get("n_inner"), hf.get("n_embd", HF_DEFAULTS["n_embd"])
    if n_inner is not None and n_inner != 4 * n_embd:
        raise CheckpointError(f"{path}: n_inner {n_inner!r} is not supported; npgpt's MLP "
                              f"width is 4 * n_embd = {4 * n_embd}")


def config_from_hf(hf, dropout=None, source=CONFIG_FILE):
    """The GPTConfig of a (checked) Hugging Face GPT-2 config dict.

    block_size is n_positions (or n_ctx in old configs). dropout is the configured
    resid/embd/attn_pdrop when those agree, otherwise 0.0; `dropout` overrides it.
    `source` names the config in errors."""
    def get(key):
        return hf.get(key, HF_DEFAULTS.get(key))

    if dropout is None:
        drops = {float(get(k)) for k in DROPOUT_KEYS}
        dropout = drops.pop() if len(drops) == 1 else 0.0
    block_size = hf.get("n_positions", hf.get("n_ctx", HF_DEFAULTS["n_positions"]))
    try:
        return GPTConfig(vocab_size=get("vocab_size"), block_size=block_size,
                         n_layer=get("n_layer"), n_head=get("n_head"), n_embd=get("n_embd"),
                         dropout=dropout)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{source}: does not describe a valid model ({e})") from None


def _weight_files(folder):
    """The safetensors file(s) of `folder`: model.safetensors, or the shards its index names."""
    single = os.path.join(folder, WEIGHTS_FILE)
    if os.path.isfile(single):
        return [single]
    index = os.path.join(folder, WEIGHTS_INDEX_FILE)
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: unreadable shard index ({e})") from None
        return [os.path.join(folder, s) for s in shards]
    has_bin = os.path.isfile(os.path.join(folder, "pytorch_model.bin"))
    raise CheckpointError(f"{single}: missing" + (
        "; the folder has only pytorch_model.bin, a pickle npgpt never loads: re-save it "
        "with transformers' save_pretrained (safe_serialization=True)" if has_bin else
        "; a Hugging Face model folder holds its weights in model.safetensors"))


def _index_tensors(handles, shapes, folder):
    """{npgpt name: (handle, stored name)} and the lm_head entry (or None), checked
    against the expected names, shapes and dtypes."""
    found, lm_head = {}, None
    for path, f in handles:
        for key in f.keys():
            if key == "lm_head.weight":
                lm_head = (f, key)
                continue
            name = key if key.startswith("transformer.") else "transformer." + key
            if _BUFFER.fullmatch(name):
                continue  # a causal-mask buffer of older transformers, not a parameter
            if name not in shapes:
                raise CheckpointError(f"{path}: unexpected tensor {key!r}; npgpt's GPT-2 "
                                      "has no such parameter")
            if name in found:
                raise CheckpointError(f"{path}: tensor {name!r} is stored twice")
            found[name] = (f, key)
    missing = [n for n in shapes if n not in found]
    if missing:
        raise CheckpointError(f"{folder}: the weights lack {len(missing)} tensor(s) that "
                              f"config.json needs: {missing[:5]}")
    entries = list(found.items()) + ([("lm_head.weight", lm_head)] if lm_head else [])
    for name, (f, key) in entries:
        info = f.get_slice(key)
        want = shapes[name if name != "lm_head.weight" else "transformer.wte.weight"]
        if tuple(info.get_shape()) != tuple(want):
            raise CheckpointError(f"{folder}: tensor {key!r} has shape "
                                  f"{tuple(info.get_shape())}, config.json needs {tuple(want)}")
        if info.get_dtype() not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{folder}: tensor {key!r} is {info.get_dtype()}; npgpt "
                                  f"reads {', '.join(SAFETENSORS_DTYPES)} tensors (convert "
                                  "the model to float32 with transformers first)")
    return found, lm_head


def from_pretrained(folder, device="cpu", dtype="float32", dropout=None):
    """A GPT with the weights of the Hugging Face GPT-2 folder `folder`.

    The folder holds config.json and model.safetensors (or an index and its shards),
    as written by transformers' save_pretrained or by `save_pretrained` here. The
    weights are cast to `dtype` and placed on `device`. `dropout` overrides the
    configured dropout (see config_from_hf). Anything npgpt does not implement, and
    missing, corrupt or mismatched files, raise a CheckpointError."""
    if dtype not in DTYPES:
        raise NpgptError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    st = _safetensors()
    folder = os.fspath(folder)
    config = config_from_hf(read_hf_config(folder), dropout,
                            os.path.join(folder, CONFIG_FILE))
    shapes = dict(gpt2_param_shapes(config))
    with contextlib.ExitStack() as stack:
        handles = []
        for path in _weight_files(folder):
            try:
                handles.append((path, stack.enter_context(st.safe_open(path, framework="np"))))
            except (st.SafetensorError, OSError) as e:
                raise CheckpointError(f"{path}: missing, corrupt or not a safetensors file "
                                      f"({e})") from None
        found, lm_head = _index_tensors(handles, shapes, folder)
        model = GPT(config, dtype=dtype, device=device, init=False)
        try:
            for name, (f, key) in found.items():
                p, tensor = model.params[name], f.get_tensor(key)
                p[...] = model.xp.asarray(tensor, dtype=p.dtype)
                if name == "transformer.wte.weight" and lm_head is not None and \
                        not np.array_equal(lm_head[0].get_tensor(lm_head[1]), tensor):
                    raise CheckpointError(f"{folder}: lm_head.weight differs from "
                                          "transformer.wte.weight; npgpt's head is always "
                                          "tied to the token embedding")
        except st.SafetensorError as e:
            raise CheckpointError(f"{folder}: corrupt safetensors data ({e})") from None
    return model


# ------------------------------------------------------------------------ export
def hf_config(config, eos_token_id=None, dtype="float32"):
    """A transformers GPT2Config dict (config.json) for an npgpt GPTConfig whose weights
    are stored in `dtype`; eos_token_id (also used as bos, as GPT-2 does) may be None."""
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "activation_function": "gelu_new", "vocab_size": config.vocab_size,
        "n_positions": config.block_size, "n_ctx": config.block_size,
        "n_embd": config.n_embd, "n_layer": config.n_layer, "n_head": config.n_head,
        "n_inner": None, "layer_norm_epsilon": LAYER_NORM_EPS,
        **{key: float(config.dropout) for key in DROPOUT_KEYS},
        "initializer_range": 0.02, "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "add_cross_attention": False, "tie_word_embeddings": True, "use_cache": True,
        "bos_token_id": eos_token_id, "eos_token_id": eos_token_id, "torch_dtype": dtype,
    }


def save_pretrained(model, folder, tokenizer=None, dtype=None):
    """Write `model` as a Hugging Face GPT-2 folder that transformers'
    GPT2LMHeadModel.from_pretrained (and `from_pretrained` here) loads.

    Writes config.json and model.safetensors (in `dtype`, default the model's), and
    the tokenizer (an npgpt tokenizer or its to_json() text) if given: see the module
    docstring. Each file is written atomically; tokenizer files of an earlier export
    that this one does not write are removed, so the folder never mixes two."""
    st = _safetensors()
    dtype = str(dtype or model.dtype)
    if dtype not in DTYPES:
        raise NpgptError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    folder = os.fspath(folder)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise NpgptError(f"{folder}: exists and is not a folder; choose another output folder")
    files, eos = _tokenizer_files(tokenizer, model.config) if tokenizer is not None else ({}, None)
    # safetensors writes a strided view's memory, not its values: copy each to C order
    tensors = {name: np.ascontiguousarray(to_numpy(p), dtype=dtype)
               for name, p in model.params.items()}
    atomic_write(os.path.join(folder, WEIGHTS_FILE),
                 lambda f: f.write(st.numpy.save(tensors, metadata={"format": "pt"})), ELSEWHERE)
    for name in TOKENIZER_FILES:
        path = os.path.join(folder, name)
        if name in files:
            atomic_write(path, lambda f, text=files[name]: f.write(text.encode("utf-8")),
                         ELSEWHERE)
        elif os.path.isfile(path):
            os.unlink(path)
    text = json.dumps(hf_config(model.config, eos, dtype), indent=2, sort_keys=True) + "\n"
    atomic_write(os.path.join(folder, CONFIG_FILE), lambda f: f.write(text.encode("utf-8")),
                 ELSEWHERE)


def _tokenizer_files(tokenizer, config):
    """({file name: text}, eos id or None) for an npgpt tokenizer or its to_json() text."""
    from .tokenizers import GPT2_EOT, tokenizer_from_json
    if isinstance(tokenizer, str):
        tokenizer = tokenizer_from_json(tokenizer)
    if tokenizer.vocab_size > config.vocab_size:
        raise NpgptError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                         f"{config.vocab_size}; they do not belong together")
    if tokenizer.name != "gpt2":  # no transformers equivalent: see the module docstring
        return {NPGPT_TOKENIZER_FILE: tokenizer.to_json()}, None
    merges = "".join(f"{a} {b}\n" for a, b in tokenizer.merges)
    files = {"vocab.json": json.dumps(tokenizer.encoder, ensure_ascii=False),
             "merges.txt": "#version: 0.2\n" + merges}
    special = {} if tokenizer.eot_token is None else {
        key: GPT2_EOT for key in ("bos_token", "eos_token", "unk_token")}
    files["tokenizer_config.json"] = json.dumps(
        {"tokenizer_class": "GPT2Tokenizer", "model_max_length": config.block_size,
         "add_prefix_space": False, **special}, indent=2)
    return files, tokenizer.eot_token
