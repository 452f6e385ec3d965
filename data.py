"""Preference data for DPO: load a dataset, check every row, tokenize, truncate, collate.

DPO trains on pairs (x, y_w, y_l): a prompt x, a chosen completion y_w and a rejected one y_l. The loss needs
log pi(y|x) summed over the completion tokens only (Rafailov et al., "Direct Preference Optimization: Your Language
Model is Secretly a Reward Model", 2023, arXiv:2305.18290, Eq. 7), so every sequence carries a `completion_mask`
(1 on completion tokens) next to its token ids.

    prepare_dataset:  row --check--> (prompt, chosen, rejected) --EOS (strings only)--> tokenize
                      --> prompt_ids, chosen_ids, rejected_ids --(a) max_prompt_length, (b) max_completion_length
                      --(c) max_length, the pair together (truncation_scope "pair", the default)
    collate:          B rows --(c) max_length, each sequence (truncation_scope "row", TRL's rule)--> right-pad
                      --> input_ids [2B, T] = [prompt+chosen rows; prompt+rejected rows], masks

The rules are Hugging Face TRL 1.16's (`DPOTrainer._prepare_dataset`, `DataCollatorForPreference`); with (a) and (b)
unset and truncation_scope "row" the batches equal TRL's token for token. Where this file differs from TRL 1.16, on
purpose:
  - max_length cuts a pair as a pair (`truncate_pair`): both completions keep the same prompt tokens. DPO compares
    log pi(y_w|x) with log pi(y_l|x) under one prompt x; that is what makes beta * log Z(x) cancel in Eq. 7. TRL cuts
    each sequence on its own, so under keep_end a long pair's two completions can see different prompts.
  - `truncation_mode` defaults to "keep_end" (TRL: "keep_start"): cutting the start of a long prompt keeps the
    response and its EOS, which is what the preference is about.
  - `max_prompt_length` and `max_completion_length` exist (TRL removed them in v0.29).
  - Rows whose chosen equals rejected, or with an empty completion, are dropped and counted (TRL keeps them; for an
    implicit prompt where one answer is a prefix of the other, TRL's split lands one character or message early).
  - A second BOS (text that already starts with the BOS string, on a tokenizer that adds one) is removed.
  - Every row is checked, not only the first.

Errors in the data are a `DataError` (a ValueError), one line naming what is wrong, where, and what to do. A bad
row is named by its file (or split) and its 0-based number there, also after the eval hold-out (`origin`, set by
load_preference_dataset); a bad line in a .jsonl/.json/.csv file by its 1-based line number; a dataset whose rows
are all dropped by the reasons for the drops.
"""

import gzip
import json
import random
from pathlib import Path

import datasets
import torch

from harness.errors import DataError, DataNotFoundError

TRUNCATION_MODES = ("keep_end", "keep_start")
TRUNCATION_SCOPES = ("pair", "row")  # max_length cuts a pair as a pair (one prompt for both), or each sequence alone
ROLES = ("system", "developer", "user", "assistant", "tool")
EVAL_SPLITS = ("test", "validation", "eval")  # used as the eval split, in this order, when eval_split is not given
FILE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}  # suffix -> datasets builder

# What prepare_dataset counts, and the line it prints for each kind (rows = preference pairs).
COUNT_KINDS = {
    "identical": "dropped: chosen == rejected, nothing to prefer",
    "empty_completion": "dropped: empty or whitespace-only chosen or rejected completion",
    "no_scored_token": "dropped: after max_length a sequence has no completion token to score (only its first token)",
    "prompt_too_long": "dropped: prompt alone has >= max_length tokens (keep_start would keep no completion token)",
    "double_bos": "second BOS removed (the text already started with the BOS string)",
    "prompt_boundary": "prompt's last tokens merge with the completion; the completion starts where they differ",
    "prompt_truncated": "prompt cut by max_prompt_length",
    "completion_truncated": "chosen and/or rejected cut by max_completion_length (first tokens kept)",
    "max_length_truncated": "prompt+chosen and/or prompt+rejected longer than max_length, cut in collate",
    "no_prompt_left": "keep_end: a completion alone fills max_length, so that sequence keeps no prompt token",
    "pair_prompt_cut": "prompt+completion longer than max_length: the prompt's start cut, the same for both completions",
    "pair_completion_cut": "a completion too long to leave the prompt half of max_length: its end cut (EOS lost)",
    "identical_after_truncation": "chosen and rejected identical after truncation (no learning signal)",
}


