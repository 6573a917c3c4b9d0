"""Reading a hospital's files (JSONL, CSV, Parquet), the errors hospital IT sees, and supervised tokenization."""

import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from hospital_fedlora.config import ConfigError, DataFiles
from hospital_fedlora.site.dataset import IGNORE_INDEX, format_prompt, load_records, tokenize_record
from hospital_fedlora.site.trainer import collate_batch

SOURCE = "site_configs/hospital-a.yaml"
ROWS = [
    {"instruction": "Assign the diagnosis group.", "input": "Pt 70y M. O/E irregularly irregular pulse.", "response": "Cardiology: atrial fibrillation"},
    {"instruction": "Say hello.", "input": "", "response": "Hello."},
]


def _files(path, **kw):
    return DataFiles(train=path, validation=path, **kw)


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _csv(path, rows):
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def tok(base_model_dir):
    return AutoTokenizer.from_pretrained(base_model_dir, local_files_only=True)


# -------------------------------------------------------------------------------------------- reading
def test_the_three_formats_read_the_same_records(tmp_path):
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "d.parquet")
    paths = [_jsonl(tmp_path / "d.jsonl", ROWS), _csv(tmp_path / "d.csv", ROWS), tmp_path / "d.parquet"]
    for path in paths:
        assert load_records(_files(path), "train", SOURCE) == ROWS


def test_format_setting_overrides_the_suffix(tmp_path):
    path = _jsonl(tmp_path / "notes.txt", ROWS)
    assert load_records(_files(path, format="jsonl"), "validation", SOURCE) == ROWS
    with pytest.raises(ConfigError, match=r"notes\.txt.*suffix '\.txt'.*data\.format in site_configs/hospital-a\.yaml"):
        load_records(_files(path), "train", SOURCE)


def test_renamed_fields_and_no_input_column(tmp_path):
    rows = [{"question": "Say hello.", "answer": "Hello."}]
    path = _jsonl(tmp_path / "d.jsonl", rows)
    files = _files(path, instruction_field="question", input_field=None, response_field="answer")
    assert load_records(files, "train", SOURCE) == [{"instruction": "Say hello.", "input": "", "response": "Hello."}]


def test_generated_site_data_loads(data_dir):
    files = DataFiles(train=data_dir / "hospital-b" / "train.jsonl", validation=data_dir / "hospital-b" / "validation.jsonl")
    records = load_records(files, "train", SOURCE)
    assert len(records) == 160
    assert all(set(r) == {"instruction", "input", "response"} for r in records)


