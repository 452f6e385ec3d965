"""Preference data for DPO: the rules that turn a row into what the model sees. Check every row, find the
prompt, tokenize, truncate, collate. (Reading files, splits and the held-out set: harness/datafiles.py.)

DPO trains on pairs (x, y_w, y_l): a prompt x, a chosen completion y_w and a rejected one y_l. The loss needs
log pi(y|x) summed over the completion tokens only (Rafailov et al., "Direct Preference Optimization: Your
Language Model is Secretly a Reward Model", 2023, arXiv:2305.18290, Eq. 7), so every sequence carries a
`completion_mask` (1 on completion tokens) next to its token ids.

    prepare_dataset:  row --check--> (prompt, chosen, rejected) --EOS (strings only)--> tokenize
                      --> prompt_ids, chosen_ids, rejected_ids --(a) max_prompt_length
                      --(b) max_completion_length                (and (c) counted: the pairs it ruins dropped)
    collate:          B pairs --(c) max_length (`truncate`: per pair, or per row as TRL)--> right-pad
                      --> input_ids [2B, T] = [prompt+chosen rows; prompt+rejected rows], masks

The rules are Hugging Face TRL 1.16's (`DPOTrainer._prepare_dataset`, `DataCollatorForPreference`); with (a)
and (b) unset and truncation_scope "row" the batches equal TRL's token for token. Where this file differs from
TRL 1.16, on purpose:
  - max_length cuts a pair as a pair (`truncate_pair`): both completions keep the same prompt tokens. DPO
    compares log pi(y_w|x) with log pi(y_l|x) under one prompt x; that is what makes beta * log Z(x) cancel
    in Eq. 7. TRL cuts each sequence on its own, so under keep_end a long pair's two completions can see
    different prompts.
  - `truncation_mode` defaults to "keep_end" (TRL: "keep_start"): cutting the start of a long prompt keeps
    the response and its EOS, which is what the preference is about.
  - `max_prompt_length` and `max_completion_length` exist (TRL removed them in v0.29).
  - Rows whose chosen equals rejected, or with an empty completion, are dropped and counted (TRL keeps them;
    for an implicit prompt where one answer is a prefix of the other, TRL's split lands one character or
    message early).
  - A second BOS (text that already starts with the BOS string, on a tokenizer that adds one) is removed.
  - Every row is checked, not only the first.

Errors in the data are a `DataError` (harness/errors.py), one line naming what is wrong, where, and what to
do. A bad row is named by its file (or split) and its 0-based number there, also after the eval hold-out
(`origin`, set by harness/datafiles.py); a dataset whose rows are all dropped by the reasons for the drops.
"""

import json

import datasets
import torch

from harness.errors import DataError

TRUNCATION_MODES = ("keep_end", "keep_start")
# max_length cuts a pair as a pair (one prompt for both), or each sequence alone
TRUNCATION_SCOPES = ("pair", "row")
ROLES = ("system", "developer", "user", "assistant", "tool")

# What prepare_dataset counts, and the line it prints for each kind (rows = preference pairs).
COUNT_KINDS = {
    "identical": "dropped: chosen == rejected, nothing to prefer",
    "empty_completion": "dropped: empty or whitespace-only chosen or rejected completion",
    "no_scored_token": "dropped: after max_length a sequence has no completion token to score (only its "
                       "first token)",
    "prompt_too_long": "dropped: prompt alone has >= max_length tokens (keep_start would keep no completion "
    "token)",
    "double_bos": "second BOS removed (the text already started with the BOS string)",
    "prompt_boundary": "prompt's last tokens merge with the completion; the completion starts where they "
    "differ",
    "prompt_truncated": "prompt cut by max_prompt_length",
    "completion_truncated": "chosen and/or rejected cut by max_completion_length (first tokens kept)",
    "max_length_truncated": "prompt+chosen and/or prompt+rejected longer than max_length, cut in collate",
    "no_prompt_left": "keep_end: a completion alone fills max_length, so that sequence keeps no prompt token",
    "pair_prompt_cut": "prompt+completion longer than max_length: the prompt's start cut, the same for both "
    "completions",
    "pair_completion_cut": "a completion too long to leave the prompt half of max_length: its end cut (EOS "
    "lost)",
    "identical_after_truncation": "chosen and rejected identical after truncation (no learning signal)",
}


