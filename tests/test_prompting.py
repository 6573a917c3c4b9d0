"""Records into training examples: the plain template, the tokenizer's chat template, labels, truncation counts."""

import copy

import pytest
from transformers import AutoTokenizer

from hospital_fedlora.config import ConfigError, TaskSettings
from hospital_fedlora.site.prompting import IGNORE_INDEX, PromptBuilder, format_prompt, tokenize_record
from hospital_fedlora.site.trainer import collate_batch

ROWS = [
    {"instruction": "Assign the diagnosis group.", "input": "Pt 70y M. O/E irregularly irregular pulse.", "response": "Cardiology: atrial fibrillation"},
    {"instruction": "Say hello.", "input": "", "response": "Hello."},
]
CHAT = {"messages": [
    {"role": "user", "content": "Code: wheeze."}, {"role": "assistant", "content": "Respiratory"},
    {"role": "user", "content": "And fever?"}, {"role": "assistant", "content": "Infection"},
]}
# Llama-3's layout; the tiny tokenizer has no such special tokens, so the markers are ordinary text here.
LLAMA3_LIKE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
NO_SYSTEM = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
)


@pytest.fixture(scope="module")
def tok(base_model_dir):
    return AutoTokenizer.from_pretrained(base_model_dir, local_files_only=True)


@pytest.fixture()
def chat_tok(tok):
    t = copy.deepcopy(tok)
    t.chat_template = LLAMA3_LIKE
    return t


def _trained_text(tok, ex) -> list[str]:
    """The labelled stretches of an example, decoded."""
    runs, current = [], []
    for tid, label in zip(ex["input_ids"], ex["labels"]):
        if label != IGNORE_INDEX:
            assert label == tid
            current.append(tid)
        elif current:
            runs.append(current)
            current = []
    return [tok.decode(r) for r in runs + ([current] if current else [])]


# ---------------------------------------------------------------------------------------------- plain
def test_prompt_with_and_without_input():
    assert format_prompt(ROWS[0]) == (
        "### Instruction:\nAssign the diagnosis group.\n\n### Input:\nPt 70y M. O/E irregularly irregular pulse."
        "\n\n### Response:\n"
    )
    assert format_prompt(ROWS[1]) == "### Instruction:\nSay hello.\n\n### Response:\n"
    assert format_prompt(ROWS[1], system="Be brief.") == "Be brief.\n\n### Instruction:\nSay hello.\n\n### Response:\n"


@pytest.mark.parametrize("row", ROWS)
def test_tokenized_record_matches_whole_prompt_and_masks_it(tok, row):
    ex = tokenize_record(row, tok, 256)
    prompt_ids = tok(format_prompt(row))["input_ids"]  # with <s>
    response_ids = tok(row["response"], add_special_tokens=False)["input_ids"]
    assert ex["input_ids"] == prompt_ids + response_ids + [tok.eos_token_id]
    assert ex["labels"] == [IGNORE_INDEX] * len(prompt_ids) + response_ids + [tok.eos_token_id]


def test_every_generated_record_tokenizes_like_its_whole_text(tok, data_dir):
    from hospital_fedlora.config import DataFiles
    from hospital_fedlora.site.dataset import load_records

    files = DataFiles(train=data_dir / "hospital-a" / "train.jsonl", validation=data_dir / "hospital-a" / "validation.jsonl")
    for r in load_records(files, "validation", "site config"):
        ex = tokenize_record(r, tok, 256)
        assert ex["input_ids"] == tok(format_prompt(r) + r["response"])["input_ids"] + [tok.eos_token_id]


def test_the_builder_uses_the_plain_template_when_the_tokenizer_has_no_chat_template(tok):
    builder = PromptBuilder(tok)
    assert builder.format == "plain"
    assert builder.tokenize(ROWS[0], 256) == (tokenize_record(ROWS[0], tok, 256), False)
    with pytest.raises(ConfigError, match=r"task\.prompt_format' is 'chat_template' but the base model's tokenizer has no chat template"):
        PromptBuilder(tok, TaskSettings(prompt_format="chat_template"))


