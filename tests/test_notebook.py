"""walkthrough.ipynb: committed without outputs, equal to what scripts/build_notebook.py writes, and runs top to
bottom without an error in the same Python environment as the tests.

The notebook checks its own numbers with asserts (the RLHF optimum of Eq. 4 against the minimiser of Eq. 7, every
loss at h = 0 against its closed form, autograd against the gradient of Eq. 7, the parameter formulas against the
shipped model), so executing it is the test: any failing assert or exception fails here. It trains the shipped
tiny model four times and takes about 3 minutes on 2 CPU cores.
"""

import importlib.util
import sys
from pathlib import Path

import pytest

nbclient = pytest.importorskip("nbclient")
import nbformat  # noqa: E402  (installed with nbclient)

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "walkthrough.ipynb"


def test_notebook_is_committed_clean_and_equals_its_build_script():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    dirty = [cell.id for cell in nb.cells if cell.cell_type == "code" and (cell.outputs or cell.execution_count)]
    assert not dirty, f"cells {dirty} of walkthrough.ipynb have outputs: run `python scripts/build_notebook.py`"
    spec = importlib.util.spec_from_file_location("build_notebook", ROOT / "scripts" / "build_notebook.py")
    build_notebook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_notebook)  # defines the cells; writes nothing (main() runs only as a script)
    assert NOTEBOOK.read_text() == build_notebook.render(), (
        "walkthrough.ipynb differs from scripts/build_notebook.py: edit the script, then run "
        "`python scripts/build_notebook.py`")


def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the kernel inherits it: the notebook's run folder lands here
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=900,
                                     resources={"metadata": {"path": str(ROOT)}})  # cwd = the repository root
    probe = nbformat.v4.new_code_cell("import sys; print(sys.prefix); print(sys.executable)")
    with client.setup_kernel():
        client.execute_cell(probe, 0)
        prefix, executable = "".join(o["text"] for o in probe.outputs if o["output_type"] == "stream").splitlines()
        assert prefix == sys.prefix, (
            f"the Jupyter kernel 'python3' runs {executable}, not this environment's Python ({sys.executable}); "
            f"register it with `{sys.executable} -m ipykernel install --user --name python3`")
        for index, cell in enumerate(nb.cells):
            if cell.cell_type == "code":
                client.execute_cell(cell, index)  # raises CellExecutionError, with the cell and traceback, on an error