DROPS = ("identical", "empty_completion", "prompt_too_long", "no_scored_token")  # the kinds that drop a pair

# ------------------------------------------------------------------------------------------------------------
# Checking rows and finding the prompt


def extract_prompt(chosen, rejected):
    """Split an implicit-prompt pair into (prompt, chosen, rejected).

    The prompt is the longest common prefix of chosen and rejected: of characters for strings, of whole
    messages for conversations. For strings, a space right before the split goes to the completions (TRL's
    rule), so "the sky is blue" / "the sky is green" gives ("the sky is", " blue", " green"): " blue"
    tokenizes as a word that follows the prompt.
    """
    n = common_prefix_length(chosen, rejected)
    if isinstance(chosen, str) and n > 0 and chosen[n - 1] == " ":
        n -= 1
    return chosen[:n], chosen[n:], rejected[n:]


FIX_ROW = "fix or remove the row"


def _check_messages(row_name, field, messages):
    """`row_name` names the row in messages: "train data (file /x/train.jsonl, rows counted from 0), row "
    "30"."""
    if not isinstance(messages, list):
        raise DataError(
            f"{row_name}, field {field!r}: expected a list of messages (the dataset is conversational, "
            f"detected from its first row), got {type(messages).__name__}: {messages!r:.80}; {FIX_ROW}")
    if not messages:
        raise DataError(f"{row_name}, field {field!r}: empty message list; expected at least one "
                        f"{{'role': ..., 'content': ...}} message; {FIX_ROW}")
    for j, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(
                f"{row_name}, field {field!r}, message {j}: expected a dict with 'role' and 'content', got "
                f"{message!r:.80}; {FIX_ROW}")
        if message["role"] not in ROLES:
            raise DataError(
                f"{row_name}, field {field!r}, message {j}: role {message['role']!r} is not one of {ROLES}; "
                f"{FIX_ROW}")
        if not isinstance(message["content"], (str, list)) and not message.get("tool_calls"):
            raise DataError(f"{row_name}, field {field!r}, message {j}: content must be a string, "
                            f"got {type(message['content']).__name__}; {FIX_ROW}")


def _check_row(row_name, row, conversational, explicit):
    """(prompt, chosen, rejected) of a row, with the prompt extracted if implicit; a DataError for a bad row.
    `row_name` says which row, in messages (see _check_messages)."""
    fields = ("prompt", "chosen", "rejected") if explicit else ("chosen", "rejected")
    for field in fields:
        if field not in row:
            raise DataError(
                f"{row_name}: missing field {field!r}; every row needs {fields} (format detected from the "
                f"first row); {FIX_ROW}")
        if conversational:
            _check_messages(row_name, field, row[field])
        elif not isinstance(row[field], str):
            raise DataError(
                f"{row_name}, field {field!r}: expected a string (the dataset is in the standard format, "
                f"detected from its first row), got {type(row[field]).__name__}: {row[field]!r:.80}; "
                f"{FIX_ROW}")
    if explicit:
        prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
        if not prompt:
            raise DataError(
                f"{row_name}, field 'prompt': empty prompt; DPO compares two answers to the same prompt; "
                f"{FIX_ROW}")
    else:
        prompt, chosen, rejected = extract_prompt(row["chosen"], row["rejected"])
        if not prompt:
            raise DataError(
                f"{row_name}: 'chosen' and 'rejected' have no common beginning, so there is no prompt to "
                "extract (implicit-prompt format); add a 'prompt' field or fix the row")
    return prompt, chosen, rejected


def _blank(completion) -> bool:
    """An empty or whitespace-only completion: a string, or messages with no content and no tool call."""
    if isinstance(completion, str):
        return not completion.strip()
    return all(not m.get("tool_calls") and not (m["content"] if isinstance(m["content"], str)
                                                else str(m["content"])).strip() for m in completion)


