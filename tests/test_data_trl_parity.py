"""data.py against TRL 1.16 on real Anthropic HH rows, and the whole HH file through prepare_dataset.

The reference is TRL's own code (a development dependency): `DPOTrainer._prepare_dataset` (called on a stub that
holds the one attribute it reads, and once through a real DPOTrainer on a tiny model) and
`DataCollatorForPreference`. Nothing is downloaded: the tokenizers are byte-level BPEs trained here on HH text, one
like GPT-2/Qwen (no BOS, no pad, EOS <|endoftext|>) and one like Llama (a post-processor prepends <s>, EOS </s>),
each with a ChatML chat template for the conversational path (the Llama-like one writes {{ bos_token }} too).

HH rows are implicit-prompt strings ("\\n\\nHuman: ...\\n\\nAssistant: ..."). About 1 in 7 split inside a word
("Assistant: I" / "Assistant: It"), so the prompt's last token merges with the completion and TRL's common-prefix
rule is exercised on real data.
"""

import copy
import gzip
import json
import re
from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

import data

HH = Path(__file__).resolve().parents[1].parent / "shared/data/hh_harmless_test.jsonl.gz"
N_PARITY = 300  # rows compared with TRL (the issue asks for at least 200)
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def hh_rows():
    if not HH.exists():
        pytest.skip(f"{HH} not found (the HH data lives outside the repo, in ../shared/data)")
    with gzip.open(HH, "rt") as f:
        return [json.loads(line) for line in f]


