"""Prefix sharing: same numbers, less work.

A DPO pair's two rows start with the same prompt, so the concatenated forward pass (dpo.completion_logps)
computes every prompt twice. Here a pair is one row, [prompt; chosen; rejected], with position ids and a 4-d
attention mask that give every token exactly the tokens and positions it has in its own concatenated row (Wang
et al. 2024, "Accelerating Direct Preference Optimization with Prefix Sharing", arXiv:2410.20305). On long
prompts this saves up to half the forward and backward work.

The numbers are the same only for a model whose tokens meet through the attention mask alone and learn their
positions through position ids alone. `exact` decides that once per run, before training: from the model's
structure (`structural_problem`: attention kind, ALiBi, RoPE scaling, convolutions and recurrences, local
windows), then on numbers (`numeric_problem`: the first sharing batch and the longest rows through a narrow
fp32 copy of the model, log-probs and every gradient within TOLERANCE of the concatenated rows'). Any other
model, or one left undecided, is scored the concatenated way, with one printed line saying why.
tests/test_prefix_sharing.py shows it family by family; docs/prefix_sharing.md gives the rules, the tolerance
and the measured noise.

A reader of the algorithm can skip this file: with `--prefix_sharing False` nothing here runs.
"""
import contextlib
import copy
import inspect

import torch

import data
from data import padded_width
from harness import models


def share_prompts(batch: dict[str, torch.Tensor], pad_token_id: int,
                  pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor] | None:
    """The shared-prompt layout of a collated batch: one row per pair, [prompt; chosen; rejected], so that
    each prompt goes through the model once instead of twice. Returns the `shared_*` tensors to add to the
    batch, or None when some pair's two rows do not start with the same prompt (truncation_scope "row" can cut
    them apart).

    For pair i with prompt length P, completions C and R, row i of the layout is

        tokens     x_1 .. x_P   w_1 .. w_C       l_1 .. l_R        pad
        positions  0 .. P-1     P .. P+C-1       P .. P+R-1        (the rejected completion restarts after x)
        attends    causal       causal           causal, except w  none

    so every token sees exactly what it sees in its own concatenated row. The hidden state that predicts
    completion token t+1 of concatenated row r sits at `shared_rows`, `shared_positions`, in the order of
    completion_mask[:, 1:].nonzero(): the first rejected token is predicted by the last prompt token, like the
    first chosen one."""
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
    rows, pos = completion[:, 1:].nonzero(as_tuple=True)  # (concatenated row, position predicting the next)
    pair = rows % B
    rejected_completion = (rows >= B) & (pos >= P[pair])  # a rejected row past its prompt: behind the chosen
    return {"shared_input_ids": input_ids, "shared_position_ids": position_ids,
            "shared_attention_mask": attend[:, None],  # [B, 1, query, key], True = attend
            "shared_rows": pair, "shared_positions": pos + rejected_completion * C[pair]}


def hidden_states(decoder, model, batch):
    """The decoder's last hidden states at the scored positions, in the order of
    completion_mask[:, 1:].nonzero(): exactly those the concatenated rows give (one forward over B shared rows
    instead of 2B rows)."""
    out = decoder(input_ids=batch["shared_input_ids"], position_ids=batch["shared_position_ids"],
                  attention_mask=attention_mask_4d(model, batch["shared_attention_mask"]), use_cache=False)
    return out[0][batch["shared_rows"], batch["shared_positions"]]


def attention_mask_4d(model, attend):
    """A custom [B, 1, query, key] mask in the form the model's attention takes it: booleans for SDPA,
    additive 0 / -inf-like floats for eager attention (FlashAttention takes none: such models use the
    concatenated rows)."""
    if model.config._attn_implementation == "sdpa":
        return attend
    blocked = torch.finfo(torch.float32).min
    return torch.zeros(attend.shape, device=attend.device).masked_fill(~attend, blocked)


# ------------------------------------------------------------------------------------------------------------
# Where the layout is exact: decided from how the model takes positions and masks (`structural_problem`), then
# confirmed on numbers (`numeric_problem`) on batches that actually share, in fp32.

ATTENTION_LAYERS = {"full_attention", "sliding_attention", "chunked_attention", "attention", "global",
                    "local"}