def _template_kwargs(row_name, row):
    """The per-row extras TRL passes to the chat template: `tools` (a list or a JSON string) and
    `chat_template_kwargs` (a dict)."""
    tools = row.get("tools")
    # Arrow cannot store free-form JSON schemas, so datasets often keep tools as a string
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise DataError(f"{row_name}, field 'tools': not valid JSON ({e}); {FIX_ROW}") from None
    if tools is not None and not isinstance(tools, list):
        raise DataError(
            f"{row_name}, field 'tools': expected a list of tools, got {type(tools).__name__}; {FIX_ROW}")
    kwargs = row.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise DataError(
            f"{row_name}, field 'chat_template_kwargs': expected a dict, got {type(kwargs).__name__}; "
            f"{FIX_ROW}")
    return {"tools": tools, **kwargs}


# ------------------------------------------------------------------------------------------------------------
# Tokenization


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad token id, else its EOS id (masks come from lengths, so a real EOS equal to the pad
    is still scored)."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    raise ValueError("the tokenizer has neither a pad token nor an EOS token; set tokenizer.pad_token")


def common_prefix_length(ids, other_ids) -> int:
    """Number of leading items (tokens, characters, messages) the two sequences share."""
    n = 0
    for a, b in zip(ids, other_ids):
        if a != b:
            break
        n += 1
    return n


def _origin(dataset) -> tuple[list[int] | range | None, str | None]:
    """Each row's 0-based number in its file or split, and the phrase that names that file or split, from the
    `origin` attribute load_preference_dataset sets; (None, None) if unknown (rows are then named by
    position)."""
    origin = getattr(dataset, "origin", None)
    # filter() copies attributes onto the dataset it returns, with fewer rows: trust them while the count
    # matches
    if origin is None or len(origin["rows"]) != len(dataset):
        return None, None
    return origin["rows"], origin["where"]


def _rows(dataset, described="the dataset") -> list[dict]:
    """A datasets.Dataset (only the columns used here) or a list of dicts, as a list of dicts."""
    if isinstance(dataset, datasets.Dataset):
        if not {"chosen", "rejected"} <= set(dataset.column_names):
            raise DataError(f"{described} needs 'chosen' and 'rejected' columns (and optionally 'prompt'); "
                            f"it has {dataset.column_names}; rename the columns")
        used = ["prompt", "chosen", "rejected", "tools", "chat_template_kwargs",
                "ref_chosen_logps", "ref_rejected_logps"]
        return dataset.select_columns([c for c in used if c in dataset.column_names]).to_list()
    return list(dataset)


def _chat_texts(tokenizer, row_name, row, prompt, chosen, rejected) -> list[str]:
    """A conversational row rendered by the chat template: the prompt (ending with the generation prompt,
    "<|assistant|>"; full conversations do not), prompt+chosen and prompt+rejected."""
    for field, completion in (("chosen", chosen), ("rejected", rejected)):
        if completion[0]["role"] != "assistant":
            raise DataError(f"{row_name}, field {field!r}: the completion (after the prompt) must start with "
                            f"an assistant message, got role {completion[0]['role']!r}; {FIX_ROW}")
    kwargs = _template_kwargs(row_name, row)
    try:
        return [tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False, **kwargs),
                tokenizer.apply_chat_template(prompt + chosen, tokenize=False, **kwargs),
                tokenizer.apply_chat_template(prompt + rejected, tokenize=False, **kwargs)]
    except Exception as e:
        raise DataError(f"{row_name}: the chat template failed on this row: {type(e).__name__}: {e}; "
                        "fix the row or use a chat template that accepts it") from e


