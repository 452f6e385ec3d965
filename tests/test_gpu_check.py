"""bench/gpu_check.sh leaves no process behind: a part that times out goes with all its children (a hung
dpo.py under gpu_check.py would otherwise keep the GPU), so does a child that a finished part left, and so
does the part running when the script itself is stopped. The parts here are a stand-in for the Python
interpreter (PYTHON=...), so nothing is trained: part (a) exits at once leaving a child, part (b) hangs
with a grandchild, all ignoring SIGTERM."""
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
FAKE = """#!/usr/bin/env bash
# called as: PYTHON bench/gpu_check.py PART RESULT --tiny --workdir DIR
trap '' TERM INT  # ignored signals are inherited: every process below ignores SIGTERM too
if [ "$2" = qlora ]; then
    ( exec -a "{mark}-left-behind" sleep 600 ) &
    exit 0
fi
( exec -a "{mark}-grandchild" sleep 600 ) &
touch "{started}"
exec -a "{mark}-hung-part" sleep 600
"""


def processes_named(mark):
    """The pids of live processes whose command line holds `mark` (zombies have an empty command line)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and mark.encode() in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
        except OSError:  # gone meanwhile
            pass
    return found


@pytest.fixture
def fake_python(tmp_path):
    if not Path("/proc").is_dir():
        pytest.skip("needs /proc to list processes")
    mark = f"gpucheck{os.getpid()}x{time.time_ns()}"
    fake = tmp_path / "python"
    fake.write_text(FAKE.format(mark=mark, started=tmp_path / "started"))
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake), "GPU_CHECK_LIMIT": "3", "GPU_CHECK_GRACE": "1"}
    yield env, mark, tmp_path / "started"
    for pid in processes_named(mark):  # never leave them running, even when the test fails
        os.kill(pid, signal.SIGKILL)


def test_a_part_that_times_out_leaves_no_process(fake_python, tmp_path):
    env, mark, _ = fake_python
    start = time.time()
    run = subprocess.run(["bash", str(SCRIPT), "--cpu-smoke", str(tmp_path / "result.json")], env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "(b) trl timed out after 3 s" in run.stdout and "(a) qlora" not in run.stdout, run.stdout
    assert "unbound variable" not in run.stderr, run.stderr  # set -u
    assert time.time() - start < 60
    assert processes_named(mark) == []


def test_stopping_the_script_stops_the_running_part(fake_python, tmp_path):
    env, mark, started = fake_python
    env["GPU_CHECK_LIMIT"] = "300"
    script = subprocess.Popen(["bash", str(SCRIPT), "--cpu-smoke", str(tmp_path / "result.json")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not started.exists() and time.time() < deadline:
        time.sleep(0.1)
    assert started.exists() and len(processes_named(mark)) == 2  # the hung part and its grandchild
    script.send_signal(signal.SIGTERM)  # what a job scheduler sends
    script.communicate(timeout=60)
    assert script.returncode == 143
    assert processes_named(mark) == []


def test_empty_arrays_are_expanded_for_bash_4_2():
    """bash before 4.4 calls "${A[@]}" of an empty array unbound under set -u: every array is expanded
    guarded."""
    text = SCRIPT.read_text()
    assert "set -u" in text or "set -uo" in text
    code = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    bare = [line for line in code if '"${' in line and '[@]}"' in line and '[@]+"${' not in line]
    assert bare == []
