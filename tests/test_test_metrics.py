"""Test-split metrics on fixed inputs with values worked out by hand."""

import math

import pytest
import torch

from hospital_fedlora.site.test_metrics import (
    diagnosis_group,
    diagnosis_group_match,
    is_diagnosis_group_record,
    perplexity,
    rouge_l_f1,
    token_accuracy_counts,
)


def _one_hot_logits(predictions: list[list[int]], vocab: int = 5) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(predictions), vocab).float()


def test_token_accuracy_compares_each_position_with_the_next_label_and_skips_ignored_ones():
    # Row 0 predicts 1,2,3,4 after positions 0..3 (position 4's prediction has no next label).
    logits = _one_hot_logits([[1, 2, 3, 4, 0], [2, 2, 2, 2, 2]])
    labels = torch.tensor([
        [-100, -100, 2, 0, 4],  # targets at t+1: -100, 2 (hit), 0 (miss: predicted 3), 4 (hit)
        [-100, 2, 1, -100, -100],  # targets: 2 (hit), 1 (miss), -100, -100
    ])
    assert token_accuracy_counts(logits, labels) == (3, 5)


def test_token_accuracy_of_a_batch_with_no_answer_tokens_counts_nothing():
    assert token_accuracy_counts(_one_hot_logits([[1, 1, 1]]), torch.full((1, 3), -100)) == (0, 0)


def test_perplexity_is_exp_of_the_mean_token_loss():
    assert perplexity(0.0) == 1.0
    assert perplexity(math.log(4.0)) == pytest.approx(4.0)
    assert perplexity(1e6) == math.inf
    assert math.isnan(perplexity(math.nan))


def test_the_diagnosis_group_is_the_text_before_the_first_colon_normalised():
    assert diagnosis_group("Oncology: colorectal cancer") == "oncology"
    assert diagnosis_group("  Infectious   Disease : sepsis: severe") == "infectious disease"
    assert diagnosis_group("Cardiology") == "cardiology"  # no colon: the whole answer
    assert diagnosis_group_match("oncology:  lung cancer", "Oncology: colorectal cancer")
    assert diagnosis_group_match("ONCOLOGY", "Oncology: colorectal cancer")
    assert not diagnosis_group_match("Cardiology: heart failure", "Oncology: colorectal cancer")
    assert not diagnosis_group_match("", "")  # an empty answer is never right
    assert not diagnosis_group_match("Oncologyx: colorectal cancer", "Oncology: colorectal cancer")


def test_diagnosis_group_records_are_recognised_by_their_instruction():
    assert is_diagnosis_group_record({"instruction": "Assign the diagnosis group.", "input": "note"})
    assert is_diagnosis_group_record({"instruction": "  assign the  diagnosis group. "})
    assert not is_diagnosis_group_record({"instruction": "Summarize the clinical note."})
    assert not is_diagnosis_group_record({"messages": [{"role": "user", "content": "Assign the diagnosis group."}]})


def test_rouge_l_f1_is_the_longest_common_word_subsequence_f_measure():
    # LCS "the cat on the mat" = 5 of 6 words each side: P = R = F = 5/6.
    assert rouge_l_f1("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    # Case and punctuation are dropped by rouge-score's tokenizer: "oncology", "cancer" = 2 of 3 words each side.
    assert rouge_l_f1("Oncology: colorectal cancer", "oncology - lung cancer") == pytest.approx(2 / 3)
    # P = 2/2, R = 2/4: F = 2PR/(P+R) = 2/3.
    assert rouge_l_f1("fever cough", "fever and dry cough") == pytest.approx(2 / 3)
    assert rouge_l_f1("same words", "same words") == 1.0
    assert rouge_l_f1("", "something") == 0.0
