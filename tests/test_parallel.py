"""Worker threads inside one process (npgpt/parallel.py): W workers compute what one does.

In float64 the only difference between W workers and one is the grouping of the
gradient's sums, so after 20 training steps the parameters agree to ~1e-12; with the
same W a run is bit-identical, also after a crash and --resume.
"""
import shutil

import numpy as np
import pytest
from threadpoolctl import threadpool_info

from npgpt import GPT, GPTConfig
from npgpt.errors import NpgptError
from npgpt.parallel import Workers, cores, resolve_workers, row_slices
from npgpt.training import Trainer

from test_training import run_until, tiny

CFG = GPTConfig(vocab_size=23, block_size=16, n_layer=2, n_head=2, n_embd=16, dropout=0.1)
rng = np.random.default_rng(0)


def blas_threads():
    return [i["num_threads"] for i in threadpool_info() if i.get("user_api") == "blas"]


def trained(tmp_path, corpus, workers, **kw):
    t = Trainer(tiny(tmp_path / f"w{workers}", corpus, workers=workers, dtype="float64",
                     max_iters=20, **kw), progress=False, out=lambda *_: None)
    assert t.workers.n == workers
    assert all(w.reuse_memory for w in t.workers.replicas)  # the training path
    t.run()
    return t.model.params.flat


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_n_workers_train_like_one(tmp_path, corpus, dropout):
    """20 steps of the tiny preset (batch 8), float64: the same parameters within 1e-9
    for 2 and 3 workers (3 splits the batch 3 + 3 + 2)."""
    one = trained(tmp_path, corpus, 1, dropout=dropout)
    for n in (2, 3):
        p = trained(tmp_path, corpus, n, dropout=dropout)
        assert np.abs(p - one).max() <= 1e-9 * np.abs(one).max(), n


def test_the_gradient_weighs_every_valid_target_alike():
    """The loss is the mean over the batch's valid targets: a worker whose rows are mostly
    ignore_index (-1) weighs by its valid targets, not by its share of the rows."""
    idx = rng.integers(0, CFG.vocab_size, (5, 16))
    targets = rng.integers(0, CFG.vocab_size, (5, 16))
    targets[3:, 2:] = -1  # the second worker (rows 3-4) has 4 valid targets of 32
    one = GPT(CFG, seed=1, dtype="float64")
    two = GPT(CFG, seed=1, dtype="float64")
    workers = Workers(two, 2)
    loss1 = Workers(one, 1).forward_backward(idx, targets, train=False)
    loss2 = workers.forward_backward(idx, targets, train=False)
    assert float(loss2) == pytest.approx(float(loss1), rel=1e-13)
    np.testing.assert_allclose(two.grads.flat, one.grads.flat, rtol=1e-11, atol=1e-14)
    # accumulate=True adds the next batch's gradient to what is there, on every worker count
    workers.forward_backward(idx, targets, train=False, accumulate=True)
    np.testing.assert_allclose(two.grads.flat, 2 * one.grads.flat, rtol=1e-11, atol=1e-14)
    assert float(workers.loss(idx, targets)) == pytest.approx(float(loss1), rel=1e-13)
    # a worker whose rows hold no valid target at all adds nothing
    targets[3:] = -1
    loss1 = Workers(one, 1).forward_backward(idx, targets, train=False)
    loss2 = workers.forward_backward(idx, targets, train=False)
    assert float(loss2) == pytest.approx(float(loss1), rel=1e-13)
    np.testing.assert_allclose(two.grads.flat, one.grads.flat, rtol=1e-11, atol=1e-14)
    targets[:] = -1
    with pytest.raises(ValueError, match="nothing to learn from"):
        workers.forward_backward(idx, targets)


def test_dropout_masks_do_not_depend_on_the_split():
    idx = rng.integers(0, CFG.vocab_size, (4, 16))
    targets = rng.integers(0, CFG.vocab_size, (4, 16))
    models = [GPT(CFG, seed=2, dtype="float64") for _ in range(2)]
    for model, n in zip(models, (1, 2)):
        Workers(model, n).forward_backward(idx, targets)
    # every worker's masks: rows of the masks one worker draws for the batch
    first, second = models[0].blocks[1].mlp.dropout.mask, models[1].blocks[1].mlp.dropout.mask
    np.testing.assert_array_equal(second, first[:2])
    np.testing.assert_allclose(models[1].grads.flat, models[0].grads.flat, rtol=1e-11, atol=1e-14)
    assert models[0].rng.calls == models[1].rng.calls == 1 and models[1].rng.rows is None


