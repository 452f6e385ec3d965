"""`python dpo.py` with no arguments: the shipped tiny model learns the shipped preference, offline, on a CPU.

This is the newcomer's first command, so it is tested whole, in a subprocess, exactly as typed (from an empty
working directory, with the hub switched off). The thresholds are the ones README promises."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not (ROOT / "demo" / "assets" / "tiny-sentiment-lm").is_dir(), reason="demo/assets/ not built")
def test_default_run_learns_the_preference_and_beats_the_reference(tmp_path):
    start = time.time()
    run = subprocess.run([sys.executable, str(ROOT / "dpo.py")], cwd=tmp_path, capture_output=True, text=True,
                         timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    print(f"default run: {time.time() - start:.0f} s")  # reported, not asserted: timing is for benchmarks
    (out,) = (tmp_path / "runs").iterdir()  # the default output_dir: runs/dpo-<time> in the working directory
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["step"] <= 10 and records[0]["rewards/accuracies"] < 0.9  # it starts from not knowing
    final = [r for r in records if "eval_rewards/accuracies" in r][-1]
    assert final["eval_rewards/accuracies"] >= 0.9
    assert final["eval_rewards/margins"] > 0
    samples = json.loads((out / "sample_eval.json").read_text())
    assert samples["win_rate"] >= 0.8
    assert samples["reward_policy"] > samples["reward_reference"]
    assert 0 < samples["kl"] < 1e3
    assert "win rate" in run.stdout.lower() and (out / "curves.png").is_file() and (out / "model").is_dir()
