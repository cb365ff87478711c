"""Resumable checkpoints under <output>/checkpoints/run-<run>/attempt-<N>/checkpoint-<step>/.

The Trainer writes a checkpoint locally (adapter, optimizer, scheduler, RNG
and trainer state); `publish` copies it to the output location and writes the
`COMPLETE` marker last, so a checkpoint without the marker is an interrupted
upload and is never resumed from. `find_latest` picks the checkpoint to resume
from; `restore` downloads it for `trainer.train(resume_from_checkpoint=...)`.

Checkpoints are namespaced by run: `run` is `config.run_id` of the config that
wrote them, a hash of the fields that define a training run (model, data, LoRA
shape, quantization, optimisation; `config.RESUMABLE_FIELDS` are the rest). An
attempt resumes only checkpoints of its own run, so a spec change that starts a
new run (another learning rate, say) trains from step 0 under its own prefix and
never mixes with the old run, while a change that keeps the run (more steps, other
resources) resumes where it was. The old run's checkpoints stay until the new run
has a complete checkpoint of its own; `publish` then deletes them (with every other
leftover under checkpoints/: one output belongs to one job).

Within a run, checkpoints are fenced by attempt: attempt N (the operator's attempt
number, `LORA_TRAINER_ATTEMPT`) writes only under `attempt-<N>/`, and prunes only
there. The trainer of an attempt whose node was lost may still run (a partitioned
node keeps its containers) after the operator has started attempt N+1, so two
trainers can run at once; with one prefix each they never write, overwrite or
delete the same objects. Attempt N resumes from the newest complete checkpoint of
an earlier attempt (highest step; on a tie the later attempt), never from its own
or a later one.

Layouts written before the run namespaces still resume: `checkpoints/attempt-<N>/
checkpoint-<step>/` and, before the fencing, `checkpoints/checkpoint-<step>/`
(attempt 0), when the fingerprint in their marker is this run's as those versions
computed it (`legacy_fingerprint`: the whole config but the output and the
reporting cadence, so any change of maxSteps or epochs made them another run).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraops_contract.config import TrainerConfig, run_id
from loraops_contract.protocol import CHECKPOINT_COMPLETE_MARKER, CHECKPOINTS_DIR

from lora_trainer.errors import StorageError
from lora_trainer.storage import Storage, join_uri

__all__ = [
    "LEGACY_ATTEMPT",
    "RemoteCheckpoint",
    "Restored",
    "Run",
    "TrainedState",
    "attempt_uri",
    "find_latest",
    "legacy_fingerprint",
    "list_complete",
    "next_attempt",
    "publish",
    "publish_part",
    "restore",
    "run_uri",
]

log = logging.getLogger(__name__)

# Written by the Trainer into every checkpoint (transformers' TRAINER_STATE_NAME).
TRAINER_STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")
_ATTEMPT = re.compile(r"^attempt-(\d+)$")
_RUN = re.compile(r"^run-([0-9a-f]+)$")
# The attempt number of checkpoints in the layout before attempts were fenced.
LEGACY_ATTEMPT = 0
# Remote checkpoints an attempt keeps of its own after a new one is complete: the
# newest, plus one in case the newest turns out unreadable.
REMOTE_KEPT = 2
# The fields of TrainerConfig when checkpoints carried a fingerprint instead of a run
# namespace: legacy_fingerprint hashes exactly these, so a field added since leaves the
# fingerprint of an old checkpoint's config as it was.
_LEGACY_FIELDS: dict[str, set[str]] = {
    "model": {"uri", "trust_remote_code"},
    "dataset": {"uri", "format", "eval_uri", "eval_split", "max_records"},
    "lora": {
        "r",
        "alpha",
        "dropout",
        "target_modules",
        "use_rslora",
        "use_dora",
        "modules_to_save",
    },
    "quantization": {"mode", "double_quant", "compute_dtype"},
    "training": {
        "epochs",
        "max_steps",
        "learning_rate",
        "batch_size",
        "gradient_accumulation_steps",
        "max_seq_length",
        "packing",
        "gradient_checkpointing",
        "optimizer",
        "scheduler",
        "warmup_ratio",
        "weight_decay",
        "max_grad_norm",
        "seed",
        "completion_only_loss",
    },
}


def legacy_fingerprint(cfg: TrainerConfig) -> str:
    """The fingerprint the layouts before run namespaces wrote into each marker."""
    shaped = cfg.model_dump(include=_LEGACY_FIELDS)
    return hashlib.sha256(json.dumps(shaped, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Run:
    """The training run a trainer's checkpoints belong to, and how long it trains."""

    id: str
    max_steps: int | None
    epochs: float
    legacy_fingerprint: str

    @classmethod
    def of(cls, cfg: TrainerConfig, ranks: int = 1) -> Run:
        """The run `cfg` trains on `ranks` processes (config.run_config: the global
        batch is part of a run)."""
        return cls(
            run_id(cfg, ranks),
            cfg.training.max_steps,
            cfg.training.epochs,
            legacy_fingerprint(cfg),
        )

    @property
    def length(self) -> dict[str, Any]:
        """The resumable fields that say how long the run trains, as markers record them."""
        return {"maxSteps": self.max_steps, "epochs": self.epochs}


