"""Resumable checkpoints under <output>/checkpoints/attempt-<N>/checkpoint-<step>/.

The Trainer writes a checkpoint locally (adapter, optimizer, scheduler, RNG
and trainer state); `publish` copies it to the output location and writes the
`COMPLETE` marker last, so a checkpoint without the marker is an interrupted
upload and is never resumed from. `find_latest` picks the checkpoint to resume
from; `restore` downloads it for `trainer.train(resume_from_checkpoint=...)`.

Checkpoints are fenced by attempt: attempt N (the operator's attempt number,
`LORA_TRAINER_ATTEMPT`) writes only under `attempt-<N>/`, and prunes only there.
The trainer of an attempt whose node was lost may still run (a partitioned node
keeps its containers) after the operator has started attempt N+1, so two
trainers can run at once; with one prefix each they never write, overwrite or
delete the same objects. Attempt N resumes from the newest complete checkpoint
of an earlier attempt (highest step; on a tie the later attempt), never from its
own or a later one. Outputs written before the fencing (`checkpoints/checkpoint-
<step>/`, no attempt) still resume: they count as attempt 0.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from lora_trainer.config import TrainerConfig
from lora_trainer.errors import ConfigError, StorageError
from lora_trainer.protocol import CHECKPOINT_COMPLETE_MARKER, CHECKPOINTS_DIR
from lora_trainer.storage import Storage, join_uri

__all__ = [
    "LEGACY_ATTEMPT",
    "RemoteCheckpoint",
    "TrainedState",
    "attempt_uri",
    "check_compatible",
    "find_latest",
    "fingerprint",
    "list_complete",
    "next_attempt",
    "publish",
    "read_state",
    "restore",
]

log = logging.getLogger(__name__)

# Written by the Trainer into every checkpoint (transformers' TRAINER_STATE_NAME).
TRAINER_STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")
_ATTEMPT = re.compile(r"^attempt-(\d+)$")
# The attempt number of checkpoints in the layout before attempts were fenced.
LEGACY_ATTEMPT = 0
# Remote checkpoints an attempt keeps of its own after a new one is complete: the
# newest, plus one in case the newest turns out unreadable.
REMOTE_KEPT = 2


@dataclass(frozen=True, order=True)
class RemoteCheckpoint:
    """A complete checkpoint; ordered by step, then attempt (newest last)."""

    step: int
    attempt: int
    uri: str


def checkpoints_uri(output_uri: str) -> str:
    return join_uri(output_uri, CHECKPOINTS_DIR)


def attempt_uri(output_uri: str, attempt: int) -> str:
    """The prefix attempt `attempt` writes its checkpoints under."""
    return join_uri(checkpoints_uri(output_uri), f"attempt-{attempt}")


def _attempt_of(parts: list[str]) -> int | None:
    """The attempt of an object under checkpoints/ (by its path parts), None for neither
    layout."""
    if len(parts) >= 2 and _NAME.match(parts[0]):
        return LEGACY_ATTEMPT  # checkpoint-<step>/...: before the fencing
    if len(parts) >= 3 and (m := _ATTEMPT.match(parts[0])) and _NAME.match(parts[1]):
        return int(m[1])
    return None


def list_complete(
    storage: Storage, output_uri: str, *, attempt: int | None = None
) -> list[RemoteCheckpoint]:
    """Complete checkpoints of every attempt (or of `attempt` only), oldest first."""
    base = checkpoints_uri(output_uri)
    found: set[RemoteCheckpoint] = set()
    for obj in storage.list_objects(base):
        parts = obj.name.split("/")
        number = _attempt_of(parts)
        depth = 2 if number == LEGACY_ATTEMPT else 3
        if number is None or len(parts) != depth or parts[-1] != CHECKPOINT_COMPLETE_MARKER:
            continue
        if attempt is None or number == attempt:
            step = int(parts[-2].removeprefix("checkpoint-"))
            found.add(RemoteCheckpoint(step, number, join_uri(base, *parts[:-1])))
    return sorted(found)


def find_latest(storage: Storage, output_uri: str, attempt: int) -> RemoteCheckpoint | None:
    """The checkpoint attempt `attempt` resumes from: the newest complete one of an
    earlier attempt (highest step; on a tie the later attempt).

    Its own and later attempts are never resumed from: a later attempt exists only
    if this trainer is itself the leftover of a lost node. The first attempt is the
    exception: nothing of its job ran before it, so whatever is there was written by
    an earlier job with the same output (a job re-created to resume, whose attempts
    were numbered from 1 too) and may be resumed from, whatever its attempt number.
    """
    complete = [
        c for c in list_complete(storage, output_uri) if attempt <= 1 or c.attempt < attempt
    ]
    return complete[-1] if complete else None


def next_attempt(storage: Storage, output_uri: str) -> int:
    """An attempt number for a run the operator did not number (a local run): one past
    every attempt that wrote under checkpoints/, so it resumes from them all and
    writes where nothing else has."""
    attempts = [
        _attempt_of(obj.name.split("/"))
        for obj in storage.list_objects(checkpoints_uri(output_uri))
    ]
    return max((a for a in attempts if a is not None), default=LEGACY_ATTEMPT) + 1


def restore(storage: Storage, ckpt: RemoteCheckpoint, local_root: Path) -> Path:
    """Download a checkpoint into local_root/checkpoint-<step> (marker excluded).

    Every file its COMPLETE marker lists must have arrived: the attempt that wrote it
    may still run (a lost node) and prune it while it is being downloaded.
    """
    dest = local_root / f"checkpoint-{ckpt.step}"
    storage.download_prefix(ckpt.uri, dest)
    marker = dest / CHECKPOINT_COMPLETE_MARKER
    try:
        listed = json.loads(marker.read_text()).get("files")
    except FileNotFoundError:
        listed, missing = [], [CHECKPOINT_COMPLETE_MARKER]
    except (OSError, ValueError, AttributeError):
        listed, missing = [], []  # an unreadable marker lists nothing to check
    else:
        missing = []
    for name in listed if isinstance(listed, list) else []:
        if not (dest / str(name)).is_file():
            missing.append(str(name))
    if missing:
        raise StorageError(
            f"checkpoint {ckpt.uri} was deleted while it was being downloaded "
            f"(missing {', '.join(missing[:3])})"
        )
    marker.unlink()
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
    storage: Storage, local_ckpt: Path, output_uri: str, job_fingerprint: str, *, attempt: int
) -> RemoteCheckpoint:
    """Upload a local checkpoint under this attempt's prefix, write its COMPLETE marker
    last, then prune this attempt's own older checkpoints.

    Other attempts' checkpoints are never deleted: their trainer may still run (a
    lost node) and prune its own, and a later attempt may be resuming from them.
    """
    m = _NAME.match(local_ckpt.name)
    if not m:
        raise ValueError(f"not a checkpoint directory: {local_ckpt}")
    step = int(m[1])
    remote = RemoteCheckpoint(
        step, attempt, join_uri(attempt_uri(output_uri, attempt), local_ckpt.name)
    )
    marker_uri = join_uri(remote.uri, CHECKPOINT_COMPLETE_MARKER)
    own = list_complete(storage, output_uri, attempt=attempt)
    if any(c.step == step for c in own):
        # Rewritten (a job re-created with the same output reuses attempt numbers): the
        # marker goes first, so no reader takes a half-replaced checkpoint as complete.
        storage.delete(marker_uri)
    files = sorted(p for p in local_ckpt.rglob("*") if p.is_file())
    for path in files:
        storage.put_file(path, join_uri(remote.uri, path.relative_to(local_ckpt).as_posix()))
    marker = {
        "step": step,
        "attempt": attempt,
        "fingerprint": job_fingerprint,
        "files": [p.relative_to(local_ckpt).as_posix() for p in files],
    }
    storage.put_bytes(json.dumps(marker).encode(), marker_uri)
    log.info("checkpoint %d saved to %s", step, remote.uri)
    # Only checkpoints up to this one's step: the one just written is never pruned.
    older = sorted({c for c in own if c.step < step} | {remote})
    for old in older[:-REMOTE_KEPT]:
        storage.delete_prefix(old.uri)
    return remote
