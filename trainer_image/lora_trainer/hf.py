"""Everything that touches the Hugging Face training stack (transformers, peft, TRL,
datasets, bitsandbytes): a TRL or PEFT upgrade is checked against this module alone.

Four parts, each with the library behaviour it relies on written next to it:

1. Translators: TrainerConfig (+ the machine's `Device`) -> BitsAndBytesConfig,
   from_pretrained kwargs, LoraConfig, SFTConfig. Pure: no network, GPU or
   filesystem, so they are unit-tested without training anything.
2. Data: tokenized rows (lora_trainer.data) -> the `datasets.Dataset` SFTTrainer takes.
3. The trainer: model and tokenizer loading, SFTTrainer with the packed-row collator
   and adapter dtypes a resume does not change, loading a finished checkpoint, merging,
   and the base model beside the adapter (evaluation, greedy answers).
4. Process-wide settings (threads, progress bars, freeing accelerator memory).

Packing: `packing=True` uses TRL's best-fit-decreasing packing: records are packed
whole (no record is split across rows) into rows of at most maxSeqLength, and
position_ids restart at 0 for each record. TRL batches such rows padding-free (one
joined row); `PackedRowsCollator` keeps them as rows instead unless the model has
flash varlen attention (see there). Either way attention never crosses records.
With `packing=False` each record is its own row, padded per batch.

Adapter dtypes (TRL 1.16, peft 0.21):

- peft's `get_peft_model` (autocast_adapter_dtype=True) creates LoRA weights in the
  base layer's dtype and upcasts float16/bfloat16 ones to float32. Unquantized
  models (`quantization.mode: none`) therefore train float32 adapters.
- SFTTrainer then casts every trainable parameter of a quantized model to bfloat16
  (QLoRA recipe), whatever the compute dtype, except DoRA magnitude vectors, which
  stay float32. nf4/fp4/int8 runs therefore train and publish bfloat16 adapters.
- `prepare_model_for_kbit_training` is not called (neither here nor by TRL).

On resume, `Trainer.train(resume_from_checkpoint=...)` reloads the checkpoint's
adapter through peft's `load_adapter`, whose autocast_adapter_dtype upcasts it to
float32 again: without a correction a resumed QLoRA run trains the rest of its steps
in float32 and publishes an adapter twice the size of a fresh run's.
`DtypeKeepingTrainer` corrects that (see there).
"""

from __future__ import annotations

import gc
import hashlib
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa  # type: ignore[import-untyped]
import safetensors.torch
import torch
import transformers
from datasets import Dataset, disable_progress_bars
from datasets.table import InMemoryTable
from loraops_contract.config import LoraSpec, QuantizationSpec, TrainerConfig
from peft import LoraConfig, PeftModel, TaskType, set_peft_model_state_dict
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PrinterCallback,
    TrainerCallback,
    TrainerState,
)
from transformers.utils.generic import is_flash_attention_requested
from trl.trainer.sft_config import SFTConfig
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling, SFTTrainer

from lora_trainer.checkpoints import TRAINER_STATE_FILE
from lora_trainer.data import TokenizedData
from lora_trainer.distributed import Strategy
from lora_trainer.errors import ConfigError, SourceNotFound, TargetModulesNotFound, shorten
from lora_trainer.publish import ADAPTER_WEIGHTS

__all__ = [
    "Device",
    "DtypeKeepingTrainer",
    "FinishedState",
    "PackedRowsCollator",
    "build_trainer",
    "compute_dtype_name",
    "detect_device",
    "evaluate_base",
    "free_memory",
    "greedy_answers",
    "has_fast_bf16",
    "has_varlen_attention",
    "limit_threads",
    "linear_layer_names",
    "load_finished",
    "load_model",
    "load_tokenizer",
    "merge_adapter",
    "model_load_kwargs",
    "parallel_kwargs",
    "quiet_progress_bars",
    "resolve_target_modules",
    "restore_dtypes",
    "save_adapter",
    "sft_config_kwargs",
    "to_bnb_config",
    "to_dataset",
    "to_lora_config",
    "to_sft_config",
    "trainable_dtypes",
    "use_packed_rows",
]

log = logging.getLogger(__name__)

# Minimum LR of cosine_with_min_lr, as a fraction of the peak.
MIN_LR_RATE = 0.1
# Checkpoints kept locally (remote retention is handled by checkpoints.py).
LOCAL_CHECKPOINTS_KEPT = 2
IGNORE_INDEX = -100  # the label transformers' loss skips


