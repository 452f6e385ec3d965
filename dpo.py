"""
Direct Preference Optimization on one GPU, in one file that reads top to bottom.

    python dpo.py                                   # the shipped tiny demo: offline, CPU, about two minutes
    python dpo.py --model Qwen/Qwen2.5-0.5B-Instruct --dataset trl-lib/ultrafeedback_binarized
    python dpo.py --model meta-llama/Llama-3.1-8B-Instruct --dataset ... --load_in_4bit   # QLoRA on 12-24 GB

DPO (Rafailov et al. 2023, arXiv:2305.18290) trains a policy pi_theta on pairs (x, y_w, y_l) to raise the
implicit reward  r(x, y) = beta * log pi_theta(y|x) / pi_ref(y|x)  of the preferred completion y_w above that of
y_l, with the loss of Eq. 7:  -log sigmoid(r(x, y_w) - r(x, y_l)).  Everything the algorithm needs is here:
the reference model (4 ways to get it), the concatenated forward pass that scores chosen and rejected
completions in one call, the loss (losses.py), and a plain PyTorch training loop. Option names, loss formulas
and metric names are those of Hugging Face TRL's DPOTrainer, so numbers can be compared.

Read in this order: losses.py (the formulas), data.py (what a batch is), then this file from `main()`.
"""
import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import signal
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

import data
import losses
from harness import checkpoints, checks, models, options, trackers
from harness.errors import RunError
from harness.options import DEMO_DATASET, Config
from speedups import prefix_sharing

# ----------------------------------------------------------------------------------------------------------------
# Model and reference


@models.quiet_library_notices()
def load_model(cfg: Config, name: str, device: torch.device, trainable: bool):
    """AutoModelForCausalLM, in 4-bit NF4 for QLoRA. The policy and a reference loaded here get the same dtypes
    (full fine-tuning: fp32 masters; LoRA: the frozen base in the compute dtype), so that a reference with the
    policy's weights computes exactly what the policy computes at step 0."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    compute_dtype = torch.bfloat16 if cfg.bf16 else torch.float32
    quantization = None
    if cfg.load_in_4bit:  # QLoRA (Dettmers et al. 2023, arXiv:2305.14314): NF4 + double quantisation
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=compute_dtype)
    if cfg.trust_remote_code:
        print(f"warning: --trust_remote_code runs Python code from {name}; do this only for sources you trust")
    # Full fine-tuning keeps fp32 master weights (bf16 only in autocast); LoRA's frozen base can live in bf16. The
    # reference takes the policy's dtype: a bf16 copy of fp32 weights would differ from the policy before any step
    # (norms and embeddings run outside autocast), and TR-DPO's small updates would round away in bf16.
    dtype = torch.float32 if not cfg.use_peft else compute_dtype
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name, dtype=dtype, quantization_config=quantization, trust_remote_code=cfg.trust_remote_code,
            device_map={"": device} if quantization else None)
    except (OSError, ValueError) as err:  # no weights, unreadable weights, an architecture transformers lacks
        raise RunError(f"could not load the model {name} ({str(err).splitlines()[0]}); check that the folder "
                            "holds a causal language model saved with save_pretrained") from err
    if not quantization:
        model.to(device)
    if cfg.disable_dropout:
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    if cfg.load_in_4bit:  # the same preparation for a 4-bit reference, so that it matches the policy's dtypes
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=trainable and cfg.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
        # peft upcasts every non-4-bit weight to fp32 (the paper's stability advice for norms); the embedding and the
        # LM head are frozen and large (1B params on Llama-3-8B), so they go back to the compute dtype.
        for module in (model.get_input_embeddings(), model.get_output_embeddings()):
            module.to(compute_dtype)
        for module in model.modules():  # bitsandbytes on a CPU repacks 4-bit weights at the first eval-mode forward, for
            if hasattr(module, "support_avx512bf16_for_cpu"):  # a kernel with no backward: later gradients would be wrong
                module.support_avx512bf16_for_cpu = False
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
        models.check_head(model)  # refuse now a model whose log-probs this file would get wrong
    if not trainable:
        return model.eval().requires_grad_(False)
    if cfg.gradient_checkpointing and not cfg.load_in_4bit:  # (4-bit: enabled by the k-bit preparation above)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.use_peft:
        from peft import LoraConfig, get_peft_model

        targets = cfg.lora_target_modules[0] if cfg.lora_target_modules == ["all-linear"] else cfg.lora_target_modules
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=targets, task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)  # LoRA B starts at 0: at step 0 the policy *is* the reference
        if cfg.gradient_checkpointing:
            model.enable_input_require_grads()
    return model.train()


@contextlib.contextmanager
def reference(model, ref_model):
    """The reference model: a separate frozen model, or (LoRA) the policy itself with its adapters switched off."""
    with torch.no_grad():
        if ref_model is not None:
            yield ref_model
        else:
            with model.disable_adapter():  # the same weights minus LoRA: no second copy in memory
                yield model


# ----------------------------------------------------------------------------------------------------------------
# The concatenated forward pass: chosen and rejected rows of a batch go through the model in one call.


def completion_logps_naive(model, batch):
    """The readable reference: full log-softmax over the vocabulary at every position, then pick the next token.
    Memory is [2B, T, V] floats; `completion_logps` computes the same numbers without that tensor."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    logps = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # position t predicts token t+1
    token_logps = logps.gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return token_logps * batch["completion_mask"][:, 1:]  # [2B, T-1], zero outside completions


