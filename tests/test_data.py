"""data.py on a word-level tokenizer built here, with every expected token id written out by hand.

Vocabulary (see `word_tokenizer`): <pad>=0 <s>=1 </s>=2 <unk>=3 <|user|>=4 <|assistant|>=5 <|end|>=6 <|system|>=7
<think>=8, the letters a..z = 10..35 (a=10, b=11, c=12, ... z=35), then "bc"=36 and "bd"=37. Words are split on
whitespace, so "a b c" is three tokens and spaces never become tokens. The BOS-adding variant prepends <s>=1.
"""

import gzip
import json
import string

import datasets
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

import data
from harness import datafiles

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|end|>", "<|system|>", "<think>"]
WORDS = list(string.ascii_lowercase) + ["bc", "bd"]
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|> {% endif %}")


def word_tokenizer(bos=True, chat_template=CHAT_TEMPLATE, eos="</s>", pad="<pad>"):
    vocab = {token: i for i, token in enumerate(SPECIAL)} | {w: i for i, w in enumerate(WORDS, start=10)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIAL)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token=eos, pad_token=pad,
                                        unk_token="<unk>")
    tokenizer.chat_template = chat_template
    return tokenizer


def ids(letters):
    """Token ids of space-separated letters: ids("a b") == [10, 11]."""
    return [10 + string.ascii_lowercase.index(c) for c in letters.split()]


def prepare(rows, tokenizer=None, **kwargs):
    counts = {}
    out = data.prepare_dataset(rows, tokenizer or word_tokenizer(), counts=counts, verbose=False, **kwargs)
    return out, counts


def test_tokenizer_fixture_is_what_the_hand_calculations_assume():
    """"a b c</s>" -> <s>=1, a=10, b=11, c=12, </s>=2; the helper `ids` agrees."""
    assert word_tokenizer()("a b c</s>")["input_ids"] == [1, 10, 11, 12, 2]
    assert word_tokenizer(bos=False)("a b c</s>")["input_ids"] == [10, 11, 12, 2]
    assert ids("a b c z") == [10, 11, 12, 35]


# ---------------------------------------------------------------------------------------------------------------
# Truncation: (a) max_prompt_length, (b) max_completion_length, (c) max_length


ROWS_ABC = [{"prompt": "a b c d e f", "chosen": " g h i", "rejected": " j k"},
            {"prompt": "x", "chosen": " y", "rejected": " z z"}]


@pytest.mark.parametrize("mode", ["keep_end", "keep_start"])
def test_all_three_limits_both_modes(mode):
    """Row 0 untruncated: prompt <s> a..f = [1,10,11,12,13,14,15] (7), chosen g h i </s> = [16,17,18,2] (4),
    rejected j k </s> = [19,20,2] (3). Limits: max_prompt_length=4, max_completion_length=3, max_length=6.
      (a) keep_end keeps the prompt's last 4: [12,13,14,15]; keep_start its first 4: [1,10,11,12]
      (b) chosen keeps its first 3: [16,17,18] (EOS cut); rejected has 3, unchanged
      (c) prompt+chosen has 7 > 6 tokens: keep_end [12..18][-6:] = [13,14,15,16,17,18], mask 0,0,0,1,1,1;
          keep_start [1,10,11,12,16,17,18][:6] = [1,10,11,12,16,17], mask 0,0,0,0,1,1; prompt+rejected likewise.
    Row 1: prompt [1,33], chosen [34,2], rejected [35,35,2]: nothing to cut, right-padded with 0 to width 6."""
    rows, counts = prepare(ROWS_ABC, max_length=6, max_prompt_length=4, max_completion_length=3, truncation_mode=mode,
                           truncation_scope="row")
    prompt0 = [12, 13, 14, 15] if mode == "keep_end" else [1, 10, 11, 12]
    assert rows == [{"prompt_ids": prompt0, "chosen_ids": [16, 17, 18], "rejected_ids": [19, 20, 2]},
                    {"prompt_ids": [1, 33], "chosen_ids": [34, 2], "rejected_ids": [35, 35, 2]}]
    assert (counts["prompt_truncated"], counts["completion_truncated"], counts["max_length_truncated"]) == (1, 1, 1)
    assert counts["kept"] == 2 and counts["no_prompt_left"] == 0

    batch = data.collate(rows, pad_token_id=0, max_length=6, truncation_mode=mode)
    if mode == "keep_end":
        chosen0, rejected0, mask0 = [13, 14, 15, 16, 17, 18], [13, 14, 15, 19, 20, 2], [0, 0, 0, 1, 1, 1]
    else:
        chosen0, rejected0, mask0 = [1, 10, 11, 12, 16, 17], [1, 10, 11, 12, 19, 20], [0, 0, 0, 0, 1, 1]
    assert batch["input_ids"].tolist() == [chosen0, [1, 33, 34, 2, 0, 0], rejected0, [1, 33, 35, 35, 2, 0]]
    assert batch["completion_mask"].tolist() == [mask0, [0, 0, 1, 1, 0, 0], mask0, [0, 0, 1, 1, 1, 0]]
    assert batch["attention_mask"].tolist() == [[1] * 6, [1, 1, 1, 1, 0, 0], [1] * 6, [1, 1, 1, 1, 1, 0]]
    assert all(t.dtype == torch.long for t in batch.values())


