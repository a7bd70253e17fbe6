"""Data-parallel training over MPI (mpi4py): one model, N processes, one all-reduce a step.

    mpiexec -n 2 python train.py --batch-size 16     # the same run as: python train.py --batch-size 32

Every rank draws the same N*B batch offsets from the shared batch generator and keeps
its own B rows (so N ranks see exactly the rows one process sees with batch N*B),
computes the gradient of its rows, and one all-reduce over the flat gradient buffer
averages the N gradients. Every rank then applies the same AdamW step to the same
parameters, so they stay identical without being sent; a checksum compares them at
start and at every eval. Only rank 0 prints and writes files.

Dropout: rank 0 keeps the model's own dropout stream (one rank is exactly one process)
and rank r > 0 adds r to its stream's key, so the ranks draw independent masks. The
masks therefore differ from a single process with the summed batch (which draws one
mask for all its rows); with dropout 0 the runs are equal up to the summation order of
the all-reduce.

GPU ranks (CuPy) run the same code: the ranks on one host take its GPUs in turn, and
the all-reduce goes through host memory (device -> host, MPI, host -> device); see
docs/scaling.md for what that costs and what would be faster (NCCL).

mpi4py is imported only when the environment says an MPI launcher started this
process (LAUNCH_SIZE_VARS), so single-process training never needs it.
"""
import os
import sys
import time
import traceback
from contextlib import contextmanager

from .backend import get_xp, gpu_available, to_numpy
from .cli import run_cli
from .errors import NpgptError

# set by mpiexec/mpirun: MPICH and Intel MPI (Hydra), Open MPI, MVAPICH
LAUNCH_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def launch_size(environ=None):
    """How many processes an MPI launcher started (1 when none did), read from the
    environment without importing mpi4py."""
    environ = os.environ if environ is None else environ
    for name in LAUNCH_SIZE_VARS:
        if environ.get(name, "").isdigit():
            return int(environ[name])
    return 1


def world():
    """This process's group: Group() when it runs alone, an MPIGroup over
    MPI.COMM_WORLD when an MPI launcher started several."""
    n = launch_size()
    if n == 1:
        return Group()
    try:
        from mpi4py import MPI
    except ImportError:
        raise NpgptError(f"this process is one of {n} started by an MPI launcher, but mpi4py "
                         "is not installed: pip install -e \".[mpi]\" (or run without mpiexec)"
                         ) from None
    if MPI.COMM_WORLD.Get_size() != n:
        raise NpgptError(f"the MPI launcher started {n} processes but mpi4py's MPI library sees "
                         f"{MPI.COMM_WORLD.Get_size()}: launch with the mpiexec of the MPI that "
                         "mpi4py uses (the one in this Python environment's bin/)")
    return MPIGroup(MPI.COMM_WORLD, MPI)


def param_checksum(flat):
    """The sum of the parameters' bit patterns as 32-bit words, modulo 2**64: exact and
    independent of summation order, so equal parameters give equal sums on any rank
    (computed where the array lives; only one integer comes back from a GPU)."""
    xp = get_xp(flat)
    return int(flat.view(xp.uint32).sum(dtype=xp.uint64))


class Group:
    """A process on its own: rank 0 of 1, every collective is the identity."""
    rank, size = 0, 1
    allreduce_s = 0.0  # seconds the last gradient all-reduce took

    def barrier(self):
        pass

    def average_(self, buf):
        """Replace `buf` (NumPy or CuPy) in place by its mean over the ranks."""
        return buf

    def mean(self, value):
        """The mean of a float over the ranks."""
        return value

    def any(self, flag):
        """True on every rank when `flag` is true on any."""
        return flag

    def check_same(self, facts, what, hint=""):
        """Raise NpgptError naming each entry of the dict `facts` that differs between ranks."""

    @contextmanager
    def root_first(self):
        """Run the block on rank 0 first, then on the other ranks (e.g. to fill a cache
        once that the others then read)."""
        if self.rank != 0:
            self.barrier()
        yield
        if self.rank == 0:
            self.barrier()


class MPIGroup(Group):
    """The ranks of an MPI communicator (MPI.COMM_WORLD under mpiexec)."""

    def __init__(self, comm, MPI):
        self.comm, self.MPI = comm, MPI
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        if gpu_available():  # ranks on one host take its GPUs in turn, before any allocation
            import cupy
            local_rank = comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()
            cupy.cuda.Device(local_rank % cupy.cuda.runtime.getDeviceCount()).use()

    def barrier(self):
        self.comm.Barrier()

    def average_(self, buf):
        """One in-place all-reduce (sum) of the buffer, then a scale by 1/size. A CuPy
        buffer goes through host memory: copied to the host, reduced there, copied back."""
        t0 = time.perf_counter()
        host = to_numpy(buf)  # `buf` itself for NumPy: reduced in place
        self.comm.Allreduce(self.MPI.IN_PLACE, host, op=self.MPI.SUM)
        host *= 1.0 / self.size
        if host is not buf:
            buf.set(host)  # cupy.ndarray.set: host -> device, in place
        self.allreduce_s = time.perf_counter() - t0
        return buf

    def mean(self, value):
        return self.comm.allreduce(float(value), op=self.MPI.SUM) / self.size

    def any(self, flag):
        return bool(self.comm.allreduce(int(bool(flag)), op=self.MPI.MAX))

    def check_same(self, facts, what, hint=""):
        everyone = self.comm.allgather(facts)
        diffs = []
        for key in facts:
            values = [repr(f.get(key)) for f in everyone]
            others = [r for r, v in enumerate(values) if v != values[0]]
            if others:
                more = f" (and {len(others) - 1} more ranks)" if len(others) > 1 else ""
                diffs.append(f"{key}: rank 0 has {values[0]}, rank {others[0]} has "
                             f"{values[others[0]]}{more}")
        if diffs:
            raise NpgptError(f"the {self.size} MPI ranks disagree {what}: " + "; ".join(diffs)
                             + (f". {hint}" if hint else ""))


def abort_job(code):
    """Print which rank stopped, then end every rank of the MPI job (MPI_Abort)."""
    try:
        from mpi4py import MPI
    except ImportError:  # no MPI at all: nothing waits for this process
        return
    comm = MPI.COMM_WORLD
    sys.stdout.flush()
    print(f"npgpt: rank {comm.Get_rank()} of {comm.Get_size()} failed; aborting the MPI job",
          file=sys.stderr, flush=True)
    # mpiexec forwards a rank's output through its own process; an abort at once can tear
    # the job down before the message above (and the error before it) is passed on
    time.sleep(0.2)
    comm.Abort(code or 1)


def run_cli_on_ranks(main, argv=None):
    """run_cli(main, argv), safe in an MPI job: a rank that does not finish main (a user
    error, out of memory, a bug) prints its message and aborts the whole job, as
    `python -m mpi4py` does. Otherwise it would wait in MPI_Finalize while the other
    ranks wait for it in their next all-reduce: the job would hang. On one process it
    is run_cli itself."""
    if launch_size() == 1:
        return run_cli(main, argv)
    finished = []

    def tracked(args):
        code = main(args)
        finished.append(code)
        return code

    try:
        code = run_cli(tracked, argv)
    except SystemExit as e:  # argparse: --help (0) or a bad flag (2), before any MPI call
        code = e.code if isinstance(e.code, int) else 1
        if code == 0:
            return 0
    except BaseException:  # a bug: show where, then stop everyone
        traceback.print_exc()
        code = 1
    if not finished:
        abort_job(code)
    return code
