"""The training loop: schedule, gradient accumulation, resume, NaN stop, Ctrl-C."""
import json
import math
import os
import warnings

import numpy as np
import pytest

from conftest import use_tiles
from npgpt import load, save
from npgpt.errors import NpgptError
from npgpt.trainconfig import PRESETS, TrainConfig
from npgpt.training import Trainer, get_lr


def tiny(tmp_path, corpus, **kw):
    base = {**PRESETS["tiny"], "data": str(corpus), "out_dir": str(tmp_path / "out"),
            "max_iters": 12, "eval_interval": 5, "eval_iters": 2, "log_interval": 2}
    return TrainConfig(**{**base, **kw})


def test_lr_schedule_warmup_cosine_floor():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_iters=10, max_iters=110)
    assert get_lr(0, cfg) == pytest.approx(1 / 11)
    assert get_lr(9, cfg) == pytest.approx(10 / 11)
    assert get_lr(10, cfg) == pytest.approx(1.0)
    assert get_lr(60, cfg) == pytest.approx(0.55)  # half way: the mean of lr and min_lr
    assert get_lr(110, cfg) == pytest.approx(0.1) and get_lr(500, cfg) == pytest.approx(0.1)
    lrs = [get_lr(i, cfg) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:])), "cosine decay is monotone"
    cfg.lr_decay_iters = 210  # an explicit horizon beyond max_iters
    assert get_lr(110, cfg) == pytest.approx(0.55)


def test_grad_accumulation_equals_one_big_batch(tmp_path, corpus):
    cfg = tiny(tmp_path, corpus, dtype="float64", batch_size=4)
    a = Trainer(cfg, progress=False, out=lambda *_: None)
    b = Trainer(tiny(tmp_path, corpus, dtype="float64", batch_size=2, grad_accum=2),
                progress=False, out=lambda *_: None)
    rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
    x, y = a.data.get_batch("train", 4, cfg.block_size, rng_a)
    a.model.forward(x, y, train=True)
    a.model.backward()
    for micro in range(2):
        xb, yb = b.data.get_batch("train", 2, cfg.block_size, rng_b)
        np.testing.assert_array_equal(xb, x[2 * micro:2 * micro + 2])
        b.model.forward(xb, yb, train=True)
        b.model.backward(accumulate=micro > 0)
    b.model.grads.flat *= 0.5
    np.testing.assert_allclose(b.model.grads.flat, a.model.grads.flat, rtol=1e-10, atol=1e-14)


def test_training_learns_and_writes_log_plot_checkpoint(tmp_path, corpus):
    t = Trainer(tiny(tmp_path, corpus, max_iters=40, eval_interval=20, lr=3e-3), progress=False,
                out=lambda *_: None)
    first = t.evaluate()["val"]
    summary = t.run()
    assert summary["val_loss"] < first - 0.5
    out = tmp_path / "out"
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_loss" in r]
    assert [r["iter"] for r in evals] == [0, 20, 40]
    assert set(evals[0]) == {"iter", "train_loss", "val_loss", "lr", "elapsed_s"}
    assert any("loss" in r for r in records)
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model, extra = load(out / "ckpt.npz")
    assert extra["iter"] == 40 and "tokenizer" in extra and extra["optim_t"] == 40
    np.testing.assert_array_equal(model.params.flat, t.model.params.flat)


class Crash(Exception):
    pass


def run_until(cfg, n_steps, resume=False, graceful=False):
    """Run, but stop after n_steps optimizer steps: by Ctrl-C (graceful) or by a crash
    that saves nothing (as kill -9)."""
    t = Trainer(cfg, resume=resume, progress=False, out=lambda *_: None)
    step, done = t.train_step, [0]

    def counting_step():
        if done[0] == n_steps:
            if not graceful:
                raise Crash
        result = step()
        done[0] += 1
        if done[0] == n_steps and graceful:
            t.stop_requested = True  # what the SIGINT handler does
        return result

    t.train_step = counting_step
    try:
        t.run()
    except Crash:
        pass
    return t


