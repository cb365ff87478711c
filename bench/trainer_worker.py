"""One training run of the trainer benchmark, in its own process (clean memory peak).

    python -m bench.trainer_worker <job.json> <result.json>
    python -m torch.distributed.run --standalone --nproc-per-node N \\
        -m bench.trainer_worker <job.json> <result.json>        # N ranks (DDP)

`job.json` names the recipe (RECIPES) and the shared settings; the result holds the
wall time of `trainer.train()`, token counts taken from the batches the model actually
received (summed over ranks), the memory peak (peak RSS minus the RSS after the
recipe's libraries are imported; on CUDA also `max_memory_allocated`), and the eval
loss of the adapter at a few (wall time, step) points of the run.

Recipes (same model file, records, steps, batch, LoRA shape, NF4 base, learning rate,
seed; see bench/README.md for what each one is and why):

* ours / ours_bf16: the trainer's real path (`lora_trainer.data` tokenizes,
  `lora_trainer.hf` loads and builds the SFTTrainer as `train.run` does, batch layout
  included); ours_bf16 sets `quantization.computeDtype: bfloat16` (bfloat16 autocast
  on a CPU: the measured alternative to what `auto` picks there).
* trl_defaults: SFTTrainer with SFTConfig's defaults on the raw prompt/completion
  records (no packing, each batch padded to its longest row, bf16 autocast), the
  model loaded as TRL's QLoRA docs load it (NF4, double quant, bfloat16 compute).
* trl_best: the same plus TRL's documented fastest settings: `packing=True`,
  `packing_strategy="bfd"`, `padding_free=True`, and `use_liger_kernel=True` where
  Liger runs (CUDA with liger_kernel installed).
"""

# The heavy stack is imported inside the functions: the module imports cheaply.
# ruff: noqa: PLC0415

from __future__ import annotations

import json
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["RECIPES", "Job", "TokenCounter", "main", "run_job"]

RECIPES = ("ours", "ours_bf16", "trl_defaults", "trl_best")


@dataclass(frozen=True)
class Job:
    recipe: str  # one of RECIPES
    model_dir: str
    data_path: str
    work_dir: str
    max_seq_length: int
    batch_size: int  # per rank
    grad_accum: int
    steps: int
    eval_path: str | None = None  # held-out records; None: no eval curve
    snapshots: int = 0  # adapter snapshots (evaluated after training), evenly over the steps
    learning_rate: float = 2e-4
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    seed: int = 42
    threads: int | None = None  # torch threads (None: torch's default)


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
_TRL_MODULES = ("datasets", "peft", "trl.trainer.sft_config", "trl.trainer.sft_trainer")
_OURS_MODULES = (
    "lora_trainer.data",
    "lora_trainer.hf",
    "lora_trainer.inputs",
    "lora_trainer.train",
)
_RECIPE_MODULES = {
    "ours": _OURS_MODULES,
    "ours_bf16": _OURS_MODULES,
    "trl_defaults": _TRL_MODULES,
    "trl_best": _TRL_MODULES,
}


def _import_recipe(recipe: str) -> None:
    import importlib

    for name in _RECIPE_MODULES[recipe]:
        importlib.import_module(name)