# --- 1. translators ----------------------------------------------------------------


# bfloat16 tensor cores start with Ampere (compute capability 8.0). torch's own
# is_bf16_supported() also says yes for older GPUs that emulate it, slowly.
AMPERE = (8, 0)


@dataclass(frozen=True)
class Device:
    """What the machine can do; `detect_device()` asks torch."""

    cuda: bool
    bf16: bool = False  # fast bfloat16: an Ampere+ GPU
    name: str = "cpu"
    index: int = 0  # this process's GPU: its LOCAL_RANK under torchrun
    memory: int | None = None  # bytes of that GPU's memory


def has_fast_bf16(cuda_capability: tuple[int, int]) -> bool:
    """Whether a GPU of this compute capability runs bfloat16 natively (Ampere on)."""
    return cuda_capability >= AMPERE


def detect_device(local_rank: int = 0) -> Device:
    """The GPU `local_rank` (the process's own under torchrun), or the CPU."""
    if not torch.cuda.is_available():
        return Device(cuda=False)
    props = torch.cuda.get_device_properties(local_rank)
    return Device(
        cuda=True,
        bf16=has_fast_bf16(torch.cuda.get_device_capability(local_rank)),
        name=torch.cuda.get_device_name(local_rank),
        index=local_rank,
        memory=int(props.total_memory),
    )


def compute_dtype_name(q: QuantizationSpec, device: Device) -> str:
    """The dtype of the matmuls, unless quantization.computeDtype names one: bfloat16 on
    Ampere+ GPUs, float16 (with loss scaling) on older ones, float32 on a CPU.

    On a CPU float32 is the measured fastest even with AVX512-BF16: bfloat16 autocast
    trained the NF4 model at 0.79x-0.91x float32's tokens/s (bench/README.md, "Dtype").
    `computeDtype: bfloat16` on a CPU runs bfloat16 autocast (less memory)."""
    if q.compute_dtype != "auto":
        return q.compute_dtype
    if not device.cuda:
        return "float32"
    return "bfloat16" if device.bf16 else "float16"


def to_bnb_config(q: QuantizationSpec, device: Device, strategy: Strategy = "single") -> Any | None:
    """BitsAndBytesConfig for nf4/fp4/int8, None for `mode: none`.

    FSDP shards only floating-point tensors: under it the 4-bit weights are stored in
    the compute dtype (`bnb_4bit_quant_storage`, as bitsandbytes' FSDP-QLoRA guide and
    PEFT document), so they shard like the rest of the model; otherwise in uint8.
    """
    if q.mode == "none":
        return None
    if q.mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)  # type: ignore[no-untyped-call]
    compute = getattr(torch, compute_dtype_name(q, device))
    return BitsAndBytesConfig(  # type: ignore[no-untyped-call]
        load_in_4bit=True,
        bnb_4bit_quant_type=q.mode,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_storage=compute if strategy == "fsdp" else torch.uint8,
    )


def model_load_kwargs(
    cfg: TrainerConfig, device: Device, strategy: Strategy = "single"
) -> dict[str, Any]:
    """Keyword arguments for AutoModelForCausalLM.from_pretrained.

    One process or DDP: the whole (quantized) model on the process's own GPU. FSDP: no
    device map; the Trainer's FSDP wrapper places the shards (rank 0 loads the weights
    and the others receive theirs, cpu_ram_efficient_loading in `sft_config_kwargs`).
    """
    dtype = getattr(torch, compute_dtype_name(cfg.quantization, device))
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "trust_remote_code": cfg.model.trust_remote_code,
        # sdpa keeps packed records apart through position_ids (PackedRowsCollator).
        "attn_implementation": "sdpa",
        "low_cpu_mem_usage": True,
    }
    bnb = to_bnb_config(cfg.quantization, device, strategy)
    if bnb is not None:
        kwargs["quantization_config"] = bnb
    if device.cuda and strategy != "fsdp":
        kwargs["device_map"] = {"": device.index}
    return kwargs


