"""The shared-prompt forward (prefix_sharing.share_prompts + dpo.completion_logps): each pair as one row
[prompt; chosen; rejected], the rejected completion's positions restarting after the prompt and its tokens
unable to see the chosen ones. The numbers must be those of the concatenated rows [prompt+chosen;
prompt+rejected]: per-token log-probs and gradients within 1e-5 of each tensor's largest value (in float64)
for full fine-tuning, LoRA, QLoRA and gradient checkpointing, and the same training in every reference
mode. Where it is exact (prefix_sharing.problem): kept on 16 families built tiny from their configs,
refused with its reason on 9 others (ALiBi, local windows shorter than the rows, a convolutional hybrid,
batch-dependent RoPE), by the rules and by the numbers alone, whatever the first batch."""
import json
import math
import random
import types

import pytest
import torch
import transformers

import data
from harness import datafiles
import dpo
from speedups import prefix_sharing
from tiny import make_preference_dir, make_tokenizer, read_records as records, run_config as config

LN2 = math.log(2)


def test_layout_by_hand():
    """Pair 0: prompt [5,6], chosen [7,8], rejected [9]; pair 1: prompt [5], chosen [7], rejected [8,9,10].
    Shared rows: [5,6,7,8,9] with positions 0,1,2,3,2 and [5,7,8,9,10] with positions 0,1,1,2,3. The rejected
    token 9 of pair 0 (index 4) sees 5,6 and itself, not 7,8. Concatenated row 2 (pair 0's rejected) scores
    token 9 at position 2 from the hidden state at position 1 (the last prompt token): shared (0, 1). Row 3
    (pair 1's rejected) scores 8,9,10 from positions 0,1,2 -> shared (1, 0), (1, 2), (1, 3) (past the prompt,
    shifted by the chosen completion's length 1)."""
    examples = [{"prompt_ids": [5, 6], "chosen_ids": [7, 8], "rejected_ids": [9]},
                {"prompt_ids": [5], "chosen_ids": [7], "rejected_ids": [8, 9, 10]}]
    batch = data.collate(examples, pad_token_id=0)
    shared = prefix_sharing.share_prompts(batch, pad_token_id=0)
    assert shared["shared_input_ids"].tolist() == [[5, 6, 7, 8, 9], [5, 7, 8, 9, 10]]
    assert shared["shared_position_ids"].tolist() == [[0, 1, 2, 3, 2], [0, 1, 1, 2, 3]]
    assert shared["shared_attention_mask"][0, 0, 4].tolist() == [True, True, False, False, True]
    assert shared["shared_attention_mask"][1, 0, 2].tolist() == [True, False, True, False, False]
    rows, pos = batch["completion_mask"][:, 1:].nonzero(as_tuple=True)
    assert list(zip(rows.tolist(), pos.tolist())) == [(0, 1), (0, 2), (1, 0), (2, 1), (3, 0), (3, 1), (3, 2)]
    assert list(zip(shared["shared_rows"].tolist(), shared["shared_positions"].tolist())) == [
        (0, 1), (0, 2), (1, 0), (0, 1), (1, 0), (1, 2), (1, 3)]
    padded = prefix_sharing.share_prompts(batch, pad_token_id=0, pad_to_multiple_of=8)  # 5 -> 8 columns
    assert padded["shared_input_ids"].tolist() == [[5, 6, 7, 8, 9, 0, 0, 0], [5, 7, 8, 9, 10, 0, 0, 0]]
    assert torch.equal(padded["shared_attention_mask"][:, :, :5, :5], shared["shared_attention_mask"])
    assert not padded["shared_attention_mask"][:, :, :, 5:].any()  # no token attends to the padding
    for key in ("shared_position_ids", "shared_rows", "shared_positions"):
        assert torch.equal(padded[key][..., :5] if key == "shared_position_ids" else padded[key], shared[key])


def test_pairs_with_two_different_prompts_are_not_shared():
    """truncation_scope "row" with keep_end can leave a pair's rows with different prompts: not shared."""
    examples = [{"prompt_ids": [5, 6, 7], "chosen_ids": [8, 9, 10], "rejected_ids": [11]}]
    batch = data.collate(examples, pad_token_id=0, max_length=4)  # rows [7,8,9,10] and [5,6,7,11]
    assert prefix_sharing.share_prompts(batch, 0) is None


