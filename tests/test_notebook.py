"""walkthrough.py (the jupytext percent-format source) and walkthrough.ipynb (committed with its outputs, so that
GitHub renders every plot and number) hold the same cells, and the committed outputs are what a fresh run gives.

The notebook checks its own numbers with asserts (the RLHF optimum of Eq. 4 against the minimiser of Eq. 7, Z(x)
cancelling, every loss at Δ = 0 against its closed form, the Eq. 7 gradient, the hand-written log-probs and loop
against dpo.py and dpo.main, the parameter formulas against the shipped model), so executing it is the first test:
any failing assert or exception fails here. The second is that nobody committed outputs of an older source, or
forgot to re-execute after an edit:

- the same cells, code cells with outputs of the same kinds in the same order (stream name, or the MIME types of
  a display: an image must still be there; its pixels are not compared);
- every text output equal once its numbers are taken out, and every number within rel 1e-3 / abs 1e-4 of the
  committed one. Everything the notebook computes is deterministic on a CPU (seeded initialisation, data order and
  sampling; one thread); the tolerance absorbs float rounding that differs between CPU kinds and library builds
  (a different SIMD kernel changes the last bits of a sum, which 100 Adam steps grow to ~1e-6 relative), while a
  changed setting, formula or data row moves the printed numbers by far more.
- lines containing "wall time:" are timings and are skipped.

The fresh run must take under NOTEBOOK_BUDGET_S on 2 CPU cores (it trains the shipped tiny model 11 times, for
about 340 steps in all, and samples from it 7 times). Re-sync the two files after an edit with
`jupytext --to ipynb walkthrough.py && jupyter execute --inplace walkthrough.ipynb` (see the README).
"""

import copy
import math
import re
import sys
import time
from pathlib import Path

import pytest

nbclient = pytest.importorskip("nbclient")
jupytext = pytest.importorskip("jupytext")
import nbformat  # noqa: E402  (installed with nbclient)

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "walkthrough.ipynb"
SOURCE = ROOT / "walkthrough.py"
NOTEBOOK_BUDGET_S = 300
MAX_NOTEBOOK_BYTES = 2_000_000
REL_TOL, ABS_TOL = 1e-3, 1e-4
SKIP_LINE = "wall time:"
# a number as the notebook prints it: 12, -0.6931, 1,234,567 (thousands), 1.5e-06
NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?")
# the text that stands for the Python objects' addresses in a repr (<Figure ... at 0x7f...>)
ADDRESS = re.compile(r"0x[0-9a-f]+")


def cells(nb):
    return [(cell.cell_type, cell.source.strip()) for cell in nb.cells]


def test_paired_files_hold_the_same_cells():
    source, notebook = jupytext.read(SOURCE), jupytext.read(NOTEBOOK)
    assert notebook.metadata.get("jupytext", {}).get("formats") == "ipynb,py:percent", (
        "walkthrough.ipynb is not paired with walkthrough.py (jupytext metadata formats: ipynb,py:percent)")
    assert cells(source) == cells(notebook), (
        "walkthrough.py and walkthrough.ipynb differ: edit walkthrough.py, then run "
        "`jupytext --to ipynb walkthrough.py && jupyter execute --inplace walkthrough.ipynb` (or `jupytext --sync walkthrough.py` and execute)")
    size = NOTEBOOK.stat().st_size
    assert size < MAX_NOTEBOOK_BYTES, f"walkthrough.ipynb is {size:,} bytes; keep it under {MAX_NOTEBOOK_BYTES:,}"
    nb = nbformat.read(NOTEBOOK, as_version=4)
    missing = [k for k, cell in enumerate(nb.cells) if cell.cell_type == "code" and not cell.get("execution_count")]
    assert not missing, f"cells {missing} of walkthrough.ipynb were not executed: commit it with its outputs"


def kinds(outputs):
    """What each output is: a stream and its name, a display or result and its MIME types, or an error."""
    described = []
    for out in outputs:
        if out["output_type"] == "stream":
            if described[-1:] != [("stream", out["name"])]:  # how a print is split into messages varies: one entry
                described.append(("stream", out["name"]))
        elif out["output_type"] in ("display_data", "execute_result"):
            described.append((out["output_type"], tuple(sorted(out["data"]))))
        else:
            described.append((out["output_type"],))
    return described


def texts(outputs):
    """The text of the outputs: streams joined by name (a kernel may split one print into several messages), and
    each display's text/plain, with timing lines and object addresses left out."""
    pieces = {}
    for k, out in enumerate(outputs):
        if out["output_type"] == "stream":
            pieces[out["name"]] = pieces.get(out["name"], "") + out["text"]
        elif "text/plain" in out.get("data", {}):
            pieces[k] = out["data"]["text/plain"]
    return {key: [ADDRESS.sub("0x", line) for line in text.splitlines() if SKIP_LINE not in line]
            for key, text in pieces.items()}


def compare_line(committed, fresh):
    """None if the lines agree (same words, numbers within tolerance), else a description of the difference."""
    words_committed, words_fresh = NUMBER.split(committed), NUMBER.split(fresh)
    if words_committed != words_fresh:
        return f"text differs:\n    committed: {committed}\n    fresh:     {fresh}"
    for a, b in zip(NUMBER.findall(committed), NUMBER.findall(fresh)):
        x, y = float(a.replace(",", "")), float(b.replace(",", ""))
        if not math.isclose(x, y, rel_tol=REL_TOL, abs_tol=ABS_TOL):
            return f"{a} became {b}:\n    committed: {committed}\n    fresh:     {fresh}"
    return None


def execute_fresh(nb):
    """Run every code cell of nb in place, in the kernel 'python3' with the repository root as working folder."""
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=600,
                                     resources={"metadata": {"path": str(ROOT)}})
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


def test_notebook_runs_and_its_committed_outputs_are_what_a_fresh_run_gives(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the kernel inherits it: the notebook's run folder lands here
    committed = nbformat.read(NOTEBOOK, as_version=4)
    fresh = copy.deepcopy(committed)
    for cell in fresh.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    start = time.time()
    execute_fresh(fresh)
    elapsed = time.time() - start
    assert elapsed < NOTEBOOK_BUDGET_S, f"the notebook took {elapsed:.0f} s, more than its {NOTEBOOK_BUDGET_S} s budget"

    problems = []
    for index, (old, new) in enumerate(zip(committed.cells, fresh.cells)):
        if old.cell_type != "code":
            continue
        where = f"cell {index} ({old.source.splitlines()[0][:60] if old.source else ''!r})"
        if kinds(old.outputs) != kinds(new.outputs):
            problems.append(f"{where}: outputs {kinds(old.outputs)} became {kinds(new.outputs)}")
            continue
        old_texts, new_texts = texts(old.outputs), texts(new.outputs)
        for key in old_texts:
            if len(old_texts[key]) != len(new_texts[key]):
                problems.append(f"{where}: {len(old_texts[key])} lines of {key} became {len(new_texts[key])}")
                continue
            for a, b in zip(old_texts[key], new_texts[key]):
                difference = compare_line(a, b)
                if difference:
                    problems.append(f"{where}: {difference}")
                    break  # the first differing line of an output is enough
    assert not problems, (
        "the committed outputs of walkthrough.ipynb are not what a fresh run gives; re-execute it with "
        "`jupytext --to ipynb walkthrough.py && jupyter execute --inplace walkthrough.ipynb` and commit it:\n" + "\n".join(problems))
