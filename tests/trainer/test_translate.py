"""hf.py's translators: config -> BitsAndBytesConfig / LoraConfig / SFTConfig, without training."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from lora_trainer.errors import TargetModulesNotFound
from lora_trainer.hf import (
    Device,
    compute_dtype_name,
    has_fast_bf16,
    linear_layer_names,
    model_load_kwargs,
    resolve_target_modules,
    sft_config_kwargs,
    to_bnb_config,
    to_lora_config,
    to_sft_config,
)
from loraops_contract.config import LoraSpec, QuantizationSpec, TrainerConfig
from loraops_contract.protocol import ExitCode

CPU = Device(cuda=False)
AMPERE = Device(cuda=True, bf16=True, name="A100")
TURING = Device(cuda=True, bf16=False, name="T4")


def _cfg(**overrides: Any) -> TrainerConfig:
    base: dict[str, Any] = {
        "model": {"uri": "s3://models/m"},
        "dataset": {"uri": "s3://data/d.jsonl"},
        "output": {"uri": "s3://out/o"},
    }
    base.update(overrides)
    return TrainerConfig.model_validate(base)


@pytest.mark.parametrize(
    ("setting", "device", "expected"),
    [
        ("auto", CPU, "float32"),
        ("auto", AMPERE, "bfloat16"),
        ("auto", TURING, "float16"),
        ("float32", AMPERE, "float32"),
    ],
)
def test_compute_dtype(setting: Any, device: Device, expected: str) -> None:
    assert compute_dtype_name(QuantizationSpec(compute_dtype=setting), device) == expected


@pytest.mark.parametrize(
    ("capability", "expected"),
    [((8, 0), True), ((9, 0), True), ((12, 0), True), ((7, 5), False), ((6, 0), False)],
)
def test_fast_bf16_is_ampere_or_newer(capability: tuple[int, int], expected: bool) -> None:
    assert has_fast_bf16(capability) is expected


def test_cpu_auto_is_float32_and_bfloat16_on_a_cpu_autocasts(tmp_path: Path) -> None:
    # auto: float32 on a CPU, measured faster than bfloat16 autocast even with
    # AVX512-BF16 (bench/README.md, "Dtype").
    assert to_sft_config(_cfg(), CPU, tmp_path, has_eval=False).bf16 is False
    assert model_load_kwargs(_cfg(), CPU)["dtype"] == torch.float32
    bf16 = _cfg(quantization={"computeDtype": "bfloat16"})
    sft = to_sft_config(bf16, CPU, tmp_path, has_eval=False)
    assert sft.bf16 is True  # accelerate autocasts to bfloat16 on the CPU
    assert sft.fp16 is False
    assert sft.use_cpu is True
    bnb = to_bnb_config(bf16.quantization, CPU)
    assert bnb is not None
    assert bnb.bnb_4bit_compute_dtype == torch.bfloat16
    assert model_load_kwargs(bf16, CPU)["dtype"] == torch.bfloat16


def test_nf4_default_is_qlora() -> None:
    bnb = to_bnb_config(QuantizationSpec(), AMPERE)
    assert bnb is not None
    assert bnb.load_in_4bit
    assert not bnb.load_in_8bit
    assert bnb.bnb_4bit_quant_type == "nf4"
    assert bnb.bnb_4bit_use_double_quant is True
    assert bnb.bnb_4bit_compute_dtype == torch.bfloat16


def test_other_quantization_modes() -> None:
    assert to_bnb_config(QuantizationSpec(mode="none"), CPU) is None
    int8 = to_bnb_config(QuantizationSpec(mode="int8"), CPU)
    assert int8 is not None
    assert int8.load_in_8bit
    assert not int8.load_in_4bit
    fp4 = to_bnb_config(QuantizationSpec(mode="fp4", double_quant=False), CPU)
    assert fp4 is not None
    assert fp4.bnb_4bit_quant_type == "fp4"
    assert fp4.bnb_4bit_use_double_quant is False
    assert fp4.bnb_4bit_compute_dtype == torch.float32


def test_model_load_kwargs() -> None:
    gpu = model_load_kwargs(_cfg(), AMPERE)
    assert gpu["dtype"] == torch.bfloat16
    assert gpu["device_map"] == {"": 0}
    assert gpu["attn_implementation"] == "sdpa"
    assert "quantization_config" in gpu
    cpu = model_load_kwargs(_cfg(quantization={"mode": "none"}), CPU)
    assert cpu["dtype"] == torch.float32
    assert "device_map" not in cpu
    assert "quantization_config" not in cpu


def test_lora_config() -> None:
    spec = LoraSpec(
        r=8, alpha=16, dropout=0.1, use_rslora=True, use_dora=True, modules_to_save=["lm_head"]
    )
    lc = to_lora_config(spec, "all-linear")
    assert (lc.r, lc.lora_alpha, lc.lora_dropout) == (8, 16, 0.1)
    assert lc.target_modules == "all-linear"
    assert lc.use_rslora
    assert lc.use_dora
    assert lc.modules_to_save == ["lm_head"]
    assert lc.task_type == "CAUSAL_LM"
    assert to_lora_config(LoraSpec(), ["q_proj"]).target_modules == {"q_proj"}


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = torch.nn.Linear(4, 4)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(4, 4))
        self.lm_head = torch.nn.Linear(4, 10)

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.lm_head


def test_linear_layer_names_exclude_the_head() -> None:
    assert linear_layer_names(_Tiny()) == ["0", "q_proj"]


def test_unknown_target_modules_list_what_exists() -> None:
    spec = LoraSpec(target_modules=["q_proj", "query_key_value"])
    with pytest.raises(TargetModulesNotFound) as err:
        resolve_target_modules(spec, ["q_proj", "v_proj", "down_proj"])
    msg = str(err.value)
    assert "['query_key_value']" in msg
    assert "down_proj, q_proj, v_proj" in msg
    assert err.value.exit_code == ExitCode.TARGET_MODULES_NOT_FOUND
    assert resolve_target_modules(LoraSpec(target_modules=["model.layers.0.q_proj"]), ["q_proj"])
    assert resolve_target_modules(LoraSpec(), []) == "all-linear"


def test_sft_config_defaults_follow_the_recipe(tmp_path: Path) -> None:
    # SFTConfig refuses bf16 on a machine without such a GPU, so check the arguments.
    sft = SimpleNamespace(**sft_config_kwargs(_cfg(), AMPERE, tmp_path, has_eval=True))
    assert sft.learning_rate == 2e-4
    assert sft.max_steps == -1
    assert sft.num_train_epochs == 1.0
    assert sft.packing is True
    assert sft.packing_strategy == "bfd"
    assert sft.max_length == 1024
    assert sft.completion_only_loss is True
    assert sft.bf16 is True
    assert sft.fp16 is False
    assert sft.save_strategy == "steps"
    assert sft.save_steps == 50
    assert sft.eval_strategy == "no"  # evaluated once at the end
    assert sft.activation_checkpointing is True
    assert sft.activation_checkpointing_kwargs == {"use_reentrant": False}
    assert sft.report_to == "none"
    assert sft.include_num_input_tokens_seen == "non_padding"
    assert sft.output_dir == str(tmp_path)


def test_sft_config_overrides(tmp_path: Path) -> None:
    cfg = _cfg(
        training={
            "maxSteps": 7,
            "learningRate": 1e-3,
            "batchSize": 2,
            "gradientAccumulationSteps": 8,
            "maxSeqLength": 256,
            "packing": False,
            "gradientCheckpointing": False,
            "optimizer": "paged_adamw_8bit",
            "scheduler": "cosine_with_min_lr",
            "warmupRatio": 0.1,
            "seed": 3,
            "checkpointEverySteps": 5,
            "evalEverySteps": 2,
        }
    )
    sft = to_sft_config(cfg, CPU, tmp_path, has_eval=True)
    assert sft.max_steps == 7
    assert sft.per_device_train_batch_size == 2
    assert sft.gradient_accumulation_steps == 8
    assert sft.max_length == 256
    assert sft.packing is False
    assert sft.optim == "paged_adamw_8bit"
    assert sft.lr_scheduler_type == "cosine_with_min_lr"
    assert sft.lr_scheduler_kwargs == {"min_lr_rate": 0.1}
    assert sft.warmup_steps == 0.1
    assert sft.seed == 3
    assert sft.data_seed == 3
    assert sft.save_steps == 5
    assert sft.eval_strategy == "steps"
    assert sft.eval_steps == 2
    assert sft.bf16 is False
    assert sft.fp16 is False
    assert sft.use_cpu is True
    assert sft.gradient_checkpointing is False
    assert to_sft_config(cfg, CPU, tmp_path, has_eval=False).eval_strategy == "no"