def _score_tokens(hidden, model, labels, with_wpo):
    """log p(label) = z_label - logsumexp(z), in fp32, for a chunk of hidden states [N, H]."""
    logits = models.logits_from_hidden(model, hidden)  # the LM head (and a family's own scale: models.py)
    log_z = logits.logsumexp(-1)
    token_logps = logits.gather(-1, labels[:, None]).squeeze(-1) - log_z
    logits_mean = logits.detach().mean(-1)  # for the logits/chosen|rejected metrics
    # WPO: log sum_v p_v^2 = logsumexp(2z) - 2 logsumexp(z), no gradient
    log_sum_sq = (2 * logits.detach()).logsumexp(-1) - 2 * log_z.detach() if with_wpo else logits_mean
    return token_logps, logits_mean, log_sum_sq


def completion_logps(model, batch, with_wpo=False, with_aux=False, chunk_tokens=256):
    """Per-token log-probs of the completion tokens, [2B, T-1], projecting only completion positions through the LM
    head, in chunks whose [N, V] logits are recomputed in backward rather than kept (the full-vocabulary logits are
    the largest tensor of a DPO step: 256 tokens x Llama-3's 128k vocabulary is 131 MB in fp32, and backward holds
    about four such tensors; a chunk of 1024 measured no faster on a CPU and would hold four times as much).
    Returns (token_logps, stats): stats for the metrics, WPO and the MoE aux_loss. With the batch's `shared_*`
    tensors (data.share_prompts) each pair's prompt is computed once, and the numbers are the same: every token
    sees the same tokens at the same positions."""
    mask = batch["completion_mask"][:, 1:].bool()
    where = mask.nonzero(as_tuple=True)  # (row, position) of every scored token
    labels, decoder = batch["input_ids"][:, 1:][where], model.get_decoder()
    router = {"output_router_logits": True} if with_aux else {}  # MoE: the decoder returns its routers' logits too
    if "shared_input_ids" in batch:  # same numbers, less work: each prompt once (speedups/prefix_sharing.py)
        hidden, out = prefix_sharing.hidden_states(decoder, model, batch), None
    else:  # the concatenated rows [prompt+chosen; prompt+rejected]
        out = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False, **router)
        hidden = out[0][:, :-1][where]
    pieces = []
    for start in range(0, max(len(labels), 1), chunk_tokens):  # at least one (possibly empty) chunk
        args = (hidden[start:start + chunk_tokens], model, labels[start:start + chunk_tokens], with_wpo)
        if torch.is_grad_enabled():  # keep only the hidden states; the chunk's logits are recomputed in backward
            pieces.append(torch.utils.checkpoint.checkpoint(_score_tokens, *args, use_reentrant=False))
        else:
            pieces.append(_score_tokens(*args))
    token_logps, logits_mean, log_sum_sq = (torch.cat(parts) for parts in zip(*pieces))
    per_token = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).index_put(where, token_logps)
    stats = {"logits_sum": torch.zeros(mask.shape[0], device=mask.device).index_add(0, where[0], logits_mean)}
    if with_wpo:
        stats["log_sum_sq"] = torch.zeros(mask.shape, device=mask.device).index_put(where, log_sum_sq)
    if with_aux:
        stats["aux_loss"] = models.router_aux_loss(model, out.router_logits, batch["attention_mask"])
    return per_token, stats


