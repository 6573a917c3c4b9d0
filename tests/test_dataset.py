"""Reading a hospital's files (JSONL, CSV, Parquet) onto the job's task, and the errors hospital IT sees."""

import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hospital_fedlora.config import ConfigError, DataFiles, TaskSettings, load_site_config
from hospital_fedlora.site.dataset import load_records

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
    files = _files(path, columns={"instruction": "question", "input": None, "response": "answer"})
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
    assert "d.jsonl line 1: no column 'response' (the task's response)" in msg
    assert "the record has: answer, input, instruction" in msg
    assert f"Set data.columns.response in {SOURCE}" in msg


def test_missing_column_in_parquet(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([{"instruction": "a", "response": "b"}]), path)
    with pytest.raises(ConfigError, match=r"row 1: no column 'input'.*data\.columns\.input.*or null"):
        load_records(_files(path), "train", SOURCE)


@pytest.mark.parametrize("content", ["", "\n\n"])
def test_empty_dataset(tmp_path, content):
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(ConfigError, match=r"d\.jsonl: the train data is empty"):
        load_records(_files(path), "train", SOURCE)


def test_empty_response_is_named(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [ROWS[0], {"instruction": "a", "input": "b", "response": "  "}])
    with pytest.raises(ConfigError, match=r"d\.jsonl line 2: the task's response is empty"):
        load_records(_files(path), "train", SOURCE)


def test_not_utf8(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b"instruction,input,response\na,caf\xe9,c\n")
    with pytest.raises(ConfigError, match=r"d\.csv: not UTF-8"):
        load_records(_files(path), "train", SOURCE)


# ------------------------------------------------------------------------------- the job's task, mapped
NOTE_COLUMN, SUMMARY_COLUMN = "Clinical Note (free text)", "Discharge Summary"
EXPORT = [
    {NOTE_COLUMN: "Pt 70y M. O/E irregularly irregular pulse.", SUMMARY_COLUMN: "Atrial fibrillation, on apixaban.", "Dept": "cardiology"},
    {NOTE_COLUMN: "Pt 6y F. Wheeze.", SUMMARY_COLUMN: "Asthma, inhaler technique taught.", "Dept": "paediatrics"},
]
EXPORT_COLUMNS = {"input": NOTE_COLUMN, "response": SUMMARY_COLUMN}


def test_an_export_with_only_note_and_summary_takes_the_jobs_instruction(tmp_path):
    path = _csv(tmp_path / "export.csv", EXPORT)
    task = TaskSettings(instruction="Write the discharge summary.")
    records = load_records(_files(path, columns=EXPORT_COLUMNS), "train", SOURCE, task)
    assert records[0] == {
        "instruction": "Write the discharge summary.",
        "input": EXPORT[0][NOTE_COLUMN],
        "response": EXPORT[0][SUMMARY_COLUMN],
    }


def test_without_a_job_instruction_the_export_needs_an_instruction_column(tmp_path):
    path = _csv(tmp_path / "export.csv", EXPORT)
    with pytest.raises(ConfigError, match=r"no column 'instruction' \(the task's instruction\).*data\.columns\.instruction"):
        load_records(_files(path, columns=EXPORT_COLUMNS), "train", SOURCE)
    with pytest.raises(ConfigError, match=r"data\.columns\.instruction' is null, but this job has no instruction"):
        load_records(_files(path, columns={**EXPORT_COLUMNS, "instruction": None}), "train", SOURCE)