def _split_at_prompt(prompt_ids, prompt_chosen_ids, prompt_rejected_ids, bos, counts):
    """(prompt_ids, chosen_ids, rejected_ids) from the token ids of the prompt, prompt+chosen and
    prompt+rejected. The prompt alone can tokenize differently from the start of prompt+completion (tokens
    merging across the boundary, templates that render a generation prompt the full chat lacks): the
    completion starts where they diverge, and the prompt's divergent tail is left out (TRL 1.16). A doubled
    BOS (text that already began with it) loses one."""
    if bos is not None and prompt_ids[:2] == [bos, bos]:
        counts["double_bos"] += 1
        prompt_ids, prompt_chosen_ids, prompt_rejected_ids = (
            x[1:] if x[:2] == [bos, bos] else x for x in (prompt_ids, prompt_chosen_ids, prompt_rejected_ids))
    prompt_len = min(common_prefix_length(prompt_ids, prompt_chosen_ids),
                     common_prefix_length(prompt_ids, prompt_rejected_ids))
    counts["prompt_boundary"] += prompt_len < len(prompt_ids)
    return prompt_ids[:prompt_len], prompt_chosen_ids[prompt_len:], prompt_rejected_ids[prompt_len:]


def _tokenize_rows(rows, tokenizer, counts, label="data (rows counted from 0)", numbers=None):
    """Check, split, add EOS to and tokenize every row; returns [(row index, prompt_ids, chosen_ids,
    rejected_ids)] for the rows kept, untruncated. Drops are counted in `counts`. A bad row is a DataError
    that names it as "{label}, row {numbers[i]}": its number in its file (`numbers`, default: its index in
    `rows`)."""
    numbers = range(len(rows)) if numbers is None else numbers
    conversational = isinstance(rows[0].get("chosen"), list)
    explicit = "prompt" in rows[0]
    if conversational and tokenizer.chat_template is None:
        raise DataError(
            "the dataset is conversational (lists of messages) but the tokenizer has no chat template; set "
            "tokenizer.chat_template or use plain strings")
    if not conversational and tokenizer.eos_token is None:
        raise ValueError("the tokenizer has no EOS token, which ends every standard (string) completion; "
                         "set tokenizer.eos_token")

    kept, texts = [], []  # texts: prompt, prompt+chosen, prompt+rejected for each kept row
    for i, row in enumerate(rows):
        row_name = f"{label}, row {numbers[i]}"
        prompt, chosen, rejected = _check_row(row_name, row, conversational, explicit)
        if chosen == rejected:
            counts["identical"] += 1
            continue
        if _blank(chosen) or _blank(rejected):  # nothing to prefer, only an EOS or end-of-turn to learn
            counts["empty_completion"] += 1
            continue
        if conversational:
            texts += _chat_texts(tokenizer, row_name, row, prompt, chosen, rejected)
        else:
            # EOS ends each standard completion, so the model learns to stop (not added twice). Conversational
            # completions already end with the template's end-of-turn token.
            eos = tokenizer.eos_token
            chosen = chosen if chosen.endswith(eos) else chosen + eos
            rejected = rejected if rejected.endswith(eos) else rejected + eos
            texts += [prompt, prompt + chosen, prompt + rejected]  # plain concatenation, as TRL: no separator
        kept.append(i)

    # One batched call for speed. Standard text gets the tokenizer's special tokens (its BOS, if any), as in
    # TRL; a rendered chat already contains them, so adding them again would double the BOS.
    ids = tokenizer(texts, add_special_tokens=not conversational)["input_ids"] if texts else []
    out = []
    for k, i in enumerate(kept):
        prompt_ids, chosen_ids, rejected_ids = _split_at_prompt(*ids[3 * k: 3 * k + 3],
                                                                tokenizer.bos_token_id, counts)
        if chosen_ids == rejected_ids:
            counts["identical"] += 1
        # (decoded: a completion some tokenizers keep as spaces is empty too)
        elif not chosen_ids or not rejected_ids or (not conversational and any(
                not tokenizer.decode(ids, skip_special_tokens=True).strip()
                for ids in (chosen_ids, rejected_ids))):
            counts["empty_completion"] += 1
        else:
            out.append((i, prompt_ids, chosen_ids, rejected_ids))
    return out


# ------------------------------------------------------------------------------------------------------------
# Truncation


