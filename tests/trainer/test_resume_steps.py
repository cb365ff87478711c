"""Resumed runs end at exactly maxSteps, wherever the checkpoint they resume from is.

Each attempt runs `lora_trainer.train.run` in this process against the S3 server. The
first attempt trains to the end; the test then removes what a kill would not have
left behind, and a second attempt must finish the job with the same step counts. The
dataset gives 5 optimizer steps per epoch, so step 8 is mid-epoch: that is where the
Trainer, resumed at its last step, used to train a step 9 of 8.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from lora_trainer import hf
from lora_trainer.inputs import prepare_inputs
from lora_trainer.progress import ProgressBoard
from lora_trainer.publish import ADAPTER_WEIGHTS
from lora_trainer.signals import StopRequest
from lora_trainer.storage import Storage
from lora_trainer.train import Runtime, run
from loraops_contract.config import TrainerConfig, run_id
from loraops_contract.protocol import Progress, TerminationMessage
from transformers import TrainerCallback, TrainerControl, TrainerState

from devcluster.s3 import S3Server
from devcluster.tiny_model import write_dataset

pytestmark = pytest.mark.slow

MAX_STEPS = 8
BUCKET = "out"


def _config(data: Path, model: Path, prefix: str, interval: int) -> TrainerConfig:
    return TrainerConfig.model_validate(
        {
            "model": {"uri": str(model)},
            "dataset": {"uri": str(data), "evalSplit": 0.1},
            "quantization": {"mode": "nf4"},
            "training": {
                "maxSteps": MAX_STEPS,
                "batchSize": 2,
                "maxSeqLength": 64,
                "checkpointEverySteps": interval,
                "gradientCheckpointing": False,
            },
            # Kept after success: these tests publish again, or continue a finished run.
            "output": {"uri": f"s3://{BUCKET}/{prefix}", "keepCheckpoints": True},
        }
    )


def _attempt(cfg: TrainerConfig, s3: S3Server, work: Path) -> tuple[TerminationMessage, Progress]:
    storage = Storage(work / "cache", s3.env())
    board = ProgressBoard()
    inputs = prepare_inputs(cfg, storage, board)
    rt = Runtime(work_dir=work / "scratch", storage=storage, board=board, stop=StopRequest())
    return run(cfg, inputs, rt), board.snapshot()


def _keys(s3: S3Server, prefix: str) -> list[str]:
    resp = s3.client().list_objects_v2(Bucket=BUCKET, Prefix=prefix + "/")
    return sorted(item["Key"] for item in resp.get("Contents", []))


def _complete_steps(s3: S3Server, prefix: str) -> list[int]:
    return sorted(
        int(key.split("/")[-2].removeprefix("checkpoint-"))
        for key in _keys(s3, f"{prefix}/checkpoints")
        if key.endswith("/COMPLETE")
    )


def _delete(s3: S3Server, keys: list[str]) -> None:
    for key in keys:
        s3.client().delete_object(Bucket=BUCKET, Key=key)


def _metrics(s3: S3Server, prefix: str) -> dict[str, Any]:
    body = s3.client().get_object(Bucket=BUCKET, Key=f"{prefix}/metrics.json")["Body"].read()
    metrics: dict[str, Any] = json.loads(body)
    return metrics


def _published_outputs(s3: S3Server, prefix: str) -> list[str]:
    """Everything but the checkpoints: what a kill before publishing would not have left."""
    return [k for k in _keys(s3, prefix) if not k.startswith(f"{prefix}/checkpoints/")]


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    # 45 records, 10% held out: 5 optimizer steps per epoch at batch size 2 (packed).
    return write_dataset(tmp_path / "train.jsonl", "alpaca", n=45)


def test_checkpoint_of_the_last_step_is_published_without_training(
    s3: S3Server, tiny_model_dir: Path, dataset: Path, tmp_path: Path
) -> None:
    prefix = "resume-steps/last"
    cfg = _config(dataset, tiny_model_dir, prefix, interval=4)
    first, _ = _attempt(cfg, s3, tmp_path / "first")
    assert first.steps == MAX_STEPS
    assert _complete_steps(s3, prefix) == [4, MAX_STEPS]
    first_metrics = _metrics(s3, prefix)
    assert first_metrics["epochs"] % 1 != 0, "step 8 must be mid-epoch for this test to bite"
    # Killed after checkpoint-8 was complete but before the adapter was published.
    _delete(s3, _published_outputs(s3, prefix))

    second, progress = _attempt(cfg, s3, tmp_path / "second")

    assert second.outcome == "Succeeded"
    assert second.steps == MAX_STEPS
    assert (progress.step, progress.total_steps) == (MAX_STEPS, MAX_STEPS)
    assert progress.resumed_from_step == MAX_STEPS
    assert _complete_steps(s3, prefix) == [4, MAX_STEPS]  # no checkpoint-9
    assert second.last_checkpoint is not None
    assert second.last_checkpoint.endswith(f"checkpoint-{MAX_STEPS}")
    metrics = _metrics(s3, prefix)
    assert (metrics["steps"], metrics["max_steps"]) == (MAX_STEPS, MAX_STEPS)
    assert metrics["resumed_from_step"] == MAX_STEPS
    assert metrics["loss_history"] == []  # nothing trained in this attempt
    assert metrics["epochs"] == first_metrics["epochs"]
    assert metrics["eval_loss"] == pytest.approx(first_metrics["eval_loss"], rel=1e-4)
    # The run's mean loss is recovered from the checkpoint's log (logged to 4 digits).
    assert second.train_loss == pytest.approx(first.train_loss, abs=1e-3)
    # The published adapter is the checkpoint's, not a retrained one.
    assert second.adapter is not None
    assert first.adapter is not None
    assert second.adapter.sha256 == first.adapter.sha256


@pytest.mark.parametrize(
    "interval_and_resume_step",
    [(7, 7), (4, 4)],
    ids=["last-but-one-step", "interval-boundary"],
)
def test_resumed_run_trains_only_the_steps_left(
    s3: S3Server,
    tiny_model_dir: Path,
    dataset: Path,
    tmp_path: Path,
    interval_and_resume_step: tuple[int, int],
) -> None:
    interval, resume_at = interval_and_resume_step
    prefix = f"resume-steps/from-{resume_at}"
    cfg = _config(dataset, tiny_model_dir, prefix, interval=interval)
    _attempt(cfg, s3, tmp_path / "first")
    assert _complete_steps(s3, prefix) == [resume_at, MAX_STEPS]
    # Killed while checkpoint-8 was being uploaded (no COMPLETE marker), before publishing.
    _delete(
        s3, [f"{prefix}/checkpoints/run-{run_id(cfg)}/attempt-1/checkpoint-{MAX_STEPS}/COMPLETE"]
    )
    _delete(s3, _published_outputs(s3, prefix))

    second, progress = _attempt(cfg, s3, tmp_path / "second")

    assert second.steps == MAX_STEPS
    assert (progress.step, progress.total_steps) == (MAX_STEPS, MAX_STEPS)
    assert progress.resumed_from_step == resume_at
    assert _complete_steps(s3, prefix) == [resume_at, MAX_STEPS]
    metrics = _metrics(s3, prefix)
    assert (metrics["steps"], metrics["max_steps"]) == (MAX_STEPS, MAX_STEPS)
    assert [step for step, _ in metrics["loss_history"]] == list(
        range(resume_at + 1, MAX_STEPS + 1)
    )


class _TrainableDtypes(TrainerCallback):
    """Records the dtypes of the trainable parameters and of the optimizer's state
    tensors (moments; the step counters excluded) at every optimizer step."""

    def __init__(self) -> None:
        self.params: set[str] = set()
        self.optimizer_state: set[str] = set()

    def on_step_end(
        self,
        args: Any,  # noqa: ARG002 - the callback signature
        state: TrainerState,  # noqa: ARG002
        control: TrainerControl,  # noqa: ARG002
        **kwargs: Any,
    ) -> None:
        self.params |= {str(p.dtype) for p in kwargs["model"].parameters() if p.requires_grad}
        self.optimizer_state |= {
            str(value.dtype)
            for per_param in kwargs["optimizer"].state.values()
            for key, value in per_param.items()
            if key != "step" and isinstance(value, torch.Tensor)
        }


def _adapter_dtypes(s3: S3Server, prefix: str) -> dict[str, str]:
    body = s3.client().get_object(Bucket=BUCKET, Key=f"{prefix}/{ADAPTER_WEIGHTS}")["Body"].read()
    return {name: str(t.dtype) for name, t in safetensors.torch.load(body).items()}


def test_resumed_run_keeps_the_adapter_dtype_of_a_fresh_run(
    s3: S3Server,
    tiny_model_dir: Path,
    dataset: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The Trainer reloads a checkpoint's adapter through peft's load_adapter, which
    upcasts it to fp32: the resumed attempt must still train and publish the dtypes a
    fresh run does."""
    recorders: list[_TrainableDtypes] = []
    real_build = hf.build_trainer

    def build_recording(*args: Any, **kwargs: Any) -> Any:
        trainer = real_build(*args, **kwargs)
        recorders.append(_TrainableDtypes())
        trainer.add_callback(recorders[-1])
        return trainer

    monkeypatch.setattr(hf, "build_trainer", build_recording)
    prefix = "resume-steps/dtypes"
    cfg = _config(dataset, tiny_model_dir, prefix, interval=4)
    _attempt(cfg, s3, tmp_path / "first")
    fresh = _adapter_dtypes(s3, prefix)
    assert fresh, "the published adapter holds no tensors"
    # Killed while checkpoint-8 was being uploaded: the next attempt resumes at step 4.
    _delete(
        s3, [f"{prefix}/checkpoints/run-{run_id(cfg)}/attempt-1/checkpoint-{MAX_STEPS}/COMPLETE"]
    )
    _delete(s3, _published_outputs(s3, prefix))

    second, _ = _attempt(cfg, s3, tmp_path / "second")

    assert second.steps == MAX_STEPS
    fresh_run, resumed_run = recorders
    assert fresh_run.params == {"torch.bfloat16"}  # TRL's QLoRA cast (hf.DtypeKeepingTrainer)
    assert resumed_run.params == fresh_run.params
    assert fresh_run.optimizer_state, "the fresh run's optimizer holds no state"
    assert resumed_run.optimizer_state == fresh_run.optimizer_state
    assert _adapter_dtypes(s3, prefix) == fresh


