"""Nothing lost: `python dpo.py ...` as a subprocess, broken the ways users break it. Each case asserts the exit
code, one `dpo.py: error:` line (no traceback) and what must survive: a final model or a resumable checkpoint,
metrics.jsonl as strict JSON with no record twice, the inputs of the run.

- signals: SIGINT, SIGTERM and SIGHUP at each phase of a run (training, an evaluation, a checkpoint save, the
  interrupt save, the final evaluation, the final save, and before the loop), made deterministic by a test-only
  hook (tests/fault_hooks/sitecustomize.py) that pauses the run at the phase until the signal is noted; one
  signal per phase is then resumed to the end.
- one run per folder (a lock; a stale lock taken over), --overwrite_output_dir and the inputs, non-finite weights
  and evaluations, a resume on edited data, a damaged reference cache, bad paths and option values.

The subprocesses run together (a thread pool): most of each one's time is importing torch."""
import fcntl
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dpo
from harness import checkpoints, checks, options, run
from harness.errors import RunError
from tiny import make_model_dir, make_preference_dir, run_argv

ROOT = Path(__file__).resolve().parents[1]
HOOKS = ROOT / "tests" / "fault_hooks"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "TOKENIZERS_PARALLELISM": "false"}
POOL = 4


def cli(argv, env=None, **popen):
    return subprocess.Popen([sys.executable, str(ROOT / "dpo.py"), *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env or ENV, **popen)


def finished(proc, timeout=600):
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def strict_records(out: Path, text=None) -> list[dict]:
    """metrics.jsonl (or its text), refusing anything strict JSON refuses (a bare NaN or Infinity)."""
    def refuse(name):
        raise AssertionError(f"{name} in {out / 'metrics.jsonl'}")
    path = out / "metrics.jsonl"
    text = text if text is not None else path.read_text() if path.exists() else ""
    return [json.loads(line, parse_constant=refuse) for line in text.splitlines()]


def assert_no_duplicates(records):
    keys = [(r["step"], "eval_loss" in r) for r in records]
    assert len(keys) == len(set(keys)), keys


def assert_one_error_line(run, *words):
    lines = [l for l in run.stderr.splitlines() if l.startswith("dpo.py: error:")]
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    assert len(lines) == 1 and not any(l.startswith("usage:") for l in run.stderr.splitlines()), run.stderr[-3000:]
    for word in words:
        assert word in lines[0], (word, lines[0])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = tmp_path_factory.mktemp("faults")
    return {"model": make_model_dir(base / "model"), "dataset": make_preference_dir(base / "data", 64, 16),
            "base": base}


# ---- signals at every phase --------------------------------------------------------------------------------

PHASES = ["train", "eval", "checkpoint", "interrupt", "final_eval", "final_save"]
SIGNALS = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP]
# Each signal at two phases and every phase with one signal (the three share one handler); DPO_ALL_SIGNALS=1 runs
# the whole 3 x 6 matrix (25 subprocesses, about 3x the time)
SIGNAL_RUNS = ([(phase, sig) for phase in PHASES for sig in SIGNALS] if os.environ.get("DPO_ALL_SIGNALS")
               else [(phase, SIGNALS[i % 3]) for i, phase in enumerate(PHASES)]) + [("before", signal.SIGHUP),
                                                                                    ("before", signal.SIGINT)]
RESUMED = {phase: SIGNALS[i % 3] for i, phase in enumerate(PHASES[:-1])}  # one signal per phase is resumed
CHECKPOINT_AT = {"train": 2, "eval": 2, "checkpoint": 2, "interrupt": 1, "final_eval": 4}  # what must be left


def signal_argv(tiny, out):
    return run_argv(tiny, out, "--max_steps", "4", "--save_steps", "2", "--eval_steps", "2")


def signalled_run(tiny, phase, sig):
    out = tiny["base"] / "signals" / f"{phase}-{sig.name}"
    ready = out.with_name(out.name + ".ready")
    env = {**ENV, "PYTHONPATH": f"{HOOKS}{os.pathsep}{ROOT}", "DPO_PAUSE_AT": phase, "DPO_PAUSE_FILE": str(ready),
           "DPO_FIRST_SIGNAL": sig.name}
    proc = cli(signal_argv(tiny, out), env=env)
    deadline = time.time() + 300
    while not ready.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(sig)
    first = finished(proc)
    # what the signalled run left, before a resume changes it: the folder's entries and metrics.jsonl's text
    left = {"entries": sorted(p.name for p in out.iterdir()) if out.is_dir() else [],
            "metrics": (out / "metrics.jsonl").read_text() if (out / "metrics.jsonl").exists() else "",
            "last_intact": checkpoints.last_intact(out) if out.is_dir() else None}
    resumed = None
    if RESUMED.get(phase) == sig:
        resumed = finished(cli(signal_argv(tiny, out) + ["--resume_from_checkpoint", "latest"]))
    return out, ready.exists(), first, left, resumed