DROPS = ("identical", "empty_completion", "prompt_too_long", "no_scored_token")  # the kinds that drop a pair

# ----------------------------------------------------------------------------------------------------------------
# Loading




def _file_format(path: Path) -> str | None:
    """The datasets builder for a data file ("json", "parquet", "csv"), or None; `.gz` is read transparently."""
    name = path.name.lower().removesuffix(".gz")
    return FILE_FORMATS.get(Path(name).suffix)


def _read_text(path: Path) -> str:
    """A .jsonl/.json/.csv file (or .gz) as text; a DataError naming the line of the first byte that is not UTF-8.
    datasets would read such bytes without a word (as mangled text) or fail with no line number."""
    with (gzip.open(path) if path.name.lower().endswith(".gz") else open(path, "rb")) as f:
        raw = f.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"byte 0x{raw[e.start]:02x} is not UTF-8 text, in {path}, line {line}; "
                        "save the file as UTF-8") from None


def _find_text_error(path: Path, builder: str):
    """A DataError naming what is wrong in a .jsonl/.json/.csv file that datasets failed to read, and the line, where
    we can find it. datasets raises StopIteration on an empty JSON lines file, and its JSON errors give no line."""
    text = _read_text(path)
    if builder == "csv":
        if len(text.strip().splitlines()) < 2:
            raise DataError(f"no rows: {path} is empty or has only a header line; add rows")
        return
    if not text.strip():
        raise DataError(f"no rows: {path} is empty; it needs one JSON object per line, or a JSON array of objects")
    if path.name.lower().removesuffix(".gz").endswith(".json"):
        try:  # a .json file is one JSON document (an array of rows, usually) or else JSON lines
            document = json.loads(text)
        except json.JSONDecodeError as e:
            if text.lstrip().startswith("["):
                raise DataError(f"invalid JSON ({e.msg}, column {e.colno}) in {path}, line {e.lineno}; "
                                "fix that line") from None
        else:
            if document == []:
                raise DataError(f"no rows: {path} holds an empty JSON array; add rows")
            return
    for number, line in enumerate(text.split("\n"), start=1):  # not splitlines(): JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"invalid JSON ({e.msg}, column {e.colno}) in {path}, line {number}; fix that line "
                            "(each line of a JSON lines file is one JSON object)") from None
        if not isinstance(row, dict):
            raise DataError(f"a JSON {type(row).__name__} where a row should be, in {path}, line {number}; "
                            "make each line one JSON object {\"prompt\": ..., \"chosen\": ..., \"rejected\": ...}")


def _load_files(builder: str, files: dict[str, list[Path]]) -> datasets.DatasetDict:
    """Load data files ({split: [paths]}) with datasets; a DataError naming the file (and the line, for text files)
    if that fails."""
    paths = [p for split_paths in files.values() for p in split_paths]
    for path in paths:
        if builder in ("json", "csv"):
            _read_text(path)  # up front: datasets reads bytes that are not UTF-8 without a word
    try:
        return datasets.load_dataset(builder, data_files={s: [str(p) for p in ps] for s, ps in files.items()})
    except Exception as e:
        for path in paths:  # only now, as parsing every line costs seconds on a large file
            if builder in ("json", "csv"):
                _find_text_error(path, builder)
        cause = e.__cause__ or e  # pyarrow's message (a corrupt parquet file, a field whose type changes between
        message = (str(cause).strip().splitlines() or [""])[0]  # rows) is inside datasets' DatasetGenerationError
        shown = paths[0] if len(paths) == 1 else f"the {len(paths)} {builder} files in {paths[0].parent}"
        raise DataError(f"datasets could not read {shown} ({type(cause).__name__}: {message}); fix the file, or "
                        "check that every row has the same fields with the same types") from e


def _missing_path_error(dataset: str, path: Path) -> DataNotFoundError:
    parent = path.parent
    if parent.is_dir():
        found = f"; {parent} contains: {sorted(p.name for p in parent.iterdir())}"
    else:
        found = f" (nor does its folder {parent})"
    return DataNotFoundError(f"dataset {dataset!r} does not exist{found}; check the path")


