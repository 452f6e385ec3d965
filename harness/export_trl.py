"""`python dpo.py --export_trl [options]`: the same run as a multi-GPU TRL command.

dpo.py is one process on one GPU. When a run outgrows that, the engine to use is TRL's DPOTrainer under
accelerate (DDP, FSDP, DeepSpeed ZeRO). Our option names are TRL's, so most options carry over unchanged; this
prints the command, translates what has an exact TRL equivalent, and lists what TRL lacks with what to do instead.
Two things are not a renaming:
  - the batch: N processes each take per_device x accumulation pairs, so these are chosen to make N x per_device x
    accumulation equal this run's pairs per step (same learning-rate scale, same steps per epoch);
  - local data: TRL's script reads --dataset_name with datasets.load_dataset, which knows neither a single .jsonl
    file nor our held-out eval_fraction, so the rows this run trains and evaluates on are written to
    <output_dir>/trl_dataset/{train,test}.jsonl and the command points there.
"""
import math
import shlex
from pathlib import Path

from harness import datafiles

# Options whose name and meaning are the same in TRL's DPOConfig / ModelConfig / ScriptArguments.
SAME = ["beta", "loss_type", "loss_weights", "label_smoothing", "f_divergence_type", "f_alpha_divergence_coef",
        "discopop_tau", "ld_alpha", "use_weighting", "max_length", "truncation_mode", "learning_rate",
        "warmup_steps", "num_train_epochs", "max_steps", "max_grad_norm", "weight_decay", "optim", "seed",
        "bf16", "gradient_checkpointing", "precompute_ref_log_probs", "sync_ref_model", "ref_model_mixup_alpha",
        "ref_model_sync_steps", "disable_dropout", "logging_steps", "report_to", "save_steps", "save_total_limit",
        "output_dir", "resume_from_checkpoint", "pad_to_multiple_of", "trust_remote_code", "use_peft", "lora_r", "lora_alpha",
        "lora_dropout", "lora_target_modules", "load_in_4bit", "router_aux_loss_coef"]
RENAMED = {"model": "model_name_or_path"}
# Translated by export_trl_command itself: the batch arithmetic, the data, the evaluation schedule, two exact forms.
COMPUTED = {"per_device_train_batch_size", "gradient_accumulation_steps", "per_device_eval_batch_size", "dataset",
            "dataset_split", "eval_split", "eval_fraction", "eval_steps", "lr_scheduler_type", "rpo_alpha",
            "warmup_ratio"}
# Always written out: their defaults differ between the two projects, or the value was resolved at start.
DIFFERENT_DEFAULTS = {"model", "output_dir", "truncation_mode", "learning_rate", "num_train_epochs",
                      "gradient_checkpointing", "optim", "max_length", "use_peft"}
LORA = {"lora_r", "lora_alpha", "lora_dropout", "lora_target_modules"}
OURS_ONLY = {  # option -> what to do in TRL instead
    "ref_model": "TRL's script loads the reference from --model_name_or_path; pass ref_model= to DPOTrainer in Python",
    "max_prompt_length": "TRL 1.16 has no prompt limit: pre-truncate the prompts in the dataset",
    "max_completion_length": "TRL 1.16 has no completion limit: pre-truncate the completions in the dataset",
    "truncation_scope": "TRL cuts each sequence alone (our --truncation_scope row); pairs longer than max_length "
                        "differ: pre-truncate them, or train here with --truncation_scope row to compare",
    "reference_free": "not in TRL's DPOTrainer: use trl.experimental's CPOTrainer (loss_type=simpo)",
    "simpo_gamma": "a CPOConfig option (trl.experimental CPOTrainer, loss_type=simpo)",
    "dpop_lambda": "dpop is not in TRL: no equivalent",
    "rdpo_alpha": "rdpo is not in TRL: no equivalent",
    "sample_eval": "no TRL equivalent: run `python dpo.py --sample_eval N` on the saved model",
    "merge_adapter": "merge after training with peft's merge_and_unload()",
    "overwrite_output_dir": "TRL has no such guard: it writes into output_dir whatever is there already",
}
# No effect on what is trained or measured, so nothing to carry (and why).
NO_EFFECT = {
    "prefix_sharing": "the same numbers as the concatenated rows TRL always computes",
    "show_examples": "printing only",
    "cpu_threads": "CPU only (set OMP_NUM_THREADS for TRL on a CPU)",
    "debug": "error messages only",
    "export_trl": "this very export",
    "num_processes": "the launcher's --num_processes",
    "config": "its options are exported one by one (the recipe itself is not carried)",
}
OUR_LOSSES = {"simpo": "trl.experimental CPOTrainer (loss_type=simpo)", "orpo": "trl.experimental ORPOTrainer",
              "dpop": "no TRL equivalent", "rdpo": "no TRL equivalent"}


