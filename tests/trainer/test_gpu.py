"""GPU smoke test: QLoRA with bf16 compute on CUDA through the real CLI (skipped without CUDA)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from loraops_contract.protocol import ExitCode

from devcluster.tiny_model import write_dataset
from tests.trainer.trainer_proc import reaped, start_trainer

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


def test_qlora_on_cuda(tiny_model_dir: Path, tmp_path: Path) -> None:
    import torch  # noqa: PLC0415 - only where the test runs

    assert torch.cuda.is_available()
    data = write_dataset(tmp_path / "train.jsonl", "messages", n=64)
    config = {
        "model": {"uri": str(tiny_model_dir)},
        "dataset": {"uri": str(data)},
        "quantization": {"mode": "nf4"},  # computeDtype auto -> bfloat16 on Ampere+
        "training": {"maxSteps": 6, "batchSize": 4, "maxSeqLength": 128, "learningRate": 5e-3},
        "output": {"uri": str(tmp_path / "out"), "mergedModel": True},
    }
    run = start_trainer([], {"LORA_TRAINER_CONFIG": json.dumps(config)}, tmp_path / "work")
    with reaped(run):
        rc, log, term = run.finish(timeout=600)
    assert rc == ExitCode.OK, log[-4000:]
    assert term is not None
    assert term["steps"] == 6
    assert "device: cpu" not in log
    assert (tmp_path / "out" / "manifest.json").exists()
    assert (tmp_path / "out" / "merged" / "config.json").exists()