@dataclass(frozen=True, order=True)
class RemoteCheckpoint:
    """A complete checkpoint; ordered by step, then attempt (newest last). `run` is None
    for the layouts before run namespaces."""

    step: int
    attempt: int
    uri: str
    run: str | None = field(default=None, compare=False)


def checkpoints_uri(output_uri: str) -> str:
    return join_uri(output_uri, CHECKPOINTS_DIR)


def run_uri(output_uri: str, run: str) -> str:
    """The prefix of every checkpoint of run `run`."""
    return join_uri(checkpoints_uri(output_uri), f"run-{run}")


def attempt_uri(output_uri: str, run: str, attempt: int) -> str:
    """The prefix attempt `attempt` of run `run` writes its checkpoints under."""
    return join_uri(run_uri(output_uri, run), f"attempt-{attempt}")


@dataclass(frozen=True)
class _Place:
    """Where an object under checkpoints/ belongs, by its path parts."""

    run: str | None
    attempt: int
    step: int
    depth: int  # path parts up to and including checkpoint-<step>


def _place(parts: list[str]) -> _Place | None:
    """run-<r>/attempt-<n>/checkpoint-<s>/..., attempt-<n>/checkpoint-<s>/... or
    checkpoint-<s>/...; None for anything else."""
    if len(parts) >= 2 and (m := _NAME.match(parts[0])):
        return _Place(None, LEGACY_ATTEMPT, int(m[1]), 1)
    if len(parts) >= 3 and (a := _ATTEMPT.match(parts[0])) and (m := _NAME.match(parts[1])):
        return _Place(None, int(a[1]), int(m[1]), 2)
    if (
        len(parts) >= 4
        and (r := _RUN.match(parts[0]))
        and (a := _ATTEMPT.match(parts[1]))
        and (m := _NAME.match(parts[2]))
    ):
        return _Place(r[1], int(a[1]), int(m[1]), 3)
    return None


def _all_complete(storage: Storage, output_uri: str) -> list[RemoteCheckpoint]:
    """Complete checkpoints of every run, attempt and layout."""
    base = checkpoints_uri(output_uri)
    found: set[RemoteCheckpoint] = set()
    for obj in storage.list_objects(base):
        parts = obj.name.split("/")
        place = _place(parts)
        if place is None or len(parts) != place.depth + 1:
            continue
        if parts[-1] == CHECKPOINT_COMPLETE_MARKER:
            uri = join_uri(base, *parts[: place.depth])
            found.add(RemoteCheckpoint(place.step, place.attempt, uri, place.run))
    return sorted(found)


def _marker(storage: Storage, ckpt: RemoteCheckpoint) -> dict[str, Any]:
    raw = storage.read_bytes(join_uri(ckpt.uri, CHECKPOINT_COMPLETE_MARKER))
    try:
        marker = json.loads(raw or b"{}")
    except ValueError:
        return {}
    return marker if isinstance(marker, dict) else {}


def _of_run(storage: Storage, ckpt: RemoteCheckpoint, run: Run) -> bool:
    if ckpt.run is not None:
        return ckpt.run == run.id
    # An old layout: the run is known only from the marker's fingerprint (markers
    # older than fingerprints were never refused, so neither are they now).
    saved = _marker(storage, ckpt).get("fingerprint")
    return saved is None or saved == run.legacy_fingerprint


