"""What the federated adapter answers: a few test notes per hospital, gold beside base model and adapter.

For the demo only, where every hospital's synthetic data lies on this one machine. In a federation the answers
never leave a hospital: each scores its own test split and sends numbers (``site/site_metrics.py``).
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from hospital_fedlora.inference.adapted_model import load_adapted_model
from hospital_fedlora.site.generation import generate_answers, reference_answer
from hospital_fedlora.site.prompting import PromptBuilder
from hospital_fedlora.site.test_metrics import is_diagnosis_group_record


def sample_records(test_file: Path, per_site: int) -> list[dict]:
    """The first diagnosis-group record and then the first others, ``per_site`` in all."""
    records = [json.loads(line) for line in test_file.read_text().splitlines() if line.strip()]
    diagnosis = [r for r in records if is_diagnosis_group_record(r)][:1]
    others = [r for r in records if not is_diagnosis_group_record(r)]
    return (diagnosis + others)[:per_site]


def answers_report(base_model: Path, adapter: Path, data_dir: Path, sites, per_site: int = 2, max_new_tokens: int = 32) -> str:
    model, tokenizer = load_adapted_model(base_model, adapter)
    prompts = PromptBuilder(tokenizer)
    lines = []
    for site in sites:
        records = sample_records(data_dir / site / "test.jsonl", per_site)
        tuned = generate_answers(model, tokenizer, prompts, records, max_new_tokens)
        with model.disable_adapter():
            base = generate_answers(model, tokenizer, prompts, records, max_new_tokens)
        for record, b, t in zip(records, base, tuned):
            note = textwrap.shorten(record.get("input", ""), 110, placeholder=" ...")
            lines += [f"{site}: {record['instruction']}  [{note}]",
                      f"    gold:       {reference_answer(record)}",
                      f"    base model: {b or '(nothing)'}",
                      f"    federated:  {t or '(nothing)'}"]  # fmt: skip
    return "\n".join(lines)