ROWS_LONG = [{"prompt": "a b c d", "chosen": " e", "rejected": " f"},      # prompt [1,10,11,12,13]: 5 tokens
             {"prompt": "h", "chosen": " i j k l", "rejected": " m"},     # chosen [18,19,20,21,2]: 5 tokens
             {"prompt": "g h i", "chosen": " j", "rejected": " k"}]       # prompt 4 + chosen 2 = 6 tokens


def test_keep_start_drops_a_prompt_that_fills_max_length():
    """max_length=5, keep_start. Row 0's prompt has 5 >= 5 tokens, no completion token would remain: dropped.
    Row 1: [1,17,18,19,20,21,2][:5] = [1,17,18,19,20], mask 0,0,1,1,1 (the end and EOS are cut).
    Row 2: prompt [1,16,17,18] (4 < 5) is kept: [1,16,17,18,19,2][:5] = [1,16,17,18,19], mask 0,0,0,0,1."""
    rows, counts = prepare(ROWS_LONG, max_length=5, truncation_mode="keep_start", truncation_scope="row")
    assert [r["prompt_ids"] for r in rows] == [[1, 17], [1, 16, 17, 18]]
    assert (counts["prompt_too_long"], counts["max_length_truncated"], counts["kept"]) == (1, 2, 2)
    batch = data.collate(rows, 0, max_length=5, truncation_mode="keep_start")
    assert batch["input_ids"].tolist() == [[1, 17, 18, 19, 20], [1, 16, 17, 18, 19],
                                           [1, 17, 22, 2, 0], [1, 16, 17, 18, 20]]
    assert batch["completion_mask"].tolist() == [[0, 0, 1, 1, 1], [0, 0, 0, 0, 1], [0, 0, 1, 1, 0], [0, 0, 0, 0, 1]]


def test_keep_end_row_scope_keeps_a_row_with_no_prompt_left_and_counts_it():
    """TRL's per-sequence rule (truncation_scope "row"). max_length=5, keep_end: nothing is dropped, all 3 rows are longer than 5 in at least one sequence.
    Row 0: [1,10,11,12,13,14,2][-5:] = [11,12,13,14,2], mask 0,0,0,1,1; rejected [11,12,13,15,2].
    Row 1: chosen alone has 5 >= 5 tokens: [18,19,20,21,2], mask all 1, no prompt left (counted);
           its rejected row [1,17,22,2] keeps the whole prompt. Row 2: [1,16,17,18,19,2][-5:] = [16,17,18,19,2]."""
    rows, counts = prepare(ROWS_LONG, max_length=5, truncation_scope="row")  # keep_end is the default
    assert len(rows) == 3
    assert (counts["prompt_too_long"], counts["max_length_truncated"], counts["no_prompt_left"]) == (0, 3, 1)
    batch = data.collate(rows, 0, max_length=5)
    assert batch["input_ids"].tolist() == [[11, 12, 13, 14, 2], [18, 19, 20, 21, 2], [16, 17, 18, 19, 2],
                                           [11, 12, 13, 15, 2], [1, 17, 22, 2, 0], [16, 17, 18, 20, 2]]
    assert batch["completion_mask"].tolist() == [[0, 0, 0, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 1, 1],
                                                 [0, 0, 0, 1, 1], [0, 0, 1, 1, 0], [0, 0, 0, 1, 1]]


def test_keep_end_pair_scope_gives_both_completions_the_same_prompt():
    """truncation_scope "pair" (the default), max_length=5, keep_end (data.truncate_pair):
    Row 0: prompt [1,10,11,12,13], completions [14,2] and [15,2]: 5+2 > 5, the prompt keeps max(5-2, min(5, 5//2)) = 3
           tokens [11,12,13]; both completions fit: [11,12,13,14,2] and [11,12,13,15,2].
    Row 1: prompt [1,17], chosen [18,19,20,21,2], rejected [22,2]: 2+5 > 5, the prompt keeps max(5-5, min(2, 2)) = 2
           (all of it) and each completion its first 5-2 = 3 tokens: [1,17,18,19,20] and [1,17,22,2]. The row rule
           gave the chosen no prompt at all while its rejected saw the whole prompt.
    Row 2: prompt [1,16,17,18], completions [19,2] and [20,2]: the prompt keeps max(3, 2) = 3: [16,17,18,19,2]."""
    rows, counts = prepare(ROWS_LONG, max_length=5)
    # prepare_dataset only counts (c); the rows keep their tokens until collate cuts them, in one place
    assert [(r["prompt_ids"], r["chosen_ids"]) for r in rows] == [([1, 10, 11, 12, 13], [14, 2]),
                                                                  ([1, 17], [18, 19, 20, 21, 2]),
                                                                  ([1, 16, 17, 18], [19, 2])]
    assert (counts["pair_prompt_cut"], counts["pair_completion_cut"], counts["no_prompt_left"]) == (2, 1, 0)
    assert data.truncate([1, 17], [18, 19, 20, 21, 2], [22, 2], 5) == [([1, 17, 18, 19, 20], [0, 0, 1, 1, 1]),
                                                                       ([1, 17, 22, 2], [0, 0, 1, 1])]
    batch = data.collate(rows, 0, max_length=5, truncation_scope="pair")
    assert batch["input_ids"].tolist() == [[11, 12, 13, 14, 2], [1, 17, 18, 19, 20], [16, 17, 18, 19, 2],
                                           [11, 12, 13, 15, 2], [1, 17, 22, 2, 0], [16, 17, 18, 20, 2]]
    assert batch["completion_mask"].tolist() == [[0, 0, 0, 1, 1], [0, 0, 1, 1, 1], [0, 0, 0, 1, 1],
                                                 [0, 0, 0, 1, 1], [0, 0, 1, 1, 0], [0, 0, 0, 1, 1]]


