"""Make the learner's workbook, notebooks/06_exercises.ipynb, from its solutions.

One source of truth, as Jupyter's grading tool nbgrader does it: the solutions notebook,
notebooks/solutions/06_exercises.ipynb, marks each answer inside its code cell

    def linear_backward(dout, cache):
        ### BEGIN SOLUTION
        ...the answer...
        ### END SOLUTION

and the learner's notebook is that notebook with every marked block (markers included)
replaced by nbgrader's stub, at the indentation of the BEGIN line:

    def linear_backward(dout, cache):
        # YOUR CODE HERE
        raise NotImplementedError()

A cell tagged "solution" (cell metadata "tags") is left out of the learner's notebook
whole: the solutions notebook tags so its note to maintainers and the answer key after
each grader. Outputs are cleared; the learner's notebook is then executed in place by the
test suite's runner, so it is stored with the outputs of its blank run (every grader says
"not written yet").

    python notebooks/make_exercises.py

runs the solutions notebook in place first (it stops there unless every grader passes),
then writes and runs the learner's notebook. After editing the solutions notebook, run it
again: tests/test_exercise_notebook.py fails while the two disagree.
"""
import copy
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOLUTIONS = HERE / "solutions" / "06_exercises.ipynb"
LEARNER = HERE / "06_exercises.ipynb"
RUNNER = HERE.parent / "tests" / "test_notebooks.py"  # the suite's notebook runner

BEGIN = "### BEGIN SOLUTION"
END = "### END SOLUTION"
STUB = ["# YOUR CODE HERE", "raise NotImplementedError()"]
SOLUTION_TAG = "solution"


def strip_solutions(source):
    """`source` with each BEGIN/END SOLUTION block (markers included) replaced by STUB,
    indented as its BEGIN line. Raises ValueError on an unbalanced marker."""
    lines, block_start = [], None  # block_start: the line number of an open BEGIN
    for number, line in enumerate(source.split("\n"), start=1):
        marker = line.strip()
        if marker == BEGIN:
            if block_start is not None:
                raise ValueError(f"line {number}: {BEGIN} inside the block opened on line "
                                 f"{block_start}; close it with {END} first")
            block_start = number
            indent = line[:len(line) - len(line.lstrip())]
            lines += [indent + stub for stub in STUB]
        elif marker == END:
            if block_start is None:
                raise ValueError(f"line {number}: {END} without a {BEGIN} above it")
            block_start = None
        elif block_start is None:
            lines.append(line)
    if block_start is not None:
        raise ValueError(f"line {block_start}: {BEGIN} is never closed: add {END} "
                         "after the answer")
    return "\n".join(lines)


def learner_notebook(solutions):
    """The learner's notebook made from the solutions notebook (an nbformat v4 notebook):
    cells tagged SOLUTION_TAG left out, answers replaced by the stub, outputs cleared."""
    nb = copy.deepcopy(solutions)
    cells = []
    for index, cell in enumerate(nb.cells):
        if SOLUTION_TAG in cell.get("metadata", {}).get("tags", []):
            continue
        has_marker = BEGIN in cell.source or END in cell.source
        if cell.cell_type != "code" and has_marker:
            raise ValueError(f"cell {index} ({cell.cell_type}) holds a solution marker: markers "
                             f"go in code cells; tag a whole cell '{SOLUTION_TAG}' to leave it out")
        if cell.cell_type == "code":
            try:
                cell.source = strip_solutions(cell.source)
            except ValueError as e:
                raise ValueError(f"cell {index}: {e}") from None
            cell.outputs, cell.execution_count = [], None
        cells.append(cell)
    nb.cells = cells
    return nb


def grader_results(nb):
    """[(cell index, what grade printed, the bool it returned as text)] for each grader
    cell of an executed notebook: a code cell whose last line calls grade(...)."""
    results = []
    for index, cell in enumerate(nb.cells):
        last_line = cell.source.strip().split("\n")[-1]
        if cell.cell_type != "code" or not last_line.startswith("grade("):
            continue
        printed = "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")
        returned = "".join(o.data.get("text/plain", "") for o in cell.outputs
                           if o.output_type == "execute_result")
        results.append((index, printed, returned))
    return results


def run_in_place(path):
    """Execute the notebook at `path` with the suite's runner, storing its outputs."""
    subprocess.run([sys.executable, str(RUNNER), str(path)], check=True)


def main():
    import nbformat

    run_in_place(SOLUTIONS)
    graded = grader_results(nbformat.read(SOLUTIONS, as_version=4))
    failed = [index for index, _, returned in graded if returned != "True"]
    if failed:
        sys.exit(f"{SOLUTIONS.name}: the graders of cells {failed} do not pass: fix the "
                 "solutions first (their outputs show what is wrong)")
    nbformat.write(learner_notebook(nbformat.read(SOLUTIONS, as_version=4)), LEARNER)
    run_in_place(LEARNER)


if __name__ == "__main__":
    main()
