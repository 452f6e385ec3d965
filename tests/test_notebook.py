"""walkthrough.py (the jupytext percent-format source) and walkthrough.ipynb (committed with its outputs,
so that GitHub renders every plot and number) hold the same cells, and the committed outputs are what a fresh
run gives.

The notebook checks its own numbers with asserts (the RLHF optimum of Eq. 4 against the minimiser of Eq. 7,
the margin recurrence, every loss at Δ = 0 against its closed form, its own DPO trainer against data.py and
dpo.main, the Eq. 7 gradient, the parameter formulas against the shipped model), so executing it is the first
test: a failing assert or an exception fails here. The second is that nobody committed outputs of an older
source, or forgot to re-execute after an edit:

- the same cells, code cells with outputs of the same kinds in the same order (stream name, or the MIME types
  of a display: an image must still be there; its pixels are not compared);
- every output line with the same words once its numbers are taken out;
- numbers of untagged cells: equal as printed, up to one unit of their last printed digit (a value on a
  rounding boundary may print either way on another CPU). These cells compute in float64, run forward passes
  of the untrained model, or a few exact steps: nothing in them grows a rounding difference;
- numbers of cells tagged "trained" (`# %% tags=["trained"]`: training runs) or "sampled" (samples of trained
  policies): within TOLERANCES[tag] of the committed value, plus one unit of the last printed digit. In
  "sampled" cells the lines of a trained policy's sampled text (SAMPLED_LINES) are skipped: a sampled token
  flips where a probability moved across the random draw, and the rest of that sample differs;
- lines containing "wall time:" are timings and are skipped.

Where TOLERANCES come from: `python tests/test_notebook.py --spread` executes the notebook plainly and under
settings that round differently, on the same machine, and prints the largest relative difference per tagged
cell (and any untagged number that moved beyond its last digit, and any line whose words changed). Measured on
an AMD EPYC with AVX-512, torch 2.13.0 CPU, 2025-12; largest relative difference of the trained | sampled
numbers:
  ATEN_CPU_CAPABILITY=avx2 (torch's other vector kernels: softmax, sums, ...)     4.7e-3 | 8.3e-3
  MKL_ENABLE_INSTRUCTIONS=AVX2 (other GEMM kernels)                              none   | none
  every nn.Linear input moved by -1, 0 or +1 ulp (another CPU's rounding)         1.1e-2 | 5.1e-2
  two threads instead of one (other reduction splits)*                           2.0e-3 | 6.6e-3
Untagged numbers: none beyond their last digit in any setting; words: one line, under the ulp noise only,
where two forwards of equal weights got different noise, which a real CPU does not do. *Two threads: §5's
100-step run and §6's sample_eval as a script, dpo.main's --cpu_threads 1 against 2; the whole notebook on two
threads ran past nbclient's 600 s cell limit on this shared machine. The previous edition's committed outputs,
made on another CPU, differed from this machine's by 2.5e-3 (a reward after 100 steps, -2.5534 against
-2.5599) and 6.6e-3 (a mean reward of samples), as two threads against one do here. TOLERANCES are about three
times the largest measured.

The fresh run must take under NOTEBOOK_BUDGET_S of CPU time: the notebook runs on one thread, so that is its
time on one free core (the clock time of a machine shared with other jobs can be several times longer).
Re-sync the two files after an edit with `jupytext --to ipynb walkthrough.py && jupyter execute --inplace
walkthrough.ipynb` (see the README).
"""

