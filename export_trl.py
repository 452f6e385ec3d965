"""`python dpo.py --export_trl [options]`: the same run as a multi-GPU TRL command.

dpo.py is one process on one GPU. When a run outgrows that, the engine to use is TRL's DPOTrainer under
accelerate (DDP, FSDP, DeepSpeed ZeRO). Our option names are TRL's, so most options carry over unchanged; this
prints the command, translates what has an exact TRL equivalent, and lists what TRL lacks with what to do instead.
"""
import shlex

# Options whose name and meaning are the same in TRL's DPOConfig / ModelConfig / ScriptArguments.
SAME = ["beta", "loss_type", "loss_weights", "label_smoothing", "f_divergence_type", "f_alpha_divergence_coef",
        "discopop_tau", "ld_alpha", "use_weighting", "max_length", "truncation_mode", "learning_rate",
        "warmup_steps", "num_train_epochs", "max_steps", "per_device_train_batch_size",
        "per_device_eval_batch_size", "gradient_accumulation_steps", "max_grad_norm", "weight_decay", "optim", "seed",
        "bf16", "gradient_checkpointing", "precompute_ref_log_probs", "sync_ref_model", "ref_model_mixup_alpha",
        "ref_model_sync_steps", "disable_dropout", "logging_steps", "save_steps", "save_total_limit", "output_dir",
        "resume_from_checkpoint", "pad_to_multiple_of", "trust_remote_code", "use_peft", "lora_r", "lora_alpha",
        "lora_dropout", "lora_target_modules", "load_in_4bit", "router_aux_loss_coef"]
RENAMED = {"model": "model_name_or_path", "dataset": "dataset_name", "dataset_split": "dataset_train_split",
           "eval_split": "dataset_test_split"}
# Always written out: their defaults differ between the two projects, or the value was resolved at start.
DIFFERENT_DEFAULTS = {"model", "dataset", "output_dir", "truncation_mode", "learning_rate", "num_train_epochs",
                      "gradient_checkpointing", "optim", "max_length", "use_peft"}
LORA = {"lora_r", "lora_alpha", "lora_dropout", "lora_target_modules"}
OURS_ONLY = {  # option -> what to do in TRL instead
    "ref_model": "TRL's script loads the reference from --model_name_or_path; pass ref_model= to DPOTrainer in Python",
    "max_prompt_length": "TRL 1.16 has no prompt limit: pre-truncate the prompts in the dataset",
    "max_completion_length": "TRL 1.16 has no completion limit: pre-truncate the completions in the dataset",
    "reference_free": "not in TRL's DPOTrainer: use trl.experimental's CPOTrainer (loss_type=simpo)",
    "eval_fraction": "TRL needs an eval split: make one with Dataset.train_test_split and save it",
    "sample_eval": "no TRL equivalent: run `python dpo.py --sample_eval N` on the saved model",
    "merge_adapter": "merge after training with peft's merge_and_unload()",
}
OUR_LOSSES = {"simpo": "trl.experimental CPOTrainer (loss_type=simpo)", "orpo": "trl.experimental ORPOTrainer",
              "dpop": "no TRL equivalent", "rdpo": "no TRL equivalent"}


def export_trl_command(cfg, argv, num_processes=8, accelerate_config="multi_gpu"):
    """The `trl dpo` command (TRL's wrapper around `accelerate launch`) for the options given in argv."""
    given = {a.split("=")[0].lstrip("-") for a in argv if a.startswith("--")} - {"export_trl"}
    given |= DIFFERENT_DEFAULTS | (LORA if cfg.use_peft else set())
    args, notes = {}, []
    for name in sorted(given):
        value = getattr(cfg, name)
        if name in SAME:
            args[name] = value
        elif name in RENAMED:
            args[RENAMED[name]] = value
        elif name == "lr_scheduler_type":
            args[name] = {"constant": "constant_with_warmup"}.get(value, value)
        elif name == "rpo_alpha" and value:  # RPO = DPO + alpha * NLL: TRL's multi-loss says exactly that
            args["loss_type"] = cfg.loss_type + ["sft"]
            args["loss_weights"] = (cfg.loss_weights or [1.0] * len(cfg.loss_type)) + [value]
        elif name == "warmup_ratio" and not cfg.warmup_steps:  # transformers 5: a float < 1 in warmup_steps is a ratio
            args["warmup_steps"] = value
        elif name == "eval_steps":
            args.update(eval_strategy="steps", eval_steps=value)
        elif name in OURS_ONLY:
            notes.append(f"--{name}: {OURS_ONLY[name]}")
    if "sigmoid" in cfg.loss_type and cfg.label_smoothing > 0:
        notes.append("--label_smoothing on sigmoid (cDPO): TRL 1.16 ignores it there; for B=1 loss_type=aot is cDPO")
    for loss in set(cfg.loss_type) & set(OUR_LOSSES):
        notes.append(f"--loss_type {loss}: {OUR_LOSSES[loss]}")
    if cfg.load_in_4bit:
        args.update(bnb_4bit_quant_type="nf4", use_bnb_nested_quant=True)
    words = ["trl", "dpo", "--accelerate_config", accelerate_config, "--num_processes", str(num_processes)]
    for key, value in args.items():
        values = value if isinstance(value, list) else [value]
        words += [f"--{key}", *(str(v) for v in values)]
    lines = [shlex.join(words)]
    if notes:
        lines += ["# options TRL does not have:"] + [f"#   {n}" for n in notes]
    return "\n".join(lines)
