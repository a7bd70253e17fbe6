"""The training-step benchmark's causal floor: its FLOP count, and `--profile` running
without torch (CI has none)."""
import subprocess
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import train_step  # noqa: E402


@pytest.mark.parametrize("B, n_workers", [(8, 1), (8, 2), (7, 2)])
def test_the_causal_floor_counts_each_product_once(B, n_workers):
    cfg, _ = train_step.CONFIGS["tiny"]
    T, C, V, nh, L = cfg.block_size, cfg.n_embd, cfg.vocab_size, cfg.n_head, cfg.n_layer
    rows = -(-B // n_workers)  # worker 0's share, the larger
    linear = sum(2 * rows * T * cin * cout for cin, cout in
                 [(C, 3 * C), (C, C), (C, 4 * C), (4 * C, C)]) * L + 2 * rows * T * C * V
    pairs = sum(1 for i in range(T) for j in range(T) if j <= i)  # causal (query, key)
    attention = 2 * (2 * (C // nh) * pairs) * rows * nh * L       # q.k and weights @ v
    gflop, ms, rate = train_step.causal_floor(cfg, B, n_workers)
    assert gflop == pytest.approx(3e-9 * (linear + attention))   # forward + 2x backward
    assert rate > 0 and ms == pytest.approx(gflop / rate * 1e3)


NO_TORCH = """
import runpy, sys
class NoTorch:  # as if torch were not installed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torch":
            raise ImportError("No module named 'torch'")
sys.meta_path.insert(0, NoTorch())
sys.path.insert(0, {bench!r})
sys.argv = [{script!r}, "--profile", "--config", "tiny", "--steps", "2", "--workers", "1"]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_profile_runs_without_torch_and_prints_the_floor():
    bench = ROOT / "benchmarks"
    code = NO_TORCH.format(bench=str(bench), script=str(bench / "train_step.py"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "causal floor" in out.stdout and "x the floor" in out.stdout