def batch_of(tiny, n=6):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny["model"])
    train, _ = datafiles.load_preference_dataset(tiny["dataset"])
    examples = data.prepare_dataset(train.select(range(n)), tokenizer, max_length=12, verbose=False)  # cuts
    batch = data.collate(examples, data.pad_token_id(tokenizer), 12)
    return batch, {**batch, **prefix_sharing.share_prompts(batch, data.pad_token_id(tokenizer))}


def assert_close_scaled(actual, expected, rel=1e-5):
    """Equal to `rel` of the tensor's largest element: a fixed atol on gradients fails on CPUs that sum in
    another order (1.9e-5 on elements of 0.2 was seen on an AMD EPYC)."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=rel * float(expected.abs().max()) + 1e-30)


@pytest.mark.parametrize("mode", [["--use_peft", "False"], [], ["--load_in_4bit"],
                                  ["--use_peft", "False", "--gradient_checkpointing"],
                                  ["--gradient_checkpointing"]],
                         ids=["full", "lora", "qlora", "full+checkpointing", "lora+checkpointing"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_logps_and_gradients_equal_the_concatenated_rows(tiny, mode, attention):
    cfg = config(tiny, "unused", *mode)
    torch.manual_seed(0)
    model = dpo.load_model(cfg, tiny["model"], torch.device("cpu"), trainable=True)
    model.config._attn_implementation = attention  # (the base config: PEFT forwards it)
    # In fp32 this tiny net's gradients are good to only 1e-4 either way (against float64); in float64 the
    # layouts agree to 1e-6 (what is left: completion_logps's fp32 logits).
    model.double()
    with torch.no_grad():  # LoRA B away from 0, so that the adapters' gradients are not trivial
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.linspace(-0.2, 0.2, p.numel()).reshape(p.shape))
    concatenated, shared = batch_of(tiny)
    results = []
    for batch in (concatenated, shared):
        model.zero_grad()
        logps, stats = dpo.completion_logps(model, batch, with_wpo=True)
        (logps.sum() + stats["logits_sum"].sum() * 1e-3).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((logps.detach(), stats, grads))
    (a, stats_a, grads_a), (b, stats_b, grads_b) = results
    assert_close_scaled(b, a)
    for key in stats_a:
        assert_close_scaled(stats_b[key], stats_a[key])
    assert grads_a and grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert_close_scaled(grads_b[name], grads_a[name])
    assert shared["shared_input_ids"].numel() < concatenated["input_ids"].numel()  # each prompt computed once


@pytest.mark.parametrize("mode", [
    [],
    ["--use_peft", "False"],
    ["--use_peft", "False", "--ref_model", "MODEL"],
    ["--precompute_ref_log_probs"],
    ["--use_peft", "False", "--sync_ref_model", "--ref_model_sync_steps", "1"],
    ["--reference_free"],
    ["--loss_type", "ipo", "--ld_alpha", "0.5", "--use_weighting"],
    ["--use_peft", "False", "--pad_to_multiple_of", "16"],
], ids=["lora", "full", "ref_model", "precompute", "tr-dpo", "reference-free", "ipo+ld+wpo", "pad-to-16"])
def test_training_is_the_same_with_and_without_prefix_sharing(tiny, tmp_path, mode):
    mode = [tiny["model"] if m == "MODEL" else m for m in mode]
    for sharing in ("True", "False"):
        dpo.main(config(tiny, tmp_path / sharing, "--max_steps", "4", "--eval_steps", "2", "--prefix_sharing",
                        sharing, *mode))
    on, off = records(tmp_path / "True"), records(tmp_path / "False")
    assert len(on) == len(off)
    for a, b in zip(on, off):
        for key in a.keys() - {"tokens_per_second"}:
            assert a[key] == pytest.approx(b[key], abs=1e-5), key
    assert json.loads((tmp_path / "True" / "config.json").read_text())["prefix_sharing"] is True
    if "--reference_free" not in mode and "--loss_type" not in mode:
        assert on[0]["loss"] == pytest.approx(LN2, abs=1e-6)


def test_a_model_that_ignores_position_ids_falls_back_with_one_line(tiny, tmp_path, monkeypatch, capsys):
    """A decoder that builds its own positions (here: Llama with position_ids dropped) would score the
    rejected completion at the wrong positions; the start-up check sees the difference and turns prefix
    sharing off (the rules see a decoder that takes position_ids: only the numbers catch it)."""
    from transformers.models.llama import modeling_llama

    real = modeling_llama.LlamaModel.forward
    monkeypatch.setattr(modeling_llama.LlamaModel, "forward",
                        lambda self, *a, position_ids=None, **k: real(self, *a, **k))
    cfg = config(tiny, tmp_path, "--max_steps", "1")
    dpo.main(cfg)
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("prefix sharing off")]
    assert len(lines) == 1 and "from the concatenated rows by" in lines[0]
    assert cfg.prefix_sharing is False and records(tmp_path)[0]["loss"] == pytest.approx(LN2, abs=1e-6)
    assert json.loads((tmp_path / "config.json").read_text())["prefix_sharing"] is False


# ---- where the layout is exact: prefix_sharing.problem, family by family ---------------------------------
# Tiny random models built from configs (transformers 5.25). Exact families must be kept, and the model itself
# must give the concatenated rows' log-probs and gradients on the shared rows; the others must be refused with
# their reason, by the structural rules and by the numeric check alone, and the model itself must differ (or
# fail).


def tiny_examples(n=16, seed=0):
    """Prepared pairs (token ids < V): a long first pair that --max_length 48 cuts into two different prompts
    (never shared), then short pairs (the first sharing batch), then pairs up to max_length long (a later
    batch)."""
    rng = random.Random(seed)
    ids = lambda k: [rng.randrange(3, V) for _ in range(k)]  # noqa: E731
    examples = [{"prompt_ids": [1] + ids(50), "chosen_ids": ids(12) + [2], "rejected_ids": ids(2) + [2]}]
    for i in range(1, n):
        short = i < 5
        examples.append({"prompt_ids": [1] + ids(rng.randint(2, 5) if short else rng.randint(4, 30)),
                         "chosen_ids": ids(rng.randint(1, 3) if short else rng.randint(1, 12)) + [2],
                         "rejected_ids": ids(rng.randint(1, 3) if short else rng.randint(1, 12)) + [2]})
    return examples


def run_options(**changes):
    """The options prefix_sharing.problem reads, as dpo.py's Config has them."""
    return types.SimpleNamespace(**{**dict(max_length=48, truncation_mode="keep_end", truncation_scope="row",
                                           pad_to_multiple_of=None, per_device_train_batch_size=4,
                                           router_aux_loss_coef=None), **changes})