def keep_4bit_layout_for_training(model: Any) -> int:
    """Keep bitsandbytes from repacking the 4-bit weights for inference on this CPU.

    On a CPU with AVX512-BF16, `Linear4bit.forward` repacks its weight into a layout for
    an inference kernel (`gemv_4bit`) the first time it runs in eval mode without grad,
    and uses that kernel from then on, in training too. That kernel has no backward: the
    gradient stops at every 4-bit layer, so the LoRA weights of all but the last layers
    get wrong gradients. Our trainer evaluates the base model before training
    (`evaluation.compareToBase`) and during it (`evalEverySteps`), so every such run
    would train on broken gradients (bitsandbytes 0.50.2; checked by
    tests/trainer/test_bnb_cpu_layout.py). Returns how many layers were switched."""
    try:
        import bitsandbytes as bnb  # noqa: PLC0415 - optional on a CPU-only install
    except ImportError:  # pragma: no cover - bitsandbytes is in the image
        return 0
    switched = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and getattr(  # type: ignore[attr-defined]
            module, "support_avx512bf16_for_cpu", False
        ):
            module.support_avx512bf16_for_cpu = False
            switched += 1
    return switched


def linear_layer_names(model: Any) -> list[str]:
    """Distinct last-name components of every linear layer, output head excluded."""
    linear_types: tuple[type, ...] = (torch.nn.Linear,)
    try:
        import bitsandbytes as bnb  # noqa: PLC0415 - optional on a CPU-only install

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
    strategy: Strategy = "single",
) -> Any:
    """SFTConfig for this job; `output_dir` is the local checkpoint directory."""
    kwargs = sft_config_kwargs(cfg, device, output_dir, has_eval=has_eval, strategy=strategy)
    return SFTConfig(**kwargs)


def parallel_kwargs(cfg: TrainerConfig, strategy: Strategy) -> dict[str, Any]:
    """The SFTConfig arguments for `strategy` (the Trainer reads the ranks from torchrun).

    DDP: every LoRA weight gets a gradient each step, so DDP need not search the graph
    for unused parameters (the Trainer would, for a PEFT model).
    FSDP: TRL's own FSDP2 recipe (trl/accelerate_configs/fsdp2.yaml): each decoder
    layer wrapped, rank 0 loading the weights, full state dicts (an adapter is small,
    and a full checkpoint loads on any number of ranks), and FSDP's own activation
    checkpointing in place of the Trainer's (which would gather each layer twice).
    """
    if strategy == "ddp":
        return {"ddp_find_unused_parameters": False}
    if strategy != "fsdp":
        return {}
    return {
        "fsdp": True,
        "fsdp_config": {
            "version": 2,
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "cpu_ram_efficient_loading": True,
            "reshard_after_forward": True,
            "state_dict_type": "FULL_STATE_DICT",
            "activation_checkpointing": cfg.training.gradient_checkpointing,
        },
        "activation_checkpointing": False,
        "activation_checkpointing_kwargs": None,
    }


def sft_config_kwargs(
    cfg: TrainerConfig,
    device: Device,
    output_dir: Path,
    *,
    has_eval: bool,
    strategy: Strategy = "single",
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
        # Mixed precision (autocast) in the compute dtype: bfloat16 on GPUs and CPUs
        # (accelerate autocasts on the CPU too), float16 with loss scaling on GPUs only.
        bf16=dtype == "bfloat16",
        fp16=device.cuda and dtype == "float16",
        use_cpu=not device.cuda,
        include_num_input_tokens_seen="non_padding",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        # Tokenized by data.py; TRL only builds labels, truncates and packs.
        dataset_num_proc=None,
    ) | parallel_kwargs(cfg, strategy)


# --- 2. data -------------------------------------------------------------------------

# Rows per Arrow chunk: keeps each chunk's int32 offsets far below 2**31 tokens.
_ROWS_PER_CHUNK = 65_536


def to_dataset(rows: TokenizedData) -> Any:
    """The `datasets.Dataset` SFTTrainer takes for pre-tokenized rows: `input_ids` (int32)
    and `completion_mask` (int64, TRL's name for the loss mask), the column types
    `Dataset.from_dict` gives Python lists, built from flat buffers instead.

    `Dataset(table)` alone would fingerprint the table by pickling and hashing it: a
    transient copy several times its size (+210 MiB peak RSS for 5M tokens), so the
    fingerprint is a hash of the Arrow buffers, read in place.
    """
    table = pa.table(
        {
            "input_ids": _list_column(rows.input_ids, "int32"),
            "completion_mask": _list_column(rows.completion_mask, "int64"),
        }
    )
    return Dataset(InMemoryTable(table), fingerprint=_fingerprint(table))


