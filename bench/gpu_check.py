"""
The two GPU checks of bench/gpu_check.sh, one part per call so the script can put a time limit on each:

    python bench/gpu_check.py qlora RESULT.json [--tiny]   # (a) QLoRA DPO of a Llama-3.1-8B-sized model through dpo.py
    python bench/gpu_check.py trl RESULT.json [--tiny]     # (b) full bf16 DPO of a Qwen2.5-0.5B-sized model, ours vs TRL

Each part adds its results under its own key of RESULT.json. Nothing is downloaded: the models are random weights of
the real architectures, built from their configs; the text is random words through dpo.py's own data path (a
word-level tokenizer, one token per word, so the lengths are exact). --tiny shrinks everything to run on a CPU in a
couple of minutes, to prove the script end to end where no GPU is at hand.
"""
import argparse
import gc
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Peak dense bf16 tensor-core FLOPS by GPU name (spec sheets' numbers without 2:4 sparsity), for the MFU figure.
# Matched as substrings of torch.cuda.get_device_name(), most specific first; an unknown GPU gets no MFU.
PEAK_BF16_DENSE_FLOPS = [("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12),
                         ("B200", 2250e12), ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12), ("A10G", 70e12),
                         ("A10", 125e12), ("RTX 4090", 165e12), ("RTX 3090", 71e12)]


def gpu_peak_flops(name: str):
    """(the GPU's name, its peak dense bf16 FLOPS or None): from --peak_tflops, else the table above."""
    override = os.environ.get("GPU_PEAK_TFLOPS")
    if override:
        return float(override) * 1e12
    return next((flops for key, flops in PEAK_BF16_DENSE_FLOPS if key in name), None)
QLORA_TARGET_GIB = 12.0

LLAMA_31_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                   num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072, rope_theta=500000.0,
                   rms_norm_eps=1e-5, tie_word_embeddings=False)
LLAMA_TINY = dict(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False)


