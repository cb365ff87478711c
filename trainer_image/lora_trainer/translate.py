"""Pure translations from TrainerConfig to the library objects that train.

Each function takes the validated config (plus the facts about the machine in
`Device`) and returns a transformers / peft / TRL object; none of them touches
the network, the GPU or the filesystem, so they are unit-tested without
training anything.

Packing choice: `packing=True` uses TRL's best-fit-decreasing packing: records
are packed whole (no record is split across rows) into rows of at most
maxSeqLength, and position_ids restart at 0 for each record. TRL batches such
rows padding-free (one joined row); `lora_trainer.collate` keeps them as rows
instead unless the model has flash varlen attention (see there). Either way
attention never crosses records. With `packing=False` each record is its own
row, padded per batch.
"""

# transformers/peft/trl/torch are imported inside the functions that need them:
# the CLI validates the config before paying for those imports.
# ruff: noqa: PLC0415

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_trainer.config import LoraSpec, QuantizationSpec, TrainerConfig
from lora_trainer.errors import TargetModulesNotFound

__all__ = [
    "Device",
    "compute_dtype_name",
    "linear_layer_names",
    "model_load_kwargs",
    "resolve_target_modules",
    "sft_config_kwargs",
    "to_bnb_config",
    "to_lora_config",
    "to_sft_config",
]

# Minimum LR of cosine_with_min_lr, as a fraction of the peak.
MIN_LR_RATE = 0.1
# Checkpoints kept locally (remote retention is handled by checkpoints.py).
LOCAL_CHECKPOINTS_KEPT = 2


@dataclass(frozen=True)
class Device:
    """What the machine can do; `Device.detect()` asks torch."""

    cuda: bool
    bf16: bool = False  # GPU supports bfloat16 (Ampere+)
    name: str = "cpu"

    @classmethod
    def detect(cls) -> Device:
        import torch

        if not torch.cuda.is_available():
            return cls(cuda=False)
        return cls(
            cuda=True, bf16=bool(torch.cuda.is_bf16_supported()), name=torch.cuda.get_device_name()
        )


def compute_dtype_name(q: QuantizationSpec, device: Device) -> str:
    """bfloat16 on a GPU that has it, float16 on older GPUs, float32 on CPU (unless set)."""
    if q.compute_dtype != "auto":
        return q.compute_dtype
    if not device.cuda:
        return "float32"
    return "bfloat16" if device.bf16 else "float16"


def to_bnb_config(q: QuantizationSpec, device: Device) -> Any | None:
    """BitsAndBytesConfig for nf4/fp4/int8, None for `mode: none`."""
    if q.mode == "none":
        return None
    import torch
    from transformers import BitsAndBytesConfig

    if q.mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)  # type: ignore[no-untyped-call]
    return BitsAndBytesConfig(  # type: ignore[no-untyped-call]
        load_in_4bit=True,
        bnb_4bit_quant_type=q.mode,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, compute_dtype_name(q, device)),
        bnb_4bit_quant_storage=torch.uint8,
    )


def model_load_kwargs(cfg: TrainerConfig, device: Device) -> dict[str, Any]:
    """Keyword arguments for AutoModelForCausalLM.from_pretrained."""
    import torch

    dtype = getattr(torch, compute_dtype_name(cfg.quantization, device))
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "trust_remote_code": cfg.model.trust_remote_code,
        # sdpa keeps packed records apart through position_ids (lora_trainer.collate).
        "attn_implementation": "sdpa",
        "low_cpu_mem_usage": True,
    }
    bnb = to_bnb_config(cfg.quantization, device)
    if bnb is not None:
        kwargs["quantization_config"] = bnb
    if device.cuda:
        kwargs["device_map"] = {"": 0}
    return kwargs


def linear_layer_names(model: Any) -> list[str]:
    """Distinct last-name components of every linear layer, output head excluded."""
    import torch

    linear_types: tuple[type, ...] = (torch.nn.Linear,)
    try:
        import bitsandbytes as bnb

        linear_types += (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)  # type: ignore[attr-defined]
    except ImportError:  # pragma: no cover - bitsandbytes is in the image
        pass
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, linear_types) and module is not output
    }
    return sorted(names)


def resolve_target_modules(lora: LoraSpec, available: Iterable[str]) -> str | list[str]:
    """The configured target modules, checked against the model's linear layers."""
    if isinstance(lora.target_modules, str):
        return lora.target_modules
    have = set(available)
    missing = [m for m in lora.target_modules if m.rsplit(".", 1)[-1] not in have]
    if missing:
        raise TargetModulesNotFound(
            f"lora.targetModules {missing} match no linear layer of this model; "
            f"its linear layers are: {', '.join(sorted(have))}",
            hint='Use names from that list, or "all-linear".',
        )
    return list(lora.target_modules)


def to_lora_config(lora: LoraSpec, target_modules: str | list[str]) -> Any:
    from peft import LoraConfig, TaskType

    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=target_modules,
        use_rslora=lora.use_rslora,
        use_dora=lora.use_dora,
        modules_to_save=list(lora.modules_to_save) if lora.modules_to_save else None,
        bias="none",
        task_type=TaskType.CAUSAL_LM,
    )


def to_sft_config(
    cfg: TrainerConfig,
    device: Device,
    output_dir: Path,
    *,
    has_eval: bool,
) -> Any:
    """SFTConfig for this job; `output_dir` is the local checkpoint directory."""
    from trl.trainer.sft_config import SFTConfig

    return SFTConfig(**sft_config_kwargs(cfg, device, output_dir, has_eval=has_eval))


def sft_config_kwargs(
    cfg: TrainerConfig,
    device: Device,
    output_dir: Path,
    *,
    has_eval: bool,
) -> dict[str, Any]:
    """The SFTConfig arguments (SFTConfig itself checks them against this machine's GPU)."""
    t = cfg.training
    dtype = compute_dtype_name(cfg.quantization, device)
    eval_strategy = "steps" if has_eval and t.eval_every_steps else "no"
    scheduler_kwargs = {"min_lr_rate": MIN_LR_RATE} if t.scheduler == "cosine_with_min_lr" else {}
    return dict(  # noqa: C408 - mirrors the SFTConfig call it feeds
        output_dir=str(output_dir),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps if t.max_steps is not None else -1,
        learning_rate=t.learning_rate,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        max_length=t.max_seq_length,
        packing=t.packing,
        packing_strategy="bfd",
        # Without packing, rows are padded per batch (not to maxSeqLength).
        padding_free=False,
        completion_only_loss=t.completion_only_loss,
        activation_checkpointing=t.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False}
        if t.gradient_checkpointing
        else None,
        optim=t.optimizer,
        lr_scheduler_type=t.scheduler,
        lr_scheduler_kwargs=scheduler_kwargs,
        warmup_steps=t.warmup_ratio,  # a float in [0, 1) is a ratio of total steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=t.checkpoint_every_steps,
        save_total_limit=LOCAL_CHECKPOINTS_KEPT,
        eval_strategy=eval_strategy,
        eval_steps=t.eval_every_steps if eval_strategy == "steps" else None,
        bf16=device.cuda and dtype == "bfloat16",
        fp16=device.cuda and dtype == "float16",
        use_cpu=not device.cuda,
        include_num_input_tokens_seen="non_padding",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        # Tokenized by data.py; TRL only builds labels, truncates and packs.
        dataset_num_proc=None,
    )