@pytest.mark.parametrize("graceful, tile", [(False, None), (True, None), (False, 8)])
def test_resume_after_interruption_is_bit_identical(tmp_path, corpus, monkeypatch, graceful,
                                                    tile):
    """tile 8: attention in query tiles of 8 on the context of 32 (else one tile)."""
    if tile:
        use_tiles(monkeypatch, tile)
    cfg = dict(dropout=0.1, grad_accum=2, max_iters=16)
    straight = Trainer(tiny(tmp_path / "a", corpus, **cfg), progress=False, out=lambda *_: None)
    straight.run()
    interrupted_cfg = tiny(tmp_path / "b", corpus, **cfg)
    run_until(interrupted_cfg, 7, graceful=graceful)  # last checkpoint: iter 5 (crash) or 7
    _, extra = load(tmp_path / "b" / "out" / "ckpt.npz")
    assert extra["iter"] == (7 if graceful else 5)
    resumed = Trainer(interrupted_cfg, resume=True, progress=False, out=lambda *_: None)
    resumed.run()
    np.testing.assert_array_equal(resumed.model.params.flat, straight.model.params.flat)

    def log_without_timings(run):
        lines = (tmp_path / run / "out" / "log.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items()
                 if k not in ("elapsed_s", "ms_per_iter", "tokens_per_s")} for line in lines]

    assert log_without_timings("a") == log_without_timings("b")


def test_resuming_a_checkpoint_from_before_the_portable_dropout_stream(tmp_path, corpus):
    cfg = tiny(tmp_path, corpus, dropout=0.1, max_iters=5)
    Trainer(cfg, progress=False, out=lambda *_: None).run()
    path = tmp_path / "out" / "ckpt.npz"
    model, extra = load(path)
    extra["dropout_rng"] = np.random.default_rng(0).bit_generator.state  # the old format
    save(path, model, **extra)
    said = []
    t = Trainer(tiny(tmp_path, corpus, dropout=0.1, max_iters=8), resume=True,
                overrides={"max_iters": 8}, progress=False, out=said.append)
    assert any("predates npgpt's portable dropout stream" in line for line in said)
    assert t.run()["iter"] == 8


def test_extending_a_finished_run(tmp_path, corpus):
    cfg = tiny(tmp_path, corpus, max_iters=10)
    Trainer(cfg, progress=False, out=lambda *_: None).run()
    t = Trainer(cfg, resume=True, overrides={"max_iters": 14}, progress=False, out=lambda *_: None)
    assert t.cfg.max_iters == 14 and t.iter == 10
    assert t.run()["iter"] == 14


def test_resume_refuses_a_different_model(tmp_path, corpus):
    cfg = tiny(tmp_path, corpus, max_iters=5)
    Trainer(cfg, progress=False, out=lambda *_: None).run()
    with pytest.raises(NpgptError, match="n-layer"):
        Trainer(cfg, resume=True, overrides={"n_layer": 3}, progress=False)


def test_resume_refuses_a_checkpoint_train_py_did_not_write(tmp_path, corpus):
    cfg = tiny(tmp_path, corpus, max_iters=5)
    Trainer(cfg, progress=False, out=lambda *_: None).run()
    ckpt = tmp_path / "out" / "ckpt.npz"
    model, extra = load(ckpt)
    save(ckpt, model)  # npgpt.save alone: the model, no optimizer state or train config
    with pytest.raises(NpgptError, match="holds no train_config, tokenizer.*not written by train.py"):
        Trainer(cfg, resume=True, progress=False)
    save(ckpt, model, **{**extra, "train_config": {**extra["train_config"], "n_layr": 3}})
    with pytest.raises(NpgptError, match="train_config does not fit.*n_layr"):
        Trainer(cfg, resume=True, progress=False)


