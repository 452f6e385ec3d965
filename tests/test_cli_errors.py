"""What a user sees when something is wrong: `python dpo.py ...` in a subprocess, as typed, for bad options, bad
files, bad data, a used output folder and broken checkpoints. Each case asserts the exit code (2 for options, 1 for
data, files and faults), one `dpo.py: error:` line on stderr with the message's key words, and no traceback.

The subprocesses start together (a thread pool), since most of each one's time is importing torch."""
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import dpo
from harness import options
from harness.errors import OptionError, RunError
from harness import checks
from harness import models
from tiny import make_gpt2_dir, make_model_dir, make_preference_dir

ROOT = Path(__file__).resolve().parents[1]


def jsonl(rows):
    return "".join(json.dumps(r) + "\n" for r in rows)


PAIR = {"prompt": "the movie was", "chosen": " good", "rejected": " bad"}


def make_cases(base: Path) -> dict:
    """name -> (argv after the common ones, expected exit code, words the message must contain)."""
    model, dataset = make_model_dir(base / "model"), make_preference_dir(base / "data")
    (base / "not_a_model").mkdir()
    (base / "not_a_model" / "notes.txt").write_text("hello")
    (base / "empty.jsonl").write_text("")
    (base / "bad.jsonl").write_text(jsonl([PAIR] * 3) + '{"prompt": "x", "chosen": oops}\n')
    (base / "latin1.jsonl").write_bytes((jsonl([PAIR] * 2) + '{"prompt": "caf\u00e9", "chosen": " a", "rejected": " b"}\n').encode("latin-1"))
    (base / "null.jsonl").write_text(jsonl([PAIR] * 30 + [{**PAIR, "rejected": None}] + [PAIR] * 9))
    (base / "long.jsonl").write_text(jsonl([{**PAIR, "prompt": " ".join(["the movie was"] * 8)}] * 8))  # 24 + 1 + EOS tokens
    gpt2 = make_gpt2_dir(base / "gpt2")  # 16 learned positions
    (base / "used").mkdir()
    (base / "used" / "metrics.jsonl").write_text('{"step": 1, "loss": 0.69}\n')
    common = ["--model", model, "--dataset", dataset, "--max_length", "32", "--max_steps", "1", "--show_examples", "0"]
    out = lambda name: ["--output_dir", str(base / "out" / name)]  # noqa: E731
    trained = common[:-4] + ["--max_steps", "2", "--save_steps", "1", "--use_peft", "False", "--show_examples", "0"]
    if not (base / "trained").exists():  # a finished run with checkpoint-1 and checkpoint-2, and a copy to break
        dpo.main(options.parse_args(trained + ["--output_dir", str(base / "trained")]))
        shutil.copytree(base / "trained", base / "broken")
        optimizer = base / "broken" / "checkpoint-2" / "optimizer.pt"
        optimizer.write_bytes(optimizer.read_bytes()[:100])  # a partly written file
    return {
        # options: exit code 2, before anything loads
        "beta_0": (common + ["--beta", "0"], 2, ["beta must be > 0"]),
        "negative_lr": (common + ["--learning_rate", "-0.001"], 2, ["--learning_rate must be in [0, 1]"]),
        "max_length_0": (common + ["--max_length", "0"], 2, ["--max_length must be >= 2"]),
        "lora_r_0": (common + ["--lora_r", "0"], 2, ["--lora_r must be >= 1"]),
        "pad_multiple_0": (common + ["--pad_to_multiple_of", "0"], 2, ["--pad_to_multiple_of must be >= 1"]),
        "two_problems": (common + ["--beta", "-1", "--load_in_4bit", "--use_peft", "False"], 2,
                         ["beta must be > 0", "--load_in_4bit trains adapters"]),
        "unknown_option": (common + ["--betta", "0.1"], 2, ["unrecognized arguments: --betta"]),
        "bad_loss": (common + ["--loss_type", "sigmoidd"], 2, ["sigmoidd"]),
        "latest_without_dir": (common + ["--resume_from_checkpoint", "latest"], 2, ["latest looks in --output_dir"]),
        # files and data: exit code 1
        "missing_model": (common + ["--model", str(base / "nope")] + out("m1"), 1, ["nope does not exist", "holds"]),
        "not_a_model": (common + ["--model", str(base / "not_a_model")] + out("m2"), 1, ["holds no model", "config.json"]),
        "missing_ref_model": (common + ["--ref_model", str(base / "nope_ref")] + out("m3"), 1, ["--ref_model", "does not exist"]),
        "missing_dataset": (common + ["--dataset", str(base / "nope.jsonl")] + out("d1"), 1, ["does not exist"]),
        "empty_dataset": (common + ["--dataset", str(base / "empty.jsonl")] + out("d2"), 1, ["no rows", "empty.jsonl"]),
        "invalid_json": (common + ["--dataset", str(base / "bad.jsonl")] + out("d3"), 1, ["invalid JSON", "bad.jsonl", "line 4"]),
        "not_utf8": (common + ["--dataset", str(base / "latin1.jsonl")] + out("d4"), 1, ["not UTF-8", "line 3"]),
        "null_field_row_30": (common + ["--dataset", str(base / "null.jsonl")] + out("d5"), 1,
                              ["row 30", "null.jsonl", "field 'rejected'"]),
        "all_dropped": (common + ["--max_length", "3", "--truncation_mode", "keep_start"] + out("d6"), 1,
                        ["were dropped", "raise max_length"]),
        "positions_table": (common + ["--model", gpt2, "--dataset", str(base / "long.jsonl")] + out("p1"), 1,
                            ["learned position embeddings for 16 positions", "has 26 tokens", "--max_length 16"]),
        "used_output_dir": (common + ["--output_dir", str(base / "used")], 1,
                            ["is not empty", "--overwrite_output_dir", "holds no checkpoint to resume from"]),
        "missing_checkpoint": (common + ["--resume_from_checkpoint", str(base / "out" / "x" / "checkpoint-7")], 1,
                               ["checkpoint-7", "does not exist"]),
        "resume_longer": (trained + ["--output_dir", str(base / "trained"), "--max_steps", "5",
                                     "--resume_from_checkpoint", "latest"], 1, ["--max_steps 5", "trained with 2"]),
        "truncated_optimizer": (trained + ["--output_dir", str(base / "broken"), "--resume_from_checkpoint", "latest"], 1,
                                ["optimizer.pt does not match its manifest", "checkpoint-1"]),
        # step 1 runs at learning rate 0 (warmup) and is saved; step 2's weight decay makes the weights inf
        "diverged": (trained + ["--output_dir", str(base / "out" / "nan"), "--learning_rate", "1", "--weight_decay",
                                "1e39", "--warmup_steps", "2", "--max_steps", "30"], 1,
                     ["non-finite", "at step 2", "last intact checkpoint is", "checkpoint-1"]),
    }


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    base = tmp_path_factory.mktemp("cli")
    cases = make_cases(base)
    assert list(cases) == NAMES
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}

    def run(argv):
        return subprocess.run([sys.executable, str(ROOT / "dpo.py"), *argv], capture_output=True, text=True,
                              timeout=600, env=env, cwd=base)

    with ThreadPoolExecutor(4) as pool:
        done = dict(zip(cases, pool.map(run, (argv for argv, _, _ in cases.values()))))
    return {name: (done[name], code, words) for name, (_, code, words) in cases.items()}


