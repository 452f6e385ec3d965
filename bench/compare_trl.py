"""
This project's DPO loop against TRL 1.16's DPOTrainer: the same model, data and settings, side by side.

    python bench/compare_trl.py                     # the default run: ~8 min on 2 CPU cores
    python bench/compare_trl.py --quick             # smoke run: ~2 min
    python bench/compare_trl.py --device cuda --arch qwen2.5-0.5b --bf16 --max_length 1024   # what gpu_check.sh runs
    python bench/compare_trl.py --arch smollm2-135m --batch_size 2 --cut_rows --prompt_tokens 85 199 \
        --modes full --steps 4 --warmup 1 --no_precompute   # a real model's shape, ~16 min (bench/README.md)

A development tool (it imports trl; the project never does). Everything is built offline in a temporary
folder: a byte-level BPE tokenizer trained on the preference text, a random model (--arch: a 5.2M-parameter
Qwen2 by default, or the shape of a real architecture such as SmolLM2-135M's Llama), and a preference set of
real text, the Anthropic HH harmless test file (../shared/data) when present, else the shipped
demo/assets/sentiment-prefs, else synthetic word pairs. Each run is its own subprocess, so its peak memory is
its own: ru_maxrss (RSS) on CPU, torch.cuda.max_memory_allocated on GPU, both read when the last step is done.

Identical settings for both: fp32 (or bf16 autocast on both with --bf16), batch size, max_length,
truncation_mode keep_start, steps, learning rate and linear schedule, AdamW (adamw_torch, not TRL's default
fused one), no gradient checkpointing (TRL defaults to on), dropout off, no evaluation or saving, logging
every step, seed 42, and the same batches in the same order (TRL reads the pairs already shuffled in this
project's order, sequentially). Tokens are counted the same way for both: the sum of attention_mask over the
2B rows of each step. Timing skips the first --warmup steps; each later step counts with its best time over
--repeats runs, interleaved (ours, TRL, ours, ...) so that other load on the machine hits both alike. On CPU
each run gets one thread (--threads) and the headline speed is per second of the run's own CPU time: time the
run spends waiting for a core while other jobs hold it does not count (they still share caches and memory
bandwidth). Wall-clock speed is shown too. With --threads N > 1 the headline is wall-clock speed, and the
speed per CPU-second (of all N threads) is shown beside it.
"""
import argparse
import gzip
import json
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HH = ROOT.parent / "shared/data/hh_harmless_test.jsonl.gz"
ASSETS = ROOT / "demo" / "assets" / "sentiment-prefs"
# Shapes of the random model (random weights, no download): "tiny" is the CPU fixture; "smollm2-135m" is
# HuggingFaceTB/SmolLM2-135M's config.json (134.5M parameters); "qwen2.5-0.5b" is the GPU check's model.
ARCHS = {
    "tiny": dict(model_type="qwen2", vocab_size=8192, hidden_size=256, intermediate_size=768,
                 num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "smollm2-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         tie_word_embeddings=True, hidden_act="silu", rms_norm_eps=1e-5, rope_theta=100000.0,
                         max_position_embeddings=8192, initializer_range=0.041666666666666664,
                         attention_bias=False, mlp_bias=False),
    "qwen2.5-0.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         tie_word_embeddings=True),
}
SEED = 42


# ----------------------------------------------------------------------------------------------------------------
# The fixture: tokenizer, model, preference pairs


