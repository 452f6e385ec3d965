"""Errors a user can act on: every data problem is a data.DataError whose one-line message says what is wrong, where
(file and 1-based line, or file/split and 0-based row and field) and what to do. Small files in tmp_path, the tiny
word-level tokenizer; nothing is downloaded."""

import gzip
import json
import re

import datasets
import pytest

import data
from harness import datafiles
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
        datafiles.load_preference_dataset(str(path))
    array = tmp_path / "pairs.json"
    array.write_text('[\n{"prompt": "a", "chosen": " b", "rejected": " c"},\n{"prompt": "a" "chosen": " b"}\n]')
    with pytest.raises(data.DataError, match=r"invalid JSON \(Expecting ',' delimiter, column 16\) in .*pairs\.json, "
                                             r"line 3"):
        datafiles.load_preference_dataset(str(array))


def test_a_json_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(jsonl([PAIR, [1, 2]]))
    with pytest.raises(data.DataError, match=r"a JSON list where a row should be, in .*pairs\.jsonl, line 2"):
        datafiles.load_preference_dataset(str(path))


@pytest.mark.parametrize("filename", ["pairs.jsonl", "pairs.jsonl.gz", "pairs.csv"])
def test_non_utf8_bytes_name_the_file_and_line(tmp_path, filename):
    """"café" in Latin-1 (0xe9) on line 3; datasets alone would read the .jsonl without a word."""
    text = jsonl([PAIR] * 2) if filename != "pairs.csv" else "prompt,chosen,rejected\na,b,c\n"
    raw = text.encode() + '{"prompt": "caf\xe9", "chosen": " b", "rejected": " c"}\n'.encode("latin-1")
    path = tmp_path / filename
    path.write_bytes(gzip.compress(raw) if filename.endswith(".gz") else raw)
    with pytest.raises(data.DataError, match=rf"byte 0xe9 is not UTF-8 text, in .*{filename}, line 3; save the file "
                                             "as UTF-8"):
        datafiles.load_preference_dataset(str(path))


@pytest.mark.parametrize("filename, text", [("pairs.jsonl", ""), ("pairs.jsonl", "\n\n"), ("pairs.json", "[]"),
                                            ("pairs.csv", "prompt,chosen,rejected\n")])
def test_empty_file_says_no_rows(tmp_path, filename, text):
    """datasets raises StopIteration on an empty .jsonl and 'Instruction "train" corresponds to no data!' on the
    others."""
    (tmp_path / filename).write_text(text)
    with pytest.raises(data.DataError, match=rf"^no rows: .*{filename} (is empty|holds an empty JSON array)"):
        datafiles.load_preference_dataset(str(tmp_path / filename))


def test_corrupt_parquet_names_the_file(tmp_path):
    (tmp_path / "pairs.parquet").write_text("not parquet")
    with pytest.raises(data.DataError, match=r"datasets could not read .*pairs\.parquet \(ArrowInvalid: Parquet magic"):
        datafiles.load_preference_dataset(str(tmp_path / "pairs.parquet"))


def test_missing_path_is_a_data_error_and_a_file_not_found_error(tmp_path):
    (tmp_path / "pairs.jsonl").write_text(jsonl([PAIR]))
    with pytest.raises(data.DataError, match=r"'.*pair\.jsonl' does not exist; .* contains: \['pairs\.jsonl'\]; "
                                             "check the path") as caught:
        datafiles.load_preference_dataset(str(tmp_path / "pair.jsonl"))
    assert isinstance(caught.value, FileNotFoundError)
    with pytest.raises(data.DataError, match=r"does not exist \(nor does its folder .*nowhere\)"):
        datafiles.load_preference_dataset(str(tmp_path / "nowhere" / "pairs.jsonl"))


# ---------------------------------------------------------------------------------------------------------------
# Rows: named by their number in their own file, also after the eval hold-out