def _with_origin(dataset: datasets.Dataset, where: str, rows=None) -> datasets.Dataset:
    """Tag a split with where its rows come from, for prepare_dataset's error messages: `where` names the file (or
    the split), `rows` holds each row's 0-based number in it. Needed because select() numbers the rows it keeps from
    0: without this, a bad row at file row 30 would be reported as row 28 of the train rows left after the eval
    hold-out."""
    dataset.origin = {"where": where, "rows": range(len(dataset)) if rows is None else rows}
    return dataset


def load_preference_dataset(dataset: str, dataset_split: str = "train", eval_split: str | None = None,
                            eval_fraction: float = 0.05,
                            seed: int = 42) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """Load a preference dataset and return (train, eval).

    `dataset` is a local .jsonl/.json/.parquet/.csv file (also .gz), a folder of such files named by split
    (train.jsonl, test.jsonl, ...), a folder in the Hub's layout (data/train-00000-of-00001.parquet, as a downloaded
    dataset repo has it: read by datasets' own loader), a `save_to_disk` folder, or else a Hugging Face Hub name. Train is `dataset_split`.
    Eval is `eval_split` if given; else the dataset's "test", "validation" or "eval" split; else a seeded, held-out
    `eval_fraction` of train (the same rows on every run, disjoint from train; 0 means no eval set).

    Each returned Dataset has an `origin` attribute (see `_with_origin`) so that prepare_dataset names a bad row by
    its file and its number in that file. A problem in the data itself is a DataError.
    """
    path = Path(dataset).expanduser()
    where = {}  # split -> where its rows come from, in messages; the Hub and save_to_disk cases are filled in below
    if path.is_file():
        if _file_format(path) is None:
            raise DataError(f"dataset {dataset!r}: unsupported file type; use .jsonl, .json, .parquet or .csv "
                            "(or the same with .gz)")
        splits = _load_files(_file_format(path), {"train": [path]})  # one file is one split: "train"
        where = {"train": f"file {path}"}
    elif path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        splits = datasets.load_from_disk(str(path))
    elif path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and _file_format(p))
        if not files and any(p.is_file() and _file_format(p) for p in path.rglob("*")):
            # the Hub's layout (a downloaded or cloned dataset repo): data/train-00000-of-00001.parquet, train/*.jsonl,
            # or a README's `configs:`; datasets' own loader knows its conventions
            try:
                splits = datasets.load_dataset(str(path))
            except Exception as e:
                root = e  # datasets wraps the reason ("Couldn't cast" for splits with other columns) in its own error
                while root.__cause__ or root.__context__:
                    root = root.__cause__ or root.__context__
                message = (str(root).strip().splitlines() or [""])[0]
                raise DataError(f"dataset folder {dataset!r}: datasets could not load the files in its subfolders "
                                f"({type(root).__name__}: {message}); give every split the same columns, or put "
                                "one file per split at the top (train.jsonl, test.jsonl, ...)") from e
        elif not files:
            raise DataError(f"dataset folder {dataset!r} has no .jsonl/.json/.parquet/.csv files and is not a "
                            f"save_to_disk folder; it contains: {sorted(p.name for p in path.iterdir())}")
        else:
            formats = {_file_format(p) for p in files}
            if len(formats) > 1:
                raise DataError(f"dataset folder {dataset!r} mixes file types {sorted(formats)}; use one type")
            by_split = {}  # split name = file name up to the first "." or "-": train.jsonl, test-00000-of-00001.parquet
            for p in files:
                by_split.setdefault(p.name.split(".")[0].split("-")[0], []).append(p)
            splits = _load_files(formats.pop(), by_split)
            where = {split: f"split {split!r}, file {ps[0]}" if len(ps) == 1 else
                     f"split {split!r}, files {[p.name for p in ps]} of {path} (rows numbered on across them)"
                     for split, ps in by_split.items()}
    elif _file_format(path) or dataset.startswith((".", "/", "~")) or dataset.count("/") > 1:  # a path, not "org/name"
        raise _missing_path_error(dataset, path)
    else:
        try:
            splits = datasets.load_dataset(dataset)
        except Exception as e:
            message = (str(e).strip().splitlines() or [""])[0]
            raise DataError(f"dataset {dataset!r} is not a local file or folder, and loading it from the Hugging Face "
                            f"Hub failed ({type(e).__name__}: {message}); check the name or the path") from e
    if isinstance(splits, datasets.Dataset):
        splits = {"train": splits}
    for split in splits:
        where.setdefault(split, f"split {split!r} of {dataset}")

    if dataset_split not in splits:
        raise DataError(f"split {dataset_split!r} not found in {dataset!r}; it has: {list(splits)} "
                        "(set dataset_split)")
    train = _with_origin(splits[dataset_split], where[dataset_split])
    if len(train) == 0:  # a csv with only a header line, an empty parquet file or saved split (an empty eval split
        raise DataError(f"no rows in {where[dataset_split]}; add rows or set dataset_split")  # is prepare_dataset's)
    if eval_split is not None:
        if eval_split not in splits:
            raise DataError(f"eval split {eval_split!r} not found in {dataset!r}; it has: {list(splits)} "
                            "(set eval_split)")
        return train, _with_origin(splits[eval_split], where[eval_split])
    for name in EVAL_SPLITS:
        if name in splits and name != dataset_split:
            return train, _with_origin(splits[name], where[name])

    if not 0 <= eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    if eval_fraction == 0:
        return train, None
    n_eval = max(1, round(eval_fraction * len(train)))
    if n_eval >= len(train):
        raise DataError(f"eval_fraction={eval_fraction} of {len(train)} rows leaves no training rows, in "
                        f"{where[dataset_split]}; add rows, or set eval_fraction=0 (no eval set)")
    # A seeded sample: the same rows are held out on every run, and train keeps its original order.
    held_out = sorted(random.Random(seed).sample(range(len(train)), n_eval))
    kept = sorted(set(range(len(train))) - set(held_out))
    return (_with_origin(train.select(kept), where[dataset_split], kept),
            _with_origin(train.select(held_out), where[dataset_split], held_out))


