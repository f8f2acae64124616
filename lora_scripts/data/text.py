"""Text-mode datasets: JSONL records in three formats, tokenized with loss masks, truncated, packed, split.

Each ``.jsonl`` file holds one format, detected from its lines:

- ``{"text": ...}``: loss on every token;
- ``{"prompt": ..., "completion": ...}``: loss on the completion only (prompt labels are -100);
- ``{"messages": [{"role": ..., "content": ...}, ...]}``: rendered with the tokenizer's chat template,
  loss on the assistant turns only.

Torch is imported only where tensors are made, so reading and checking records stays light.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_scripts.atomic import write_text
from lora_scripts.errors import UserError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
FORMAT_NAMES = {"text": "text", "prompt": "prompt/completion", "messages": "messages"}
_SHOWN_PROBLEMS = 5
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Record:
    """One JSONL line: where it came from, its format and its fields."""

    file: Path
    line: int
    format: str
    data: dict[str, Any]

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True)
class Example:
    """Token ids and their labels (-100 where no loss is taken); ``starts``: where each packed example begins."""

    input_ids: list[int]
    labels: list[int]
    starts: tuple[int, ...] = (0,)


def data_files(root: Path) -> list[Path]:
    """The JSONL files of ``train_data_dir``: the file itself, or every ``*.jsonl`` under the folder."""
    if root.is_file():
        if root.suffix != ".jsonl":
            raise UserError(f"{root}: text mode reads .jsonl files; this file is '{root.suffix or 'no suffix'}'")
        return [root]
    if not root.is_dir():
        raise UserError(f"{root}: train_data_dir not found")
    files = sorted(p for p in root.rglob("*.jsonl") if p.is_file())
    if not files:
        raise UserError(f"{root}: no .jsonl files in train_data_dir")
    return files


def read_records(root: Path) -> list[Record]:
    """Every record under ``root``; raises one UserError listing the bad lines (file:line each)."""
    records: list[Record] = []
    problems: list[str] = []
    for path in data_files(root):
        file_records, file_problems = _read_file(path)
        records += file_records
        problems += file_problems
    if problems:
        more = f" (and {len(problems) - _SHOWN_PROBLEMS} more)" if len(problems) > _SHOWN_PROBLEMS else ""
        raise UserError("; ".join(problems[:_SHOWN_PROBLEMS]) + more)
    return records


def _read_file(path: Path) -> tuple[list[Record], list[str]]:
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as err:
        return [], [f"{path}: not UTF-8 text (bad byte at offset {err.start})"]
    except OSError as err:
        return [], [f"{path}: cannot read file: {err.strerror or err}"]
    records: list[Record] = []
    problems: list[str] = []
    first: Record | None = None
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as err:
            problems.append(f"{path}:{number}: not valid JSON ({err.msg} at column {err.colno})")
            continue
        kind, problem = classify(data)
        if problem:
            problems.append(f"{path}:{number}: {problem}")
            continue
        record = Record(path, number, kind, data)
        if first is None:
            first = record
        elif kind != first.format:
            problems.append(
                f"{path}:{number}: a {FORMAT_NAMES[kind]} line in a file of {FORMAT_NAMES[first.format]} lines "
                f"(line {first.line}); use one format per file"
            )
            continue
        records.append(record)
    if first is None and not problems:
        problems.append(f"{path}: no examples (the file is empty)")
    return records, problems


def classify(data: Any) -> tuple[str, str]:
    """The format of one parsed line and, when it is malformed, what is wrong with it."""
    if not isinstance(data, dict):
        return "", 'expected a JSON object such as {"text": "..."}'
    keys = [key for key in ("text", "prompt", "completion", "messages") if key in data]
    kinds = {"prompt" if key == "completion" else key for key in keys}
    if not kinds:
        return "", "no 'text', 'prompt'/'completion' or 'messages' field"
    if len(kinds) > 1:
        return "", f"fields of different formats on one line ({', '.join(keys)}); use one format per line"
    kind = kinds.pop()
    if kind == "messages":
        return kind, _messages_problem(data["messages"])
    for key in ("text",) if kind == "text" else ("prompt", "completion"):
        value = data.get(key)
        if not isinstance(value, str) or not value:
            return kind, f"'{key}' must be a non-empty string" + ("" if key in data else " (it is missing)")
    return kind, ""


def _messages_problem(messages: Any) -> str:
    if not isinstance(messages, list) or not messages:
        return '\'messages\' must be a non-empty list of {"role": ..., "content": ...} objects'
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            return f"messages[{index}] must be an object with a 'role' string"
        if not isinstance(message.get("content"), str):
            return f"messages[{index}] ('{message['role']}') must have a 'content' string"
    if not any(message["role"] == "assistant" for message in messages[1:]):
        return "no assistant message after the first message: nothing to learn from this conversation"
    return ""


def tokenize(record: Record, tokenizer: PreTrainedTokenizerBase) -> Example:
    """Token ids and labels of one record, untruncated; the first token never carries a loss."""
    if record.format == "messages":
        ids, labels = _chat_tokens(record, tokenizer)
    else:
        prompt = record.data["text"] if record.format == "text" else record.data["prompt"]
        ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
        if record.format == "prompt":
            labels = [IGNORE_INDEX] * len(ids)
            completion = list(tokenizer(record.data["completion"], add_special_tokens=False)["input_ids"])
            ids += completion
            labels += completion
        else:
            labels = list(ids)
        if tokenizer.eos_token_id is not None and ids[-1] != tokenizer.eos_token_id:
            ids.append(tokenizer.eos_token_id)
            labels.append(tokenizer.eos_token_id)
    labels[0] = IGNORE_INDEX
    return Example(ids, labels)


def _chat_tokens(record: Record, tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """Render a conversation; the tokens each assistant turn adds to the rendering carry the loss."""
    if not tokenizer.chat_template:
        raise UserError(f"{record.where}: 'messages' lines need a chat template; the base model's tokenizer has none")
    messages = record.data["messages"]

    def render(upto: int, generation_prompt: bool) -> list[int]:
        try:
            text = tokenizer.apply_chat_template(
                messages[:upto], tokenize=False, add_generation_prompt=generation_prompt
            )
        except Exception as err:  # the template is user code (Jinja); any failure is about this conversation
            raise UserError(f"{record.where}: the chat template cannot render this conversation: {err}") from None
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    ids = render(len(messages), False)
    labels = [IGNORE_INDEX] * len(ids)
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start, end = render(index, True), render(index + 1, False)
        if ids[: len(start)] != start or ids[: len(end)] != end:
            raise UserError(
                f"{record.where}: the chat template renders messages[{index}] differently once later messages "
                "follow; its assistant tokens cannot be found"
            )
        labels[len(start) : len(end)] = ids[len(start) : len(end)]
    return ids, labels


def build_examples(
    records: Sequence[Record], tokenizer: PreTrainedTokenizerBase, max_seq_length: int, packing: bool
) -> list[Example]:
    """Tokenize, truncate to ``max_seq_length`` and optionally pack; drop examples left without a loss."""
    examples: list[Example] = []
    dropped: list[str] = []
    for record in records:
        full = tokenize(record, tokenizer)
        example = Example(full.input_ids[:max_seq_length], full.labels[:max_seq_length])
        if all(label == IGNORE_INDEX for label in example.labels):
            dropped.append(record.where)
            continue
        examples.append(example)
    if dropped:
        if not examples:
            raise UserError(
                f"{dropped[0]}: no example has a token to learn within max_seq_length {max_seq_length} "
                "(the prompt or the conversation before the assistant fills it); raise max_seq_length"
            )
        log.warning(
            "%d example(s) skipped: nothing to learn within max_seq_length %d (first: %s)",
            len(dropped),
            max_seq_length,
            dropped[0],
        )
    return pack(examples, max_seq_length) if packing else examples


def pack(examples: Sequence[Example], max_seq_length: int) -> list[Example]:
    """Join consecutive examples into sequences of at most ``max_seq_length`` tokens, none split.

    Each packed example's first label is -100 (see :func:`tokenize`), so no loss crosses a boundary;
    ``starts`` lets :func:`collate` keep the examples from attending to each other.
    """
    packed: list[Example] = []
    ids: list[int] = []
    labels: list[int] = []
    starts: list[int] = []
    for example in examples:
        if ids and len(ids) + len(example.input_ids) > max_seq_length:
            packed.append(Example(ids, labels, tuple(starts)))
            ids, labels, starts = [], [], []
        starts.append(len(ids))
        ids = ids + example.input_ids
        labels = labels + example.labels
    if ids:
        packed.append(Example(ids, labels, tuple(starts)))
    return packed


def split_records(records: Sequence[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Hold out ``fraction`` of the records (at least one when > 0), chosen by ``seed``: (train, validation)."""
    if fraction <= 0:
        return list(records), []
    held = max(1, round(len(records) * fraction))
    if held >= len(records):
        raise UserError(
            f"validation_split {fraction} of {len(records)} example(s) leaves nothing to train on; "
            "add examples or set validation_split: 0"
        )
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    chosen = set(order[:held])
    train = [record for index, record in enumerate(records) if index not in chosen]
    return train, [record for index, record in enumerate(records) if index in chosen]