def sequence_logps(per_token, completion_mask, ld_alpha=None):
    """Sum of completion log-probs per row -> [2B]. LD-DPO (Liu et al. 2024, arXiv:2409.06411) down-weights by
    ld_alpha the tokens past the shorter completion of the pair, so length alone does not decide the margin."""
    if ld_alpha is None:
        return per_token.sum(1)
    mask = completion_mask[:, 1:]
    position = mask.cumsum(1)  # 1-based index of each completion token
    chosen_len, rejected_len = mask.sum(1).chunk(2)
    shared = torch.minimum(chosen_len, rejected_len).repeat(2)[:, None]
    return (per_token * (position <= shared)).sum(1) + ld_alpha * (per_token * (position > shared)).sum(1)


def dpo_step(cfg: Config, model, ref_model, batch):
    """One concatenated forward of policy (and reference), the loss, and the metrics of this micro-batch."""
    B = batch["input_ids"].shape[0] // 2
    mask = batch["completion_mask"][:, 1:]
    scored = mask.sum(1).clamp(min=1)  # scored tokens per row (the first token of a row is never scored)
    if cfg.reference_free:
        ref_logps = torch.zeros(2 * B, device=mask.device)
    elif cfg.precompute_ref_log_probs:  # computed once before training (or given in the data)
        ref_logps = torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]])
    else:  # the reference first: its activations are freed before the policy's are kept for backward (lower peak)
        with reference(model, ref_model) as ref:
            ref_logps = sequence_logps(completion_logps(ref, batch)[0], batch["completion_mask"], cfg.ld_alpha)
    coef = models.aux_loss_coef(cfg, model)
    per_token, stats = completion_logps(model, batch, with_wpo=cfg.use_weighting, with_aux=coef != 0)
    logps = sequence_logps(per_token, batch["completion_mask"], cfg.ld_alpha)
    lengths = batch["completion_mask"].sum(1).clamp(min=1)  # TRL's |y| for the length-normalised losses
    pair_weights = None
    if cfg.use_weighting:  # WPO (Zhou et al. 2024, arXiv:2406.11827, Eq. 2), no gradient through the weights
        w = torch.exp(((per_token.detach() - stats["log_sum_sq"]) * mask).sum(1) / scored)
        pair_weights = w[:B] * w[B:]
    nll_loss = -per_token[:B].sum() / mask[:B].sum().clamp(min=1)  # token-mean NLL of the chosen completions
    pair_losses, chosen_rewards, rejected_rewards = losses.dpo_loss(
        logps[:B], logps[B:], ref_logps[:B], ref_logps[B:], loss_type=cfg.loss_type, beta=cfg.beta,
        loss_weights=cfg.loss_weights, chosen_lengths=lengths[:B], rejected_lengths=lengths[B:],
        label_smoothing=cfg.label_smoothing, f_divergence_type=cfg.f_divergence_type,
        f_alpha_divergence_coef=cfg.f_alpha_divergence_coef, discopop_tau=cfg.discopop_tau, rpo_alpha=cfg.rpo_alpha,
        reference_free=cfg.reference_free, simpo_gamma=cfg.simpo_gamma, dpop_lambda=cfg.dpop_lambda,
        rdpo_alpha=cfg.rdpo_alpha, pair_weights=pair_weights, nll_loss=nll_loss)
    metrics = {  # TRL's names and formulas
        "rewards/chosen": chosen_rewards.mean(), "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": logps[:B].detach().mean(), "logps/rejected": logps[B:].detach().mean(),
        "logits/chosen": stats["logits_sum"][:B].sum() / scored[:B].sum(),
        "logits/rejected": stats["logits_sum"][B:].sum() / scored[B:].sum(),
    }
    if "sft" in cfg.loss_type or cfg.rpo_alpha:
        metrics["nll_loss"] = nll_loss.detach()
    loss = pair_losses.mean()
    if coef:  # MoE, as TRL: + coef * the policy's load-balancing loss (the reference's is never computed)
        loss = loss + coef * stats["aux_loss"]
        metrics["aux_loss"] = stats["aux_loss"]
    return loss, {k: v.detach() for k, v in metrics.items()}