# ----------------------------------------------------------------------------------------------------------------
# Checking rows and finding the prompt


def extract_prompt(chosen, rejected):
    """Split an implicit-prompt pair into (prompt, chosen, rejected).

    The prompt is the longest common prefix of chosen and rejected: of characters for strings, of whole messages for
    conversations. For strings, a space right before the split goes to the completions (TRL's rule), so
    "the sky is blue" / "the sky is green" gives ("the sky is", " blue", " green"): " blue" tokenizes as a word that
    follows the prompt.
    """
    n = common_prefix_length(chosen, rejected)
    if isinstance(chosen, str) and n > 0 and chosen[n - 1] == " ":
        n -= 1
    return chosen[:n], chosen[n:], rejected[n:]


FIX_ROW = "fix or remove the row"


def _check_messages(row_name, field, messages):
    """`row_name` names the row in messages: "train data (file /x/train.jsonl, rows counted from 0), row 30"."""
    if not isinstance(messages, list):
        raise DataError(f"{row_name}, field {field!r}: expected a list of messages (the dataset is conversational, "
                        f"detected from its first row), got {type(messages).__name__}: {messages!r:.80}; {FIX_ROW}")
    if not messages:
        raise DataError(f"{row_name}, field {field!r}: empty message list; expected at least one "
                        f"{{'role': ..., 'content': ...}} message; {FIX_ROW}")
    for j, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"{row_name}, field {field!r}, message {j}: expected a dict with 'role' and 'content', "
                            f"got {message!r:.80}; {FIX_ROW}")
        if message["role"] not in ROLES:
            raise DataError(f"{row_name}, field {field!r}, message {j}: role {message['role']!r} is not one of "
                            f"{ROLES}; {FIX_ROW}")
        if not isinstance(message["content"], (str, list)) and not message.get("tool_calls"):
            raise DataError(f"{row_name}, field {field!r}, message {j}: content must be a string, "
                            f"got {type(message['content']).__name__}; {FIX_ROW}")