def list_complete(
    storage: Storage, output_uri: str, run: Run, *, attempt: int | None = None
) -> list[RemoteCheckpoint]:
    """Complete checkpoints of `run` (of every attempt, or of `attempt` only), oldest
    first; those of other runs are never listed."""
    return [
        c
        for c in _all_complete(storage, output_uri)
        if (attempt is None or c.attempt == attempt) and _of_run(storage, c, run)
    ]


def find_latest(
    storage: Storage, output_uri: str, run: Run, attempt: int
) -> RemoteCheckpoint | None:
    """The checkpoint attempt `attempt` of `run` resumes from: the newest complete one
    of an earlier attempt of the same run (highest step; on a tie the later attempt).

    Its own and later attempts are never resumed from: a later attempt exists only
    if this trainer is itself the leftover of a lost node. The first attempt is the
    exception: nothing of its job ran before it, so whatever is there was written by
    an earlier job with the same output (a job re-created to resume, whose attempts
    were numbered from 1 too) and may be resumed from, whatever its attempt number.
    """
    complete = [
        c for c in list_complete(storage, output_uri, run) if attempt <= 1 or c.attempt < attempt
    ]
    return complete[-1] if complete else None


def next_attempt(storage: Storage, output_uri: str) -> int:
    """An attempt number for a run the operator did not number (a local run): one past
    every attempt that wrote under checkpoints/ (of any run), so it resumes from them
    all and writes where nothing else has."""
    places = [
        _place(obj.name.split("/")) for obj in storage.list_objects(checkpoints_uri(output_uri))
    ]
    return max((p.attempt for p in places if p is not None), default=LEGACY_ATTEMPT) + 1


@dataclass(frozen=True)
class TrainedState:
    """How far the run that wrote a checkpoint had got, and how long it was to train."""

    global_step: int
    max_steps: int
    # The marker's `length` (Run.length when it was written); None in older markers,
    # whose fingerprint covered maxSteps and epochs: they were the same as now.
    length: dict[str, Any] | None = None

    def finished(self, run: Run) -> bool:
        """The checkpoint is the last step of `run` as it is configured now: resuming
        must not train any further.

        The Trainer would still run one step (it only checks for the end after a
        step), so a resumed run has to go straight to evaluation and publishing. A
        run given more steps or epochs since is not finished: it trains on.
        """
        if run.max_steps is not None:
            return self.global_step >= run.max_steps
        if self.length is not None and self.length != run.length:
            return False  # other epochs: the Trainer works out the new end itself
        return self.max_steps > 0 and self.global_step >= self.max_steps


@dataclass(frozen=True)
class Restored:
    """A checkpoint downloaded for the Trainer, and how far its run had got (None
    without a readable trainer state)."""

    path: Path
    state: TrainedState | None


def restore(storage: Storage, ckpt: RemoteCheckpoint, local_root: Path) -> Restored:
    """Download a checkpoint into local_root/checkpoint-<step> (marker excluded).

    Every file its COMPLETE marker lists must have arrived: the attempt that wrote it
    may still run (a lost node) and prune it while it is being downloaded.
    """
    dest = local_root / f"checkpoint-{ckpt.step}"
    storage.download_prefix(ckpt.uri, dest)
    marker_file = dest / CHECKPOINT_COMPLETE_MARKER
    marker: dict[str, Any] = {}
    try:
        loaded = json.loads(marker_file.read_text())
    except FileNotFoundError:
        missing = [CHECKPOINT_COMPLETE_MARKER]
    except (OSError, ValueError):
        missing = []  # an unreadable marker lists nothing to check
    else:
        missing = []
        marker = loaded if isinstance(loaded, dict) else {}
    listed = marker.get("files")
    for name in listed if isinstance(listed, list) else []:
        if not (dest / str(name)).is_file():
            missing.append(str(name))
    if missing:
        raise StorageError(
            f"checkpoint {ckpt.uri} was deleted while it was being downloaded "
            f"(missing {', '.join(missing[:3])})"
        )
    marker_file.unlink()
    length = marker.get("length")
    return Restored(dest, read_state(dest, length if isinstance(length, dict) else None))