def synthetic_rows(n, max_length, seed=SEED):
    """Pairs of random words (about one token each) whose prompt+completion fills 0.5-1x max_length."""
    rng = random.Random(seed)
    words = "the a movie plot was is very so good great fine bad awful poor and it but I think you".split()
    say = lambda: " ".join(rng.choices(words, k=rng.randint(max(max_length // 4, 1), max(max_length // 2, 1))))  # noqa: E731
    return [{"prompt": say(), "chosen": " " + say(), "rejected": " " + say()} for _ in range(n)]


def preference_rows(data_choice="auto", max_length=256, n_max=4000):
    """Real preference text (HH, else the shipped assets), else seeded synthetic pairs. Rows get an explicit prompt,
    split by this project's data.extract_prompt, so both trainers see exactly the same prompt and completions."""
    import data
    from harness import datafiles

    if data_choice == "auto" and HH.exists():
        with gzip.open(HH, "rt") as f:
            rows, source = [json.loads(line) for line in f][:n_max], str(HH)
    elif data_choice == "auto" and ASSETS.exists():
        train, _ = datafiles.load_preference_dataset(str(ASSETS), eval_fraction=0)
        rows, source = train.to_list()[:n_max], str(ASSETS)
    else:
        rows = synthetic_rows(min(n_max, 1000), max_length)
        source = "synthetic random-word pairs" + ("" if data_choice == "synthetic" else
                                                 " (neither the HH file nor demo/assets/sentiment-prefs was found)")
    explicit = []
    for row in rows:
        if not isinstance(row["chosen"], str):
            raise SystemExit(f"compare_trl.py: {source} is conversational; this benchmark expects plain strings")
        if "prompt" in row:
            explicit.append({"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"]})
        else:
            prompt, chosen, rejected = data.extract_prompt(row["chosen"], row["rejected"])
            explicit.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return explicit, source


def train_tokenizer(rows, vocab_size):
    """A byte-level BPE (GPT-2/Qwen style) trained on the pairs' text, with EOS and a separate pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((r[k] for r in rows for k in ("prompt", "chosen", "rejected")), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>")


def build_fixture(work: Path, args):
    """Tokenizer + random model (--arch) in work/model; the first steps*batch_size pairs that no trainer drops
    (keep_start drops a pair whose prompt alone fills max_length) in work/ours.jsonl, and the same pairs in
    the order this project's loop visits them in work/trl.jsonl (TRL reads them sequentially). One epoch = the
    run."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    import data

    rows, source = preference_rows(args.data, args.max_length)
    arch = dict(ARCHS[args.arch])
    arch.setdefault("max_position_embeddings", max(args.max_length, 512))
    tokenizer = train_tokenizer(rows, min(arch["vocab_size"], 8192))
    config = AutoConfig.for_model(**arch, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
                                  pad_token_id=tokenizer.pad_token_id, attention_dropout=0.0)
    config.save_pretrained(work / "model")
    tokenizer.save_pretrained(work / "model")
    # the pairs are chosen with the tokenizer as both trainers load it: for a qwen2 model transformers loads it
    # as Qwen2Tokenizer, whose own pre-tokenizer merges "\n\n" into one token, so the counts differ
    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    n_pairs = args.steps * args.batch_size
    kept = []
    for row in rows:  # one row at a time: prepare_dataset raises DataError for a set whose rows are all dropped
        try:  # (scope "row": the lengths before the max_length cut; keep_start cuts the same tokens in both scopes)
            (ex,) = data.prepare_dataset([row], tokenizer, max_length=args.max_length, truncation_mode="keep_start",
                                         truncation_scope="row", verbose=False)
        except data.DataError:
            continue
        cut = len(ex["prompt_ids"]) + min(len(ex["chosen_ids"]), len(ex["rejected_ids"])) > args.max_length
        low, high = args.prompt_tokens or (0, args.max_length)
        if (cut or not args.cut_rows) and low <= len(ex["prompt_ids"]) <= high:
            kept.append(row)  # --cut_rows: both sequences of every pair longer than max_length, so all rows are cut
        if len(kept) == n_pairs:
            break
    if len(kept) < n_pairs:
        raise SystemExit(f"compare_trl.py: only {len(kept)} usable pairs in {source}; lower --steps or --batch_size")
    examples = data.prepare_dataset(kept, tokenizer, max_length=args.max_length, truncation_mode="keep_start",
                                    truncation_scope="row", verbose=False)
    lengths = [len(e["prompt_ids"]) + max(len(e["chosen_ids"]), len(e["rejected_ids"])) for e in examples]
    # dpo.py's data order for epoch 0 (seed + epoch); if dpo.py ever changes it, the step-1 check below fails loudly
    order = torch.randperm(n_pairs, generator=torch.Generator().manual_seed(SEED)).tolist()
    for name, subset in (("ours", kept), ("trl", [kept[i] for i in order])):
        (work / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in subset))

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(work / "model")  # fp32: both trainers load it as float32 (TRL's default) and cast as set
    prompts = [len(e["prompt_ids"]) for e in examples]
    return {"source": source, "pairs": n_pairs, "params": sum(p.numel() for p in model.parameters()),
            "mean_tokens_per_row": sum(lengths) / len(lengths), "prompt_tokens": [min(prompts), max(prompts)],
            "truncated": sum(l > args.max_length for l in lengths)}


# ----------------------------------------------------------------------------------------------------------------
# The runs, each in a child process: `compare_trl.py --child spec.json`


def peak_memory_mib(device):
    """Peak CUDA memory allocated by tensors (what the issue asks), or the process's peak RSS on CPU."""
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def peak_reserved_mib(device):
    """Peak CUDA memory held by PyTorch's caching allocator: what the card must really have, plus the CUDA context."""
    import torch

    return torch.cuda.max_memory_reserved() / 2**20 if device == "cuda" else None


def start_heap_sampler(result):
    """--heap: the peak of the heap bytes in use (glibc's mallinfo2, every allocator arena; tensors included, code and
    the interpreter's own object arenas not), sampled every millisecond by a thread: the CPU counterpart of
    torch.cuda.max_memory_allocated. The thread costs both trainers the same small share of CPU time."""
    import ctypes
    import threading

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

    mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    mallinfo2.restype = MallInfo2
    result["peak_heap_mib"] = 0.0

    def sample():
        while True:
            m = mallinfo2()
            result["peak_heap_mib"] = max(result["peak_heap_mib"], (m.uordblks + m.hblkhd) / 2**20)
            time.sleep(0.001)

    threading.Thread(target=sample, daemon=True).start()


def current_memory_mib(device):
    import torch

    if device == "cuda":
        return torch.cuda.memory_allocated() / 2**20
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) / 1024


def tick(result):
    """The end of an optimizer step: wall-clock time, and this process's CPU time (which leaves out the time spent
    waiting for a core that another job holds)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()  # the step's kernels are done, not just queued (the same for both trainers)
    result["wall"].append(time.perf_counter())
    result["cpu"].append(time.process_time())


def run_ours(spec):
    """dpo.main() as a user runs it, with clocks attached from outside: the end of every optimizer step, the tokens
    of every training batch, the precompute pass; saving the model and plotting are skipped (TRL saves nothing either)."""
    sys.path.insert(0, str(ROOT))
    import dpo

    result = {"wall": [], "cpu": [], "tokens": [], "precompute_s": 0.0}
    in_loop = {"on": False}
    collate, make_optimizer, precompute = dpo.collate_batch, dpo.make_optimizer, dpo.precompute_reference

    def counting_collate(cfg, examples, pad_id):
        batch = collate(cfg, examples, pad_id)
        if in_loop["on"]:  # the precompute pass collates too, before the optimizer exists
            result["tokens"].append(int(batch["attention_mask"].sum()))
        return batch

    def clocked_make_optimizer(cfg, model):
        optimizer = make_optimizer(cfg, model)
        optimizer.register_step_post_hook(lambda *_: tick(result))
        result["memory_before_step1_mib"] = current_memory_mib(spec["device"])
        in_loop["on"] = True
        return optimizer

    def clocked_precompute(*a, **k):
        start = time.perf_counter()
        precompute(*a, **k)
        result["precompute_s"] += time.perf_counter() - start

    def done(cfg, model, tokenizer, out):  # replaces save_model: called right after the last step
        result["peak_memory_mib"], result["peak_reserved_mib"] = peak_memory_mib(spec["device"]), peak_reserved_mib(spec["device"])

    dpo.collate_batch, dpo.make_optimizer, dpo.precompute_reference = counting_collate, clocked_make_optimizer, clocked_precompute
    from harness import checkpoints, checks  # (harness/run.py's finish calls these after the last step)

    checkpoints.save_model, checks.plot_curves = done, lambda *a: None
    out = Path(spec["out"])
    argv = ["--model", spec["model"], "--dataset", spec["data_ours"], "--output_dir", str(out),
            "--max_steps", str(spec["steps"]), "--per_device_train_batch_size", str(spec["batch_size"]),
            "--per_device_eval_batch_size", str(spec["batch_size"]), "--gradient_accumulation_steps", "1",
            "--max_length", str(spec["max_length"]), "--truncation_mode", "keep_start",
            "--learning_rate", str(spec["learning_rate"]), "--lr_scheduler_type", "linear", "--warmup_steps", "0",
            "--weight_decay", "0", "--max_grad_norm", "1.0", "--optim", "adamw_torch", "--seed", str(SEED),
            "--bf16", str(spec["bf16"]), "--gradient_checkpointing", "False", "--disable_dropout", "True",
            "--beta", "0.1", "--loss_type", "sigmoid", "--eval_fraction", "0", "--logging_steps", "1",
            "--save_steps", "0", "--show_examples", "0", "--use_peft", str(spec["mode"] == "lora")]
    if spec["mode"] == "lora":
        argv += ["--lora_r", "16", "--lora_alpha", "32", "--lora_dropout", "0", "--lora_target_modules", "all-linear"]
    if spec["precompute"]:
        argv += ["--precompute_ref_log_probs"]
    argv += spec.get("extra_argv", [])  # later options win: gpu_check.py's QLoRA run adds its own
    dpo.main(dpo.options.parse_args(argv))
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    result.update(loss1=first["loss"], logps_chosen1=first["logps/chosen"])
    return result


def run_trl(spec):
    """TRL's DPOTrainer with the same settings; a callback clocks the end of every step, a wrapped collator counts
    the tokens of every batch."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    result = {"wall": [], "cpu": [], "tokens": []}

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            result["memory_before_step1_mib"] = current_memory_mib(spec["device"])

        def on_step_end(self, args, state, control, **kwargs):
            tick(result)

    lora = spec["mode"] == "lora"
    args = DPOConfig(
        output_dir=spec["out"], max_steps=spec["steps"], per_device_train_batch_size=spec["batch_size"],
        per_device_eval_batch_size=spec["batch_size"], gradient_accumulation_steps=1, max_length=spec["max_length"],
        truncation_mode="keep_start", learning_rate=spec["learning_rate"], lr_scheduler_type="linear", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch", seed=SEED, bf16=spec["bf16"],
        gradient_checkpointing=False, disable_dropout=True, beta=0.1, loss_type=["sigmoid"], logging_steps=1,
        save_strategy="no", eval_strategy="no", report_to="none", train_sampling_strategy="sequential",
        dataloader_num_workers=0, precompute_ref_log_probs=False,
        # like dpo.py: full fine-tuning keeps fp32 weights (bf16 in autocast); a LoRA base lives in the compute dtype
        model_init_kwargs={"dtype": torch.bfloat16 if (lora and spec["bf16"]) else torch.float32})
    peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                             task_type="CAUSAL_LM") if lora else None
    train = load_dataset("json", data_files=spec["data_trl"], split="train")
    trainer = DPOTrainer(model=spec["model"], args=args, train_dataset=train, peft_config=peft_config,
                         callbacks=[Clock()])
    collator = trainer.data_collator

    def counting_collator(features):
        batch = collator(features)
        result["tokens"].append(int(batch["attention_mask"].sum()))
        return batch

    trainer.data_collator = counting_collator
    trainer.train()
    result["peak_memory_mib"], result["peak_reserved_mib"] = peak_memory_mib(spec["device"]), peak_reserved_mib(spec["device"])
    first = trainer.state.log_history[0]
    result.update(loss1=first["loss"], logps_chosen1=first["logps/chosen"])
    return result


