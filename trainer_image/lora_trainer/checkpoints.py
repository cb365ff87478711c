"""Resumable checkpoints under <output>/checkpoints/checkpoint-<step>/.

The Trainer writes a checkpoint locally (adapter, optimizer, scheduler, RNG
and trainer state); `publish` copies it to the output location and writes the
`COMPLETE` marker last, so a checkpoint without the marker is an interrupted
upload and is never resumed from. `find_latest` picks the newest complete one;
`restore` downloads it for `trainer.train(resume_from_checkpoint=...)`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from lora_trainer.config import TrainerConfig
from lora_trainer.errors import ConfigError
from lora_trainer.protocol import CHECKPOINT_COMPLETE_MARKER, CHECKPOINTS_DIR
from lora_trainer.storage import Storage, join_uri

__all__ = [
    "RemoteCheckpoint",
    "TrainedState",
    "check_compatible",
    "find_latest",
    "fingerprint",
    "publish",
    "read_state",
    "restore",
]

log = logging.getLogger(__name__)

# Written by the Trainer into every checkpoint (transformers' TRAINER_STATE_NAME).
TRAINER_STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")
# Remote checkpoints kept after a new one is complete: the newest, plus one in
# case the newest turns out unreadable.
REMOTE_KEPT = 2


@dataclass(frozen=True)
class RemoteCheckpoint:
    step: int
    uri: str


def checkpoints_uri(output_uri: str) -> str:
    return join_uri(output_uri, CHECKPOINTS_DIR)


def list_complete(storage: Storage, output_uri: str) -> list[RemoteCheckpoint]:
    """Complete checkpoints, oldest first."""
    base = checkpoints_uri(output_uri)
    steps = set()
    for obj in storage.list_objects(base):
        parts = obj.name.split("/")
        if len(parts) == 2 and parts[1] == CHECKPOINT_COMPLETE_MARKER:
            m = _NAME.match(parts[0])
            if m:
                steps.add(int(m[1]))
    return [RemoteCheckpoint(s, join_uri(base, f"checkpoint-{s}")) for s in sorted(steps)]


def find_latest(storage: Storage, output_uri: str) -> RemoteCheckpoint | None:
    complete = list_complete(storage, output_uri)
    return complete[-1] if complete else None


def restore(storage: Storage, ckpt: RemoteCheckpoint, local_root: Path) -> Path:
    """Download a checkpoint into local_root/checkpoint-<step> (marker excluded)."""
    dest = local_root / f"checkpoint-{ckpt.step}"
    storage.download_prefix(ckpt.uri, dest)
    (dest / CHECKPOINT_COMPLETE_MARKER).unlink(missing_ok=True)
    return dest


@dataclass(frozen=True)
class TrainedState:
    """How far the run that wrote a checkpoint had got."""

    global_step: int
    max_steps: int

    @property
    def finished(self) -> bool:
        """The checkpoint is the run's last step: resuming must not train any further.

        The Trainer would still run one step (it only checks for the end after a
        step), so a resumed run has to go straight to evaluation and publishing.
        """
        return self.max_steps > 0 and self.global_step >= self.max_steps


def read_state(local_ckpt: Path) -> TrainedState | None:
    """The step counts a restored checkpoint was saved at (None without a trainer state)."""
    path = local_ckpt / TRAINER_STATE_FILE
    try:
        state = json.loads(path.read_text())
        return TrainedState(int(state["global_step"]), int(state["max_steps"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def fingerprint(cfg: TrainerConfig) -> str:
    """What a checkpoint must match to be resumed: everything that shapes the run.

    Reporting cadence (checkpoint/eval/logging intervals) and the output options
    may change between attempts; the model, data, adapter, quantization and
    optimisation settings may not.
    """
    training = cfg.training.model_dump(
        exclude={"checkpoint_every_steps", "eval_every_steps", "logging_steps"}
    )
    shaped = cfg.model_dump(exclude={"output", "training"}) | {"training": training}
    return hashlib.sha256(json.dumps(shaped, sort_keys=True).encode()).hexdigest()[:16]


def check_compatible(storage: Storage, ckpt: RemoteCheckpoint, cfg: TrainerConfig) -> None:
    """Refuse to resume a checkpoint written by a differently configured job."""
    raw = storage.read_bytes(join_uri(ckpt.uri, CHECKPOINT_COMPLETE_MARKER))
    try:
        saved = json.loads(raw or b"{}").get("fingerprint")
    except ValueError:
        saved = None
    if saved is not None and saved != fingerprint(cfg):
        raise ConfigError(
            f"{ckpt.uri} was written by a job with a different model, dataset, lora, "
            "quantization or training config; resuming it would mix two runs",
            hint="Use a new output.uri for the changed spec, or delete the old "
            "checkpoints under <output.uri>/checkpoints/ to start over.",
        )


def publish(
    storage: Storage, local_ckpt: Path, output_uri: str, job_fingerprint: str
) -> RemoteCheckpoint:
    """Upload a local checkpoint, write its COMPLETE marker, prune old remote ones."""
    m = _NAME.match(local_ckpt.name)
    if not m:
        raise ValueError(f"not a checkpoint directory: {local_ckpt}")
    step = int(m[1])
    remote = RemoteCheckpoint(step, join_uri(checkpoints_uri(output_uri), local_ckpt.name))
    files = sorted(p for p in local_ckpt.rglob("*") if p.is_file())
    for path in files:
        storage.put_file(path, join_uri(remote.uri, path.relative_to(local_ckpt).as_posix()))
    marker = {
        "step": step,
        "fingerprint": job_fingerprint,
        "files": [p.relative_to(local_ckpt).as_posix() for p in files],
    }
    storage.put_bytes(json.dumps(marker).encode(), join_uri(remote.uri, CHECKPOINT_COMPLETE_MARKER))
    log.info("checkpoint %d saved to %s", step, remote.uri)
    for old in list_complete(storage, output_uri)[:-REMOTE_KEPT]:
        storage.delete_prefix(old.uri)
    return remote