def test_instruction_template_fields_come_from_mapped_columns(tmp_path):
    path = _csv(tmp_path / "export.csv", EXPORT)
    task = TaskSettings(instruction="Summarise this {department} note.")
    files = _files(path, columns={**EXPORT_COLUMNS, "department": "Dept"})
    assert [r["instruction"] for r in load_records(files, "train", SOURCE, task)] == [
        "Summarise this cardiology note.",
        "Summarise this paediatrics note.",
    ]
    with pytest.raises(ConfigError, match=r"names the field \{department\}; add 'data\.columns\.department"):
        load_records(_files(path, columns=EXPORT_COLUMNS), "train", SOURCE, task)
    blank = _csv(tmp_path / "blank.csv", [{**EXPORT[0], "Dept": " "}])
    with pytest.raises(ConfigError, match=r"blank\.csv line 2: the task's department is empty"):
        load_records(_files(blank, columns={**EXPORT_COLUMNS, "department": "Dept"}), "train", SOURCE, task)


@pytest.mark.parametrize("bad", ["Summarise {0}.", "Summarise {a b}.", "Summarise {note.", "  "])
def test_a_malformed_instruction_is_refused(bad):
    with pytest.raises(ValueError):
        TaskSettings(instruction=bad)


# ----------------------------------------------------------------------------------------- conversations
CHATS = [
    {"messages": [{"role": "system", "content": "You are a ward clerk."}, {"role": "user", "content": "Code: chest pain."},
                  {"role": "assistant", "content": "Cardiology"}]},
    {"messages": [{"role": "user", "content": "Code: wheeze."}, {"role": "assistant", "content": "Respiratory"},
                  {"role": "user", "content": "And fever?"}, {"role": "assistant", "content": "Infection"}]},
]
CHAT_FILES = {"columns": {"messages": "messages"}}


def test_conversations_read_the_same_from_jsonl_csv_and_parquet(tmp_path):
    pq.write_table(pa.Table.from_pylist(CHATS), tmp_path / "c.parquet")
    csv_rows = [{"messages": json.dumps(c["messages"])} for c in CHATS]
    paths = [_jsonl(tmp_path / "c.jsonl", CHATS), _csv(tmp_path / "c.csv", csv_rows), tmp_path / "c.parquet"]
    for path in paths:
        assert load_records(_files(path, **CHAT_FILES), "train", SOURCE) == CHATS


@pytest.mark.parametrize(
    "messages, error",
    [
        ([{"role": "doctor", "content": "x"}, {"role": "assistant", "content": "y"}], r"message 1 has the role 'doctor'.*system, user, assistant"),
        ([{"role": "user", "content": "x"}], r"the last message is from 'user'; a record must end with an assistant answer"),
        ([{"role": "user", "content": "x"}, {"role": "assistant", "content": " "}], r"message 2 \(assistant\) has no text"),
        ([{"role": "user"}], r"message 1 must be an object with 'role' and 'content'"),
        ([], r"messages must be a non-empty list"),
        ("not json", r"the messages column is not a JSON list"),
    ],
)
def test_conversation_misfits_name_the_line(tmp_path, messages, error):
    path = _jsonl(tmp_path / "c.jsonl", [CHATS[0], {"messages": messages}])
    with pytest.raises(ConfigError, match=r"c\.jsonl line 2: " + error):
        load_records(_files(path, **CHAT_FILES), "train", SOURCE)


def test_column_mapping_errors_in_a_site_config_name_the_file_and_field(tmp_path):
    def site_config(data_extra: str) -> str:
        path = tmp_path / "site.yaml"
        path.write_text(f"site: hospital-a\nbase_model_path: m\ndata:\n  train: t.jsonl\n  validation: v.jsonl\n{data_extra}")
        return path

    with pytest.raises(ConfigError, match=r"field 'data\.instruction_field': replaced by data\.columns"):
        load_site_config(site_config("  instruction_field: question\n"))
    with pytest.raises(ConfigError, match=r"field 'data\.columns': .*cannot be combined with columns \['response'\]"):
        load_site_config(site_config("  columns: {messages: m, response: r}\n"))
    with pytest.raises(ConfigError, match=r"columns\.response is null"):
        load_site_config(site_config("  columns: {response: null}\n"))
    cfg = load_site_config(site_config("  columns: {input: Note}\n"))
    assert cfg.data.columns == {"instruction": "instruction", "input": "Note", "response": "response"}
