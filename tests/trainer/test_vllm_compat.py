"""The vLLM verdict on an adapter's saved files: vLLM's own refusals (DoRA,
modules_to_save, bias, rank above --max-lora-rank, layers it has no LoRA for, dtypes it
cannot cast) give "no" with the reason; a plain adapter gives "yes" with the flags."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from lora_trainer.vllm_compat import MAX_LORA_RANKS, check_adapter
from safetensors.torch import save_file

LLAMA = "LlamaForCausalLM"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _adapter(tmp_path: Path, dtype: torch.dtype = torch.float32, **config: Any) -> Path:
    cfg: dict[str, Any] = {
        "peft_type": "LORA",
        "r": 8,
        "lora_alpha": 16,
        "target_modules": TARGETS,
        "bias": "none",
        "modules_to_save": None,
        "use_dora": False,
        "init_lora_weights": True,
    } | config
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    rank = int(cfg["r"])
    weights = {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(
            rank, 4, dtype=dtype
        ),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(
            4, rank, dtype=dtype
        ),
    }
    save_file(weights, str(tmp_path / "adapter_model.safetensors"))
    return tmp_path


def test_a_plain_adapter_loads(tmp_path: Path) -> None:
    check = check_adapter(_adapter(tmp_path), LLAMA)
    assert check.loads
    assert check.max_lora_rank == 8
    summary = check.summary()
    assert summary.startswith("loads in vLLM: yes, plain LoRA, rank 8 on ")
    assert "F32 weights" in summary
    assert "serve with --enable-lora" in summary
    assert "--max-lora-rank" not in summary  # vLLM's default (16) fits rank 8


@pytest.mark.parametrize(("rank", "flag"), [(16, None), (17, 32), (64, 64), (300, 320), (512, 512)])
def test_the_rank_picks_the_smallest_max_lora_rank_that_fits(
    tmp_path: Path, rank: int, flag: int | None
) -> None:
    check = check_adapter(_adapter(tmp_path, r=rank), LLAMA)
    assert check.loads
    assert check.max_lora_rank == (flag or 16)
    assert check.max_lora_rank in MAX_LORA_RANKS
    assert (f"--max-lora-rank {flag}" in check.reason) == (flag is not None)


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        ({"use_dora": True}, "vLLM does not yet support DoRA"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save ['lm_head']"),
        ({"bias": "all"}, "does not support adapter bias"),
        ({"r": 1024}, "rank 1024 is above vLLM's largest --max-lora-rank 512"),
        ({"r": 8, "rank_pattern": {"q_proj": 1024}}, "rank 1024"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa'"),
        ({"target_modules": ["q_proj", "rotary_emb"]}, "['rotary_emb'] are not LoRA layers"),
        ({"peft_type": "IA3"}, "peft_type IA3 is not LORA"),
    ],
)
def test_what_vllm_refuses_is_a_no_with_the_reason(
    tmp_path: Path, config: dict[str, Any], reason: str
) -> None:
    check = check_adapter(_adapter(tmp_path, **config), LLAMA)
    assert not check.loads
    assert check.summary().startswith("loads in vLLM: no, ")
    assert reason in check.reason


def test_a_classifier_head_is_the_one_module_to_save_vllm_takes(tmp_path: Path) -> None:
    assert check_adapter(_adapter(tmp_path, modules_to_save=["score"]), LLAMA).loads


def test_non_float_weights_do_not_load(tmp_path: Path) -> None:
    check = check_adapter(_adapter(tmp_path, dtype=torch.int8), LLAMA)
    assert not check.loads
    assert "['I8']" in check.reason


def test_bf16_weights_load(tmp_path: Path) -> None:
    check = check_adapter(_adapter(tmp_path, dtype=torch.bfloat16), LLAMA)
    assert check.loads
    assert "BF16 weights" in check.reason


def test_an_architecture_outside_the_table_is_not_guessed(tmp_path: Path) -> None:
    check = check_adapter(_adapter(tmp_path, target_modules=["c_attn"]), "GPT2LMHeadModel")
    assert check.loads  # nothing vLLM refuses for every model
    assert "target modules not checked (GPT2LMHeadModel is not in the table)" in check.reason


def test_phi3_takes_its_fused_projections(tmp_path: Path) -> None:
    fused = _adapter(tmp_path, target_modules=["qkv_proj", "gate_up_proj"])
    assert check_adapter(fused, "Phi3ForCausalLM").loads
    assert not check_adapter(fused, LLAMA).loads


def test_full_module_paths_are_checked_and_named_by_their_layer(tmp_path: Path) -> None:
    # PEFT saves all-linear on some models as full paths; vLLM matches the last part.
    paths = [f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")]
    check = check_adapter(_adapter(tmp_path, target_modules=paths), LLAMA)
    assert check.loads
    assert "rank 8 on q_proj, v_proj," in check.reason
    bad = check_adapter(_adapter(tmp_path, target_modules=["model.layers.0.mlp.act_fn"]), LLAMA)
    assert "['act_fn'] are not LoRA layers" in bad.reason
