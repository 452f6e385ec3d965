"""Prefix sharing: the same numbers as the concatenated [chosen; rejected] rows, with less work.

A DPO pair's two rows start with the same prompt, so the concatenated forward pass (dpo.completion_logps) computes
every prompt twice. Here a pair is one row, [prompt; chosen; rejected], with position ids and a 4-d attention mask
that give every token exactly the tokens and positions it has in its own concatenated row (Wang et al. 2024,
"Accelerating Direct Preference Optimization with Prefix Sharing", arXiv:2410.20305). On long prompts this saves
up to half the forward and backward work; the log-probs and gradients are those of the concatenated rows, which
tests/test_prefix_sharing.py proves family by family. A model for which that cannot be shown is scored the
concatenated way (`problem` says why, in one printed line).

A reader of the algorithm can skip this file: with `--prefix_sharing False` nothing here runs.
"""
import torch

from data import collate, padded_width
from harness import models


def share_prompts(batch: dict[str, torch.Tensor], pad_token_id: int,
                  pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor] | None:
    """The shared-prompt layout of a collated batch: one row per pair, [prompt; chosen; rejected], so that each
    prompt goes through the model once instead of twice (Wang et al. 2024, "Accelerating Direct Preference
    Optimization with Prefix Sharing", arXiv:2410.20305). Returns the `shared_*` tensors to add to the batch, or None
    when some pair's two rows do not start with the same prompt (truncation_scope "row" can cut them apart).

    For pair i with prompt length P, completions C and R, row i of the layout is

        tokens     x_1 .. x_P   w_1 .. w_C       l_1 .. l_R        pad
        positions  0 .. P-1     P .. P+C-1       P .. P+R-1        (the rejected completion restarts after x)
        attends    causal       causal           causal, except w  none

    so every token sees exactly what it sees in its own concatenated row. The hidden state that predicts completion
    token t+1 of concatenated row r sits at `shared_rows`, `shared_positions`, in the order of
    completion_mask[:, 1:].nonzero(): the first rejected token is predicted by the last prompt token, like the first
    chosen one."""
    B = batch["input_ids"].shape[0] // 2
    completion = batch["completion_mask"].bool()
    prompt_len = completion.int().argmax(1)  # the first completion token ends the prompt
    lengths = batch["attention_mask"].sum(1)
    P, C, R = prompt_len[:B], lengths[:B] - prompt_len[:B], lengths[B:] - prompt_len[B:]
    if not torch.equal(P, prompt_len[B:]) or (P == 0).any():
        return None
    width = padded_width(int((P + C + R).max()), pad_to_multiple_of)
    input_ids = torch.full((B, width), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros(B, width, dtype=torch.long)
    part = torch.zeros(B, width, dtype=torch.long)  # 1 prompt, 2 chosen, 3 rejected, 0 padding
    for i in range(B):
        p, c, r = int(P[i]), int(C[i]), int(R[i])
        if not torch.equal(batch["input_ids"][i, :p], batch["input_ids"][B + i, :p]):
            return None
        input_ids[i, :p + c] = batch["input_ids"][i, :p + c]
        input_ids[i, p + c:p + c + r] = batch["input_ids"][B + i, p:p + r]
        position_ids[i, :p + c + r] = torch.cat([torch.arange(p + c), torch.arange(p, p + r)])
        part[i, :p], part[i, p:p + c], part[i, p + c:p + c + r] = 1, 2, 3
    index = torch.arange(width)
    causal = index[None, :] <= index[:, None]  # [query, key]
    attend = causal & (part[:, None, :] > 0) & ~((part[:, :, None] == 3) & (part[:, None, :] == 2))
    rows, pos = completion[:, 1:].nonzero(as_tuple=True)  # (concatenated row, position predicting the next token)
    pair = rows % B
    rejected_completion = (rows >= B) & (pos >= P[pair])  # a rejected row past its prompt: shifted behind the chosen
    return {"shared_input_ids": input_ids, "shared_position_ids": position_ids,
            "shared_attention_mask": attend[:, None],  # [B, 1, query, key], True = attend
            "shared_rows": pair, "shared_positions": pos + rejected_completion * C[pair]}


def hidden_states(decoder, model, batch):
    """The decoder's last hidden states at the scored positions, in the order of completion_mask[:, 1:].nonzero():
    exactly those the concatenated rows give (one forward over B shared rows instead of 2B rows)."""
    out = decoder(input_ids=batch["shared_input_ids"], position_ids=batch["shared_position_ids"],
                  attention_mask=attention_mask_4d(model, batch["shared_attention_mask"]), use_cache=False)
    return out[0][batch["shared_rows"], batch["shared_positions"]]


def exact(cfg, models, examples, pad_id, completion_logps) -> bool:
    """Whether to use prefix sharing: True when every model given scores the shared rows exactly; else one
    printed line saying why, and False (the pairs are then scored as concatenated rows)."""
    for model in filter(None, models):
        why = problem(cfg, model, examples, pad_id, completion_logps)
        if why:
            print(f"prefix sharing off: {why}; each pair is scored as two concatenated rows")
            return False
    return True


@torch.no_grad()
def problem(cfg, model, examples, pad_id, completion_logps) -> str | None:
    """Why `model` cannot score the shared-prompt rows exactly (None: it can). Checked once, on a real batch, against
    the concatenated rows, so that a family with its own position or mask scheme is caught, not trained wrongly."""
    c, attention = model.config.get_text_config(), model.config._attn_implementation
    window = getattr(c, "sliding_window", None) if getattr(c, "use_sliding_window", True) else None
    if attention not in ("sdpa", "eager"):
        return f"its attention ({attention}) takes no custom mask"
    if models.aux_loss_coef(cfg, model):
        return "the MoE balancing loss is defined over the concatenated rows"
    if window and window < 2 * cfg.max_length:  # a custom mask replaces the sliding window, harmless only if longer
        return f"its sliding window ({window}) is shorter than a shared row can be ({2 * cfg.max_length})"
    batch = collate(examples[:cfg.per_device_train_batch_size], pad_id, cfg.max_length, cfg.truncation_mode,
                    cfg.pad_to_multiple_of, cfg.truncation_scope)
    shared = share_prompts(batch, pad_id, cfg.pad_to_multiple_of)
    if shared is None:
        return None  # (this batch's pairs have two prompts each: it is scored the concatenated way anyway)
    batch = {k: v.to(model.device) for k, v in {**batch, **shared}.items()}
    was_training = model.training
    model.eval()
    try:
        with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=bool(cfg.bf16)):
            shared = completion_logps(model, batch)[0]
            rows = completion_logps(model, {k: v for k, v in batch.items() if not k.startswith("shared_")})[0]
    except Exception as err:  # noqa: BLE001 - any failure means: use the concatenated rows
        return f"it fails on them ({type(err).__name__}: {str(err).splitlines()[0][:120]})"
    finally:
        model.train(was_training)
    if not torch.allclose(shared, rows, rtol=0.02 if cfg.bf16 else 1e-5, atol=1e-2 if cfg.bf16 else 1e-5):
        return f"its log-probs on them differ from the concatenated rows by {float((shared - rows).abs().max()):.3g}"
    return None


def attention_mask_4d(model, attend):
    """A custom [B, 1, query, key] mask in the form the model's attention takes it: booleans for SDPA, additive
    0 / -inf-like floats for eager attention (FlashAttention takes none: such models use the concatenated rows)."""
    if model.config._attn_implementation == "sdpa":
        return attend
    return torch.zeros(attend.shape, device=attend.device).masked_fill(~attend, torch.finfo(torch.float32).min)


