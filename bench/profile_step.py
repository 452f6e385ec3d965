"""
Where the time and memory of one training step go, for dpo.py and for TRL's DPOTrainer, on compare_trl.py's
fixture.

    python bench/profile_step.py                       # full fine-tuning, 8 pairs, max_length 256, one thread
    python bench/profile_step.py --mode lora --ops 30  # LoRA, and a longer torch.profiler table
    python bench/profile_step.py --arch smollm2-135m --batch_size 2 --cut_rows --prompt_tokens 85 199 \
        --repeats 2                                    # the SmolLM2-135M shape of bench/README.md

Prints dpo.py's step split into its parts (reference forward, policy forward, backward, clipping,
optimizer) in CPU time, with the heap each part holds at its peak; then, for one forward+backward of each
trainer on the same batch, the torch.profiler operator table and the CPU time of every operator in four
groups: the LM head (every operator on a vocabulary-wide tensor: the projection, log-softmax and their
backward), the decoder's matrix products, attention, and the rest.
"""
import argparse
import copy
import functools
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
TRL_VOCAB_TILE = 32768  # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE: vocabulary width of TRL's head tiles


@functools.cache
def _mallinfo2():
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

    mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    mallinfo2.restype = MallInfo2
    return mallinfo2


def heap_mib():
    """Heap bytes in use now (glibc mallinfo2: every arena, tensors included), as compare_trl.py's --heap."""
    m = _mallinfo2()()
    return (m.uordblks + m.hblkhd) / 2**20


def peak_heap(fn):
    """fn()'s result, and the most heap it held above what was in use when it started (sampled every ms)."""
    import threading

    start, peak, done = heap_mib(), [0.0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], heap_mib())
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out = fn()
    done.set()
    thread.join()
    return out, max(peak[0], heap_mib()) - start


def ours(fixture, args, batch_rows):
    import data
    import dpo
    from transformers import AutoTokenizer

    cfg = dpo.options.parse_args(["--model", fixture["model"], "--dataset", fixture["data"],
                          "--output_dir", fixture["out"], "--max_length", str(args.max_length),
                          "--truncation_mode", "keep_start", "--bf16", "False",
                          "--use_peft", str(args.mode == "lora"), "--eval_fraction", "0"])
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    examples = data.prepare_dataset(batch_rows, tokenizer, max_length=cfg.max_length,
                                    truncation_mode="keep_start", verbose=False)
    batch = dpo.collate_batch(cfg, examples, data.pad_token_id(tokenizer))
    shared = batch.get("shared_input_ids", batch["input_ids"])
    print(f"batch: {tuple(batch['input_ids'].shape)} concatenated positions, "
          f"{int(batch['attention_mask'].sum())} tokens, {int(batch['completion_mask'].sum())} completion "
          "tokens; "
          f"shared-prompt rows {tuple(shared.shape)}")
    model = dpo.load_model(cfg, cfg.model, torch.device("cpu"), trainable=True)
    ref_model = None if cfg.use_peft else copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = dpo.make_optimizer(cfg, model)
    params = [p for p in model.parameters() if p.requires_grad]

    def reference_forward(state):
        with dpo.reference(model, ref_model) as ref:
            state["ref"] = dpo.completion_logps(ref, batch)[0]

    def policy_forward(state):
        state["lp"] = dpo.completion_logps(model, batch)[0]

    parts = {  # dpo_step's order: the reference first, its activations gone before the policy's are kept
        "reference forward": reference_forward,
        "policy forward (LM head on completion tokens)": policy_forward,
        "policy backward (LM head chunks recomputed)": lambda s: s.pop("lp").sum().backward(),
        "clip_grad_norm_": lambda s: torch.nn.utils.clip_grad_norm_(params, 1.0),
        "optimizer step + zero_grad": lambda s: (optimizer.step(), optimizer.zero_grad(set_to_none=True)),
    }
    times, peaks = {}, {}
    for repeat in range(args.repeats + 1):  # the last pass measures memory, with the heap sampler running
        state = {}
        for name, part in parts.items():
            if repeat < args.repeats:
                start = time.process_time()
                part(state)
                times.setdefault(name, []).append(time.process_time() - start)
            else:
                peaks[name] = peak_heap(lambda: part(state))[1]
    print(f"\ndpo.py, {args.mode}: best CPU time of {args.repeats} steps per part ({args.threads} thread(s));"
          " "
          "the most heap each part held above what was in use when it started")
    for name, ts in times.items():
        print(f"  {name:52s} {1000 * min(ts):8.1f} ms  {peaks[name]:7.0f} MiB")
    print(f"  {'total':52s} {1000 * sum(min(ts) for ts in times.values()):8.1f} ms")
    print(f"  state: weights {_mib(params)} MiB, the same again in gradients, twice in AdamW's moments; "
          f"reference copy {_mib(ref_model.parameters()) if ref_model is not None else 0} MiB")
    return lambda: dpo.dpo_step(cfg, model, ref_model, batch)[0].backward()


