"""
Direct Preference Optimization on one GPU: the algorithm and its training loop, top to bottom.

    python dpo.py                                   # the shipped tiny demo: offline, CPU, about two minutes
    python dpo.py --model Qwen/Qwen2.5-0.5B-Instruct --dataset trl-lib/ultrafeedback_binarized
    python dpo.py --model meta-llama/Llama-3.1-8B-Instruct --dataset ... --load_in_4bit   # QLoRA on 12-24 GB

DPO (Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a Reward Model",
arXiv:2305.18290) trains a policy pi_theta on pairs (x, y_w, y_l) to raise the implicit reward
beta * log pi_theta(y|x) / pi_ref(y|x) of the preferred completion y_w above that of y_l, with the loss of Eq.
7:
-log sigmoid(beta * (rho_w - rho_l)), rho = log pi_theta(y|x) - log pi_ref(y|x). This file holds the reference
model (4 ways to get it), the concatenated forward pass that scores chosen and rejected completions in one
call, one step's DPO work (`dpo_step`), and a plain PyTorch loop. Option names, formulas and metric names are
TRL's.

Read in this order: losses.py (the formulas), data.py (what a batch is), then this file from `main()`. The run
plumbing (options, checks, checkpoints, logging, signals) is in harness/; a reader of DPO can skip it.
"""
import contextlib
import copy
import functools
import math
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

import data
import losses
from harness import checks, datafiles, models, options, run
from harness.options import Config
from speedups import prefix_sharing


# ------------------------------------------------------------------------------------------------------------
# Model and reference