NAMES = ["beta_0", "negative_lr", "max_length_0", "lora_r_0", "pad_multiple_0", "two_problems", "unknown_option",
         "bad_loss", "latest_without_dir", "missing_model", "not_a_model", "missing_ref_model", "missing_dataset",
         "empty_dataset", "invalid_json", "not_utf8", "null_field_row_30", "all_dropped", "positions_table", "used_output_dir",
         "missing_checkpoint", "resume_longer", "truncated_optimizer", "diverged"]


@pytest.mark.parametrize("name", NAMES)
def test_user_error_is_one_line_with_exit_code_and_no_traceback(results, name):
    run, code, words = results[name]
    assert run.returncode == code, (run.returncode, run.stderr[-3000:])
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    lines = [l for l in run.stderr.splitlines() if l.startswith("dpo.py: error:") or l.startswith("usage:")]
    message = [l for l in run.stderr.splitlines() if "error:" in l][-1]
    assert lines and message.startswith("dpo.py: error:"), run.stderr[-2000:]
    for word in words:
        assert word in message, (word, message)


def test_debug_shows_the_traceback(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "dpo.py"), "--model", str(tmp_path / "nope"), "--debug"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode != 0 and "Traceback" in run.stderr and "does not exist" in run.stderr


def test_options_are_checked_before_the_tokenizer_loads(monkeypatch):
    """An option error is raised by parse_args, before main() loads anything."""
    with pytest.raises(OptionError, match="beta must be > 0.*--lora_r must be >= 1"):
        options.parse_args(["--beta", "0", "--lora_r", "0"])