def _check_row(row_name, row, conversational, explicit):
    """(prompt, chosen, rejected) of a row, with the prompt extracted if implicit; a DataError for a bad row.
    `row_name` says which row, in messages (see _check_messages)."""
    fields = ("prompt", "chosen", "rejected") if explicit else ("chosen", "rejected")
    for field in fields:
        if field not in row:
            raise DataError(f"{row_name}: missing field {field!r}; every row needs {fields} (format detected from "
                            f"the first row); {FIX_ROW}")
        if conversational:
            _check_messages(row_name, field, row[field])
        elif not isinstance(row[field], str):
            raise DataError(f"{row_name}, field {field!r}: expected a string (the dataset is in the standard format, "
                            f"detected from its first row), got {type(row[field]).__name__}: {row[field]!r:.80}; "
                            f"{FIX_ROW}")
    if explicit:
        prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
        if not prompt:
            raise DataError(f"{row_name}, field 'prompt': empty prompt; DPO compares two answers to the same prompt; "
                            f"{FIX_ROW}")
    else:
        prompt, chosen, rejected = extract_prompt(row["chosen"], row["rejected"])
        if not prompt:
            raise DataError(f"{row_name}: 'chosen' and 'rejected' have no common beginning, so there is no prompt to "
                            "extract (implicit-prompt format); add a 'prompt' field or fix the row")
    return prompt, chosen, rejected


def _blank(completion) -> bool:
    """An empty or whitespace-only completion: a string, or messages with no content and no tool call."""
    if isinstance(completion, str):
        return not completion.strip()
    return all(not m.get("tool_calls") and not (m["content"] if isinstance(m["content"], str) else str(m["content"])).strip()
               for m in completion)


def _template_kwargs(row_name, row):
    """The per-row extras TRL passes to the chat template: `tools` (a list or a JSON string) and
    `chat_template_kwargs` (a dict)."""
    tools = row.get("tools")
    if isinstance(tools, str):  # Arrow cannot store free-form JSON schemas, so datasets often keep tools as a string
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise DataError(f"{row_name}, field 'tools': not valid JSON ({e}); {FIX_ROW}") from None
    if tools is not None and not isinstance(tools, list):
        raise DataError(f"{row_name}, field 'tools': expected a list of tools, got {type(tools).__name__}; {FIX_ROW}")
    kwargs = row.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise DataError(f"{row_name}, field 'chat_template_kwargs': expected a dict, got {type(kwargs).__name__}; "
                        f"{FIX_ROW}")
    return {"tools": tools, **kwargs}


# ----------------------------------------------------------------------------------------------------------------
# Tokenization


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad token id, else its EOS id (masks come from lengths, so a real EOS equal to the pad is
    still scored)."""
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
    `origin` attribute load_preference_dataset sets; (None, None) if unknown (rows are then named by position)."""
    origin = getattr(dataset, "origin", None)
    # filter() copies attributes onto the dataset it returns, with fewer rows: trust them while the count matches
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


def _tokenize_rows(rows, tokenizer, counts, label="data (rows counted from 0)", numbers=None):
    """Check, split, add EOS to and tokenize every row; returns [(row index, prompt_ids, chosen_ids, rejected_ids)]
    for the rows kept, untruncated. Drops are counted in `counts`. A bad row is a DataError that names it as
    "{label}, row {numbers[i]}": its number in its file (`numbers`, default: its index in `rows`)."""
    numbers = range(len(rows)) if numbers is None else numbers
    conversational = isinstance(rows[0].get("chosen"), list)
    explicit = "prompt" in rows[0]
    if conversational and tokenizer.chat_template is None:
        raise DataError("the dataset is conversational (lists of messages) but the tokenizer has no chat template; "
                        "set tokenizer.chat_template or use plain strings")
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
            for field, completion in (("chosen", chosen), ("rejected", rejected)):
                if completion[0]["role"] != "assistant":
                    raise DataError(f"{row_name}, field {field!r}: the completion (after the prompt) must start with "
                                    f"an assistant message, got role {completion[0]['role']!r}; {FIX_ROW}")
            kwargs = _template_kwargs(row_name, row)
            try:  # the prompt ends with the generation prompt ("<|assistant|>"); full conversations do not
                texts += [tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False, **kwargs),
                          tokenizer.apply_chat_template(prompt + chosen, tokenize=False, **kwargs),
                          tokenizer.apply_chat_template(prompt + rejected, tokenize=False, **kwargs)]
            except Exception as e:
                raise DataError(f"{row_name}: the chat template failed on this row: {type(e).__name__}: {e}; "
                                "fix the row or use a chat template that accepts it") from e
        else:
            # EOS ends each standard completion, so the model learns to stop (not added twice). Conversational
            # completions already end with the template's end-of-turn token.
            eos = tokenizer.eos_token
            chosen = chosen if chosen.endswith(eos) else chosen + eos
            rejected = rejected if rejected.endswith(eos) else rejected + eos
            texts += [prompt, prompt + chosen, prompt + rejected]  # plain concatenation, as TRL: no separator
        kept.append(i)

    # One batched call for speed. Standard text gets the tokenizer's special tokens (its BOS, if any), as in TRL;
    # a rendered chat already contains them, so adding them again would double the BOS.
    ids = tokenizer(texts, add_special_tokens=not conversational)["input_ids"] if texts else []
    bos = tokenizer.bos_token_id
    out = []
    for k, i in enumerate(kept):
        prompt_ids, prompt_chosen_ids, prompt_rejected_ids = ids[3 * k: 3 * k + 3]
        if bos is not None and prompt_ids[:2] == [bos, bos]:
            counts["double_bos"] += 1
            prompt_ids, prompt_chosen_ids, prompt_rejected_ids = (
                x[1:] if x[:2] == [bos, bos] else x for x in (prompt_ids, prompt_chosen_ids, prompt_rejected_ids))
        # The prompt alone can tokenize differently from the start of prompt+completion (tokens merging across the
        # boundary, templates that render a generation prompt the full chat lacks). The completion starts where
        # they diverge, and the prompt's divergent tail is left out (TRL 1.16).
        prompt_len = min(common_prefix_length(prompt_ids, prompt_chosen_ids),
                         common_prefix_length(prompt_ids, prompt_rejected_ids))
        counts["prompt_boundary"] += prompt_len < len(prompt_ids)
        chosen_ids, rejected_ids = prompt_chosen_ids[prompt_len:], prompt_rejected_ids[prompt_len:]
        if chosen_ids == rejected_ids:
            counts["identical"] += 1
        elif not chosen_ids or not rejected_ids or (not conversational and any(  # text some tokenizers keep as spaces
                not tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in (chosen_ids, rejected_ids))):
            counts["empty_completion"] += 1
        else:
            out.append((i, prompt_ids[:prompt_len], chosen_ids, rejected_ids))
    return out


