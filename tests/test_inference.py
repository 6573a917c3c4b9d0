"""Using the final adapter: the generate command answers as in-process greedy generation does, the merged
checkpoint gives the logits of base + adapter, and wrong folders are refused with what to do."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT
from transformers import AutoModelForCausalLM

from hospital_fedlora.adapter_files import ADAPTER_WEIGHTS_FILE, save_peft_adapter
from hospital_fedlora.config import DataFiles, LoraSettings
from hospital_fedlora.inference import generate
from hospital_fedlora.inference.merge import main as merge_main
from hospital_fedlora.site.dataset import load_records
from hospital_fedlora.site.generation import generate_answers
from hospital_fedlora.site.model_loading import apply_lora, choose_placement, load_base_model
from hospital_fedlora.site.prompting import PromptBuilder
from hospital_fedlora.site.trainer import LocalTrainer, adapter_config_dict, get_adapter_state

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def adapter(base_model_dir, data_dir, tmp_path_factory):
    """An adapter trained a few steps and saved as the executor saves the global one; its model; test records."""
    site = data_dir / "hospital-a"
    files = DataFiles(train=site / "train.jsonl", validation=site / "validation.jsonl", test=site / "test.jsonl")
    train, test = load_records(files, "train", "t"), load_records(files, "test", "t")
    model, tokenizer = load_base_model(base_model_dir, choose_placement("cpu", "auto", False))
    model = apply_lora(model, LoraSettings(r=8, dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj"]), seed=0)
    trainer = LocalTrainer(
        model, tokenizer, train[:48], train[:8], max_seq_length=192, batch_size=8, micro_batch_size=8,
        learning_rate=5e-3, weight_decay=0.0, seed=0,
    )
    trainer.train(5)
    out = save_peft_adapter(tmp_path_factory.mktemp("run") / "global_adapter", get_adapter_state(model), adapter_config_dict(model))
    return out, model, tokenizer, test[:5]


def test_generate_writes_the_in_process_greedy_answers_for_a_file_of_records(adapter, base_model_dir, tmp_path):
    folder, model, tokenizer, test = adapter
    prompts_file = tmp_path / "notes.jsonl"
    # Both record shapes a site's data takes; the gold answers are left in, as a test split has them.
    chat = {"messages": [{"role": "user", "content": test[1]["instruction"] + "\n\n" + test[1]["input"]},
                         {"role": "assistant", "content": test[1]["response"]}]}
    rows = [{"instruction": test[0]["instruction"], "input": test[0]["input"]}, chat, *test[2:]]
    prompts_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "answers.jsonl"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "custom"), "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, "-m", "hospital_fedlora.inference.generate", "--base-model", str(base_model_dir),
         "--adapter", str(folder), "--prompts", str(prompts_file), "--prompt-format", "plain",
         "--max-new-tokens", "16", "--out", str(out)],
        check=True, env=env, capture_output=True, timeout=120,
    )
    written = [json.loads(line) for line in out.read_text().splitlines()]
    builder = PromptBuilder(tokenizer)
    expected = generate_answers(model, tokenizer, builder, [*test[:1], {**test[1], **chat}, *test[2:]], max_new_tokens=16)
    expected_plain = generate_answers(model, tokenizer, builder, test, max_new_tokens=16)
    assert [w["generation"] for w in written] == expected
    assert expected[0] == expected_plain[0]
    assert [{k: v for k, v in w.items() if k != "generation"} for w in written] == rows  # records kept as given


def test_generate_answers_one_prompt_on_stdout(adapter, base_model_dir, capsys):
    folder, model, tokenizer, _ = adapter
    text = "Summarize the clinical note."
    assert generate.main(["--base-model", str(base_model_dir), "--adapter", str(folder), "--prompt", text,
                          "--max-new-tokens", "8"]) == 0
    expected = generate_answers(model, tokenizer, PromptBuilder(tokenizer), [{"instruction": text, "response": ""}], 8)
    assert capsys.readouterr().out == expected[0] + "\n"


def test_the_merged_checkpoint_alone_gives_the_logits_of_base_plus_adapter(adapter, base_model_dir, tmp_path, capsys):
    folder, model, tokenizer, test = adapter
    out = tmp_path / "merged"
    assert merge_main(["--base-model", str(base_model_dir), "--adapter", str(folder), "--out", str(out)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    ids = tokenizer([PromptBuilder(tokenizer).prompt_text(r) for r in test[:2]], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = model(**ids).logits
        with model.disable_adapter():
            base = model(**ids).logits
        got = merged(**ids).logits
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got, base, atol=1e-3)  # the adapter is really in the weights
    assert (out / "tokenizer.json").is_file() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    # An existing folder is kept unless --force; with it, replaced whole.
    (out / "marker").write_text("x")
    capsys.readouterr()
    assert merge_main(["--base-model", str(base_model_dir), "--adapter", str(folder), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and (out / "marker").exists()
    assert merge_main(["--base-model", str(base_model_dir), "--adapter", str(folder), "--out", str(out), "--force"]) == 0
    assert not (out / "marker").exists() and (out / "config.json").is_file()
    assert merge_main(["--base-model", str(base_model_dir), "--adapter", str(folder), "--out", str(folder), "--force"]) == 2
    assert "adapter folder itself" in capsys.readouterr().err


def _refusal(capsys, base_model_dir, folder, tmp_path) -> str:
    capsys.readouterr()
    assert merge_main(["--base-model", str(base_model_dir), "--adapter", str(folder), "--out", str(tmp_path / "m")]) == 2
    assert not (tmp_path / "m").exists()
    return capsys.readouterr().err


def test_a_missing_or_mismatched_adapter_is_refused_naming_the_folder_and_what_to_do(adapter, base_model_dir, tmp_path, capsys):
    folder, *_ = adapter
    err = _refusal(capsys, base_model_dir, tmp_path / "nowhere", tmp_path)
    assert f"--adapter {tmp_path / 'nowhere'}: folder not found" in err and "global_adapter" in err

    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "adapter_config.json").write_text((folder / "adapter_config.json").read_text())
    assert f"no {ADAPTER_WEIGHTS_FILE}" in _refusal(capsys, base_model_dir, partial, tmp_path)

    config = json.loads((folder / "adapter_config.json").read_text())
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / ADAPTER_WEIGHTS_FILE).write_bytes((folder / ADAPTER_WEIGHTS_FILE).read_bytes())
    (foreign / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["c_attn"]}))
    err = _refusal(capsys, base_model_dir, foreign, tmp_path)
    assert "['c_attn']" in err and "another base model" in err

    resized = tmp_path / "resized"
    resized.mkdir()
    (resized / ADAPTER_WEIGHTS_FILE).write_bytes((folder / ADAPTER_WEIGHTS_FILE).read_bytes())
    (resized / "adapter_config.json").write_text(json.dumps({**config, "r": 4}))
    err = _refusal(capsys, base_model_dir, resized, tmp_path)
    assert f"--adapter {resized}" in err and "does not fit" in err and "pass the base checkpoint" in err

    fewer = tmp_path / "fewer"
    fewer.mkdir()
    (fewer / ADAPTER_WEIGHTS_FILE).write_bytes((folder / ADAPTER_WEIGHTS_FILE).read_bytes())
    (fewer / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["q_proj"]}))
    err = _refusal(capsys, base_model_dir, fewer, tmp_path)
    assert "disagree" in err and "saved tensors have no place" in err  # peft alone would only warn