def word_tokenizer(n_words):
    """Whitespace word-level tokenizer over w0..w{n-1}: one token per word, EOS and pad as special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<unk>", "</s>"] + [f"w{i}" for i in range(n_words)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


def long_pairs(path, n, max_length, n_words, seed=0):
    """n pairs whose prompt+completion is 0.8-1.1x max_length tokens: the long-context worst case, some truncated."""
    rng = random.Random(seed)
    say = lambda k: " ".join(f"w{rng.randrange(n_words)}" for _ in range(k))  # noqa: E731
    rows = [{"prompt": say(max_length // 2), "chosen": " " + say(rng.randint(3 * max_length // 10, 6 * max_length // 10)),
             "rejected": " " + say(rng.randint(3 * max_length // 10, 6 * max_length // 10))} for _ in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def part_qlora(work: Path, tiny: bool):
    """(a) dpo.py --load_in_4bit on a random Llama-3.1-8B-sized model saved in bf16: one pair per micro-batch,
    8 micro-batches per step, gradient checkpointing, max_length 1024. Peak CUDA memory must stay <= 12 GiB."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    import compare_trl

    device = "cpu" if tiny else "cuda"
    max_length, accumulation, steps, warmup = (64, 2, 3, 1) if tiny else (1024, 8, 4, 1)
    n_words = 1000 if tiny else 32000
    start = time.time()
    tokenizer = word_tokenizer(n_words)
    config = LlamaConfig(**(LLAMA_TINY if tiny else LLAMA_31_8B), bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.device(device):  # initialised in place, in bf16: 16 GB on the GPU instead of minutes on the CPU
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(work / "llama", max_shard_size="5GB")
    tokenizer.save_pretrained(work / "llama")
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    long_pairs(work / "long.jsonl", steps * accumulation, max_length, n_words)
    build_s = time.time() - start
    print(f"[qlora] random {n_params / 1e9:.2f}B-parameter Llama saved in {build_s:.0f} s", flush=True)

    spec = dict(model=str(work / "llama"), data_ours=str(work / "long.jsonl"), data_trl=None, steps=steps, warmup=warmup,
                batch_size=1, max_length=max_length, learning_rate=1e-4, bf16=device == "cuda", device=device,
                threads=None, mode="lora", trainer="ours", precompute=False, accumulation=accumulation,
                extra_argv=["--load_in_4bit", "--gradient_accumulation_steps", str(accumulation),
                            "--gradient_checkpointing", "True"])
    r = compare_trl.launch(spec, work, "qlora")
    peak_gib = r["peak_mib"] / 1024
    return {"model": f"random Llama-3.1-8B-sized ({n_params / 1e9:.2f}B parameters)" if not tiny else "tiny Llama (smoke)",
            "settings": f"dpo.py --load_in_4bit (NF4, double quantisation, LoRA r16 all-linear), per_device_train_batch_size 1, "
                        f"gradient_accumulation_steps {accumulation}, gradient_checkpointing, max_length {max_length}, "
                        f"{'bf16' if device == 'cuda' else 'fp32'}, {steps} steps ({warmup} warm-up not timed)",
            "peak_memory_gib": round(peak_gib, 3), "target_gib": QLORA_TARGET_GIB, "fits_target": peak_gib <= QLORA_TARGET_GIB,
            "peak_reserved_gib": None if r["peak_reserved_mib"] is None else round(r["peak_reserved_mib"] / 1024, 3),
            "tokens_per_s": round(r["tokens_per_s_wall"], 1), "s_per_step": round(r["s_per_step_wall"], 3),
            "tokens_per_step": r["tokens_per_step"], "step1_loss": r["loss1"], "build_and_save_s": round(build_s, 1)}


def part_trl(work: Path, tiny: bool):
    """(b) bench/compare_trl.py, full fine-tuning in bf16 autocast of a random Qwen2.5-0.5B-sized model: TRL, ours
    with concatenated rows, ours with the shared prompt (the default), and with precomputed reference log-probs,
    plus model FLOPs utilisation against the peak of the GPU it ran on."""
    out = work / "compare_trl.json"
    if tiny:
        argv = ["--device", "cpu", "--arch", "tiny", "--max_length", "128", "--batch_size", "4", "--steps", "4", "--warmup", "1"]
    else:
        argv = ["--device", "cuda", "--bf16", "--arch", "qwen2.5-0.5b", "--max_length", "1024", "--batch_size", "8",
                "--steps", "10", "--warmup", "3"]
    out.unlink(missing_ok=True)
    subprocess.run([sys.executable, str(HERE / "compare_trl.py"), *argv, "--data", "synthetic", "--modes", "full",
                    "--repeats", "1", "--json", str(out), "--workdir", str(work / "compare_trl")])
    report = json.loads(out.read_text())  # written even when the step-1 numbers disagree (listed in "problems")
    n, gpu = report["fixture"]["params"], report["machine"]
    peak = gpu_peak_flops(gpu)
    runs = {}
    for name, r in report["results"]["full"].items():
        # Model FLOPs per token (no attention term, recomputation not counted): policy forward+backward 6N, plus the
        # reference forward 2N unless its log-probs were precomputed.
        flops_per_token = 6 * n + (0 if name == "ours_pre" else 2 * n)
        runs[name] = {"tokens_per_s": round(r["tokens_per_s_wall"], 1), "s_per_step": round(r["s_per_step_wall"], 4),
                      "peak_memory_gib": round(r["peak_mib"] / 1024, 3),
                      "peak_reserved_gib": None if r["peak_reserved_mib"] is None else round(r["peak_reserved_mib"] / 1024, 3),
                      "mfu": None if peak is None else round(flops_per_token * r["tokens_per_s_wall"] / peak, 4),
                      "step1_loss": r["loss1"], "step1_logps_chosen": r["logps_chosen1"]}
        if name != "trl":
            runs[name].update(tokens_per_s_x_trl=round(r["tokens_per_s_wall"] / report["results"]["full"]["trl"]["tokens_per_s_wall"], 3),
                              peak_memory_x_trl=round(r["peak_mib"] / report["results"]["full"]["trl"]["peak_mib"], 3))
    return {"model": f"random Qwen2.5-0.5B-sized ({n / 1e6:.0f}M parameters, tied embeddings)" if not tiny else "tiny Qwen2 (smoke)",
            "settings": " ".join(argv) + " --data synthetic --modes full",
            "gpu": gpu, "peak_bf16_dense_flops": peak,
            "mfu_formula": "(6N + 2N) * tokens/s / peak with the reference forward, 6N * tokens/s / peak with "
                           "precomputed reference log-probs; N = all parameters (tied embedding counted once), "
                           "tokens = sum of attention_mask over the concatenated rows for every run (so the shared-"
                           "prompt runs, which compute each prompt once, show an effective MFU: work done for the "
                           "user per second), attention FLOPs not counted; peak = the GPU's dense bf16 figure "
                           "(GPU_PEAK_TFLOPS overrides; unknown GPU: no MFU)",
            "agree_with_trl": report["agree_with_trl"], "problems": report["problems"], "runs": runs}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    p.add_argument("part", choices=["qlora", "trl"])
    p.add_argument("result", help="JSON file the part's results are merged into")
    p.add_argument("--tiny", action="store_true", help="tiny sizes on CPU: prove the script end to end")
    p.add_argument("--workdir", default=None, help="scratch folder (default: next to the result file)")
    args = p.parse_args()
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(HERE.parent))
    result_file = Path(args.result).resolve()
    work = Path(args.workdir or result_file.parent / f"gpu_check_work/{args.part}").resolve()
    work.mkdir(parents=True, exist_ok=True)
    start = time.time()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("stopped by gpu_check.sh's time limit"))
    try:
        part = (part_qlora if args.part == "qlora" else part_trl)(work, args.tiny)
    except BaseException as err:  # recorded, so that the other part's results still come back
        part = {"error": f"{type(err).__name__}: {err}"}
        raise
    finally:
        part["seconds"] = round(time.time() - start, 1)
        results = json.loads(result_file.read_text()) if result_file.exists() else {}
        results[args.part] = part
        result_file.write_text(json.dumps(results, indent=1))
        print(json.dumps({args.part: part}, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