def test_plain_conversations_train_on_assistant_turns_only(tok):
    ex, cut = PromptBuilder(tok).tokenize(CHAT, 256)
    assert not cut
    assert _trained_text(tok, ex) == ["Respiratory</s>", "Infection</s>"]
    text = tok.decode(ex["input_ids"])
    assert text == "<s>### Instruction:\nCode: wheeze.\n\n### Response:\nRespiratory</s>\n\n### Instruction:\nAnd fever?\n\n### Response:\nInfection</s>"
    last_only, _ = PromptBuilder(tok, TaskSettings(loss_on="last_assistant_turn")).tokenize(CHAT, 256)
    assert _trained_text(tok, last_only) == ["Infection</s>"]


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
    split = PromptBuilder(tok).tokenize_all([row, ROWS[0], row], 96, "train data")
    assert split.truncated == 2 and split.examples[0] == ex


def test_truncation_of_a_long_response_keeps_half_the_window(tok):
    row = {"instruction": "Repeat.", "input": "word " * 100, "response": "Take apixaban daily. " * 40}
    ex = tokenize_record(row, tok, 64)
    assert len(ex["input_ids"]) == 64
    assert sum(t != IGNORE_INDEX for t in ex["labels"]) == 32
    assert "### Response:" in tok.decode(ex["input_ids"])


# ----------------------------------------------------------------------------------------------- chat
def test_auto_takes_the_chat_template_and_labels_each_answer_with_its_end_of_turn(chat_tok):
    builder = PromptBuilder(chat_tok, TaskSettings(system_prompt="You code ward notes."))
    assert builder.format == "chat_template"
    ex, cut = builder.tokenize(CHAT, 512)
    assert not cut
    assert ex["input_ids"] == chat_tok(chat_tok.apply_chat_template(
        [{"role": "system", "content": "You code ward notes."}, *CHAT["messages"]], tokenize=False), add_special_tokens=False)["input_ids"]
    assert [t.strip() for t in _trained_text(chat_tok, ex)] == ["Respiratory<|eot_id|>", "Infection<|eot_id|>"]
    assert builder.prompt_text(CHAT).endswith("And fever?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")


def test_chat_instruction_records_put_the_note_in_the_user_turn(chat_tok):
    ex, _ = PromptBuilder(chat_tok).tokenize(ROWS[0], 512)
    text = chat_tok.decode(ex["input_ids"])
    assert "user<|end_header_id|>\n\nAssign the diagnosis group.\n\nPt 70y M. O/E irregularly irregular pulse.<|eot_id|>" in text
    assert [t.strip() for t in _trained_text(chat_tok, ex)] == ["Cardiology: atrial fibrillation<|eot_id|>"]


def test_chat_truncation_cuts_the_note_middle_and_is_counted(chat_tok):
    note = "Pt 70y M. " + "HR 80 BP 120/80. " * 60 + "Rx apixaban 5 mg twice daily."
    row = {"instruction": "Summarize the clinical note.", "input": note, "response": "Atrial fibrillation."}
    split = PromptBuilder(chat_tok).tokenize_all([row, ROWS[1]], 128, "train data")
    assert split.truncated == 1
    ex = split.examples[0]
    assert len(ex["input_ids"]) <= 128
    text = chat_tok.decode(ex["input_ids"])
    assert "Summarize the clinical note.\n\nPt 70y M." in text and "twice daily." in text
    assert [t.strip() for t in _trained_text(chat_tok, ex)] == ["Atrial fibrillation.<|eot_id|>"]


def test_a_role_the_template_refuses_names_the_record(chat_tok):
    chat_tok.chat_template = NO_SYSTEM
    with_system = {"messages": [{"role": "system", "content": "Be brief."}, *CHAT["messages"]]}
    with pytest.raises(ConfigError, match=r"train data, record 2: the base model's chat template refuses this conversation "
                       r"\(system/user/assistant/user/assistant\).*System role not supported.*prompt_format"):
        PromptBuilder(chat_tok).tokenize_all([ROWS[1], with_system], 256, "train data")


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
