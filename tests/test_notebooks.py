"""The notebooks in notebooks/ run top to bottom, so a stale one fails the suite.

Each notebook is executed from a temporary copy (the stored notebooks, with their outputs
from a real run, are never rewritten here) in a fresh Jupyter kernel whose PYTHONPATH
starts with the repository root, so `import npgpt` finds this checkout. The per-cell
timeout is a hang guard, not a speed assertion.

The exercise workbook is executed twice, once per notebook: the learner's blank
notebooks/06_exercises.ipynb (every grader must say "not written yet") and its solutions,
notebooks/solutions/06_exercises.ipynb (every grader must pass); check_graders in
tests/test_exercise_notebook.py reads the graders' outputs from the executed notebook.

Refresh the stored outputs after editing a notebook (same runner, writes in place):

    NPGPT_DATA_DIR=/path/to/data python tests/test_notebooks.py [notebooks/NAME.ipynb ...]
"""
import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, shared_data_dir

NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb")) + sorted(NOTEBOOK_DIR.glob("solutions/*.ipynb"))
# the exercise workbooks (notebooks/make_exercises.py): whether each is the blank one
WORKBOOKS = {NOTEBOOK_DIR / "06_exercises.ipynb": True,
             NOTEBOOK_DIR / "solutions" / "06_exercises.ipynb": False}
CELL_TIMEOUT_S = 600  # a hang guard: each notebook takes well under a minute


def notebook_id(path):
    """A test id: the path under notebooks/ without .ipynb (solutions/06_exercises)."""
    return path.relative_to(NOTEBOOK_DIR).with_suffix("").as_posix()


def needs_shakespeare(path):
    """Whether the notebook loads Tiny Shakespeare (it calls resolve_corpus)."""
    return "resolve_corpus(" in path.read_text(encoding="utf-8")


def kernel_env(data_dir=None):
    """The kernel's environment: this one, with the checkout first on PYTHONPATH."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    if data_dir is not None:
        env["NPGPT_DATA_DIR"] = str(data_dir)
    return env


def execute(path, cwd, env):
    """Run every cell of the notebook at `path` in a new kernel; returns the executed notebook."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            record_timing=False, resources={"metadata": {"path": str(cwd)}})
    client.execute(env=env)
    return nb


def test_there_are_notebooks():
    names = [p.name for p in NOTEBOOKS]
    for expected in ("01_attention.ipynb", "02_backprop_by_hand.ipynb",
                     "03_train_and_sample.ipynb", "06_exercises.ipynb"):
        assert expected in names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=notebook_id)
def test_stored_notebook_has_outputs_of_a_run_top_to_bottom(path):
    """The committed notebook was executed in order (so it reads well on GitHub)."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    counts = [c.get("execution_count") for c in nb["cells"] if c["cell_type"] == "code"]
    assert counts == list(range(1, len(counts) + 1)), (
        f"{path.name}: stored execution counts {counts}; run it top to bottom and save it "
        "(python tests/test_notebooks.py)")
    errors = [o for c in nb["cells"] if c["cell_type"] == "code"
              for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"{path.name}: the stored outputs contain an error"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=notebook_id)
def test_notebook_runs_top_to_bottom(path, tmp_path):
    for module in ("nbformat", "nbclient", "ipykernel"):
        pytest.importorskip(module, reason=f"the notebook runner needs {module} "
                                           "(pip install -e \".[test]\")")
    data_dir = None
    if needs_shakespeare(path):
        from npgpt.data import shakespeare_path
        from npgpt.errors import NpgptError

        data_dir = shared_data_dir()
        if data_dir is None:  # no shared copy: the user cache, never a download here
            try:
                shakespeare_path(download=False)
            except NpgptError:
                pytest.skip(f"{path.name} needs Tiny Shakespeare: no copy found "
                            "(set NPGPT_DATA_DIR)")
    copy = tmp_path / path.name
    shutil.copy(path, copy)
    nb = execute(copy, tmp_path, kernel_env(data_dir))  # CellExecutionError on a failing cell
    if path in WORKBOOKS:
        from test_exercise_notebook import check_graders

        check_graders(nb, blank=WORKBOOKS[path])


def main(paths):
    """Execute notebooks in place, storing their outputs (for maintainers)."""
    import nbformat

    for path in paths or NOTEBOOKS:
        path = Path(path).resolve()
        t0 = time.perf_counter()
        nb = execute(path, path.parent, kernel_env(os.environ.get("NPGPT_DATA_DIR")
                                                   or shared_data_dir()))
        nbformat.write(nb, path)
        print(f"{path.name}: executed and saved in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