def read_state(local_ckpt: Path, length: dict[str, Any] | None = None) -> TrainedState | None:
    """The step counts a restored checkpoint was saved at (None without a trainer state)."""
    path = local_ckpt / TRAINER_STATE_FILE
    try:
        state = json.loads(path.read_text())
        return TrainedState(int(state["global_step"]), int(state["max_steps"]), length)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _remote(local_ckpt: Path, output_uri: str, run: Run, attempt: int) -> RemoteCheckpoint:
    m = _NAME.match(local_ckpt.name)
    if not m:
        raise ValueError(f"not a checkpoint directory: {local_ckpt}")
    prefix = attempt_uri(output_uri, run.id, attempt)
    return RemoteCheckpoint(int(m[1]), attempt, join_uri(prefix, local_ckpt.name), run.id)


def _upload(storage: Storage, local_ckpt: Path, remote: RemoteCheckpoint) -> list[str]:
    files = sorted(p for p in local_ckpt.rglob("*") if p.is_file())
    for path in files:
        storage.put_file(path, join_uri(remote.uri, path.relative_to(local_ckpt).as_posix()))
    return [p.relative_to(local_ckpt).as_posix() for p in files]


def publish_part(
    storage: Storage, local_ckpt: Path, output_uri: str, run: Run, *, attempt: int
) -> list[str]:
    """Upload what another node's ranks wrote into a checkpoint (each rank's RNG state)
    beside rank 0's files; returns their names for rank 0's marker. On several nodes
    each node's scratch directory holds only its own ranks' part, and the checkpoint
    is complete only once rank 0 publishes it (`publish(..., parts=...)`)."""
    return _upload(storage, local_ckpt, _remote(local_ckpt, output_uri, run, attempt))


def publish(
    storage: Storage,
    local_ckpt: Path,
    output_uri: str,
    run: Run,
    *,
    attempt: int,
    parts: Sequence[str] = (),
) -> RemoteCheckpoint:
    """Upload a local checkpoint under this run's and attempt's prefix, write its
    COMPLETE marker last (listing its files and the `parts` other nodes uploaded), prune
    this attempt's own older checkpoints, then delete what this run supersedes (other
    runs, older layouts).

    Other attempts' checkpoints of the run are never deleted: their trainer may still
    run (a lost node) and prune its own, and a later attempt may be resuming from them.
    """
    remote = _remote(local_ckpt, output_uri, run, attempt)
    step = remote.step
    marker_uri = join_uri(remote.uri, CHECKPOINT_COMPLETE_MARKER)
    own = [
        c for c in _all_complete(storage, output_uri) if c.run == run.id and c.attempt == attempt
    ]
    if any(c.step == step for c in own):
        # Rewritten (a job re-created with the same output reuses attempt numbers): the
        # marker goes first, so no reader takes a half-replaced checkpoint as complete.
        storage.delete(marker_uri)
    files = _upload(storage, local_ckpt, remote)
    marker = {
        "step": step,
        "attempt": attempt,
        "run": run.id,
        "fingerprint": run.id,
        "length": run.length,
        "files": sorted({*files, *parts}),
    }
    storage.put_bytes(json.dumps(marker).encode(), marker_uri)
    log.info("checkpoint %d saved to %s", step, remote.uri)
    # Only checkpoints up to this one's step: the one just written is never pruned.
    older = sorted({c for c in own if c.step < step} | {remote})
    for old in older[:-REMOTE_KEPT]:
        storage.delete_prefix(old.uri)
    _drop_superseded(storage, output_uri, run)
    return remote


def _drop_superseded(storage: Storage, output_uri: str, run: Run) -> None:
    """Delete every checkpoint under checkpoints/ that is not `run`'s own (other runs,
    older layouts); called once `run` has a complete checkpoint, so a spec change that
    started it loses nothing it could still need. Names we did not write are left alone.

    The older layouts go too, even this run's: the run resumed from the newest of them
    and has checkpointed past it.
    """
    base = checkpoints_uri(output_uri)
    stale: set[str] = set()
    for obj in storage.list_objects(base):
        parts = obj.name.split("/")
        place = _place(parts)
        if place is not None and place.run != run.id:
            # The top folder: a whole other run, an old layout's attempt or checkpoint.
            stale.add(join_uri(base, parts[0]))
    for uri in sorted(stale):
        log.info("deleting %s: superseded by run %s", uri, run.id)
        storage.delete_prefix(uri)