V = 64  # vocabulary of the tiny models; token 0 pads, 1 starts, 2 ends
EXAMPLES, OPTIONS = tiny_examples(), run_options()
LONGEST = max(filter(None, prefix_sharing.shared_lengths(OPTIONS, EXAMPLES)))  # the longest shared row
SHORT = 16  # a window longer than the first sharing batch's rows, shorter than LONGEST
BASE = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
            eos_token_id=2)
EXACT = {  # family: (config class, model class, what its tiny config needs)
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=LONGEST)),  # = the longest row
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(head_dim=8)),  # sliding window 4096, eager attention
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(head_dim=8, sliding_window=LONGEST)),
    "gemma4": ("Gemma4TextConfig", "Gemma4ForCausalLM",  # a head size of its own on full-attention layers
               dict(head_dim=8, vocab_size_per_layer_input=V, hidden_size_per_layer_input=8)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", {}),  # partial rotary, LayerNorm with biases
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {}),
    "falcon": ("FalconConfig", "FalconForCausalLM",  # rotary
               dict(new_decoder_architecture=True, num_kv_heads=2)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", {}),  # a learned position table, indexed by position ids
    "opt": ("OPTConfig", "OPTForCausalLM", dict(ffn_dim=64, word_embed_proj_dim=32)),  # the same, offset by 2
    "gptj": ("GPTJConfig", "GPTJForCausalLM", dict(rotary_dim=4)),  # a sin/cos table indexed by position ids
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",  # latent attention, decoupled rotary part
                    dict(head_dim=8, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                         v_head_dim=8, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2,
                         n_group=1, topk_group=1, moe_intermediate_size=16, first_k_dense_replace=1)),
}
PADDED = run_options(pad_to_multiple_of=64)  # concatenated rows: 64 positions; shared rows: at most 48
REFUSED = {  # family: (config class, model class, tiny config, options, the reason given)
    "mpt": ("MptConfig", "MptForCausalLM", dict(d_model=32, n_heads=4, n_layers=2), OPTIONS, "ALiBi"),
    "falcon_alibi": ("FalconConfig", "FalconForCausalLM", dict(alibi=True), OPTIONS, "ALiBi"),
    "bloom": ("BloomConfig", "BloomForCausalLM", dict(n_layer=2, n_head=4), OPTIONS, "takes no position ids"),
    "gpt_neo_local": ("GPTNeoConfig", "GPTNeoForCausalLM",
                      dict(attention_types=[[["global", "local"], 1]], window_size=SHORT), OPTIONS,
                      f"window (window_size {SHORT}) is shorter than its longest shared row ({LONGEST})"),
    "gemma3_local": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(head_dim=8, sliding_window=SHORT), OPTIONS,
                     f"window (sliding_window {SHORT}) is shorter than its longest shared row ({LONGEST})"),
    "mistral_window": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=SHORT), OPTIONS,
                       f"window (sliding_window {SHORT}) is shorter"),
    "lfm2": ("Lfm2Config", "Lfm2ForCausalLM", dict(full_attn_idxs=[1]), OPTIONS, "its conv layers mix"),
    "dynamic_rope": ("LlamaConfig", "LlamaForCausalLM",
                     dict(max_position_embeddings=48, rope_parameters={"rope_type": "dynamic", "factor": 4.0,
                                                                       "rope_theta": 10000.0}),
                     PADDED, "RoPE scaling (dynamic)"),
    "longrope": ("Phi3Config", "Phi3ForCausalLM",
                 dict(original_max_position_embeddings=48, rope_parameters={
                     "rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 48,
                     "short_factor": [1.0] * 4, "long_factor": [4.0] * 4}),
                 PADDED, "RoPE scaling (longrope)"),
}


