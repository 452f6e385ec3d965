"""The shared-prompt forward (prefix_sharing.share_prompts + dpo.completion_logps): each pair as one row [prompt; chosen;
rejected], the rejected completion's positions restarting after the prompt and its tokens unable to see the chosen
ones. The numbers must be those of the concatenated rows [prompt+chosen; prompt+rejected]: per-token log-probs and
gradients within 1e-5 in fp32 for full fine-tuning, LoRA, QLoRA and gradient checkpointing, and the same training
in every reference mode. A model that cannot take the layout falls back, saying so in one line."""
import json
import math

import pytest
import torch

import data
from harness import datafiles
import dpo
from harness import options
from speedups import prefix_sharing
from tiny import make_preference_dir, make_tokenizer, read_records as records, run_config as config

LN2 = math.log(2)


def test_layout_by_hand():
    """Pair 0: prompt [5,6], chosen [7,8], rejected [9]; pair 1: prompt [5], chosen [7], rejected [8,9,10].
    Shared rows: [5,6,7,8,9] with positions 0,1,2,3,2 and [5,7,8,9,10] with positions 0,1,1,2,3. The rejected token
    9 of pair 0 (index 4) sees 5,6 and itself, not 7,8. Concatenated row 2 (pair 0's rejected) scores token 9 at
    position 2 from the hidden state at position 1 (the last prompt token): shared (0, 1). Row 3 (pair 1's
    rejected) scores 8,9,10 from positions 0,1,2 -> shared (1, 0), (1, 2), (1, 3) (past the prompt, shifted by the
    chosen completion's length 1)."""
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
    padded = prefix_sharing.share_prompts(batch, pad_token_id=0, pad_to_multiple_of=8)  # --pad_to_multiple_of: 5 -> 8 columns
    assert padded["shared_input_ids"].tolist() == [[5, 6, 7, 8, 9, 0, 0, 0], [5, 7, 8, 9, 10, 0, 0, 0]]
    assert torch.equal(padded["shared_attention_mask"][:, :, :5, :5], shared["shared_attention_mask"])
    assert not padded["shared_attention_mask"][:, :, :, 5:].any()  # no token attends to the padding
    for key in ("shared_position_ids", "shared_rows", "shared_positions"):
        assert torch.equal(padded[key][..., :5] if key == "shared_position_ids" else padded[key], shared[key])


def test_pairs_with_two_different_prompts_are_not_shared():
    """truncation_scope "row" with keep_end can leave a pair's rows with different prompts: no shared layout."""
    examples = [{"prompt_ids": [5, 6, 7], "chosen_ids": [8, 9, 10], "rejected_ids": [11]}]
    batch = data.collate(examples, pad_token_id=0, max_length=4)  # chosen row keeps [7,8,9,10], rejected [5,6,7,11]
    assert prefix_sharing.share_prompts(batch, 0) is None


def batch_of(tiny, n=6):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny["model"])
    train, _ = datafiles.load_preference_dataset(tiny["dataset"])
    examples = data.prepare_dataset(train.select(range(n)), tokenizer, max_length=12, verbose=False)  # some cut
    batch = data.collate(examples, data.pad_token_id(tokenizer), 12)
    return batch, {**batch, **prefix_sharing.share_prompts(batch, data.pad_token_id(tokenizer))}


@pytest.mark.parametrize("mode", [["--use_peft", "False"], [], ["--load_in_4bit"],
                                  ["--use_peft", "False", "--gradient_checkpointing"], ["--gradient_checkpointing"]],
                         ids=["full", "lora", "qlora", "full+checkpointing", "lora+checkpointing"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_logps_and_gradients_equal_the_concatenated_rows(tiny, mode, attention):
    cfg = config(tiny, "unused", *mode)
    torch.manual_seed(0)
    model = dpo.load_model(cfg, tiny["model"], torch.device("cpu"), trainable=True)
    model.config._attn_implementation = attention  # (the base config: PEFT forwards it)
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
        results.append((logps.detach(), stats, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (a, stats_a, grads_a), (b, stats_b, grads_b) = results
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    for key in stats_a:
        torch.testing.assert_close(stats_b[key], stats_a[key], atol=1e-5, rtol=1e-5)
    assert grads_a and grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], atol=1e-5, rtol=1e-5)
    assert shared["shared_input_ids"].numel() < concatenated["input_ids"].numel()  # the prompts are computed once


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
        dpo.main(config(tiny, tmp_path / sharing, "--max_steps", "4", "--eval_steps", "2", "--prefix_sharing", sharing,
                        *mode))
    on, off = records(tmp_path / "True"), records(tmp_path / "False")
    assert len(on) == len(off)
    for a, b in zip(on, off):
        for key in a.keys() - {"tokens_per_second"}:
            assert a[key] == pytest.approx(b[key], abs=1e-5), key
    assert json.loads((tmp_path / "True" / "config.json").read_text())["prefix_sharing"] is True
    if "--reference_free" not in mode and "--loss_type" not in mode:
        assert on[0]["loss"] == pytest.approx(LN2, abs=1e-6)


def test_a_model_that_ignores_position_ids_falls_back_with_one_line(tiny, tmp_path, monkeypatch, capsys):
    """A decoder that builds its own positions (here: Llama with position_ids dropped) would score the rejected
    completion at the wrong positions; the start-up check sees the difference and turns prefix sharing off."""
    from transformers.models.llama import modeling_llama

    real = modeling_llama.LlamaModel.forward
    monkeypatch.setattr(modeling_llama.LlamaModel, "forward",
                        lambda self, *a, position_ids=None, **k: real(self, *a, **k))
    cfg = config(tiny, tmp_path, "--max_steps", "1")
    dpo.main(cfg)
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("prefix sharing off")]
    assert len(lines) == 1 and "differ from the concatenated rows" in lines[0]
    assert cfg.prefix_sharing is False and records(tmp_path)[0]["loss"] == pytest.approx(LN2, abs=1e-6)
    assert json.loads((tmp_path / "config.json").read_text())["prefix_sharing"] is False


def test_a_sliding_window_shorter_than_a_shared_row_falls_back(tmp_path, capsys):
    """Mistral-style sliding-window attention: a custom mask replaces the window, so the layout is refused when a
    shared row could be longer than the window."""
    from transformers import MistralConfig, MistralForCausalLM

    tokenizer = make_tokenizer()
    config_ = MistralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=4, num_key_value_heads=2, sliding_window=16,
                            bos_token_id=1, eos_token_id=2, pad_token_id=0)
    MistralForCausalLM(config_).save_pretrained(tmp_path / "mistral")
    tokenizer.save_pretrained(tmp_path / "mistral")
    dataset = make_preference_dir(tmp_path / "data")
    dpo.main(options.parse_args(["--model", str(tmp_path / "mistral"), "--dataset", dataset, "--output_dir",
                             str(tmp_path / "out"), "--max_length", "32", "--max_steps", "1", "--show_examples", "0"]))
    out = capsys.readouterr().out
    assert "prefix sharing off: its sliding window (16) is shorter than a shared row can be (64)" in out
