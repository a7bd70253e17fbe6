"""Train a GPT with npgpt.   python train.py [--preset tiny|small|lecture] [flags]   (--help)

Data-parallel on N processes (pip install -e ".[mpi]"):   mpiexec -n N python train.py [flags]
"""
import os
import signal
import sys


def share_cores_between_ranks(environ=os.environ):
    """Under mpiexec, cap each rank's BLAS threads at its share of this host's cores
    (unless a thread count is set already, e.g. OMP_NUM_THREADS): ranks that each start
    a thread per core oversubscribe the cores, and spinning BLAS threads then make every
    step several times slower. Runs before NumPy is imported (it reads the count once)."""
    local = environ.get("MPI_LOCALNRANKS") or environ.get("OMPI_COMM_WORLD_LOCAL_SIZE")
    if not (local or "").isdigit() or any(
            v in environ for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")):
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    environ["OMP_NUM_THREADS"] = str(max(1, (cores or 1) // int(local)))


share_cores_between_ranks()

from npgpt.distributed import run_cli_on_ranks, world  # noqa: E402 (after the thread cap)
from npgpt.trainconfig import build_parser, config_from_args, given_flags  # noqa: E402
from npgpt.training import Trainer  # noqa: E402


def main(argv=None):
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    comm = world()  # one process alone, or this rank of an mpiexec job
    trainer = Trainer(cfg, resume=args.resume, overrides=given_flags(args), comm=comm)
    summary = trainer.run()
    if summary["val_loss"] is not None and comm.rank == 0 and not summary["interrupted"]:
        print(f"done: iteration {summary['iter']}, train loss {summary['train_loss']:.4f}, "
              f"val loss {summary['val_loss']:.4f}, {summary['elapsed_s']:.1f} s of training; "
              f"checkpoint {trainer.ckpt_path}")
    if summary["interrupted"]:  # the shell's convention: 128 + the signal (130 for Ctrl-C)
        return 128 + (summary["signal"] or signal.SIGINT)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli_on_ranks(main))