def _list_column(rows: Sequence[Sequence[int]], dtype: str) -> Any:
    """A pyarrow list<dtype> column from int rows, without a Python int per token."""
    chunks = []
    for start in range(0, max(len(rows), 1), _ROWS_PER_CHUNK):
        part = rows[start : start + _ROWS_PER_CHUNK]
        offsets = np.zeros(len(part) + 1, dtype=np.int32)
        np.cumsum([len(r) for r in part], out=offsets[1:])
        # Concatenated in the rows' own item type (views of the arrays), widened once.
        flat = [np.asarray(r) for r in part]
        values = np.concatenate(flat).astype(dtype, copy=False) if flat else np.zeros(0, dtype)
        chunks.append(pa.ListArray.from_arrays(pa.array(offsets), pa.array(values)))
    return pa.chunked_array(chunks)


def _fingerprint(table: Any) -> str:
    """sha256 of a pyarrow table's schema and buffers (no copy)."""
    digest = hashlib.sha256(table.schema.to_string().encode())
    for column in table.columns:
        for chunk in column.chunks:
            for buf in chunk.buffers():
                if buf is not None:
                    digest.update(buf)
    return digest.hexdigest()[:16]


# --- 3. the trainer ------------------------------------------------------------------


def load_tokenizer(cfg: TrainerConfig, model_dir: Path) -> Any:
    """The model's tokenizer. One that does not load is a fault of the model folder (its
    files were checked to exist: inputs.check_model_dir), never a retryable error."""
    try:
        return AutoTokenizer.from_pretrained(
            model_dir, trust_remote_code=cfg.model.trust_remote_code
        )
    except (OSError, ValueError) as e:
        raise SourceNotFound(
            f"model.uri {cfg.model.uri}: the tokenizer does not load: {shorten(str(e))}",
            hint="Save the tokenizer with tokenizer.save_pretrained(<model dir>) next to the "
            "model and upload both.",
        ) from e


def load_model(
    cfg: TrainerConfig, model_dir: Path, device: Device, strategy: Strategy = "single"
) -> tuple[Any, LoraConfig]:
    """The base model, loaded (and quantized) as `cfg` says for `device` and `strategy`,
    and the LoRA config for its layers (`all-linear` or the named target modules, checked
    against the model's own linear layers)."""
    if strategy == "fsdp":
        # What `accelerate launch` sets from an FSDP config, read by from_pretrained: only
        # rank 0 reads the weights (the others start on the meta device and receive
        # theirs when FSDP wraps the model), not one full copy in host memory per rank.
        os.environ.setdefault("ACCELERATE_USE_FSDP", "true")
        os.environ.setdefault("FSDP_CPU_RAM_EFFICIENT_LOADING", "true")
    kwargs = model_load_kwargs(cfg, device, strategy)
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    keep_4bit_layout_for_training(model)
    targets = resolve_target_modules(cfg.lora, linear_layer_names(model))
    return model, to_lora_config(cfg.lora, targets)


def build_trainer(
    cfg: TrainerConfig,
    model: Any,
    tokenizer: Any,
    *,
    device: Device,
    peft_config: Any,
    datasets: tuple[Any, Any | None],
    ckpt_dir: Path,
    callbacks: list[TrainerCallback] | None = None,
    strategy: Strategy = "single",
) -> SFTTrainer:
    """The SFTTrainer for this job: `peft_config` on the loaded model, our SFTConfig,
    packed rows laid out for the model's attention implementation (`use_packed_rows`),
    and adapter dtypes that a resume does not change (`DtypeKeepingTrainer`).

    `datasets` are the (train, eval or None) datasets from `to_dataset`;
    `ckpt_dir` is where the Trainer writes its local checkpoints.
    """
    train_ds, eval_ds = datasets
    trainer = DtypeKeepingTrainer(
        model=model,
        args=to_sft_config(cfg, device, ckpt_dir, has_eval=eval_ds is not None, strategy=strategy),
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)  # ProgressCallback logs each step instead
    if use_packed_rows(trainer):
        log.info("packed rows: one row per pack of at most %d tokens", cfg.training.max_seq_length)
    return trainer


def has_varlen_attention(config: Any) -> bool:
    """Whether the model's attention uses sequence boundaries directly (flash varlen)."""
    return bool(is_flash_attention_requested(config=config))


