"""One training run, top to bottom (inputs are fetched and checked by inputs.py first).

    tokenize -> load (quantized) model
    -> check target modules -> resume from the latest complete checkpoint
    -> SFTTrainer.train -> evaluate -> save adapter, card, metrics (+ merged)
    -> upload with the manifest last -> TerminationMessage

A checkpoint of the run's last step (an earlier attempt trained everything, then
was stopped before publishing) is loaded instead of trained: the attempt goes
straight to evaluation and publishing with the checkpoint's step counts.

Every failure is raised as a TrainerError subclass; cli.main turns it into the
termination message and exit code.
"""

from __future__ import annotations

import gc
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import safetensors.torch
import torch
import transformers
from peft import LoraConfig, PeftModel, set_peft_model_state_dict
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PrinterCallback,
    TrainerCallback,
    TrainerState,
)
from trl.trainer.sft_trainer import SFTTrainer

from lora_trainer import checkpoints, data
from lora_trainer.adapter_dtypes import DtypeKeepingTrainer
from lora_trainer.callbacks import CheckpointCallback, ProgressCallback, StopCallback
from lora_trainer.collate import use_packed_rows
from lora_trainer.config import TrainerConfig
from lora_trainer.errors import ConfigError, DatasetError, Interrupted, SourceNotFound, shorten
from lora_trainer.inputs import Inputs
from lora_trainer.progress import ProgressBoard
from lora_trainer.protocol import TerminationMessage
from lora_trainer.publish import ADAPTER_WEIGHTS, model_card, name_base_model, upload_output
from lora_trainer.signals import StopRequest
from lora_trainer.storage import Storage
from lora_trainer.translate import (
    Device,
    linear_layer_names,
    model_load_kwargs,
    resolve_target_modules,
    to_lora_config,
    to_sft_config,
)

__all__ = [
    "Runtime",
    "TrainOutcome",
    "build_trainer",
    "load_model",
    "load_tokenizer",
    "one_per_step",
    "run",
    "run_mean_loss",
    "tokenize_inputs",
]

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    """What a run needs besides its config."""

    work_dir: Path
    storage: Storage
    board: ProgressBoard
    stop: StopRequest
    job_name: str | None = None
    # The operator's attempt number (LORA_TRAINER_ATTEMPT); checkpoints are written under
    # checkpoints/attempt-<attempt>/. None (a local run): one past the attempts there.
    attempt: int | None = None
    # Threads torch may run: the pod's CPU limit in whole cores (LORA_TRAINER_CPU_LIMIT_
    # MILLICORES); None leaves torch's default, one per core the machine has.
    cpu_threads: int | None = None