POSITION_TABLES = ("wpe", "embed_positions", "position_embeddings", "pos_encoding")  # indexed by position ids
MIXERS = ("Mamba", "Rwkv", "LSTM", "DeltaNet", "LinearAttention", "Recurrent")  # class names: mixing by index
KV_HEADS = ("num_key_value_heads", "num_kv_heads", "n_head_kv")  # names of the key/value head count
INTERMEDIATE = ("ffn_dim", "n_inner", "ffn_hidden_size")  # MLP widths, with every *intermediate_size
TOLERANCE = 1e-4  # of the largest value; fp32 noise between the layouts measured <= 2.7e-5 (docs/)


def exact(cfg, policy_and_reference, examples, pad_id, completion_logps) -> bool:
    """Whether to use prefix sharing: True when each model given (None: none) scores the shared rows of
    `examples` exactly (`problem`); else one printed line saying why, and False (the pairs are then scored as
    concatenated rows)."""
    checked = set()
    for model in filter(None, policy_and_reference):
        architecture = type(model).__name__, model.config.to_json_string()  # (a frozen copy: checked once)
        why = None if architecture in checked else problem(cfg, model, examples, pad_id, completion_logps)
        checked.add(architecture)
        if why:
            print(f"prefix sharing off: {why}; each pair is scored as two concatenated rows")
            return False
    return True


def problem(cfg, model, examples, pad_id, completion_logps) -> str | None:
    """Why the shared-prompt rows of `examples` (prepared pairs) would not give `model` the log-probs and
    gradients of the concatenated rows (None: they would, or no pair can be shared). `completion_logps` is
    dpo's."""
    lengths = shared_lengths(cfg, examples)
    if not any(lengths):
        return None  # (every pair keeps two different prompts: the layout is never used)
    return (structural_problem(cfg, model, max(filter(None, lengths)))
            or numeric_problem(model, probe_batches(cfg, examples, pad_id, lengths), completion_logps))


def structural_problem(cfg, model, longest: int) -> str | None:
    """The layout is exact when every token reaches the others only through the attention mask and learns its
    position only from position ids: sdpa or eager attention (they take a 4-d mask), no MoE balancing loss, a
    decoder that takes position_ids into rotary angles or an absolute table, no mixing by index (ALiBi,
    convolutions, recurrences), no batch-dependent RoPE scaling, and no local window shorter than the longest
    shared row (`longest` tokens): the custom mask replaces the window, harmless only where it cuts
    nothing."""
    c, attention = model.config.get_text_config(), model.config._attn_implementation
    if attention not in ("sdpa", "eager"):
        return f"its attention ({attention}) takes no custom mask"
    if models.aux_loss_coef(cfg, model):
        return "the MoE balancing loss is defined over the concatenated rows"
    return positions_problem(model, c) or mixing_problem(model, c) or window_problem(c, longest)


def positions_problem(model, c) -> str | None:
    """None when a token's position enters only through position ids: rotary angles (RoPE, with a scaling
    fixed in advance) or an absolute table (GPT-2's wpe, OPT's embed_positions)."""
    settings = dict(flat_settings(c.to_dict()))  # (MPT keeps its alibi flag in attn_config)
    if any(value is True and key.rsplit(".", 1)[-1] in ("alibi", "use_alibi") or value == "alibi"
           for key, value in settings.items()):
        return "its ALiBi biases come from key indices, not from position ids"
    if "position_ids" not in inspect.signature(model.get_decoder().forward).parameters:
        return "its decoder takes no position ids"
    rope = c.to_dict().get("rope_parameters") or {}
    for kind in {rope.get("rope_type")} | {p.get("rope_type") for p in rope.values() if isinstance(p, dict)}:
        if kind and ("dynamic" in kind or kind == "longrope"):  # transformers' dynamic_rope_update
            return f"its RoPE scaling ({kind}) follows the batch's largest position, which padding changes"
    classes = " ".join(type(m).__name__.lower() for m in model.modules())
    names = {name.rsplit(".", 1)[-1] for name, _ in [*model.named_modules(), *model.named_buffers()]}
    if "relativeposition" in classes or not ("rotary" in classes or names & set(POSITION_TABLES)):
        return "it takes positions neither as rotary angles nor from a position table (ALiBi, relative bias)"
    return None


