"""--report_to (trackers.py): the tracker receives exactly the records of metrics.jsonl at their steps, under
transformers' names, also across a resume; it is closed however the run ends; a missing package is a one-line option
error before anything loads. Tiny runs on the CPU, offline (W&B in offline mode, Trackio as a stand-in module)."""
import importlib.machinery
import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest

import dpo
from harness import options
from harness.errors import RunError
from harness import checks
import losses
from harness import trackers
from tiny import interrupt_at_loss_call, read_records as records, run_argv as argv


def as_sent(out):
    """metrics.jsonl as a tracker should have it: {name: {step: value}} under transformers' names."""
    sent = {}
    for r in records(out):
        for name, value in trackers.tracker_names({k: v for k, v in r.items() if k != "step"}).items():
            sent.setdefault(name, {})[r["step"]] = value
    return sent


def tensorboard_scalars(out):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(Path(out) / "tensorboard"), size_guidance={"scalars": 0})  # 0: keep every event
    events.Reload()
    scalars = {}
    for tag in events.Tags()["scalars"]:
        points = events.Scalars(tag)
        assert len({p.step for p in points}) == len(points), f"{tag}: a step logged twice"
        scalars[tag] = {p.step: p.value for p in points}
    return scalars


def assert_same(got, want):
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].keys() == want[name].keys(), name
        for step, value in want[name].items():
            assert got[name][step] == pytest.approx(value, rel=1e-6, abs=1e-7), (name, step)  # events hold float32


def test_tensorboard_events_equal_metrics_jsonl_for_every_key_and_step_also_after_a_resume(tiny, tmp_path):
    pytest.importorskip("tensorboard")  # a development dependency (requirements-dev.txt), not a runtime one
    args = argv(tiny, tmp_path, "--max_steps", "4", "--eval_steps", "2", "--save_steps", "2", "--use_peft", "False",
                "--report_to", "tensorboard")
    dpo.main(options.parse_args(args))
    first = tensorboard_scalars(tmp_path)
    assert_same(first, as_sent(tmp_path))
    assert {"train/loss", "train/rewards/margins", "train/learning_rate", "eval/loss", "eval/rewards/accuracies"} <= first.keys()
    # resuming from step 2 rewrites metrics.jsonl after step 2; the events of steps 3-4 the first run wrote are hidden
    # (tokens_per_second differs between the two runs, so the comparison tells which run's values are read)
    dpo.main(options.parse_args(args + ["--resume_from_checkpoint", str(tmp_path / "checkpoint-2")]))
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 2
    after = tensorboard_scalars(tmp_path)
    assert_same(after, as_sent(tmp_path))
    assert after["train/tokens_per_second"][1] == first["train/tokens_per_second"][1]
    assert after["train/tokens_per_second"][4] != first["train/tokens_per_second"][4]


def test_a_missing_tracker_package_is_a_one_line_option_error_before_anything_loads(tiny, tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    monkeypatch.setattr(dpo, "main", lambda cfg: pytest.fail("main() ran"))
    for value, message in (("tensorboard", "--report_to tensorboard needs the tensorboard package: pip install tensorboard"),
                           ("mlflow", "--report_to must be none, tensorboard, wandb or trackio, not 'mlflow'")):
        with pytest.raises(SystemExit) as exit_:
            options.cli(argv(tiny, tmp_path, "--report_to", value), dpo.main)
        assert exit_.value.code == 2
        assert capsys.readouterr().err == f"dpo.py: error: {message}\n"


def test_wandb_offline_is_sent_the_records_of_metrics_jsonl(tiny, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    for k, v in dict(WANDB_MODE="offline", WANDB_DIR=str(tmp_path / "wandb-dir"), WANDB_SILENT="true",
                     WANDB_CONSOLE="off", WANDB_PROJECT="dpo-test").items():
        monkeypatch.setenv(k, v)
    (tmp_path / "wandb-dir").mkdir()
    sent, real_log = [], wandb.Run.log
    monkeypatch.setattr(wandb.Run, "log", lambda run, data, *a, **kw: (sent.append(data), real_log(run, data, *a, **kw))[1])
    dpo.main(options.parse_args(argv(tiny, tmp_path / "out", "--max_steps", "3", "--report_to", "wandb")))
    want = [{**trackers.tracker_names({k: v for k, v in r.items() if k != "step"}), "train/global_step": r["step"]}
            for r in records(tmp_path / "out")]
    assert sent == want and len(want) == 4  # 3 training records and the final evaluation
    assert wandb.run is None  # finished
    run_id = json.loads((tmp_path / "out" / "tracker.json").read_text())["id"]
    assert list((tmp_path / "wandb-dir" / "wandb").glob(f"offline-run-*-{run_id}"))


def fake_trackio(monkeypatch):
    """A stand-in for the trackio package (not installed here: it brings gradio), recording every call."""
    calls = []
    module = types.ModuleType("trackio")
    module.__spec__ = importlib.machinery.ModuleSpec("trackio", None)  # what runs.check_options' find_spec sees
    module.init = lambda **kw: calls.append(("init", kw))
    module.log = lambda data, step=None: calls.append(("log", data, step))
    module.finish = lambda: calls.append(("finish",))
    monkeypatch.setitem(sys.modules, "trackio", module)
    return calls


def test_trackio_is_closed_on_ctrl_c_and_continued_by_the_resumed_run(tiny, tmp_path, monkeypatch):
    calls = fake_trackio(monkeypatch)
    args = argv(tiny, tmp_path, "--max_steps", "4", "--use_peft", "False", "--report_to", "trackio")
    interrupt_at_loss_call(monkeypatch, 2)
    with pytest.raises(SystemExit, match="interrupted"):
        dpo.main(options.parse_args(args))
    assert calls[-1] == ("finish",)
    dpo.main(options.parse_args(args + ["--resume_from_checkpoint", "latest"]))
    inits = [c[1] for c in calls if c[0] == "init"]
    assert len(inits) == 2 and inits[0]["name"] == inits[1]["name"] and inits[1]["resume"] == "allow"
    assert inits[0]["config"]["beta"] == 0.1
    logged = [(c[2], c[1]) for c in calls if c[0] == "log"]
    want = [(r["step"], {**trackers.tracker_names({k: v for k, v in r.items() if k != "step"}), "train/global_step": r["step"]})
            for r in records(tmp_path)]
    assert logged == want
    assert [c[0] for c in calls].count("finish") == 2 and calls[-1] == ("finish",)


def test_the_tracker_is_closed_when_the_run_fails(tiny, tmp_path, monkeypatch):
    calls = fake_trackio(monkeypatch)
    real = losses.dpo_loss
    monkeypatch.setattr(losses, "dpo_loss", lambda *a, **kw: (real(*a, **kw)[0] * float("nan"),) + real(*a, **kw)[1:])
    with pytest.raises(RunError, match="non-finite loss"):
        dpo.main(options.parse_args(argv(tiny, tmp_path, "--max_steps", "2", "--report_to", "trackio")))
    assert [c[0] for c in calls] == ["init", "finish"]


def test_overwrite_output_dir_removes_what_a_tracker_wrote(tmp_path):
    for name in ("tensorboard", "wandb"):
        (tmp_path / name).mkdir()
    (tmp_path / "tracker.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("mine")
    checks.clear_output_dir(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