@pytest.mark.parametrize("log_interval", [1, 4, 50])
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, corpus, log_interval):
    # the loss is read only when logged (or at an eval), and always before a save
    t = Trainer(tiny(tmp_path, corpus, max_iters=20, log_interval=log_interval),
                progress=False, out=lambda *_: None)
    assert t.cfg.eval_interval == 5
    step = t.train_step

    def poisoned():
        if t.iter == 7:
            t.model.params["transformer.ln_f.weight"][0] = math.nan
        return step()

    t.train_step = poisoned
    by = {1: 8, 4: 8, 50: 10}[log_interval]  # the next log, or else the next eval
    with pytest.raises(NpgptError, match=f"became nan by iteration {by}"):
        t.run()
    model, extra = load(tmp_path / "out" / "ckpt.npz")
    assert extra["iter"] == 5 and np.all(np.isfinite(model.params.flat))


def test_a_diverging_run_stops_with_one_message_and_no_numpy_warnings(tmp_path, corpus):
    t = Trainer(tiny(tmp_path, corpus, lr=1e12, grad_clip=0.0, max_iters=30),
                progress=False, out=lambda *_: None)
    before = np.geterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an overflow warning from the ops would fail here
        with pytest.raises(NpgptError, match="became nan"):
            t.run()
    assert np.geterr() == before  # the loop's error state is restored


@pytest.mark.parametrize("kw,match", [
    (dict(n_embd=30, n_head=4), "divisible"),
    (dict(batch_size=0), "batch-size"),
    (dict(tokenizer="bpe", vocab_size=100), "256"),
    (dict(block_size=100000), "too short"),
    (dict(dtype="bfloat16"), "dtype"),
    (dict(tf32=True), "--tf32"),                          # on the CPU
    (dict(tf32=True, device="auto", dtype="float64"), "--tf32"),
])
def test_impossible_settings_are_refused(tmp_path, corpus, kw, match):
    with pytest.raises(NpgptError, match=match):
        Trainer(tiny(tmp_path, corpus, **kw), progress=False)


def test_a_new_run_never_overwrites_an_existing_one(tmp_path, corpus):
    cfg = tiny(tmp_path, corpus, max_iters=5)
    Trainer(cfg, progress=False, out=lambda *_: None).run()
    before = (tmp_path / "out" / "ckpt.npz").read_bytes()
    with pytest.raises(NpgptError, match="--resume"):
        Trainer(cfg, progress=False, out=lambda *_: None)
    assert (tmp_path / "out" / "ckpt.npz").read_bytes() == before


def test_a_new_run_starts_a_new_log(tmp_path, corpus):
    out = tmp_path / "out"
    out.mkdir()
    (out / "log.jsonl").write_text('{"iter": 99, "loss": 1.0}\n')  # left by a run that died early
    Trainer(tiny(tmp_path, corpus, max_iters=2, eval_interval=2), progress=False,
            out=lambda *_: None).run()
    records = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert records[0]["iter"] == 0 and all(r["iter"] != 99 for r in records)


def test_tf32_is_a_switch_that_tells_cupy_before_any_matrix_product(tmp_path, corpus,
                                                                    monkeypatch):
    from npgpt.trainconfig import build_parser, config_from_args
    parser = build_parser()
    assert config_from_args(parser.parse_args(["--tf32"])).tf32 is True
    assert config_from_args(parser.parse_args([])).tf32 is False
    monkeypatch.setenv("CUPY_TF32", "0")  # so that monkeypatch restores the variable after
    monkeypatch.delenv("CUPY_TF32")
    Trainer(tiny(tmp_path, corpus, device="auto"), progress=False, out=lambda *_: None)
    assert "CUPY_TF32" not in os.environ
    # auto: on a GPU CuPy reads the variable at its first float32 product; here, the CPU
    Trainer(tiny(tmp_path / "b", corpus, device="auto", tf32=True), progress=False,
            out=lambda *_: None)
    assert os.environ["CUPY_TF32"] == "1"