def _ranks() -> tuple[int, int]:
    """(local rank, world size) as torchrun set them; (0, 1) for one process."""
    return int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _build_ours(job: Job, cuda: bool) -> tuple[Any, str]:
    from lora_trainer import data
    from lora_trainer.distributed import Strategy
    from lora_trainer.hf import build_trainer, compute_dtype_name, detect_device, load_model
    from lora_trainer.inputs import Inputs
    from lora_trainer.train import tokenize_inputs
    from loraops_contract.config import TrainerConfig
    from transformers import AutoTokenizer

    local_rank, world = _ranks()
    cfg = TrainerConfig.model_validate(
        {
            "model": {"uri": job.model_dir},
            "dataset": {"uri": job.data_path, "format": "prompt_completion", "evalSplit": 0},
            "lora": {"r": job.lora_r, "alpha": job.lora_alpha, "dropout": job.lora_dropout},
            "quantization": {"computeDtype": "bfloat16" if job.recipe == "ours_bf16" else "auto"},
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
    device = detect_device(local_rank)
    if device.cuda != cuda:
        raise RuntimeError(f"expected cuda={cuda}, torch says {device}")
    strategy: Strategy = "ddp" if world > 1 else "single"
    tokenizer = AutoTokenizer.from_pretrained(job.model_dir)
    source = data.Source(Path(job.data_path), "prompt_completion")
    inputs = Inputs(model_dir=Path(job.model_dir), train=source)
    train_ds, _ = tokenize_inputs(cfg, tokenizer, inputs)
    model, peft_config = load_model(cfg, Path(job.model_dir), device, strategy)
    trainer = build_trainer(
        cfg,
        model,
        tokenizer,
        device=device,
        peft_config=peft_config,
        datasets=(train_ds, None),
        ckpt_dir=Path(job.work_dir) / "ckpt",
        strategy=strategy,
    )
    return trainer, compute_dtype_name(cfg.quantization, device)


def liger_runs(cuda: bool) -> tuple[bool, str]:
    """Whether TRL's Liger kernels can run here, and why not: they are Triton kernels."""
    if not cuda:
        return False, "not run: needs CUDA (Liger's kernels are Triton GPU kernels)"
    import importlib.util

    if importlib.util.find_spec("liger_kernel") is None:
        return False, "not run: liger_kernel is not installed"
    return True, "on"


def _build_trl(job: Job, cuda: bool) -> tuple[Any, str]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl.trainer.sft_config import SFTConfig
    from trl.trainer.sft_trainer import SFTTrainer

    local_rank, _ = _ranks()
    records = [json.loads(line) for line in Path(job.data_path).read_text().splitlines() if line]
    dataset = Dataset.from_list(records)
    # TRL's QLoRA documentation (PEFT integration): NF4, double quant, bfloat16 compute.
    bnb = BitsAndBytesConfig(  # type: ignore[no-untyped-call]
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(
        job.model_dir,
        quantization_config=bnb,
        dtype=torch.bfloat16,
        attn_implementation="sdpa",  # flash-attn is not installed (see README)
        device_map={"": local_rank} if cuda else None,
    )
    tokenizer = AutoTokenizer.from_pretrained(job.model_dir)
    peft_config = LoraConfig(
        r=job.lora_r,
        lora_alpha=job.lora_alpha,
        lora_dropout=job.lora_dropout,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    best: dict[str, Any] = {}
    if job.recipe == "trl_best":
        liger, _ = liger_runs(cuda)
        best = {
            "packing": True,
            "packing_strategy": "bfd",
            "padding_free": True,
            "use_liger_kernel": liger,
        }
    args = SFTConfig(
        output_dir=str(Path(job.work_dir) / "ckpt"),
        # The job's own settings, the same for every recipe:
        max_steps=job.steps,
        per_device_train_batch_size=job.batch_size,
        gradient_accumulation_steps=job.grad_accum,
        learning_rate=job.learning_rate,
        seed=job.seed,
        max_length=job.max_seq_length,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        # What a CPU needs: SFTConfig's default bf16=True is refused without a bf16 GPU
        # unless use_cpu is set (TrainingArguments._validate_args); it then autocasts.
        use_cpu=not cuda,
        **best,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    return trainer, "bfloat16" if args.bf16 else "float32"


class Snapshots:
    """Copies of the adapter at evenly spaced steps, with the training wall time at
    which each was reached (the copying itself is taken out of that clock)."""

    def __init__(self, model: Any, steps: int, count: int) -> None:
        self.model = model
        self.at = {round(steps * (i + 1) / count) for i in range(count)} if count else set()
        self.taken: list[tuple[float, int, dict[str, Any]]] = []
        self.paused = 0.0
        self.start = 0.0

    def begin(self) -> None:
        self.start = time.perf_counter()
        if self.at:
            self.take(0)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start - self.paused

    def take(self, step: int) -> None:
        t0 = time.perf_counter()
        state = {
            n: p.detach().to("cpu", copy=True)
            for n, p in self.model.named_parameters()
            if p.requires_grad
        }
        self.taken.append((t0 - self.start - self.paused, step, state))
        self.paused += time.perf_counter() - t0


def _snapshot_callback(snaps: Snapshots) -> Any:
    from transformers import TrainerCallback

    class _Cb(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:  # noqa: ARG002 - the callback signature
            if state.global_step in snaps.at and state.is_world_process_zero:
                snaps.take(int(state.global_step))

    return _Cb()


def eval_records(tokenizer: Any, path: str, max_len: int) -> list[tuple[list[int], int]]:
    """Held-out records as (ids, prompt length): prompt + completion + EOS, cut at
    max_len; the loss is taken over the completion only, as in training."""
    out = []
    for line in Path(path).read_text().splitlines():
        if not line:
            continue
        rec = json.loads(line)
        prompt = tokenizer(rec["prompt"])["input_ids"]
        full = tokenizer(rec["prompt"] + rec["completion"])["input_ids"] + [tokenizer.eos_token_id]
        out.append((full[:max_len], len(prompt)))
    return out


def eval_loss(trainer: Any, records: list[tuple[list[int], int]], batch: int) -> float:
    """Mean completion-token cross-entropy of the trainer's model on `records`, in the
    recipe's own precision (its accelerator's autocast)."""
    import torch

    model = trainer.model
    model.eval()
    device = next(p for p in model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad(), trainer.accelerator.autocast():
        for i in range(0, len(records), batch):
            part = records[i : i + batch]
            width = max(len(ids) for ids, _ in part)
            ids = torch.zeros((len(part), width), dtype=torch.long)
            mask = torch.zeros((len(part), width), dtype=torch.long)
            labels = torch.full((len(part), width), -100, dtype=torch.long)
            for row, (seq, prompt_len) in enumerate(part):
                ids[row, : len(seq)] = torch.tensor(seq)
                mask[row, : len(seq)] = 1
                labels[row, prompt_len : len(seq)] = torch.tensor(seq[prompt_len:])
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            shift = logits[:, :-1].float()
            target = labels[:, 1:].to(device)
            loss = torch.nn.functional.cross_entropy(
                shift.reshape(-1, shift.shape[-1]), target.reshape(-1), reduction="sum"
            )
            total += float(loss)
            count += int((target != -100).sum())
    model.train()
    if not count:
        raise ValueError("no held-out completion token within maxSeqLength")
    return total / count


def _eval_curve(trainer: Any, snaps: Snapshots, job: Job) -> list[dict[str, float]]:
    import torch

    if not snaps.taken or job.eval_path is None:
        return []
    records = eval_records(trainer.processing_class, job.eval_path, job.max_seq_length)
    params = dict(trainer.model.named_parameters())
    curve = []
    for t, step, state in snaps.taken:
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)
        curve.append({"time_s": t, "step": step, "eval_loss": eval_loss(trainer, records, 8)})
    return curve


def _all_ranks(values: list[float], op: str) -> list[float]:
    """Sum (or max) `values` over the ranks of a torchrun group; as is for one process."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return values
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return [float(v) for v in t.tolist()]


def run_job(job: Job) -> dict[str, Any]:
    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    if job.threads:
        torch.set_num_threads(job.threads)
    cuda = torch.cuda.is_available()
    local_rank, world = _ranks()
    if cuda:
        torch.cuda.set_device(local_rank)
    torch.manual_seed(job.seed)
    rss_start = _rss_bytes()
    _import_recipe(job.recipe)
    rss_before = _rss_bytes()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    if job.recipe.startswith("ours"):
        trainer, dtype = _build_ours(job, cuda)
    else:
        trainer, dtype = _build_trl(job, cuda)
    prep_s = time.perf_counter() - t0
    counter = TokenCounter(pad_token_id=trainer.processing_class.pad_token_id)
    trainer.model.register_forward_pre_hook(counter.hook, with_kwargs=True)
    snaps = Snapshots(trainer.model, job.steps, job.snapshots if job.eval_path else 0)
    trainer.add_callback(_snapshot_callback(snaps))
    if cuda:
        torch.cuda.synchronize()
    snaps.begin()
    result = trainer.train()
    if cuda:
        torch.cuda.synchronize()
    train_s = snaps.elapsed()
    real, loss_tokens, slots, rows = _all_ranks(
        [counter.real, counter.loss, counter.slots, counter.rows], "sum"
    )
    peak_rss = _peak_rss_bytes()
    peaks = [float(peak_rss - rss_before)]
    if cuda:
        peaks += [float(torch.cuda.max_memory_allocated()), float(torch.cuda.max_memory_reserved())]
    mem = _all_ranks(peaks, "max")
    liger = liger_runs(cuda)[1] if job.recipe == "trl_best" else "not used"
    out: dict[str, Any] = {
        "recipe": job.recipe,
        "ranks": world,
        "compute_dtype": dtype,
        "mixed_precision": getattr(trainer.args, "mixed_precision", None),
        "liger_kernel": liger,
        "collator": type(trainer.data_collator).__name__,
        "steps": int(trainer.state.global_step),
        "prep_s": prep_s,
        "train_s": train_s,
        "train_loss": float(result.training_loss),
        "real_tokens": int(real),
        "loss_tokens": int(loss_tokens),
        "token_slots": int(slots),
        "records": int(rows),
        "forwards": counter.forwards,
        "first_batch_shapes": counter.shapes,
        "real_tokens_per_s": real / train_s,
        "loss_tokens_per_s": loss_tokens / train_s,
        "padding_fraction": 1 - real / slots if slots else None,
        "imports_rss_bytes": rss_before - rss_start,
        "rss_before_bytes": rss_before,
        "peak_rss_bytes": peak_rss,
        "peak_rss_delta_bytes": int(mem[0]),
    }
    if cuda:
        out["cuda_max_allocated_bytes"] = int(mem[1])
        out["cuda_max_reserved_bytes"] = int(mem[2])
        out["gpu"] = torch.cuda.get_device_name()
    out["eval_curve"] = _eval_curve(trainer, snaps, job) if local_rank == 0 else []
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m bench.trainer_worker <job.json> <result.json>", file=sys.stderr)
        return 2
    job = Job(**json.loads(Path(args[0]).read_text()))
    result = run_job(job)
    if int(os.environ.get("RANK", "0")) == 0:
        Path(args[1]).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
