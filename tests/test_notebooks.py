"""Every notebook runs top to bottom on the suite's backend (CI fails if one fails).

With Jupyter (the gpurnn[notebooks] extra) a real kernel runs each notebook. A
machine without it (the GPU machines have no Jupyter and no network) runs the
code cells in order in one fresh Python process instead: the notebooks use no
IPython magics, so that is the same program.
"""

import glob
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))

CELL_RUNNER = """
import json, sys
cells = [c for c in json.load(open(sys.argv[1]))["cells"] if c["cell_type"] == "code"]
scope = {"__name__": "__main__"}
for k, cell in enumerate(cells):
    source = "".join(cell["source"])
    try:
        exec(compile(source, f"<code cell {k + 1} of {len(cells)}>", "exec"), scope)
    except BaseException:
        print(f"code cell {k + 1} failed:\\n{source}", file=sys.stderr)
        raise
"""


def test_there_are_five_notebooks():
    assert [os.path.basename(p)[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04", "05"]


def test_the_notebooks_use_no_ipython_magics():
    """What lets the plain runner stand in for a kernel."""
    for path in NOTEBOOKS:
        for cell in json.load(open(path))["cells"]:
            if cell["cell_type"] == "code":
                lines = "".join(cell["source"]).splitlines()
                assert not [l for l in lines if l.lstrip().startswith(("%", "!"))], path


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    try:
        import nbclient
        import nbformat
    except ImportError:  # no Jupyter here: the cells in order, in a plain process
        done = subprocess.run([sys.executable, "-c", CELL_RUNNER, path], cwd=os.path.dirname(path),
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-4000:]
        return
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": os.path.dirname(path)}})
    client.execute()  # raises CellExecutionError, with the failing cell, on any error
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
