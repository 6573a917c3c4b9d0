"""Greedy generation and the test-split scores on the project's tiny base model: left padding changes no
answer, the loss is the trainer's, and every count and fraction follows from the answers themselves."""

import copy
import math

import pytest

from hospital_fedlora.config import DataFiles, LoraSettings, TaskSettings
from hospital_fedlora.site.dataset import load_records
from hospital_fedlora.site.generation import (
    generate_answers,
    prompt_ids,
    reference_answer,
    score_test_split,
    stop_token_ids,
)
from hospital_fedlora.site.model_loading import apply_lora, choose_placement, load_base_model
from hospital_fedlora.site.prompting import PromptBuilder
from hospital_fedlora.site.test_metrics import diagnosis_group_match, is_diagnosis_group_record, rouge_l_f1
from hospital_fedlora.site.trainer import LocalTrainer

SEQ = 256


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def trained(base_model_dir, data_dir):
    """A LoRA model trained a few steps on hospital-b, and its test records (mixed tasks)."""
    site = data_dir / "hospital-b"
    files = DataFiles(train=site / "train.jsonl", validation=site / "validation.jsonl", test=site / "test.jsonl")
    train, test = load_records(files, "train", "t"), load_records(files, "test", "t")
    model, tokenizer = load_base_model(base_model_dir, choose_placement("cpu", "auto", False))
    model = apply_lora(model, LoraSettings(r=8, dropout=0.0), seed=0)
    trainer = LocalTrainer(
        model, tokenizer, train[:64], test[:12], max_seq_length=SEQ, batch_size=8, micro_batch_size=8,
        learning_rate=5e-3, weight_decay=0.0, seed=0,
    )
    trainer.train(6)
    return trainer, tokenizer, test[:12]


def test_left_padded_batches_answer_exactly_as_one_prompt_at_a_time(trained):
    trainer, tokenizer, test = trained
    prompts = PromptBuilder(tokenizer)
    batched = generate_answers(trainer.model, tokenizer, prompts, test[:6], max_new_tokens=12, batch_size=6)
    alone = [generate_answers(trainer.model, tokenizer, prompts, [r], max_new_tokens=12, batch_size=1)[0] for r in test[:6]]
    assert batched == alone
    assert tokenizer.padding_side == "right"  # the trainer's right padding is left as it was


def test_answers_stop_at_eos_and_within_max_new_tokens(trained):
    trainer, tokenizer, test = trained
    prompts = PromptBuilder(tokenizer)
    assert stop_token_ids(tokenizer, trainer.model) == [tokenizer.eos_token_id]
    for answer in generate_answers(trainer.model, tokenizer, prompts, test[:4], max_new_tokens=3):
        assert "</s>" not in answer and len(tokenizer(answer, add_special_tokens=False)["input_ids"]) <= 4
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_answers(trainer.model, tokenizer, prompts, test[:1], max_new_tokens=0)


def test_the_score_loss_is_the_trainers_loss_and_the_fractions_follow_from_the_answers(trained):
    trainer, tokenizer, test = trained
    prompts = PromptBuilder(tokenizer)
    scores = score_test_split(
        trainer.model, tokenizer, prompts, test, max_examples=10, max_new_tokens=12, max_seq_length=SEQ, batch_size=4
    )
    # The trainer's validation records are these test records: the same mean per answer token.
    assert scores["test_loss"] == pytest.approx(trainer.evaluate(10), rel=1e-5)
    assert scores["test_perplexity"] == pytest.approx(math.exp(scores["test_loss"]))
    assert 0.0 < scores["test_token_accuracy"] < 1.0
    answers = generate_answers(trainer.model, tokenizer, prompts, test[:10], max_new_tokens=12, batch_size=4)
    group = [(a, r) for a, r in zip(answers, test[:10]) if is_diagnosis_group_record(r)]
    other = [(a, r) for a, r in zip(answers, test[:10]) if not is_diagnosis_group_record(r)]
    assert group and other  # the hospital's test split mixes the tasks
    assert scores["test_exact_match"] == sum(diagnosis_group_match(a, reference_answer(r)) for a, r in group) / len(group)
    assert scores["test_rouge_l"] == pytest.approx(sum(rouge_l_f1(a, reference_answer(r)) for a, r in other) / len(other))
    assert (scores["test_examples"], scores["test_exact_match_examples"], scores["test_rouge_l_examples"]) == (
        10, len(group), len(other)
    )
    assert scores["test_tokens"] == sum(sum(1 for t in e["labels"][1:] if t != -100) for e in trainer.val_examples[:10])
    assert scores["test_truncated"] == 0


def test_a_split_without_diagnosis_records_has_no_exact_match_and_the_base_model_scores_too(trained):
    trainer, tokenizer, test = trained
    prompts = PromptBuilder(tokenizer, TaskSettings(prompt_format="plain"))
    summaries = [r for r in test if not is_diagnosis_group_record(r)][:3]

    def score():
        return score_test_split(
            trainer.model, tokenizer, prompts, summaries, max_examples=3, max_new_tokens=4, max_seq_length=SEQ
        )

    with trainer.model.disable_adapter():
        base = score()
    adapted = score()
    for scores in (base, adapted):
        assert scores["test_exact_match"] is None and scores["test_exact_match_examples"] == 0
        assert scores["test_rouge_l_examples"] == 3 and 0.0 <= scores["test_rouge_l"] <= 1.0
    assert base["test_loss"] > adapted["test_loss"]  # six steps on this hospital's notes already help


# Llama-3's layout (as in test_prompting.py); the tiny tokenizer has no such special tokens, so plain text here.
LLAMA3_LIKE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


@pytest.mark.parametrize("template", [None, LLAMA3_LIKE], ids=["plain", "chat_template"])
def test_the_generation_prompt_is_exactly_what_training_put_before_the_answer(trained, template):
    _, tokenizer, test = trained
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template
    prompts = PromptBuilder(tok)
    assert prompts.format == ("plain" if template is None else "chat_template")
    chat = {"messages": [{"role": "user", "content": "Code: wheeze."}, {"role": "assistant", "content": "Respiratory"}]}
    for record in [*test[:4], chat]:
        example, _ = prompts.tokenize(record, 1 << 20)
        answer_start = next(i for i, label in enumerate(example["labels"]) if label != -100)
        ids = prompt_ids(tok, prompts, record)
        assert ids == example["input_ids"][:answer_start]
        assert ids.count(tok.bos_token_id) == 1  # one begin-of-text, never two


def test_generation_stops_at_a_chat_templates_end_of_turn_token(trained):
    _, tokenizer, _ = trained
    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    assert stop_token_ids(tok) == sorted([tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")])
