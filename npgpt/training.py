"""The training loop that train.py and the notebooks share.

    text -> tokens -> batch -> forward -> loss -> backward -> clip -> AdamW -> checkpoint

    trainer = Trainer(TrainConfig(max_iters=200))
    summary = trainer.run()            # {'iter', 'train_loss', 'val_loss', ...}
    trainer.model.generate(...)

A checkpoint is written at every eval and at the end (and on Ctrl-C). It holds all
state a run depends on (parameters, AdamW moments and step, the iteration, the batch
and dropout streams), so a resumed run continues bit-identically, on the CPU and on a GPU
(where every sum is taken in a fixed order: see ops.embedding_backward).

Under mpiexec the same loop runs data-parallel on every rank (comm, see distributed.py):
each rank takes its slice of the global batch, the gradients are averaged by one
all-reduce, and only rank 0 prints and writes the log, the plot and the checkpoints.
"""
import dataclasses
import math
import os
import signal
import time
import weakref
from dataclasses import asdict

import numpy as np

from . import data as datasets
from .backend import auto_device_note, enable_tf32
from .checkpoint import load, save
from .distributed import Group, param_checksum
from .errors import CheckpointError, NpgptError
from .mixed import MixedPrecision, weights_dtype
from .model import GPT, GPTConfig
from .optim import AdamW, clip_grad_norm
from .parallel import Workers, resolve_workers
from .runlock import RunLock
from .tokenizers import build_tokenizer, tokenizer_from_json
from .trainconfig import MODEL_FIELDS, TrainConfig
from .trainlog import TrainLog

# what save_checkpoint writes beside the model, and _restore reads back
RESUME_KEYS = ("train_config", "tokenizer", "optim.m", "optim.v", "optim_t", "iter",
               "best_val_loss", "elapsed_s", "batch_rng", "dropout_rng")
BPE_TRAIN_CHARS = 10_000_000  # the bpe tokenizer learns its merges on at most this much text


def get_lr(it, cfg):
    """Linear warmup to cfg.lr, cosine decay to cfg.min_lr at the horizon, then min_lr."""
    horizon = cfg.lr_decay_iters or cfg.max_iters
    if it < cfg.warmup_iters:
        return cfg.lr * (it + 1) / (cfg.warmup_iters + 1)
    if it >= horizon:
        return cfg.min_lr
    progress = (it - cfg.warmup_iters) / (horizon - cfg.warmup_iters)  # 0 -> 1
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def build_corpus_tokenizer(cfg, corpus):
    """char: every character of the corpus; bpe: merges learned on its training part."""
    if cfg.tokenizer == "char":
        chars = set()
        for chunk in datasets.iter_text(corpus):
            chars.update(chunk)
        return build_tokenizer("char", "".join(sorted(chars)))
    text = datasets.read_text(corpus, max_chars=BPE_TRAIN_CHARS)
    return build_tokenizer("bpe", text[: int(datasets.TRAIN_FRACTION * len(text))],
                           vocab_size=cfg.vocab_size)


def crop_block_size(model, block_size):
    """A copy of `model` that sees at most block_size positions (wpe's first rows)."""
    config = dataclasses.replace(model.config, block_size=block_size)
    cropped = GPT(config, dtype=str(model.dtype), device=model.device, init=False)
    state = dict(model.params)
    state["transformer.wpe.weight"] = state["transformer.wpe.weight"][:block_size]
    cropped.load_state_dict(state)
    return cropped


