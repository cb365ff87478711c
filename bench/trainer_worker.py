"""One training run of the trainer benchmark, in its own process (clean memory peak).

    python -m bench.trainer_worker <job.json> <result.json>

`job.json` names the recipe (`ours` or `plain`) and the shared settings; the
result holds wall time of `trainer.train()`, token counts taken from the
batches the model actually received, and the memory peak: peak RSS minus the RSS
after the recipe's libraries are imported (their import cost is reported apart, as
imports_rss_bytes).

* ours: the real trainer path: `lora_trainer.data` reads and tokenizes the records
  (`train.tokenize_inputs`), `hf` builds the load kwargs and LoRA config from a
  TrainerConfig (packing on, the default), and `hf.build_trainer` builds the
  SFTTrainer exactly as `lora_trainer.train.run` does, batch layout included (its
  checkpoint/progress callbacks are left out: they upload, which is not training
  throughput).
* plain: the textbook QLoRA recipe: same model file, same bitsandbytes NF4 load,
  same LoRA shape, SFTTrainer with `packing=False` and every row padded to
  maxSeqLength (`pad_to_multiple_of=max_length`), TRL defaults otherwise.
"""

# The heavy stack is imported inside the functions: the module imports cheaply.
# ruff: noqa: PLC0415

from __future__ import annotations

import json
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Job", "TokenCounter", "main", "run_job"]


@dataclass(frozen=True)
class Job:
    recipe: str  # "ours" | "plain"
    model_dir: str
    data_path: str
    work_dir: str
    max_seq_length: int
    batch_size: int
    grad_accum: int
    steps: int
    learning_rate: float = 2e-4
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    seed: int = 42


