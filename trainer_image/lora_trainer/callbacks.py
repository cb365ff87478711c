"""Trainer callbacks: progress reporting, checkpoint publishing, stopping on SIGTERM."""

# Each hook must keep TrainerCallback's full signature, used parts or not.
# ruff: noqa: ARG002

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from lora_trainer import distributed
from lora_trainer.checkpoints import Run, publish, publish_part
from lora_trainer.progress import ProgressBoard, Throughput
from lora_trainer.signals import StopRequest
from lora_trainer.storage import Storage

__all__ = ["CheckpointCallback", "ProgressCallback", "StopCallback"]

log = logging.getLogger(__name__)


def _finite(value: Any) -> float | None:
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    return None


class ProgressCallback(TrainerCallback):
    """Feeds the progress board and keeps the loss history for metrics.json."""

    def __init__(self, board: ProgressBoard) -> None:
        self.board = board
        self.throughput = Throughput()
        self.loss_history: list[tuple[int, float]] = []
        self.eval_history: list[tuple[int, float]] = []
        self.tokens_per_second: float | None = None

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.throughput.start(state.global_step, state.num_input_tokens_seen)
        self.board.update(stage="training", step=state.global_step, total_steps=state.max_steps)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        logs = logs or {}
        step = state.global_step
        tps, eta = self.throughput.measure(step, state.num_input_tokens_seen, state.max_steps)
        if tps is not None:
            self.tokens_per_second = tps
        fields: dict[str, Any] = {
            "step": step,
            "total_steps": state.max_steps,
            "epoch": _finite(state.epoch),
            "tokens_per_second": tps,
            "eta_seconds": eta,
        }
        loss = _finite(logs.get("loss"))
        if loss is not None:
            fields["loss"] = loss
            self.loss_history.append((step, loss))
        if (lr := _finite(logs.get("learning_rate"))) is not None:
            fields["learning_rate"] = lr
        if (eval_loss := _finite(logs.get("eval_loss"))) is not None:
            fields["eval_loss"] = eval_loss
            self.eval_history.append((step, eval_loss))
        p = self.board.update(**{k: v for k, v in fields.items() if v is not None})
        log.info(
            "step %d/%s loss=%s eval_loss=%s lr=%s tokens/s=%s eta=%ss",
            p.step,
            p.total_steps,
            _short(p.loss),
            _short(p.eval_loss),
            _short(p.learning_rate),
            _short(p.tokens_per_second),
            _short(p.eta_seconds),
        )


def _short(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g}"


class CheckpointCallback(TrainerCallback):
    """Publishes every local checkpoint to <output>/checkpoints/run-<run>/attempt-<attempt>/
    as soon as it is saved: rank 0 does, once every rank has written its part (with
    several ranks, each writes its own RNG state into the checkpoint). On several nodes
    the first rank of each other node first uploads its node's part (its scratch
    directory is not rank 0's), and rank 0's COMPLETE marker lists those files too."""

    def __init__(
        self,
        storage: Storage,
        output_uri: str,
        board: ProgressBoard,
        run: Run,
        *,
        attempt: int,
        parallel: distributed.Parallel | None = None,
        ranks: distributed.Ranks | None = None,
    ) -> None:
        self.ranks = ranks or distributed.Ranks()
        self.storage = storage
        self.output_uri = output_uri
        self.run = run
        self.attempt = attempt
        self.parallel = parallel
        self.board = board
        self.last_uri: str | None = None

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        distributed.barrier()
        local = Path(str(args.output_dir)) / f"checkpoint-{state.global_step}"
        parts: list[str] = []
        if self.ranks.is_local_main and not self.ranks.beside_main:
            parts = publish_part(
                self.storage, local, self.output_uri, self.run, attempt=self.attempt
            )
        if self.ranks.world_size > self.ranks.local_world_size:  # several nodes
            parts = sorted({name for names in distributed.gather(parts) for name in names})
        if not state.is_world_process_zero:
            return
        if self.parallel is not None:
            distributed.write_record(local, self.parallel)
        remote = publish(
            self.storage, local, self.output_uri, self.run, attempt=self.attempt, parts=parts
        )
        self.last_uri = remote.uri
        self.board.update(last_checkpoint=remote.uri)


class StopCallback(TrainerCallback):
    """On SIGTERM: save a checkpoint at the end of the current step and stop. With
    several ranks, all stop after the first step at whose end any of them has the
    request (they save one checkpoint together)."""

    def __init__(self, stop: StopRequest) -> None:
        self.stop = stop

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if distributed.agree(self.stop.requested, args.device):
            self.stop.follow()
            control.should_save = True
            control.should_training_stop = True
