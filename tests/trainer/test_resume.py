"""Kill and resume: SIGKILL loses at most one checkpoint interval, SIGTERM saves on the spot,
and the run that finishes has done exactly maxSteps steps."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest
from loraops_contract.protocol import ExitCode

from devcluster.s3 import S3Server
from devcluster.tiny_model import write_dataset
from tests.trainer.trainer_proc import reaped, start_trainer

pytestmark = pytest.mark.slow

MAX_STEPS = 60
INTERVAL = 10
PREFIX = "resume/adapter"


def _complete_steps(s3: S3Server) -> list[int]:
    resp = s3.client().list_objects_v2(Bucket="out", Prefix=f"{PREFIX}/checkpoints/")
    steps = []
    for item in resp.get("Contents", []):
        parts = item["Key"].split("/")
        if parts[-1] == "COMPLETE":
            steps.append(int(parts[-2].removeprefix("checkpoint-")))
    return sorted(steps)


def test_kill_then_sigterm_then_finish(s3: S3Server, tiny_model_dir: Path, tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "train.parquet", "messages", n=64)
    config: dict[str, Any] = {
        "model": {"uri": str(tiny_model_dir)},
        "dataset": {"uri": str(data), "evalSplit": 0.0},
        "quantization": {"mode": "nf4"},
        "training": {
            "maxSteps": MAX_STEPS,
            "batchSize": 2,
            "gradientAccumulationSteps": 1,
            "maxSeqLength": 64,
            "learningRate": 1e-3,
            "checkpointEverySteps": INTERVAL,
            "gradientCheckpointing": False,
        },
        "output": {"uri": f"s3://out/{PREFIX}"},
    }
    env = {**s3.env(), "LORA_TRAINER_CONFIG": json.dumps(config)}
    work = tmp_path / "work"

    # 1. Hard kill (no chance to save) right after the first checkpoint is complete.
    first = start_trainer([], env, work, "first")
    with reaped(first):
        first.wait_until(lambda: bool(_complete_steps(s3)), timeout=180)
        progress = first.progress() or {}
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait()
    killed_at = max(progress.get("step", 0), _complete_steps(s3)[-1])

    # 2. The restart resumes from the newest complete checkpoint, losing < one interval.
    second = start_trainer([], env, work, "second")
    with reaped(second):
        resumed = second.wait_resumed(steps=3, timeout=180)
        second.proc.send_signal(signal.SIGTERM)
        rc, log, term = second.finish(timeout=60)
    start = resumed["resumedFromStep"]
    assert start % INTERVAL == 0
    assert start >= INTERVAL
    assert killed_at - start <= INTERVAL
    # SIGTERM: exit INTERRUPTED with a checkpoint of the step it stopped at.
    assert rc == ExitCode.INTERRUPTED, log[-3000:]
    assert term is not None
    assert term["reason"] == "Interrupted"
    assert term["retryable"] is True
    stopped_at = max(_complete_steps(s3))
    assert stopped_at > start
    assert term["lastCheckpoint"].endswith(f"checkpoint-{stopped_at}")
    assert f"at step {stopped_at}/{MAX_STEPS}" in term["message"]

    # 3. The third attempt picks up where SIGTERM left it and ends at exactly maxSteps.
    third = start_trainer([], env, work, "third")
    with reaped(third):
        rc, log, term = third.finish(timeout=300)
    assert rc == ExitCode.OK, log[-3000:]
    assert term is not None
    assert term["steps"] == MAX_STEPS
    metrics = json.loads(
        s3.client().get_object(Bucket="out", Key=f"{PREFIX}/metrics.json")["Body"].read()
    )
    assert metrics["resumed_from_step"] == stopped_at
    assert metrics["steps"] == MAX_STEPS
    # The third run logged only the steps it had left.
    assert metrics["loss_history"][0][0] == stopped_at + 1