def child(spec_file):
    import torch

    spec = json.loads(Path(spec_file).read_text())
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    if spec["device"] == "cuda":
        torch.cuda.reset_peak_memory_stats()
    heap = {}
    if spec.get("heap"):
        start_heap_sampler(heap)
    result = run_ours(spec) if spec["trainer"] == "ours" else run_trl(spec)
    result.update(heap)
    Path(spec["result"]).write_text(json.dumps(result))


def launch(spec, work: Path, tag: str):
    """One run in a fresh interpreter; returns its measurements, with throughput over the steps after warm-up."""
    spec = dict(spec, out=str(work / f"out-{tag}"), result=str(work / f"result-{tag}.json"))
    shutil.rmtree(spec["out"], ignore_errors=True)  # a fresh folder: dpo.py would reuse a cached precompute there
    Path(spec["result"]).unlink(missing_ok=True)
    (work / f"spec-{tag}.json").write_text(json.dumps(spec))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_CACHE=str(work / "hf-cache"), TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    if spec["device"] == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    if spec["threads"]:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(spec["threads"])
    log = work / f"log-{tag}.txt"
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, __file__, "--child", str(work / f"spec-{tag}.json")], stdout=f,
                              stderr=subprocess.STDOUT, env=env, cwd=work)
    if proc.returncode:
        raise SystemExit(f"compare_trl.py: run {tag} failed (exit {proc.returncode}); its last lines:\n"
                         + "\n".join(log.read_text().splitlines()[-30:]))
    r = json.loads(Path(spec["result"]).read_text())
    w, n, k = spec["warmup"], spec["steps"], spec.get("accumulation", 1)
    if len(r["wall"]) != n or len(r["tokens"]) < n * k:
        raise SystemExit(f"compare_trl.py: run {tag}: {len(r['wall'])} step clocks and {len(r['tokens'])} "
                         f"batches for {n} steps of {k} micro-batches; see {log}")
    tokens = sum(r["tokens"][w * k:n * k])  # steps w+1 .. n, each timed from the end of the one before
    out = {"peak_mib": r["peak_memory_mib"], "peak_reserved_mib": r["peak_reserved_mib"], "peak_heap_mib": r.get("peak_heap_mib"),
           "before_step1_mib": r["memory_before_step1_mib"],
           "tokens_per_step": [sum(r["tokens"][i * k:(i + 1) * k]) for i in range(n)], "loss1": r.get("loss1"),
           "logps_chosen1": r.get("logps_chosen1"), "precompute_s": r.get("precompute_s")}
    for clock in ("wall", "cpu"):
        out[f"step_s_{clock}"] = [b - a for a, b in zip(r[clock][w - 1:n - 1], r[clock][w:n])]
        out[f"tokens_per_s_{clock}"] = tokens / sum(out[f"step_s_{clock}"])
        out[f"s_per_step_{clock}"] = sum(out[f"step_s_{clock}"]) / (n - w)
    return out


