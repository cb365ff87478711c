"""bitsandbytes' CPU inference layout must not leak into training.

On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a 4-bit layer's weight for an
inference kernel on its first eval-mode forward without grad, and that kernel has no
backward: after one evaluation (the trainer evaluates the base model before training),
every LoRA layer below the last got a wrong gradient. `hf.load_model` switches the repack
off; these tests hold it to that, and fail if a bitsandbytes upgrade changes the switch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from lora_trainer.hf import Device, load_model
from loraops_contract.config import TrainerConfig
from peft import get_peft_model

bnb = pytest.importorskip("bitsandbytes")


def _config(model_dir: Path, tmp_path: Path) -> TrainerConfig:
    return TrainerConfig.model_validate(
        {
            "model": {"uri": str(model_dir)},
            "dataset": {"uri": str(tmp_path / "unused.jsonl")},
            "output": {"uri": str(tmp_path / "out")},
        }
    )


def _lora_grads(model_dir: Path, tmp_path: Path, *, evaluate_first: bool) -> dict[str, Any]:
    cfg = _config(model_dir, tmp_path)
    model, lora = load_model(cfg, model_dir, Device(cuda=False))
    torch.manual_seed(0)
    lora.init_lora_weights = False  # non-zero B: gradients reach every layer's A
    peft_model = get_peft_model(model, lora)
    ids = torch.randint(5, 200, (2, 24), generator=torch.Generator().manual_seed(1))
    if evaluate_first:
        peft_model.eval()
        with torch.no_grad():
            peft_model(input_ids=ids)
    peft_model.train()
    peft_model(input_ids=ids, labels=ids).loss.backward()
    return {
        name: p.grad.clone()
        for name, p in peft_model.named_parameters()
        if p.requires_grad and p.grad is not None
    }


def test_loaded_4bit_layers_never_switch_to_the_inference_layout(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    model, _ = load_model(_config(tiny_model_dir, tmp_path), tiny_model_dir, Device(cuda=False))
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers
    # The attribute bitsandbytes reads in Linear4bit.forward; if it is renamed, this fails
    # and the switch in hf.keep_4bit_layout_for_training must follow it.
    assert all(layer.support_avx512bf16_for_cpu is False for layer in layers)


def test_an_evaluation_before_training_leaves_the_gradients_unchanged(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    fresh = _lora_grads(tiny_model_dir, tmp_path, evaluate_first=False)
    after_eval = _lora_grads(tiny_model_dir, tmp_path, evaluate_first=True)
    assert fresh.keys() == after_eval.keys()
    first_layer = [name for name in fresh if ".layers.0." in name]
    assert first_layer, sorted(fresh)
    for name in fresh:
        assert torch.allclose(fresh[name], after_eval[name], rtol=1e-5, atol=1e-7), name