def collate(items: Sequence[Example], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: ``input_ids``, ``labels`` (-100 on padding) and how attention is limited.

    Without packed rows: ``attention_mask`` (0 on padding). With packed rows: ``position_ids`` that restart
    at 0 where each example (and the padding) begins, and no ``attention_mask``; transformers then attends
    within each example only (block-diagonal causal mask for SDPA and eager attention), as long as the
    model is called without a KV cache. Right padding needs no mask there: causal attention never lets a
    real token see a later position.
    """
    import numpy as np
    import torch

    lengths = np.array([len(item.input_ids) for item in items])
    width = int(lengths.max())
    # Filled in numpy, handed to torch without a copy: per-row torch indexing costs more than a tiny model's step.
    input_ids = np.full((len(items), width), pad_token_id, dtype=np.int64)
    labels = np.full((len(items), width), IGNORE_INDEX, dtype=np.int64)
    for row, item in enumerate(items):
        input_ids[row, : lengths[row]] = item.input_ids
        labels[row, : lengths[row]] = item.labels
    batch = {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels)}
    columns = np.arange(width)
    if any(len(item.starts) > 1 for item in items):
        # Where the segment of each position (a packed example, or the padding) begins; positions count from there.
        segment_start = np.zeros((len(items), width), dtype=np.int64)
        for row, item in enumerate(items):
            segment_start[row, list(item.starts)] = item.starts
            segment_start[row, lengths[row] :] = lengths[row]
        batch["position_ids"] = torch.from_numpy(columns - np.maximum.accumulate(segment_start, axis=1))
    else:
        batch["attention_mask"] = torch.from_numpy((columns < lengths[:, None]).astype(np.int64))
    return batch


_SUBJECTS = ["cat", "river", "robot", "garden", "violin", "mountain", "lantern", "teacher"]
_COLOURS = ["red", "blue", "green", "golden", "silver", "purple", "orange", "white"]

_WRITERS: dict[str, Callable[[int, str, str], dict[str, Any]]] = {
    "text": lambda i, subject, colour: {"text": f"Story {i}: the {colour} {subject} sang a song about the sea."},
    "prompt_completion": lambda i, subject, colour: {
        "prompt": f"What colour is the {subject} number {i}?",
        "completion": f" The {subject} number {i} is {colour}.",
    },
    "chat": lambda i, subject, colour: {
        "messages": [
            {"role": "system", "content": "You answer in one short sentence."},
            {"role": "user", "content": f"Describe the {subject} number {i}."},
            {"role": "assistant", "content": f"It is a {colour} {subject}."},
        ]
    },
}


def write_dummy_text(out: Path, count: int) -> list[Path]:
    """Write ``count`` generated examples in each format (text, prompt/completion, chat) as JSONL files."""
    written = []
    for name, make in _WRITERS.items():
        lines = [
            json.dumps(make(i, _SUBJECTS[i % len(_SUBJECTS)], _COLOURS[(i * 3) % len(_COLOURS)])) for i in range(count)
        ]
        path = Path(out) / f"{name}.jsonl"
        write_text(path, "\n".join(lines) + "\n")
        written.append(path)
    return written
