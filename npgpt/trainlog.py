"""The training log: out/log.jsonl (one JSON record per eval and per logged step)
and out/loss.png, the loss curves redrawn from that log at every eval."""
import json
import os

from .checkpoint import atomic_write
from .errors import WriteError


class TrainLog:
    def __init__(self, out_dir):
        self.path = os.path.join(out_dir, "log.jsonl")
        self.png = os.path.join(out_dir, "loss.png")

    def records(self):
        """The log's records. A line that is not a whole JSON record (the last one, cut by
        kill -9 or a power loss mid-write) is left out: a resumed run rewrites it."""
        if not os.path.exists(self.path):
            return []
        records = []
        with open(self.path, errors="replace") as f:
            for line in f:
                try:
                    records.append(json.loads(line))
                except ValueError:
                    continue
        return [r for r in records if isinstance(r, dict) and "iter" in r]

    def truncate_after(self, it):
        """Drop records a resumed run will write again: steps >= it and evals > it
        (it = 0: a new run, whose eval at 0 is not written yet, keeps nothing)."""
        keep = [r for r in self.records() if it > 0
                and (r["iter"] <= it if "val_loss" in r else r["iter"] < it)]
        text = "".join(json.dumps(r) + "\n" for r in keep)
        atomic_write(self.path, lambda f: f.write(text.encode()))

    def write(self, record):
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:  # a full disk: one clear message (a cut line is skipped later)
            raise WriteError(self.path, e) from None

    def plot(self):
        """Redraw loss.png: step losses, and train/val losses at each eval. Draws on a bare
        Figure (no pyplot), so it leaves a notebook's plotting backend alone."""
        from matplotlib.figure import Figure

        records = self.records()
        steps = [r for r in records if "loss" in r]
        evals = [r for r in records if "val_loss" in r]
        fig = Figure(figsize=(7, 4))
        ax = fig.subplots()
        if steps:
            ax.plot([r["iter"] for r in steps], [r["loss"] for r in steps],
                    color="0.75", lw=1, label="train (batch)")
        if evals:
            its = [r["iter"] for r in evals]
            ax.plot(its, [r["train_loss"] for r in evals], "o-", label="train (eval)")
            ax.plot(its, [r["val_loss"] for r in evals], "o-", label="val (eval)")
        ax.set_xlabel("iteration")
        ax.set_ylabel("cross-entropy loss")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        atomic_write(self.png, lambda f: fig.savefig(f, format="png", dpi=100))