import copy
import os
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
# relative tolerance of the numbers in cells with these tags (see the docstring for the measurements)
TOLERANCES = {"trained": 0.035, "sampled": 0.15}
SKIP_LINE = "wall time:"
SAMPLED_LINES = ("policy:",)  # sample_eval's lines of a trained policy's text, skipped in "sampled" cells
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
        "walkthrough.py and walkthrough.ipynb differ: edit walkthrough.py, then run `jupytext --to ipynb "
        "walkthrough.py && jupyter execute --inplace walkthrough.ipynb` "
        "(or `jupytext --sync walkthrough.py`)")
    assert [tags(c) for c in source.cells] == [tags(c) for c in notebook.cells], "the cells' tags differ"
    size = NOTEBOOK.stat().st_size
    assert size < MAX_NOTEBOOK_BYTES, (
        f"walkthrough.ipynb is {size:,} bytes; keep it under {MAX_NOTEBOOK_BYTES:,}")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    missing = [k for k, cell in enumerate(nb.cells)
               if cell.cell_type == "code" and not cell.get("execution_count")]
    assert not missing, f"cells {missing} of walkthrough.ipynb were not executed: commit it with its outputs"


def test_markdown_lines_fit_in_100_characters():
    long = [(k, line) for k, cell in enumerate(jupytext.read(SOURCE).cells) if cell.cell_type == "markdown"
            for line in cell.source.splitlines() if len(line) > 100]
    assert not long, f"markdown lines over 100 characters: {long[:3]}"


def tags(cell):
    return tuple(cell.metadata.get("tags", []))


def kinds(outputs):
    """What each output is: a stream and its name, a display or result and its MIME types, or an error."""
    described = []
    for out in outputs:
        if out["output_type"] == "stream":
            if described[-1:] != [("stream", out["name"])]:  # a print's split into messages varies: one entry
                described.append(("stream", out["name"]))
        elif out["output_type"] in ("display_data", "execute_result"):
            described.append((out["output_type"], tuple(sorted(out["data"]))))
        else:
            described.append((out["output_type"],))
    return described


def texts(outputs, sampled=False):
    """The text of the outputs: streams joined by name (a kernel may split one print into several messages),
    and each display's text/plain, without timing lines, a trained policy's sampled text (if `sampled`) and
    object addresses."""
    pieces = {}
    for k, out in enumerate(outputs):
        if out["output_type"] == "stream":
            pieces[out["name"]] = pieces.get(out["name"], "") + out["text"]
        elif "text/plain" in out.get("data", {}):
            pieces[k] = out["data"]["text/plain"]
    return {key: [ADDRESS.sub("0x", line) for line in text.splitlines()
                  if SKIP_LINE not in line and not (sampled and line.startswith(SAMPLED_LINES))]
            for key, text in pieces.items()}


def last_digit(printed):
    """One unit of the last digit a number was printed with: 0.6931 -> 1e-4, 1.13e-07 -> 1e-9, 1,234 -> 1."""
    mantissa, _, exponent = printed.replace(",", "").lower().partition("e")
    decimals = len(mantissa.partition(".")[2])
    return 10.0 ** (int(exponent or 0) - decimals)


def compare_line(committed, fresh, rel):
    """None if the lines agree (same words; each number within rel plus one unit of its last printed digit,
    with a hair of float slack), else a description of the difference."""
    if NUMBER.split(committed) != NUMBER.split(fresh):
        return f"text differs:\n    committed: {committed}\n    fresh:     {fresh}"
    for a, b in zip(NUMBER.findall(committed), NUMBER.findall(fresh)):
        x, y = float(a.replace(",", "")), float(b.replace(",", ""))
        if abs(x - y) > rel * max(abs(x), abs(y)) + 1.000001 * max(last_digit(a), last_digit(b)):
            return f"{a} became {b}:\n    committed: {committed}\n    fresh:     {fresh}"
    return None