def mixing_problem(model, c) -> str | None:
    """None when attention is the only way tokens meet: no other layer type, no convolution, no recurrence."""
    kinds = sorted(set(getattr(c, "layer_types", None) or []) - ATTENTION_LAYERS)
    if kinds:
        return f"its {'/'.join(kinds)} layers mix tokens by their index in the row, which no mask controls"
    for name, module in model.named_modules():
        kind = type(module).__name__
        if isinstance(module, torch.nn.Conv1d) or any(part in kind for part in MIXERS):
            return f"its {name} ({kind}) mixes tokens by their index in the row, which no mask controls"
    return None


def window_problem(c, longest) -> str | None:
    """None when no local window is shorter than the longest shared row: sliding windows (Mistral, Gemma 2/3),
    GPT-Neo's window_size, Llama-4's attention_chunk_size, any other *window* option."""
    settings = c.to_dict()
    for key, value in settings.items():
        named = "window" in key or key == "attention_chunk_size"
        if not named or any(part in key for part in ("layers", "pattern", "use_")):  # max_window_layers, ...
            continue
        if key == "sliding_window" and settings.get("use_sliding_window") is False:
            continue
        sizes = value if isinstance(value, list) else [value]
        short = [v for v in sizes if type(v) is int and 0 < v < longest]
        if short:
            return (f"its local attention window ({key} {min(short)}) is shorter than its longest shared row "
                    f"({longest})")
    return None


