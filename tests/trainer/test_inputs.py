"""inputs.py: the model folder and the datasets are checked before torch loads, with
permanent errors that name the field; invalid records fail or are skipped and counted;
the data is streamed, never held, and reading stops at maxRecords."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from lora_trainer import data
from lora_trainer.errors import ConfigError, DatasetError, SourceNotFound
from lora_trainer.inputs import TOKENIZER_FILES, Inputs, model_context, prepare_inputs
from lora_trainer.progress import ProgressBoard
from lora_trainer.storage import Storage
from loraops_contract.config import TrainerConfig
from loraops_contract.protocol import ExitCode

from devcluster.tiny_model import make_records, write_dataset


def _model_dir(root: Path, *, positions: int = 1024, tokenizer: bool = True) -> Path:
    """A model folder as far as inputs.py looks: config.json and tokenizer files."""
    root.mkdir(parents=True, exist_ok=True)
    config = {"model_type": "llama", "max_position_embeddings": positions}
    (root / "config.json").write_text(json.dumps(config))
    (root / "model.safetensors").write_bytes(b"")
    if tokenizer:
        (root / "tokenizer.json").write_text("{}")
        (root / "tokenizer_config.json").write_text("{}")
    return root


def _config(model: Path, data_path: Path, **overrides: Any) -> TrainerConfig:
    doc: dict[str, Any] = {
        "model": {"uri": str(model)},
        "dataset": {"uri": str(data_path), "evalSplit": 0.0},
        "training": {"maxSeqLength": 64},
        "output": {"uri": "/tmp/unused-output"},
    }
    for section, values in overrides.items():
        doc[section] = {**doc.get(section, {}), **values}
    return TrainerConfig.model_validate(doc)


def _prepare(cfg: TrainerConfig, tmp_path: Path) -> tuple[Inputs, ProgressBoard]:
    board = ProgressBoard()
    return prepare_inputs(cfg, Storage(tmp_path / "cache", {}), board), board


def test_a_model_without_tokenizer_files_is_a_permanent_source_error(tmp_path: Path) -> None:
    model = _model_dir(tmp_path / "model", tokenizer=False)
    cfg = _config(model, write_dataset(tmp_path / "d.jsonl", "text", n=4))
    with pytest.raises(SourceNotFound) as caught:
        _prepare(cfg, tmp_path)
    err = caught.value
    assert err.exit_code == ExitCode.SOURCE_NOT_FOUND
    assert not err.retryable
    assert err.message.startswith(f"model.uri {model} holds no tokenizer: none of ")
    for name in TOKENIZER_FILES:
        assert name in err.message
    assert err.hint is not None
    assert "save_pretrained" in err.hint


def test_a_tokenizer_of_its_own_code_is_not_second_guessed(tmp_path: Path) -> None:
    model = _model_dir(tmp_path / "model", tokenizer=False)
    (model / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": "x"}}))
    cfg = _config(model, write_dataset(tmp_path / "d.jsonl", "text", n=4))
    inputs, _ = _prepare(cfg, tmp_path)
    assert inputs.model_dir == model


@pytest.mark.parametrize("positions", [128, 1024])
def test_max_seq_length_longer_than_the_models_context_is_refused(
    tmp_path: Path, positions: int
) -> None:
    model = _model_dir(tmp_path / "model", positions=positions)
    data_path = write_dataset(tmp_path / "d.jsonl", "text", n=4)
    cfg = _config(model, data_path, training={"maxSeqLength": positions * 2})
    with pytest.raises(ConfigError) as caught:
        _prepare(cfg, tmp_path)
    err = caught.value
    assert err.exit_code == ExitCode.INVALID_CONFIG
    assert not err.retryable
    assert err.message.startswith(
        f"training.maxSeqLength={positions * 2} is longer than the model's context of "
        f"{positions} positions (max_position_embeddings in the config.json of model.uri"
    )
    assert err.hint is not None
    assert f"maxSeqLength to {positions} or less" in err.hint
    # Exactly the context is fine.
    _prepare(_config(model, data_path, training={"maxSeqLength": positions}), tmp_path)


def test_model_context_reads_each_architectures_key() -> None:
    assert model_context({"max_position_embeddings": 4096}) == ("max_position_embeddings", 4096)
    assert model_context({"n_positions": 1024, "n_ctx": 1024}) == ("n_positions", 1024)
    assert model_context({"text_config": {"max_position_embeddings": 8192}}) == (
        "max_position_embeddings",
        8192,
    )
    assert model_context({"max_position_embeddings": None}) is None
    assert model_context({"use_cache": True}) is None


def _chats(n: int, *, without_assistant: set[int]) -> list[dict[str, Any]]:
    rows = make_records("messages", n)
    for i in without_assistant:
        rows[i] = {"messages": [m for m in rows[i]["messages"] if m["role"] != "assistant"]}
    return rows


def test_a_record_without_an_assistant_turn_fails_the_job_by_default(tmp_path: Path) -> None:
    rows = _chats(6, without_assistant={3})
    data_path = write_dataset(tmp_path / "chat.jsonl", "messages", records=rows)
    cfg = _config(_model_dir(tmp_path / "model"), data_path)
    with pytest.raises(
        DatasetError, match=r"chat\.jsonl record 4: the conversation has no assistant"
    ):
        _prepare(cfg, tmp_path)


def test_skip_leaves_invalid_records_out_and_counts_them(tmp_path: Path) -> None:
    rows = _chats(10, without_assistant={0, 3})
    path = tmp_path / "chat.jsonl"
    write_dataset(path, "messages", records=rows)
    with path.open("a") as fh:  # and a line that is not JSON
        fh.write('{"messages": [}\n')
    cfg = _config(
        _model_dir(tmp_path / "model"),
        path,
        dataset={"invalidRecords": "skip", "evalSplit": 0.25},
    )
    inputs, board = _prepare(cfg, tmp_path)
    assert inputs.skipped_records == 3
    assert board.snapshot().skipped_records == 3
    # "auto" is detected from the first readable record, record 1 has no assistant turn.
    assert inputs.format == "messages"
    assert len(inputs.eval_rows) == 2  # a quarter of the 8 usable records
    assert inputs.eval_rows <= set(range(8))
    examples = list(inputs.train.examples())
    assert [e.where for e in examples] == [
        f"chat.jsonl record {n}" for n in (2, 3, 5, 6, 7, 8, 9, 10)
    ]


def test_all_records_invalid_is_an_error_that_quotes_the_first(tmp_path: Path) -> None:
    path = tmp_path / "chat.jsonl"
    write_dataset(path, "messages", records=_chats(3, without_assistant={0, 1, 2}))
    cfg = _config(_model_dir(tmp_path / "model"), path, dataset={"invalidRecords": "skip"})
    with pytest.raises(DatasetError, match=r"no usable record; all 3 were invalid, the first: "):
        _prepare(cfg, tmp_path)


def test_reading_stops_at_max_records(tmp_path: Path) -> None:
    model = _model_dir(tmp_path / "model")
    path = write_dataset(tmp_path / "d.jsonl", "text", n=5)
    with path.open("a") as fh:  # a bad line after the first five is never read
        fh.write("not json\n")
    inputs, _ = _prepare(_config(model, path, dataset={"maxRecords": 5}), tmp_path)
    assert len(list(inputs.train.examples())) == 5
    with pytest.raises(DatasetError, match=r"d\.jsonl line 6, column 1: invalid JSON"):
        _prepare(_config(model, path), tmp_path)


def test_a_source_is_streamed_again_rather_than_held(tmp_path: Path) -> None:
    path = write_dataset(tmp_path / "d.jsonl", "alpaca", n=4)
    source = data.check_source(path, "auto").source
    first = list(source.examples())
    # Nothing was kept: a second pass reads the file as it is now.
    write_dataset(path, "alpaca", n=4, seed=1)
    second = list(source.examples())
    assert len(first) == len(second) == 4
    assert first != second


def test_parquet_is_read_in_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "_PARQUET_BATCH_ROWS", 2)
    path = write_dataset(tmp_path / "d.parquet", "prompt_completion", n=5)
    checked = data.check_source(path, "auto", limit=3)
    assert (checked.records, checked.skipped) == (3, 0)
    assert [r.number for r in data.iter_records(path)] == [1, 2, 3, 4, 5]