def execute_fresh(nb, preamble=None):
    """Run every code cell of nb in place, in the kernel 'python3' with the repository root as working folder
    (after `preamble`, a code string, if given); returns the kernel's CPU seconds. The kernel's check, the
    preamble and the CPU clock run as extra cells, removed afterwards: nbclient stores each executed cell back
    at its index in nb."""
    probe = nbformat.v4.new_code_cell("import sys; print(sys.prefix); print(sys.executable)")
    extra = [probe] + ([nbformat.v4.new_code_cell(preamble)] if preamble else [])
    clock = nbformat.v4.new_code_cell("import resource as _r; _u = _r.getrusage(_r.RUSAGE_SELF); "
                                      "print(_u.ru_utime + _u.ru_stime)")
    nb.cells[:0] = extra
    nb.cells.append(clock)
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=600,
                                     resources={"metadata": {"path": str(ROOT)}})
    try:
        with client.setup_kernel():
            client.execute_cell(nb.cells[0], 0)
            prefix, executable = "".join(o["text"] for o in nb.cells[0].outputs
                                         if o["output_type"] == "stream").splitlines()
            assert prefix == sys.prefix, (
                f"the Jupyter kernel 'python3' runs {executable}, not this environment's Python "
                f"({sys.executable}); register it with "
                f"`{sys.executable} -m ipykernel install --user --name python3`")
            for index, cell in enumerate(nb.cells[1:], start=1):
                if cell.cell_type == "code":
                    client.execute_cell(cell, index)  # raises CellExecutionError, with the cell and traceback
        return float(nb.cells[-1].outputs[0]["text"])
    finally:
        del nb.cells[:len(extra)]
        nb.cells.remove(clock)


def cleared(nb):
    fresh = copy.deepcopy(nb)
    for cell in fresh.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    return fresh


def tolerance(cell):
    """The relative tolerance of a cell's numbers: the largest of its tags', 0 for an untagged cell."""
    return max((TOLERANCES[tag] for tag in tags(cell) if tag in TOLERANCES), default=0.0)


def differences(committed, fresh):
    """Every disagreement between two executions of the notebook, one line each."""
    problems = []
    for index, (old, new) in enumerate(zip(committed.cells, fresh.cells)):
        if old.cell_type != "code":
            continue
        where = f"cell {index} ({old.source.splitlines()[0][:60] if old.source else ''!r})"
        if kinds(old.outputs) != kinds(new.outputs):
            problems.append(f"{where}: outputs {kinds(old.outputs)} became {kinds(new.outputs)}")
            continue
        sampled = "sampled" in tags(old)
        old_texts, new_texts = texts(old.outputs, sampled), texts(new.outputs, sampled)
        for key in old_texts:
            if len(old_texts[key]) != len(new_texts[key]):
                problems.append(f"{where}: {len(old_texts[key])} lines of {key} became {len(new_texts[key])}")
                continue
            for a, b in zip(old_texts[key], new_texts[key]):
                difference = compare_line(a, b, tolerance(old))
                if difference:
                    problems.append(f"{where}: {difference}")
                    break  # the first differing line of an output is enough
    return problems


