"""Every quantization mode and adapter switch trains (in-process, a few steps each),
and packed rows keep attention inside each record."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from lora_trainer.inputs import prepare_inputs
from lora_trainer.progress import ProgressBoard
from lora_trainer.signals import StopRequest
from lora_trainer.storage import Storage
from lora_trainer.train import Runtime, run
from loraops_contract.config import TrainerConfig
from transformers import AutoModelForCausalLM
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from devcluster.tiny_model import write_dataset

VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "int8": ("alpaca", {"quantization": {"mode": "int8"}}),
    "no-quantization": ("text", {"quantization": {"mode": "none"}}),
    "fp4-messages": ("messages", {"quantization": {"mode": "fp4", "doubleQuant": False}}),
    "dora-rslora-listed-targets": (
        "prompt_completion",
        {"lora": {"useDora": True, "useRslora": True, "targetModules": ["q_proj", "v_proj"]}},
    ),
    "no-packing-checkpointing-eval-steps": (
        "alpaca",
        {"training": {"packing": False, "gradientCheckpointing": True, "evalEverySteps": 1}},
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_trains(name: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    fmt, overrides = VARIANTS[name]
    data = write_dataset(tmp_path / "train.jsonl", fmt, n=32)  # type: ignore[arg-type]
    training = {"maxSteps": 3, "batchSize": 2, "maxSeqLength": 96, "gradientCheckpointing": False}
    training |= overrides.get("training", {})
    cfg = TrainerConfig.model_validate(
        {
            "model": {"uri": str(tiny_model_dir)},
            "dataset": {"uri": str(data), "evalSplit": 0.1},
            "output": {"uri": str(tmp_path / "out")},
            **{k: v for k, v in overrides.items() if k != "training"},
            "training": training,
        }
    )
    board = ProgressBoard()
    storage = Storage(tmp_path / "cache", {})
    inputs = prepare_inputs(cfg, storage, board)
    msg = run(cfg, inputs, Runtime(tmp_path / "work", storage, board, StopRequest()))
    assert msg.outcome == "Succeeded"
    assert msg.steps == 3
    assert msg.train_loss is not None
    assert msg.eval_loss is not None
    assert (tmp_path / "out" / "manifest.json").exists()
    assert board.snapshot().stage == "done"


def test_packed_rows_do_not_attend_across_records(tiny_model_dir: Path) -> None:
    """The padding-free collator + sdpa give each packed record exactly its solo logits."""
    model = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa"
    ).eval()  # type: ignore[no-untyped-call]
    first, second = [5, 17, 42, 9, 33], [8, 61, 12, 90]
    collator = DataCollatorForLanguageModeling(pad_token_id=1, padding_free=True)
    packed = collator([{"input_ids": first + second, "seq_lengths": [len(first), len(second)]}])
    with torch.no_grad():
        # use_cache=False as in training (SFTTrainer.compute_loss sets it): with a KV
        # cache, transformers does not derive the per-record mask from position_ids.
        packed_logits = model(
            input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False
        ).logits[0]
        solo_second = model(input_ids=torch.tensor([second])).logits[0]
        # Control: the same row without restarting positions would mix the records.
        mixed = model(input_ids=packed["input_ids"]).logits[0]
    torch.testing.assert_close(packed_logits[len(first) :], solo_second, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(mixed[len(first) :], solo_second, atol=1e-3)
