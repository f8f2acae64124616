"""Text-mode datasets: format detection, loss masks, bad lines, truncation, packing, split, dummy data."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import pytest

from lora_scripts.cli import main as cli
from lora_scripts.data.text import (
    IGNORE_INDEX,
    Example,
    build_examples,
    collate,
    read_records,
    split_records,
    tokenize,
)
from lora_scripts.errors import UserError
from lora_scripts.model.mock_lm import build_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def learned_text(tokenizer, example) -> str:
    return tokenizer.decode([label for label in example.labels if label != IGNORE_INDEX])


def test_text_lines_learn_every_token_but_the_first(tmp_path, tokenizer):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "The quick brown fox."}])
    (record,) = read_records(tmp_path)
    example = tokenize(record, tokenizer)
    assert record.format == "text"
    assert example.input_ids[-1] == tokenizer.eos_token_id
    assert example.labels[0] == IGNORE_INDEX
    assert example.labels[1:] == example.input_ids[1:]


def test_prompt_tokens_carry_no_loss(tmp_path, tokenizer):
    write_jsonl(tmp_path / "a.jsonl", [{"prompt": "Question: how many legs?", "completion": " Eight legs."}])
    (record,) = read_records(tmp_path)
    example = tokenize(record, tokenizer)
    prompt_ids = tokenizer("Question: how many legs?")["input_ids"]
    assert example.input_ids[: len(prompt_ids)] == prompt_ids
    assert all(label == IGNORE_INDEX for label in example.labels[: len(prompt_ids)])
    assert all(label != IGNORE_INDEX for label in example.labels[len(prompt_ids) :])
    assert learned_text(tokenizer, example) == " Eight legs." + tokenizer.eos_token


def test_chat_loss_only_on_assistant_turns(tmp_path, tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome."},
    ]
    write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])
    (record,) = read_records(tmp_path)
    example = tokenize(record, tokenizer)
    learned = learned_text(tokenizer, example)
    assert learned == "Paris.<|im_end|>\nRome.<|im_end|>\n"
    full = tokenizer.decode(example.input_ids)
    assert "Capital of France?" in full and "Be brief." in full
    # every token outside the learned spans is masked
    assert sum(label != IGNORE_INDEX for label in example.labels) == len(
        tokenizer(learned, add_special_tokens=False)["input_ids"]
    )


def test_chat_needs_a_template(tmp_path, tokenizer):
    write_jsonl(
        tmp_path / "chat.jsonl",
        [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}],
    )
    (record,) = read_records(tmp_path)
    plain = build_tokenizer()
    plain.chat_template = None
    with pytest.raises(UserError, match=r"chat\.jsonl:1: .*chat template"):
        tokenize(record, plain)


def test_formats_are_detected_per_file(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "one"}, {"text": "two"}])
    write_jsonl(tmp_path / "sub" / "b.jsonl", [{"prompt": "p", "completion": "c"}])
    records = read_records(tmp_path)
    assert [(r.file.name, r.line, r.format) for r in records] == [
        ("a.jsonl", 1, "text"),
        ("a.jsonl", 2, "text"),
        ("b.jsonl", 1, "prompt"),
    ]
    assert [r.format for r in read_records(tmp_path / "a.jsonl")] == ["text", "text"]


def test_mixed_formats_in_one_file_name_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [{"text": "one"}, "", {"prompt": "p", "completion": "c"}])
    with pytest.raises(
        UserError, match=rf"{re.escape(str(path))}:3: a prompt/completion line in a file of text lines \(line 1\)"
    ):
        read_records(tmp_path)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"text": "unterminated', "not valid JSON"),
        ('["a list"]', "expected a JSON object"),
        ('{"prompt": "only a prompt"}', "'completion' must be a non-empty string"),
        ('{"text": "x", "prompt": "y", "completion": "z"}', "fields of different formats"),
        ('{"messages": [{"role": "user", "content": "no answer"}]}', "no assistant message"),
        ('{"messages": [{"role": "user"}]}', r"messages\[0\] \('user'\) must have a 'content' string"),
        ('{"label": 3}', "no 'text', 'prompt'/'completion' or 'messages' field"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, line, message):
    path = write_jsonl(tmp_path / "data.jsonl", [{"text": "fine"}, line])
    with pytest.raises(UserError, match=rf"{re.escape(str(path))}:2: {message}"):
        read_records(tmp_path)


def test_every_bad_line_is_listed(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", ["{", {"text": "ok"}, "nope"])
    with pytest.raises(UserError) as err:
        read_records(tmp_path)
    assert f"{path}:1:" in str(err.value) and f"{path}:3:" in str(err.value)


def test_missing_or_empty_data(tmp_path):
    with pytest.raises(UserError, match=r"no \.jsonl files"):
        read_records(tmp_path)
    write_jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(UserError, match=r"empty\.jsonl: no examples"):
        read_records(tmp_path)


def test_truncation_and_dropping_examples_without_loss(tmp_path, tokenizer):
    long_prompt = "word " * 40
    write_jsonl(tmp_path / "t.jsonl", [{"text": "The weather today is sunny with a light breeze " * 5}])
    write_jsonl(
        tmp_path / "p.jsonl", [{"prompt": long_prompt, "completion": " done"}, {"prompt": "hi", "completion": " there"}]
    )
    records = read_records(tmp_path)
    examples = build_examples(records, tokenizer, max_seq_length=16, packing=False)
    assert len(examples) == 2  # the long prompt leaves no completion token within 16
    assert all(len(e.input_ids) <= 16 and len(e.labels) == len(e.input_ids) for e in examples)
    assert max(len(e.input_ids) for e in examples) == 16
    with pytest.raises(UserError, match=r"p\.jsonl:1: no example has a token to learn within max_seq_length 16"):
        build_examples(records[:1], tokenizer, max_seq_length=16, packing=False)


def test_packing_joins_whole_examples_up_to_the_limit(tmp_path, tokenizer):
    write_jsonl(tmp_path / "a.jsonl", [{"text": f"Story {i}: a small robot."} for i in range(12)])
    records = read_records(tmp_path)
    single = build_examples(records, tokenizer, max_seq_length=48, packing=False)
    packed = build_examples(records, tokenizer, max_seq_length=48, packing=True)
    assert len(packed) < len(single)
    assert all(len(e.input_ids) <= 48 for e in packed)
    assert [t for e in packed for t in e.input_ids] == [t for e in single for t in e.input_ids]
    assert [t for e in packed for t in e.labels] == [t for e in single for t in e.labels]
    # starts mark where each joined example begins
    segments = [e.input_ids[a:b] for e in packed for a, b in itertools.pairwise((*e.starts, len(e.input_ids)))]
    assert segments == [e.input_ids for e in single]
    assert all(e.labels[start] == IGNORE_INDEX for e in packed for start in e.starts)


def test_validation_split_is_deterministic_and_disjoint(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": f"line {i}"} for i in range(20)])
    records = read_records(tmp_path)
    train, held = split_records(records, 0.25, seed=1)
    assert len(held) == 5 and len(train) == 15
    assert {r.line for r in train}.isdisjoint({r.line for r in held})
    assert split_records(records, 0.25, seed=1) == (train, held)
    assert split_records(records, 0.25, seed=2)[1] != held
    assert split_records(records, 0.0, seed=1) == (records, [])
    with pytest.raises(UserError, match="validation_split"):
        split_records(records[:1], 0.5, seed=1)


def test_collate_pads_with_masked_labels(tmp_path, tokenizer):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "short"}, {"text": "a somewhat longer line of text"}])
    examples = build_examples(read_records(tmp_path), tokenizer, 64, False)
    batch = collate(examples, tokenizer.pad_token_id)
    short = len(examples[0].input_ids)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["attention_mask"][0].sum() == short
    assert (batch["labels"][0, short:] == IGNORE_INDEX).all()
    assert (batch["input_ids"][0, short:] == tokenizer.pad_token_id).all()


def test_collate_restarts_positions_at_each_packed_example(tokenizer):
    packed = Example([5, 6, 7, 8, 9], [IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9], starts=(0, 3))
    alone = Example([5, 6], [IGNORE_INDEX, 6])
    batch = collate([packed, alone], tokenizer.pad_token_id)
    assert "attention_mask" not in batch  # transformers derives the per-example mask from the positions
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]
    assert batch["labels"][1].tolist() == [IGNORE_INDEX, 6, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]
    assert "position_ids" not in collate([alone, alone], tokenizer.pad_token_id)


def test_dummy_data_cli_writes_each_format(tmp_path, capsys):
    assert cli(["dummy-data", "--kind", "text", "--count", "3", str(tmp_path / "data")]) == 0
    records = read_records(tmp_path / "data")
    by_format = {fmt: sum(r.format == fmt for r in records) for fmt in ("text", "prompt", "messages")}
    assert by_format == {"text": 3, "prompt": 3, "messages": 3}
    assert str(tmp_path / "data" / "chat.jsonl") in capsys.readouterr().out
