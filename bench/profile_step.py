"""
Where the time of one training step goes, for dpo.py and for TRL's DPOTrainer, on compare_trl.py's fixture.

    python bench/profile_step.py                        # full fine-tuning, max_length 256, one thread
    python bench/profile_step.py --mode lora --ops 30   # LoRA, and a longer torch.profiler table

Prints dpo.py's step split into its parts (policy forward, backward, reference forward, clipping, optimizer) in CPU
time, then the torch.profiler operator table of one step of each trainer on the same batch (8 pairs).
"""
import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]


def ours(fixture, args, batch_rows):
    import data
    import dpo
    from transformers import AutoTokenizer

    cfg = dpo.parse_args(["--model", fixture["model"], "--dataset", fixture["data"], "--output_dir", fixture["out"],
                          "--max_length", str(args.max_length), "--truncation_mode", "keep_start", "--bf16", "False",
                          "--use_peft", str(args.mode == "lora"), "--eval_fraction", "0"])
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    examples = data.prepare_dataset(batch_rows, tokenizer, max_length=cfg.max_length, truncation_mode="keep_start", verbose=False)
    batch = dpo.collate_batch(cfg, examples, data.pad_token_id(tokenizer))
    print(f"batch: {tuple(batch['input_ids'].shape)} positions, {int(batch['attention_mask'].sum())} tokens, "
          f"{int(batch['completion_mask'].sum())} completion tokens")
    model = dpo.load_model(cfg, cfg.model, torch.device("cpu"), trainable=True)
    ref_model = None if cfg.use_peft else copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = dpo.make_optimizer(cfg, model)
    times = {}

    def timed(name, fn):
        start = time.process_time()
        out = fn()
        times.setdefault(name, []).append(time.process_time() - start)
        return out

    def step():
        per_token, _ = timed("policy forward (with LM head on completion tokens)", lambda: dpo.completion_logps(model, batch))
        timed("policy backward (LM head chunks recomputed)", lambda: per_token.sum().backward())
        with dpo.reference(model, ref_model) as ref:
            timed("reference forward", lambda: dpo.completion_logps(ref, batch))
        params = [p for p in model.parameters() if p.requires_grad]
        timed("clip_grad_norm_", lambda: torch.nn.utils.clip_grad_norm_(params, 1.0))
        timed("optimizer step + zero_grad", lambda: (optimizer.step(), optimizer.zero_grad(set_to_none=True)))

    for _ in range(args.repeats):
        step()
    print(f"\ndpo.py, {args.mode}: best CPU time of {args.repeats} steps per part")
    for name, ts in times.items():
        print(f"  {name:52s} {1000 * min(ts):7.1f} ms")
    print(f"  {'total':52s} {1000 * sum(min(ts) for ts in times.values()):7.1f} ms")
    return lambda: dpo.dpo_step(cfg, model, ref_model, batch)[0].backward()


def trl(fixture, args):
    from datasets import load_dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    config = DPOConfig(output_dir=fixture["out"], per_device_train_batch_size=8, max_length=args.max_length,
                       truncation_mode="keep_start", bf16=False, gradient_checkpointing=False, report_to="none",
                       train_sampling_strategy="sequential", optim="adamw_torch")
    peft_config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM") if args.mode == "lora" else None
    trainer = DPOTrainer(model=fixture["model"], args=config, peft_config=peft_config,
                         train_dataset=load_dataset("json", data_files=fixture["data"], split="train"))
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    return lambda: trainer.compute_loss(trainer.model, batch).backward()


def profile(name, step, rows):
    from torch.profiler import ProfilerActivity, profile as torch_profile

    step()  # warm-up
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    print(f"\n{name}: one forward+backward (no optimizer step), operators by self CPU time")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main():
    import compare_trl

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    p.add_argument("--mode", default="full", choices=["full", "lora"])
    p.add_argument("--max_length", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--ops", type=int, default=15, help="rows of each operator table")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        fixture_args = argparse.Namespace(arch="tiny", data="auto", steps=1, batch_size=8, max_length=args.max_length)
        compare_trl.build_fixture(work, fixture_args)
        fixture = {"model": str(work / "model"), "data": str(work / "trl.jsonl"), "out": str(work / "out")}
        rows = [json.loads(line) for line in open(fixture["data"])]
        profile("dpo.py", ours(fixture, args, rows), args.ops)
        profile("TRL 1.16 DPOTrainer", trl(fixture, args), args.ops)


if __name__ == "__main__":
    main()