def bpe_tokenizer(texts, bos):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=2000, special_tokens=["<|endoftext|>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
        tokenizer.chat_template = "{{ bos_token }}" + CHATML
    else:
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
        tokenizer.chat_template = CHATML
    return tokenizer


@pytest.fixture(scope="module")
def tokenizers_(hh_rows):
    texts = [row["chosen"] for row in hh_rows[:1000]]
    return {"no_bos": bpe_tokenizer(texts, bos=False), "bos": bpe_tokenizer(texts, bos=True)}


def to_messages(text):
    """HH text to messages: "\\n\\nHuman: a\\n\\nAssistant: b" -> [{"role": "user", "content": "a"},
    {"role": "assistant", "content": "b"}]."""
    parts = re.split(r"\n\n(Human|Assistant):", text)[1:]
    return [{"role": "user" if role == "Human" else "assistant", "content": content.strip()}
            for role, content in zip(parts[0::2], parts[1::2])]


def parity_rows(hh_rows, fmt):
    """The first N_PARITY rows on which TRL's prompt extraction and the longest common prefix agree: neither answer
    a prefix of the other (TRL then splits one character early, data.py drops the empty completion); for messages,
    the two conversations differ only in their last, assistant message. Whitespace-only answers are left out too:
    data.py drops them (nothing to prefer), TRL keeps them."""
    if fmt == "standard":
        rows = [r for r in hh_rows
                if not r["chosen"].startswith(r["rejected"]) and not r["rejected"].startswith(r["chosen"])
                and not any(map(data._blank, data.extract_prompt(r["chosen"], r["rejected"])[1:]))]
    else:
        pairs = [(to_messages(r["chosen"]), to_messages(r["rejected"])) for r in hh_rows]
        rows = [{"chosen": c, "rejected": r} for c, r in pairs
                if c[:-1] == r[:-1] and c[-1] != r[-1] and c[-1]["role"] == "assistant"
                and not data._blank(c[-1:]) and not data._blank(r[-1:])]
    assert len(rows) >= N_PARITY
    return rows[:N_PARITY]


def trl_prepare(rows, tokenizer, max_length, truncation_mode):
    """TRL 1.16's own dataset preparation: prompt extraction, EOS, tokenization, and the keep_start filter."""
    from trl.trainer.dpo_trainer import DPOTrainer
    trainer = SimpleNamespace(_tokenizer=tokenizer)  # the only attribute _prepare_dataset reads (for eos_token)
    args = SimpleNamespace(dataset_num_proc=None, max_length=max_length, truncation_mode=truncation_mode)
    prepared = DPOTrainer._prepare_dataset(trainer, datasets.Dataset.from_list(rows), tokenizer, args, "train")
    return prepared.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"]).to_list()


def assert_same_batches(ours, theirs, pad_token_id, max_length, truncation_mode, batch_size=16):
    from trl.trainer.dpo_trainer import DataCollatorForPreference
    collator = DataCollatorForPreference(pad_token_id=pad_token_id, max_length=max_length,
                                         truncation_mode=truncation_mode)
    for start in range(0, len(theirs), batch_size):
        expected = collator(theirs[start:start + batch_size])
        got = data.collate(ours[start:start + batch_size], pad_token_id, max_length, truncation_mode)
        assert got.keys() == expected.keys()
        for key in expected:
            assert torch.equal(got[key], expected[key]), (start, key)


@pytest.mark.trl
@pytest.mark.parametrize("kind", ["no_bos", "bos"])
@pytest.mark.parametrize("fmt", ["standard", "conversational"])
def test_tokenization_matches_trl(hh_rows, tokenizers_, fmt, kind):
    """prompt_ids, chosen_ids and rejected_ids equal TRL's for 300 real rows, for both formats and both
    tokenizers. Standard rows cross the boundary-merge rule many times; BOS-adding tokenizers have one BOS."""
    pytest.importorskip("trl")
    tokenizer, rows = tokenizers_[kind], parity_rows(hh_rows, fmt)
    counts = {}
    ours = data.prepare_dataset(rows, tokenizer, max_length=None, verbose=False, counts=counts)
    assert ours == trl_prepare(rows, tokenizer, None, "keep_start")
    assert counts["kept"] == N_PARITY
    if fmt == "standard":
        assert counts["prompt_boundary"] > 10  # the common-prefix rule was exercised, not only the easy case
    if kind == "bos":
        assert all(r["prompt_ids"][0] == 1 and (r["prompt_ids"] + r["chosen_ids"]).count(1) == 1 for r in ours)


@pytest.mark.trl
@pytest.mark.parametrize("mode", ["keep_end", "keep_start"])
@pytest.mark.parametrize("kind", ["no_bos", "bos"])
def test_collation_matches_trl(hh_rows, tokenizers_, kind, mode):
    """For max_length 32, 128, 512 and None: the same rows survive (keep_start drops prompts >= max_length, as TRL)
    and every collated batch (input_ids, attention_mask, completion_mask) equals TRL's DataCollatorForPreference.
    32 is short enough that keep_start drops rows and keep_end leaves rows with no prompt at all."""
    pytest.importorskip("trl")
    tokenizer, rows = tokenizers_[kind], parity_rows(hh_rows, "standard")
    pad = data.pad_token_id(tokenizer)
    for max_length in (32, 128, 512, None):
        counts = {}
        ours = data.prepare_dataset(rows, tokenizer, max_length=max_length, truncation_mode=mode, truncation_scope="row", verbose=False,
                                    counts=counts)
        theirs = trl_prepare(rows, tokenizer, max_length, mode)
        assert ours == theirs, max_length
        assert_same_batches(ours, theirs, pad, max_length, mode)
        if max_length == 32:
            assert counts["prompt_too_long" if mode == "keep_start" else "no_prompt_left"] > 0


@pytest.mark.trl
def test_conversational_collation_matches_trl(hh_rows, tokenizers_):
    """The chat-template path, collated at max_length 64 in both modes, equals TRL."""
    pytest.importorskip("trl")
    tokenizer, rows = tokenizers_["bos"], parity_rows(hh_rows, "conversational")
    for mode in ("keep_end", "keep_start"):
        ours = data.prepare_dataset(rows, tokenizer, max_length=64, truncation_mode=mode, truncation_scope="row", verbose=False)
        theirs = trl_prepare(rows, tokenizer, 64, mode)
        assert ours == theirs
        assert_same_batches(ours, theirs, data.pad_token_id(tokenizer), 64, mode)


@pytest.mark.trl
def test_a_real_dpo_trainer_prepares_and_collates_the_same(hh_rows, tokenizers_, tmp_path):
    """A DPOTrainer on a tiny random Llama (keep_start, max_length 64): its prepared train_dataset and its
    data_collator's batches equal ours, so calling _prepare_dataset on a stub above is faithful."""
    trl = pytest.importorskip("trl")
    from transformers import LlamaConfig, LlamaForCausalLM
    tokenizer = copy.deepcopy(tokenizers_["bos"])  # the trainer sets a missing pad token on the tokenizer it gets
    rows = parity_rows(hh_rows, "standard")[:100]
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)
    args = trl.DPOConfig(output_dir=str(tmp_path), max_length=64, truncation_mode="keep_start", report_to="none",
                         bf16=False, use_cpu=True)
    trainer = trl.DPOTrainer(model=LlamaForCausalLM(config), ref_model=LlamaForCausalLM(config), args=args,
                             train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer)
    theirs = trainer.train_dataset.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"]).to_list()
    ours = data.prepare_dataset(rows, tokenizers_["bos"], max_length=64, truncation_mode="keep_start",
                                truncation_scope="row", verbose=False)
    assert ours == theirs and 0 < len(ours) < 100
    assert trainer.data_collator.pad_token_id == data.pad_token_id(tokenizers_["bos"])  # no pad: both use EOS
    for start in range(0, len(ours), 16):
        expected = trainer.data_collator(theirs[start:start + 16])
        got = data.collate(ours[start:start + 16], data.pad_token_id(tokenizers_["bos"]), 64, "keep_start")
        assert all(torch.equal(got[key], expected[key]) for key in expected)