class PackedRowsCollator:
    """Packed rows -> {input_ids, labels, position_ids}, each [batch, longest row].

    TRL's best-fit-decreasing packing fills rows of at most maxSeqLength with whole
    records (`seq_lengths` says where each record ends). Its padding-free collator
    then joins the whole micro-batch into ONE row ([1, batch * maxSeqLength]) and
    marks record boundaries only through `position_ids` / `cu_seq_lens`:

    * flash-attention (2/3, or a hub flash kernel) reads those boundaries and runs a
      varlen kernel: no mask, no padding, no wasted work. There it stays.
    * every other implementation (sdpa, eager: CPUs, GPUs without flash-attn) turns
      the boundaries into a block-diagonal mask over the whole joined row, so
      attention costs (batch * maxSeqLength)^2 instead of batch * maxSeqLength^2:
      4x the attention work and mask memory at batch 4.

    This collator keeps TRL's packed rows as rows instead: a batch is [batch, longest
    row], each row padded at its tail only. There is no attention_mask; `position_ids`
    restart at 0 for every record (and are 0 on padding), which transformers' masking
    (`find_packed_sequence_indices`) turns into a per-row block-causal mask, so no
    record attends to another, nor to padding. The first label of every record is
    -100, as in TRL's padding-free path: it would otherwise be predicted from the
    previous record's last token.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None) -> None:
        # TRL's row collator: pads each row at its tail and, from `seq_lengths`, gives
        # position_ids that restart at every record. Its attention_mask (all ones over a
        # row's records) would let records see each other, so it is dropped below.
        self._rows = DataCollatorForLanguageModeling(
            pad_token_id=pad_token_id,
            padding_free=False,
            return_position_ids=True,
            pad_to_multiple_of=pad_to_multiple_of,
        )

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = self._rows(examples)
        # Without a 2D mask transformers derives the block-causal mask from position_ids.
        del batch["attention_mask"]
        batch["labels"][batch["position_ids"] == 0] = IGNORE_INDEX
        return batch


def use_packed_rows(trainer: Any) -> bool:
    """Give a packing SFTTrainer the row layout unless its model has flash varlen attention.

    SFTTrainer always picks its padding-free collator for best-fit packing (and refuses
    a custom collator next to it), so the collator is swapped after construction;
    nothing else in the trainer depends on which collator it is. Returns whether it
    was swapped.
    """
    args = trainer.args
    if not args.packing or has_varlen_attention(trainer.model.config):
        return False
    multiple = args.pad_to_multiple_of if isinstance(args.pad_to_multiple_of, int) else None
    # The pad token TRL settled on (the tokenizer's, else EOS) is on its own collator.
    trainer.data_collator = PackedRowsCollator(trainer.data_collator.pad_token_id, multiple)
    return True


def trainable_dtypes(model: torch.nn.Module) -> dict[str, torch.dtype]:
    """The dtype of every trainable parameter, by name."""
    return {name: p.dtype for name, p in model.named_parameters() if p.requires_grad}


def restore_dtypes(model: torch.nn.Module, dtypes: dict[str, torch.dtype]) -> list[str]:
    """Cast the parameters named in `dtypes` back to those dtypes, in place.

    Returns the names of the parameters that had another dtype.
    """
    changed = []
    for name, param in model.named_parameters():
        dtype = dtypes.get(name)
        if dtype is not None and param.dtype != dtype:
            param.data = param.data.to(dtype)
            changed.append(name)
    return changed


class DtypeKeepingTrainer(SFTTrainer):
    """SFTTrainer whose trainable parameters keep the dtypes they were created with.

    It records the dtypes right after the trainer is built and puts them back in
    `create_optimizer`, the one public Trainer hook that runs after a checkpoint's
    adapter is loaded (upcast by peft, see the module docstring) and before the
    optimizer exists. The optimizer is then built over the right dtypes and its
    `load_state_dict` casts the checkpoint's optimizer state to them, as in the fresh
    run (checkpoints store bfloat16 weights and state, so the float32 round trip loses
    nothing). The parameters are cast in place (`param.data`), so every reference to
    them stays valid.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.adapter_dtypes = trainable_dtypes(self._peft_model())

    def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
        # Runs after the Trainer loaded a checkpoint's adapter (which upcasts it) and
        # before the checkpoint's optimizer state is loaded into the new optimizer.
        if changed := restore_dtypes(self._peft_model(), self.adapter_dtypes):
            log.info(
                "the checkpoint's adapter was loaded upcast; %d trainable tensors cast back to %s",
                len(changed),
                ", ".join(sorted({str(self.adapter_dtypes[n]) for n in changed})),
            )
        return super().create_optimizer(model)

    def _peft_model(self) -> torch.nn.Module:
        if self.model is None:  # SFTTrainer always has one; typed Optional upstream
            raise RuntimeError("the trainer has no model")
        return self.model


