"""Answers from the final adapter: load it on the base model and generate greedily for a prompt or a file of records.

    python -m hospital_fedlora.inference.generate --base-model DIR --adapter DIR --prompts notes.jsonl --out answers.jsonl

``--prompts`` takes JSONL records in the shapes a site's data takes: ``{"instruction", "input"}`` or
``{"messages": [...]}`` (a last assistant turn, if present, is left out and answered anew). Each output
record is the input record with ``"generation"`` added. ``--prompt TEXT`` answers one instruction and prints
the answer. Prompts are built as in training (``--prompt-format``, default auto: the tokenizer's chat
template when it has one). Nothing is downloaded: both folders are read locally.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..config import ConfigError, TaskSettings
from ..site.generation import generate_answers
from ..site.prompting import PromptBuilder
from .adapted_model import load_adapted_model


def read_prompt_records(path: Path) -> list[dict]:
    """JSONL records to answer; a ``ConfigError`` naming the file and line for anything else."""
    if not path.is_file():
        raise ConfigError(f"--prompts {path}: file not found")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"--prompts {path}, line {number}: not JSON ({err})") from None
        if not isinstance(record, dict) or not (isinstance(record.get("instruction"), str) or record.get("messages")):
            raise ConfigError(
                f"--prompts {path}, line {number}: expected an object with 'instruction' (and optional 'input') "
                "or 'messages' (a list of {role, content})"
            )
        records.append(record)
    if not records:
        raise ConfigError(f"--prompts {path}: no records")
    return records


def as_prompt_record(record: dict) -> dict:
    """The record as ``PromptBuilder.prompt_text`` takes it: the answer to generate is its last turn, left out."""
    if "messages" in record:
        messages = list(record["messages"])
        if messages[-1].get("role") == "assistant":
            messages = messages[:-1]
        return {"messages": [*messages, {"role": "assistant", "content": ""}]}
    return {"instruction": record["instruction"], "input": record.get("input") or "", "response": ""}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-model", required=True, type=Path, help="the base checkpoint the federation trained on")
    ap.add_argument("--adapter", required=True, type=Path, help="a PEFT adapter folder (a run's global_adapter/)")
    source = ap.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one instruction to answer; the answer is printed")
    source.add_argument("--prompts", type=Path, help="a JSONL file of records (instruction/input or messages)")
    ap.add_argument("--out", type=Path, help="with --prompts: write the records with 'generation' here (default: stdout)")
    ap.add_argument("--prompt-format", choices=["auto", "chat_template", "plain"], default="auto",
                    help="the job's task.prompt_format (default auto)")
    ap.add_argument("--system-prompt", help="the job's task.system_prompt, if it had one")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args(argv)
    if args.max_new_tokens < 1 or args.batch_size < 1:
        ap.error("--max-new-tokens and --batch-size must be at least 1")

    try:
        records = [{"instruction": args.prompt}] if args.prompt is not None else read_prompt_records(args.prompts)
        model, tokenizer = load_adapted_model(args.base_model, args.adapter)
        task = TaskSettings(prompt_format=args.prompt_format, system_prompt=args.system_prompt)
        prompts = PromptBuilder(tokenizer, task, source="--prompt-format")
        answers = generate_answers(
            model, tokenizer, prompts, [as_prompt_record(r) for r in records], args.max_new_tokens, args.batch_size
        )
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.prompt is not None:
        print(answers[0])
        return 0
    lines = "".join(json.dumps({**r, "generation": a}, ensure_ascii=False) + "\n" for r, a in zip(records, answers))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(lines, encoding="utf-8")
        print(f"wrote {len(answers)} generations to {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
