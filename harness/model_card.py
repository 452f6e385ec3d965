"""The model card, README.md in output_dir/model/ (and merged/), in the format the Hugging Face hub shows.

Plumbing for checkpoints.save_model, which writes it into the folder before the folder is renamed into place. The
YAML front matter is what the hub reads (base_model, library_name, tags, datasets when a hub name); the text says
what the run was: base model, data, loss and key options, the final evaluation (the last eval_ record of
metrics.jsonl, so the card and the file never disagree), the command, and how to load the folder.
"""
import dataclasses
import json
import math
import re
import shlex
import sys
from pathlib import Path

import yaml

HUB_NAME = re.compile(r"[\w.-]+/[\w.-]+")  # org/name: what the hub's `datasets` field can link to
LOSS_OPTIONS = ["loss_weights", "label_smoothing", "f_divergence_type", "f_alpha_divergence_coef", "discopop_tau",
                "ld_alpha", "use_weighting", "rpo_alpha", "reference_free", "simpo_gamma", "dpop_lambda", "rdpo_alpha"]


def defaults(cfg) -> dict:
    return {f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            for f in dataclasses.fields(cfg)}


def command(cfg) -> str:
    """The command as it was typed, shell-quoted. A run started from Python (a notebook, a test) has none: then the
    equivalent command, every option that differs from its default (resolved values, e.g. the learning rate)."""
    if Path(sys.argv[0]).name == "dpo.py":
        return shlex.join(["python", *sys.argv])
    words = ["python", "dpo.py"]
    for name, default in defaults(cfg).items():
        value = getattr(cfg, name)
        if value != default and value is not None:
            words += [f"--{name}", *(str(v) for v in (value if isinstance(value, list) else [value]))]
    return shlex.join(words)


def reference(cfg) -> str:
    if cfg.reference_free:
        return "none (`--reference_free`: reference log-probs taken as 0)"
    ref = f"`{cfg.ref_model}`" if cfg.ref_model else "the base model, adapters off" if cfg.use_peft else "a frozen copy of the base model"
    if cfg.precompute_ref_log_probs:
        ref += ", log-probs precomputed"
    if cfg.sync_ref_model:
        ref += f", TR-DPO sync every {cfg.ref_model_sync_steps} steps (alpha {cfg.ref_model_mixup_alpha:g})"
    return ref


def training_rows(cfg, steps: int) -> list[tuple[str, str]]:
    """The key options, as a reader of the card wants them; every option is in the JSON block below them."""
    given = defaults(cfg)
    loss = "".join(f", {k} {json.dumps(getattr(cfg, k))}" for k in LOSS_OPTIONS if getattr(cfg, k) != given[k])
    method = (f"LoRA r {cfg.lora_r}, alpha {cfg.lora_alpha}, dropout {cfg.lora_dropout:g}, on "
              f"{', '.join(cfg.lora_target_modules)}" if cfg.use_peft else "full fine-tuning (every weight)")
    evaluation = (f"split {cfg.eval_split}" if cfg.eval_split else
                  f"its test/validation split if it has one, else {cfg.eval_fraction:.0%} of train held out")
    warmup = (f"{cfg.warmup_steps} warmup steps" if cfg.warmup_steps else
              f"warmup ratio {cfg.warmup_ratio:g}" if cfg.warmup_ratio else "no warmup")
    asked = cfg.max_steps if cfg.max_steps > 0 else f"{cfg.num_train_epochs:g} epochs"
    cuts = "".join(f", {k} {getattr(cfg, k)}" for k in ("max_prompt_length", "max_completion_length") if getattr(cfg, k))
    return [
        ("base model", f"`{cfg.model}`"),
        ("dataset", f"`{cfg.dataset}`, split {cfg.dataset_split}; evaluation on {evaluation}"),
        ("loss", f"{' + '.join(cfg.loss_type)}, beta {cfg.beta:g}{loss}"),
        ("reference", reference(cfg)),
        ("method", method + ("; base in 4-bit NF4 (QLoRA)" if cfg.load_in_4bit else "")),
        ("learning rate", f"{cfg.learning_rate}, {cfg.lr_scheduler_type}, {warmup}, {cfg.optim}, weight decay {cfg.weight_decay:g}"),
        ("steps", f"{steps} ({asked} asked), {cfg.per_device_train_batch_size} pairs x {cfg.gradient_accumulation_steps} accumulation"),
        ("max_length", f"{cfg.max_length}{cuts}; truncation {cfg.truncation_mode}, scope {cfg.truncation_scope}"),
        ("precision", "bf16 autocast" if cfg.bf16 else "fp32"),
        ("seed", str(cfg.seed)),
    ]


