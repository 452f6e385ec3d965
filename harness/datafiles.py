"""Reading preference data from files, folders and the Hub: formats, splits, the held-out eval set, and a
DataError naming the file and line of a bad row. What DPO does with the rows (prompt extraction, tokenization,
truncation, collation) is data.py's; this is the plumbing before it."""
import gzip
import json
import random
import zlib
from pathlib import Path

import datasets

from harness.errors import DataError, DataNotFoundError

EVAL_SPLITS = ("test", "validation", "eval")  # used as the eval split, in this order, when eval_split is not given
FILE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}  # suffix -> datasets builder




def _file_format(path: Path) -> str | None:
    """The datasets builder for a data file ("json", "parquet", "csv"), or None; `.gz` is read transparently."""
    name = path.name.lower().removesuffix(".gz")
    return FILE_FORMATS.get(Path(name).suffix)


def _read_text(path: Path) -> str:
    """A .jsonl/.json/.csv file (or .gz) as text; a DataError naming the line of the first byte that is not UTF-8.
    datasets would read such bytes without a word (as mangled text) or fail with no line number."""
    try:
        with (gzip.open(path) if path.name.lower().endswith(".gz") else open(path, "rb")) as f:
            raw = f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:  # a download or copy cut short
        raise DataError(f"{path} is not a whole gzip file ({type(e).__name__}: {e}); copy or download it "
                        "again") from None
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
            if isinstance(document, dict) and document and all(isinstance(v, list) for v in document.values()):
                raise DataError(f"{path} holds one JSON object of columns ({', '.join(list(document)[:4])}: lists), "
                                "not rows; write a JSON array of rows [{\"prompt\": ..., \"chosen\": ..., "
                                "\"rejected\": ...}, ...] or JSON lines")
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
        loaded = datasets.load_dataset(builder, data_files={s: [str(p) for p in ps] for s, ps in files.items()})
        if builder == "json" and any(len(split) == 1 for split in loaded.values()):
            for path in paths:  # one row: perhaps one object of columns ({"prompt": [...], ...}), said plainly
                _find_text_error(path, builder)
        return loaded
    except DataError:
        raise
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


def read_splits(dataset: str) -> tuple[dict, dict]:
    """The splits of `dataset` (see load_preference_dataset) and, for each, where its rows come from (for messages)."""
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
    return splits, where


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
    splits, where = read_splits(dataset)
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