def test_blas_threads_are_limited_while_workers_run_and_restored_after():
    before = blas_threads()
    model = GPT(CFG, seed=3)
    workers = Workers(model, 2, blas_threads=1)
    seen = []
    forward = model.replica().forward.__func__

    def recording_forward(self, *args, **kwargs):
        seen.append(blas_threads())
        return forward(self, *args, **kwargs)

    for replica in workers.replicas:
        replica.forward = recording_forward.__get__(replica)
    workers.forward_backward(rng.integers(0, 23, (4, 8)), rng.integers(0, 23, (4, 8)))
    assert seen == [[1] * len(before)] * 2
    assert blas_threads() == before  # generation, between steps, keeps every BLAS thread


def test_an_error_in_a_worker_reaches_the_caller():
    workers = Workers(GPT(CFG, seed=4), 2)
    idx = rng.integers(0, CFG.vocab_size, (4, 8))
    idx[3, 0] = CFG.vocab_size  # only the second worker's rows are bad
    with pytest.raises(ValueError, match="token ids must lie in"):
        workers.forward_backward(idx, rng.integers(0, CFG.vocab_size, (4, 8)))


def test_worker_counts():
    assert row_slices(8, 3) == [slice(0, 3), slice(3, 6), slice(6, 8)]
    assert row_slices(2, 2) == [slice(0, 1), slice(1, 2)]
    assert 1 <= resolve_workers("auto", 32, "cpu") and resolve_workers("auto", 1, "cpu") == 1
    # too little work per worker: one (the tiny preset, 8 x 32 x 32 activations)
    assert resolve_workers("auto", 8, "cpu", 32 * 32) == 1
    assert resolve_workers("auto", 32, "cpu", 128 * 128) == min(cores(), 32)
    assert resolve_workers("auto", 32, "gpu") == 1 and resolve_workers("3", 8, "cpu") == 3
    for spec, batch, device, message in [(0, 8, "cpu", "positive"), ("two", 8, "cpu", "positive"),
                                         (9, 8, "cpu", "exceeds --batch-size 8"),
                                         (2, 8, "gpu", "on a GPU")]:
        with pytest.raises(ValueError, match=message):
            resolve_workers(spec, batch, device)


def test_a_bad_worker_count_is_a_clear_error(tmp_path, corpus):
    with pytest.raises(NpgptError, match="--workers 9 exceeds --batch-size 8"):
        Trainer(tiny(tmp_path, corpus, workers=9), progress=False)


@pytest.mark.parametrize("graceful", [False, True])
def test_resume_with_workers_is_bit_identical_and_another_count_continues(tmp_path, corpus,
                                                                          graceful):
    cfg = dict(dropout=0.1, max_iters=12, workers=2)
    straight = Trainer(tiny(tmp_path / "a", corpus, **cfg), progress=False, out=lambda *_: None)
    straight.run()
    interrupted = tiny(tmp_path / "b", corpus, **cfg)
    run_until(interrupted, 7, graceful=graceful)
    resumed = Trainer(interrupted, resume=True, progress=False, out=lambda *_: None)
    resumed.run()
    np.testing.assert_array_equal(resumed.model.params.flat, straight.model.params.flat)
    # the same checkpoint continued by 1 worker and by 2: the same batches and masks, so
    # the same training up to the last bits
    shutil.copytree(tmp_path / "b", tmp_path / "c")
    runs = {}
    for workers, folder in ((1, "b"), (2, "c")):
        notes = []
        t = Trainer(tiny(tmp_path / folder, corpus, **cfg), resume=True,
                    overrides={"workers": str(workers), "max_iters": 16},
                    progress=False, out=notes.append)
        assert t.workers.n == workers
        changed = [n for n in notes if "written with 2 worker thread(s), this run has 1" in n]
        assert len(changed) == (workers == 1), notes
        t.run()
        runs[workers] = t.model.params.flat
    assert not np.array_equal(runs[1], runs[2])
    np.testing.assert_allclose(runs[1], runs[2], rtol=0, atol=1e-5 * np.abs(runs[2]).max())
