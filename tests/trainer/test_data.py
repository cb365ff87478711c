"""data.py: every format and file type, detection, loss masks, and bad-record errors."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from datasets import Dataset
from lora_trainer import hf
from lora_trainer.data import (
    Record,
    TokenizedData,
    check_source,
    convert,
    detect_format,
    held_out,
    load_records,
    tokenize,
)
from lora_trainer.errors import DatasetError

from devcluster.tiny_model import build_tokenizer, make_records, write_dataset

FORMATS = ["text", "alpaca", "messages", "prompt_completion"]
SUFFIXES = [".jsonl", ".json", ".parquet"]


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return build_tokenizer()


def _records(rows: list[Any], file: str = "train.jsonl") -> list[Record]:
    return [Record(r, file, i) for i, r in enumerate(rows, 1)]


def _trained_text(tok: Any, ids: Sequence[int], mask: Sequence[int]) -> str:
    return str(tok.decode([i for i, m in zip(ids, mask, strict=True) if m]))


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_in_every_file_type_is_detected(tmp_path: Path, fmt: Any, suffix: str) -> None:
    path = write_dataset(tmp_path / f"train{suffix}", fmt, n=5)
    records = load_records(path)
    assert len(records) == 5
    detected, examples = convert(records, "auto")
    assert detected == fmt
    assert len(examples) == 5


@pytest.mark.parametrize("fmt", FORMATS)
def test_loss_mask_covers_only_completions(tokenizer: Any, fmt: Any) -> None:
    rows = make_records(fmt, 1, seed=3)
    _, examples = convert(_records(rows), "auto")
    tok = tokenize(examples, tokenizer, completion_only=True)
    ids, mask = tok.input_ids[0], tok.completion_mask[0]
    assert ids[-1] == tokenizer.eos_token_id or tokenizer.decode(ids[-1:]) == "\n"
    trained = _trained_text(tokenizer, ids, mask)
    answer = rows[0].get("output") or rows[0].get("completion") or rows[0].get("text")
    if fmt == "messages":
        answer = rows[0]["messages"][-1]["content"]
    if fmt == "text":
        assert sum(mask) == len(ids)  # plain text: every token counts
    else:
        assert 0 < sum(mask) < len(ids)
        assert isinstance(answer, str)
        assert trained.startswith(answer)
        assert "<|im_end|>" in trained  # the model learns to stop
        assert "What color" not in trained  # the prompt is not trained on


def test_completion_only_off_trains_on_everything(tokenizer: Any) -> None:
    _, examples = convert(_records(make_records("alpaca", 2)), "alpaca")
    tok = tokenize(examples, tokenizer, completion_only=False)
    assert all(all(m) for m in tok.completion_mask)


def test_multi_turn_chat_masks_every_assistant_turn(tokenizer: Any) -> None:
    rows = [
        {
            "messages": [
                {"role": "user", "content": "What color is the sky?"},
                {"role": "assistant", "content": "The sky is blue."},
                {"role": "user", "content": "What color is the leaf?"},
                {"role": "assistant", "content": "The leaf is green."},
            ]
        }
    ]
    _, examples = convert(_records(rows), "auto")
    tok = tokenize(examples, tokenizer, completion_only=True)
    trained = _trained_text(tokenizer, tok.input_ids[0], tok.completion_mask[0])
    assert "The sky is blue." in trained
    assert "The leaf is green." in trained
    assert "What color" not in trained


def test_sharegpt_conversations_are_accepted() -> None:
    rows = [
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    ]
    fmt, examples = convert(_records(rows), "auto")
    assert fmt == "messages"
    assert examples[0].messages == (("user", "hi"), ("assistant", "hello"))


def test_alpaca_without_input_uses_the_short_prompt() -> None:
    _, ex = convert(_records([{"instruction": "Say hi.", "output": "hi"}]), "auto")
    assert ex[0].prompt is not None
    assert "### Input" not in ex[0].prompt


@pytest.mark.parametrize(
    ("fmt", "rows", "expected"),
    [
        ("auto", [{"text": "ok"}, {"text": ""}], "train.jsonl record 2: text format needs 'text'"),
        (
            "auto",
            [{"instruction": "a", "output": "b"}, {"instruction": "a", "input": "x"}],
            "record 2: alpaca format needs 'output'",
        ),
        ("auto", [{"foo": 1}], "record 1: cannot detect the format from keys ['foo']"),
        ("auto", [["not", "an", "object"]], "record 1: cannot detect the format"),
        (
            "messages",
            [{"messages": [{"role": "user", "content": "hi"}]}],
            "record 1: the conversation has no assistant message",
        ),
        (
            "messages",
            [{"messages": [{"role": "bot", "content": "hi"}]}],
            "record 1: message 0 has role 'bot'",
        ),
        ("messages", [{"messages": []}], "record 1: 'messages' must be a non-empty list"),
        (
            "prompt_completion",
            [{"prompt": "p", "completion": "c"}, {"prompt": "p", "completion": 3}],
            "record 2: prompt_completion format needs 'completion'",
        ),
        ("alpaca", [{"instruction": "i", "input": 5, "output": "o"}], "record 1: alpaca 'input'"),
    ],
)
def test_bad_records_name_the_record(fmt: str, rows: list[Any], expected: str) -> None:
    with pytest.raises(DatasetError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        convert(_records(rows), fmt)


def test_invalid_json_line_names_line_and_column_with_a_json_hint(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b" "more": 1}\n')
    with pytest.raises(DatasetError) as caught:
        check_source(path, "auto")
    assert caught.value.message == (
        "train.jsonl line 3, column 14: invalid JSON (Expecting ',' delimiter); "
        "each line must be one JSON object"
    )
    assert caught.value.hint is not None
    assert "one complete JSON object" in caught.value.hint
    assert "double quotes" in caught.value.hint
    assert not caught.value.retryable


def test_a_line_that_is_not_utf8_is_an_invalid_record(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"text": "a"}\n{"text": "\xff"}\n')
    with pytest.raises(DatasetError, match=r"train\.jsonl line 2: not UTF-8 text"):
        check_source(path, "text")
    assert check_source(path, "text", skip_invalid=True).skipped == 1


def test_json_variants(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps({"data": [{"text": "x"}]}))
    assert load_records(tmp_path / "a.json")[0].data == {"text": "x"}
    (tmp_path / "b.json").write_text('{"text": "x"}\n{"text": "y"}\n')  # JSONL named .json
    assert len(load_records(tmp_path / "b.json")) == 2
    (tmp_path / "c.json").write_text('{"text": 1')
    with pytest.raises(DatasetError, match=r"c\.json: invalid JSON at line 1, column 11"):
        load_records(tmp_path / "c.json")
    (tmp_path / "d.json").write_text('"just a string"')
    with pytest.raises(DatasetError, match="must be a list of records"):
        load_records(tmp_path / "d.json")


def test_directory_of_files_and_limits(tmp_path: Path) -> None:
    write_dataset(tmp_path / "d" / "part-0.jsonl", "text", n=3)
    write_dataset(tmp_path / "d" / "part-1.parquet", "text", n=4)
    (tmp_path / "d" / "README.md").write_text("ignored")
    records = load_records(tmp_path / "d")
    assert len(records) == 7
    assert records[3].where == "part-1.parquet record 1"
    assert len(load_records(tmp_path / "d", limit=5)) == 5
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"no \.jsonl, \.json or \.parquet files"):
        load_records(tmp_path / "empty")
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(DatasetError, match=r"unsupported file type '\.csv'"):
        load_records(tmp_path / "x.csv")
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(DatasetError, match="no records"):
        load_records(tmp_path / "blank.jsonl")


def test_detect_format() -> None:
    assert detect_format({"text": "x"}) == "text"
    assert detect_format({"prompt": "p", "completion": "c"}) == "prompt_completion"
    assert detect_format({"instruction": "i", "output": "o"}) == "alpaca"
    assert detect_format({"messages": []}) == "messages"
    assert detect_format({"question": "q"}) is None


def test_split_is_deterministic_and_disjoint() -> None:
    held = held_out(40, 0.1, seed=7)
    assert len(held) == 4
    assert held <= set(range(40))
    assert held_out(40, 0.1, seed=7) == held
    # The indices the list-based split of earlier versions held out: an attempt of a job
    # started by them evaluates on the same records.
    assert held == {5, 12, 19, 35}
    assert held_out(40, 0.0, seed=7) == frozenset()
    assert held_out(1, 0.2, seed=7) == frozenset()
    assert len(held_out(3, 0.49, seed=7)) == 1


def test_split_of_tokenized_rows_keeps_each_row_once() -> None:
    rows = TokenizedData(input_ids=[[i] for i in range(6)], completion_mask=[[1]] * 6)
    train, evals = rows.split(frozenset({1, 4}))
    assert train.input_ids == [[0], [2], [3], [5]]
    assert evals.input_ids == [[1], [4]]
    assert len(train.completion_mask) == 4


def test_drop_unlearnable_rows() -> None:
    data = TokenizedData(
        input_ids=[[1, 2, 3, 4], [1, 2], [5, 6, 7]],
        completion_mask=[[0, 0, 0, 1], [0, 1], [1, 1, 1]],
    )
    assert data.count_longer_than(3) == 1
    assert data.drop_unlearnable(3) == 1
    assert data.input_ids == [[1, 2], [5, 6, 7]]


@pytest.mark.parametrize("rows_per_chunk", [2, 65_536], ids=["chunked", "one-chunk"])
def test_dataset_from_compact_rows_equals_the_one_from_lists(
    tokenizer: Any, monkeypatch: pytest.MonkeyPatch, rows_per_chunk: int
) -> None:
    monkeypatch.setattr(hf, "_ROWS_PER_CHUNK", rows_per_chunk)
    _, examples = convert(_records(make_records("alpaca", 5, seed=1)), "alpaca")
    tok = tokenize(examples, tokenizer, completion_only=True)
    as_lists = {
        "input_ids": [list(r) for r in tok.input_ids],
        "completion_mask": [list(m) for m in tok.completion_mask],
    }

    built = hf.to_dataset(tok)

    assert not isinstance(tok.input_ids[0], list)  # stored compactly
    reference = Dataset.from_dict(as_lists)  # what the trainer built before
    assert built.features == reference.features
    assert built.to_dict() == reference.to_dict() == as_lists


def test_messages_need_a_chat_template() -> None:
    _, examples = convert(_records(make_records("messages", 1)), "messages")
    bare = build_tokenizer()
    bare.chat_template = None
    with pytest.raises(DatasetError, match="needs a chat template"):
        tokenize(examples, bare, completion_only=True)


def test_directory_with_splits_uses_the_train_split(tmp_path: Path) -> None:
    write_dataset(tmp_path / "repo" / "data" / "train-00000.parquet", "text", n=3)
    write_dataset(tmp_path / "repo" / "data" / "test-00000.parquet", "text", n=5)
    write_dataset(tmp_path / "repo" / "validation.jsonl", "text", n=7)
    assert len(load_records(tmp_path / "repo")) == 3


def test_chat_template_errors_name_the_record() -> None:
    strict = build_tokenizer()
    strict.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('system messages are not supported') }}{% endif %}"
        "{{ m['content'] }}{% endfor %}"
    )
    rows = make_records("messages", 3)
    _, examples = convert(_records(rows, "chat.jsonl"), "messages")
    with pytest.raises(
        DatasetError, match=r"chat\.jsonl record 1: the model's chat template rejected"
    ):
        tokenize(examples, strict, completion_only=True)