@dataclass
class TokenCounter:
    """Counts what the model is fed during training (forward pre-hook).

    real:  non-padding tokens: the attention_mask sum; for batches without a mask
           (packed rows, whose records are told apart by position_ids) the tokens
           that are not the pad token, as the Trainer's own "non_padding" count does
    loss:  tokens whose label is not -100 (the ones that train the adapter)
    slots: tokens computed on, padding included (input_ids.numel())
    rows:  records: a packed record starts wherever a real token has position_ids 0
    """

    pad_token_id: int | None = None
    real: int = 0
    loss: int = 0
    slots: int = 0
    rows: int = 0
    forwards: int = 0
    shapes: list[list[int]] = field(default_factory=list)

    def hook(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        import torch

        if not module.training:
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            return
        mask = kwargs.get("attention_mask")
        labels = kwargs.get("labels")
        position_ids = kwargs.get("position_ids")
        if mask is not None:
            real = mask.bool()
        elif self.pad_token_id is not None:
            real = ids != self.pad_token_id
        else:
            real = torch.ones_like(ids, dtype=torch.bool)
        self.forwards += 1
        self.slots += int(ids.numel())
        self.real += int(real.sum())
        if labels is not None:
            self.loss += int((labels != -100).sum())
        if position_ids is not None:
            self.rows += int(((position_ids == 0) & real).sum())
        else:
            self.rows += int(ids.shape[0])
        if len(self.shapes) < 4:
            self.shapes.append(list(ids.shape))


def _rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def _peak_rss_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux


# What each recipe's builder imports beyond torch and transformers. They are imported
# before the memory baseline: code is a fixed cost (reported as imports_rss_bytes),
# the peak delta is what building and training take.
_RECIPE_MODULES = {
    "plain": ("datasets", "peft", "trl.trainer.sft_config", "trl.trainer.sft_trainer"),
    "ours": ("lora_trainer.data", "lora_trainer.hf", "lora_trainer.inputs", "lora_trainer.train"),
}


def _import_recipe(recipe: str) -> None:
    import importlib

    for name in _RECIPE_MODULES[recipe]:
        importlib.import_module(name)


def _build_ours(job: Job, cuda: bool) -> Any:
    from lora_trainer import data
    from lora_trainer.hf import build_trainer, detect_device, load_model
    from lora_trainer.inputs import Inputs
    from lora_trainer.train import tokenize_inputs
    from loraops_contract.config import TrainerConfig
    from transformers import AutoTokenizer

    cfg = TrainerConfig.model_validate(
        {
            "model": {"uri": job.model_dir},
            "dataset": {"uri": job.data_path, "format": "prompt_completion", "evalSplit": 0},
            "lora": {"r": job.lora_r, "alpha": job.lora_alpha, "dropout": job.lora_dropout},
            "training": {
                "maxSteps": job.steps,
                "batchSize": job.batch_size,
                "gradientAccumulationSteps": job.grad_accum,
                "maxSeqLength": job.max_seq_length,
                "learningRate": job.learning_rate,
                "seed": job.seed,
                "checkpointEverySteps": 10**9,  # no checkpoint uploads in the timed loop
            },
            "output": {"uri": str(Path(job.work_dir) / "out")},
        }
    )
    device = detect_device()
    if device.cuda != cuda:
        raise RuntimeError(f"expected cuda={cuda}, torch says {device}")
    tokenizer = AutoTokenizer.from_pretrained(job.model_dir)
    source = data.Source(Path(job.data_path), "prompt_completion")
    inputs = Inputs(model_dir=Path(job.model_dir), train=source)
    train_ds, _ = tokenize_inputs(cfg, tokenizer, inputs)
    model, peft_config = load_model(cfg, Path(job.model_dir), device)
    return build_trainer(
        cfg,
        model,
        tokenizer,
        device=device,
        peft_config=peft_config,
        datasets=(train_ds, None),
        ckpt_dir=Path(job.work_dir) / "ckpt",
    )


def _build_plain(job: Job, cuda: bool) -> Any:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl.trainer.sft_config import SFTConfig
    from trl.trainer.sft_trainer import SFTTrainer

    records = [json.loads(line) for line in Path(job.data_path).read_text().splitlines() if line]
    dataset = Dataset.from_list(records)
    compute = torch.bfloat16 if cuda else torch.float32
    bnb = BitsAndBytesConfig(  # type: ignore[no-untyped-call]
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
    )
    model = AutoModelForCausalLM.from_pretrained(
        job.model_dir,
        quantization_config=bnb,
        dtype=compute,
        device_map={"": 0} if cuda else None,
    )
    tokenizer = AutoTokenizer.from_pretrained(job.model_dir)
    peft_config = LoraConfig(
        r=job.lora_r,
        lora_alpha=job.lora_alpha,
        lora_dropout=job.lora_dropout,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    args = SFTConfig(
        output_dir=str(Path(job.work_dir) / "ckpt"),
        max_steps=job.steps,
        per_device_train_batch_size=job.batch_size,
        gradient_accumulation_steps=job.grad_accum,
        learning_rate=job.learning_rate,
        seed=job.seed,
        max_length=job.max_seq_length,
        packing=False,
        pad_to_multiple_of=job.max_seq_length,  # every row padded to maxSeqLength
        report_to="none",
        disable_tqdm=True,
        # The only departure from the defaults: CPU runs cannot use bf16.
        use_cpu=not cuda,
        bf16=cuda,
    )
    return SFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
    )


def run_job(job: Job) -> dict[str, Any]:
    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    cuda = torch.cuda.is_available()
    torch.manual_seed(job.seed)
    rss_start = _rss_bytes()
    _import_recipe(job.recipe)
    rss_before = _rss_bytes()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    trainer = _build_ours(job, cuda) if job.recipe == "ours" else _build_plain(job, cuda)
    prep_s = time.perf_counter() - t0
    counter = TokenCounter(pad_token_id=trainer.processing_class.pad_token_id)
    trainer.model.register_forward_pre_hook(counter.hook, with_kwargs=True)
    if cuda:
        torch.cuda.synchronize()
    t1 = time.perf_counter()
    result = trainer.train()
    if cuda:
        torch.cuda.synchronize()
    train_s = time.perf_counter() - t1
    out: dict[str, Any] = {
        "recipe": job.recipe,
        "steps": int(trainer.state.global_step),
        "prep_s": prep_s,
        "train_s": train_s,
        "train_loss": float(result.training_loss),
        "real_tokens": counter.real,
        "loss_tokens": counter.loss,
        "token_slots": counter.slots,
        "records": counter.rows,
        "forwards": counter.forwards,
        "first_batch_shapes": counter.shapes,
        "real_tokens_per_s": counter.real / train_s,
        "loss_tokens_per_s": counter.loss / train_s,
        "padding_fraction": 1 - counter.real / counter.slots if counter.slots else None,
        "imports_rss_bytes": rss_before - rss_start,
        "rss_before_bytes": rss_before,
        "peak_rss_bytes": _peak_rss_bytes(),
        "peak_rss_delta_bytes": _peak_rss_bytes() - rss_before,
    }
    if cuda:
        out["cuda_max_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
        out["cuda_max_reserved_bytes"] = int(torch.cuda.max_memory_reserved())
        out["gpu"] = torch.cuda.get_device_name()
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m bench.trainer_worker <job.json> <result.json>", file=sys.stderr)
        return 2
    job = Job(**json.loads(Path(args[0]).read_text()))
    result = run_job(job)
    Path(args[1]).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
