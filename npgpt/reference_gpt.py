"""The whole GPT, forward and backward, in one screen of textbook NumPy each.

model.py's GPT runs its forward and backward through layer objects (layers.py) that
call the fast ops of ops.py. Here the same network is written out in full, as picoGPT
writes its forward, from the textbook op pairs of reference.py: gpt_forward calls each
op's forward in order and keeps its cache; gpt_backward calls the matching backwards in
the reverse order. It is the second, independent derivation of GPT.backward:
tests/test_reference_gpt.py checks that the two give the same loss and the same gradient
of every tensor (and checks this one by central differences).

    idx (B,T) -> x = wte[idx] + wpe[:T]
              -> n_layer x [x = x + attn(ln_1(x));  x = x + mlp(ln_2(x))]
              -> logits = ln_f(x) @ wte.T (B,T,V) -> loss = cross-entropy with targets

Each line of gpt_backward inverts one line of gpt_forward, written beside it as a
comment (as llm.c's attention_backward does). Two rules do the rest: a residual add
x = x + f(x) passes its gradient through unchanged and adds the branch's input gradient;
wte is used twice (the embedding and the tied head), so its gradient is the sum of both.

Glossary (as in reference.py):
    B  batch size             T  sequence length (<= block_size)
    C  embedding width        V  vocabulary size
    nh number of heads        hs head size = C // nh
No dropout: this is the model in eval mode (GPT.forward(idx, targets), train=False).
"""
from . import reference as ref

WTE, WPE = "transformer.wte.weight", "transformer.wpe.weight"
# a block's layers in the order backprop reaches them (the reverse of the forward's)
BLOCK_LAYERS_BACKWARD = ("mlp.c_proj", "mlp.c_fc", "ln_2", "attn.c_proj", "attn.c_attn", "ln_1")


def backward_order(n_layer):
    """The parameter names in the order backprop reaches them: ln_f, the blocks from
    the last down to 0 (each from its MLP back to its ln_1), then wpe and wte (wte's
    gradient is complete only once the embedding is reached)."""
    names = ["transformer.ln_f.weight", "transformer.ln_f.bias"]
    for i in reversed(range(n_layer)):
        names += [f"transformer.h.{i}.{layer}.{w}"
                  for layer in BLOCK_LAYERS_BACKWARD for w in ("weight", "bias")]
    return names + [WPE, WTE]


def gpt_forward(params, idx, targets, n_head):
    """The mean cross-entropy loss of a GPT-2-layout model and the cache of every op.

    params: {Hugging Face GPT-2 name: array} (GPT(...).params); n_layer is read from the
    names. idx, targets: (B,T) ints; a target of -1 is ignored (not counted in the mean).
    cache: {"embedding": c, "blocks": [{"ln_1", "c_attn", "attn", "attn_c_proj", "ln_2",
    "c_fc", "gelu", "mlp_c_proj"}: c, one dict per layer], "ln_f": c, "head": c,
    "loss": c}, each c the cache the reference.py forward of that name returned."""
    p = params
    n_layer = sum(1 for name in p if name.endswith(".ln_1.weight"))
    C = p[WTE].shape[1]
    if C % n_head:
        raise ValueError(f"n_head ({n_head}) must divide the embedding width C ({C})")
    x, emb = ref.embedding_forward(idx, p[WTE], p[WPE])               # (B,T,C)
    blocks = []
    for i in range(n_layer):
        h, c = f"transformer.h.{i}.", {}
        a, c["ln_1"] = ref.layernorm_forward(x, p[h + "ln_1.weight"], p[h + "ln_1.bias"])
        qkv, c["c_attn"] = ref.linear_forward(a, p[h + "attn.c_attn.weight"],
                                              p[h + "attn.c_attn.bias"])  # (B,T,3C)
        y, c["attn"] = ref.attention_forward(qkv, n_head)              # (B,T,C)
        y, c["attn_c_proj"] = ref.linear_forward(y, p[h + "attn.c_proj.weight"],
                                                 p[h + "attn.c_proj.bias"])
        x = x + y                                                      # residual add
        a, c["ln_2"] = ref.layernorm_forward(x, p[h + "ln_2.weight"], p[h + "ln_2.bias"])
        m, c["c_fc"] = ref.linear_forward(a, p[h + "mlp.c_fc.weight"],
                                          p[h + "mlp.c_fc.bias"])      # (B,T,4C)
        m, c["gelu"] = ref.gelu_forward(m)
        m, c["mlp_c_proj"] = ref.linear_forward(m, p[h + "mlp.c_proj.weight"],
                                                p[h + "mlp.c_proj.bias"])  # (B,T,C)
        x = x + m                                                      # residual add
        blocks.append(c)
    xf, ln_f = ref.layernorm_forward(x, p["transformer.ln_f.weight"], p["transformer.ln_f.bias"])
    logits, head = ref.head_forward(xf, p[WTE])                        # (B,T,V), tied to wte
    loss, ce = ref.cross_entropy_forward(logits, targets)
    return loss, {"embedding": emb, "blocks": blocks, "ln_f": ln_f, "head": head, "loss": ce}


def gpt_backward(cache):
    """{name: d loss / d params[name]} for every parameter, from gpt_forward's cache
    (dloss = 1). Its names come in backward_order's order."""
    g = {}
    (dlogits,) = ref.cross_entropy_backward(1.0, cache["loss"])  # loss = CE(logits, targets)
    dxf, dwte_head = ref.head_backward(dlogits, cache["head"])     # logits = xf @ wte.T
    dx, g["transformer.ln_f.weight"], g["transformer.ln_f.bias"] = \
        ref.layernorm_backward(dxf, cache["ln_f"])                 # xf = ln_f(x)
    for i in reversed(range(len(cache["blocks"]))):
        h, c = f"transformer.h.{i}.", cache["blocks"][i]
        dm, g[h + "mlp.c_proj.weight"], g[h + "mlp.c_proj.bias"] = \
            ref.linear_backward(dx, c["mlp_c_proj"])               # x = x + m @ W + b
        (dm,) = ref.gelu_backward(dm, c["gelu"])                   # m = gelu(m)
        da, g[h + "mlp.c_fc.weight"], g[h + "mlp.c_fc.bias"] = \
            ref.linear_backward(dm, c["c_fc"])                     # m = a @ W + b
        dx2, g[h + "ln_2.weight"], g[h + "ln_2.bias"] = \
            ref.layernorm_backward(da, c["ln_2"])                  # a = ln_2(x)
        dx = dx + dx2                                              # x = x + mlp(ln_2(x))
        dy, g[h + "attn.c_proj.weight"], g[h + "attn.c_proj.bias"] = \
            ref.linear_backward(dx, c["attn_c_proj"])              # x = x + y @ W + b
        (dqkv,) = ref.attention_backward(dy, c["attn"])            # y = attention(qkv)
        da, g[h + "attn.c_attn.weight"], g[h + "attn.c_attn.bias"] = \
            ref.linear_backward(dqkv, c["c_attn"])                 # qkv = a @ W + b
        dx2, g[h + "ln_1.weight"], g[h + "ln_1.bias"] = \
            ref.layernorm_backward(da, c["ln_1"])                  # a = ln_1(x)
        dx = dx + dx2                                              # x = x + attn(ln_1(x))
    dwte_emb, g[WPE] = ref.embedding_backward(dx, cache["embedding"])  # x = wte[idx] + wpe[:T]
    g[WTE] = dwte_head + dwte_emb                                  # wte: head's + embedding's
    return g
