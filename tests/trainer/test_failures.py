"""Bad inputs end the trainer with the documented exit code, reason, message and hint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from loraops_contract.protocol import ExitCode

from devcluster.s3 import S3Server
from devcluster.tiny_model import make_records, write_dataset
from tests.trainer.trainer_proc import reaped, start_trainer

pytestmark = pytest.mark.slow


def _config(model: str, data: str, out: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": {"uri": model},
        "dataset": {"uri": data},
        "training": {"maxSteps": 2, "batchSize": 2, "maxSeqLength": 64},
        "output": {"uri": out},
        **extra,
    }


def _run(
    config: dict[str, Any], env: dict[str, str], work: Path
) -> tuple[int, str, dict[str, Any]]:
    run = start_trainer([], {**env, "LORA_TRAINER_CONFIG": json.dumps(config)}, work)
    with reaped(run):
        rc, log, term = run.finish(timeout=180)
    assert term is not None, log[-3000:]
    return rc, log, term


def test_bad_record_is_quoted_by_number(tiny_model_dir: Path, tmp_path: Path) -> None:
    rows = make_records("alpaca", 6)
    rows[4] = {"instruction": "Answer.", "input": "q"}  # no output
    data = write_dataset(tmp_path / "bad.jsonl", "alpaca", records=rows)
    rc, _, term = _run(_config(str(tiny_model_dir), str(data), str(tmp_path / "out")), {}, tmp_path)
    assert rc == ExitCode.INVALID_DATASET
    assert term["reason"] == "InvalidDataset"
    assert term["retryable"] is False
    assert "bad.jsonl record 5: alpaca format needs 'output'" in term["message"]
    assert term["hint"]
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_unknown_target_modules_list_the_models_layers(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    data = write_dataset(tmp_path / "d.jsonl", "text", n=8)
    config = _config(
        str(tiny_model_dir), str(data), str(tmp_path / "out"), lora={"targetModules": ["c_attn"]}
    )
    rc, _, term = _run(config, {}, tmp_path)
    assert rc == ExitCode.TARGET_MODULES_NOT_FOUND
    assert term["reason"] == "TargetModulesNotFound"
    for layer in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert layer in term["message"]
    assert "lm_head" not in term["message"]


def test_wrong_s3_credentials(s3: S3Server, tmp_path: Path) -> None:
    env = {**s3.env(), "AWS_SECRET_ACCESS_KEY": "wrong-secret-abcdef"}
    config = _config("s3://models/anything", "s3://data/x.jsonl", "s3://out/failures/creds")
    rc, log, term = _run(config, env, tmp_path)
    assert rc == ExitCode.CREDENTIALS
    assert term["reason"] == "CredentialsError"
    assert term["retryable"] is False
    assert "credentialsSecret" in term["hint"]
    assert "wrong-secret-abcdef" not in log + json.dumps(term)


def test_missing_sources(s3: S3Server, tmp_path: Path) -> None:
    config = _config("s3://models/no-such-model", "s3://data/nope.jsonl", "s3://out/failures/x")
    rc, _, term = _run(config, s3.env(), tmp_path)
    assert rc == ExitCode.SOURCE_NOT_FOUND
    assert term["reason"] == "SourceNotFound"
    assert term["message"].startswith("dataset.uri: s3://data/nope.jsonl not found")

    s3.client().put_object(Bucket="data", Key="failures/ok.jsonl", Body=b'{"text": "hi"}\n')
    config = _config(
        "s3://models/no-such-model", "s3://data/failures/ok.jsonl", "s3://out/failures/x"
    )
    rc, _, term = _run(config, s3.env(), tmp_path)
    assert rc == ExitCode.SOURCE_NOT_FOUND
    assert term["message"].startswith("model.uri: s3://models/no-such-model not found")


def test_model_without_tokenizer_files_is_a_permanent_source_error(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    model = tmp_path / "model"
    model.mkdir()
    for f in tiny_model_dir.iterdir():
        if "token" not in f.name and "chat_template" not in f.name:
            (model / f.name).write_bytes(f.read_bytes())
    data = write_dataset(tmp_path / "d.jsonl", "text", n=8)
    rc, log, term = _run(_config(str(model), str(data), str(tmp_path / "out")), {}, tmp_path)
    assert rc == ExitCode.SOURCE_NOT_FOUND, log[-3000:]
    assert term["reason"] == "SourceNotFound"
    assert term["retryable"] is False
    assert term["message"].startswith(f"model.uri {model} holds no tokenizer: none of ")
    assert "tokenizer.json" in term["message"]
    assert "trainer bug" not in (term.get("hint") or "")