def test_keep_start_is_the_same_in_both_scopes():
    pair = data.collate(prepare(ROWS_LONG, max_length=5, truncation_mode="keep_start")[0], 0, 5, "keep_start",
                        truncation_scope="pair")
    row = data.collate(prepare(ROWS_LONG, max_length=5, truncation_mode="keep_start", truncation_scope="row")[0], 0, 5,
                       "keep_start")
    assert all(torch.equal(pair[k], row[k]) for k in row)


@pytest.mark.parametrize("mode", ["keep_end", "keep_start"])
def test_truncate_pair_rules_hold_for_every_length(mode):
    """Over all prompt/completion lengths up to 9 and max_length 2..12: both sequences fit, share one non-empty
    prompt that is a suffix (keep_end) or the prompt itself (keep_start), completions keep their first tokens up to
    the same room (the shorter is cut only if it must be), and a pair that fits is untouched."""
    import itertools

    for p, c, r, length in itertools.product(range(1, 10), range(1, 10), range(1, 10), range(2, 13)):
        if mode == "keep_start" and p >= length:
            continue  # dropped by prepare_dataset before truncate_pair
        prompt, chosen, rejected = list(range(100, 100 + p)), list(range(200, 200 + c)), list(range(300, 300 + r))
        kp, kc, kr = data.truncate_pair(prompt, chosen, rejected, length, mode)
        assert 1 <= len(kp) and len(kp) + max(len(kc), len(kr)) <= length
        assert kp == (prompt[len(prompt) - len(kp):] if mode == "keep_end" else prompt)
        assert kc == chosen[:len(kc)] and kr == rejected[:len(kr)] and kc and kr
        room = length - len(kp)  # both completions are cut at the same length: the shorter one only if it must be
        assert (len(kc), len(kr)) == (min(c, room), min(r, room))
        if p + max(c, r) <= length:
            assert (kp, kc, kr) == (prompt, chosen, rejected)
        if mode == "keep_end" and len(kp) < p:
            assert len(kp) >= min(p, length // 2)


def test_max_length_none_cuts_nothing_and_limits_are_checked():
    """max_length=None: rows are full length; an invalid limit or mode is a ValueError naming the option."""
    rows, counts = prepare(ROWS_LONG, max_length=None, truncation_mode="keep_start")
    assert len(rows) == 3 and counts["max_length_truncated"] == 0
    assert data.collate(rows, 0)["input_ids"].shape == (6, 7)  # longest: <s> h i j k l </s>
    with pytest.raises(ValueError, match="truncation_mode must be 'keep_end' or 'keep_start', got 'left'"):
        prepare(ROWS_LONG, truncation_mode="left")
    with pytest.raises(ValueError, match="max_length must be a positive integer or None, got 0"):
        prepare(ROWS_LONG, max_length=0)
    with pytest.raises(ValueError, match="max_prompt_length must be a positive integer or None, got '8'"):
        prepare(ROWS_LONG, max_prompt_length="8")


def test_pair_identical_after_truncation_is_counted():
    """chosen " b c d" and rejected " b c e" keep their first 2 tokens [11,12] under max_completion_length=2:
    the pair becomes identical, kept but counted (no learning signal)."""
    rows, counts = prepare([{"prompt": "a", "chosen": " b c d", "rejected": " b c e"}], max_completion_length=2)
    assert rows[0]["chosen_ids"] == rows[0]["rejected_ids"] == [11, 12]
    assert counts["identical_after_truncation"] == 1 and counts["completion_truncated"] == 1


# ---------------------------------------------------------------------------------------------------------------
# TRL's collator examples (TRL 1.16 dpo_trainer.py docstring L119-136; reference notes section 3.4)


TRL_EXAMPLES = [{"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6]},
                {"prompt_ids": [7, 8], "chosen_ids": [9, 10, 11], "rejected_ids": [12, 13, 14, 15]}]


def test_trl_documented_collator_example_max_length_4():
    """The tensors TRL's DataCollatorForPreference gives for max_length=4 (reference notes section 3.4)."""
    keep_start = data.collate(TRL_EXAMPLES, 0, max_length=4, truncation_mode="keep_start")
    assert keep_start["input_ids"].tolist() == [[1, 2, 3, 4], [7, 8, 9, 10], [1, 2, 3, 6], [7, 8, 12, 13]]
    assert keep_start["completion_mask"].tolist() == [[0, 0, 0, 1], [0, 0, 1, 1], [0, 0, 0, 1], [0, 0, 1, 1]]
    assert keep_start["attention_mask"].tolist() == [[1] * 4] * 4
    keep_end = data.collate(TRL_EXAMPLES, 0, max_length=4, truncation_mode="keep_end")
    assert keep_end["input_ids"].tolist() == [[2, 3, 4, 5], [8, 9, 10, 11], [1, 2, 3, 6], [12, 13, 14, 15]]
    assert keep_end["completion_mask"].tolist() == [[0, 0, 1, 1], [0, 1, 1, 1], [0, 0, 0, 1], [1, 1, 1, 1]]
    assert keep_end["attention_mask"].tolist() == [[1] * 4] * 4


def test_trl_docstring_example_padding_multiple_and_ref_logps():
    """TRL's docstring batch (no max_length): width 5 = the longest row [1,2,3,4,5]; pad_to_multiple_of=4 rounds
    5 up to 8; ref logps come through as float tensors [B] only when every example has them."""
    examples = [{"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6], "ref_chosen_logps": 0.1,
                 "ref_rejected_logps": 0.2},
                {"prompt_ids": [7, 8], "chosen_ids": [9], "rejected_ids": [10, 11], "ref_chosen_logps": 0.3,
                 "ref_rejected_logps": 0.4}]
    batch = data.collate(examples, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [7, 8, 9, 0, 0], [1, 2, 3, 6, 0], [7, 8, 10, 11, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0]]
    assert batch["completion_mask"].tolist() == [[0, 0, 0, 1, 1], [0, 0, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 1, 1, 0]]
    assert torch.allclose(batch["ref_chosen_logps"], torch.tensor([0.1, 0.3]))
    assert torch.allclose(batch["ref_rejected_logps"], torch.tensor([0.2, 0.4]))
    assert batch["ref_chosen_logps"].dtype == torch.float32
    padded = data.collate(examples, pad_token_id=9, pad_to_multiple_of=4)
    assert padded["input_ids"].tolist()[1] == [7, 8, 9, 9, 9, 9, 9, 9]
    assert padded["attention_mask"].tolist()[1] == [1, 1, 1, 0, 0, 0, 0, 0]
    assert "ref_chosen_logps" not in data.collate([examples[0], TRL_EXAMPLES[0]], 0)


def test_pad_token_falls_back_to_eos():
    """pad <pad>=0 if set; else EOS </s>=2; neither is a clear error. The masks come from lengths, so an EOS used
    as padding is still scored: row [1,10,2] keeps completion mask 1 on its EOS next to the pad 2s."""
    assert data.pad_token_id(word_tokenizer()) == 0
    no_pad = word_tokenizer(pad=None)
    assert data.pad_token_id(no_pad) == 2
    batch = data.collate([{"prompt_ids": [1], "chosen_ids": [10, 2], "rejected_ids": [2]}], data.pad_token_id(no_pad))
    assert batch["input_ids"].tolist() == [[1, 10, 2], [1, 2, 2]]
    assert batch["completion_mask"].tolist() == [[0, 1, 1], [0, 1, 0]]
    with pytest.raises(ValueError, match="neither a pad token nor an EOS token"):
        data.pad_token_id(word_tokenizer(pad=None, eos=None))


# ---------------------------------------------------------------------------------------------------------------
# Formats, prompt extraction, chat template, EOS and BOS


def test_extract_prompt_rules():
    """Longest common prefix; a space at the split goes to the completions; a split inside a word stays there;
    conversations split on whole messages."""
    assert data.extract_prompt("the sky is blue .", "the sky is green .") == ("the sky is", " blue .", " green .")
    assert data.extract_prompt("a bc", "a bd") == ("a b", "c", "d")
    user = {"role": "user", "content": "a"}
    yes, no = {"role": "assistant", "content": "b"}, {"role": "assistant", "content": "c"}
    assert data.extract_prompt([user, yes], [user, no]) == ([user], [yes], [no])


USER, ASSISTANT_C, ASSISTANT_D = ({"role": "user", "content": "a b"}, {"role": "assistant", "content": "c"},
                                  {"role": "assistant", "content": "d"})


@pytest.mark.parametrize("row, expected", [
    # standard: <s> a b = [1,10,11]; completions get EOS: c </s> = [12,2], d </s> = [13,2]
    ({"prompt": "a b", "chosen": " c", "rejected": " d"}, ([1, 10, 11], [12, 2], [13, 2])),
    ({"chosen": "a b c", "rejected": "a b d"}, ([1, 10, 11], [12, 2], [13, 2])),
    # conversational: "<s><|user|> a b <|end|> <|assistant|> " = [1,4,10,11,6,5]; then "c <|end|> " = [12,6], no EOS
    ({"prompt": [USER], "chosen": [ASSISTANT_C], "rejected": [ASSISTANT_D]}, ([1, 4, 10, 11, 6, 5], [12, 6], [13, 6])),
    ({"chosen": [USER, ASSISTANT_C], "rejected": [USER, ASSISTANT_D]}, ([1, 4, 10, 11, 6, 5], [12, 6], [13, 6])),
], ids=["standard-explicit", "standard-implicit", "conversational-explicit", "conversational-implicit"])
def test_each_format(row, expected):
    """The four formats, detected from the data, give the hand-derived ids (see the comments on each case)."""
    rows, _ = prepare([row, row])
    assert len(rows) == 2
    assert (rows[0]["prompt_ids"], rows[0]["chosen_ids"], rows[0]["rejected_ids"]) == expected


def test_multi_turn_implicit_conversation():
    """Prompt = the 3 shared messages: "<s><|user|> a <|end|> <|assistant|> b <|end|> <|user|> c <|end|> <|assistant|> "
    = [1,4,10,6,5,11,6,4,12,6,5]; chosen "d <|end|> " = [13,6], rejected [14,6]."""
    turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    rows, _ = prepare([{"chosen": turns + [{"role": "assistant", "content": "d"}],
                        "rejected": turns + [{"role": "assistant", "content": "e"}]}])
    assert rows == [{"prompt_ids": [1, 4, 10, 6, 5, 11, 6, 4, 12, 6, 5], "chosen_ids": [13, 6],
                     "rejected_ids": [14, 6]}]


def test_tokens_merging_at_the_boundary_follow_the_common_prefix_rule():
    """Implicit "a bc"/"a bd": prompt "a b" = [1,10,11], but prompt+chosen "a bc</s>" = [1,10,36,2] ("bc" is one
    word). Common prefix = 2, so prompt_ids = [1,10], chosen [36,2], rejected [37,2], and the row is counted."""
    rows, counts = prepare([{"chosen": "a bc", "rejected": "a bd"}])
    assert rows == [{"prompt_ids": [1, 10], "chosen_ids": [36, 2], "rejected_ids": [37, 2]}]
    assert counts["prompt_boundary"] == 1


def test_template_whose_generation_prompt_differs_from_the_full_chat():
    """Gemma-like: the generation prompt adds "<think>" that the full chat lacks. Prompt alone
    "<|user|> a b <|end|> <|assistant|> <think> " = [4,10,11,6,5,8]; prompt+chosen [4,10,11,6,5,12,6]: common
    prefix 5 -> prompt [4,10,11,6,5], chosen [12,6]. No {{ bos_token }} here and the template's text is tokenized
    without special tokens, so there is no BOS at all."""
    template = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
                "{% if add_generation_prompt %}<|assistant|> <think> {% endif %}")
    rows, counts = prepare([{"prompt": [USER], "chosen": [ASSISTANT_C], "rejected": [ASSISTANT_D]}],
                           word_tokenizer(chat_template=template))
    assert rows == [{"prompt_ids": [4, 10, 11, 6, 5], "chosen_ids": [12, 6], "rejected_ids": [13, 6]}]
    assert counts["prompt_boundary"] == 1


def test_tools_and_chat_template_kwargs_reach_the_template():
    """tools as a JSON string (as TRL accepts) and a per-row chat_template_kwargs {"hint": "z"}: the template
    writes "<|system|> y <|end|> " for the tool named y and "<|system|> z <|end|> " for the hint, so the prompt is
    [7,34,6, 7,35,6, 4,10,11,6,5]."""
    template = ("{% if tools %}<|system|> {% for t in tools %}{{ t['name'] }} {% endfor %}<|end|> {% endif %}"
                "{% if hint %}<|system|> {{ hint }} <|end|> {% endif %}"
                "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
                "{% if add_generation_prompt %}<|assistant|> {% endif %}")
    row = {"prompt": [USER], "chosen": [ASSISTANT_C], "rejected": [ASSISTANT_D], "tools": '[{"name": "y"}]',
           "chat_template_kwargs": {"hint": "z"}}
    rows, _ = prepare([row], word_tokenizer(chat_template=template))
    assert rows[0]["prompt_ids"] == [7, 34, 6, 7, 35, 6, 4, 10, 11, 6, 5] and rows[0]["chosen_ids"] == [12, 6]


def test_eos_added_once_to_standard_and_never_to_conversational():
    """" c" -> [12,2]; " c</s>" already ends with EOS -> [12,2], not [12,2,2]; conversational completions end with
    the template's <|end|>=6 and contain no </s>=2."""
    rows, _ = prepare([{"prompt": "a", "chosen": " c</s>", "rejected": " d"}])
    assert (rows[0]["chosen_ids"], rows[0]["rejected_ids"]) == ([12, 2], [13, 2])
    rows, _ = prepare([{"prompt": [USER], "chosen": [ASSISTANT_C], "rejected": [ASSISTANT_D]}])
    assert 2 not in rows[0]["chosen_ids"] + rows[0]["rejected_ids"]


def test_exactly_one_bos():
    """BOS-adding tokenizer: one <s>=1 at the start of the prompt, none in completions. Without BOS: none at all.
    A text that already starts with "<s>" would tokenize to [1,1,10]: the second BOS is removed and counted. A
    template with {{ bos_token }} on a BOS-adding tokenizer: one BOS (the rendered text is tokenized without
    adding special tokens again)."""
    row = {"prompt": "a", "chosen": " c", "rejected": " d"}
    rows, _ = prepare([row])
    assert rows[0]["prompt_ids"] == [1, 10] and 1 not in rows[0]["chosen_ids"] + rows[0]["rejected_ids"]
    rows, _ = prepare([row], word_tokenizer(bos=False))
    assert rows[0] == {"prompt_ids": [10], "chosen_ids": [12, 2], "rejected_ids": [13, 2]}
    assert word_tokenizer()("<s>a")["input_ids"] == [1, 1, 10]
    rows, counts = prepare([{"prompt": "<s>a", "chosen": " c", "rejected": " d"}])
    assert rows[0]["prompt_ids"] == [1, 10] and counts["double_bos"] == 1
    rows, _ = prepare([CONV], word_tokenizer(bos=True))
    assert rows[0]["prompt_ids"][:2] == [1, 4] and (rows[0]["prompt_ids"] + rows[0]["chosen_ids"]).count(1) == 1


def test_precomputed_reference_logps_pass_through():
    """ref_chosen_logps / ref_rejected_logps columns are carried to the prepared rows (and then to collate)."""
    rows, _ = prepare(datasets.Dataset.from_list([{"prompt": "a", "chosen": " c", "rejected": " d",
                                                   "ref_chosen_logps": -1.5, "ref_rejected_logps": -2.5}]))
    assert rows[0]["ref_chosen_logps"] == -1.5 and rows[0]["ref_rejected_logps"] == -2.5


# ---------------------------------------------------------------------------------------------------------------
# Drops, reporting and bad input


def test_drops_are_counted_and_reported_once_per_kind(capsys):
    """Row 1: chosen == rejected. Row 2: empty completion. Row 3: " c" and " c " differ as strings but both
    tokenize to [12,2] -> identical. Rows 0 and 4 are kept: prompts <s> a = [1,10] and <s> b = [1,11]. One
    summary line, then one line per kind that occurred."""
    rows = [{"prompt": "a", "chosen": " c", "rejected": " d"},
            {"prompt": "a", "chosen": " c", "rejected": " c"},
            {"prompt": "a", "chosen": "", "rejected": " d"},
            {"prompt": "a", "chosen": " c", "rejected": " c "},
            {"prompt": "b", "chosen": " e", "rejected": " f"}]
    out = data.prepare_dataset(rows, word_tokenizer(), name="train")
    assert [r["prompt_ids"] for r in out] == [[1, 10], [1, 11]]
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("[data] train: 2 of 5 pairs kept")
    assert lines[1:] == ["[data] train: 2 pairs: " + data.COUNT_KINDS["identical"],
                         "[data] train: 1 pairs: " + data.COUNT_KINDS["empty_completion"]]
    assert data.prepare_dataset(rows, word_tokenizer(), verbose=False) == out
    assert capsys.readouterr().out == ""


GOOD = {"prompt": "a", "chosen": " c", "rejected": " d"}
CONV = {"prompt": [USER], "chosen": [ASSISTANT_C], "rejected": [ASSISTANT_D]}


@pytest.mark.parametrize("rows, message", [
    ([GOOD, {"prompt": "a", "chosen": " c"}], r"row 1: missing field 'rejected'"),
    ([GOOD, {**GOOD, "chosen": 5}], r"row 1, field 'chosen': expected a string \(the dataset is in the standard"),
    ([GOOD, {**GOOD, "rejected": None}], r"row 1, field 'rejected': expected a string .* got NoneType"),
    ([GOOD, {**GOOD, "prompt": ""}], r"row 1, field 'prompt': empty prompt"),
    ([{"chosen": "a c", "rejected": "b c"}], r"row 0: 'chosen' and 'rejected' have no common beginning"),
    ([{"chosen": "", "rejected": ""}], r"row 0: 'chosen' and 'rejected' have no common beginning"),
    ([CONV, {**CONV, "chosen": "c"}], r"row 1, field 'chosen': expected a list of messages"),
    ([CONV, {**CONV, "rejected": []}], r"row 1, field 'rejected': empty message list"),
    ([CONV, {**CONV, "prompt": []}], r"row 1, field 'prompt': empty message list"),
    ([CONV, {**CONV, "chosen": [{"role": "bot", "content": "c"}]}],
     r"row 1, field 'chosen', message 0: role 'bot' is not one of"),
    ([CONV, {**CONV, "chosen": [{"content": "c"}]}],
     r"row 1, field 'chosen', message 0: expected a dict with 'role' and 'content'"),
    ([CONV, {**CONV, "chosen": ["c"]}], r"row 1, field 'chosen', message 0: expected a dict"),
    ([CONV, {**CONV, "chosen": [{"role": "assistant", "content": 3}]}],
     r"row 1, field 'chosen', message 0: content must be a string"),
    ([CONV, {**CONV, "rejected": [{"role": "user", "content": "d"}]}],
     r"row 1, field 'rejected': the completion .* must start with an assistant message"),
    ([{**CONV, "tools": "[not json"}], r"row 0, field 'tools': not valid JSON"),
    ([{**CONV, "tools": '{"name": "y"}'}], r"row 0, field 'tools': expected a list of tools, got dict"),
    ([{**CONV, "chat_template_kwargs": ["x"]}], r"row 0, field 'chat_template_kwargs': expected a dict, got list"),
    ([], r"the train dataset is empty"),
])
def test_bad_input_messages(rows, message):
    """Each bad row is a ValueError naming the row, the field and what was expected."""
    with pytest.raises(ValueError, match=message):
        prepare(rows)


def test_bad_dataset_and_tokenizer_messages():
    """A Dataset without a rejected column; conversational data without a chat template; standard data on a
    tokenizer without EOS; a chat template that raises on a row."""
    with pytest.raises(ValueError, match=r"needs 'chosen' and 'rejected' columns .* it has \['prompt', 'chosen'\]"):
        prepare(datasets.Dataset.from_list([{"prompt": "a", "chosen": " c"}]))
    with pytest.raises(ValueError, match="conversational .* but the tokenizer has no chat template"):
        prepare([CONV], word_tokenizer(chat_template=None))
    with pytest.raises(ValueError, match="the tokenizer has no EOS token"):
        prepare([GOOD], word_tokenizer(eos=None))
    strict = "{% if messages[0]['content'] == 'x' %}{{ raise_exception('no x here') }}{% endif %}" + CHAT_TEMPLATE
    with pytest.raises(ValueError, match="row 1: the chat template failed on this row: .*no x here"):
        prepare([CONV, {**CONV, "prompt": [{"role": "user", "content": "x"}]}], word_tokenizer(chat_template=strict))


# ---------------------------------------------------------------------------------------------------------------
# show_example


def test_show_example_marks_every_cut():
    """Raw row 0 of ROWS_ABC, keep_end, limits 4/3/6 (see test_all_three_limits_both_modes): prompt+chosen shows
    <s> a b cut by max_prompt_length (3 tokens), c cut by max_length (1), d e f kept (3), g h i kept (3), </s> cut
    by max_completion_length (1): 6 tokens seen, 3 of them prompt."""
    text = data.show_example(ROWS_ABC[0], word_tokenizer(), max_length=6, max_prompt_length=4, max_completion_length=3)
    chosen_part = text.split("=== prompt + rejected")[0].splitlines()
    assert chosen_part == ["=== prompt + chosen: 6 tokens seen by the model (prompt 3, chosen 3); "
                           "max_length=6, keep_end ===",
                           "[prompt, 3 tokens, CUT by max_prompt_length]", "<s> a b",
                           "[prompt, 1 token, CUT by max_length]", "c",
                           "[prompt, 3 tokens]", "d e f",
                           "[chosen, 3 tokens]", "g h i",
                           "[chosen, 1 token, CUT by max_completion_length]", "</s>"]
    assert "[rejected, 3 tokens]\nj k </s>" in text
    prepared = data.prepare_dataset([ROWS_ABC[0]], word_tokenizer(), verbose=False, max_length=None)[0]
    keep_start = data.show_example(prepared, word_tokenizer(), max_length=5, truncation_mode="keep_start")
    assert ("[prompt, 5 tokens]\n<s> a b c d\n[prompt, 2 tokens, CUT by max_length]\ne f\n"
            "[chosen, 4 tokens, CUT by max_length]") in keep_start
    too_short = data.show_example(prepared, word_tokenizer(), max_length=7, truncation_mode="keep_start")
    assert too_short.startswith("(prepare_dataset drops this pair: prompt alone has >= max_length tokens")
    dropped = data.show_example({**GOOD, "rejected": " c"}, word_tokenizer())
    assert dropped.startswith("this pair is dropped: dropped: chosen == rejected")


# ---------------------------------------------------------------------------------------------------------------
# Loading


def write_rows(path, rows):
    if path.name.endswith(".jsonl.gz"):
        with gzip.open(path, "wt") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        getattr(datasets.Dataset.from_list(rows), "to_" + path.suffix[1:])(str(path))


def prompts(dataset):
    return list(dataset["prompt"])


PAIRS = [{"prompt": f"p{i}", "chosen": f" c{i}", "rejected": f" r{i}"} for i in range(40)]


@pytest.mark.parametrize("filename", ["pairs.jsonl", "pairs.json", "pairs.jsonl.gz", "pairs.parquet", "pairs.csv"])
def test_load_each_local_file_format(tmp_path, filename):
    """40 rows, no eval split: eval = round(0.05 * 40) = 2 held-out rows, train = the other 38 in file order."""
    write_rows(tmp_path / filename, PAIRS)
    train, eval_ = datafiles.load_preference_dataset(str(tmp_path / filename))
    assert (len(train), len(eval_)) == (38, 2)
    assert sorted(prompts(train) + prompts(eval_), key=lambda p: int(p[1:])) == [r["prompt"] for r in PAIRS]
    assert prompts(train) == sorted(prompts(train), key=lambda p: int(p[1:]))
    assert set(train.column_names) == {"prompt", "chosen", "rejected"}


def test_held_out_split_is_seeded_deterministic_and_disjoint(tmp_path):
    """Same seed -> the same held-out rows; train and eval never share a row and together are all 40 rows;
    eval_fraction=0 -> no eval set; a bad fraction is an error."""
    write_rows(tmp_path / "pairs.jsonl", PAIRS)
    path = str(tmp_path / "pairs.jsonl")
    train_a, eval_a = datafiles.load_preference_dataset(path, eval_fraction=0.25, seed=1)
    train_b, eval_b = datafiles.load_preference_dataset(path, eval_fraction=0.25, seed=1)
    assert prompts(eval_a) == prompts(eval_b) and len(eval_a) == 10 and len(train_a) == 30
    assert not set(prompts(train_a)) & set(prompts(eval_a))
    assert set(prompts(train_a)) | set(prompts(eval_a)) == {r["prompt"] for r in PAIRS}
    assert prompts(train_a) == prompts(train_b)
    _, eval_other = datafiles.load_preference_dataset(path, eval_fraction=0.25, seed=2)
    assert prompts(eval_other) != prompts(eval_a)
    train, eval_ = datafiles.load_preference_dataset(path, eval_fraction=0)
    assert len(train) == 40 and eval_ is None
    with pytest.raises(ValueError, match=r"eval_fraction must be in \[0, 1\), got 1.5"):
        datafiles.load_preference_dataset(path, eval_fraction=1.5)


def test_load_folder_of_split_files_and_save_to_disk(tmp_path):
    """train.jsonl + test.jsonl -> eval is test; a saved DatasetDict with validation -> eval is validation; a
    saved single Dataset is the train split; eval_split picks a split by name; missing splits list what exists."""
    folder = tmp_path / "folder"
    folder.mkdir()
    write_rows(folder / "train.jsonl", PAIRS[:30])
    write_rows(folder / "test.jsonl", PAIRS[30:])
    train, eval_ = datafiles.load_preference_dataset(str(folder))
    assert (len(train), len(eval_), eval_[0]["prompt"]) == (30, 10, "p30")

    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(PAIRS[:30]),
                          "validation": datasets.Dataset.from_list(PAIRS[30:35]),
                          "other": datasets.Dataset.from_list(PAIRS[35:])}).save_to_disk(str(saved))
    train, eval_ = datafiles.load_preference_dataset(str(saved))
    assert (len(train), len(eval_)) == (30, 5)
    train, eval_ = datafiles.load_preference_dataset(str(saved), dataset_split="other", eval_split="train")
    assert (len(train), len(eval_)) == (5, 30)
    with pytest.raises(ValueError, match=r"split 'test' not found in .* it has: \['train', 'validation', 'other'\]"):
        datafiles.load_preference_dataset(str(saved), dataset_split="test")
    with pytest.raises(ValueError, match=r"eval split 'dev' not found in .* \['train', 'validation', 'other'\]"):
        datafiles.load_preference_dataset(str(saved), eval_split="dev")

    single = tmp_path / "single"
    datasets.Dataset.from_list(PAIRS).save_to_disk(str(single))
    train, eval_ = datafiles.load_preference_dataset(str(single), eval_fraction=0.1)
    assert (len(train), len(eval_)) == (36, 4)


