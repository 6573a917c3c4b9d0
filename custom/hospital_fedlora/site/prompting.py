"""Records into supervised training examples, in the job's prompt format; loss on the assistant's answers only.

Two formats (``TaskSettings.prompt_format``):

- ``plain``: this bundle's Alpaca-like template (``### Instruction:`` / ``### Input:`` / ``### Response:``),
  ``</s>`` after each answer so the model learns where one ends; for base models without a chat template.
- ``chat_template``: the base model tokenizer's own chat template (Llama-3.x, Mistral, Qwen2 Instruct), so the
  adapter is trained on the prompts the checkpoint was instructed with.

Labels are -100 everywhere but the assistant turns the task trains on. A record longer than
``max_seq_length`` is cut (the note from its middle where there is one, else the end) and counted: the
executor reports how many were, nothing is cut silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..config import ConfigError, TaskSettings

IGNORE_INDEX = -100

PROMPT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
PROMPT_TEMPLATE_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"
_INSTRUCTION_HEADER = "### Instruction:\n"
_INPUT_HEADER = "\n\n### Input:\n"
_RESPONSE_HEADER = "\n\n### Response:\n"
_TURN_SEPARATOR = "\n\n"


# ------------------------------------------------------------------------------------------ plain format
def format_prompt(record: dict, system: str | None = None) -> str:
    """The plain prompt of an instruction record; its answer follows ``### Response:\\n``."""
    head = system + _TURN_SEPARATOR if system else ""
    if record.get("input"):
        return head + PROMPT_TEMPLATE.format(instruction=record["instruction"], input=record["input"])
    return head + PROMPT_TEMPLATE_NO_INPUT.format(instruction=record["instruction"])


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def _cut_middle(ids: list[int], keep: int) -> list[int]:
    if keep <= 0:
        return []
    if len(ids) <= keep:
        return ids
    head = keep // 2
    return ids[:head] + ids[len(ids) - (keep - head) :]