def test_notebook_runs_and_its_committed_outputs_are_what_a_fresh_run_gives(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the kernel inherits it: the notebook's runs land here
    committed = nbformat.read(NOTEBOOK, as_version=4)
    fresh = cleared(committed)
    start = time.time()
    cpu = execute_fresh(fresh)
    assert cpu < NOTEBOOK_BUDGET_S, (
        f"the notebook took {cpu:.0f} s of CPU time ({time.time() - start:.0f} s on the clock), more than "
        f"its {NOTEBOOK_BUDGET_S} s budget on one core")
    problems = differences(committed, fresh)
    assert not problems, (
        "the committed outputs of walkthrough.ipynb are not what a fresh run gives; re-execute it with "
        "`jupytext --to ipynb walkthrough.py && jupyter execute --inplace walkthrough.ipynb` and commit it:\n"
        + "\n".join(problems))


# ---- the measurement behind TOLERANCES (not a test: `python tests/test_notebook.py --spread`) ----

ULP_PREAMBLE = """
import os
os.environ["TQDM_DISABLE"] = "1"  # as the notebook's first cell sets it, before this import brings in tqdm
import torch, torch.nn.functional as F
_linear, _noise = F.linear, torch.Generator().manual_seed(1234)
def _perturbed_linear(x, weight, bias=None):  # every input of every nn.Linear moved by -1, 0 or +1 ulp
    if x.dtype == torch.float32:
        x = x * (1 + torch.randint(-1, 2, x.shape, generator=_noise).float() * torch.finfo(torch.float32).eps)
    return _linear(x, weight, bias)
F.linear = _perturbed_linear
"""
THREADS_PREAMBLE = """
import os
os.environ["TQDM_DISABLE"] = "1"  # as the notebook's first cell sets it, before this import brings in tqdm
import torch
torch.set_num_threads(2)
torch.set_num_threads = lambda n: None  # the notebook and dpo.main ask for one thread: keep two
"""
VARIANTS = {
    "ATEN_CPU_CAPABILITY=avx2": ({"ATEN_CPU_CAPABILITY": "avx2"}, None),
    "MKL_ENABLE_INSTRUCTIONS=AVX2": ({"MKL_ENABLE_INSTRUCTIONS": "AVX2"}, None),
    "nn.Linear inputs ±1 ulp": ({}, ULP_PREAMBLE),
    "two threads": ({}, THREADS_PREAMBLE),
}


def spread(baseline, other):
    """`other` against `baseline`, two executions of the notebook: {cell index: (largest relative difference
    of its tagged numbers, the line)}, the untagged numbers that moved beyond their last digit, and the lines
    whose words differ."""
    largest, moved, reworded = {}, [], []
    for index, (old, new) in enumerate(zip(baseline.cells, other.cells)):
        if old.cell_type != "code":
            continue
        trained = tolerance(old) > 0
        sampled = "sampled" in tags(old)
        old_texts, new_texts = texts(old.outputs, sampled), texts(new.outputs, sampled)
        for key in old_texts:
            for a, b in zip(old_texts[key], new_texts.get(key, [])):
                if NUMBER.split(a) != NUMBER.split(b):
                    reworded.append(f"cell {index}: {a!r} -> {b!r}")
                    continue
                for p, q in zip(NUMBER.findall(a), NUMBER.findall(b)):
                    x, y = float(p.replace(",", "")), float(q.replace(",", ""))
                    beyond = abs(x - y) > 1.000001 * max(last_digit(p), last_digit(q))
                    relative = abs(x - y) / max(abs(x), abs(y)) if beyond else 0.0
                    if trained and relative > largest.get(index, (0.0,))[0]:
                        largest[index] = (relative, f"{p} -> {q} in {a.strip()!r}")
                    elif not trained and beyond:
                        moved.append(f"cell {index}: {p} -> {q} in {a!r}")
    return largest, moved, reworded


def measure_spread(only=(), out=Path(os.environ.get("TMPDIR", "/tmp"))):
    """Execute the notebook plainly and under each of VARIANTS (those whose name contains one of `only`, if
    given), print how far the outputs move, and keep every executed notebook in `out`."""
    source = cleared(nbformat.read(NOTEBOOK, as_version=4))
    baseline = copy.deepcopy(source)
    execute_fresh(baseline)
    nbformat.write(baseline, out / "walkthrough-baseline.ipynb")
    for name, (env, preamble) in VARIANTS.items():
        if only and not any(word in name for word in only):
            continue
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)  # the kernel inherits the environment
        try:
            other = copy.deepcopy(source)
            execute_fresh(other, preamble)
        finally:
            for k, v in saved.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        nbformat.write(other, out / f"walkthrough-{re.sub(r'[^A-Za-z0-9]+', '-', name)}.ipynb")
        largest, moved, reworded = spread(baseline, other)
        overall = max((v[0] for v in largest.values()), default=0.0)
        print(f"{name}: tagged numbers differ by at most {overall:.2e} (relative); untagged numbers beyond "
              f"their last digit: {len(moved)}; lines with other words: {len(reworded)}", flush=True)
        for index, (value, line) in sorted(largest.items()):
            print(f"    cell {index}: {value:.2e}  {line[:150]}", flush=True)
        for line in moved[:5] + reworded[:5]:
            print("   ", line[:200], flush=True)


if __name__ == "__main__" and sys.argv[1:2] == ["--spread"]:
    measure_spread(sys.argv[2:])  # e.g. `--spread ulp threads` for those two variants only
