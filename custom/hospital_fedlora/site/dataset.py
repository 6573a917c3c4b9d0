"""A hospital's data as it exports it (JSONL, CSV, Parquet): read it, map its columns onto the job's task, check it.

Pure Python; no FLARE, no tokenizer (``prompting`` turns records into training examples). Errors are
``ConfigError``s written for hospital IT: they name the data file, the line or row, the field, and the
site-config setting to change.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Iterator

from ..config import ConfigError, DataFiles, TaskSettings, template_fields

SPLITS = ("train", "validation", "test")
_SUFFIX_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


# ------------------------------------------------------------------------------------------------ reading
def _data_format(path: Path, files: DataFiles, split: str, source: str) -> str:
    if files.format is not None:
        return files.format
    fmt = _SUFFIX_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ConfigError(
            f"{path}: cannot tell the format of the {split} data from the suffix {path.suffix!r}; "
            f"rename the file to .jsonl, .csv or .parquet, or set data.format in {source}"
        )
    return fmt


def _rows_jsonl(path: Path) -> Iterator[tuple[str, dict]]:
    with path.open("r", encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ConfigError(f"{path} line {number}: not valid JSON ({err.msg}); each line must be one JSON object") from None
            if not isinstance(row, dict):
                raise ConfigError(f"{path} line {number}: expected a JSON object, got {type(row).__name__}")
            yield f"line {number}", row


def _rows_csv(path: Path) -> Iterator[tuple[str, dict]]:
    with path.open("r", encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        try:
            for row in reader:
                where = f"line {reader.line_num}"
                if None in row:
                    raise ConfigError(f"{path} {where}: more values than the {len(reader.fieldnames)} header columns")
                yield where, row
        except csv.Error as err:
            raise ConfigError(f"{path} line {reader.line_num}: malformed CSV ({err})") from None


def _rows_parquet(path: Path) -> Iterator[tuple[str, dict]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for a bad file
        raise ConfigError(f"{path}: cannot read as Parquet ({err})") from None
    for number, row in enumerate(table.to_pylist(), start=1):
        yield f"row {number}", row


_READERS = {"jsonl": _rows_jsonl, "csv": _rows_csv, "parquet": _rows_parquet}


def _text(value) -> str:
    return "" if value is None else str(value).strip()


ROLES = ("system", "user", "assistant")


def load_records(files: DataFiles, split: str, source: str, task: TaskSettings | None = None) -> list[dict]:
    """Read one split of a site's data as records the prompt formats take (all strings):

    - instruction/response files give ``{instruction, input, response}``; the instruction is the job's
      (``task.instruction``, its ``{fields}`` filled from the record) or, when the job has none, the record's own;
    - conversational files (``data.columns.messages``) give ``{messages: [{role, content}, ...]}``.

    ``source`` is the site config the paths came from, named in errors so the reader knows what to edit.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    task = task or TaskSettings()
    path = getattr(files, split)
    if path is None:
        raise ConfigError(f"{source}: no {split} data configured; set data.{split} to the file's path")
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: {split} data file not found (data.{split} in {source}); check the path")
    fmt = _data_format(path, files, split, source)
    if fmt not in _READERS:
        raise ConfigError(f"{path}: unknown data format {fmt!r}; data.format in {source} must be jsonl, csv or parquet")

    make = _conversation if files.conversational else _instruction_record
    wanted = _wanted_columns(files, task, source)
    records = []
    try:
        for where, row in _READERS[fmt](path):
            for field, column in wanted.items():
                if column not in row:
                    have = ", ".join(sorted(map(str, row))) or "none"
                    raise ConfigError(
                        f"{path} {where}: no column {column!r} (the task's {field}); the record has: {have}. "
                        f"Set data.columns.{field} in {source} to the name your files use"
                        + (", or null if there is no such column" if field == "input" else "")
                    )
            records.append(make({f: row[c] for f, c in wanted.items()}, task, f"{path} {where}"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); re-save it as UTF-8") from None
    if not records:
        raise ConfigError(f"{path}: the {split} data is empty (data.{split} in {source}); it needs at least one record")
    return records


def _wanted_columns(files: DataFiles, task: TaskSettings, source: str) -> dict[str, str]:
    """The task's field -> the column to read, for every field this job needs from this site's files."""
    columns = files.columns
    if files.conversational:
        return {"messages": columns["messages"]}
    wanted = {"response": columns["response"]}
    if columns.get("input"):
        wanted["input"] = columns["input"]
    if task.instruction is None:
        if not columns.get("instruction"):
            raise ConfigError(
                f"{source}: field 'data.columns.instruction' is null, but this job has no instruction of its own "
                "(task.instruction), so each record must bring one: name the column that holds it"
            )
        wanted["instruction"] = columns["instruction"]
    for field in template_fields(task.instruction or ""):
        if field not in columns:
            raise ConfigError(
                f"{source}: the job's instruction names the field {{{field}}}; add 'data.columns.{field}: "
                "<your column>' so it can be filled from your records"
            )
        wanted[field] = columns[field]
    return wanted


def _instruction_record(values: dict, task: TaskSettings, where: str) -> dict:
    for field in ("response", *template_fields(task.instruction or "")):
        if not _text(values[field]):
            raise ConfigError(
                f"{where}: the task's {field} is empty"
                + ("; every training example needs an answer to learn from" if field == "response" else "")
            )
    if task.instruction is None:
        instruction = _text(values["instruction"])
        if not instruction:
            raise ConfigError(f"{where}: the instruction is empty, and the job sets none (task.instruction)")
    else:
        instruction = task.instruction.format(**{f: _text(values[f]) for f in template_fields(task.instruction)})
    return {"instruction": instruction, "input": _text(values.get("input")), "response": _text(values["response"])}


def _conversation(values: dict, task: TaskSettings, where: str) -> dict:
    """``{messages}`` with known roles and text in every turn, ending with an answer to learn from."""
    turns = values["messages"]
    if isinstance(turns, str):  # CSV cells hold the list as JSON text
        try:
            turns = json.loads(turns)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{where}: the messages column is not a JSON list ({err.msg})") from None
    if not isinstance(turns, list) or not turns:
        raise ConfigError(f"{where}: messages must be a non-empty list of {{role, content}} objects")
    messages = []
    for i, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise ConfigError(f"{where}: message {i} must be an object with 'role' and 'content'")
        role, content = str(turn["role"]).strip(), _text(turn["content"])
        if role not in ROLES:
            raise ConfigError(
                f"{where}: message {i} has the role {role!r}, which the prompt formats do not know; "
                f"use one of {', '.join(ROLES)} (map your export's roles onto them)"
            )
        if not content:
            raise ConfigError(f"{where}: message {i} ({role}) has no text")
        messages.append({"role": role, "content": content})
    if messages[-1]["role"] != "assistant":
        raise ConfigError(f"{where}: the last message is from {messages[-1]['role']!r}; a record must end with an "
                          "assistant answer to learn from")
    return {"messages": messages}