@models.quiet_library_notices()
def load_model(cfg: Config, name: str, device: torch.device, trainable: bool):
    """AutoModelForCausalLM, in 4-bit NF4 for QLoRA. The policy and a reference loaded here get the same
    dtypes (full fine-tuning: fp32 masters; LoRA: the frozen base in the compute dtype), so that a reference
    with the policy's weights computes exactly what the policy computes at step 0."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    compute_dtype = torch.bfloat16 if cfg.bf16 else torch.float32
    quantization = None
    if cfg.load_in_4bit:  # QLoRA (Dettmers et al. 2023, arXiv:2305.14314): NF4 + double quantisation
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=compute_dtype)
    if cfg.trust_remote_code:
        print(
            f"warning: --trust_remote_code runs Python code from {name}; do this only for sources you trust")
    # Full fine-tuning keeps fp32 master weights (bf16 only in autocast); LoRA's frozen base can live in bf16.
    # The reference takes the policy's dtype: a bf16 copy of fp32 weights would differ from the policy before
    # any step (norms and embeddings run outside autocast), and TR-DPO's small updates would round away in
    # bf16.
    dtype = torch.float32 if not cfg.use_peft else compute_dtype
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name, dtype=dtype, quantization_config=quantization, trust_remote_code=cfg.trust_remote_code,
            device_map={"": device} if quantization else None)
    except (OSError, ValueError) as err:
        raise models.load_error(name, err) from err
    if not quantization:
        model.to(device)
    # dropout would make the policy differ from the reference at step 0 (loss != ln 2)
    if cfg.disable_dropout:
        models.disable_dropout(model)
    if cfg.load_in_4bit:  # the same preparation for a 4-bit reference, so that it matches the policy's dtypes
        model = models.prepare_4bit(model, compute_dtype, trainable and cfg.gradient_checkpointing)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
        models.check_head(model)  # refuse now a model whose log-probs this file would get wrong
    if not trainable:
        return model.eval().requires_grad_(False)
    if cfg.gradient_checkpointing and not cfg.load_in_4bit:  # (4-bit: enabled by the k-bit preparation above)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.use_peft:
        from peft import LoraConfig, get_peft_model

        targets = cfg.lora_target_modules
        targets = targets[0] if targets == ["all-linear"] else targets  # peft takes "all-linear" as a string
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=targets, task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)  # LoRA B starts at 0: at step 0 the policy *is* the reference
        if cfg.gradient_checkpointing:
            model.enable_input_require_grads()
    return model.train()


def load_reference(cfg: Config, model, device):
    """The reference pi_ref, in one of four ways: a separate --ref_model; a frozen copy of the policy at step
    0 (full fine-tuning); None with LoRA (the policy with its adapters off, see `reference`); None with
    --reference_free."""
    if cfg.ref_model:
        return load_model(cfg, cfg.ref_model, device, trainable=False)
    if not cfg.use_peft and not cfg.reference_free:  # in the policy's own dtype (see load_model)
        return copy.deepcopy(model).eval().requires_grad_(False)
    return None


@contextlib.contextmanager
def reference(model, ref_model):
    """The reference model: a separate frozen model, or (LoRA) the policy itself with its adapters switched
    off."""
    with torch.no_grad():
        if ref_model is not None:
            yield ref_model
        else:
            with model.disable_adapter():  # the same weights minus LoRA: no second copy in memory
                yield model


# ------------------------------------------------------------------------------------------------------------
# The concatenated forward pass: chosen and rejected rows of a batch go through the model in one call.


def completion_logps_naive(model, batch):
    """The readable reference: full log-softmax over the vocabulary at every position, then pick the next
    token. Memory is [2B, T, V] floats; `completion_logps` computes the same numbers without that tensor."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   use_cache=False).logits
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
    """Per-token log-probs of the completion tokens, [2B, T-1]: the numbers of completion_logps_naive above
    (log-softmax at every position, pick the next token), computed only at completion positions and in chunks
    of `chunk_tokens` whose [N, V] logits are recomputed in backward rather than kept: the full-vocabulary
    logits are the largest tensors of a DPO step (docs/speed.md). Returns (per_token, stats): stats for the
    metrics, WPO and the MoE aux_loss. A batch with `shared_*` tensors (speedups/prefix_sharing.py) is scored
    from [prompt; chosen; rejected] rows: the same numbers with each prompt computed once."""
    mask = batch["completion_mask"][:, 1:].bool()
    where = mask.nonzero(as_tuple=True)  # (row, position) of every scored token
    labels, decoder = batch["input_ids"][:, 1:][where], model.get_decoder()
    # MoE: the decoder returns its routers' logits too
    router = {"output_router_logits": True} if with_aux else {}
    if "shared_input_ids" in batch:  # same numbers, less work: each prompt once (speedups/prefix_sharing.py)
        hidden, out = prefix_sharing.hidden_states(decoder, model, batch), None
    else:  # the concatenated rows [prompt+chosen; prompt+rejected] of the paper
        out = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                      **router)
        hidden = out[0][:, :-1][where]
    pieces = []
    for start in range(0, max(len(labels), 1), chunk_tokens):  # at least one (possibly empty) chunk
        args = (hidden[start:start + chunk_tokens], model, labels[start:start + chunk_tokens], with_wpo)
        # keep only the hidden states; the chunk's logits are recomputed in backward
        if torch.is_grad_enabled():
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
    ld_alpha the tokens past the shorter completion of the pair, so length alone does not decide the
    margin."""
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
    # the reference first: its activations are freed before the policy's are kept for backward (lower peak)
    else:
        with reference(model, ref_model) as ref:
            ref_per_token = completion_logps(ref, batch)[0]
            ref_logps = sequence_logps(ref_per_token, batch["completion_mask"], cfg.ld_alpha)
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
        f_alpha_divergence_coef=cfg.f_alpha_divergence_coef, discopop_tau=cfg.discopop_tau,
        rpo_alpha=cfg.rpo_alpha, reference_free=cfg.reference_free, simpo_gamma=cfg.simpo_gamma,
        dpop_lambda=cfg.dpop_lambda, rdpo_alpha=cfg.rdpo_alpha, pair_weights=pair_weights, nll_loss=nll_loss)
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
    """The same loss and metrics on held-out pairs, with names prefixed eval_. As in TRL, eval_loss is the
    mean over pairs, and the other metrics the mean over batches (they differ when the last batch is
    smaller)."""
    was_training = model.training
    model.eval()
    totals, loss_sum, n_batches = {}, 0.0, 0
    size = cfg.per_device_eval_batch_size
    for i in tqdm(range(0, len(examples), size), desc="evaluation", leave=False):
        chunk = examples[i:i + size]
        with autocast():
            batch = to_device(collate_batch(cfg, chunk, pad_id), model.device)
            loss, metrics = dpo_step(cfg, model, ref_model, batch)
        loss_sum += float(loss) * len(chunk)
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0.0) + float(v)
        n_batches += 1
    model.train(was_training)
    return {"eval_loss": loss_sum / len(examples), **{f"eval_{k}": v / n_batches for k, v in totals.items()}}


@torch.no_grad()
def precompute_reference(cfg, model, ref_model, examples, pad_id, autocast, name):
    """One pass of the reference over the data before training; its log-probs are stored in each example."""
    size = cfg.per_device_eval_batch_size
    for i in tqdm(range(0, len(examples), size), desc=f"reference log-probs ({name})"):
        chunk = examples[i:i + cfg.per_device_eval_batch_size]
        batch = to_device(collate_batch(cfg, chunk, pad_id), model.device)
        with autocast(), reference(model, ref_model) as ref:
            per_token = completion_logps(ref, batch)[0]
            logps = sequence_logps(per_token, batch["completion_mask"], cfg.ld_alpha).cpu()
        for j, ex in enumerate(chunk):
            ex["ref_chosen_logps"], ex["ref_rejected_logps"] = float(logps[j]), float(logps[len(chunk) + j])


def collate_batch(cfg, examples, pad_id):
    """B examples -> the concatenated [chosen; rejected] rows (data.collate), plus, with --prefix_sharing, the
    same pairs as [prompt; chosen; rejected] rows (None when a pair's two rows have different prompts)."""
    batch = data.collate(examples, pad_id, cfg.max_length, cfg.truncation_mode, cfg.pad_to_multiple_of,
                         cfg.truncation_scope)
    if cfg.prefix_sharing:
        batch.update(prefix_sharing.share_prompts(batch, pad_id, cfg.pad_to_multiple_of) or {})
    return batch


def to_device(batch, device):
    return {k: v.to(device) for k, v in batch.items()}


# ------------------------------------------------------------------------------------------------------------
# Optimizer and schedule


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
    """The peak learning rate's multiplier after `step` steps: linear warmup from 0 over `warmup` steps, then
    linear decay to 0 at `total`, half a cosine to 0, or constant. These are transformers' get_scheduler
    formulas (linear, cosine, constant_with_warmup), written out: importing transformers.optimization would
    load its trainer utilities (peft, bitsandbytes) into every full fine-tuning run."""
    if step < warmup:
        return step / max(1, warmup)
    if schedule == "linear":
        return max(0.0, (total - step) / max(1, total - warmup))
    if schedule == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((step - warmup) / max(1, total - warmup)))))
    return 1.0  # constant


