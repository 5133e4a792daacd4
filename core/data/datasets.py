"""Record datasets from local files: JSONL, parquet, or a `datasets` save_to_disk directory.

JSONL is validated line by line before `datasets` sees it, so a bad row is reported as `path:LINE: ...`
rather than as a pyarrow traceback. Parquet and saved datasets are checked per column at load and per row
(`path: row N: ...`) when read.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.data.tokenizer import apply_chat_template, validate_messages
from core.errors import InputError

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)


@dataclass(frozen=True)
class RecordFields:
    """Which fields hold a record's content. Exactly one layout: `text`; `prompt` (+ `response`); `messages`."""

    text: str | None = None
    prompt: str | None = None
    response: str | None = None
    messages: str | None = None

    def __post_init__(self) -> None:
        layouts = [self.text is not None, self.prompt is not None, self.messages is not None]
        if sum(layouts) != 1 or (self.response is not None and self.prompt is None):
            raise InputError(
                f"record fields: set exactly one of text, prompt (+ response), messages; got {self}"
            )

    @property
    def string_fields(self) -> list[str]:
        return [f for f in (self.text, self.prompt, self.response) if f is not None]

    @property
    def required(self) -> list[str]:
        return self.string_fields + ([self.messages] if self.messages is not None else [])


TEXT_FIELDS = RecordFields(text="text")


def check_record(record: Any, fields: RecordFields) -> str | None:
    """Why `record` does not fit `fields`, or None when it does."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    for name in fields.required:
        if name not in record:
            return f"missing field '{name}'"
    for name in fields.string_fields:
        if not isinstance(record[name], str):
            return f"field '{name}' must be a string, got {type(record[name]).__name__}"
    if fields.messages is not None:
        try:
            validate_messages(record[fields.messages], where=f"field '{fields.messages}'")
        except InputError as e:
            return str(e)
    return None


def jsonl_lines(path: str | Path) -> Iterator[tuple[str, str]]:
    """(where, line) for every non-blank line of a JSONL file, where = "path:LINE". The file is read as
    bytes, so that bad UTF-8 is an InputError on its line rather than a UnicodeDecodeError of some 8 KiB
    chunk; a UTF-8 byte-order mark on the first line is dropped."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            where = f"{path}:{line_no}"
            try:
                line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise InputError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start + 1})") from None
            if line.strip():
                yield where, line


def validate_jsonl(path: Path, fields: RecordFields) -> int:
    """Check every line of a JSONL file; returns the number of records. Blank lines are skipped."""
    n_records = 0
    for where, line in jsonl_lines(path):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from e
        problem = check_record(record, fields)
        if problem is not None:
            raise InputError(f"{where}: {problem}")
        n_records += 1
    return n_records


def load_records(
    path: str | Path, fields: RecordFields = TEXT_FIELDS, split: str = "train"
) -> datasets.Dataset:
    """A `datasets.Dataset` from a .jsonl/.json (JSON lines), .parquet file, or save_to_disk directory.

    `split` picks the split when the directory holds a DatasetDict.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: dataset not found")
    if path.is_dir():
        dataset = _load_from_disk(path, split)
    elif path.suffix in JSONL_SUFFIXES:
        if not validate_jsonl(path, fields):  # `datasets` fails on an empty file with a bare StopIteration
            raise InputError(f"{path}: no records (the file is empty)")
        dataset = _load_file("json", path)
    elif path.suffix in PARQUET_SUFFIXES:
        dataset = _load_file("parquet", path)
    else:
        raise InputError(
            f"{path}: unsupported dataset format (expected .jsonl, .json, .parquet or a directory)"
        )
    missing = [name for name in fields.required if name not in dataset.column_names]
    if missing:
        raise InputError(f"{path}: missing field '{missing[0]}' (columns: {', '.join(dataset.column_names)})")
    if not len(dataset):
        raise InputError(f"{path}: no records")
    return dataset


def _load_file(builder: str, path: Path) -> datasets.Dataset:
    import datasets

    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    except (datasets.exceptions.DatasetGenerationError, ValueError, OSError) as e:
        raise InputError(f"{path}: cannot read {builder}: {_one_line(e)}") from e


def _load_from_disk(path: Path, split: str) -> datasets.Dataset:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as e:
        raise InputError(f"{path}: not a datasets save_to_disk directory: {_one_line(e)}") from e
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise InputError(f"{path}: no split '{split}' (splits: {', '.join(loaded)})")
        return loaded[split]
    return loaded


def _one_line(e: BaseException) -> str:
    cause = e.__cause__ or e
    return " ".join(str(cause).split())


def record_text(
    record: dict[str, Any],
    fields: RecordFields,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> str:
    """The text a record trains on: its text, prompt + response, or its messages through the chat template."""
    if fields.text is not None:
        return record[fields.text]
    if fields.prompt is not None:
        return record[fields.prompt] + (record[fields.response] if fields.response is not None else "")
    if tokenizer is None:
        raise InputError(f"record fields: '{fields.messages}' is a chat field and needs a tokenizer")
    return apply_chat_template(tokenizer, record[fields.messages])


def iter_texts(
    dataset: datasets.Dataset,
    fields: RecordFields,
    source: str | Path,
    tokenizer: PreTrainedTokenizerBase | None = None,
    batch_size: int = 1000,
) -> Iterator[list[str]]:
    """Batches of record texts; a record that does not fit `fields` raises `source: row N: ...`."""
    columns = fields.required
    dataset = dataset.select_columns(columns)
    for start in range(0, len(dataset), batch_size):
        batch = dataset[start : start + batch_size]  # dict: column -> list of values
        records = [dict(zip(columns, values)) for values in zip(*(batch[c] for c in columns))]
        for i, record in enumerate(records):
            problem = check_record(record, fields)
            if problem is not None:
                raise InputError(f"{source}: row {start + i}: {problem}")
        yield [record_text(r, fields, tokenizer) for r in records]