# ----------------------------------------------------------------------------------------------------------------


def summarise(runs, clock, warmup):
    """Each timed step's best time over the repeats (as timeit does: other load only ever adds time; every repeat
    sees the same batches), summed; and the median peak memory."""
    out = {}
    first = runs[0]
    tokens = sum(first["tokens_per_step"][warmup:])
    for c in ("wall", "cpu"):
        best = [min(times) for times in zip(*(r[f"step_s_{c}"] for r in runs))]
        out[f"tokens_per_s_{c}"], out[f"s_per_step_{c}"] = tokens / sum(best), sum(best) / len(best)
        out[f"each_run_tokens_per_s_{c}"] = [round(r[f"tokens_per_s_{c}"], 1) for r in runs]
        every = [t for r in runs for t in r[f"step_s_{c}"]]  # the spread: every timed step of every repeat
        out[f"step_range_{c}"] = [min(every), max(every)]
    out["tokens_per_s"], out["s_per_step"] = out[f"tokens_per_s_{clock}"], out[f"s_per_step_{clock}"]
    out["step_range"] = out[f"step_range_{clock}"]
    peaks = sorted(runs, key=lambda r: r["peak_mib"])
    median = peaks[len(peaks) // 2]
    return dict(out, peak_mib=median["peak_mib"], peak_reserved_mib=median["peak_reserved_mib"], peak_heap_mib=median["peak_heap_mib"],
                before_step1_mib=first["before_step1_mib"],
                tokens_per_step=first["tokens_per_step"], loss1=first["loss1"], logps_chosen1=first["logps_chosen1"],
                precompute_s=min((r["precompute_s"] for r in runs), default=None) if first["precompute_s"] is not None else None)


def print_table(results, args, fixture, load, clock):
    memory = "peak CUDA MiB" if args.device == "cuda" else "peak RSS MiB"
    speed = "tokens/CPU-s" if clock == "cpu" else "tokens/s"
    # on CPU the other clock too: wall-clock beside CPU time (one thread), CPU time of all threads beside wall
    other = {"cpu": ("wall tokens/s", "tokens_per_s_wall"), "wall": ("tokens/CPU-s", "tokens_per_s_cpu")}
    other = other[clock] if args.device == "cpu" else None
    cols = ["mode", "run", speed, "x TRL", "s/step", "x TRL", "step min-max s"] + \
           ([other[0], "x TRL"] if other else []) + [memory, "x TRL"] + \
           (["peak heap MiB", "x TRL"] if args.heap else []) + ["step-1 loss", "step-1 logps/chosen"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for mode, rows in results.items():
        trl = rows["trl"]
        for name, label in (("trl", "TRL 1.16 DPOTrainer"), ("ours_concat", "dpo.py --prefix_sharing False (concatenated rows)"),
                            ("ours", "dpo.py (shared prompt, the default)"), ("ours_pre", "dpo.py shared + --precompute_ref_log_probs")):
            if name not in rows:
                continue
            r = rows[name]
            cells = [mode, label]
            keys = (("tokens_per_s", ".0f"), ("s_per_step", ".3f")) + (((other[1], ".0f"),) if other else ())
            for key, fmt in keys:
                cells += [f"{r[key]:{fmt}}", f"{r[key] / trl[key]:.2f}"]
                if key == "s_per_step":
                    cells.append(f"{r['step_range'][0]:.3f}-{r['step_range'][1]:.3f}")
            cells += [f"{r['peak_mib']:.0f}", f"{r['peak_mib'] / trl['peak_mib']:.2f}"]
            if args.heap:
                cells += [f"{r['peak_heap_mib']:.0f}", f"{r['peak_heap_mib'] / trl['peak_heap_mib']:.2f}"]
            cells += [f"{r['loss1']:.6f}", f"{r['logps_chosen1']:.4f}"]
            lines.append("| " + " | ".join(cells) + " |")
        if "ours_pre" in rows:
            pre, ours = rows["ours_pre"], rows["ours"]
            lines.append(f"| {mode} | precompute vs dpo.py: {pre['tokens_per_s'] / ours['tokens_per_s']:.2f}x {speed} "
                         f"({pre['tokens_per_s_wall'] / ours['tokens_per_s_wall']:.2f}x wall); the precompute pass itself: "
                         f"{pre['precompute_s']:.1f} s, not in the timed steps |" + " |" * (len(cols) - 2))
    print("\n" + "\n".join(lines))
    print(f"\n{speed}: tokens (sum of attention_mask over the 2B rows of a step) per "
          + ("second of the run's own CPU time (one thread; time spent waiting for a core held by another job does not "
             "count); wall tokens/s is per second of wall-clock time" if clock == "cpu" else "second of wall-clock time")
          + (f" (tokens/CPU-s: per second of the CPU time of all {args.threads} threads, spin-waits included)"
             if clock == "wall" and args.device == "cpu" else "")
          + f"; steps {args.warmup + 1}-{args.steps} of {args.steps} timed, each step's best time of {args.repeats} "
          "interleaved runs; step min-max: every timed step of every run, in the same clock.")
    print(f"settings: {args.batch_size} pairs/step, max_length {args.max_length} keep_start, "
          f"{'bf16 autocast' if args.bf16 else 'fp32'}, lr {args.learning_rate} linear, AdamW (adamw_torch), no gradient "
          f"checkpointing, no dropout, beta 0.1 sigmoid, LoRA r16 alpha32 all-linear; {args.threads or 'default'} CPU "
          f"thread(s) per run")
    print(f"model: random {ARCHS[args.arch]['model_type']} '{args.arch}', {fixture['params'] / 1e6:.2f}M "
          f"parameters; data: {fixture['pairs']} pairs from {fixture['source']}, "
          f"{fixture['mean_tokens_per_row']:.0f} tokens per row before truncation "
          f"({fixture['truncated']} pairs truncated), prompts of {fixture['prompt_tokens'][0]}-"
          f"{fixture['prompt_tokens'][1]} tokens")
    print(f"machine: {machine_name(args.device)}; load average (1 min) during the runs: {load}")


def machine_name(device):
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name()
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
    return f"{cpu}, {os.cpu_count()} cores"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per run (one epoch of steps*batch_size pairs)")
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of the timing")
    p.add_argument("--batch_size", type=int, default=8, help="pairs per step (2x rows per forward)")
    p.add_argument("--max_length", type=int, default=256, help="max tokens of prompt+completion")
    p.add_argument("--learning_rate", type=float, default=5e-5)
    p.add_argument("--modes", nargs="+", default=["full", "lora"], choices=["full", "lora"])
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda if available")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for both (GPU); default fp32")
    p.add_argument("--arch", default="tiny", choices=sorted(ARCHS),
                   help="shape of the random model: tiny (5.2M Qwen2), smollm2-135m (SmolLM2-135M's Llama), "
                        "qwen2.5-0.5b")
    p.add_argument("--data", default="auto", choices=["auto", "synthetic"],
                   help="auto: HH, else demo/assets/sentiment-prefs, else synthetic; synthetic: random-word pairs of "
                        "0.5-1x max_length tokens (for throughput on long rows)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads per run (default 1 on CPU: on a machine shared with other jobs, torch's threads "
                        "wait on each other and timings become noise; pass the core count on an idle machine)")
    p.add_argument("--repeats", type=int, default=2, help="interleaved repeats; each step's best time counts")
    p.add_argument("--no_precompute", action="store_true", help="skip the --precompute_ref_log_probs row")
    p.add_argument("--cut_rows", action="store_true", help="only pairs whose both sequences exceed max_length: every row is cut to it")
    p.add_argument("--prompt_tokens", type=int, nargs=2, metavar=("MIN", "MAX"),
                   help="only pairs whose prompt has MIN-MAX tokens (the prompt's share of a row sets how "
                        "much the shared prompt saves)")
    p.add_argument("--heap", action="store_true", help="CPU: also sample each run's peak heap bytes in use (glibc mallinfo2, "
                   "every ms in a thread), the counterpart of CUDA's max_memory_allocated")
    p.add_argument("--quick", action="store_true", help="smoke run: 4 steps, 1 warm-up, 1 repeat, max_length 128")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--workdir", help="keep the fixture and logs here (default: a temporary folder)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child)
    if args.quick:
        args.steps, args.warmup, args.repeats, args.max_length = 4, 1, 1, 128
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads is None and args.device == "cpu":
        args.threads = 1
    if args.heap and args.device != "cpu":
        raise SystemExit("compare_trl.py: --heap is for CPU runs (on a GPU the peak is torch.cuda.max_memory_allocated)")
    if args.bf16 and args.device != "cuda":
        raise SystemExit("compare_trl.py: --bf16 is for --device cuda (bf16 matrix products are slow on most CPUs)")
    if not 1 <= args.warmup < args.steps:
        raise SystemExit("compare_trl.py: need 1 <= --warmup < --steps (the first step is never timed)")
    clock = "cpu" if args.device == "cpu" and args.threads == 1 else "wall"

    sys.path.insert(0, str(ROOT))
    with tempfile.TemporaryDirectory(prefix="compare_trl-") as tmp:
        work = Path(args.workdir or tmp).resolve()
        work.mkdir(parents=True, exist_ok=True)
        start = time.time()
        fixture = build_fixture(work, args)
        print(f"fixture built in {time.time() - start:.0f} s: {fixture}", flush=True)
        base = dict(model=str(work / "model"), data_ours=str(work / "ours.jsonl"), data_trl=str(work / "trl.jsonl"),
                    steps=args.steps, warmup=args.warmup, batch_size=args.batch_size, max_length=args.max_length,
                    learning_rate=args.learning_rate, bf16=args.bf16, device=args.device, threads=args.threads,
                    heap=args.heap)
        names = ["ours", "ours_concat", "trl"] + ([] if args.no_precompute else ["ours_pre"])
        runs, loads = {m: {n: [] for n in names} for m in args.modes}, [os.getloadavg()[0]]
        for rep in range(args.repeats):
            for mode in args.modes:
                for name in names[rep % len(names):] + names[:rep % len(names)]:  # rotate who goes first
                    spec = dict(base, mode=mode, trainer="trl" if name == "trl" else "ours", precompute=name == "ours_pre",
                                extra_argv=["--prefix_sharing", "False"] if name == "ours_concat" else [])
                    r = launch(spec, work, f"{mode}-{name}-{rep}")
                    runs[mode][name].append(r)
                    loads.append(os.getloadavg()[0])
                    print(f"[{time.time() - start:4.0f} s] {mode:4} {name:11} repeat {rep}: "
                          f"{r['tokens_per_s_cpu']:6.0f} tokens/CPU-s {r['tokens_per_s_wall']:6.0f} tokens/s "
                          f"{r['s_per_step_wall']:.3f} s/step (steps {min(r['step_s_wall']):.3f}-"
                          f"{max(r['step_s_wall']):.3f}), peak "
                          f"{r['peak_mib']:.0f} MiB (before step 1: {r['before_step1_mib']:.0f})"
                          + (f", peak heap {r['peak_heap_mib']:.0f} MiB" if r["peak_heap_mib"] is not None else "")
                          + f", loss1 {r['loss1']:.6f} "
                          f"logps/chosen {r['logps_chosen1']:.4f}"
                          + (f", precompute {r['precompute_s']:.1f} s" if name == "ours_pre" else ""), flush=True)
        results = {m: {n: summarise(rs, clock, args.warmup) for n, rs in by_name.items()} for m, by_name in runs.items()}
        load = f"{min(loads):.1f}-{max(loads):.1f} ({os.cpu_count()} cores)"
        print_table(results, args, fixture, load, clock)

        # The same batches (token counts) and the same numbers at step 1, or the comparison means nothing.
        tolerance = 1e-4 if not args.bf16 else 2e-2  # bf16: both round the logits to bf16, in different tile shapes
        problems = []
        for mode, rows in results.items():
            for name in names:
                if rows[name]["tokens_per_step"] != rows["trl"]["tokens_per_step"]:
                    problems.append(f"{mode} {name}: other batches than TRL ({rows[name]['tokens_per_step']} tokens per "
                                    f"step vs {rows['trl']['tokens_per_step']})")
                for key in ("loss1", "logps_chosen1"):
                    a, b = rows[name][key], rows["trl"][key]
                    if not abs(a - b) <= tolerance * max(1.0, abs(b)):
                        problems.append(f"{mode} {name}: step-1 {key} {a} vs TRL {b}")
        if args.json:
            Path(args.json).write_text(json.dumps({"machine": machine_name(args.device), "load": load, "clock": clock,
                                                   "fixture": fixture, "settings": vars(args), "results": results,
                                                   "agree_with_trl": not problems, "problems": problems}, indent=1))
        if problems:
            raise SystemExit("compare_trl.py: the runs do not match TRL:\n  " + "\n  ".join(problems))
        print(f"step-1 loss and logps/chosen agree with TRL (within {tolerance:g}, relative above 1), and every step saw "
              f"the same tokens. Total time {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