def run(cfg: TrainerConfig, inputs: Inputs, rt: Runtime) -> TerminationMessage:
    """Train, evaluate and publish."""
    _quiet_progress_bars()
    if rt.cpu_threads:
        # torch would start a thread per core of the node; past the pod's CPU limit they
        # only queue for the CFS quota (and slow every step down).
        torch.set_num_threads(rt.cpu_threads)
        log.info("torch threads: %d (the pod's CPU limit)", rt.cpu_threads)
    device = Device.detect()
    log.info("device: %s", device.name)
    model_dir = inputs.model_dir

    # 1. Tokenize the (already checked) records with the model's tokenizer.
    rt.board.update(stage="loading")
    tokenizer = load_tokenizer(cfg, model_dir)
    train_ds, eval_ds = tokenize_inputs(cfg, tokenizer, inputs)

    # 2. Model, target modules, adapter config.
    model, peft_config = load_model(cfg, model_dir, device)

    # 3. Resume from the newest complete checkpoint, if an earlier attempt left one.
    ckpt_dir = rt.work_dir / "checkpoints"
    attempt = rt.attempt or checkpoints.next_attempt(rt.storage, cfg.output.uri)
    this_run = checkpoints.Run.of(cfg)
    log.info(
        "attempt %d of run %s: checkpoints go to %s",
        attempt,
        this_run.id,
        checkpoints.attempt_uri(cfg.output.uri, this_run.id, attempt),
    )
    # Only checkpoints of this run: a spec that changed the run starts it from step 0.
    resume = checkpoints.find_latest(rt.storage, cfg.output.uri, this_run, attempt)
    restored = checkpoints.restore(rt.storage, resume, ckpt_dir) if resume else None
    resume_path = restored.path if restored else None
    saved = restored.state if restored else None
    if resume:
        log.info("resuming from %s (step %d)", resume.uri, resume.step)
        total = this_run.max_steps or (saved.max_steps if saved else None)
        totals = {"total_steps": total} if total else {}
        rt.board.update(
            resumed_from_step=resume.step, step=resume.step, last_checkpoint=resume.uri, **totals
        )
    else:
        log.info("no checkpoint of run %s to resume: training from step 0", this_run.id)

    # 4. Train; a checkpoint of the last step is only loaded (training it again would
    # add a step).
    progress = ProgressCallback(rt.board)
    saver = CheckpointCallback(rt.storage, cfg.output.uri, rt.board, this_run, attempt=attempt)
    trainer = build_trainer(
        cfg,
        model,
        tokenizer,
        device=device,
        peft_config=peft_config,
        datasets=(train_ds, eval_ds),
        ckpt_dir=ckpt_dir,
        callbacks=[progress, saver, StopCallback(rt.stop)],
    )
    # SFTTrainer trains on its own labelled (and packed) copies of the datasets.
    del train_ds, eval_ds
    if resume_path and saved and saved.finished(this_run):
        outcome = _load_finished(trainer, resume_path, rt)
    else:
        outcome = _train(trainer, resume_path, rt, saver)
    steps = outcome.steps
    last_checkpoint = saver.last_uri or (resume.uri if resume else None)

    # 5. Evaluate and assemble the output directory.
    metrics: dict[str, Any] = {
        "steps": steps,
        "max_steps": outcome.max_steps,
        "epochs": trainer.state.epoch,
        "train_loss": outcome.train_loss,
        "train_runtime_s": outcome.train_runtime_s,
        "tokens_seen": trainer.state.num_input_tokens_seen,
        "tokens_per_second": progress.tokens_per_second or outcome.tokens_per_second,
        "resumed_from_step": resume.step if resume else None,
        "skipped_records": inputs.skipped_records,
        "loss_history": progress.loss_history,
    }
    if trainer.eval_dataset is not None:
        rt.board.update(stage="evaluating")
        eval_metrics = trainer.evaluate()
        metrics["eval_loss"] = eval_metrics.get("eval_loss")
        # The evaluation just run is logged (and so in the history) like every other.
        metrics["eval_history"] = one_per_step(progress.eval_history)
        rt.board.update(eval_loss=metrics["eval_loss"])
    out_dir = rt.work_dir / "output"
    shutil.rmtree(out_dir, ignore_errors=True)
    trainer.save_model(str(out_dir))  # adapter_config.json + adapter_model.safetensors
    name_base_model(out_dir, cfg.model.uri)  # not the pod's cache path
    tokenizer.save_pretrained(out_dir)
    (out_dir / "training_args.bin").unlink(missing_ok=True)  # a pickle; nothing to publish
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out_dir / "README.md").write_text(model_card(cfg, metrics, rt.job_name))

    del trainer, model
    _free_memory()
    if cfg.output.merged_model:
        rt.board.update(stage="merging")
        _merge(cfg, model_dir, out_dir, out_dir / "merged", device)

    # 6. Upload, manifest last.
    rt.board.update(stage="uploading")
    adapter = upload_output(rt.storage, out_dir, cfg.output.uri, cfg, steps)
    if not cfg.output.keep_checkpoints:
        # Only now that the manifest vouches for the adapter: until then a new attempt
        # may still need them.
        checkpoints_uri = checkpoints.checkpoints_uri(cfg.output.uri)
        log.info(
            "deleting the checkpoints under %s (output.keepCheckpoints=false)", checkpoints_uri
        )
        rt.storage.delete_prefix(checkpoints_uri)
        last_checkpoint = None
    rt.board.update(stage="done")
    return TerminationMessage(
        outcome="Succeeded",
        message=f"trained {steps} steps; adapter at {cfg.output.uri}",
        adapter=adapter,
        steps=steps,
        train_loss=metrics["train_loss"],
        eval_loss=metrics.get("eval_loss"),
        tokens_per_second=metrics["tokens_per_second"],
        last_checkpoint=last_checkpoint,
        skipped_records=inputs.skipped_records or None,
    )


