"""The learning rate in the logs, step by step, against TRL 1.16's DPOTrainer on the same schedule.

transformers' Trainer (under TRL) reads the rate before `lr_scheduler.step()`: the record of step s holds
the rate step s used. With 3 warmup steps of 10 that is 0, 1/3, 2/3 of the peak, then the decay down to its
last step's value (linear: 1/7 of the peak at step 10, not 0). Both runs take 10 steps of a tiny random Llama
on the tiny preference set, logging every step."""
import json

import pytest

import dpo
from harness.options import parse_args
from tiny import make_model_dir, make_preference_dir

pytest.importorskip("trl")
pytestmark = pytest.mark.trl

STEPS, WARMUP, PEAK = 10, 3, 1e-4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = tmp_path_factory.mktemp("tiny")
    return {"model": make_model_dir(base / "model"),
            "dataset": make_preference_dir(base / "data", n_train=48, n_test=4)}


def trl_rates(tiny, out, schedule):
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(output_dir=str(out), bf16=False, report_to="none", save_strategy="no", max_steps=STEPS,
                     warmup_steps=WARMUP, lr_scheduler_type=schedule, learning_rate=PEAK, logging_steps=1,
                     per_device_train_batch_size=4, max_length=32, use_cpu=True)
    rows = load_dataset("json", data_files=f"{tiny['dataset']}/train.jsonl", split="train")
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny["model"]), args=args,
                         train_dataset=rows, processing_class=AutoTokenizer.from_pretrained(tiny["model"]))
    trainer.train()
    return [(r["step"], r["learning_rate"]) for r in trainer.state.log_history if "loss" in r]


def our_rates(tiny, out, schedule):
    dpo.main(parse_args([
        "--model", tiny["model"], "--dataset", tiny["dataset"], "--output_dir", str(out),
        "--max_steps", str(STEPS), "--warmup_steps", str(WARMUP), "--lr_scheduler_type", schedule,
        "--learning_rate", str(PEAK), "--logging_steps", "1", "--per_device_train_batch_size", "4",
        "--max_length", "32", "--show_examples", "0", "--bf16", "False"]))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["learning_rate"]) for r in records if "loss" in r]


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_learning_rate_is_logged_as_trl_logs_it(tiny, tmp_path, schedule):
    theirs, ours = trl_rates(tiny, tmp_path / "trl", schedule), our_rates(tiny, tmp_path / "ours", schedule)
    assert [s for s, _ in ours] == [s for s, _ in theirs] == list(range(1, STEPS + 1))
    # the same formula on the same floats: equal to the last bit, or within one rounding of the product
    assert [lr for _, lr in ours] == pytest.approx([lr for _, lr in theirs], rel=1e-15, abs=0)
    assert ours[0][1] == 0.0 and ours[WARMUP][1] == PEAK  # step 1 trains at 0; step 4 is the first at peak
    if schedule == "linear":
        assert ours[-1][1] == pytest.approx(PEAK / (STEPS - WARMUP), rel=1e-12)  # the last step's rate, not 0
