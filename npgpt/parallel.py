"""Data-parallel worker threads in one process: every core on one batch.

    workers = Workers(model, 2)                 # resolve_workers("auto", ...): one per core
    loss = workers.forward_backward(x, y)       # model.grads: the whole batch's gradient
    clip_grad_norm(model.grads, 1.0)
    opt.step(model.grads)

A step of a small GPT is half matrix products and half element-wise NumPy work. With one
Python thread, BLAS spreads each product over the cores, but the element-wise half runs
on one core while BLAS's idle threads spin on the others. NumPy releases the GIL inside
BLAS and inside its element-wise loops, so W Python threads that each run forward and
backward on B/W rows of the batch, BLAS limited to cores/W threads each, keep every core
busy with both halves.

Worker 0 is `model` itself; each other worker is a `model.replica()`: the same parameter
buffer, its own gradients, activations and workspaces. Worker i takes rows
[start_i, stop_i) of the batch (contiguous slices, sizes differing by at most one). The
batch's loss is the mean over all its valid targets (targets != -1), so

    loss = sum_i (n_i / n) loss_i      (n_i: valid targets of worker i, n = sum_i n_i)
    grad = sum_i (n_i / n) grad_i

Each worker's backward starts from dloss = n_i / n, and the gradients are added into
model.grads in worker order (0, 1, 2, ...), a fixed order: the same W gives the same bits
on every run, and a resumed run stays bit-identical. A different W sums the same terms
in another grouping (the last bits differ). Dropout masks do not depend on W: every
worker draws the masks of the whole batch, as one worker would, and keeps its rows
(backend.RandomStream.rows), so W workers compute what one does up to rounding.
"""
import os
from concurrent.futures import ThreadPoolExecutor, wait

import numpy as np


def cores():
    """The cores this process may use: its BLAS thread count (train.py caps it at a rank's
    share under mpiexec; OMP_NUM_THREADS sets it), else the CPUs it may run on."""
    from threadpoolctl import threadpool_info
    blas = [i["num_threads"] for i in threadpool_info() if i.get("user_api") == "blas"]
    if blas:
        return max(blas)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


MIN_WORK = 1 << 15  # activation elements (rows x T x C) below which a worker costs more
                    # than it gives (thread hand-offs and the GIL: measured, tiny preset)


def resolve_workers(spec, batch_size, device, row_elements=None):
    """The number of workers for --workers `spec` ('auto' or a positive count as int or
    str). auto: one per core, at most one per batch row and per MIN_WORK activation
    elements (row_elements: block_size x n_embd of one row), and 1 on a GPU (one stream
    of kernels already fills it). Raises ValueError for an impossible count."""
    if spec in ("auto", None):
        if device != "cpu":
            return 1
        by_work = batch_size * row_elements // MIN_WORK if row_elements else batch_size
        return max(1, min(cores(), batch_size, by_work))
    try:
        n = int(spec)
    except (TypeError, ValueError):
        raise ValueError(f"--workers must be 'auto' or a positive integer, got {spec!r}") from None
    if n < 1:
        raise ValueError(f"--workers must be 'auto' or a positive integer, got {spec!r}")
    if n > batch_size:
        raise ValueError(f"--workers {n} exceeds --batch-size {batch_size}: each worker needs "
                         "at least one row of the batch")
    if n > 1 and device != "cpu":
        raise ValueError("--workers splits a batch across CPU cores: on a GPU use --workers 1 "
                         "(or auto)")
    return n


def row_slices(B, n):
    """n contiguous slices covering range(B), sizes B//n or B//n + 1 (the larger first)."""
    bounds = [i * (B // n) + min(i, B % n) for i in range(n + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:])]


class Workers:
    """W data-parallel workers over one model (W = 1: the model alone, no threads)."""

    def __init__(self, model, n, blas_threads=None):
        """n: the worker count (see resolve_workers). blas_threads: BLAS threads per worker
        while they run (default: cores() // n, at least 1)."""
        self.model, self.n = model, int(n)
        if self.n > 1 and model.device != "cpu":
            raise ValueError("worker threads split a batch across CPU cores; a GPU model "
                             "takes one (Workers(model, 1))")
        self.replicas = [model] + [model.replica() for _ in range(self.n - 1)]
        self.pool = ThreadPoolExecutor(self.n - 1, "npgpt-worker") if self.n > 1 else None
        self.blas_threads = blas_threads or max(1, cores() // self.n)
        self._controller = None
        if self.pool is not None:
            from threadpoolctl import ThreadpoolController
            self._controller = ThreadpoolController()

    def _run(self, job, x, y):
        """job(worker, x_rows, y_rows, weight, part) on every worker at once; the sum of
        their results, added in worker order. Weights are each worker's share of the valid
        targets."""
        if self.n == 1:
            return job(self.model, x, y, 1.0, None)
        parts = row_slices(x.shape[0], self.n)
        counts = [int(np.count_nonzero(np.asarray(y[p]) != -1)) for p in parts]
        total = sum(counts)
        if total == 0:
            raise ValueError("every target is ignore_index (-1): there is nothing to learn from")
        weights = [c / total for c in counts]
        errstate = np.geterr()  # NumPy's error settings are per thread: the caller's hold

        def in_thread(*args):
            with np.errstate(**errstate):
                return job(*args)

        with self._controller.limit(limits=self.blas_threads, user_api="blas"):
            futures = [self.pool.submit(in_thread, w, x[p], y[p], wt, (p.start, p.stop, x.shape[0]))
                       for w, p, wt in zip(self.replicas[1:], parts[1:], weights[1:])]
            try:  # worker 0 runs on this thread
                first = job(self.model, x[parts[0]], y[parts[0]], weights[0],
                            (0, parts[0].stop, x.shape[0]))
            finally:  # every worker has stopped before anything is raised or returned
                wait(futures)
            return sum((f.result() for f in futures), first)  # raises a worker's error

    def forward_backward(self, x, y, train=True, accumulate=False, dloss=1.0):
        """Forward and backward of the batch (x, y: host (B, T) arrays) over the workers.
        model.grads receives dloss x the gradient of the batch's mean loss (added to what is
        there with accumulate=True; dloss: a loss scale, see mixed.py); returns that loss
        (a 0-d array)."""
        state = self.model.rng.state()  # every worker's masks come from the same pass

        def job(worker, xs, ys, weight, rows):
            own = accumulate and worker is self.model  # the gradient to add to
            if weight == 0.0:  # rows of ignored targets only: no loss, no gradient
                if worker is self.model and train:
                    worker.rng.next_pass()  # the stream advances as in any pass
                if not own:
                    worker.zero_grad()
                return 0.0
            if worker is not self.model:
                worker.rng.set_state(state)
            worker.rng.rows = rows
            try:
                _, loss = worker.forward(xs, ys, train=train)
            finally:
                worker.rng.rows = None
            worker.backward(accumulate=own, dloss=weight * dloss)
            return loss * weight

        loss = self._run(job, x, y)
        for replica in self.replicas[1:]:  # in worker order: the same bits every run
            self.model.grads.flat += replica.grads.flat
        return loss

    def loss(self, x, y):
        """The batch's mean loss without a backward (evaluation)."""
        return self._run(lambda w, xs, ys, weight, rows:
                         w.forward(xs, ys)[1] * weight if weight else 0.0, x, y)