def _mib(params):
    return round(sum(p.numel() * p.element_size() for p in params) / 2**20)


def trl(fixture, args):
    from datasets import load_dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    config = DPOConfig(output_dir=fixture["out"], per_device_train_batch_size=args.batch_size,
                       max_length=args.max_length, truncation_mode="keep_start", bf16=False,
                       gradient_checkpointing=False, report_to="none", train_sampling_strategy="sequential",
                       optim="adamw_torch", disable_dropout=True)
    peft_config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                             task_type="CAUSAL_LM") if args.mode == "lora" else None
    trainer = DPOTrainer(model=fixture["model"], args=config, peft_config=peft_config,
                         train_dataset=load_dataset("json", data_files=fixture["data"], split="train"))
    batch = next(iter(trainer.get_train_dataloader()))
    print(f"\nTRL batch: {tuple(batch['input_ids'].shape)} positions, "
          f"{int(batch['attention_mask'].sum())} tokens")
    trainer.model.train()
    return lambda: trainer.compute_loss(trainer.model, batch).backward()


def group(name, shapes, vocab_widths):
    """Which part of the step an operator belongs to, by its name and the shapes of its tensors."""
    if "embedding" not in name and any(d in vocab_widths for shape in shapes for d in shape):
        return "LM head (vocabulary-wide: projection, log-softmax, backward)"
    if name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"):
        return "decoder matrix products"
    if "attention" in name or "softmax" in name:  # sdpa, or the eager path's softmax on [.., T, T]
        return "attention"
    return "the rest (norms, activations, rotary, copies)"


def cpu_time_by_group(step, vocab):
    """The CPU time (all threads) of every aten operator of one step, summed by group(). The profiler's own
    times are wall-clock: on a machine shared with other jobs they count the time spent waiting for a core."""
    from torch.utils._pytree import tree_flatten
    from torch.utils._python_dispatch import TorchDispatchMode

    vocab_widths = {vocab, min(vocab, TRL_VOCAB_TILE), vocab % TRL_VOCAB_TILE} - {0}
    groups = {}

    class Clock(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            start = time.process_time()
            out = func(*args, **(kwargs or {}))
            tensors = tree_flatten((args, kwargs))[0]
            shapes = [t.shape for t in tensors if isinstance(t, torch.Tensor)]
            key = group(f"aten::{func.overloadpacket.__name__}", shapes, vocab_widths)
            groups[key] = groups.get(key, 0.0) + time.process_time() - start
            return out

    start = time.process_time()
    with Clock():
        step()
    outside = time.process_time() - start - sum(groups.values())
    groups["outside the operators (Python, autograd engine)"] = outside
    return groups


def profile(name, step, rows, vocab):
    from torch.profiler import ProfilerActivity, profile as torch_profile

    step()  # warm-up
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    print(f"\n{name}: one forward+backward (no optimizer step), operators by self time (wall-clock)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))
    groups = cpu_time_by_group(step, vocab)
    total = sum(groups.values())
    print(f"{name}: CPU time of one forward+backward by part, {total:.2f} s in all")
    for key, seconds in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"  {key:60s} {seconds:7.2f} s  {100 * seconds / total:5.1f}%")


def main():
    import compare_trl

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", default="full", choices=["full", "lora"])
    p.add_argument("--arch", default="tiny", choices=sorted(compare_trl.ARCHS), help="as compare_trl.py")
    p.add_argument("--batch_size", type=int, default=8, help="pairs in the profiled batch")
    p.add_argument("--max_length", type=int, default=256)
    p.add_argument("--cut_rows", action="store_true", help="as compare_trl.py: every row cut to max_length")
    p.add_argument("--prompt_tokens", type=int, nargs=2, metavar=("MIN", "MAX"), help="as compare_trl.py")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--ops", type=int, default=15, help="rows of each operator table")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        fixture_args = argparse.Namespace(arch=args.arch, data="auto", steps=1, batch_size=args.batch_size,
                                          max_length=args.max_length, cut_rows=args.cut_rows,
                                          prompt_tokens=args.prompt_tokens)
        print(compare_trl.build_fixture(work, fixture_args))
        fixture = {"model": str(work / "model"), "data": str(work / "trl.jsonl"), "out": str(work / "out")}
        rows = [json.loads(line) for line in open(fixture["data"])]
        vocab = compare_trl.ARCHS[args.arch]["vocab_size"]
        steps = {"dpo.py": ours(fixture, args, rows)}
        steps["TRL 1.16 DPOTrainer"] = trl(fixture, args)
        for name, step in steps.items():
            profile(name, step, args.ops, vocab)
        print()
        for name, step in steps.items():  # gradients already allocated: activations and the step's transients
            held = peak_heap(step)[1]
            print(f"{name}: one forward+backward held at most {held:.0f} MiB of heap above what "
                  "was in use when it started (gradients already allocated)")


if __name__ == "__main__":
    main()
