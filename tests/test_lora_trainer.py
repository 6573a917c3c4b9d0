"""Local LoRA training on one site's data: it learns, it scores deterministically, accumulation equals one
big batch, and rounds continue through the data, reproducibly per round. Real transformers and peft on the project's tiny base model."""

import math

import numpy as np
import pytest
import torch

from hospital_fedlora.config import DataFiles, LoraSettings
from hospital_fedlora.site.dataset import load_records
from hospital_fedlora.site.model_loading import apply_lora, choose_placement, load_base_model
from hospital_fedlora.site.trainer import LocalTrainer, collate_batch, get_adapter_state, set_adapter_state

CPU = choose_placement("cpu", "auto", False)
pytestmark = pytest.mark.usefixtures("one_torch_thread")
SEQ = 128  # most records fit (median ~120 tokens); keeps every step cheap on two cores




@pytest.fixture(scope="module")
def records(data_dir):
    site = data_dir / "hospital-a"
    files = DataFiles(train=site / "train.jsonl", validation=site / "validation.jsonl")
    return load_records(files, "train", "test"), load_records(files, "validation", "test")


def _lora_model(base_model_dir, dropout):
    model, tokenizer = load_base_model(base_model_dir, CPU)
    return apply_lora(model, LoraSettings(r=8, dropout=dropout), seed=0), tokenizer


@pytest.fixture(scope="module")
def lora_model(base_model_dir):
    # No dropout: runs that should match are then fully deterministic.
    return _lora_model(base_model_dir, dropout=0.0)


@pytest.fixture
def model(lora_model):
    """The module's model at its fresh adapter (B = 0) for every test."""
    peft_model, tokenizer = lora_model
    initial = get_adapter_state(peft_model)
    yield peft_model, tokenizer
    set_adapter_state(peft_model, initial)


def _trainer(model, train, val, *, micro=8, batch=8, lr=1e-3, seed=0, seq=SEQ, weighting="token"):
    peft_model, tokenizer = model
    return LocalTrainer(
        peft_model, tokenizer, train, val, max_seq_length=seq, batch_size=batch, micro_batch_size=micro,
        learning_rate=lr, weight_decay=0.0, seed=seed, loss_weighting=weighting,
    )


def _run(trainer, steps):
    reports = []
    result = trainer.train(steps, reports.append)
    return result, reports


def test_training_lowers_the_response_loss_on_the_training_records(model, records):
    train, _ = records
    # Score the records it trains on: the claim is that the optimisation works, not that it generalises.
    trainer = _trainer(model, train[:64], train[:16])
    before = trainer.evaluate(16)
    result, reports = _run(trainer, 20)
    after = trainer.evaluate(16)
    assert after < before - 0.5, (before, after)
    assert [r.step for r in reports] == list(range(1, 21)) and all(r.steps == 20 for r in reports)
    assert all(math.isfinite(r.loss) and r.tokens_per_s > 0 for r in reports)
    assert result.steps == 20 and result.last_loss == reports[-1].loss
    assert result.mean_loss == pytest.approx(sum(r.loss for r in reports) / 20)
    assert result.tokens > 20 * 8 * 50  # non-padding tokens of 160 examples, each well over 50 long
    assert not trainer.model.training  # left in eval mode for the scoring that follows


def test_evaluation_is_deterministic_and_independent_of_micro_batching(base_model_dir, records):
    train, val = records
    # Dropout on: evaluation must still not depend on randomness.
    peft_model, tokenizer = _lora_model(base_model_dir, dropout=0.1)
    trainer = _trainer((peft_model, tokenizer), train[:32], val, micro=4)
    trainer.train(2)
    first = trainer.evaluate(24)
    assert trainer.evaluate(24) == first
    assert trainer.evaluate(24) == first
    # Another site's micro-batch size pads differently; the score is per response token, so the same.
    other = _trainer((peft_model, tokenizer), train[:32], val, micro=3)
    assert other.evaluate(24) == pytest.approx(first, rel=1e-5)
    assert trainer.evaluate(8) != first  # max_examples is honoured


def test_base_score_equals_a_fresh_adapter_and_differs_after_training(model, records):
    train, val = records
    trainer = _trainer(model, train[:32], val)
    fresh, base = trainer.evaluate(16), trainer.evaluate_base(16)
    assert fresh == base  # B = 0: the adapter adds exactly nothing yet
    trainer.train(3)
    assert trainer.evaluate_base(16) == base  # switching the adapter off gives the base model back
    assert abs(trainer.evaluate(16) - base) > 1e-3


