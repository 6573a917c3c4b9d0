"""A hospital's instruction data: read it, check it, turn it into supervised training examples.

Pure Python and torch; no FLARE. Errors are ``ConfigError``s written for hospital IT: they name the data
file, the line or row, the field, and the site-config setting to change.

Training examples follow an Alpaca-like prompt (``PROMPT_TEMPLATE``). Loss is taken on the response tokens
only (labels are -100 on the prompt), and ``</s>`` is appended so the model learns where an answer ends.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Iterator

from ..config import ConfigError, DataFiles

IGNORE_INDEX = -100
SPLITS = ("train", "validation", "test")
_SUFFIX_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}

PROMPT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
PROMPT_TEMPLATE_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"
_INPUT_HEADER = "\n\n### Input:\n"
_RESPONSE_HEADER = "\n\n### Response:\n"


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


def load_records(files: DataFiles, split: str, source: str) -> list[dict]:
    """Read one split of a site's data as ``[{instruction, input, response}]`` (all strings).

    ``source`` is the site config the paths came from, named in errors so the reader knows what to edit.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    path = getattr(files, split)
    if path is None:
        raise ConfigError(f"{source}: no {split} data configured; set data.{split} to the file's path")
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: {split} data file not found (data.{split} in {source}); check the path")
    fmt = _data_format(path, files, split, source)
    if fmt not in _READERS:
        raise ConfigError(f"{path}: unknown data format {fmt!r}; data.format in {source} must be jsonl, csv or parquet")

    wanted = {"instruction": files.instruction_field, "response": files.response_field}
    if files.input_field is not None:
        wanted["input"] = files.input_field
    records = []
    try:
        for where, row in _READERS[fmt](path):
            for role, field in wanted.items():
                if field not in row:
                    have = ", ".join(sorted(map(str, row))) or "none"
                    raise ConfigError(
                        f"{path} {where}: no field {field!r} (the {role}); the record has fields: {have}. "
                        f"Set data.{role}_field in {source} to the name your files use"
                        + (", or null if there is no such column" if role == "input" else "")
                    )
            record = {
                "instruction": _text(row[wanted["instruction"]]),
                "input": _text(row[wanted["input"]]) if "input" in wanted else "",
                "response": _text(row[wanted["response"]]),
            }
            if not record["response"]:
                raise ConfigError(
                    f"{path} {where}: field {files.response_field!r} (the response) is empty; "
                    f"every training example needs an answer to learn from"
                )
            records.append(record)
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); re-save it as UTF-8") from None
    if not records:
        raise ConfigError(f"{path}: the {split} data is empty (data.{split} in {source}); it needs at least one record")
    return records


# ----------------------------------------------------------------------------------------------- prompting
def format_prompt(record: dict) -> str:
    """The prompt the model sees; its answer follows ``### Response:\\n``."""
    if record.get("input"):
        return PROMPT_TEMPLATE.format(instruction=record["instruction"], input=record["input"])
    return PROMPT_TEMPLATE_NO_INPUT.format(instruction=record["instruction"])


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def _cut_middle(ids: list[int], keep: int) -> list[int]:
    if keep <= 0:
        return []
    if len(ids) <= keep:
        return ids
    head = keep // 2
    return ids[:head] + ids[len(ids) - (keep - head) :]


def tokenize_record(record: dict, tokenizer, max_seq_length: int) -> dict[str, list[int]]:
    """``input_ids`` = ``<s>`` prompt response ``</s>``; ``labels`` = -100 over ``<s>`` and the prompt.

    The prompt is tokenized in three pieces (header with the instruction, the note, the response marker),
    which for byte-level BPE gives the same ids as tokenizing ``format_prompt(record)`` whole, because every
    piece boundary is a whitespace boundary.

    Truncation, when the example is longer than ``max_seq_length``:

    1. the response keeps everything the prompt leaves free, and never less than half the window
       (cut at its end only if it alone is longer than that; ``</s>`` is then lost);
    2. the note (``input``) is cut from the *middle*, keeping its opening (who the patient is) and its end
       (the plan), so the instruction and the ``### Response:`` marker always survive;
    3. only if that is not enough is the instruction header cut from the middle as well.
    """
    if max_seq_length < 8:
        raise ValueError(f"max_seq_length must be at least 8, got {max_seq_length}")
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token; training needs one to mark the end of a response")

    if record.get("input"):
        header = _ids(tokenizer, "### Instruction:\n" + record["instruction"] + _INPUT_HEADER)
        note = _ids(tokenizer, record["input"])
    else:
        header = _ids(tokenizer, "### Instruction:\n" + record["instruction"])
        note = []
    marker = _ids(tokenizer, _RESPONSE_HEADER)
    response = _ids(tokenizer, record["response"]) + [tokenizer.eos_token_id]

    prompt_len = len(bos) + len(header) + len(note) + len(marker)
    if prompt_len + len(response) > max_seq_length:
        response = response[: max(max_seq_length - prompt_len, min(len(response), max_seq_length // 2))]
        room = max_seq_length - len(response) - len(bos)
        note = _cut_middle(note, room - len(header) - len(marker))
        header = _cut_middle(header, room - len(note) - len(marker))
        marker = marker[max(0, len(marker) - (room - len(header) - len(note))) :]

    prompt = bos + header + note + marker
    return {"input_ids": prompt + response, "labels": [IGNORE_INDEX] * len(prompt) + response}