def test_positions_beyond_the_model(tmp_path, capsys):
    """A learned position table (GPT-2) refuses a longer sequence, padding included; a rotary model (Llama) runs it
    with one printed line; within the table nothing is said."""
    gpt2 = dpo.load_model(options.parse_args(["--use_peft", "False"]), make_gpt2_dir(tmp_path / "gpt2"), torch.device("cpu"), True)
    ex = lambda n: [{"prompt_ids": [5] * (n - 2), "chosen_ids": [6, 7], "rejected_ids": [8]}]  # noqa: E731  (n tokens)
    cfg = lambda *a: options.parse_args(["--max_length", "64", *a])  # noqa: E731
    checks.check_positions("--model", gpt2, ex(16), cfg())
    with pytest.raises(RunError, match="16 positions, but the longest sequence .* has 17 tokens; set --max_length 16"):
        checks.check_positions("--model", gpt2, ex(17), cfg())
    checks.check_positions("--model", gpt2, ex(30), cfg("--max_length", "16"))  # (row scope: collate cuts to 16)
    with pytest.raises(RunError, match=r"has 24 tokens \(9 padded .* 24\); set a --pad_to_multiple_of that divides 16"):
        checks.check_positions("--model", gpt2, ex(9), cfg("--pad_to_multiple_of", "24"))
    lora = dpo.load_model(options.parse_args([]), str(tmp_path / "gpt2"), torch.device("cpu"), True)  # PEFT-wrapped names
    with pytest.raises(RunError, match="16 positions"):
        checks.check_positions("--model", lora, ex(17), cfg())
    llama = dpo.load_model(options.parse_args(["--use_peft", "False"]), make_model_dir(tmp_path / "llama", max_position_embeddings=16),
                           torch.device("cpu"), True)
    capsys.readouterr()
    checks.check_positions("--model", llama, ex(20), cfg())
    assert "note: the longest sequence has 20 tokens, more than --model's max_position_embeddings (16)" in capsys.readouterr().out


def test_the_head_check_passes_an_attention_mask(tmp_path, monkeypatch):
    """check_head's 8 ids include the pad id of most tokenizers; without a mask transformers warns about padding."""
    model = dpo.load_model(options.parse_args(["--use_peft", "False"]), make_gpt2_dir(tmp_path / "gpt2"), torch.device("cpu"), True)
    masks = []
    monkeypatch.setattr(type(model.transformer), "warn_if_padding_and_no_attention_mask", lambda self, ids, mask: masks.append(mask))
    models.check_head(model)
    assert len(masks) == 2 and all(m is not None for m in masks)
