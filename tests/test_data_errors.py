"""Errors a user can act on: every problem in a data file is a data.DataError whose one-line message says what is
wrong, where (file and 1-based line) and what to do. Small files in tmp_path, the tiny
word-level tokenizer; nothing is downloaded."""

import gzip
import json
import re

import pytest

import data
from tiny import make_tokenizer

PAIR = {"prompt": "the movie was", "chosen": " good", "rejected": " bad"}


def jsonl(rows):
    return "".join(json.dumps(r) + "\n" for r in rows)


def prepare(dataset, **kwargs):
    return data.prepare_dataset(dataset, make_tokenizer(), verbose=False, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Reading files: JSON, bytes, empty files, missing paths


def test_invalid_json_names_the_file_and_line(tmp_path):
    """Line 4 of a JSON lines file has a trailing comma; in a .json array, line 3 lacks a comma."""
    path = tmp_path / "pairs.jsonl"
    path.write_text(jsonl([PAIR] * 3) + '{"prompt": "the plot is", "chosen": " good",}\n' + jsonl([PAIR]))
    with pytest.raises(data.DataError, match=r"^invalid JSON \(.*\) in .*pairs\.jsonl, line 4; fix that line"):
        data.load_preference_dataset(str(path))
    array = tmp_path / "pairs.json"
    array.write_text('[\n{"prompt": "a", "chosen": " b", "rejected": " c"},\n{"prompt": "a" "chosen": " b"}\n]')
    with pytest.raises(data.DataError, match=r"invalid JSON \(Expecting ',' delimiter, column 16\) in .*pairs\.json, "
                                             r"line 3"):
        data.load_preference_dataset(str(array))


def test_a_json_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(jsonl([PAIR, [1, 2]]))
    with pytest.raises(data.DataError, match=r"a JSON list where a row should be, in .*pairs\.jsonl, line 2"):
        data.load_preference_dataset(str(path))


@pytest.mark.parametrize("filename", ["pairs.jsonl", "pairs.jsonl.gz", "pairs.csv"])
def test_non_utf8_bytes_name_the_file_and_line(tmp_path, filename):
    """"café" in Latin-1 (0xe9) on line 3; datasets alone would read the .jsonl without a word."""
    text = jsonl([PAIR] * 2) if filename != "pairs.csv" else "prompt,chosen,rejected\na,b,c\n"
    raw = text.encode() + '{"prompt": "caf\xe9", "chosen": " b", "rejected": " c"}\n'.encode("latin-1")
    path = tmp_path / filename
    path.write_bytes(gzip.compress(raw) if filename.endswith(".gz") else raw)
    with pytest.raises(data.DataError, match=rf"byte 0xe9 is not UTF-8 text, in .*{filename}, line 3; save the file "
                                             "as UTF-8"):
        data.load_preference_dataset(str(path))


@pytest.mark.parametrize("filename, text", [("pairs.jsonl", ""), ("pairs.jsonl", "\n\n"), ("pairs.json", "[]"),
                                            ("pairs.csv", "prompt,chosen,rejected\n")])
def test_empty_file_says_no_rows(tmp_path, filename, text):
    """datasets raises StopIteration on an empty .jsonl and 'Instruction "train" corresponds to no data!' on the
    others."""
    (tmp_path / filename).write_text(text)
    with pytest.raises(data.DataError, match=rf"^no rows: .*{filename} (is empty|holds an empty JSON array)"):
        data.load_preference_dataset(str(tmp_path / filename))


def test_corrupt_parquet_names_the_file(tmp_path):
    (tmp_path / "pairs.parquet").write_text("not parquet")
    with pytest.raises(data.DataError, match=r"datasets could not read .*pairs\.parquet \(ArrowInvalid: Parquet magic"):
        data.load_preference_dataset(str(tmp_path / "pairs.parquet"))


def test_missing_path_is_a_data_error_and_a_file_not_found_error(tmp_path):
    (tmp_path / "pairs.jsonl").write_text(jsonl([PAIR]))
    with pytest.raises(data.DataError, match=r"'.*pair\.jsonl' does not exist; .* contains: \['pairs\.jsonl'\]; "
                                             "check the path") as caught:
        data.load_preference_dataset(str(tmp_path / "pair.jsonl"))
    assert isinstance(caught.value, FileNotFoundError)
    with pytest.raises(data.DataError, match=r"does not exist \(nor does its folder .*nowhere\)"):
        data.load_preference_dataset(str(tmp_path / "nowhere" / "pairs.jsonl"))


def test_hold_out_that_leaves_no_training_rows(tmp_path):
    (tmp_path / "pairs.jsonl").write_text(jsonl([PAIR]))
    with pytest.raises(data.DataError, match=r"eval_fraction=0.05 of 1 rows leaves no training rows, in file "
                                             r".*pairs\.jsonl; add rows, or set eval_fraction=0"):
        data.load_preference_dataset(str(tmp_path / "pairs.jsonl"))
