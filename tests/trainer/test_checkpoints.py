"""Checkpoints fenced by attempt: each attempt writes and prunes only its own prefix
(the trainer of a lost node may still run beside the next attempt's) and resumes from
the newest complete checkpoint of an earlier attempt. Local-directory storage, no
training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from lora_trainer.checkpoints import (
    REMOTE_KEPT,
    RemoteCheckpoint,
    find_latest,
    list_complete,
    next_attempt,
    publish,
    restore,
)
from lora_trainer.errors import StorageError
from lora_trainer.storage import Storage


@pytest.fixture
def storage(tmp_path: Path) -> Storage:
    return Storage(tmp_path / "cache", {})


@pytest.fixture
def out(tmp_path: Path) -> str:
    return str(tmp_path / "out")


def _local(tmp_path: Path, step: int, tag: str = "") -> Path:
    """A local checkpoint directory as the Trainer writes it."""
    local = tmp_path / "local" / f"{tag}{step}" / f"checkpoint-{step}"
    local.mkdir(parents=True)
    (local / "adapter_model.safetensors").write_bytes(f"{tag}{step}".encode())
    (local / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return local


def _save(storage: Storage, tmp_path: Path, out: str, attempt: int, step: int) -> RemoteCheckpoint:
    return publish(storage, _local(tmp_path, step, f"a{attempt}-"), out, "fp", attempt=attempt)


def _legacy(out: str, step: int) -> None:
    """A checkpoint in the layout before the fencing: checkpoints/checkpoint-<step>/."""
    ckpt = Path(out) / "checkpoints" / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    (ckpt / "adapter_model.safetensors").write_bytes(b"legacy")
    (ckpt / "COMPLETE").write_text(
        json.dumps({"step": step, "files": ["adapter_model.safetensors"]})
    )


def _names(out: str) -> list[str]:
    root = Path(out) / "checkpoints"
    return sorted(p.parent.relative_to(root).as_posix() for p in root.rglob("COMPLETE"))


def test_each_attempt_writes_under_its_own_prefix(
    storage: Storage, out: str, tmp_path: Path
) -> None:
    first = _save(storage, tmp_path, out, attempt=1, step=10)
    second = _save(storage, tmp_path, out, attempt=2, step=10)
    assert first.uri == f"{out}/checkpoints/attempt-1/checkpoint-10"
    assert second.uri == f"{out}/checkpoints/attempt-2/checkpoint-10"
    # Same step, two trainers: neither overwrote the other.
    assert _names(out) == ["attempt-1/checkpoint-10", "attempt-2/checkpoint-10"]
    assert (Path(first.uri) / "adapter_model.safetensors").read_bytes() == b"a1-10"
    assert (Path(second.uri) / "adapter_model.safetensors").read_bytes() == b"a2-10"
    marker = json.loads((Path(second.uri) / "COMPLETE").read_text())
    assert marker["attempt"] == 2
    assert marker["step"] == 10


def test_an_attempt_prunes_only_its_own_checkpoints(
    storage: Storage, out: str, tmp_path: Path
) -> None:
    # Attempt 1's node was lost after its checkpoint 30; attempt 2 resumed from it and
    # runs on while attempt 1's trainer (on the partitioned node) still writes too.
    for step in (10, 20, 30):
        _save(storage, tmp_path, out, attempt=1, step=step)
    for step in (40, 50, 60, 70):
        _save(storage, tmp_path, out, attempt=2, step=step)
    _save(storage, tmp_path, out, attempt=1, step=40)
    assert _names(out) == [
        "attempt-1/checkpoint-30",
        "attempt-1/checkpoint-40",
        "attempt-2/checkpoint-60",
        "attempt-2/checkpoint-70",
    ]
    assert len(list_complete(storage, out, attempt=2)) == REMOTE_KEPT


def test_pruning_never_deletes_the_checkpoint_just_written(
    storage: Storage, out: str, tmp_path: Path
) -> None:
    # checkpoints/attempt-1/ holds higher steps of an earlier job with the same output.
    for step in (50, 60):
        _save(storage, tmp_path, out, attempt=1, step=step)
    _save(storage, tmp_path, out, attempt=1, step=10)
    assert _names(out) == [
        "attempt-1/checkpoint-10",
        "attempt-1/checkpoint-50",
        "attempt-1/checkpoint-60",
    ]


def test_resume_takes_the_highest_step_of_an_earlier_attempt(
    storage: Storage, out: str, tmp_path: Path
) -> None:
    _save(storage, tmp_path, out, attempt=1, step=30)
    _save(storage, tmp_path, out, attempt=2, step=20)
    # Attempt 3 (the leftover of attempt 2's lost node still runs): highest step wins,
    # whichever attempt wrote it.
    latest = find_latest(storage, out, attempt=3)
    assert latest is not None
    assert (latest.attempt, latest.step) == (1, 30)
    # Its own and later attempts' checkpoints are never resumed from.
    _save(storage, tmp_path, out, attempt=3, step=40)
    _save(storage, tmp_path, out, attempt=4, step=50)
    latest = find_latest(storage, out, attempt=3)
    assert latest is not None
    assert (latest.attempt, latest.step) == (1, 30)
    latest = find_latest(storage, out, attempt=4)
    assert latest is not None
    assert (latest.attempt, latest.step) == (3, 40)


def test_resume_tie_goes_to_the_later_attempt(storage: Storage, out: str, tmp_path: Path) -> None:
    _legacy(out, 20)
    _save(storage, tmp_path, out, attempt=1, step=20)
    _save(storage, tmp_path, out, attempt=2, step=20)
    latest = find_latest(storage, out, attempt=3)
    assert latest is not None
    assert (latest.attempt, latest.step) == (2, 20)
    assert latest.uri.endswith("/checkpoints/attempt-2/checkpoint-20")


def test_checkpoints_of_the_old_layout_still_resume(
    storage: Storage, out: str, tmp_path: Path
) -> None:
    _legacy(out, 40)
    for attempt in (1, 2):
        latest = find_latest(storage, out, attempt=attempt)
        assert latest is not None
        assert (latest.attempt, latest.step) == (0, 40)
        assert latest.uri == f"{out}/checkpoints/checkpoint-40"
        restored = restore(storage, latest, tmp_path / f"restore-{attempt}")
        assert (restored / "adapter_model.safetensors").read_bytes() == b"legacy"
    # A newer fenced checkpoint wins over it; attempts never prune the old layout.
    for step in (50, 60, 70):
        _save(storage, tmp_path, out, attempt=2, step=step)
    latest = find_latest(storage, out, attempt=3)
    assert latest is not None
    assert (latest.attempt, latest.step) == (2, 70)
    assert "checkpoint-40" in _names(out)


def test_first_attempt_resumes_what_an_earlier_job_left(
    storage: Storage, out: str, tmp_path: Path
) -> None:
    # A job re-created with the same output numbers its attempts from 1 again.
    _save(storage, tmp_path, out, attempt=3, step=80)
    latest = find_latest(storage, out, attempt=1)
    assert latest is not None
    assert (latest.attempt, latest.step) == (3, 80)


def test_next_attempt_for_local_runs(storage: Storage, out: str, tmp_path: Path) -> None:
    assert next_attempt(storage, out) == 1
    _legacy(out, 10)
    assert next_attempt(storage, out) == 1
    _save(storage, tmp_path, out, attempt=1, step=20)
    assert next_attempt(storage, out) == 2
    # An attempt that wrote nothing complete still owns its prefix.
    partial = Path(out) / "checkpoints" / "attempt-4" / "checkpoint-30"
    partial.mkdir(parents=True)
    (partial / "adapter_model.safetensors").write_bytes(b"partial")
    assert next_attempt(storage, out) == 5


def test_restore_refuses_a_checkpoint_pruned_while_downloaded(
    storage: Storage, out: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt = _save(storage, tmp_path, out, attempt=1, step=10)
    download = Storage.download_prefix

    def pruned_meanwhile(self: Storage, uri: str, dest: Path) -> Path:
        got = download(self, uri, dest)
        (dest / "adapter_model.safetensors").unlink()  # gone before it was fetched
        return got

    monkeypatch.setattr(Storage, "download_prefix", pruned_meanwhile)
    with pytest.raises(StorageError, match=r"missing adapter_model\.safetensors"):
        restore(storage, ckpt, tmp_path / "restore")


def test_rewriting_a_checkpoint_drops_its_marker_first(
    storage: Storage, out: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = _save(storage, tmp_path, out, attempt=1, step=10)
    seen: list[bool] = []
    put_file = Storage.put_file

    def watching(self: Storage, local: Path, uri: str) -> None:
        seen.append((Path(old.uri) / "COMPLETE").exists())
        put_file(self, local, uri)

    monkeypatch.setattr(Storage, "put_file", watching)
    new = publish(storage, _local(tmp_path, 10, "again-"), out, "fp", attempt=1)
    assert new.uri == old.uri
    assert seen
    assert not any(seen)
    assert (Path(new.uri) / "adapter_model.safetensors").read_bytes() == b"again-10"
    assert (Path(new.uri) / "COMPLETE").exists()