def _check_limits(max_length, max_prompt_length, max_completion_length, truncation_mode):
    if truncation_mode not in TRUNCATION_MODES:
        raise ValueError(f"truncation_mode must be 'keep_end' or 'keep_start', got {truncation_mode!r}")
    for option, value in (("max_length", max_length), ("max_prompt_length", max_prompt_length),
                          ("max_completion_length", max_completion_length)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{option} must be a positive integer or None, got {value!r}")


def truncate_prompt_and_completions(prompt_ids, chosen_ids, rejected_ids, max_prompt_length=None,
                                    max_completion_length=None, truncation_mode="keep_end"):
    """Limits (a) and (b). (a) keep_end keeps the prompt's last tokens, the context next to the response (and
    loses the BOS); keep_start its first. (b) each completion keeps its first tokens."""
    if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
        keep = slice(-max_prompt_length, None) if truncation_mode == "keep_end" else slice(max_prompt_length)
        prompt_ids = prompt_ids[keep]
    if max_completion_length is not None:
        chosen_ids, rejected_ids = chosen_ids[:max_completion_length], rejected_ids[:max_completion_length]
    return prompt_ids, chosen_ids, rejected_ids


def truncate_sequence(prompt_ids, completion_ids, max_length=None, truncation_mode="keep_end"):
    """Limit (c): prompt+completion and its completion mask ([0]*len(prompt) + [1]*len(completion)), cut to
    max_length: keep_start keeps row[:max_length] (may cut the completion's end and its EOS), keep_end keeps
    row[-max_length:] (cuts the prompt's start; a completion longer than max_length loses its start too)."""
    ids = prompt_ids + completion_ids
    mask = [0] * len(prompt_ids) + [1] * len(completion_ids)
    if max_length is not None:
        keep = slice(None, max_length) if truncation_mode == "keep_start" else slice(-max_length, None)
        ids, mask = ids[keep], mask[keep]
    return ids, mask


def truncate_pair(prompt_ids, chosen_ids, rejected_ids, max_length=None, truncation_mode="keep_end"):
    """Limit (c) for a pair, keeping one prompt for both completions (truncation_scope "pair").

    If prompt + the longer completion fits in max_length, nothing is cut. Else:
      keep_end:   the prompt loses its first tokens, as many as the longer completion needs, but keeps at
                  least min(len(prompt), max_length // 2) of its last tokens; then each completion keeps its
                  first max_length - len(prompt) tokens (only a completion longer than about half of
                  max_length is cut).
      keep_start: the prompt is kept whole (a prompt of max_length tokens or more is dropped before), and each
                  completion keeps its first max_length - len(prompt) tokens (the same as the row rule).
    Both sequences have the same prompt and at least one prompt token; the shorter completion is never cut
    before
    the longer one."""
    longest = max(len(chosen_ids), len(rejected_ids))
    if max_length is None or len(prompt_ids) + longest <= max_length:
        return prompt_ids, chosen_ids, rejected_ids
    if truncation_mode == "keep_end":
        keep = max(max_length - longest, min(len(prompt_ids), max_length // 2))
        prompt_ids = prompt_ids[len(prompt_ids) - keep:]
    room = max_length - len(prompt_ids)
    return prompt_ids, chosen_ids[:room], rejected_ids[:room]


def truncate(prompt_ids, chosen_ids, rejected_ids, max_length=None, truncation_mode="keep_end",
             truncation_scope="pair"):
    """Limit (c), max_length, in one place: the (ids, completion_mask) of prompt+chosen and of prompt+rejected
    as the model sees them. "pair": one prompt for both completions (`truncate_pair`), after which each row
    fits; "row": each sequence cut on its own (`truncate_sequence`, TRL 1.16's rule). collate applies it;
    prepare_dataset calls it only to count and drop."""
    if truncation_scope == "pair":
        prompt_ids, chosen_ids, rejected_ids = truncate_pair(prompt_ids, chosen_ids, rejected_ids, max_length,
                                                             truncation_mode)
    return [truncate_sequence(prompt_ids, ids, max_length, truncation_mode)
            for ids in (chosen_ids, rejected_ids)]


def prepare_dataset(dataset, tokenizer, *, max_length: int | None = 1024,
                    max_prompt_length: int | None = None, max_completion_length: int | None = None,
                    truncation_mode: str = "keep_end",
                    truncation_scope: str = "pair", name: str = "train", verbose: bool = True,
                    counts: dict | None = None) -> list[dict]:
    """Check, tokenize and cut (limits a, b) a preference dataset; returns [{"prompt_ids", "chosen_ids",
    "rejected_ids"}] in dataset order, dropped rows left out (plus "ref_chosen_logps"/"ref_rejected_logps" if
    the data has them).

    The format (standard strings or conversational messages; explicit or implicit prompt) is detected from row
    0, and every row is checked against it. Truncation: (a) max_prompt_length and (b) max_completion_length
    are applied here; (c) max_length is applied by `collate` (`truncate`, per pair or per row) and only
    counted here, with the pairs it would leave unscorable dropped. With keep_start, a row whose prompt
    alone has >= max_length tokens is dropped; with keep_end it is kept and counted. Each kind of drop and
    truncation is printed once (verbose) and stored in `counts` if a dict is passed (keys: COUNT_KINDS, plus
    "rows" and "kept").

    A bad row, an empty dataset, or one whose rows are all dropped is a DataError. A row is named by its
    0-based number in its file or split when `dataset` comes from load_preference_dataset (its `origin`), else
    by position.
    """
    _check_limits(max_length, max_prompt_length, max_completion_length, truncation_mode)
    if truncation_scope not in TRUNCATION_SCOPES:
        raise ValueError(f"truncation_scope must be 'pair' or 'row', got {truncation_scope!r}")
    numbers, source = _origin(dataset)
    described = f"the {name} dataset" + (f" ({source})" if source else "")  # "the eval dataset (file x)"
    rows = _rows(dataset, described)
    if not rows:
        raise DataError(f"{described} is empty; add rows")
    counts = {} if counts is None else counts
    counts.update(dict.fromkeys(COUNT_KINDS, 0))

    examples = []
    label = f"{name} data ({source + ', ' if source else ''}rows counted from 0)"
    for i, prompt_ids, chosen_ids, rejected_ids in _tokenize_rows(rows, tokenizer, counts, label, numbers):
        full = (len(prompt_ids), len(chosen_ids), len(rejected_ids))
        prompt_ids, chosen_ids, rejected_ids = truncate_prompt_and_completions(
            prompt_ids, chosen_ids, rejected_ids, max_prompt_length, max_completion_length, truncation_mode)
        counts["prompt_truncated"] += len(prompt_ids) < full[0]
        counts["completion_truncated"] += len(chosen_ids) < full[1] or len(rejected_ids) < full[2]
        if not _survives_max_length(prompt_ids, chosen_ids, rejected_ids, max_length, truncation_mode,
                                    truncation_scope, counts):
            continue
        example = {"prompt_ids": prompt_ids, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids}
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            if rows[i].get(key) is not None:
                example[key] = rows[i][key]
        examples.append(example)

    counts["rows"], counts["kept"] = len(rows), len(examples)
    if verbose:
        print(
            f"[data] {name}: {len(examples)} of {len(rows)} pairs kept (max_length={max_length}, "
            f"max_prompt_length={max_prompt_length}, max_completion_length={max_completion_length}, "
            f"{truncation_mode}, truncation_scope={truncation_scope})")
        for kind, line in COUNT_KINDS.items():
            if counts[kind]:
                print(f"[data] {name}: {counts[kind]} pairs: {line}")
    if not examples:  # else training divides by zero batches, or evaluation averages nothing
        raise _all_dropped_error(described, counts, max_length)
    return examples


def _survives_max_length(prompt_ids, chosen_ids, rejected_ids, max_length, truncation_mode, truncation_scope,
                         counts) -> bool:
    """What limit (c) will do to a pair in collate, counted; False when it would leave nothing to learn from
    (a prompt that fills max_length under keep_start, a sequence with no scored completion token)."""
    if max_length is not None and truncation_mode == "keep_start" and len(prompt_ids) >= max_length:
        counts["prompt_too_long"] += 1
        return False
    if truncation_scope == "pair":
        cut = truncate_pair(prompt_ids, chosen_ids, rejected_ids, max_length, truncation_mode)
        counts["pair_prompt_cut"] += len(cut[0]) < len(prompt_ids)
        counts["pair_completion_cut"] += len(cut[1]) < len(chosen_ids) or len(cut[2]) < len(rejected_ids)
    chosen_seen, rejected_seen = truncate(prompt_ids, chosen_ids, rejected_ids, max_length, truncation_mode,
                                          truncation_scope)
    if not any(chosen_seen[1][1:]) or not any(rejected_seen[1][1:]):  # a row's first token is never scored
        counts["no_scored_token"] += 1
        return False
    if max_length is not None and truncation_scope == "row":  # (after a pair cut every row fits)
        longest = max(len(chosen_ids), len(rejected_ids))
        counts["max_length_truncated"] += len(prompt_ids) + longest > max_length
        counts["no_prompt_left"] += truncation_mode == "keep_end" and longest >= max_length
    counts["identical_after_truncation"] += chosen_seen == rejected_seen
    return True


def _all_dropped_error(described, counts, max_length) -> DataError:
    """Why every row of a dataset was dropped (the counts of each reason), and what to change."""
    reasons = "; ".join(f"{counts[kind]} {COUNT_KINDS[kind]}" for kind in DROPS if counts[kind])
    if counts["no_scored_token"]:
        todo = (f"raise max_length (now {max_length}): each sequence needs a second token, the first "
                "completion token scored")
    elif counts["prompt_too_long"]:
        todo = (f"raise max_length (now {max_length}), set max_prompt_length, or use "
                "truncation_mode='keep_end'")
    else:
        todo = ("fix the data: every pair needs a chosen and a rejected completion that are non-empty and "
                "differ")
    return DataError(f"all {counts['rows']} pairs of {described} were dropped ({reasons}); {todo}")


# ------------------------------------------------------------------------------------------------------------
# Collation and display


def padded_width(width: int, pad_to_multiple_of: int | None = None) -> int:
    """The batch length: `width` rounded up to a multiple of pad_to_multiple_of (unchanged when None)."""
    return width if pad_to_multiple_of is None else -(-width // pad_to_multiple_of) * pad_to_multiple_of


def collate(examples: list[dict], pad_token_id: int, max_length: int | None = None,
            truncation_mode: str = "keep_end", pad_to_multiple_of: int | None = None,
            truncation_scope: str = "row") -> dict[str, torch.Tensor]:
    """B pairs -> input_ids, attention_mask, completion_mask [2B, T] (long), right-padded.

    Rows 0..B-1 are prompt+chosen, rows B..2B-1 prompt+rejected in the same order, so one forward pass scores
    both and `logps.chunk(2)` splits them. Limit (c), max_length, is applied here (`truncate`): per pair
    (truncation_scope "pair", dpo.py's default) or per row (the default of this function, TRL 1.16's rule,
    under which the chosen and rejected rows of one pair can keep different amounts of prompt under
    keep_end). Adds ref_chosen_logps / ref_rejected_logps [B] when every example has them.
    """
    _check_limits(max_length, None, None, truncation_mode)
    cut = [truncate(ex["prompt_ids"], ex["chosen_ids"], ex["rejected_ids"], max_length, truncation_mode,
                    truncation_scope) for ex in examples]
    sequences = [chosen for chosen, _ in cut] + [rejected for _, rejected in cut]
    width = padded_width(max(len(ids) for ids, _ in sequences), pad_to_multiple_of)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(len(sequences), width, dtype=torch.long)
    completion_mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for row, (ids, mask) in enumerate(sequences):
        input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, :len(ids)] = 1
        completion_mask[row, :len(ids)] = torch.tensor(mask, dtype=torch.long)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}
    for key in ("ref_chosen_logps", "ref_rejected_logps"):
        if all(key in ex for ex in examples):
            batch[key] = torch.tensor([ex[key] for ex in examples], dtype=torch.float32)
    return batch


def show_example(example: dict, tokenizer, max_length: int | None = None, truncation_mode: str = "keep_end",
                 max_prompt_length: int | None = None, max_completion_length: int | None = None,
                 truncation_scope: str = "pair") -> str:
    """One pair the way the model sees it: for prompt+chosen and prompt+rejected, each part (prompt,
    completion) decoded with its token count, and every token cut by truncation marked with the limit that
    cut it.

    `example` is a prepared row (from `prepare_dataset`; its (a)/(b) cuts are already gone, so only (c) shows)
    or a raw dataset row in any of the four formats (then (a), (b) and (c) all show).
    """
    _check_limits(max_length, max_prompt_length, max_completion_length, truncation_mode)
    if "prompt_ids" in example:
        prompt_ids, chosen_ids, rejected_ids = (example[key] for key in ("prompt_ids", "chosen_ids",
                                                                         "rejected_ids"))
    else:
        counts = dict.fromkeys(COUNT_KINDS, 0)
        tokenized = _tokenize_rows([example], tokenizer, counts)
        if not tokenized:
            return "this pair is dropped: " + "; ".join(COUNT_KINDS[k] for k, n in counts.items() if n)
        _, prompt_ids, chosen_ids, rejected_ids = tokenized[0]
    kept_prompt, kept_chosen, kept_rejected = truncate_prompt_and_completions(
        prompt_ids, chosen_ids, rejected_ids, max_prompt_length, max_completion_length, truncation_mode)
    # (a) and (b): which prompt positions survive; then (c) on positions, exactly as collate cuts the tokens
    n_cut = len(prompt_ids) - len(kept_prompt)
    prompt_kept = range(n_cut, len(prompt_ids)) if truncation_mode == "keep_end" else range(len(kept_prompt))
    completions = (("chosen", chosen_ids, kept_chosen), ("rejected", rejected_ids, kept_rejected))
    windows = truncate(list(prompt_kept), *[list(range(len(prompt_ids), len(prompt_ids) + len(kept)))
                                            for _, _, kept in completions], max_length, truncation_mode,
                       truncation_scope)
    lines = []
    if max_length is not None and truncation_mode == "keep_start" and len(kept_prompt) >= max_length:
        lines.append(
            f"(prepare_dataset drops this pair: {COUNT_KINDS['prompt_too_long'].removeprefix('dropped: ')})")
    for (name, completion_ids, kept_completion), (window, _) in zip(completions, windows):
        # every token with (part, what cut it or None), in text order; then runs of equal tags are printed
        tokens = [(t, "prompt", None if k in prompt_kept else "max_prompt_length")
                  for k, t in enumerate(prompt_ids)]
        tokens += [(t, name, None if k < len(kept_completion) else "max_completion_length")
                   for k, t in enumerate(completion_ids)]
        for k in set(range(len(tokens))) - set(window):
            if tokens[k][2] is None:
                tokens[k] = (tokens[k][0], tokens[k][1], "max_length")
        n_prompt = sum(1 for k in window if tokens[k][1] == "prompt")
        lines.append(f"=== prompt + {name}: {len(window)} tokens seen by the model (prompt {n_prompt}, "
                     f"{name} {len(window) - n_prompt}); max_length={max_length}, {truncation_mode} ===")
        start = 0
        for k in range(1, len(tokens) + 1):
            if k == len(tokens) or tokens[k][1:] != tokens[start][1:]:
                part, cut = tokens[start][1:]
                n = k - start
                lines.append(f"[{part}, {n} token{'s' * (n != 1)}" + (f", CUT by {cut}]" if cut else "]"))
                lines.append(tokenizer.decode([t for t, _, _ in tokens[start:k]]))
                start = k
    return "\n".join(lines)