def usage(cfg, folder: str) -> list[str]:
    """Python that loads the folder: peft for an adapter (on an NF4 base for QLoRA, as trained), else transformers."""
    path = json.dumps(str(Path(cfg.output_dir) / folder))
    if not (cfg.use_peft and folder == "model"):
        return ["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                f"model = AutoModelForCausalLM.from_pretrained({path})", f"tokenizer = AutoTokenizer.from_pretrained({path})"]
    if not cfg.load_in_4bit:
        return ["from peft import AutoPeftModelForCausalLM", "from transformers import AutoTokenizer", "",
                f"model = AutoPeftModelForCausalLM.from_pretrained({path})  # the base model, then this adapter",
                f"tokenizer = AutoTokenizer.from_pretrained({path})"]
    return ["import torch", "from peft import AutoPeftModelForCausalLM", "from transformers import AutoTokenizer, BitsAndBytesConfig", "",
            'nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,',
            f"                         bnb_4bit_compute_dtype=torch.{'bfloat16' if cfg.bf16 else 'float32'})",
            f"model = AutoPeftModelForCausalLM.from_pretrained({path}, quantization_config=nf4)  # the base as trained",
            f"tokenizer = AutoTokenizer.from_pretrained({path})"]


def number(v) -> str:
    """A metric as the card shows it: 4 significant digits, and "n/a" for a non-finite one (null in metrics.jsonl)."""
    return f"{v:.4g}" if isinstance(v, (int, float)) and math.isfinite(v) else "n/a"


def model_card(cfg, records: list[dict], folder: str) -> str:
    """The README.md text of output_dir/<folder> ("model": the adapter or full model; "merged": LoRA merged)."""
    adapter = cfg.use_peft and folder == "model"
    front = {"base_model": cfg.model, "library_name": "peft" if adapter else "transformers", "pipeline_tag": "text-generation",
             "tags": ["dpo", "trl-compatible"] + ["lora"] * cfg.use_peft + ["qlora"] * cfg.load_in_4bit}
    if HUB_NAME.fullmatch(cfg.dataset) and not Path(cfg.dataset).exists():
        front["datasets"] = [cfg.dataset]
    kind = ("QLoRA adapter" if cfg.load_in_4bit else "LoRA adapter") if adapter else (
        "LoRA-merged model" if cfg.use_peft else "fully fine-tuned model")
    steps = max((r["step"] for r in records), default=0)
    final = next((r for r in reversed(records) if "eval_loss" in r), None)  # the evaluation at the end
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {Path(cfg.output_dir).name}: a DPO {kind} of {cfg.model}", "",
             "Trained with Direct Preference Optimization (Rafailov et al. 2023, arXiv:2305.18290) by `dpo.py`, a "
             "single-GPU trainer with TRL's `DPOTrainer` option and metric names.", "",
             "## Training", "", "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in training_rows(cfg, steps)), ""]
    if final:
        lines += [f"## Evaluation (held-out pairs, step {final['step']})", "", "| metric | value |", "|---|---|",
                  *(f"| {k} | {number(v)} |" for k, v in final.items() if k != "step"), ""]
    lines += ["## Command", "", "```bash", command(cfg), "```", "", "## Use", "", "```python", *usage(cfg, folder), "```", ""]
    if adapter and cfg.merge_adapter and not cfg.load_in_4bit:
        lines += [f"`{Path(cfg.output_dir) / 'merged'}` holds the same model with the adapter merged into the base "
                  "weights (`AutoModelForCausalLM`).", ""]
    lines += ["<details><summary>Every option of the run</summary>", "", "```json",
              json.dumps(dataclasses.asdict(cfg), indent=1), "```", "", "</details>", ""]
    return "\n".join(lines)