def batch_plan(pairs_per_step: int, per_device: int, num_processes: int) -> tuple[int, int, str | None]:
    """(per_device_train_batch_size, gradient_accumulation_steps, warning) for num_processes GPUs to take
    pairs_per_step pairs per optimizer step between them, as this run does on one. The per-device batch stays at most
    this run's (it fitted one GPU) and as large as it can, so that accumulation is as short as it can be."""
    per_process, left = divmod(pairs_per_step, num_processes)
    warning = None
    if left:  # no exact plan: the nearest global batch, and say so, since it changes the learning-rate scale and steps
        per_process = max(1, round(pairs_per_step / num_processes))
        fits = [n for n in range(2, 2 * num_processes + 1) if pairs_per_step % n == 0] or [pairs_per_step]
        warning = (f"{pairs_per_step} pairs per step (per_device_train_batch_size x gradient_accumulation_steps) do "
                   f"not split over {num_processes} processes: this command takes {num_processes * per_process} pairs "
                   f"per step, not {pairs_per_step}, so an epoch has {pairs_per_step / (num_processes * per_process):.2g}x "
                   f"as many steps at the same learning rate; use --num_processes {' or '.join(map(str, fits))} "
                   f"(a divisor of {pairs_per_step}), or make pairs per step a multiple of {num_processes}")
    per_device = max(n for n in range(1, min(per_device, per_process) + 1) if per_process % n == 0)
    return per_device, per_process // per_device, warning


def write_rows(rows, path: Path):
    """One JSON object per line, the columns as loaded (strings or message lists), the order kept."""
    rows.to_json(str(path), lines=True, force_ascii=False)