@pytest.fixture(scope="module")
def signalled(tiny):
    with ThreadPoolExecutor(POOL) as pool:
        done = pool.map(lambda run: signalled_run(tiny, *run), SIGNAL_RUNS)
        return dict(zip(SIGNAL_RUNS, done))


@pytest.mark.parametrize("phase, sig", SIGNAL_RUNS, ids=[f"{p}-{s.name}" for p, s in SIGNAL_RUNS])
def test_a_signal_at_any_phase_keeps_a_model_or_a_resumable_checkpoint(signalled, phase, sig):
    out, paused, run, left, resumed = signalled[(phase, sig)]
    assert paused, run.stderr[-3000:]  # the signal really arrived in that phase
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    assert not [e for e in left["entries"] if e.startswith(".tmp-")], left["entries"]  # nothing half written
    records = strict_records(out, left["metrics"])
    assert_no_duplicates(records)
    if phase == "before":  # nothing trained yet: one line, nothing written but the options
        assert run.returncode == 128 + sig
        assert_one_error_line(run, f"interrupted ({sig.name})", "nothing was trained yet")
        assert not records and "model" not in left["entries"]
    elif phase == "final_save":  # the save finishes: the model is whole, the run ends normally
        assert run.returncode == 0, run.stderr[-3000:]
        assert "model" in left["entries"] and f"{sig.name} during the final save" in run.stdout
        assert (out / "model" / "README.md").is_file()
        assert [r["step"] for r in records if "eval_loss" in r] == [2, 4]
    else:  # a checkpoint of the step reached, intact, named in the message
        checkpoint = out / f"checkpoint-{CHECKPOINT_AT[phase]}"
        assert run.returncode == 1 and f"interrupted ({sig.name}): saved {checkpoint}" in run.stderr, run.stderr[-3000:]
        assert checkpoints.manifest_problem(checkpoint) is None and "model" not in left["entries"]
        assert left["last_intact"] == checkpoint
    if resumed is not None:  # continued to the end, each record once
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        records = strict_records(out)
        assert_no_duplicates(records)
        assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
        assert [r["step"] for r in records if "eval_loss" in r] == [2, 4]
        assert (out / "model" / "README.md").is_file()


# ---- one run per folder, the inputs, non-finite numbers, edited data, bad paths and options ------------------