@torch.no_grad()
def evaluate(cfg, model, ref_model, examples, pad_id, autocast):
    """The same loss and metrics on held-out pairs, with names prefixed eval_. As in TRL, eval_loss is the mean over
    pairs, and the other metrics the mean over batches (they differ when the last batch is smaller)."""
    was_training = model.training
    model.eval()
    totals, loss_sum, n_batches = {}, 0.0, 0
    for i in range(0, len(examples), cfg.per_device_eval_batch_size):
        chunk = examples[i:i + cfg.per_device_eval_batch_size]
        with autocast():
            loss, metrics = dpo_step(cfg, model, ref_model, to_device(collate_batch(cfg, chunk, pad_id), model.device))
        loss_sum += float(loss) * len(chunk)
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0.0) + float(v)
        n_batches += 1
    model.train(was_training)
    return {"eval_loss": loss_sum / len(examples), **{f"eval_{k}": v / n_batches for k, v in totals.items()}}


@torch.no_grad()
def precompute_reference(cfg, model, ref_model, examples, pad_id, autocast, name):
    """One pass of the reference over the data before training; its log-probs are stored in each example."""
    for i in tqdm(range(0, len(examples), cfg.per_device_eval_batch_size), desc=f"reference log-probs ({name})"):
        chunk = examples[i:i + cfg.per_device_eval_batch_size]
        batch = to_device(collate_batch(cfg, chunk, pad_id), model.device)
        with autocast(), reference(model, ref_model) as ref:
            logps = sequence_logps(completion_logps(ref, batch)[0], batch["completion_mask"], cfg.ld_alpha).cpu()
        for j, ex in enumerate(chunk):
            ex["ref_chosen_logps"], ex["ref_rejected_logps"] = float(logps[j]), float(logps[len(chunk) + j])


def collate_batch(cfg, examples, pad_id):
    batch = data.collate(examples, pad_id, cfg.max_length, cfg.truncation_mode, cfg.pad_to_multiple_of)
    shared = prefix_sharing.share_prompts(batch, pad_id, cfg.pad_to_multiple_of) if cfg.prefix_sharing else None
    return {**batch, **(shared or {})}


def to_device(batch, device):
    return {k: v.to(device) for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------------------------


def make_optimizer(cfg, model):
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]  # biases and norms
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optim == "rmsprop":  # the DPO paper's optimizer (App. B): as good as Adam, half the state
        return torch.optim.RMSprop(groups, lr=cfg.learning_rate)
    if cfg.optim == "paged_adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(groups, lr=cfg.learning_rate)
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(0.9, 0.999), eps=1e-8)


def lr_factor(schedule: str, step: int, warmup: int, total: int) -> float:
    """The peak learning rate's multiplier after `step` steps: linear warmup from 0 over `warmup` steps, then linear
    decay to 0 at `total`, half a cosine to 0, or constant. These are transformers' get_scheduler formulas (linear,
    cosine, constant_with_warmup), written out: importing transformers.optimization brings its trainer utilities
    with it (peft, bitsandbytes, networkx), which cost a full fine-tuning run 170 MiB of memory and 4 s of start-up."""
    if step < warmup:
        return step / max(1, warmup)
    if schedule == "linear":
        return max(0.0, (total - step) / max(1, total - warmup))
    if schedule == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((step - warmup) / max(1, total - warmup)))))
    return 1.0  # constant