def test_more_steps_continue_the_run_and_another_learning_rate_starts_a_new_one(
    s3: S3Server, tiny_model_dir: Path, dataset: Path, tmp_path: Path
) -> None:
    prefix = "resume-steps/runs"
    cfg = _config(dataset, tiny_model_dir, prefix, interval=4)
    first, _ = _attempt(cfg, s3, tmp_path / "first")
    assert first.steps == MAX_STEPS

    # More steps after it finished: the same run, resumed from its last checkpoint.
    longer = cfg.model_copy(
        update={"training": cfg.training.model_copy(update={"max_steps": 2 * MAX_STEPS})}
    )
    assert run_id(longer) == run_id(cfg)
    second, progress = _attempt(longer, s3, tmp_path / "second")
    assert progress.resumed_from_step == MAX_STEPS
    assert (second.steps, progress.total_steps) == (2 * MAX_STEPS, 2 * MAX_STEPS)
    trained = [step for step, _ in _metrics(s3, prefix)["loss_history"]]
    assert trained == list(range(MAX_STEPS + 1, 2 * MAX_STEPS + 1))

    # Another learning rate: a new run, from step 0, in its own namespace; the old
    # run's checkpoints go once the new run has one of its own.
    faster = longer.model_copy(
        update={"training": longer.training.model_copy(update={"learning_rate": 1e-3})}
    )
    assert run_id(faster) != run_id(cfg)
    third, progress = _attempt(faster, s3, tmp_path / "third")
    assert progress.resumed_from_step is None
    assert third.steps == 2 * MAX_STEPS
    trained = [step for step, _ in _metrics(s3, prefix)["loss_history"]]
    assert trained == list(range(1, 2 * MAX_STEPS + 1))
    runs = {key.split("/")[3] for key in _keys(s3, f"{prefix}/checkpoints")}
    assert runs == {f"run-{run_id(faster)}"}
    assert third.last_checkpoint is not None
    assert f"/checkpoints/run-{run_id(faster)}/attempt-3/" in third.last_checkpoint