def jsonl(path: Path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


PAIR = {"prompt": "the movie was", "chosen": " good", "rejected": " bad"}


def make_cases(tiny, holder) -> dict:
    """name -> (argv, environment, exit code, words of the error line; for exit 0, words of stdout)."""
    base = tiny["base"] / "cases"
    base.mkdir()
    common = run_argv(tiny, base / "unused", "--max_steps", "1")
    out = lambda name: ["--output_dir", str(base / name)]  # noqa: E731
    # a folder held by another run: this process holds its lock, as that run would
    (base / "locked").mkdir()
    lock = open(base / "locked" / ".lock", "a+")
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    lock.write("pid 4242 on host7: python dpo.py --output_dir locked\n")
    lock.flush()
    holder.append(lock)
    # a lock left by a run that is gone, in a folder where a failed run left only its config.json
    (base / "stale").mkdir()
    (base / "stale" / ".lock").write_text("pid 999999 on host7: python dpo.py\n")
    (base / "stale" / "config.json").write_text("{}")
    # round two of iterative DPO: the model of round one inside the folder --overwrite_output_dir would clear
    shutil.copytree(tiny["model"], base / "round1" / "model")
    (base / "round1" / "metrics.jsonl").write_text('{"step": 1, "loss": 0.69}\n')
    (base / "a_file").write_text("not a folder")
    shutil.copytree(tiny["model"], base / "truncated_model")
    weights = base / "truncated_model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    strings = jsonl(base / "strings.jsonl", [{**PAIR, "ref_chosen_logps": "-1.5", "ref_rejected_logps": -2.0}] * 8)
    flat = jsonl(base / "flat.jsonl", [PAIR] * 16)
    packed = gzip.compress(Path(flat).read_bytes() * 50)
    (base / "cut.jsonl.gz").write_bytes(packed[:len(packed) // 2])
    (base / "columns.json").write_text(json.dumps({k: [v] * 8 for k, v in PAIR.items()}))
    diverge = ["--learning_rate", "1", "--weight_decay", "1e39", "--save_steps", "0"]
    offline = {k: v for k, v in ENV.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    return {
        "locked_output_dir": (common + out("locked"), ENV, 1, ["is in use by another run", "pid 4242 on host7"]),
        "stale_lock_and_failed_run": (common + out("stale"), ENV, 0, ["saved the model"]),
        "overwrite_would_delete_the_model": (
            common + ["--model", str(base / "round1" / "model"), "--overwrite_output_dir"] + out("round1"), ENV, 1,
            ["--overwrite_output_dir would delete", "round1/model", "--model"]),
        "output_dir_is_a_file": (common + out("a_file"), ENV, 1, ["is a file, not a folder"]),
        "output_dir_not_writable": (common + ["--output_dir", "/proc/1/dpo-run"], ENV, 1, ["cannot write in --output_dir"]),
        "model_is_a_file": (common + ["--model", str(base / "a_file")] + out("m1"), ENV, 1, ["is a file, not a model"]),
        "truncated_weights": (common + ["--model", str(base / "truncated_model")] + out("m2"), ENV, 1,
                              ["model.safetensors is truncated or damaged"]),
        "string_ref_logps": (common + ["--dataset", strings, "--precompute_ref_log_probs"] + out("s1"), ENV, 1,
                             ["non-numeric", "ref_chosen_logps"]),
        "hub_unreachable": (common + ["--model", "no-such-org/no-such-model"] + out("h1"), offline, 1,
                            ["the hub cannot be reached", "no-such-org/no-such-model"]),
        "truncated_gzip": (common + ["--dataset", str(base / "cut.jsonl.gz")] + out("g1"), ENV, 1,
                           ["cut.jsonl.gz is not a whole gzip file"]),
        "json_of_columns": (common + ["--dataset", str(base / "columns.json")] + out("g2"), ENV, 1,
                            ["holds one JSON object of columns", "not rows"]),
        "non_finite_final_weights": (common + ["--dataset", flat, "--eval_fraction", "0"] + diverge + out("n1"), ENV, 1,
                                     ["final weights are non-finite", "no model was saved"]),
        "non_finite_evaluation": (common + diverge + out("n2"), ENV, 1, ["non-finite evaluation", "eval_loss"]),
        # option values: exit 2 before anything loads
        "learning_rate_1e39": (common + ["--learning_rate", "1e39"], ENV, 2, ["--learning_rate must be in [0, 1]"]),
        "huge_seed": (common + ["--seed", str(2**70)], ENV, 2, ["--seed must be in [0, 2**63)"]),
        "negative_loss_weights": (common + ["--loss_weights", "-1"], ENV, 2, ["--loss_weights must be >= 0"]),
        "negative_rpo_alpha": (common + ["--rpo_alpha", "-0.5"], ENV, 2, ["--rpo_alpha must be >= 0"]),
        "repeated_loss_type": (common + ["--loss_type", "sigmoid", "--loss_type", "ipo"], ENV, 2,
                               ["--loss_type given more than once"]),
        "a_loss_twice": (common + ["--loss_type", "sigmoid", "sigmoid"], ENV, 2, ["names a loss twice"]),
        "nan_ld_alpha": (common + ["--ld_alpha", "nan"], ENV, 2, ["--ld_alpha must be a finite number"]),
        "nan_loss_weights": (common + ["--loss_weights", "nan"], ENV, 2, ["--loss_weights must be a finite number"]),
        "discopop_tau_0": (common + ["--discopop_tau", "0"], ENV, 2, ["--discopop_tau must be > 0"]),
        "pad_past_max_length": (common + ["--pad_to_multiple_of", "1000"], ENV, 2,
                                ["--pad_to_multiple_of 1000 is larger than --max_length 32"]),
        "cpu_threads_huge": (common + ["--cpu_threads", "100000"], ENV, 2, ["--cpu_threads must be in [1, "]),
        "type_error_one_line": (common + ["--max_steps", "abc"], ENV, 2, ["--max_steps", "invalid int value"]),
    }


@pytest.fixture(scope="module")
def cases(tiny):
    holder = []  # the lock of "locked_output_dir", held while the subprocesses run
    made = make_cases(tiny, holder)
    with ThreadPoolExecutor(POOL) as pool:
        done = dict(zip(made, pool.map(lambda c: finished(cli(c[0], env=c[1])), made.values())))
    for f in holder:
        f.close()
    return {name: (done[name], made[name]) for name in made}


CASES = ["locked_output_dir", "stale_lock_and_failed_run", "overwrite_would_delete_the_model", "output_dir_is_a_file",
         "output_dir_not_writable", "model_is_a_file", "truncated_weights", "string_ref_logps", "hub_unreachable",
         "truncated_gzip", "json_of_columns",
         "non_finite_final_weights", "non_finite_evaluation", "learning_rate_1e39", "huge_seed",
         "negative_loss_weights", "negative_rpo_alpha", "repeated_loss_type", "a_loss_twice", "nan_ld_alpha",
         "nan_loss_weights", "discopop_tau_0", "pad_past_max_length", "cpu_threads_huge", "type_error_one_line"]


@pytest.mark.parametrize("name", CASES)
def test_each_fault_is_one_line_and_loses_nothing(tiny, cases, name):
    run, (argv, _, code, words) = cases[name]
    assert run.returncode == code, (run.returncode, run.stderr[-3000:])
    if code == 0:
        assert "Traceback" not in run.stderr and all(w in run.stdout for w in words), run.stderr[-3000:]
    else:
        assert_one_error_line(run, *words)
    base = tiny["base"] / "cases"
    if name == "locked_output_dir":  # the other run's folder is untouched
        assert sorted(p.name for p in (base / "locked").iterdir()) == [".lock"]
    if name == "stale_lock_and_failed_run":
        assert (base / "stale" / "model").is_dir() and "999999" not in (base / "stale" / ".lock").read_text()
    if name == "overwrite_would_delete_the_model":  # the input is still there, and the old run's files too
        assert (base / "round1" / "model" / "config.json").is_file() and (base / "round1" / "metrics.jsonl").is_file()
    if name.startswith("non_finite"):
        out = Path(argv[len(argv) - 1 - argv[::-1].index("--output_dir") + 1])  # the last --output_dir given
        assert not (out / "model").exists()
        records = strict_records(out)  # strict JSON: a non-finite value is null
        if name == "non_finite_evaluation":
            assert records[-1]["eval_loss"] is None


# ---- the rest, in-process where a subprocess adds nothing but time --------------------------------------------


def test_default_output_dirs_never_collide(tmp_path, monkeypatch):
    """Three runs started in the same second without --output_dir get three folders (runs/dpo-<time>, -2, -3)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(options.time, "strftime", lambda fmt: "dpo-20260101-000000")
    claimed = []
    for _ in range(3):
        cfg = options.parse_args([])
        checks.claim_default_output_dir(cfg)
        claimed.append(cfg.output_dir)
    assert claimed == ["runs/dpo-20260101-000000", "runs/dpo-20260101-000000-2", "runs/dpo-20260101-000000-3"]
    assert all(Path(p).is_dir() for p in claimed)


def test_output_dir_with_a_tilde_is_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert options.parse_args(["--output_dir=~/x"]).output_dir == str(tmp_path / "x")


def test_resume_refuses_edited_data_naming_the_pair(tiny, tmp_path):
    """The same path, one row replaced: resuming is refused, naming the first pair that differs."""
    data = tmp_path / "data"
    shutil.copytree(tiny["dataset"], data)
    args = run_argv({**tiny, "dataset": str(data)}, tmp_path / "out", "--max_steps", "2", "--save_steps", "1")
    dpo.main(options.parse_args(args))
    rows = (data / "train.jsonl").read_text().splitlines()
    rows[5] = json.dumps({"prompt": "the plot is", "chosen": " great", "rejected": " awful awful"})
    (data / "train.jsonl").write_text("\n".join(rows) + "\n")
    with pytest.raises(RunError, match=r"on other data than it was trained on: pair 5 of the prepared train set "
                                       r"differs \(--dataset .*data was edited or replaced\)"):
        dpo.main(options.parse_args(args + ["--resume_from_checkpoint", "latest"]))


def test_a_damaged_reference_cache_is_computed_again(tiny, tmp_path, capsys):
    args = run_argv(tiny, tmp_path / "out", "--max_steps", "1", "--precompute_ref_log_probs", "--use_peft", "False")
    dpo.main(options.parse_args(args))
    (cache,) = (tmp_path / "out").glob("ref_logps-*.safetensors")
    whole, numbers = cache.read_bytes(), {k: v.clone() for k, v in load_file(cache).items()}  # (not the mmap)
    cache.write_bytes(whole[:len(whole) // 2])  # cut short, as by a full disk or a kill
    capsys.readouterr()
    dpo.main(options.parse_args(args + ["--overwrite_output_dir"]))
    assert "is damaged" in capsys.readouterr().out
    assert run.cache_problem(cache, len(numbers["chosen"])) is None  # computed again and written whole
    assert all(torch.equal(v, numbers[k]) for k, v in load_file(cache).items())  # the same numbers


def test_a_failed_write_is_one_line_with_what_was_kept(tmp_path):
    """metrics.jsonl or config.json on a disk that cannot be written: a CheckpointError naming the last checkpoint."""
    from harness.errors import CheckpointError

    (tmp_path / "metrics.jsonl").mkdir()  # an append to a folder fails as a full or read-only disk would
    with pytest.raises(CheckpointError, match=r"could not write .*metrics.jsonl; no checkpoint was saved yet"):
        checkpoints.append_line(tmp_path / "metrics.jsonl", "{}", tmp_path)
    (tmp_path / "config.json").write_text("old")
    checkpoints.write_file(tmp_path / "config.json", "new", tmp_path)
    assert (tmp_path / "config.json").read_text() == "new" and not list(tmp_path.glob(".tmp-*"))