def export_dataset(cfg) -> tuple[dict, int | None, int | None, list[str]]:
    """The TRL dataset options for this run's train and eval rows: (options, train rows, eval rows, notes); a row
    count is None where the rows were not loaded (a Hub dataset with an eval split: TRL loads it by name).

    The eval split is chosen as load_preference_dataset chooses it: --eval_split, else test/validation/eval, else a
    seeded held-out eval_fraction of train. TRL's script evaluates on --dataset_test_split (default "test") only."""
    notes = []
    if not Path(cfg.dataset).expanduser().exists():  # a Hub name: TRL's script loads it by name, as we do
        options = dict(dataset_name=cfg.dataset, dataset_train_split=cfg.dataset_split)
        if cfg.eval_split is not None:
            return {**options, "dataset_test_split": cfg.eval_split}, None, None, notes
        import datasets

        try:
            names = datasets.get_dataset_split_names(cfg.dataset)
        except Exception as err:  # offline, or no such dataset: TRL's default split name, and say so
            notes.append(f"could not list the splits of {cfg.dataset} ({type(err).__name__}): TRL evaluates on its "
                         "'test' split; if it has none, dpo.py evaluates on validation/eval or a held-out "
                         "eval_fraction: rerun --export_trl where the Hub is reachable to carry that")
            return {**options, "dataset_test_split": "test"} if cfg.eval_fraction else options, None, None, notes
        real = next((n for n in datafiles.EVAL_SPLITS if n in names and n != cfg.dataset_split), None)
        if real or not cfg.eval_fraction:
            return {**options, "dataset_test_split": real} if real else options, None, None, notes
    import datasets

    datasets.disable_progress_bars()  # the command is the output: no bars around it
    # A local file or folder, or a held-out eval: write exactly the rows this run uses (the same seed, the same rows)
    # in a folder that datasets.load_dataset reads as splits "train" and "test" (by their file names).
    train, evaluation = datafiles.load_preference_dataset(cfg.dataset, cfg.dataset_split, cfg.eval_split,
                                                     cfg.eval_fraction, cfg.seed)
    folder = Path(cfg.output_dir) / "trl_dataset"
    folder.mkdir(parents=True, exist_ok=True)
    write_rows(train, folder / "train.jsonl")
    options = dict(dataset_name=str(folder), dataset_train_split="train")
    (folder / "test.jsonl").unlink(missing_ok=True)  # an earlier export's eval rows must not be evaluated on
    if evaluation is not None:
        write_rows(evaluation, folder / "test.jsonl")
        options["dataset_test_split"] = "test"
    notes.append(f"wrote {folder}/train.jsonl ({len(train)} pairs, {train.origin['where']})"
                 + (f" and test.jsonl ({len(evaluation)} pairs, {evaluation.origin['where']}"
                    f"{', held out: eval_fraction ' + str(cfg.eval_fraction) if evaluation.origin['where'] == train.origin['where'] else ''})"
                    if evaluation is not None else " (no eval rows: eval_fraction 0)")
                 + ": the rows this run uses, for TRL's script to load")
    return options, len(train), None if evaluation is None else len(evaluation), notes


def export_trl_command(cfg, argv, num_processes=8, accelerate_config="multi_gpu"):
    """The `trl dpo` command (TRL's wrapper around `accelerate launch`) for the options given in argv, on
    num_processes GPUs, followed by comment lines: a warning where the batch cannot be kept, the dataset files
    written, and the options TRL lacks with what to do instead."""
    given = {a.split("=")[0].lstrip("-") for a in argv if a.startswith("--")} - {"export_trl"}
    given |= DIFFERENT_DEFAULTS | (LORA if cfg.use_peft else set()) | {"truncation_scope"}  # pair: not TRL's rule
    args, n_train, n_eval, files = export_dataset(cfg)
    # The batch: TRL's global batch is num_processes x per-device x accumulation; keep it equal to ours.
    pairs_per_step = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
    per_device, accumulation, warning = batch_plan(pairs_per_step, cfg.per_device_train_batch_size, num_processes)
    eval_batch = cfg.per_device_eval_batch_size  # it fitted one GPU; no larger than each process's share of the rows
    if n_eval:
        eval_batch = min(eval_batch, math.ceil(n_eval / num_processes))
    args.update(per_device_train_batch_size=per_device, gradient_accumulation_steps=accumulation,
                per_device_eval_batch_size=eval_batch)
    notes = []
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
        elif name in OURS_ONLY and not (name == "truncation_scope" and value == "row"):
            notes.append(f"--{name}: {OURS_ONLY[name]}")
    # Evaluation: TRL's script hands DPOTrainer its eval rows only under an eval_strategy. Under "steps" transformers
    # also evaluates after the last step, as dpo.py does; with no --eval_steps dpo.py evaluates only then.
    if "dataset_test_split" in args:
        steps = cfg.max_steps if cfg.max_steps > 0 else n_train and math.ceil(
            cfg.num_train_epochs * math.ceil(n_train / (num_processes * per_device * accumulation)))
        if cfg.eval_steps or steps:
            args.update(eval_strategy="steps", eval_steps=cfg.eval_steps or steps)
        else:  # a Hub dataset of unknown length: at the end of each epoch
            args.update(eval_strategy="epoch")
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
    lines += [f"# warning: {warning}"] * bool(warning) + [f"# {n}" for n in files]
    if notes:
        lines += ["# options TRL does not have:"] + [f"#   {n}" for n in notes]
    return "\n".join(lines)
