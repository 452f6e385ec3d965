"""model_card.py: output_dir/model/README.md is a hub model card of the run (YAML front matter the hub reads, the
key options, the final evaluation as in metrics.jsonl, the command, how to load it)."""
import shlex
import sys

import pytest
import yaml

import dpo
from harness import options
from harness import model_card
from tiny import read_records as records, run_argv as argv


def front_matter(card):
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_the_saved_model_has_a_hub_model_card_with_the_eval_numbers_and_the_command(tiny, tmp_path, monkeypatch):
    args = argv(tiny, tmp_path, "--max_steps", "3", "--merge_adapter")
    monkeypatch.setattr(sys, "argv", ["dpo.py", *args])  # as `python dpo.py ...` has it
    dpo.main(options.parse_args(args))
    card = (tmp_path / "model" / "README.md").read_text()
    meta = front_matter(card)
    assert meta["base_model"] == tiny["model"] and meta["library_name"] == "peft"
    assert {"dpo", "lora"} <= set(meta["tags"]) and "datasets" not in meta  # a local dataset: no hub link
    final = [r for r in records(tmp_path) if "eval_loss" in r][-1]
    for k in ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins"):
        assert f"| {k} | {final[k]:.4g} |" in card
    assert shlex.join(["python", "dpo.py", *args]) in card
    assert "AutoPeftModelForCausalLM.from_pretrained" in card and "beta 0.1" in card and "LoRA r 16, alpha 32" in card
    merged = (tmp_path / "merged" / "README.md").read_text()
    assert front_matter(merged)["library_name"] == "transformers" and "AutoModelForCausalLM.from_pretrained" in merged


def test_a_run_started_from_python_gets_the_equivalent_command(tiny, tmp_path, monkeypatch):
    cfg = options.parse_args(argv(tiny, tmp_path, "--loss_type", "sigmoid", "sft", "--use_peft", "False", "--beta", "0.05",
                              "--dataset_split", "train[:50%]"))
    monkeypatch.setattr(sys, "argv", ["pytest"])
    words = shlex.split(model_card.command(cfg))
    assert words[:2] == ["python", "dpo.py"]
    assert vars(options.parse_args(words[2:])) == vars(cfg)  # the command gives the same run


@pytest.mark.parametrize("extra, library, tags", [
    (["--use_peft", "False"], "transformers", ["dpo", "trl-compatible"]),
    (["--load_in_4bit", "--dataset", "trl-lib/ultrafeedback_binarized"], "peft", ["dpo", "trl-compatible", "lora", "qlora"]),
])
def test_the_card_of_each_kind_of_run_has_its_library_and_python_that_compiles(extra, library, tags):
    cfg = options.parse_args(["--model", "Qwen/Qwen2.5-0.5B-Instruct", "--output_dir", "out", *extra])
    card = model_card.model_card(cfg, [{"step": 5, "eval_loss": 0.5}], "model")
    meta = front_matter(card)
    assert meta["library_name"] == library and meta["tags"] == tags and meta["base_model"] == "Qwen/Qwen2.5-0.5B-Instruct"
    assert meta.get("datasets") == (["trl-lib/ultrafeedback_binarized"] if "--dataset" in extra else None)
    compile(card.split("```python\n")[1].split("```")[0], "card", "exec")