def test_whole_hh_file_at_max_length_512(hh_rows, tokenizers_):
    """All 2,312 HH pairs through prepare_dataset at max_length 512, both modes, on the no-BOS BPE tokenizer.

    Drops, derived from the raw text: no pair has chosen == rejected; a pair whose one answer is a prefix of the
    other, up to spaces, has an empty or whitespace-only completion (dropped).
    Truncation counts are re-derived from the returned rows: a pair is cut by max_length when
    len(prompt) + max(len(chosen), len(rejected)) > 512, and (keep_end) keeps no prompt when a completion has
    >= 512 tokens. keep_start keeps the same rows minus those whose prompt has >= 512 tokens."""
    tokenizer = tokenizers_["no_bos"]
    identical = sum(r["chosen"] == r["rejected"] for r in hh_rows)
    empty = sum(any(map(data._blank, data.extract_prompt(r["chosen"], r["rejected"])[1:]))
                for r in hh_rows if r["chosen"] != r["rejected"])
    results = {}
    for mode in ("keep_end", "keep_start"):
        counts = {}
        rows = data.prepare_dataset(hh_rows, tokenizer, max_length=512, truncation_mode=mode, truncation_scope="row", counts=counts,
                                    name=f"hh {mode}")
        results[mode] = rows, counts
        assert counts["rows"] == len(hh_rows) == 2312
        assert (counts["identical"], counts["empty_completion"]) == (identical, empty)
        assert len(rows) == counts["kept"] == 2312 - identical - empty - counts["prompt_too_long"]
        longest = [max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in rows]
        assert counts["max_length_truncated"] == sum(len(r["prompt_ids"]) + n > 512 for r, n in zip(rows, longest))
        assert counts["no_prompt_left"] == (sum(n >= 512 for n in longest) if mode == "keep_end" else 0)
        for start in range(0, len(rows), 64):
            batch = data.collate(rows[start:start + 64], data.pad_token_id(tokenizer), 512, mode)
            assert batch["input_ids"].shape[1] <= 512
            assert (batch["completion_mask"].sum(1) > 0).all()  # every sequence keeps a completion token
    (end_rows, end), (start_rows, start) = results["keep_end"], results["keep_start"]
    assert start["prompt_too_long"] == sum(len(r["prompt_ids"]) >= 512 for r in end_rows)
    assert start_rows == [r for r in end_rows if len(r["prompt_ids"]) < 512]
    print(f"\nHH harmless test, {len(hh_rows)} pairs, max_length 512, BPE-2000 test tokenizer: "
          f"dropped {end['identical']} identical + {end['empty_completion']} empty completion; "
          f"keep_end: {end['max_length_truncated']} truncated, {end['no_prompt_left']} with no prompt left; "
          f"keep_start: {start['prompt_too_long']} more dropped, {start['max_length_truncated']} truncated; "
          f"{end['prompt_boundary']} boundary merges")