def family(config_name, model_name, extra):
    config_class, model_class = (getattr(transformers, name, None) for name in (config_name, model_name))
    if config_class is None or model_class is None:
        pytest.skip(f"{model_name} is not in this transformers")
    torch.manual_seed(0)
    return model_class(config_class(**{**BASE, **extra})).eval()


def batches(options):
    lengths = prefix_sharing.shared_lengths(options, EXAMPLES)
    return prefix_sharing.probe_batches(options, EXAMPLES, 0, lengths)


def test_the_tiny_examples_share_beyond_the_first_batch():
    lengths = prefix_sharing.shared_lengths(OPTIONS, EXAMPLES)
    first, longest = batches(OPTIONS)
    assert lengths[0] is None and all(lengths[1:])  # the first pair's rows keep two prompts
    assert first["shared_input_ids"].shape[1] < SHORT < LONGEST == longest["shared_input_ids"].shape[1]


@pytest.mark.parametrize("name", EXACT)
def test_an_exact_family_keeps_the_layout(name):
    model = family(*EXACT[name])
    assert prefix_sharing.problem(OPTIONS, model, EXAMPLES, 0, dpo.completion_logps) is None
    for batch in batches(OPTIONS):  # the model itself, in fp32: log-probs and every gradient
        assert max(prefix_sharing.layout_differences(model, batch, dpo.completion_logps).values()) \
            <= prefix_sharing.TOLERANCE


@pytest.mark.parametrize("name", REFUSED)
def test_a_family_the_layout_is_not_exact_for_is_refused(name):
    config_name, model_name, extra, options, reason = REFUSED[name]
    model = family(config_name, model_name, extra)
    assert reason in prefix_sharing.problem(options, model, EXAMPLES, 0, dpo.completion_logps)
    numeric = prefix_sharing.numeric_problem(model, batches(options), dpo.completion_logps)
    assert numeric and ("from the concatenated rows by" in numeric or "fails on shared rows" in numeric)
    if name == "lfm2":  # log-probs 2e-7 off on the narrow copy, its conv layers' gradients 30%
        assert "gradient of" in numeric
    try:  # the refusal is needed: the model itself scores the shared rows otherwise, or cannot take them
        worst = max(max(prefix_sharing.layout_differences(model, batch, dpo.completion_logps).values())
                    for batch in batches(options))
    except Exception:  # noqa: BLE001
        worst = float("inf")
    assert worst > 100 * prefix_sharing.TOLERANCE