def test_bad_row_is_named_by_its_row_in_the_file_after_the_hold_out(tmp_path):
    """40 rows, default eval_fraction 0.05 and seed 42: rows 1 and 7 are held out, so file row 30 is the 28th train
    row (0-based). The null at file row 30 is still reported as row 30; one in a held-out row by its file row too."""
    rows = [dict(PAIR) for _ in range(40)]
    rows[30]["rejected"] = None
    path = tmp_path / "pairs.jsonl"
    path.write_text(jsonl(rows))
    train, eval_ = datafiles.load_preference_dataset(str(path))
    assert list(eval_.origin["rows"]) == [1, 7] and train.origin["rows"][28] == 30
    with pytest.raises(data.DataError, match=rf"^train data \(file {re.escape(str(path))}, rows counted from 0\), "
                                             r"row 30, field 'rejected': expected a string .* got NoneType: None; "
                                             r"fix or remove the row$"):
        prepare(train, name="train")

    rows[30]["rejected"], rows[7]["chosen"] = " bad", None
    path.write_text(jsonl(rows))
    train, eval_ = datafiles.load_preference_dataset(str(path))
    assert len(prepare(train)) == 38
    with pytest.raises(data.DataError, match=r"^eval data \(file .*pairs\.jsonl, rows counted from 0\), row 7, "
                                             r"field 'chosen': expected a string"):
        prepare(eval_, name="eval")


def test_bad_row_in_test_split_names_the_split_and_the_file(tmp_path):
    """A folder with train.jsonl and test.jsonl: the test split is the eval set; its row 3 lacks 'rejected' (which
    Arrow, filling in the column, reads as None)."""
    (tmp_path / "train.jsonl").write_text(jsonl([PAIR] * 5))
    (tmp_path / "test.jsonl").write_text(jsonl([PAIR] * 3 + [{"prompt": "the plot is", "chosen": " good"}]))
    train, eval_ = datafiles.load_preference_dataset(str(tmp_path))
    assert len(prepare(train)) == 5
    test_file = re.escape(str(tmp_path / "test.jsonl"))
    with pytest.raises(data.DataError, match=rf"^eval data \(split 'test', file {test_file}, rows counted from 0\), "
                                             r"row 3, field 'rejected': expected a string"):
        prepare(eval_, name="eval")


def test_a_filtered_dataset_is_named_by_position():
    """filter() copies the `origin` attribute (file rows 10, 11, 12) onto a dataset with fewer rows; prepare_dataset
    then ignores it rather than name the bad row (file row 11, now at position 0) as row 10."""
    dataset = datafiles._with_origin(datasets.Dataset.from_list([PAIR, {**PAIR, "chosen": None}, PAIR]), "file x.jsonl",
                                [10, 11, 12])
    smaller = dataset.filter(lambda row, i: i > 0, with_indices=True)
    with pytest.raises(data.DataError, match=r"^train data \(rows counted from 0\), row 0, field 'chosen'"):
        prepare(smaller)


# ---------------------------------------------------------------------------------------------------------------
# Nothing left to train or evaluate on


def test_all_rows_dropped_names_the_split_the_reasons_and_what_to_do(tmp_path):
    """keep_start with max_length=3: every prompt "<s> the movie was" (4 tokens) fills max_length, so every pair
    would be dropped; identical chosen and rejected everywhere likewise. Both are DataErrors, not a later
    ZeroDivisionError."""
    (tmp_path / "train.jsonl").write_text(jsonl([PAIR] * 4))
    (tmp_path / "test.jsonl").write_text(jsonl([PAIR] * 2))
    train, eval_ = datafiles.load_preference_dataset(str(tmp_path))
    with pytest.raises(data.DataError, match=r"^all 2 pairs of the eval dataset \(split 'test', file .*test\.jsonl\) "
                                             r"were dropped \(2 dropped: prompt alone has >= max_length tokens .*\); "
                                             r"raise max_length \(now 3\)"):
        prepare(eval_, name="eval", max_length=3, truncation_mode="keep_start")
    with pytest.raises(data.DataError, match=r"^all 2 pairs of the train dataset were dropped \(1 dropped: chosen == "
                                             r"rejected, nothing to prefer; 1 dropped: empty or whitespace-only chosen or rejected "
                                             r"completion\); fix the data"):
        prepare([{**PAIR, "rejected": " good"}, {**PAIR, "chosen": ""}])


def test_hold_out_that_leaves_no_training_rows(tmp_path):
    (tmp_path / "pairs.jsonl").write_text(jsonl([PAIR]))
    with pytest.raises(data.DataError, match=r"eval_fraction=0.05 of 1 rows leaves no training rows, in file "
                                             r".*pairs\.jsonl; add rows, or set eval_fraction=0"):
        datafiles.load_preference_dataset(str(tmp_path / "pairs.jsonl"))
