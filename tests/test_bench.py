"""bench/compare_trl.py still runs against the code it measures: the SmolLM2-135M shape is SmolLM2-135M's
architecture, and a tiny side-by-side run with the options of the 135M comparison (--cut_rows,
--prompt_tokens, two threads) agrees with TRL. Timings are printed by the script, never asserted."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import compare_trl  # noqa: E402


def test_smollm2_shape_is_smollm2_135m():
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**compare_trl.ARCHS["smollm2-135m"])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert type(model).__name__ == "LlamaForCausalLM"
    # HuggingFaceTB/SmolLM2-135M: 134,515,008 parameters, the embedding tied to the LM head
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.lm_head.weight is model.model.embed_tokens.weight
    rope_theta = config.rope_parameters["rope_theta"]
    assert (config.head_dim, rope_theta, config.rms_norm_eps) == (64, 100000.0, 1e-5)


@pytest.mark.trl
def test_compare_trl_runs_side_by_side(tmp_path):
    out = tmp_path / "results.json"
    argv = ["--arch", "tiny", "--batch_size", "2", "--max_length", "64", "--cut_rows",
            "--prompt_tokens", "20", "40", "--modes", "full", "--threads", "2", "--steps", "2",
            "--warmup", "1", "--repeats", "1", "--no_precompute", "--json", str(out),
            "--workdir", str(tmp_path / "work")]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "compare_trl.py"), *argv],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["agree_with_trl"], results["problems"]
    low, high = results["fixture"]["prompt_tokens"]
    assert 20 <= low <= high <= 40
    rows = results["results"]["full"]
    assert set(rows) == {"trl", "ours", "ours_concat"}
    # every row cut to max_length (pairs chosen with the tokenizer the trainers load): 2 pairs x 2 rows x 64
    assert rows["trl"]["tokens_per_step"] == rows["ours"]["tokens_per_step"] == [2 * 2 * 64] * 2
    assert "| tokens/s | x TRL | s/step | x TRL | step min-max s | tokens/CPU-s |" in proc.stdout
