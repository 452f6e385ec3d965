"""The options of a run: their defaults and one-line help (the `Config` dataclass, read by transformers'
HfArgumentParser as TRL reads its DPOConfig), the values that depend on other options, every range and
contradiction checked before anything loads, `--config recipe.yaml`, and the command line itself."""
import dataclasses
import difflib
import importlib.util
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

import data
import losses
from harness.errors import USER_ERRORS, Interrupted, OptionError, interrupts

HERE = Path(__file__).resolve().parent.parent
DEMO_MODEL = HERE / "demo" / "assets" / "tiny-sentiment-lm"  # built by scripts/make_assets.py, see demo/assets/README.md
DEMO_DATASET = HERE / "demo" / "assets" / "sentiment-prefs"
# Settings the shipped demo uses for options left unset (a tiny model needs a far larger step than a 7B one).
DEMO_DEFAULTS = dict(learning_rate=2e-3, max_length=128, logging_steps=10, eval_steps=50, sample_eval=64, cpu_threads=1)


@dataclass
class Config:
    # ---- model and data ----
    model: str = field(default=str(DEMO_MODEL), metadata={"help": "policy: hub name or local folder (default: the shipped tiny demo model)"})
    dataset: str = field(default=str(DEMO_DATASET), metadata={"help": "preference data: hub name, .jsonl/.json/.parquet/.csv file, or folder"})
    ref_model: Optional[str] = field(default=None, metadata={"help": "reference model; default: the policy at step 0 (adapters off with LoRA)"})
    dataset_split: str = field(default="train", metadata={"help": "split to train on"})
    eval_split: Optional[str] = field(default=None, metadata={"help": "split to evaluate on (default: test/validation if present)"})
    eval_fraction: float = field(default=0.05, metadata={"help": "held-out fraction of train when there is no eval split (0: no eval)"})
    trust_remote_code: bool = field(default=False, metadata={"help": "run Python code shipped with the model (only for sources you trust)"})
    # ---- the DPO objective (losses.py) ----
    beta: float = field(default=0.1, metadata={"help": "KL strength beta: lower lets the policy move further from the reference"})
    loss_type: list[str] = field(default_factory=lambda: ["sigmoid"], metadata={"help": f"one or several of {', '.join(losses.LOSS_TYPES)}"})
    loss_weights: Optional[list[float]] = field(default=None, metadata={"help": "weights of the loss types (default: all 1)"})
    label_smoothing: float = field(default=0.0, metadata={"help": "epsilon: assumed label-flip rate (cDPO on sigmoid; robust, exo_pair, aot)"})
    f_divergence_type: str = field(default="reverse_kl", metadata={"help": "reverse_kl, forward_kl, js_divergence or alpha_divergence (f-DPO)"})
    f_alpha_divergence_coef: float = field(default=0.5, metadata={"help": "alpha of alpha_divergence"})
    discopop_tau: float = field(default=0.05, metadata={"help": "temperature of the discopop mixing gate"})
    ld_alpha: Optional[float] = field(default=None, metadata={"help": "LD-DPO: weight of completion tokens past the shorter completion (1 = DPO)"})
    use_weighting: bool = field(default=False, metadata={"help": "WPO: weight each pair by the policy's own probability of it"})
    rpo_alpha: Optional[float] = field(default=None, metadata={"help": "RPO: add rpo_alpha * NLL of the chosen completion"})
    reference_free: bool = field(default=False, metadata={"help": "take reference log-probs as 0 (no reference model at all)"})
    simpo_gamma: float = field(default=0.5, metadata={"help": "target reward margin gamma of simpo"})
    dpop_lambda: float = field(default=50.0, metadata={"help": "lambda of dpop (DPO-Positive)"})
    rdpo_alpha: float = field(default=0.01, metadata={"help": "length penalty alpha of rdpo"})
    router_aux_loss_coef: Optional[float] = field(default=None, metadata={"help": "MoE: weight of the load-balancing loss (default: the model config's; 0: off)"})
    # ---- tokenization (data.py) ----
    max_length: Optional[int] = field(default=None, metadata={"help": "max tokens of prompt+completion (default 1024; demo 128)"})
    max_prompt_length: Optional[int] = field(default=None, metadata={"help": "cut prompts to this many tokens first (optional)"})
    max_completion_length: Optional[int] = field(default=None, metadata={"help": "cut completions to this many tokens (optional)"})
    truncation_mode: str = field(default="keep_end", metadata={"help": "keep_end: cut the start of long rows; keep_start: cut the end"})
    truncation_scope: str = field(default="pair", metadata={"help": "pair: one prompt for both completions; row: each sequence alone (TRL)"})
    prefix_sharing: bool = field(default=True, metadata={"help": "compute each pair's prompt once: [prompt; chosen; rejected] rows (same numbers)"})
    pad_to_multiple_of: Optional[int] = field(default=None, metadata={"help": "pad batch length to a multiple of this"})
    show_examples: int = field(default=1, metadata={"help": "print this many training examples as the model sees them"})
    # ---- optimisation ----
    learning_rate: Optional[float] = field(default=None, metadata={"help": "peak lr (default 5e-6 with LoRA, 5e-7 full, demo 2e-3)"})
    lr_scheduler_type: str = field(default="linear", metadata={"help": "linear, cosine or constant, after warmup"})
    warmup_ratio: float = field(default=0.0, metadata={"help": "fraction of steps for linear warmup"})
    warmup_steps: int = field(default=0, metadata={"help": "warmup steps (overrides warmup_ratio when > 0)"})
    num_train_epochs: float = field(default=1.0, metadata={"help": "passes over the training pairs"})
    max_steps: int = field(default=-1, metadata={"help": "optimizer steps; overrides num_train_epochs when > 0"})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "pairs per micro-batch (2x rows per forward)"})
    per_device_eval_batch_size: int = field(default=8, metadata={"help": "pairs per evaluation batch"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "clip the gradient norm to this (0: no clipping)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (not on biases and norms)"})
    optim: str = field(default="adamw_torch", metadata={"help": "adamw_torch, rmsprop (the DPO paper's) or paged_adamw_8bit"})
    seed: int = field(default=42, metadata={"help": "seed of everything: init, data order, sampling"})
    cpu_threads: Optional[int] = field(default=None, metadata={"help": "torch threads on a CPU (demo: 1, its matrices are too small to share)"})
    bf16: Optional[bool] = field(default=None, metadata={"help": "bf16 autocast (default: on where the GPU supports it; CPU: slow, for tests)"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in backward: less memory, ~30%% slower"})
    # ---- reference model ----
    precompute_ref_log_probs: bool = field(default=False, metadata={"help": "score the data with the reference once, before training"})
    sync_ref_model: bool = field(default=False, metadata={"help": "TR-DPO: move the reference towards the policy every ref_model_sync_steps"})
    ref_model_mixup_alpha: float = field(default=0.6, metadata={"help": "TR-DPO: ref <- (1-alpha) ref + alpha policy"})
    ref_model_sync_steps: int = field(default=512, metadata={"help": "TR-DPO: steps between reference updates"})
    disable_dropout: bool = field(default=True, metadata={"help": "set every dropout to 0 (policy and reference see the same net)"})
    # ---- LoRA / QLoRA ----
    use_peft: bool = field(default=True, metadata={"help": "train LoRA adapters instead of all weights (--use_peft False: full)"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scale numerator (scale = alpha / r)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout (kept even with disable_dropout)"})
    lora_target_modules: list[str] = field(default_factory=lambda: ["all-linear"], metadata={"help": "module names to adapt"})
    load_in_4bit: bool = field(default=False, metadata={"help": "QLoRA: frozen base in 4-bit NF4 (needs --use_peft)"})
    merge_adapter: bool = field(default=False, metadata={"help": "also save the LoRA-merged full model"})
    # ---- logging, evaluation, checkpoints ----
    output_dir: Optional[str] = field(default=None, metadata={"help": "where everything is written (default runs/<time>)"})
    report_to: str = field(default="none", metadata={"help": "also send the metrics to tensorboard, wandb or trackio (trackers.py)"})
    logging_steps: int = field(default=10, metadata={"help": "steps between metric lines"})
    eval_steps: Optional[int] = field(default=None, metadata={"help": "steps between evaluations (default: only at the end)"})
    save_steps: int = field(default=500, metadata={"help": "steps between checkpoints (0: none, but still on Ctrl-C)"})
    save_total_limit: Optional[int] = field(default=None, metadata={"help": "keep only the newest N checkpoints"})
    resume_from_checkpoint: Optional[str] = field(default=None, metadata={"help": "checkpoint folder or 'latest' in output_dir"})
    sample_eval: int = field(default=0, metadata={"help": "at the end, sample N held-out prompts from reference and policy"})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "replace what an earlier run wrote in output_dir"})
    export_trl: bool = field(default=False, metadata={"help": "print the equivalent TRL command (multi-GPU) and exit"})
    num_processes: Optional[int] = field(default=None, metadata={"help": "GPUs the --export_trl command runs on (default 8)"})
    debug: bool = field(default=False, metadata={"help": "show the Python traceback of an error"})
    config: Optional[str] = field(default=None, metadata={"help": "a YAML recipe of these options (TRL's names too); the command line overrides it"})


def resolve(cfg: Config, argv: list[str] | None = None) -> Config:
    """Fill the defaults that depend on other options, and reject contradictions before anything is loaded. From
    Python (argv None), an option counts as given when it differs from its default; resolving twice changes nothing."""
    if argv is not None:
        given = {a.split("=")[0].lstrip("-") for a in argv if a.startswith("--")}
    else:
        given = {f.name for f in dataclasses.fields(Config) if getattr(cfg, f.name) != Config().__dict__[f.name]}
    if cfg.model == str(DEMO_MODEL) and cfg.dataset == str(DEMO_DATASET):
        for k, v in DEMO_DEFAULTS.items():
            if k not in given:
                setattr(cfg, k, v)
    cfg.max_length = 1024 if cfg.max_length is None else cfg.max_length
    if cfg.learning_rate is None:  # `is None`, not `or`: --learning_rate 0 means 0 (evaluate the reference, train nothing)
        cfg.learning_rate = 5e-6 if cfg.use_peft else 5e-7
    problems = []
    try:
        cfg.loss_type = losses.check_loss_config(**dataclasses.asdict(cfg))
    except ValueError as err:
        problems.append(str(err))
    if cfg.bf16 and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        problems.append("--bf16 True: this GPU has no bf16 support; run in fp32 (leave --bf16 unset)")
    check_options(cfg, problems)  # every range and contradiction, one OptionError listing them all
    if cfg.bf16 is None:
        cfg.bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    for name in ("model", "ref_model", "dataset", "output_dir", "resume_from_checkpoint"):  # --output_dir=~/x:
        value = getattr(cfg, name)  # the shell leaves a ~ after = as it is
        if isinstance(value, str) and value.startswith("~"):
            setattr(cfg, name, os.path.expanduser(value))
    if cfg.output_dir is None:
        if cfg.resume_from_checkpoint not in (None, "latest"):
            cfg.output_dir = str(Path(cfg.resume_from_checkpoint).resolve().parent)
        else:  # created by checks.preflight, with a suffix when another run took the name in the same second
            cfg.output_dir = os.path.join("runs", time.strftime("dpo-%Y%m%d-%H%M%S"))
            DEFAULT_OUTPUT_DIRS.add(cfg.output_dir)
    return cfg


DEFAULT_OUTPUT_DIRS = set()  # the runs/dpo-<time> names resolve chose (not given by the user)


# Each option's range, checked before the tokenizer loads: (option, is the value valid?, what it must be). Every
# float (and list of floats) must also be finite. beta's rule, and the loss types' own, are losses.check_loss_config's.
RANGES = [
    ("learning_rate", lambda v: 0 <= v <= 1, "in [0, 1] (5e-7 to 5e-6 is usual; the demo's tiny model takes 2e-3)"),
    ("seed", lambda v: 0 <= v < 2**63, "in [0, 2**63)"),
    ("loss_weights", lambda v: v is None or all(w >= 0 for w in v), ">= 0 each (a negative weight trains that loss "
                                                                   "backwards)"),
    ("rpo_alpha", lambda v: v is None or v >= 0, ">= 0 (a negative one lowers the chosen completions' likelihood)"),
    ("ld_alpha", lambda v: v is None or 0 <= v <= 1, "in [0, 1] (1 = DPO)"),
    ("discopop_tau", lambda v: v > 0, "> 0 (the mixing gate divides by it)"),
    ("dpop_lambda", lambda v: v >= 0, ">= 0"),
    ("max_length", lambda v: v >= 2, ">= 2 (a sequence's first token is never scored)"),
    ("max_prompt_length", lambda v: v is None or v >= 1, ">= 1"),
    ("max_completion_length", lambda v: v is None or v >= 1, ">= 1"),
    ("pad_to_multiple_of", lambda v: v is None or v >= 1, ">= 1"),
    ("per_device_train_batch_size", lambda v: v >= 1, ">= 1"),
    ("per_device_eval_batch_size", lambda v: v >= 1, ">= 1"),
    ("gradient_accumulation_steps", lambda v: v >= 1, ">= 1"),
    ("num_train_epochs", lambda v: v > 0, "> 0"),
    ("max_steps", lambda v: v == -1 or v >= 1, ">= 1, or -1 for num_train_epochs"),
    ("warmup_ratio", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("warmup_steps", lambda v: v >= 0, ">= 0"),
    ("max_grad_norm", lambda v: v >= 0, ">= 0 (0: no clipping)"),
    ("weight_decay", lambda v: v >= 0, ">= 0"),
    ("eval_fraction", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("ref_model_mixup_alpha", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("ref_model_sync_steps", lambda v: v >= 1, ">= 1"),
    ("lora_r", lambda v: v >= 1, ">= 1"),
    ("lora_alpha", lambda v: v > 0, "> 0"),
    ("lora_dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("logging_steps", lambda v: v >= 1, ">= 1"),
    ("num_processes", lambda v: v is None or v >= 1, ">= 1"),
    ("eval_steps", lambda v: v is None or v >= 1, ">= 1"),
    ("save_steps", lambda v: v >= 0, ">= 0 (0: only on Ctrl-C/SIGTERM)"),
    ("save_total_limit", lambda v: v is None or v >= 1, ">= 1"),
    ("sample_eval", lambda v: v >= 0, ">= 0"),
    ("show_examples", lambda v: v >= 0, ">= 0"),
    ("cpu_threads", lambda v: v is None or 1 <= v <= 4 * (os.cpu_count() or 1),
     f"in [1, {4 * (os.cpu_count() or 1)}] (this machine has {os.cpu_count()} CPUs)"),
    ("router_aux_loss_coef", lambda v: v is None or v >= 0, ">= 0"),
]


def check_options(cfg, problems: list[str]):
    """Every option's range and every contradiction, all reported in one message (OptionError)."""
    for f in dataclasses.fields(Config):  # NaN and inf pass most comparisons: refused for every option first
        values = getattr(cfg, f.name) if isinstance(getattr(cfg, f.name), list) else [getattr(cfg, f.name)]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            problems.append(f"--{f.name} must be a finite number, got {getattr(cfg, f.name)}")
    for name, valid, must_be in RANGES:
        value = getattr(cfg, name)
        finite = all(math.isfinite(v) for v in (value if isinstance(value, list) else [value])
                     if isinstance(v, float))
        if finite and not valid(value):
            problems.append(f"--{name} must be {must_be}, got {value}")
    if len(set(cfg.loss_type)) != len(cfg.loss_type):
        problems.append(f"--loss_type names a loss twice ({' '.join(cfg.loss_type)}): give each once, and "
                        "--loss_weights to weigh one more")
    if cfg.pad_to_multiple_of and cfg.max_length and cfg.pad_to_multiple_of > cfg.max_length:
        problems.append(f"--pad_to_multiple_of {cfg.pad_to_multiple_of} is larger than --max_length "
                        f"{cfg.max_length}: every batch would be padded past it; give a divisor of --max_length")
    if cfg.load_in_4bit and not cfg.use_peft:
        problems.append("--load_in_4bit trains adapters on a frozen 4-bit base: add --use_peft True (4-bit weights cannot be trained)")
    if cfg.sync_ref_model and cfg.precompute_ref_log_probs:
        problems.append("--sync_ref_model changes the reference during training, so its log-probs cannot be precomputed: drop one")
    if cfg.sync_ref_model and cfg.use_peft:
        problems.append("--sync_ref_model needs a separate reference model: use full fine-tuning (--use_peft False)")
    if cfg.reference_free and (cfg.precompute_ref_log_probs or cfg.sync_ref_model or cfg.ref_model):
        problems.append("--reference_free uses no reference model: drop --precompute_ref_log_probs/--sync_ref_model/--ref_model")
    if cfg.truncation_mode not in data.TRUNCATION_MODES:
        problems.append(f"--truncation_mode must be {' or '.join(data.TRUNCATION_MODES)}, not {cfg.truncation_mode!r}")
    if cfg.truncation_scope not in data.TRUNCATION_SCOPES:
        problems.append(f"--truncation_scope must be {' or '.join(data.TRUNCATION_SCOPES)}, not {cfg.truncation_scope!r}")
    if cfg.lr_scheduler_type not in ("linear", "cosine", "constant"):
        problems.append(f"--lr_scheduler_type must be linear, cosine or constant, not {cfg.lr_scheduler_type!r}")
    if cfg.optim not in ("adamw_torch", "rmsprop", "paged_adamw_8bit"):
        problems.append(f"--optim must be adamw_torch, rmsprop or paged_adamw_8bit, not {cfg.optim!r}")
    if cfg.report_to not in ("none", "tensorboard", "wandb", "trackio"):
        problems.append(f"--report_to must be none, tensorboard, wandb or trackio, not {cfg.report_to!r}")
    elif cfg.report_to != "none" and importlib.util.find_spec(cfg.report_to) is None:  # checked now, not after loading
        problems.append(f"--report_to {cfg.report_to} needs the {cfg.report_to} package: pip install {cfg.report_to}")
    if cfg.resume_from_checkpoint == "latest" and cfg.output_dir is None:
        problems.append("--resume_from_checkpoint latest looks in --output_dir: give it, or the checkpoint's path")
    if problems:
        raise OptionError("; ".join(problems))


# TRL's and the alignment handbook's names for the same options, accepted in a --config recipe (and on the command line)
ALIASES = {"model_name_or_path": "model", "dataset_name": "dataset", "dataset_train_split": "dataset_split",
           "dataset_test_split": "eval_split", "ref_model_name_or_path": "ref_model"}


def read_recipe(path: str) -> list[str]:
    """--config recipe.yaml: its keys become command-line options placed first, so that options given on the command
    line override them (as `trl dpo --config` reads an alignment-handbook recipe)."""
    import yaml

    try:
        recipe = yaml.safe_load(Path(path).expanduser().read_text())
    except OSError as err:
        raise OptionError(f"--config {path}: cannot read it ({err.strerror}); give the path of a YAML recipe") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark else ""
        raise OptionError(f"--config {path}: not valid YAML ({getattr(err, 'problem', err)}{where}); fix the file") from None
    if not isinstance(recipe, dict):
        raise OptionError(f"--config {path}: expected a mapping of option: value, got {type(recipe).__name__}")
    names = {f.name: f for f in dataclasses.fields(Config)}
    argv = []
    for key, value in recipe.items():
        name = ALIASES.get(key, key)
        if name not in names:
            close = difflib.get_close_matches(str(key), [*names, *ALIASES], n=1)
            hint = f"; did you mean {close[0]}?" if close else "; see python dpo.py --help"
            raise OptionError(f"--config {path}: unknown option {key!r}{hint}")
        values = value if isinstance(value, list) else [value]
        argv += [f"--{name}", *(str(v) for v in values)] if value is not None else []
    return argv


def expand_argv(argv: list[str]) -> list[str]:
    """The command line with --config's recipe in front of it, and TRL's option names mapped to ours."""
    argv = list(argv)
    for i, arg in enumerate(argv):
        if arg == "--config" or arg.startswith("--config="):
            path = arg.split("=", 1)[1] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else "")
            if not path:
                raise OptionError("--config needs the path of a YAML recipe")
            rest = argv[:i] + argv[i + (1 if "=" in arg else 2):]
            return read_recipe(path) + expand_argv(rest) + [f"--config={path}"]
    return [f"--{ALIASES[a[2:].split('=')[0]]}" + (a[a.index('='):] if "=" in a else "")
            if a.startswith("--") and a[2:].split("=")[0] in ALIASES else a for a in argv]


def check_repeats(argv: list[str]):
    """A list option given twice on the command line: argparse keeps the last list silently (--loss_type sigmoid
    --loss_type sft trains sft alone, where sigmoid + sft was meant). A single value given twice is the usual
    "later words win" of a command line, and a --config recipe's values may be overridden: neither is refused."""
    lists = {f"--{f.name}" for f in dataclasses.fields(Config) if "list" in str(f.type)}
    names = [a.split("=")[0] for a in argv if a.split("=")[0] in lists]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise OptionError(f"{', '.join(repeated)} given more than once on the command line (only the last list "
                          "would be used); give the list once, as --loss_type sigmoid sft")


def parse_args(argv):
    from transformers import HfArgumentParser

    check_repeats(list(argv))
    argv = expand_argv(argv)
    parser = HfArgumentParser(Config)
    parser.print_usage = lambda file=None: None  # a wrong value is one line (the error names the option), not 50
    cfg, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if unknown:  # argparse's own message and exit code 2, with the usage line
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return resolve(cfg, argv)


def cli(argv, main):
    """`python dpo.py ...`: a user error is one line on stderr (the traceback with --debug); a bug keeps its traceback."""
    config = None
    try:
        with interrupts():  # SIGTERM and SIGHUP, too, stop a run before its loop with one line
            config = parse_args(argv)
            if config.export_trl:
                from harness.export_trl import export_trl_command

                print(export_trl_command(config, argv, config.num_processes or 8))
            else:
                main(config)
    except KeyboardInterrupt as err:
        print(f"dpo.py: error: {Interrupted.message(err)}", file=sys.stderr)
        sys.exit(128 + getattr(err, "signum", 2))
    except USER_ERRORS as err:
        if config.debug if config is not None else "--debug" in argv:
            raise
        print(f"dpo.py: error: {err}", file=sys.stderr)
        sys.exit(2 if isinstance(err, OptionError) else 1)