def test_missing_file_names_the_file_and_setting(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.jsonl: validation data file not found \(data\.validation in site_configs"):
        load_records(_files(tmp_path / "nope.jsonl"), "validation", SOURCE)


def test_no_test_split_configured(tmp_path):
    with pytest.raises(ConfigError, match=r"no test data configured; set data\.test"):
        load_records(_files(_jsonl(tmp_path / "d.jsonl", ROWS)), "test", SOURCE)


def test_malformed_json_line_is_named(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + '{"instruction": "x", "response": \n')
    with pytest.raises(ConfigError, match=r"d\.jsonl line 3: not valid JSON"):
        load_records(_files(path), "train", SOURCE)


def test_json_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('["a", "b"]\n')
    with pytest.raises(ConfigError, match=r"line 1: expected a JSON object, got list"):
        load_records(_files(path), "train", SOURCE)


def test_csv_row_with_extra_values_is_named(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('instruction,input,response\na,b,c\nd,e,f,g\n')
    with pytest.raises(ConfigError, match=r"d\.csv line 3: more values than the 3 header columns"):
        load_records(_files(path), "train", SOURCE)


def test_missing_field_names_it_lists_the_fields_and_the_setting(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "input": "b", "answer": "c"}])
    with pytest.raises(ConfigError) as err:
        load_records(_files(path), "train", SOURCE)
    msg = str(err.value)
    assert "d.jsonl line 1: no field 'response'" in msg
    assert "fields: answer, input, instruction" in msg
    assert f"Set data.response_field in {SOURCE}" in msg


def test_missing_column_in_parquet(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([{"instruction": "a", "response": "b"}]), path)
    with pytest.raises(ConfigError, match=r"row 1: no field 'input'.*data\.input_field.*or null"):
        load_records(_files(path), "train", SOURCE)


@pytest.mark.parametrize("content", ["", "\n\n"])
def test_empty_dataset(tmp_path, content):
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(ConfigError, match=r"d\.jsonl: the train data is empty"):
        load_records(_files(path), "train", SOURCE)


def test_empty_response_is_named(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [ROWS[0], {"instruction": "a", "input": "b", "response": "  "}])
    with pytest.raises(ConfigError, match=r"d\.jsonl line 2: field 'response' \(the response\) is empty"):
        load_records(_files(path), "train", SOURCE)


def test_not_utf8(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b"instruction,input,response\na,caf\xe9,c\n")
    with pytest.raises(ConfigError, match=r"d\.csv: not UTF-8"):
        load_records(_files(path), "train", SOURCE)


# ----------------------------------------------------------------------------------------- prompting
def test_prompt_with_and_without_input():
    assert format_prompt(ROWS[0]) == (
        "### Instruction:\nAssign the diagnosis group.\n\n### Input:\nPt 70y M. O/E irregularly irregular pulse."
        "\n\n### Response:\n"
    )
    assert format_prompt(ROWS[1]) == "### Instruction:\nSay hello.\n\n### Response:\n"


@pytest.mark.parametrize("row", ROWS)
def test_tokenized_record_matches_whole_prompt_and_masks_it(tok, row):
    ex = tokenize_record(row, tok, 256)
    prompt_ids = tok(format_prompt(row))["input_ids"]  # with <s>
    response_ids = tok(row["response"], add_special_tokens=False)["input_ids"]
    assert ex["input_ids"] == prompt_ids + response_ids + [tok.eos_token_id]
    assert ex["labels"] == [IGNORE_INDEX] * len(prompt_ids) + response_ids + [tok.eos_token_id]


def test_every_generated_record_tokenizes_like_its_whole_text(tok, data_dir):
    files = DataFiles(train=data_dir / "hospital-a" / "train.jsonl", validation=data_dir / "hospital-a" / "validation.jsonl")
    for r in load_records(files, "validation", SOURCE):
        ex = tokenize_record(r, tok, 256)
        assert ex["input_ids"] == tok(format_prompt(r) + r["response"])["input_ids"] + [tok.eos_token_id]


def test_truncation_cuts_the_note_middle_and_keeps_marker_and_response(tok):
    note = "Pt 70y M. " + "HR 80 BP 120/80. " * 60 + "Rx apixaban 5 mg twice daily."
    row = {"instruction": "Summarize the clinical note.", "input": note, "response": "70-year-old man with atrial fibrillation."}
    full = tokenize_record(row, tok, 1024)
    ex = tokenize_record(row, tok, 96)
    assert len(ex["input_ids"]) == 96
    response = [t for t in full["labels"] if t != IGNORE_INDEX]
    assert [t for t in ex["labels"] if t != IGNORE_INDEX] == response  # whole response and </s>
    text = tok.decode(ex["input_ids"])
    assert text.startswith("<s>### Instruction:\nSummarize the clinical note.\n\n### Input:\nPt 70y M.")
    assert "Rx apixaban 5 mg twice daily.\n\n### Response:\n70-year-old man" in text
    assert text.count("HR 80") < 60


def test_truncation_of_a_long_response_keeps_half_the_window(tok):
    row = {"instruction": "Repeat.", "input": "word " * 100, "response": "Take apixaban daily. " * 40}
    ex = tokenize_record(row, tok, 64)
    assert len(ex["input_ids"]) == 64
    assert sum(t != IGNORE_INDEX for t in ex["labels"]) == 32
    assert "### Response:" in tok.decode(ex["input_ids"])


# ------------------------------------------------------------------------------------------ batching
def test_collate_right_pads(tok):
    ds = [tokenize_record(r, tok, 256) for r in ROWS]
    batch = collate_batch([ds[0], ds[1]], tok.pad_token_id)
    n0, n1 = len(ds[0]["input_ids"]), len(ds[1]["input_ids"])
    assert batch["input_ids"].shape == (2, max(n0, n1))
    short = 0 if n0 < n1 else 1
    n = min(n0, n1)
    assert batch["attention_mask"][short].tolist() == [1] * n + [0] * (abs(n0 - n1))
    assert (batch["input_ids"][short, n:] == tok.pad_token_id).all()
    assert (batch["labels"][short, n:] == IGNORE_INDEX).all()
    assert batch["labels"][short, :n].tolist() == ds[short]["labels"]
    assert int(batch["attention_mask"].sum()) == n0 + n1