def main(cfg: Config):
    torch.manual_seed(cfg.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    out = Path(cfg.output_dir)
    print(json.dumps(dataclasses.asdict(cfg), indent=1))
    checkpoint = checks.preflight(cfg)  # model paths, the output folder, what a resumed run may change: before anything heavy

    # ---- data: rows -> token ids (data.py); the same truncation for training, evaluation and precompute ----
    tokenizer = checks.load_tokenizer(cfg)  # (with --ref_model: checked to share its vocabulary)
    pad_id = data.pad_token_id(tokenizer)
    train_rows, eval_rows = data.load_preference_dataset(cfg.dataset, cfg.dataset_split, cfg.eval_split, cfg.eval_fraction, cfg.seed)
    limits = dict(max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
                  max_completion_length=cfg.max_completion_length, truncation_mode=cfg.truncation_mode,
                  truncation_scope=cfg.truncation_scope)
    train_set = data.prepare_dataset(train_rows, tokenizer, name="train", **limits)
    eval_set = data.prepare_dataset(eval_rows, tokenizer, name="eval", **limits) if eval_rows is not None else []
    checks.use_reference_columns(cfg, train_set, eval_set)
    for ex in train_set[:cfg.show_examples]:
        print(data.show_example(ex, tokenizer, cfg.max_length, cfg.truncation_mode))

    # ---- models: the policy, and the reference in one of four ways ----
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16)  # noqa: E731
    model = load_model(cfg, cfg.model, device, trainable=True)
    checks.check_positions("--model", model, train_set + eval_set, cfg)  # the longest sequence fits its position table
    ref_model = None  # LoRA: the policy with adapters off
    if cfg.ref_model or (not cfg.use_peft and not cfg.reference_free):
        if cfg.ref_model:
            ref_model = load_model(cfg, cfg.ref_model, device, trainable=False)
            checks.check_positions("--ref_model", ref_model, train_set + eval_set, cfg)
        else:  # a frozen copy of the policy at step 0, in the policy's own dtype (see load_model)
            ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    if cfg.prefix_sharing:  # on only where exact (speedups/prefix_sharing.py), else one line and the concatenated rows
        checked = (model, ref_model) if cfg.ref_model else (model,)  # (a copy of the policy is the same architecture)
        problem = next(filter(None, (prefix_sharing.problem(cfg, m, train_set + eval_set, pad_id, completion_logps)
                                     for m in checked)), None)
        if problem:
            print(f"prefix sharing off: {problem}; each pair is scored as two concatenated rows")
            cfg.prefix_sharing = False
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"trainable parameters: {n_train:,} of {checks.count_parameters(model):,}")
    checks.write_config(cfg, out, resumed=checkpoint is not None)  # only now that the options, data and models are good

    if cfg.precompute_ref_log_probs and "ref_chosen_logps" not in train_set[0]:  # (else: given in the data)
        # The cache is keyed on what the numbers depend on: the reference's weights themselves (not their path, which
        # iterative DPO overwrites with new weights), the dtype, the tokens and their truncation.
        key = hashlib.sha256(json.dumps([checks.weights_fingerprint(ref_model or model), cfg.ld_alpha, cfg.bf16, limits,
                                         [[e["prompt_ids"], e["chosen_ids"], e["rejected_ids"]] for e in train_set + eval_set]]).encode()).hexdigest()[:16]
        cache = out / f"ref_logps-{key}.safetensors"
        if cache.exists():
            cached = load_file(cache)
            for ex, c, r in zip(train_set + eval_set, cached["chosen"].tolist(), cached["rejected"].tolist()):
                ex["ref_chosen_logps"], ex["ref_rejected_logps"] = c, r
        else:
            precompute_reference(cfg, model, ref_model, train_set, pad_id, autocast, "train")
            precompute_reference(cfg, model, ref_model, eval_set, pad_id, autocast, "eval")
            both = train_set + eval_set
            save_file({"chosen": torch.tensor([e["ref_chosen_logps"] for e in both]),
                       "rejected": torch.tensor([e["ref_rejected_logps"] for e in both])}, cache)
        ref_model = None  # never run again: free its memory

    # ---- optimizer and schedule ----
    batches_per_epoch = math.ceil(len(train_set) / cfg.per_device_train_batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / cfg.gradient_accumulation_steps)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * steps_per_epoch)
    warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total_steps)
    optimizer = make_optimizer(cfg, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(cfg.lr_scheduler_type, s, warmup, total_steps))
    step, window, window_tokens, window_seconds = 0, {}, 0, 0.0  # the open logging window: metrics since the last log
    if checkpoint:  # a checkpoint holds the open window too, so that the next logged line equals an uninterrupted run's
        state = checkpoints.load_checkpoint(checkpoint, model, ref_model, optimizer, scheduler)
        step, window_tokens, window_seconds = state["global_step"], state.get("window_tokens", 0), state.get("window_seconds", 0.0)
        window = {k: [torch.tensor(x, device=device) for x in v] for k, v in state.get("window", {}).items()}
        checks.set_peak_learning_rate(scheduler, cfg.learning_rate)  # a --learning_rate changed on resume is applied
        print(f"resumed from {checkpoint} at step {step}")
    metrics_file = out / "metrics.jsonl"
    kept = [r for r in checkpoints.read_metrics(metrics_file) if r["step"] <= step]  # (a half-written last line dropped)
    metrics_file.write_text("".join(json.dumps(r) + "\n" for r in kept))  # a resumed run rewrites what came after its checkpoint
    tracker = trackers.start(cfg, step)  # --report_to: each record also goes there; closed in the loop's `finally`

    def log(record):
        with metrics_file.open("a") as f:
            f.write(json.dumps({"step": step, **record}) + "\n")
        trackers.log(tracker, record, step)

    def trainer_state():  # what a checkpoint needs besides the weights: the step, the open window, the options
        return {"global_step": step, "window": {k: [float(x) for x in v] for k, v in window.items()},
                "window_tokens": window_tokens, "window_seconds": window_seconds, "config": dataclasses.asdict(cfg)}

    # ---- the loop ----
    stop = {"signal": None}  # Ctrl-C (SIGINT) or a job scheduler's SIGTERM: finish the step, save, exit
    previous = {sig: signal.signal(sig, lambda sig, _: stop.update(signal=sig)) for sig in (signal.SIGINT, signal.SIGTERM)}
    bar = tqdm(total=total_steps, initial=step, desc="dpo", dynamic_ncols=True)
    last_checkpoint, trainable, shuffled_epoch = None, [p for p in model.parameters() if p.requires_grad], None
    try:
        while step < total_steps and stop["signal"] is None:
            epoch, offset = divmod(step, steps_per_epoch)
            if epoch != shuffled_epoch:  # each epoch's order depends only on (seed, epoch): a resumed run sees the same
                order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(cfg.seed + epoch)).tolist()
                micro = [order[i:i + cfg.per_device_train_batch_size] for i in range(0, len(order), cfg.per_device_train_batch_size)]
                shuffled_epoch = epoch
            step_start = time.time()  # tokens_per_second counts training time only, not evaluation or saving
            group = micro[offset * cfg.gradient_accumulation_steps:(offset + 1) * cfg.gradient_accumulation_steps]
            pairs_in_step = sum(len(ids) for ids in group)
            step_loss = 0.0
            for ids in group:
                batch = collate_batch(cfg, [train_set[i] for i in ids], pad_id)
                window_tokens += int(batch["attention_mask"].sum())
                batch = to_device(batch, device)
                with autocast():
                    loss, metrics = dpo_step(cfg, model, ref_model, batch)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"non-finite loss ({float(loss.detach())}) at step {step + 1}")
                # weight each micro-batch by its share of the step's pairs: k micro-batches = one batch k times larger
                (loss * len(ids) / pairs_in_step).backward()
                step_loss += loss.detach() * len(ids) / pairs_in_step
                for k, v in metrics.items():
                    window.setdefault(k, []).append(v)
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
            if not torch.isfinite(grad_norm):  # stop before the optimizer writes inf/NaN into the weights
                raise FloatingPointError(f"non-finite gradient norm ({float(grad_norm)}) at step {step + 1}")
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            window_seconds += time.time() - step_start
            window.setdefault("loss", []).append(step_loss)
            window.setdefault("grad_norm", []).append(grad_norm.detach())  # measured before clipping
            if cfg.sync_ref_model and step % cfg.ref_model_sync_steps == 0:  # TR-DPO (Gorbatovski et al. 2024)
                with torch.no_grad():
                    for p_ref, p in zip(ref_model.parameters(), model.parameters()):
                        p_ref.lerp_(p.to(p_ref.dtype), cfg.ref_model_mixup_alpha)

            if step % cfg.logging_steps == 0 or step == total_steps:
                record = {k: torch.stack(v).float().mean().item() for k, v in window.items()}  # one sync per window
                record.update(learning_rate=scheduler.get_last_lr()[0], epoch=step / steps_per_epoch,  # after step(), as TRL
                              tokens_per_second=window_tokens / window_seconds)
                if device.type == "cuda":
                    record["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
                log(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['rewards/accuracies']:.2f}",
                                margin=f"{record['rewards/margins']:.3f}", tok_s=f"{record['tokens_per_second']:.0f}")
                tqdm.write(" ".join(f"{k}={v:.4g}" for k, v in {"step": step, **record}.items()))
                window, window_tokens, window_seconds = {}, 0, 0.0
            if eval_set and cfg.eval_steps and step % cfg.eval_steps == 0 and step < total_steps:
                record = evaluate(cfg, model, ref_model, eval_set, pad_id, autocast)
                log(record)
                tqdm.write(" ".join(f"{k}={v:.4g}" for k, v in {"step": step, **record}.items()))
            if cfg.save_steps and step % cfg.save_steps == 0:
                last_checkpoint = checkpoints.save_checkpoint(cfg.output_dir, step, model, ref_model, optimizer, scheduler,
                                                              trainer_state(), cfg.save_total_limit, cfg.sync_ref_model)
            bar.update(1)
        final_eval = evaluate(cfg, model, ref_model, eval_set, pad_id, autocast) if eval_set and not stop["signal"] else {}
        if final_eval:  # (inside the `try`: the last record reaches the tracker before it is closed)
            log(final_eval)
            tqdm.write(" ".join(f"{k}={v:.4g}" for k, v in final_eval.items()))
    except FloatingPointError as err:
        raise RunError(f"{err}; training stopped, and the last good checkpoint is "
                            f"{last_checkpoint or checkpoints.last_intact(out) or 'none (no checkpoint was saved yet)'}; "
                            "resume from it with a lower --learning_rate, or check the data") from None
    except torch.cuda.OutOfMemoryError:
        raise RunError("out of GPU memory; reduce it with --per_device_train_batch_size 1 and "
                            "--gradient_accumulation_steps N, --gradient_checkpointing, --max_length, --load_in_4bit, "
                            "--precompute_ref_log_probs (no reference forward), or --optim paged_adamw_8bit") from None
    finally:
        bar.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        trackers.finish(tracker)
    if stop["signal"]:
        path = checkpoints.save_checkpoint(cfg.output_dir, step, model, ref_model, optimizer, scheduler,
                                           trainer_state(), cfg.save_total_limit, cfg.sync_ref_model)
        raise SystemExit(f"interrupted ({signal.Signals(stop['signal']).name}): saved {path}; "
                         f"continue with --resume_from_checkpoint {path}")

    # ---- the end (the final evaluation is the loop's last act): the model, curves, samples ----
    checkpoints.save_model(cfg, model, tokenizer, out)
    checks.plot_curves(metrics_file, out / "curves.png")
    if cfg.sample_eval and eval_set:
        from demo.sample_eval import sample_eval

        prompts = [ex["prompt_ids"] for ex in eval_set[:cfg.sample_eval]]  # the token ids trained on, chat template and all
        reward_fn = None
        if Path(cfg.dataset).resolve() == DEMO_DATASET:  # the shipped task has a programmatic ground truth
            from demo.sentiment import sentiment_score as reward_fn
        if ref_model is None and (cfg.ref_model or not cfg.use_peft):  # freed after precompute: reload the one the run used
            ref_model = load_model(cfg, cfg.ref_model or cfg.model, device, trainable=False)
        result = sample_eval(model, tokenizer, prompts, reference=ref_model, reward_fn=reward_fn, seed=cfg.seed)
        (out / "sample_eval.json").write_text(json.dumps(result, indent=1))
    return final_eval


if __name__ == "__main__":
    options.cli(sys.argv[1:], main)