def prepare_data(cfg: Config, tokenizer) -> tuple[list[dict], list[dict]]:
    """The training and evaluation pairs as token ids, with limits (a) and (b) applied (data.prepare_dataset);
    (c), max_length, is applied per batch by collate, the same way for training, evaluation and precompute."""
    train_rows, eval_rows = datafiles.load_preference_dataset(cfg.dataset, cfg.dataset_split, cfg.eval_split,
                                                              cfg.eval_fraction, cfg.seed)
    limits = dict(max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
                  max_completion_length=cfg.max_completion_length, truncation_mode=cfg.truncation_mode,
                  truncation_scope=cfg.truncation_scope)
    train_set = data.prepare_dataset(train_rows, tokenizer, name="train", **limits)
    eval_set = [] if eval_rows is None else data.prepare_dataset(eval_rows, tokenizer, name="eval", **limits)
    checks.use_reference_columns(cfg, train_set, eval_set)
    for ex in train_set[:cfg.show_examples]:
        print(data.show_example(ex, tokenizer, cfg.max_length, cfg.truncation_mode,
                                truncation_scope=cfg.truncation_scope))
    return train_set, eval_set


def schedule_lengths(cfg: Config, n_pairs: int) -> tuple[int, int, int]:
    """(steps per epoch, total steps, warmup steps) for n_pairs training pairs."""
    batches_per_epoch = math.ceil(n_pairs / cfg.per_device_train_batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / cfg.gradient_accumulation_steps)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * steps_per_epoch)
    return steps_per_epoch, total_steps, cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total_steps)


def micro_batches(cfg: Config, n_pairs: int, step: int, steps_per_epoch: int) -> list[list[int]]:
    """The pair indices of each micro-batch of optimizer step `step`. Each epoch's order depends only on
    (seed, epoch), so a resumed run sees the same batches as an uninterrupted one."""
    epoch, offset = divmod(step, steps_per_epoch)
    order = epoch_order(cfg.seed + epoch, n_pairs)
    size, k = cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps
    start = offset * k * size
    return [order[i:i + size] for i in range(start, min(start + k * size, n_pairs), size)]


@functools.lru_cache(maxsize=1)  # drawn once per epoch, not at every step
def epoch_order(seed: int, n_pairs: int) -> list[int]:
    return torch.randperm(n_pairs, generator=torch.Generator().manual_seed(seed)).tolist()