# ----------------------------------------------------------------------------------------------------------------
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
    """Limits (a) and (b). (a) keep_end keeps the prompt's last tokens, the context next to the response (and loses
    the BOS); keep_start its first. (b) each completion keeps its first tokens."""
    if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
        keep = slice(-max_prompt_length, None) if truncation_mode == "keep_end" else slice(None, max_prompt_length)
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
      keep_end:   the prompt loses its first tokens, as many as the longer completion needs, but keeps at least
                  min(len(prompt), max_length // 2) of its last tokens; then each completion keeps its first
                  max_length - len(prompt) tokens (only a completion longer than about half of max_length is cut).
      keep_start: the prompt is kept whole (a prompt of max_length tokens or more is dropped before), and each
                  completion keeps its first max_length - len(prompt) tokens (the same as the row rule).
    Both sequences have the same prompt and at least one prompt token; the shorter completion is never cut before
    the longer one."""
    longest = max(len(chosen_ids), len(rejected_ids))
    if max_length is None or len(prompt_ids) + longest <= max_length:
        return prompt_ids, chosen_ids, rejected_ids
    if truncation_mode == "keep_end":
        keep = max(max_length - longest, min(len(prompt_ids), max_length // 2))
        prompt_ids = prompt_ids[len(prompt_ids) - keep:]
    room = max_length - len(prompt_ids)
    return prompt_ids, chosen_ids[:room], rejected_ids[:room]


def prepare_dataset(dataset, tokenizer, *, max_length: int | None = 1024, max_prompt_length: int | None = None,
                    max_completion_length: int | None = None, truncation_mode: str = "keep_end",
                    truncation_scope: str = "pair", name: str = "train", verbose: bool = True,
                    counts: dict | None = None) -> list[dict]:
    """Check, tokenize and truncate a preference dataset; returns [{"prompt_ids", "chosen_ids", "rejected_ids"}]
    in dataset order, dropped rows left out (plus "ref_chosen_logps"/"ref_rejected_logps" if the data has them).

    The format (standard strings or conversational messages; explicit or implicit prompt) is detected from row 0,
    and every row is checked against it. Truncation per row: (a) max_prompt_length, (b) max_completion_length here;
    (c) max_length here for the pair (truncation_scope "pair": `truncate_pair`), or in `collate` for each sequence
    ("row", TRL's rule), counted here. With keep_start, a row whose prompt alone has >= max_length tokens
    is dropped; with keep_end it is kept and counted. Each kind of drop and truncation is printed once (verbose)
    and stored in `counts` if a dict is passed (keys: COUNT_KINDS, plus "rows" and "kept").

    A bad row, an empty dataset, or one whose rows are all dropped is a DataError. A row is named by its 0-based
    number in its file or split when `dataset` comes from load_preference_dataset (its `origin`), else by position.
    """
    _check_limits(max_length, max_prompt_length, max_completion_length, truncation_mode)
    if truncation_scope not in TRUNCATION_SCOPES:
        raise ValueError(f"truncation_scope must be 'pair' or 'row', got {truncation_scope!r}")
    numbers, source = _origin(dataset)
    described = f"the {name} dataset" + (f" ({source})" if source else "")  # "the eval dataset (file /x/a.jsonl)"
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
        if max_length is not None and truncation_mode == "keep_start" and len(prompt_ids) >= max_length:
            counts["prompt_too_long"] += 1
            continue
        if truncation_scope == "pair":  # cut here, so that collate's per-sequence rule finds nothing left to cut
            cut = truncate_pair(prompt_ids, chosen_ids, rejected_ids, max_length, truncation_mode)
            counts["pair_prompt_cut"] += len(cut[0]) < len(prompt_ids)
            counts["pair_completion_cut"] += len(cut[1]) < len(chosen_ids) or len(cut[2]) < len(rejected_ids)
            prompt_ids, chosen_ids, rejected_ids = cut
        chosen_seen = truncate_sequence(prompt_ids, chosen_ids, max_length, truncation_mode)
        rejected_seen = truncate_sequence(prompt_ids, rejected_ids, max_length, truncation_mode)
        if not any(chosen_seen[1][1:]) or not any(rejected_seen[1][1:]):  # a row's first token is never scored
            counts["no_scored_token"] += 1
            continue
        if max_length is not None:
            longest = max(len(chosen_ids), len(rejected_ids))
            counts["max_length_truncated"] += len(prompt_ids) + longest > max_length
            counts["no_prompt_left"] += truncation_mode == "keep_end" and longest >= max_length
        counts["identical_after_truncation"] += chosen_seen == rejected_seen
        example = {"prompt_ids": prompt_ids, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids}
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            if rows[i].get(key) is not None:
                example[key] = rows[i][key]
        examples.append(example)

    counts["rows"], counts["kept"] = len(rows), len(examples)
    if verbose:
        print(f"[data] {name}: {len(examples)} of {len(rows)} pairs kept (max_length={max_length}, max_prompt_length="
              f"{max_prompt_length}, max_completion_length={max_completion_length}, {truncation_mode}, "
              f"truncation_scope={truncation_scope})")
        for kind, line in COUNT_KINDS.items():
            if counts[kind]:
                print(f"[data] {name}: {counts[kind]} pairs: {line}")
    if not examples:  # else training divides by zero batches, or evaluation averages nothing
        raise _all_dropped_error(described, counts, max_length)
    return examples


def _all_dropped_error(described, counts, max_length) -> DataError:
    """Why every row of a dataset was dropped (the counts of each reason), and what to change."""
    reasons = "; ".join(f"{counts[kind]} {COUNT_KINDS[kind]}" for kind in DROPS if counts[kind])
    if counts["no_scored_token"]:
        todo = f"raise max_length (now {max_length}): each sequence needs a second token, the first completion token scored"
    elif counts["prompt_too_long"]:
        todo = f"raise max_length (now {max_length}), set max_prompt_length, or use truncation_mode='keep_end'"
    else:
        todo = "fix the data: every pair needs a chosen and a rejected completion that are non-empty and differ"
    return DataError(f"all {counts['rows']} pairs of {described} were dropped ({reasons}); {todo}")


# ----------------------------------------------------------------------------------------------------------------
# Collation and display


def padded_width(width: int, pad_to_multiple_of: int | None = None) -> int:
    """The batch length: `width` rounded up to a multiple of pad_to_multiple_of (unchanged when it is None)."""
    return width if pad_to_multiple_of is None else -(-width // pad_to_multiple_of) * pad_to_multiple_of


def collate(examples: list[dict], pad_token_id: int, max_length: int | None = None, truncation_mode: str = "keep_end",
            pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """B pairs -> input_ids, attention_mask, completion_mask [2B, T] (long), right-padded.

    Rows 0..B-1 are prompt+chosen, rows B..2B-1 prompt+rejected in the same order, so one forward pass scores both
    and `logps.chunk(2)` splits them. Each row is cut on its own by (c) `truncate_sequence`, so the chosen and
    rejected rows of one pair can keep different amounts of prompt under keep_end (TRL 1.16 does the same).
    Adds ref_chosen_logps / ref_rejected_logps [B] when every example has them.
    """
    _check_limits(max_length, None, None, truncation_mode)
    sequences = [truncate_sequence(ex["prompt_ids"], ex[key], max_length, truncation_mode)
                 for key in ("chosen_ids", "rejected_ids") for ex in examples]
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
                 max_prompt_length: int | None = None, max_completion_length: int | None = None) -> str:
    """One pair the way the model sees it: for prompt+chosen and prompt+rejected, each part (prompt, completion)
    decoded with its token count, and every part cut by truncation marked with the limit that cut it.

    `example` is a prepared row (from `prepare_dataset`; its (a)/(b) cuts are already gone, so only (c) shows) or a
    raw dataset row in any of the four formats (then (a), (b) and (c) all show).
    """
    _check_limits(max_length, max_prompt_length, max_completion_length, truncation_mode)
    if "prompt_ids" in example:
        prompt_ids, chosen_ids, rejected_ids = example["prompt_ids"], example["chosen_ids"], example["rejected_ids"]
    else:
        counts = dict.fromkeys(COUNT_KINDS, 0)
        tokenized = _tokenize_rows([example], tokenizer, counts)
        if not tokenized:
            return "this pair is dropped: " + "; ".join(COUNT_KINDS[k] for k, n in counts.items() if n)
        _, prompt_ids, chosen_ids, rejected_ids = tokenized[0]
    kept_prompt, kept_chosen, kept_rejected = truncate_prompt_and_completions(
        prompt_ids, chosen_ids, rejected_ids, max_prompt_length, max_completion_length, truncation_mode)

    lines = []
    if max_length is not None and truncation_mode == "keep_start" and len(kept_prompt) >= max_length:
        lines.append(f"(prepare_dataset drops this pair: {COUNT_KINDS['prompt_too_long'].removeprefix('dropped: ')})")
    for name, completion_ids, kept_completion in (("chosen", chosen_ids, kept_chosen),
                                                   ("rejected", rejected_ids, kept_rejected)):
        # Tag every token with (part, what cut it or None), in text order, then print runs of equal tags.
        if len(kept_prompt) == len(prompt_ids):
            prompt_tags = [None] * len(prompt_ids)
        elif truncation_mode == "keep_end":
            prompt_tags = ["max_prompt_length"] * (len(prompt_ids) - len(kept_prompt)) + [None] * len(kept_prompt)
        else:
            prompt_tags = [None] * len(kept_prompt) + ["max_prompt_length"] * (len(prompt_ids) - len(kept_prompt))
        completion_tags = ([None] * len(kept_completion)
                           + ["max_completion_length"] * (len(completion_ids) - len(kept_completion)))
        tokens = ([(t, "prompt", cut) for t, cut in zip(prompt_ids, prompt_tags)]
                  + [(t, name, cut) for t, cut in zip(completion_ids, completion_tags)])
        survivors = [k for k, (_, _, cut) in enumerate(tokens) if cut is None]
        window, _ = truncate_sequence(survivors, [], max_length, truncation_mode)
        for k in set(survivors) - set(window):
            tokens[k] = (tokens[k][0], tokens[k][1], "max_length")
        n_prompt = sum(1 for k in window if tokens[k][1] == "prompt")
        lines.append(f"=== prompt + {name}: {len(window)} tokens seen by the model (prompt {n_prompt}, {name} "
                     f"{len(window) - n_prompt}); max_length={max_length}, {truncation_mode} ===")
        start = 0
        for k in range(1, len(tokens) + 1):
            if k == len(tokens) or tokens[k][1:] != tokens[start][1:]:
                part, cut = tokens[start][1:]
                n = k - start
                label = f"{part}, {n} token{'s' * (n != 1)}" + (f", CUT by {cut}" if cut else "")
                lines.append(f"[{label}]")
                lines.append(tokenizer.decode([t for t, _, _ in tokens[start:k]]))
                start = k
    return "\n".join(lines)