def one_per_step(history: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """A (step, value) history with one entry per step, the last logged, in step order:
    an evaluation at the last step and the final one both log that step."""
    return sorted(dict(history).items())


@dataclass(frozen=True)
class TrainOutcome:
    """Where training ended, for metrics.json and the termination message."""

    steps: int
    max_steps: int
    train_loss: float | None
    train_runtime_s: float | None = None
    tokens_per_second: float | None = None


def _train(
    trainer: SFTTrainer, resume_path: Path | None, rt: Runtime, saver: CheckpointCallback
) -> TrainOutcome:
    """Run the training loop (resuming from `resume_path`); raise Interrupted on a signal."""
    rt.stop.phase = "training"
    if rt.stop.requested:  # a signal arrived while the trainer was being built
        raise Interrupted(f"stopped by {rt.stop.signal_name} before training started")
    result = trainer.train(resume_from_checkpoint=str(resume_path) if resume_path else None)
    steps, max_steps = trainer.state.global_step, trainer.state.max_steps
    # Phase first, then the flag: a signal from here on interrupts at once, and one that
    # came before is seen below.
    where = f"step {steps}/{max_steps}; checkpoint {saver.last_uri or 'none'}"
    rt.stop.finishing(where)
    if rt.stop.requested:
        raise Interrupted(f"stopped by {rt.stop.signal_name} at {where}")
    return TrainOutcome(
        steps=steps,
        max_steps=max_steps,
        train_loss=result.training_loss,
        train_runtime_s=result.metrics.get("train_runtime"),
        tokens_per_second=result.metrics.get("train_tokens_per_second"),
    )


def _load_finished(trainer: SFTTrainer, ckpt: Path, rt: Runtime) -> TrainOutcome:
    """An earlier attempt trained every step and saved the last one, then stopped before
    publishing: load that checkpoint's adapter and trainer state instead of training.

    `trainer.train(resume_from_checkpoint=...)` cannot do this: its loop runs a step
    before it checks for the end, so it would train step max_steps + 1.
    """
    weights = safetensors.torch.load_file(str(ckpt / ADAPTER_WEIGHTS))
    loaded: Any = set_peft_model_state_dict(trainer.model, weights)  # torch _IncompatibleKeys
    if loaded.unexpected_keys:
        raise ConfigError(
            f"checkpoint {ckpt.name} holds adapter weights this model does not have "
            f"(e.g. {loaded.unexpected_keys[0]})",
            hint="Delete the old checkpoints under <output.uri>/checkpoints/ to start over.",
        )
    trainer.state = TrainerState.load_from_json(str(ckpt / checkpoints.TRAINER_STATE_FILE))
    steps, max_steps = trainer.state.global_step, trainer.state.max_steps
    log.info(
        "%s is the last step (%d/%d): nothing left to train; evaluating and publishing it",
        ckpt.name,
        steps,
        max_steps,
    )
    rt.stop.finishing(f"step {steps}/{max_steps}; checkpoint {ckpt.name}")
    rt.board.update(step=steps, total_steps=max_steps, epoch=trainer.state.epoch)
    return TrainOutcome(
        steps=steps, max_steps=max_steps, train_loss=run_mean_loss(trainer.state.log_history)
    )


def run_mean_loss(log_history: list[dict[str, Any]]) -> float | None:
    """The run's mean training loss from the Trainer's log: each logged loss is the mean
    over the steps since the previous log, so it is weighted by that many steps."""
    total, steps, previous = 0.0, 0, 0
    for entry in log_history:
        if "loss" in entry and "step" in entry:
            span = int(entry["step"]) - previous
            total += float(entry["loss"]) * span
            steps += span
            previous = int(entry["step"])
    return total / steps if steps else None


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
) -> SFTTrainer:
    """The SFTTrainer for this job: `peft_config` on the loaded model, our SFTConfig,
    packed rows laid out for the model's attention implementation (lora_trainer.collate),
    and adapter dtypes that a resume does not change (lora_trainer.adapter_dtypes).

    `datasets` are the (train, eval or None) datasets from `tokenize_inputs`;
    `ckpt_dir` is where the Trainer writes its local checkpoints.
    """
    train_ds, eval_ds = datasets
    trainer = DtypeKeepingTrainer(
        model=model,
        args=to_sft_config(cfg, device, ckpt_dir, has_eval=eval_ds is not None),
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


def load_model(cfg: TrainerConfig, model_dir: Path, device: Device) -> tuple[Any, LoraConfig]:
    """The base model, loaded (and quantized) as `cfg` says for `device`, and the
    LoRA config for its layers (`all-linear` or the named target modules, checked
    against the model's own linear layers)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, **model_load_kwargs(cfg, device))
    targets = resolve_target_modules(cfg.lora, linear_layer_names(model))
    return model, to_lora_config(cfg.lora, targets)


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


def tokenize_inputs(cfg: TrainerConfig, tokenizer: Any, inputs: Inputs) -> tuple[Any, Any | None]:
    """Tokenize the checked records into the datasets SFTTrainer takes, streaming them
    from their files (only the token rows are kept).

    Returns (train, eval): `datasets.Dataset`s of input_ids + completion_mask, eval
    None when there is no eval split. Records over maxSeqLength are logged (TRL
    truncates them); records without a loss token within maxSeqLength are dropped.
    Raises DatasetError when no training record is left.
    """
    completion_only = cfg.training.completion_only_loss
    max_len = cfg.training.max_seq_length
    rows = data.tokenize(inputs.train.examples(), tokenizer, completion_only=completion_only)
    train, evals = rows.split(inputs.eval_rows)
    if inputs.eval is not None:
        evals = data.tokenize(inputs.eval.examples(), tokenizer, completion_only=completion_only)
    if long := train.count_longer_than(max_len):
        log.warning(
            "%d training records are longer than maxSeqLength=%d and get truncated", long, max_len
        )
    if dropped := train.drop_unlearnable(max_len):
        log.warning(
            "%d training records have no completion/assistant token within maxSeqLength=%d; skipped",
            dropped,
            max_len,
        )
    if not train.input_ids:
        raise DatasetError(
            f"no training record has a completion/assistant token within the first "
            f"training.maxSeqLength={max_len} tokens",
            hint="Raise spec.training.maxSeqLength or shorten the prompts.",
        )
    log.info("tokenized: %d training rows, %d tokens", len(train.input_ids), train.num_tokens)
    evals.drop_unlearnable(max_len)
    eval_ds = evals.to_dataset() if evals.input_ids else None
    return train.to_dataset(), eval_ds


def _merge(
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
    _free_memory()


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _quiet_progress_bars() -> None:
    """tqdm bars garble pod logs; ProgressCallback reports progress instead."""
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