def flat_settings(settings: dict, prefix=""):
    for key, value in settings.items():
        if isinstance(value, dict):
            yield from flat_settings(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def shared_lengths(cfg, examples) -> list[int | None]:
    """Per pair, its shared row's length [prompt; chosen; rejected] after collate's cut (data.truncate), or
    None where its two rows keep different prompts (then no batch holding it is shared: `share_prompts`)."""
    lengths = []
    for ex in examples:
        (chosen, c_mask), (rejected, r_mask) = data.truncate(
            ex["prompt_ids"], ex["chosen_ids"], ex["rejected_ids"], cfg.max_length, cfg.truncation_mode,
            cfg.truncation_scope)
        p = c_mask.index(1) if 1 in c_mask else 0
        same = p > 0 and 1 in r_mask and r_mask.index(1) == p and chosen[:p] == rejected[:p]
        lengths.append(len(chosen) + len(rejected) - p if same else None)
    return lengths


def probe_batches(cfg, examples, pad_id, lengths) -> list[dict]:
    """What the numeric check runs: the first batch of pairs that share, and the pairs of the longest shared
    rows, collated as training collates them (max_length, truncation_mode and _scope, pad_to_multiple_of)."""
    n, shareable = cfg.per_device_train_batch_size, [i for i, length in enumerate(lengths) if length]
    first, longest = shareable[:n], sorted(shareable, key=lambda i: -lengths[i])[:n]
    batches = []
    for chosen in (first, longest) if set(first) != set(longest) else (first,):
        batch = data.collate([examples[i] for i in chosen], pad_id, cfg.max_length, cfg.truncation_mode,
                             cfg.pad_to_multiple_of, cfg.truncation_scope)
        batches.append({**batch, **share_prompts(batch, pad_id, cfg.pad_to_multiple_of)})
    return batches


def numeric_problem(model, batches, completion_logps) -> str | None:
    """Run each batch both ways through a small fp32 copy of the model (`fp32_copy`: its class and
    configuration, narrower) and compare the per-token log-probs and every parameter's gradient, each within
    TOLERANCE of its module's largest value (fp32 whatever --bf16 says: bf16 noise would hide a real
    difference)."""
    try:
        probe = fp32_copy(model, batches[0], completion_logps)
    except Exception as err:  # noqa: BLE001 - undecided means off
        return f"no fp32 copy of it could be built to check the layout on ({one_line(err)})"
    for batch in batches:
        try:
            differences = layout_differences(probe, batch, completion_logps)
        except Exception as err:  # noqa: BLE001 - any failure means: use the concatenated rows
            return f"it fails on shared rows ({one_line(err)})"
        name, worst = max(differences.items(), key=lambda item: item[1])
        if worst > TOLERANCE:
            what = "log-probs differ" if name == "log-probs" else f"gradient of {name} differs"
            return (f"on shared rows its {what} from the concatenated rows by {worst:.2g} of the largest "
                    f"value, more than fp32 rounding ({TOLERANCE:g})")
    return None


def layout_differences(probe, batch, completion_logps) -> dict[str, float]:
    """max |shared - concatenated| / the largest |concatenated| value of the same module, for the log-probs
    and each parameter's gradient (per module: a key bias's gradient is zero but for rounding, its weight's is
    not)."""
    device = next(probe.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    with exact_fp32(device):
        shared = logps_and_gradients(probe, batch, completion_logps)
        rows = logps_and_gradients(probe, concatenated(batch), completion_logps)
    if shared.keys() != rows.keys():  # a parameter that gets a gradient in one layout only
        return {name: float("inf") for name in shared.keys() ^ rows.keys()}
    scales = {}
    for name, a in rows.items():
        module = name.rsplit(".", 1)[0]
        scales[module] = max(scales.get(module, 0.0), float(a.abs().max()))
    ratios = {name: float((rows[name] - shared[name]).abs().max()) / (scales[name.rsplit(".", 1)[0]] or 1e-30)
              for name in rows}
    return {name: r if r == r else float("inf") for name, r in ratios.items()}  # (NaN counts as a difference)


def logps_and_gradients(probe, batch, completion_logps) -> dict[str, torch.Tensor]:
    """Per-token log-probs, and the gradients of a fixed random combination of them (every parameter)."""
    probe.zero_grad(set_to_none=True)
    logps = completion_logps(probe, batch)[0]
    weights = torch.randn(logps.shape, generator=torch.Generator().manual_seed(0)).to(logps.device)
    (logps * weights).sum().backward()
    grads = {name: p.grad for name, p in probe.named_parameters() if p.grad is not None}
    return {"log-probs": logps.detach(), **grads}


def fp32_copy(model, batch, completion_logps):
    """A randomly initialised fp32 model of `model`'s class and configuration (positions, windows, layer
    types, attention implementation, depth, head size), narrowed to 2 attention heads (4 where a family needs
    more) so that even a large model's copy is small: the first narrowing that builds and scores `batch` as
    concatenated rows."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # (PEFT: the model it wraps)
    c = base.config.get_text_config()
    heads = global_value(c, "num_attention_heads") or 2
    kv = global_value(c, "num_key_value_heads") or heads
    head_dim = global_value(c, "head_dim") or c.hidden_size // heads  # (kept: rotary tables follow it)
    device = next(model.parameters()).device
    for n in (2, 4):
        try:
            probe = narrow_copy(base, n, n // 2 if kv < heads else n, n * head_dim).to(device)
            with exact_fp32(device), torch.no_grad():
                completion_logps(probe, {k: v.to(device) for k, v in concatenated(batch).items()})
            return probe
        except Exception as err:  # noqa: BLE001 - a family with its own rules on sizes: try the next
            failure = err
    raise failure


def narrow_copy(base, heads, kv_heads, hidden):
    config = copy.deepcopy(base.config)
    c = config.get_text_config()
    narrow = {"hidden_size": hidden, "num_attention_heads": heads, **dict.fromkeys(KV_HEADS, kv_heads),
              **{key: 2 * hidden for key in c.to_dict()
                 if key.endswith("intermediate_size") or key in INTERMEDIATE}}
    for key, value in narrow.items():
        if isinstance(global_value(c, key), int):
            setattr(c, key, value)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.random.fork_rng(devices=[]):  # (the run's random stream stays as it was)
        torch.manual_seed(0)
        return type(base)._from_config(config, attn_implementation=base.config._attn_implementation,
                                       dtype=torch.float32).eval()


def global_value(c, key):
    """config.key, or its global value where layers may set their own (Gemma-4's head_dim)."""
    try:
        return getattr(c, key, None)
    except RuntimeError:  # transformers' AmbiguousGlobalPerLayerAttributeError
        return c.to_dict().get(key)


@contextlib.contextmanager
def exact_fp32(device):
    """fp32 as fp32: no autocast, no TF32 matrix products (whatever the run set), gradients on."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.autocast(device.type, enabled=False), torch.enable_grad():
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def concatenated(batch):
    return {k: v for k, v in batch.items() if not k.startswith("shared_")}


def one_line(err) -> str:
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:120]}"