class Trainer:
    """Sets up data, tokenizer, model and optimizer for a TrainConfig (or resumes them from
    OUT_DIR/ckpt.npz), then runs the loop."""

    def __init__(self, cfg, resume=False, overrides=None, progress=True, out=print, comm=None):
        self.comm = comm = comm or Group()  # this process's data-parallel group
        self.progress = progress and comm.rank == 0
        self.out = out if comm.rank == 0 else (lambda *_: None)
        self.ckpt_path = os.path.join(cfg.out_dir, "ckpt.npz")
        self.lock = RunLock(cfg.out_dir)  # one run per folder (rank 0 writes it)
        if comm.rank == 0:
            self.lock.acquire()
        weakref.finalize(self, self.lock.release)  # a Trainer never run lets go when freed
        try:
            self._setup(cfg, resume, overrides)
        except BaseException:
            self.lock.release()
            raise

    def _setup(self, cfg, resume, overrides):
        comm, extra = self.comm, None
        if resume:
            self.model, extra = load(self.ckpt_path, device=cfg.device)
            cfg = self._resumed_config(extra, overrides or {})
        elif os.path.exists(self.ckpt_path):  # never overwrite a run the user has
            raise NpgptError(f"{self.ckpt_path} already holds a run: continue it with --resume, "
                             "or start a new one in another --out-dir (or delete it first)")
        cfg.validate()
        self.cfg = cfg
        weights = weights_dtype(cfg.dtype)  # float32 masters for a float16 run (mixed.py)
        if resume and str(self.model.dtype) != weights:  # (the run changes --dtype)
            self.model, _ = load(self.ckpt_path, device=cfg.device, dtype=weights)
        if cfg.tf32:
            enable_tf32()  # before the first matrix product
        self.log = TrainLog(cfg.out_dir)
        corpus = datasets.resolve_corpus(cfg.data)
        if resume:
            self.tokenizer = tokenizer_from_json(extra["tokenizer"])
        elif cfg.init_from:
            self.model, self.tokenizer = self._pretrained(cfg, overrides or {})
        else:
            self.tokenizer = build_corpus_tokenizer(cfg, corpus)
            config = GPTConfig(vocab_size=self.tokenizer.vocab_size, block_size=cfg.block_size,
                               n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                               dropout=cfg.dropout)
            self.model = GPT(config, seed=cfg.seed, dtype=weights, device=cfg.device)
        self.model.reuse_memory = True  # the training path: layers reuse their memory
        self.mixed = None
        if cfg.dtype == "float16":  # a float16 model trained from float32 weights (mixed.py)
            self.mixed = MixedPrecision(self.model)
            self.model = self.mixed.model
        self.params = self.mixed.params if self.mixed else self.model.params  # the masters
        with comm.root_first():  # rank 0 encodes the token cache; ranks beside it reuse it
            self.data = datasets.prepare_tokens(corpus, self.tokenizer,
                                                os.path.join(cfg.out_dir, "data"))
        self.data.check_fits(cfg.block_size)
        self.opt = AdamW(self.params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                         weight_decay=cfg.weight_decay)
        self.batch_rng = np.random.default_rng(cfg.seed)
        self.iter, self.best_val_loss, self.elapsed = 0, math.inf, 0.0
        self.resumed = resume
        if resume:
            self._restore(extra)
        if comm.size > 1:
            self._join_ranks()
        try:  # threads that split each batch by rows (parallel.py)
            n_workers = resolve_workers(cfg.workers, cfg.batch_size, self.model.device,
                                        cfg.block_size * self.model.config.n_embd)
        except ValueError as e:
            raise NpgptError(str(e)) from None
        self.workers = Workers(self.model, n_workers)
        if resume:
            self._note_worker_change(extra)
        self.stop_requested, self.stop_signal = False, None

    # ------------------------------------------------------------------ setup
    def _resumed_config(self, extra, overrides):
        missing = [key for key in RESUME_KEYS if key not in extra]
        if missing:
            raise CheckpointError(f"{self.ckpt_path}: holds no {', '.join(missing)}: it was not "
                                  "written by train.py, so there is no run to resume; start a "
                                  "new run in another --out-dir")
        try:
            saved = TrainConfig(**extra["train_config"])
        except TypeError as e:
            raise CheckpointError(f"{self.ckpt_path}: its train_config does not fit this "
                                  f"npgpt's settings ({e})") from None
        for name, value in overrides.items():
            if name in MODEL_FIELDS and value != getattr(saved, name):
                raise NpgptError(f"--{name.replace('_', '-')} {value} differs from the checkpoint's "
                                 f"{getattr(saved, name)}: a resumed run keeps its model and data; "
                                 "start a new run in another --out-dir instead")
        return TrainConfig(**{**asdict(saved), **overrides})

    def _pretrained(self, cfg, overrides):
        """Model and tokenizer of a Hugging Face GPT-2 folder, as nanoGPT's init_from='gpt2':
        the block size may be cropped below n_positions; dropout comes from cfg."""
        from .hf import from_pretrained
        from .tokenizers import tokenizer_from_pretrained
        model = from_pretrained(cfg.init_from, device=cfg.device, dtype=weights_dtype(cfg.dtype),
                                dropout=cfg.dropout)
        mc = model.config
        for name in ("n_layer", "n_head", "n_embd"):
            if name in overrides and overrides[name] != getattr(mc, name):
                raise NpgptError(f"--{name.replace('_', '-')} {overrides[name]} differs from "
                                 f"{cfg.init_from}'s {getattr(mc, name)}; drop the flag")
        if cfg.block_size > mc.block_size:
            if "block_size" in overrides:
                raise NpgptError(f"--block-size {cfg.block_size} exceeds {cfg.init_from}'s "
                                 f"n_positions ({mc.block_size})")
            cfg.block_size = mc.block_size
        if cfg.block_size < mc.block_size:
            model = crop_block_size(model, cfg.block_size)
        cfg.n_layer, cfg.n_head, cfg.n_embd = mc.n_layer, mc.n_head, mc.n_embd
        tokenizer = tokenizer_from_pretrained(cfg.init_from)
        cfg.tokenizer, cfg.vocab_size = tokenizer.name, tokenizer.vocab_size
        return model, tokenizer

    def _restore(self, extra):
        self.opt.load_state(extra["optim_t"], {"*": extra["optim.m"]}, {"*": extra["optim.v"]})
        self.iter, self.best_val_loss = extra["iter"], extra["best_val_loss"]
        self.elapsed = extra["elapsed_s"]
        self.batch_rng.bit_generator.state = extra["batch_rng"]
        if "key" in (extra["dropout_rng"] or {}):
            self.model.rng.set_state(extra["dropout_rng"])
        else:  # written before the portable dropout stream (a NumPy generator's state)
            self.out("this checkpoint predates npgpt's portable dropout stream, so the dropout "
                     "masks differ from an uninterrupted run from here on")
        if self.mixed and "loss_scale" in extra:
            self.mixed.load_state(extra)
        saved_ranks = extra.get("world_size", 1)
        if saved_ranks != self.comm.size:
            self.out(f"the checkpoint was written by {saved_ranks} process(es), this run has "
                     f"{self.comm.size}: the batch split changed, so batches (and dropout masks) "
                     "differ from here on; parameters and optimizer state continue")

    def _note_worker_change(self, extra):
        saved = extra.get("workers", 1)
        if saved != self.workers.n:
            self.out(f"the checkpoint was written with {saved} worker thread(s), this run has "
                     f"{self.workers.n}: the same batches and dropout masks, but the gradient is "
                     "summed in another grouping, so the last bits differ from an uninterrupted "
                     f"run from here on (--workers {saved} keeps it bit-identical)")

    def _join_ranks(self):
        """Give each rank its own dropout stream (rank 0 keeps the model's, so one rank is
        exactly one process), then stop unless every rank has the same config, data,
        tokenizer, iteration and parameters."""
        comm, cfg = self.comm, self.cfg
        if comm.rank > 0:
            self.model.rng.key.append(comm.rank)
        facts = {f"--{k.replace('_', '-')}": v for k, v in asdict(cfg).items()
                 if k not in ("data", "out_dir")}  # paths may differ between hosts
        facts.update(self.data.fingerprint, iteration=self.iter,
                     parameter_checksum=param_checksum(self.params.flat))
        comm.check_same(facts, "at start", "Every rank needs the same flags, corpus, "
                        "npgpt version and (with --resume) checkpoint")

    def save_checkpoint(self):
        """Rank 0 writes OUT_DIR/ckpt.npz. Its dropout stream's state also gives the other
        ranks' (their keys add the rank; every rank has made as many passes)."""
        if self.comm.rank != 0:
            return
        opt = self.opt.state()  # the moments of model.params' one flat buffer, key "*"
        save(self.ckpt_path, self.model, params=self.params,  # float32 for a float16 model
             **(self.mixed.state() if self.mixed else {}),
             **{"optim.m": opt["m"]["*"], "optim.v": opt["v"]["*"]},
             optim_t=opt["t"], iter=self.iter, best_val_loss=self.best_val_loss,
             elapsed_s=self.elapsed, batch_rng=self.batch_rng.bit_generator.state,
             dropout_rng=self.model.rng.state(), world_size=self.comm.size,
             workers=self.workers.n,
             train_config=asdict(self.cfg), tokenizer=self.tokenizer.to_json())

    # ------------------------------------------------------------- one step
    def batch(self, split, rng):
        """This rank's slice of a global batch drawn from `rng` (the whole batch alone)."""
        B, rank = self.cfg.batch_size, self.comm.rank
        x, y = self.data.get_batch(split, B * self.comm.size, self.cfg.block_size, rng,
                                   part=slice(rank * B, (rank + 1) * B))
        return x, y  # host arrays: forward checks the ids, then moves them to the device

    def train_step(self):
        """One optimizer step over grad_accum micro-batches; returns this rank's mean loss
        (still on the device: nothing in a step waits for the GPU) and the learning rate."""
        cfg, model = self.cfg, self.model
        lr, mixed = get_lr(self.iter, cfg), self.mixed
        losses = []
        for micro in range(cfg.grad_accum):
            x, y = self.batch("train", self.batch_rng)  # forward + backward on the workers
            losses.append(self.workers.forward_backward(
                x, y, accumulate=micro > 0, dloss=mixed.scale if mixed else 1.0))
        if cfg.grad_accum > 1:
            model.grads.flat *= 1.0 / cfg.grad_accum  # mean over micro-batches
        self.comm.average_(model.grads.flat)  # mean over ranks: one all-reduce
        if mixed:  # unscale, clip, AdamW on the float32 weights unless they overflowed
            mixed.step(self.opt, lr, cfg.grad_clip)
        else:
            if cfg.grad_clip > 0:
                clip_grad_norm(model.grads, cfg.grad_clip)
            self.opt.step(model.grads, lr=lr)
        self.iter += 1
        return sum(losses) / len(losses), lr

    def read_loss(self, loss, what="the loss"):
        """A device loss as the float mean over the ranks: the host waits for the device
        here, so the loop reads the loss only when it logs. A NaN or infinite loss stops
        the run before anything else is saved (every rank reads at the same iterations)."""
        value = self.comm.mean(float(loss))
        if not math.isfinite(value):
            raise NpgptError(
                f"{what} became {value} by iteration {self.iter}; stopping. The last good "
                f"checkpoint ({self.ckpt_path}) is kept. Try a lower --lr, a --grad-clip, "
                + ("or --dtype float32 (a float16 activation may have passed 65504)"
                   if self.mixed else "or --dtype float64"))
        return value

    def evaluate(self):
        """Mean loss over eval_iters batches of each split; the same batches every eval."""
        rng = np.random.default_rng([self.cfg.seed, 1])
        result = {}
        for split in ("train", "val"):
            losses = [self.workers.loss(*self.batch(split, rng))
                      for _ in range(self.cfg.eval_iters)]
            result[split] = self.read_loss(sum(losses) / len(losses), f"the {split} loss")
        return result

    # ------------------------------------------------------------------ loop
    def _eval_and_save(self):
        losses = self.evaluate()
        if self.comm.size > 1:  # the ranks' parameters must still be identical
            self.comm.check_same({"parameter checksum": param_checksum(self.params.flat)},
                                 f"at iteration {self.iter}", "The parameters diverged: give "
                                 "every rank the same npgpt, NumPy, BLAS and device")
        self.best_val_loss = min(self.best_val_loss, losses["val"])
        if self.comm.rank == 0:
            self.log.write({"iter": self.iter, "train_loss": losses["train"],
                            "val_loss": losses["val"], "lr": get_lr(self.iter, self.cfg),
                            "elapsed_s": round(self.elapsed, 3)})
            self.log.plot()
        self.save_checkpoint()
        return losses

    def run(self):
        """Train up to cfg.max_iters; returns a summary dict."""
        from tqdm import tqdm

        cfg = self.cfg
        resumed_at = self.iter if self.resumed else None  # its eval is in the log already
        if self.comm.rank == 0:  # a new run starts a new log
            self.log.truncate_after(resumed_at if self.resumed else 0)
        n = self.comm.size
        tokens_per_step = n * cfg.batch_size * cfg.block_size * cfg.grad_accum
        self.out(f"npgpt: {self.model.num_params():,} parameters, vocab {self.tokenizer.vocab_size} "
                 f"({self.tokenizer.name}), {len(self.data.splits['train']):,} train tokens, "
                 f"{tokens_per_step:,} tokens per step, device {self.model.device}"
                 + (f", resuming at iteration {resumed_at}" if self.resumed else "")
                 + (f"; data-parallel on {n} MPI ranks, global batch {n} x {cfg.batch_size} "
                    f"x {cfg.grad_accum} = {n * cfg.batch_size * cfg.grad_accum} sequences"
                    if n > 1 else "")
                 + (f"; {self.workers.n} worker threads{' per rank' if n > 1 else ''}, "
                    f"{self.workers.blas_threads} BLAS thread(s) each"
                    if self.workers.n > 1 else ""))
        note = auto_device_note(cfg.device, self.model.device)
        if note:
            self.out(note)
        if self.comm.rank == 0:
            self.lock.acquire()  # (released at the end of an earlier run())
        bar = tqdm(total=cfg.max_iters, initial=self.iter, disable=not self.progress,
                   dynamic_ncols=True, desc="train")
        losses, loss = {}, None
        window_s, window_steps = 0.0, 0  # step time since the last step record
        previous = _install_stop_handlers(self)
        # a diverging run's inf/nan would warn from inside the ops; read_loss reports it
        errstate = np.seterr(over="ignore", invalid="ignore", divide="ignore")
        try:
            while True:
                if self.comm.any(self.stop_requested):  # Ctrl-C on any rank stops them all
                    self.stop_requested = True
                    if loss is not None:
                        self.read_loss(loss)  # never save parameters that went NaN
                    self.save_checkpoint()
                    by = f" by {signal.Signals(self.stop_signal).name}" if self.stop_signal else ""
                    self.out(f"\ninterrupted{by} at iteration {self.iter}; checkpoint saved to "
                             f"{self.ckpt_path} (continue with --resume)")
                    break
                done = self.iter >= cfg.max_iters
                if (self.iter % cfg.eval_interval == 0 or done) and self.iter != resumed_at:
                    losses = self._eval_and_save()
                    if self.comm.rank == 0:
                        bar.write(f"iter {self.iter}: train loss {losses['train']:.4f}, "
                                  f"val loss {losses['val']:.4f}")
                if done:
                    break
                t0 = time.perf_counter()
                loss, lr = self.train_step()  # on a GPU: queued, not yet computed
                logging = self.iter % cfg.log_interval == 0
                if logging:  # the host waits for the device only here
                    loss = self.read_loss(loss)
                dt = time.perf_counter() - t0
                self.elapsed += dt
                window_s, window_steps = window_s + dt, window_steps + 1
                bar.update(1)
                if not logging:
                    continue
                step_s, window_s, window_steps = window_s / window_steps, 0.0, 0
                scaler = self.mixed.state() if self.mixed else {}  # (reads the device)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", ms=f"{1000 * step_s:.0f}",
                                tok_s=f"{tokens_per_step / step_s:,.0f}", refresh=False,
                                **({"scale": f"{scaler['loss_scale']:g}",
                                    "skipped": scaler["skipped_steps"]} if scaler else {}))
                if self.comm.rank == 0:
                    record = {"iter": self.iter - 1, "loss": loss, "lr": lr,
                              "ms_per_iter": round(1000 * step_s, 2),
                              "tokens_per_s": round(tokens_per_step / step_s, 1),
                              "elapsed_s": round(self.elapsed, 3), **scaler}
                    if n > 1:
                        record["allreduce_ms"] = round(1000 * self.comm.allreduce_s, 2)
                    self.log.write(record)
        finally:
            np.seterr(**errstate)
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            bar.close()
            self.lock.release()
        return {"iter": self.iter, "train_loss": losses.get("train"), "val_loss": losses.get("val"),
                "best_val_loss": self.best_val_loss, "elapsed_s": self.elapsed,
                "interrupted": self.stop_requested, "signal": self.stop_signal}


# what asks a run to stop: Ctrl-C, a scheduler or `timeout` (SIGTERM), a closed terminal
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP")
                     if hasattr(signal, name))


def _install_stop_handlers(trainer):
    """First stop signal: finish the step, save, stop (trainer.stop_signal says which).
    Second: stop at once, Ctrl-C as KeyboardInterrupt, the others with exit status 128 +
    the signal's number (the last checkpoint on disk is intact: saves are atomic).
    Returns {signal: previous handler} to restore."""
    def handler(signum, frame):
        if trainer.stop_requested:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        trainer.stop_requested, trainer.stop_signal = True, signum

    previous = {}
    for signum in STOP_SIGNALS:
        try:
            previous[signum] = signal.signal(signum, handler)
        except ValueError:  # not in the main thread (e.g. some notebook runners)
            break
    return previous