def test_under_bf16_the_check_is_made_in_fp32():
    """A bf16 model (and bf16 autocast around the call): the check still runs on an fp32 copy at fp32
    tolerance, so a local window it cannot see at bf16 noise is refused and an exact family is kept."""
    options = run_options(bf16=True)
    neo = family(*REFUSED["gpt_neo_local"][:3]).to(torch.bfloat16)
    llama = family(*EXACT["llama"]).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reason = prefix_sharing.numeric_problem(neo, batches(options), dpo.completion_logps)
        assert "from the concatenated rows by" in reason
        assert prefix_sharing.problem(options, llama, EXAMPLES, 0, dpo.completion_logps) is None


@pytest.mark.parametrize("truncation_scope", ["row", "pair"])
@pytest.mark.parametrize("truncation_mode", ["keep_end", "keep_start"])
def test_shared_lengths_are_those_of_share_prompts(truncation_mode, truncation_scope):
    """The lengths the window rule uses are the widths share_prompts builds (None where it refuses a pair)."""
    options = run_options(max_length=20, truncation_mode=truncation_mode, truncation_scope=truncation_scope)
    examples = tiny_examples(40, seed=1)
    lengths = prefix_sharing.shared_lengths(options, examples)
    for example, length in zip(examples, lengths):
        batch = data.collate([example], 0, 20, truncation_mode, None, truncation_scope)
        shared = prefix_sharing.share_prompts(batch, 0)
        assert length == (None if shared is None else shared["shared_input_ids"].shape[1])
    assert any(lengths) and (truncation_scope == "pair" or not all(lengths))


def test_the_check_does_not_depend_on_the_first_batch(tmp_path, capsys):
    """--truncation_scope row and a long first pair: the first batch cannot be shared, later ones can. A tiny
    MPT (ALiBi: positions from key indices) is still refused, and trains exactly as with --prefix_sharing
    False."""
    from transformers import MptConfig, MptForCausalLM

    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    mpt = MptConfig(vocab_size=len(tokenizer), d_model=32, n_heads=4, n_layers=2, max_seq_len=128,
                    pad_token_id=0, bos_token_id=1, eos_token_id=2)
    MptForCausalLM(mpt).save_pretrained(tmp_path / "mpt")
    tokenizer.save_pretrained(tmp_path / "mpt")
    dataset = make_preference_dir(tmp_path / "data")
    rows = (tmp_path / "data" / "train.jsonl").read_text()
    long_pair = {"prompt": " ".join(["the movie was very good and"] * 6), "chosen": " great great yes",
                 "rejected": " no"}
    (tmp_path / "data" / "train.jsonl").write_text(json.dumps(long_pair) + "\n" + rows)
    tiny = {"model": str(tmp_path / "mpt"), "dataset": dataset}
    for sharing in ("True", "False"):
        cfg = config(tiny, tmp_path / sharing, "--truncation_scope", "row", "--max_steps", "2",
                     "--prefix_sharing", sharing)
        dpo.main(cfg)
        assert cfg.prefix_sharing is False
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("prefix sharing off")]
    assert lines == ["prefix sharing off: its ALiBi biases come from key indices, not from position ids; "
                     "each pair is scored as two concatenated rows"]
    assert records(tmp_path / "True", timing=False) == records(tmp_path / "False", timing=False)


@pytest.mark.parametrize("window, kept", [(4, False), (64, True)])
def test_a_sliding_window_is_refused_only_if_shorter_than_the_longest_row(tmp_path, capsys, window, kept):
    """Mistral-style sliding-window attention through the command line: the custom mask replaces the window,
    which is exact only where the window would cut nothing."""
    from transformers import MistralConfig, MistralForCausalLM

    tokenizer = make_tokenizer()
    config_ = MistralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                            num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                            sliding_window=window, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    MistralForCausalLM(config_).save_pretrained(tmp_path / "mistral")
    tokenizer.save_pretrained(tmp_path / "mistral")
    cfg = config({"model": str(tmp_path / "mistral"), "dataset": make_preference_dir(tmp_path / "data")},
                 tmp_path / "out", "--max_steps", "1")
    dpo.main(cfg)
    out = capsys.readouterr().out
    assert cfg.prefix_sharing is kept
    assert kept or f"off: its local attention window (sliding_window {window}) is shorter than" in out
