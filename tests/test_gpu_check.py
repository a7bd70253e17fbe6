"""benchmarks/gpu_check.sh, the runbook for a lent GPU, dry-run on the CPU: its shell
logic (the step-time probe, the plan sized to the deadline, train.py under a deadline, the
results read back, RESUME=1) is exercised on every CI run, not first on a GPU's clock.
Its steps 1-2 (pytest, the benchmarks against PyTorch) are skipped here."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT, shared_data_dir


def gpu_check(tmp_path, **env):
    data = shared_data_dir()
    if data is None:
        pytest.skip("no tinyshakespeare.txt (NPGPT_DATA_DIR or ../shared/data)")
    env = {**os.environ, "DRY_RUN": "1", "SKIP_TESTS": "1", "SKIP_BENCH": "1",
           "DEADLINE_S": "300", "PYTHON": sys.executable, "NPGPT_DATA_DIR": str(data),
           "OUT": str(tmp_path / "out"), "TRAIN_DIR": str(tmp_path / "train"), **env}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    return (tmp_path / "out" / "summary.txt").read_text()


def test_the_dry_run_plans_trains_and_reports_then_resume_finds_it_done(tmp_path):
    summary = gpu_check(tmp_path)
    assert "device cpu" in summary and "mode full" in summary
    assert "[3] plan:" in summary and "a 30-iteration probe run" in summary
    assert "--max-iters 50 of 50" in summary, summary
    assert "rc 0: finished" in summary, summary
    assert "[3]   val loss at each eval: 0: " in summary and ", 50: " in summary
    assert (tmp_path / "out" / "3_tiny_log.jsonl").exists()
    assert (tmp_path / "train" / "ckpt.npz").exists()
    again = gpu_check(tmp_path, RESUME="1")
    assert "mode resume" in again
    assert "is at iteration 50 of 50" in again and "nothing to do" in again, again