@dataclass(frozen=True)
class FinishedState:
    """Where a loaded checkpoint's run ended (Trainer state)."""

    steps: int
    max_steps: int
    epoch: float | None
    log_history: list[dict[str, Any]]


def load_finished(trainer: Any, ckpt: Path) -> FinishedState:
    """Load a checkpoint's adapter weights and trainer state into `trainer`, without
    training.

    `trainer.train(resume_from_checkpoint=...)` cannot do this for a checkpoint of the
    last step: its loop runs a step before it checks for the end, so it would train
    step max_steps + 1.
    """
    weights = safetensors.torch.load_file(str(ckpt / ADAPTER_WEIGHTS))
    loaded: Any = set_peft_model_state_dict(trainer.model, weights)  # torch _IncompatibleKeys
    if loaded.unexpected_keys:
        raise ConfigError(
            f"checkpoint {ckpt.name} holds adapter weights this model does not have "
            f"(e.g. {loaded.unexpected_keys[0]})",
            hint="Delete the old checkpoints under <output.uri>/checkpoints/ to start over.",
        )
    trainer.state = TrainerState.load_from_json(str(ckpt / TRAINER_STATE_FILE))
    state = trainer.state
    return FinishedState(state.global_step, state.max_steps, state.epoch, state.log_history)


def save_adapter(trainer: Any, tokenizer: Any, out_dir: Path) -> None:
    """adapter_config.json, adapter_model.safetensors and the tokenizer, into `out_dir`.
    With several ranks every rank calls this (FSDP gathers the adapter's shards) and
    the Trainer's `should_save` rank (rank 0) writes the files."""
    trainer.save_model(str(out_dir))
    if trainer.args.should_save:
        tokenizer.save_pretrained(out_dir)
        (out_dir / "training_args.bin").unlink(missing_ok=True)  # a pickle; nothing to publish


def merge_adapter(
    cfg: TrainerConfig, model_dir: Path, adapter_dir: Path, dest: Path, device: Device
) -> None:
    """Base model (unquantized, compute dtype) + adapter, merged and saved as safetensors."""
    kwargs = model_load_kwargs(
        cfg.model_copy(
            update={"quantization": cfg.quantization.model_copy(update={"mode": "none"})}
        ),
        device,
    )
    base = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged.save_pretrained(dest)
    AutoTokenizer.from_pretrained(adapter_dir).save_pretrained(dest)
    del base, merged
    free_memory()


def evaluate_base(trainer: Any, prefix: str) -> dict[str, float]:
    """Trainer.evaluate with the adapter switched off (PEFT's `disable_adapter` context):
    the base model on the same records, batches and loss masks as the adapter's
    evaluation. Every rank calls it (evaluation is collective); metrics are named
    `<prefix>_loss`, ... in the log history and the trackers."""
    with trainer.model.disable_adapter():
        metrics: dict[str, float] = trainer.evaluate(metric_key_prefix=prefix)
    return metrics


def greedy_answers(
    model: Any, tokenizer: Any, texts: Sequence[str], max_new_tokens: int
) -> list[tuple[str, str]]:
    """(base model's, adapter's) greedy continuation of each text: `model` is the
    trained PeftModel, the base answer comes from inside `disable_adapter`. Greedy
    decoding makes the two differ only by the adapter."""
    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def generate(enc: dict[str, Any]) -> str:
        with torch.no_grad():
            out = model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad
            )
        new = out[0][enc["input_ids"].shape[1] :]
        return str(tokenizer.decode(new, skip_special_tokens=True)).strip()

    answers: list[tuple[str, str]] = []
    try:
        for text in texts:
            enc = tokenizer(text, return_tensors="pt", add_special_tokens=True)
            enc = {k: v.to(model.device) for k, v in enc.items()}
            with model.disable_adapter():
                base = generate(enc)
            answers.append((base, generate(enc)))
    finally:
        model.train(was_training)
    return answers


# --- 4. process-wide settings ----------------------------------------------------------


def limit_threads(threads: int) -> None:
    """torch would start a thread per core of the node; past the pod's CPU limit they
    only queue for the CFS quota (and slow every step down)."""
    torch.set_num_threads(threads)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def quiet_progress_bars() -> None:
    """tqdm bars garble pod logs; ProgressCallback reports progress instead."""
    disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