def test_load_a_folder_in_the_hub_layout(tmp_path):
    """A dataset repo as downloaded from the Hub (data/train-00000-of-00001.parquet, data/test-...) or with one folder
    per split is read by datasets' own loader: the same splits, eval = test, extra columns kept."""
    import pandas as pd

    hub = tmp_path / "hub"
    (hub / "data").mkdir(parents=True)
    (hub / "README.md").write_text("# a dataset card\n")
    for split, rows in (("train", PAIRS[:30]), ("test", PAIRS[30:])):
        pd.DataFrame([{**r, "score_chosen": 8.0} for r in rows]).to_parquet(hub / "data" / f"{split}-00000-of-00001.parquet")
    train, eval_ = datafiles.load_preference_dataset(str(hub))
    assert (len(train), len(eval_), train[0]["prompt"], eval_[0]["prompt"]) == (30, 10, "p0", "p30")
    per_split = tmp_path / "per_split"
    for split, rows in (("train", PAIRS[:30]), ("validation", PAIRS[30:])):
        (per_split / split).mkdir(parents=True)
        write_rows(per_split / split / "part-0.jsonl", rows)
    train, eval_ = datafiles.load_preference_dataset(str(per_split))
    assert (len(train), len(eval_)) == (30, 10)


def test_load_conversational_jsonl_then_prepare(tmp_path):
    """Messages survive the jsonl -> Arrow round trip and give the same ids as in test_each_format."""
    write_rows(tmp_path / "conv.jsonl", [CONV] * 3)
    train, eval_ = datafiles.load_preference_dataset(str(tmp_path / "conv.jsonl"), eval_fraction=0)
    rows, _ = prepare(train)
    assert rows == [{"prompt_ids": [1, 4, 10, 11, 6, 5], "chosen_ids": [12, 6], "rejected_ids": [13, 6]}] * 3


def test_load_missing_path_lists_what_exists(tmp_path):
    """A path that does not exist names the folder's contents; a folder without data files says so."""
    write_rows(tmp_path / "pairs.jsonl", PAIRS)
    with pytest.raises(FileNotFoundError, match=r"'.*pair.jsonl' does not exist; .* contains: \['pairs.jsonl'\]"):
        datafiles.load_preference_dataset(str(tmp_path / "pair.jsonl"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"has no .jsonl/.json/.parquet/.csv files .* contains: \['notes.txt'\]"):
        datafiles.load_preference_dataset(str(tmp_path / "empty"))
