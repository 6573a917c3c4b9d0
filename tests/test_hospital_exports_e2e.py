"""Three hospitals whose exports and machines look nothing alike train one adapter: the plaintext job in
FLARE's simulator.

hospital-a exports a CSV with only a note column and a summary column, hospital-b conversational JSONL
(``messages``) and trains on two processes (``data_parallel: 2``, gloo on CPU), hospital-c Parquet with its
own column names. The job carries the task (a fixed instruction) and the base model's tokenizer carries a
chat template, so every site builds the same chat prompts from its own columns.
"""

import csv
import json
import shutil
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_data_parallel_e2e_helpers import MARK, marked_processes
from test_prompting import LLAMA3_LIKE

from hospital_fedlora.protocol import Meta, Metric
from hospital_fedlora_tools.demo import derive_job, run_simulator

REPO = Path(__file__).resolve().parents[1]
SITES = ("hospital-a", "hospital-b", "hospital-c")
INSTRUCTION = "Answer for this note."


def _rows(data_dir: Path, site: str, split: str) -> list[dict]:
    return [json.loads(line) for line in (data_dir / site / f"{split}.jsonl").read_text().splitlines()]


def _export(data_dir: Path, out: Path) -> dict[str, str]:
    """Each hospital's train/validation in its own shape; returns each site's data section as YAML."""
    sections = {}
    for split in ("train", "validation"):
        a = [{"Clinical Note (free text)": r["input"], "Discharge Summary": r["response"]} for r in _rows(data_dir, "hospital-a", split)]
        with (out / f"a_{split}.csv").open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(a[0]))
            writer.writeheader()
            writer.writerows(a)
        b = [{"messages": [{"role": "user", "content": f"{INSTRUCTION}\n\n{r['input']}"}, {"role": "assistant", "content": r["response"]}]}
             for r in _rows(data_dir, "hospital-b", split)]
        (out / f"b_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in b))
        c = [{"note_text": r["input"], "answer": r["response"]} for r in _rows(data_dir, "hospital-c", split)]
        pq.write_table(pa.Table.from_pylist(c), out / f"c_{split}.parquet")
    sections["hospital-a"] = (f"  train: {out}/a_train.csv\n  validation: {out}/a_validation.csv\n  columns:\n"
                              "    input: \"Clinical Note (free text)\"\n    response: \"Discharge Summary\"\n")
    sections["hospital-b"] = f"  train: {out}/b_train.jsonl\n  validation: {out}/b_validation.jsonl\n  columns:\n    messages: messages\n"
    sections["hospital-c"] = (f"  train: {out}/c_train.parquet\n  validation: {out}/c_validation.parquet\n  columns:\n"
                              "    input: note_text\n    response: answer\n")
    return sections


@pytest.mark.e2e
def test_csv_conversation_and_parquet_exports_train_one_adapter_with_the_chat_template(tmp_path, base_model_dir, data_dir, monkeypatch):
    chat_model = tmp_path / "chat_model"
    shutil.copytree(base_model_dir, chat_model)
    tok_cfg = json.loads((chat_model / "tokenizer_config.json").read_text())
    (chat_model / "tokenizer_config.json").write_text(json.dumps({**tok_cfg, "chat_template": LLAMA3_LIKE}))
    exports = tmp_path / "exports"
    exports.mkdir()
    sections = _export(data_dir, exports)
    configs = tmp_path / "site_configs"
    configs.mkdir()
    for site in SITES:
        (configs / f"{site}.yaml").write_text(
            f"site: {site}\nbase_model_path: {chat_model}\ndata:\n{sections[site]}num_threads: 1\n"
            "privacy:\n  require_encryption: false\n"
            + ("data_parallel: 2\nmicro_batch_size: 2\n" if site == "hospital-b" else "")
        )
    mark = uuid.uuid4().hex
    monkeypatch.setenv(MARK, mark)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    job = derive_job(REPO / "jobs" / "fedlora_plain", tmp_path, num_rounds=2, local_steps=4)
    client = job / "app/config/config_fed_client.json"
    cfg = json.loads(client.read_text())
    cfg["executors"][0]["executor"]["args"]["recipe"]["task"] = {"instruction": INSTRUCTION}
    client.write_text(json.dumps(cfg, indent=2))

    run_dir = run_simulator(job, tmp_path / "ws", configs, show=lambda s: None)

    rows = [json.loads(line) for line in (run_dir / "round_metrics.jsonl").read_text().splitlines()]
    assert [r[Meta.ROUND] for r in rows] == [0, 1]
    for row in rows:
        assert set(row[Meta.SITE_METRICS]) == set(SITES)
        for site in SITES:
            metrics = row[Meta.SITE_METRICS][site]
            assert metrics[Metric.TRAIN_LOSS] > 0 and metrics[Metric.TRAIN_TOKENS] > 0, site
            assert metrics[Metric.TRUNCATED_RECORDS] >= 0, site
    for site in SITES:
        assert "chat_template prompts" in (tmp_path / "ws" / site / "log.txt").read_text(), site
    log = (tmp_path / "ws.log").read_text()
    assert "2 training processes" in log
    assert "data-parallel workers stopped (exit codes [0])" in log  # asked at END_RUN, not killed
    assert marked_processes(mark) == []  # hospital-b's worker ended with the job
    assert (run_dir / "global_adapter" / "adapter_model.safetensors").is_file()
