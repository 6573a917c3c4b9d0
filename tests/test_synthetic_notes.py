"""The synthetic federation: deterministic, non-IID, unequal, short, and with responses that follow from notes."""

import json
import subprocess
import sys
from collections import Counter

import pytest

from hospital_fedlora_tools.synthetic_notes import (
    CONDITIONS,
    SITE_SPECIALTY,
    SITES,
    SPECIALTY_NAMES,
    SPLIT_SIZES,
    SPLITS,
    TASK_GROUP,
    TASKS,
    general_corpus,
    generate_site_records,
    write_federation_data,
)


def test_same_seed_same_records_other_seed_other_records():
    assert generate_site_records("hospital-a", 50, seed=3) == generate_site_records("hospital-a", 50, seed=3)
    assert generate_site_records("hospital-a", 50, seed=3) != generate_site_records("hospital-a", 50, seed=4)
    assert generate_site_records("hospital-a", 50, seed=3) != generate_site_records("hospital-b", 50, seed=3)


def test_records_have_the_instruction_fields_and_every_task():
    records = generate_site_records("hospital-b", 200, seed=0)
    for r in records:
        assert {"instruction", "input", "response"} <= set(r)
        assert r["input"] and r["response"]
    assert {r["instruction"] for r in records} == set(TASKS)


@pytest.mark.parametrize("site", SITES)
def test_each_site_is_skewed_to_its_own_specialty(site):
    counts = Counter(r["specialty"] for r in generate_site_records(site, 600, seed=0))
    own = counts[SITE_SPECIALTY[site]] / 600
    assert 0.62 < own < 0.78
    assert len(counts) == 3  # the other specialties still appear


def test_same_note_and_instruction_always_give_the_same_response():
    seen = {}
    for site in SITES:
        for r in generate_site_records(site, 400, seed=1):
            key = (r["instruction"], r["input"])
            assert seen.setdefault(key, r["response"]) == r["response"]


def test_diagnosis_group_follows_the_notes_findings():
    # Every finding phrase belongs to exactly one condition, and each note states one of its condition's
    # findings, so the group can be read off the note.
    owner = {}
    for cond in CONDITIONS:
        for finding in cond.findings:
            assert owner.setdefault(finding, cond) is cond
    for r in generate_site_records("hospital-c", 300, seed=2):
        stated = [owner[f] for f in owner if f in r["input"]]
        assert [c.name for c in stated] == [r["condition"]]
        if r["instruction"] == TASK_GROUP:
            assert r["response"] == f"{SPECIALTY_NAMES[stated[0].specialty]}: {stated[0].name}"


def test_written_files_are_byte_identical_and_sized_per_site(tmp_path):
    first = write_federation_data(tmp_path / "one", seed=7)
    second = write_federation_data(tmp_path / "two", seed=7)
    for site in SITES:
        for split in SPLITS:
            data = first[site][split].read_bytes()
            assert data == second[site][split].read_bytes()
            lines = data.decode().splitlines()
            assert len(lines) == SPLIT_SIZES[site][split]
            assert all(set(json.loads(line)) >= {"instruction", "input", "response"} for line in lines)
    train_sizes = [SPLIT_SIZES[s]["train"] for s in SITES]
    assert len(set(train_sizes)) == 3  # unequal on purpose: example-count weighting must matter


def test_rewriting_replaces_the_folder_without_leftovers(tmp_path):
    write_federation_data(tmp_path / "data", seed=0)
    write_federation_data(tmp_path / "data", seed=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == sorted(SITES)


def test_cli_writes_the_federation(tmp_path):
    out = tmp_path / "data"
    result = subprocess.run(
        [sys.executable, "-m", "hospital_fedlora_tools.synthetic_notes", "--out", str(out), "--seed", "0"],
        capture_output=True, text=True, check=True,
    )
    assert "hospital-c" in result.stdout
    expected = write_federation_data(tmp_path / "again", seed=0)
    for site in SITES:
        for split in SPLITS:
            assert (out / site / f"{split}.jsonl").read_bytes() == expected[site][split].read_bytes()


def test_general_corpus_is_plain_prose_from_every_specialty():
    docs = general_corpus(400, seed=0)
    assert docs == general_corpus(400, seed=0)
    text = " ".join(docs)
    assert "### " not in text  # never the instruction format
    for word in ("furosemide", "tamoxifen", "bronchiolitis"):
        assert word in text
    site_notes = {r["input"] for s in SITES for r in generate_site_records(s, 200, seed=0)}
    assert not site_notes & set(docs)


def test_notes_and_responses_are_short_in_model_tokens(base_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_model_dir)
    lengths = [
        len(tok(r["input"] + " " + r["response"], add_special_tokens=False)["input_ids"])
        for s in SITES
        for r in generate_site_records(s, 200, seed=0)
    ]
    assert sum(lengths) / len(lengths) <= 120
    assert max(lengths) <= 180
