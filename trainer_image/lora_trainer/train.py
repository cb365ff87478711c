"""One training run, top to bottom (inputs are fetched and checked by inputs.py first).

    tokenize -> load (quantized) model
    -> check target modules -> resume from the latest complete checkpoint
    -> SFTTrainer.train -> evaluate -> save adapter, card, metrics (+ merged)
    -> upload with the manifest last -> TerminationMessage

A checkpoint of the run's last step (an earlier attempt trained everything, then
was stopped before publishing) is loaded instead of trained: the attempt goes
straight to evaluation and publishing with the checkpoint's step counts.

With several ranks (torchrun, lora_trainer.launch) every rank runs this same recipe
on its share of each batch; rank 0 alone decides what to resume, publishes
checkpoints, writes and uploads the output and reports (lora_trainer.distributed).

Every failure is raised as a TrainerError subclass; cli.main turns it into the
termination message and exit code. The training stack (transformers, peft, TRL) is
reached only through lora_trainer.hf; this module is the recipe.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraops_contract.config import TrainerConfig
from loraops_contract.protocol import TerminationMessage

from lora_trainer import checkpoints, data, distributed, evaluation, hf, plots, results, tracking
from lora_trainer.callbacks import CheckpointCallback, ProgressCallback, StopCallback
from lora_trainer.errors import DatasetError, Interrupted
from lora_trainer.inputs import Inputs
from lora_trainer.progress import ProgressBoard
from lora_trainer.publish import name_base_model, upload_output
from lora_trainer.signals import StopRequest
from lora_trainer.storage import Storage

__all__ = [
    "Runtime",
    "TrainOutcome",
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
    # This process's place among the run's processes (one, unless torchrun started it).
    ranks: distributed.Ranks = field(default_factory=distributed.Ranks)


def run(cfg: TrainerConfig, inputs: Inputs, rt: Runtime) -> TerminationMessage:
    """Train, evaluate and publish."""
    hf.quiet_progress_bars()
    if rt.cpu_threads:
        hf.limit_threads(rt.cpu_threads)
        log.info("torch threads: %d (the pod's CPU limit)", rt.cpu_threads)
    ranks = rt.ranks
    device = hf.detect_device(ranks.local_rank)
    dtype = hf.compute_dtype_name(cfg.quantization, device)
    log.info(
        "device: %s; compute dtype %s (quantization.computeDtype: %s)",
        device.name,
        dtype,
        cfg.quantization.compute_dtype,
    )
    distributed.init(ranks, cuda=device.cuda)
    model_dir = inputs.model_dir

    # 1. Tokenize the (already checked) records with the model's tokenizer.
    rt.board.update(stage="loading")
    tokenizer = hf.load_tokenizer(cfg, model_dir)
    train_ds, eval_ds = tokenize_inputs(cfg, tokenizer, inputs)

    # 2. Resume from the newest complete checkpoint, if an earlier attempt left one.
    ckpt_dir = rt.work_dir / "checkpoints"
    if rt.attempt:
        attempt = rt.attempt
    else:
        local = checkpoints.next_attempt(rt.storage, cfg.output.uri) if ranks.is_main else 0
        attempt = distributed.from_main(local)
    this_run = checkpoints.Run.of(cfg, ranks.world_size)
    log.info(
        "attempt %d of run %s: checkpoints go to %s",
        attempt,
        this_run.id,
        checkpoints.attempt_uri(cfg.output.uri, this_run.id, attempt),
    )
    # Only checkpoints of this run: a spec that changed the run starts it from step 0.
    # Rank 0 picks it; the first rank on each node downloads it for the node's ranks.
    resume = distributed.from_main(
        checkpoints.find_latest(rt.storage, cfg.output.uri, this_run, attempt)
        if ranks.is_main
        else None
    )
    restored = (
        checkpoints.restore(rt.storage, resume, ckpt_dir)
        if resume and ranks.is_local_main
        else None
    )
    distributed.barrier()
    restored = distributed.from_main(restored)
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

    # 3. The parallel strategy (a checkpoint keeps the one it was written with), then the
    # model for it: target modules, adapter config.
    written_with = distributed.read_record(resume_path) if resume_path else None
    parallel = distributed.follow_checkpoint(
        _parallel(cfg, ranks, model_dir, device), written_with, cfg.training.strategy
    )
    log.info(
        "%s; global batch %d = batchSize %d x %d ranks x gradientAccumulationSteps %d",
        parallel.why,
        parallel.global_batch_size,
        parallel.per_device_batch_size,
        parallel.ranks,
        parallel.gradient_accumulation_steps,
    )
    rt.board.update(
        strategy=parallel.strategy,
        ranks=parallel.ranks,
        global_batch_size=parallel.global_batch_size,
    )
    model, peft_config = hf.load_model(cfg, model_dir, device, parallel.strategy)

    # 4. Train; a checkpoint of the last step is only loaded (training it again would
    # add a step).
    progress = ProgressCallback(rt.board)
    saver = CheckpointCallback(
        rt.storage,
        cfg.output.uri,
        rt.board,
        this_run,
        attempt=attempt,
        parallel=parallel,
        ranks=ranks,
    )
    throughput = plots.StepThroughput()  # tokens/s of each step, for the model card
    # Experiment tracking (TensorBoard under <output>/logs/, MLflow, W&B): rank 0 reports.
    tracker = tracking.Tracker(
        cfg, rt.storage, rt.work_dir, run_id=this_run.id, attempt=attempt, job_name=rt.job_name
    )
    tracked = tracker.start() if ranks.is_main else []
    trainer = hf.build_trainer(
        cfg,
        model,
        tokenizer,
        device=device,
        peft_config=peft_config,
        datasets=(train_ds, eval_ds),
        ckpt_dir=ckpt_dir,
        callbacks=[progress, saver, StopCallback(rt.stop), throughput, *tracked],
        strategy=parallel.strategy,
    )
    # SFTTrainer trains on its own labelled (and packed) copies of the datasets.
    del train_ds, eval_ds
    try:
        # The base model's loss on the held-out records, before the adapter learns.
        base_loss = evaluation.base_eval_loss(trainer) if cfg.evaluation.compare_to_base else None
        if resume_path and saved and saved.finished(this_run):
            outcome = _load_finished(trainer, resume_path, rt)
        else:
            outcome = _train(trainer, resume_path, rt, saver)
    except BaseException:
        tracker.abort()
        raise
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
        "compute_dtype": dtype,
        "resumed_from_step": resume.step if resume else None,
        "skipped_records": inputs.skipped_records,
        "loss_history": progress.loss_history,
        "parallel": parallel.to_metrics(),
    }
    if trainer.eval_dataset is not None:
        rt.board.update(stage="evaluating")
        eval_metrics = trainer.evaluate()
        metrics["eval_loss"] = eval_metrics.get("eval_loss")
        # The evaluation just run is logged (and so in the history) like every other.
        metrics["eval_history"] = one_per_step(progress.eval_history)
        rt.board.update(eval_loss=metrics["eval_loss"])
    samples: list[evaluation.Sample] = []
    if cfg.evaluation.prompts and ranks.world_size == 1:
        samples = evaluation.answer_prompts(
            trainer.model,
            tokenizer,
            cfg.evaluation.prompts,
            dataset_format=inputs.format,
            max_new_tokens=cfg.evaluation.max_new_tokens,
        )
    elif cfg.evaluation.prompts:
        log.info("evaluation.prompts are answered only by single-process runs; skipped")
    out_dir = rt.work_dir / "output"
    if ranks.is_local_main:
        shutil.rmtree(out_dir, ignore_errors=True)
    distributed.barrier()
    # Every rank takes part (FSDP gathers the adapter's shards); rank 0 writes it.
    hf.save_adapter(trainer, tokenizer, out_dir)
    if not ranks.is_main:
        return TerminationMessage(
            outcome="Succeeded", message=f"rank {ranks.rank}: trained {steps} steps"
        )
    name_base_model(out_dir, cfg.model.uri)  # not the pod's cache path
    # metrics.json, samples.jsonl, plots/*.png and the model card (README.md).
    report = results.write_results(
        cfg,
        out_dir,
        metrics=metrics,
        log_history=trainer.state.log_history,
        throughput=throughput.history,
        base_eval_loss=base_loss,
        samples=samples,
        architecture=results.architecture_of(model_dir),
        job_name=rt.job_name,
    )
    tracker.finish(
        {
            "steps": steps,
            "train_loss": metrics["train_loss"],
            "eval_loss": report.eval_loss,
            "base_eval_loss": report.base_eval_loss,
        },
        out_dir,
    )

    del trainer, model
    hf.free_memory()
    if cfg.output.merged_model:
        rt.board.update(stage="merging")
        hf.merge_adapter(cfg, model_dir, out_dir, out_dir / "merged", device)

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
        evaluation=report,
    )


def _parallel(
    cfg: TrainerConfig, ranks: distributed.Ranks, model_dir: Path, device: hf.Device
) -> distributed.Parallel:
    """The strategy for this run (spec.training.strategy; auto weighs the model's size
    against one GPU's memory) and the batch it trains with."""
    weights = None
    if device.cuda and ranks.distributed and cfg.training.strategy == "auto":
        parameters = distributed.model_parameters(model_dir)
        if parameters is not None:
            dtype = hf.compute_dtype_name(cfg.quantization, device)
            weights = distributed.weight_bytes(parameters, cfg.quantization.mode, dtype)
    strategy, why = distributed.choose_strategy(
        cfg.training.strategy,
        ranks.world_size,
        cuda=device.cuda,
        weights=weights,
        device_memory=device.memory,
    )
    return distributed.Parallel(
        strategy=strategy,
        ranks=ranks.world_size,
        per_device_batch_size=cfg.training.batch_size,
        gradient_accumulation_steps=cfg.training.gradient_accumulation_steps,
        why=why,
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
    trainer: Any, resume_path: Path | None, rt: Runtime, saver: CheckpointCallback
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


def _load_finished(trainer: Any, ckpt: Path, rt: Runtime) -> TrainOutcome:
    """An earlier attempt trained every step and saved the last one, then stopped before
    publishing: load that checkpoint's adapter and trainer state instead of training."""
    state = hf.load_finished(trainer, ckpt)
    log.info(
        "%s is the last step (%d/%d): nothing left to train; evaluating and publishing it",
        ckpt.name,
        state.steps,
        state.max_steps,
    )
    rt.stop.finishing(f"step {state.steps}/{state.max_steps}; checkpoint {ckpt.name}")
    rt.board.update(step=state.steps, total_steps=state.max_steps, epoch=state.epoch)
    return TrainOutcome(
        steps=state.steps,
        max_steps=state.max_steps,
        train_loss=run_mean_loss(state.log_history),
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
    eval_ds = hf.to_dataset(evals) if evals.input_ids else None
    return hf.to_dataset(train), eval_ds