def tokenize_record(record: dict, tokenizer, max_seq_length: int, system: str | None = None) -> dict[str, list[int]]:
    """Plain format, one instruction record: ``<s>`` prompt response ``</s>``, labels -100 over ``<s>`` and the prompt.

    The prompt is tokenized in three pieces (header with the instruction, the note, the response marker),
    which for byte-level BPE gives the same ids as tokenizing ``format_prompt(record)`` whole, because every
    piece boundary is a whitespace boundary.

    Truncation, when the example is longer than ``max_seq_length``:

    1. the response keeps everything the prompt leaves free, and never less than half the window
       (cut at its end only if it alone is longer than that; ``</s>`` is then lost);
    2. the note (``input``) is cut from the *middle*, keeping its opening (who the patient is) and its end
       (the plan), so the instruction and the ``### Response:`` marker always survive;
    3. only if that is not enough is the instruction header cut from the middle as well.
    """
    if max_seq_length < 8:
        raise ValueError(f"max_seq_length must be at least 8, got {max_seq_length}")
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token; training needs one to mark the end of a response")

    head = (system + _TURN_SEPARATOR if system else "") + _INSTRUCTION_HEADER + record["instruction"]
    if record.get("input"):
        header = _ids(tokenizer, head + _INPUT_HEADER)
        note = _ids(tokenizer, record["input"])
    else:
        header = _ids(tokenizer, head)
        note = []
    marker = _ids(tokenizer, _RESPONSE_HEADER)
    response = _ids(tokenizer, record["response"]) + [tokenizer.eos_token_id]

    prompt_len = len(bos) + len(header) + len(note) + len(marker)
    if prompt_len + len(response) > max_seq_length:
        response = response[: max(max_seq_length - prompt_len, min(len(response), max_seq_length // 2))]
        room = max_seq_length - len(response) - len(bos)
        note = _cut_middle(note, room - len(header) - len(marker))
        header = _cut_middle(header, room - len(note) - len(marker))
        marker = marker[max(0, len(marker) - (room - len(header) - len(note))) :]

    prompt = bos + header + note + marker
    return {"input_ids": prompt + response, "labels": [IGNORE_INDEX] * len(prompt) + response}


# --------------------------------------------------------------------------------------------- builder
@dataclass(frozen=True)
class TokenizedSplit:
    examples: list[dict[str, list[int]]]
    truncated: int  # records longer than max_seq_length, cut to fit


class PromptBuilder:
    """Turns records into ``{input_ids, labels}`` in the job's prompt format, for one tokenizer.

    ``source`` names where the task came from, in errors (the job's recipe).
    """

    def __init__(self, tokenizer, task: TaskSettings | None = None, source: str = "job recipe"):
        self.tokenizer = tokenizer
        self.task = task = task or TaskSettings()
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if task.prompt_format == "chat_template" and not has_template:
            raise ConfigError(
                f"{source}: field 'task.prompt_format' is 'chat_template' but the base model's tokenizer has no "
                "chat template; set it to 'plain' (or 'auto'), or stage the checkpoint's tokenizer_config.json"
            )
        self.format = task.prompt_format if task.prompt_format != "auto" else ("chat_template" if has_template else "plain")
        if tokenizer.eos_token_id is None:
            raise ConfigError("the base model's tokenizer has no eos token; training needs one to end an answer")

    # ------------------------------------------------------------------------------------------- public
    def tokenize_all(self, records: Sequence[dict], max_seq_length: int, what: str) -> TokenizedSplit:
        """Every record of one split; ``what`` names the split in errors (e.g. ``train data (data.train)``)."""
        examples, truncated = [], 0
        for number, record in enumerate(records, start=1):
            try:
                example, cut = self.tokenize(record, max_seq_length)
            except ConfigError as err:
                raise ConfigError(f"{what}, record {number}: {err}") from None
            examples.append(example)
            truncated += cut
        return TokenizedSplit(examples, truncated)

    def tokenize(self, record: dict, max_seq_length: int) -> tuple[dict[str, list[int]], bool]:
        """One record's example, and whether it had to be cut to ``max_seq_length`` tokens."""
        if self.format == "plain" and "messages" not in record:
            whole = tokenize_record(record, self.tokenizer, 1 << 30, self.task.system_prompt)
            if len(whole["input_ids"]) <= max_seq_length:
                return whole, False
            return tokenize_record(record, self.tokenizer, max_seq_length, self.task.system_prompt), True
        if self.format == "plain":
            return _right_cut(self._plain_turns(record["messages"]), max_seq_length)
        return self._chat(record, max_seq_length)

    def prompt_text(self, record: dict) -> str:
        """The text a model continues to answer ``record`` (its last answer left out): for generation."""
        if self.format == "plain" and "messages" not in record:
            return format_prompt(record, self.task.system_prompt)
        messages = self._messages(record)[:-1]
        if self.format == "plain":
            ids = self._plain_turns(messages)["input_ids"]
            skip = 1 if self.tokenizer.bos_token_id is not None else 0  # a generator's tokenizer adds <s> itself
            return self.tokenizer.decode(ids[skip:], skip_special_tokens=False)
        return self._render(messages, add_generation_prompt=True)

    # ------------------------------------------------------------------------------------------ helpers
    def _messages(self, record: dict) -> list[dict]:
        if "messages" in record:
            messages = list(record["messages"])
        else:
            user = record["instruction"] + (_TURN_SEPARATOR + record["input"] if record.get("input") else "")
            messages = [{"role": "user", "content": user}, {"role": "assistant", "content": record["response"]}]
        if self.task.system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": self.task.system_prompt})
        return messages

    def _trained(self, messages: list[dict]) -> set[int]:
        answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        return set(answers[-1:] if self.task.loss_on == "last_assistant_turn" else answers)

    def _plain_turns(self, messages: list[dict]) -> dict[str, list[int]]:
        tok = self.tokenizer
        messages = self._with_system(messages)
        trained = self._trained(messages)
        ids: list[int] = []
        labels: list[int] = []

        def add(piece: list[int], learn: bool) -> None:
            ids.extend(piece)
            labels.extend(piece if learn else [IGNORE_INDEX] * len(piece))

        add([tok.bos_token_id] if tok.bos_token_id is not None else [], False)
        for i, m in enumerate(messages):
            if m["role"] == "system":
                add(_ids(tok, m["content"] + _TURN_SEPARATOR), False)
            elif m["role"] == "user":
                add(_ids(tok, _INSTRUCTION_HEADER + m["content"] + _RESPONSE_HEADER), False)
            else:
                add(_ids(tok, m["content"]) + [tok.eos_token_id], i in trained)
                if i + 1 < len(messages):
                    add(_ids(tok, _TURN_SEPARATOR), False)
        return {"input_ids": ids, "labels": labels}

    def _with_system(self, messages: list[dict]) -> list[dict]:
        if self.task.system_prompt and messages and messages[0]["role"] != "system":
            return [{"role": "system", "content": self.task.system_prompt}, *messages]
        return messages

    def _render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        except Exception as err:  # jinja raises its own errors for roles or orders a template refuses
            roles = "/".join(m["role"] for m in messages)
            raise ConfigError(
                f"the base model's chat template refuses this conversation ({roles}): {err}; map the roles onto "
                "ones the template takes, or set the job's task.prompt_format to 'plain'"
            ) from None

    def _chat(self, record: dict, max_seq_length: int) -> tuple[dict[str, list[int]], bool]:
        example = self._chat_example(self._messages(record))
        if len(example["input_ids"]) <= max_seq_length:
            return example, False
        note = record.get("input") if "messages" not in record else None
        for _ in range(3):  # the note's middle goes first, as in the plain format; re-rendering may shift a token
            if not note:
                break
            excess = len(example["input_ids"]) - max_seq_length
            note_ids = _ids(self.tokenizer, note)
            note = self.tokenizer.decode(_cut_middle(note_ids, len(note_ids) - excess - 2)).strip()
            example = self._chat_example(self._messages({**record, "input": note}))
            if len(example["input_ids"]) <= max_seq_length:
                return example, True
        return _right_cut(example, max_seq_length)

    def _chat_example(self, messages: list[dict]) -> dict[str, list[int]]:
        """Render the conversation; label the characters each trained answer adds, then the tokens that start there."""
        text = self._render(messages)
        spans = []
        for i in sorted(self._trained(messages)):
            before = self._render(messages[:i], add_generation_prompt=True)
            through = self._render(messages[: i + 1])
            if not (text.startswith(through) and through.startswith(before)):
                raise ConfigError(
                    "the base model's chat template does not render earlier turns as a prefix of later ones, so "
                    "answers cannot be located; set the job's task.prompt_format to 'plain'"
                )
            spans.append((len(before), len(through)))
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        labels = [
            tid if any(a <= start < b for a, b in spans) else IGNORE_INDEX
            for tid, (start, _) in zip(enc["input_ids"], enc["offset_mapping"])
        ]
        return {"input_ids": list(enc["input_ids"]), "labels": labels}


def _right_cut(example: dict[str, list[int]], max_seq_length: int) -> tuple[dict[str, list[int]], bool]:
    if len(example["input_ids"]) <= max_seq_length:
        return example, False
    return {k: v[:max_seq_length] for k, v in example.items()}, True