def main(cfg: Config):
    """The recipe: options -> data -> policy and reference -> the loop -> save. Returns the final eval."""
    cfg = options.resolve(cfg)  # the defaults that depend on other options (a no-op after parse_args)
    device = run.start(cfg)  # seed, device, threads; the options printed
    # model paths, the output folder, a resume's options: before anything heavy
    checkpoint = checks.preflight(cfg)

    # ---- data: rows -> token ids (data.py); the same truncation for training, evaluation and precompute ----
    tokenizer = checks.load_tokenizer(cfg)  # (with --ref_model: checked to share its vocabulary)
    pad_id = data.pad_token_id(tokenizer)
    train_set, eval_set = prepare_data(cfg, tokenizer)
    fingerprint = checks.check_resume_data(checkpoint, train_set, eval_set)  # resume: the same rows as before

    # ---- the policy, and the reference in one of four ways ----
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16)  # noqa: E731
    model = load_model(cfg, cfg.model, device, trainable=True)
    ref_model = load_reference(cfg, model, device)
    for option, m in (("--model", model), ("--ref_model", cfg.ref_model and ref_model)):
        checks.check_positions(option, m, train_set + eval_set, cfg)  # the longest row fits its positions
    if cfg.prefix_sharing:  # same numbers, less work, where proven exact: speedups/prefix_sharing.py
        cfg.prefix_sharing = prefix_sharing.exact(cfg, (model, ref_model), train_set + eval_set, pad_id,
                                                  completion_logps)
    print(models.count_trainable(model))
    checks.write_config(cfg, Path(cfg.output_dir), resumed=checkpoint is not None)  # options, data, models ok
    if cfg.precompute_ref_log_probs and "ref_chosen_logps" not in train_set[0]:  # (else: given in the data)
        run.cached_reference_logps(cfg, ref_model or model, train_set + eval_set, compute=lambda: [
            precompute_reference(cfg, model, ref_model, s, pad_id, autocast, name)
            for s, name in ((train_set, "train"), (eval_set, "eval"))])
        ref_model = None  # never run again: free its memory

    # ---- the loop: AdamW on the DPO loss, gradient accumulation, clipping, the learning-rate schedule ----
    steps_per_epoch, total_steps, warmup = schedule_lengths(cfg, len(train_set))
    optimizer = make_optimizer(cfg, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(cfg.lr_scheduler_type, s, warmup, total_steps))
    trainable = [p for p in model.parameters() if p.requires_grad]
    with run.Run(cfg, model, ref_model, optimizer, scheduler, checkpoint, steps_per_epoch, total_steps,
                 fingerprint) as r:
        while r.step < total_steps and not r.stopping:
            r.begin_step()
            group = micro_batches(cfg, len(train_set), r.step, steps_per_epoch)
            pairs_in_step, step_loss = sum(len(ids) for ids in group), 0.0
            for ids in group:
                batch = collate_batch(cfg, [train_set[i] for i in ids], pad_id)
                tokens = int(batch["attention_mask"].sum())
                with autocast():
                    loss, metrics = dpo_step(cfg, model, ref_model, to_device(batch, device))
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"non-finite loss ({float(loss.detach())}) at step {r.step + 1}")
                # weighted by its share of the step's pairs: k micro-batches = one batch k times larger (for a
                # mean over pairs; not exactly for sft/rpo_alpha's token mean nor aot's sorting)
                (loss * len(ids) / pairs_in_step).backward()
                step_loss += loss.detach() * len(ids) / pairs_in_step
                r.add(metrics, tokens)
            max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, max_norm)
            if not torch.isfinite(grad_norm):  # stop before the optimizer writes inf/NaN into the weights
                raise FloatingPointError(f"non-finite gradient norm ({float(grad_norm)}) at step {r.step+1}")
            learning_rate = scheduler.get_last_lr()[0]  # the rate this step uses: the one TRL logs
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if cfg.sync_ref_model and (r.step + 1) % cfg.ref_model_sync_steps == 0:  # TR-DPO, 2404.09656
                with torch.no_grad():
                    for p_ref, p in zip(ref_model.parameters(), model.parameters()):
                        p_ref.lerp_(p.to(p_ref.dtype), cfg.ref_model_mixup_alpha)
            r.end_step(step_loss, grad_norm, learning_rate)  # the log line, when due
            if eval_set and r.eval_due():
                r.log(evaluate(cfg, model, ref_model, eval_set, pad_id, autocast))
            r.checkpoint_if_due()
        # (inside the run: the record reaches the tracker before it closes; a resumed finished run has it)
        if eval_set and not r.stopping and r.final_eval is None:
            r.log(evaluate(cfg, model, ref_model, eval_set, pad_id, autocast))

    # ---- the end: the model (or adapter), the curves, samples ----
    run.finish(cfg, model, tokenizer, eval_set, ref_model,
               load_reference=lambda: load_model(cfg, cfg.ref_model or cfg.model, device, trainable=False),
               completion_logps=completion_logps)
    return r.final_eval or {}


if __name__ == "__main__":
    options.cli(sys.argv[1:], main)
