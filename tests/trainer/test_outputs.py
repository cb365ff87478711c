"""What a finished job leaves: files any user can read, an adapter that names where its
base model comes from, one final evaluation in metrics.json; and torch threads that fit
the pod's CPU limit."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from lora_trainer.cli import cpu_threads
from lora_trainer.inputs import prepare_inputs
from lora_trainer.progress import ProgressBoard
from lora_trainer.publish import name_base_model
from lora_trainer.signals import StopRequest
from lora_trainer.storage import Storage
from lora_trainer.train import Runtime, one_per_step, run
from loraops_contract.config import TrainerConfig
from loraops_contract.protocol import ENV_CPU_LIMIT
from peft import AutoPeftModelForCausalLM

from devcluster.tiny_model import make_records, write_dataset


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.usefixtures("umask_022")
def test_local_outputs_get_the_mode_new_files_get(tmp_path: Path) -> None:
    src = tmp_path / "adapter_model.safetensors"
    src.write_bytes(b"weights")
    storage = Storage(tmp_path / "cache", {})
    out = tmp_path / "pvc" / "adapter"
    storage.put_file(src, f"{out}/adapter_model.safetensors")
    storage.put_bytes(b"{}", f"{out}/manifest.json")
    assert _mode(out / "adapter_model.safetensors") == 0o644
    assert _mode(out / "manifest.json") == 0o644
    # The umask is honoured, not a fixed mode.
    os.umask(0o027)
    storage.put_bytes(b"{}", f"{out}/manifest.json")
    assert _mode(out / "manifest.json") == 0o640


def _adapter_dir(tmp_path: Path) -> Path:
    # What save_pretrained writes in the pod: the path the base model was loaded from.
    config = {"base_model_name_or_path": "/scratch/cache/s3/llama-abc/files", "r": 8}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    return tmp_path


@pytest.mark.parametrize(
    ("model_uri", "base", "revision"),
    [
        ("hf://meta-llama/Llama-3.2-1B", "meta-llama/Llama-3.2-1B", None),
        ("hf://meta-llama/Llama-3.2-1B@v1.1", "meta-llama/Llama-3.2-1B", "v1.1"),
        ("s3://models/llama-3-8b", "s3://models/llama-3-8b", None),
        ("/models/llama-3-8b", "/models/llama-3-8b", None),
    ],
)
def test_adapter_config_names_the_models_source(
    tmp_path: Path, model_uri: str, base: str, revision: str | None
) -> None:
    adapter = _adapter_dir(tmp_path)
    name_base_model(adapter, model_uri)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == base
    assert config.get("revision") == revision
    assert config["r"] == 8  # the rest as PEFT wrote it


def test_eval_history_has_one_entry_per_step() -> None:
    # An evaluation every 4 steps of 8, then the final one: step 8 was logged twice.
    logged = [(4, 2.5), (8, 2.0), (8, 2.0)]
    assert one_per_step(logged) == [(4, 2.5), (8, 2.0)]
    assert one_per_step([]) == []


@pytest.mark.parametrize(
    ("millicores", "threads"),
    [("4000", 4), ("1500", 1), ("500", 1), ("64000", 64), ("0", None), ("", None), ("x", None)],
)
def test_torch_threads_follow_the_cpu_limit(millicores: str, threads: int | None) -> None:
    assert cpu_threads({ENV_CPU_LIMIT: millicores}) == threads
    assert cpu_threads({}) is None


@pytest.mark.slow
@pytest.mark.usefixtures("umask_022")
def test_a_finished_job_leaves_a_clean_readable_portable_adapter(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """One real run (a few steps on the tiny model) to a local output: no checkpoint left
    by default, files 0644, the adapter names its base model's source and loads from it
    with nothing else, one final evaluation, the skipped record counted, the threads."""
    rows = make_records("messages", 24)
    rows[5] = {"messages": [rows[5]["messages"][0]]}  # no assistant turn
    data = write_dataset(tmp_path / "chat.jsonl", "messages", records=rows)
    out = tmp_path / "out"
    cfg = TrainerConfig.model_validate(
        {
            "model": {"uri": str(tiny_model_dir)},
            "dataset": {"uri": str(data), "evalSplit": 0.2, "invalidRecords": "skip"},
            "quantization": {"mode": "none"},
            "training": {
                "maxSteps": 4,
                "batchSize": 2,
                "maxSeqLength": 96,
                "checkpointEverySteps": 2,
                "evalEverySteps": 2,
                "gradientCheckpointing": False,
            },
            "output": {"uri": str(out)},
        }
    )
    board = ProgressBoard()
    storage = Storage(tmp_path / "cache", {})
    inputs = prepare_inputs(cfg, storage, board)
    threads = torch.get_num_threads()
    try:
        rt = Runtime(tmp_path / "work", storage, board, StopRequest(), cpu_threads=1)
        msg = run(cfg, inputs, rt)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)

    assert msg.outcome == "Succeeded"
    assert msg.skipped_records == 1
    assert msg.last_checkpoint is None  # deleted with the checkpoints
    assert not (out / "checkpoints").exists()
    assert (out / "manifest.json").is_file()
    files = [p for p in out.rglob("*") if p.is_file()]
    assert files
    assert {p.name: _mode(p) for p in files} == {p.name: 0o644 for p in files}
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model_dir)
    metrics = json.loads((out / "metrics.json").read_text())
    assert [step for step, _ in metrics["eval_history"]] == [2, 4]
    assert metrics["eval_history"][-1][1] == pytest.approx(metrics["eval_loss"])
    assert metrics["skipped_records"] == 1
    # The adapter alone is enough to load base model + adapter.
    model = AutoPeftModelForCausalLM.from_pretrained(out)
    assert model.peft_config["default"].base_model_name_or_path == str(tiny_model_dir)