@pytest.mark.parametrize("weighting", ["token", "example"])
def test_gradient_accumulation_matches_one_big_batch(model, records, weighting):
    train, _ = records
    initial = get_adapter_state(model[0])
    runs = {}
    for micro in (8, 2, 3):  # 3 leaves an uneven last micro-batch of 2
        set_adapter_state(model[0], initial)
        trainer = _trainer(model, train[:48], train[:8], micro=micro, batch=8, seed=11, weighting=weighting)
        _, reports = _run(trainer, 4)
        runs[micro] = ([r.loss for r in reports], get_adapter_state(model[0]))
    big_losses, big_state = runs[8]
    moved = max(np.abs(big_state[k] - initial[k]).max() for k in initial)
    assert moved > 1e-3  # the steps did change the adapter
    for micro in (2, 3):
        losses, state = runs[micro]
        np.testing.assert_allclose(losses, big_losses, rtol=1e-5)
        for k in initial:
            # float32 sums in another order: differences near 1e-6, against updates near 5e-3
            np.testing.assert_allclose(state[k], big_state[k], rtol=0, atol=2e-5, err_msg=k)


def test_example_weighting_counts_every_answer_the_same(model, records):
    """A step's loss is the mean of its examples' own mean losses ("example"), or the mean over all their
    response tokens ("token"), in which a long summary outweighs a two-word diagnosis group."""
    train, _ = records
    losses = {}
    for weighting in ("token", "example"):
        trainer = _trainer(model, train[:48], train[:8], micro=3, batch=8, seed=11, weighting=weighting)
        sums, counts = [], []
        with torch.no_grad():
            for i in trainer._indices(0, 8):  # the first step's examples
                loss_sum, n = trainer._summed_loss(collate_batch([trainer.train_examples[i]], trainer.pad_id))
                sums.append(loss_sum.item())
                counts.append(n)
        _, reports = _run(trainer, 1)
        losses[weighting] = reports[0].loss
        expected = sum(sums) / sum(counts) if weighting == "token" else float(np.mean(np.array(sums) / counts))
        assert reports[0].loss == pytest.approx(expected, rel=1e-5), weighting
    assert losses["token"] != pytest.approx(losses["example"], rel=1e-3)  # the answers' lengths differ


def _losses(trainer, steps, round):
    reports = []
    trainer.train(steps, reports.append, round=round)
    return [r.loss for r in reports]


def test_rounds_continue_through_the_data_and_a_restarted_site_draws_the_same_batches(model, records):
    train, _ = records
    subset = train[:24]  # three batches of 8 per pass
    # learning rate 0: the model never changes, so a step's loss depends on its examples alone
    rounds = _trainer(model, subset, subset[:1], lr=0.0, seed=3)
    by_round = [_losses(rounds, 1, r) for r in range(3)]
    whole = _losses(_trainer(model, subset, subset[:1], lr=0.0, seed=3), 3, 0)
    assert sum(by_round, []) == whole
    assert len(set(whole)) == 3  # each round took the next batch, not the first one again
    # A fresh trainer (a site restarted, or a job resumed) draws round 2's batch directly.
    assert _losses(_trainer(model, subset, subset[:1], lr=0.0, seed=3), 1, 2) == by_round[2]
    # Rounds 3..5 are the next pass: every example again, in freshly shuffled batches.
    next_pass = [_losses(rounds, 1, r) for r in range(3, 6)]
    assert sorted(sum(next_pass, [])) != sorted(whole)
    assert _losses(_trainer(model, subset, subset[:1], lr=0.0, seed=4), 3, 0) != whole  # the seed matters


def test_a_round_with_dropout_is_reproducible_from_its_starting_adapter(base_model_dir, records):
    train, _ = records
    peft_model, tokenizer = _lora_model(base_model_dir, dropout=0.1)
    start = get_adapter_state(peft_model)
    results = []
    for _ in range(2):
        set_adapter_state(peft_model, start)
        torch.manual_seed(len(results))  # whatever the process's own random state, the round is the same
        _trainer((peft_model, tokenizer), train[:16], train[:1], seed=5).train(2, round=4)
        results.append(get_adapter_state(peft_model))
    assert all(np.array_equal(results[0][k], results[1][k]) for k in start)
    assert any(not np.array_equal(results[0][k], start[k]) for k in start)


def test_gradients_left_by_an_interrupted_step_do_not_leak_into_the_next_round(model, records):
    train, _ = records
    initial = get_adapter_state(model[0])
    clean = _trainer(model, train[:16], train[:1], seed=5)
    _run(clean, 1)
    expected = get_adapter_state(model[0])

    set_adapter_state(model[0], initial)
    for p in model[0].parameters():
        if p.requires_grad:  # what a backward pass that died before optimizer.step() leaves behind
            p.grad = torch.full_like(p, 5.0)
    stale = _trainer(model, train[:16], train[:1], seed=5)
    _run(stale, 1)
    got = get_adapter_state(model[0])
    assert all(np.array_equal(got[k], expected[k]) for k in expected)


def test_micro_batch_larger_than_the_batch_is_capped(model, records):
    train, val = records
    trainer = _trainer(model, train[:16], val, micro=32, batch=4)
    assert trainer.micro_batch_size == 4
    assert trainer.num_train_examples == 16
    result, _ = _run(trainer, 1)
    assert math.isfinite(result.last_loss)
