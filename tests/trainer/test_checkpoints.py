"""Checkpoints namespaced by run and fenced by attempt: each attempt writes and prunes
only its own prefix of its run (the trainer of a lost node may still run beside the next
attempt's) and resumes from the newest complete checkpoint of an earlier attempt of the
same run; a spec that changes the run starts from step 0 and never mixes with the old
run. Local-directory storage, no training."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from lora_trainer.checkpoints import (
    REMOTE_KEPT,
    RemoteCheckpoint,
    Run,
    TrainedState,
    find_latest,
    legacy_fingerprint,
    list_complete,
    next_attempt,
    publish,
    restore,
)
from lora_trainer.errors import StorageError
from lora_trainer.publish import upload_output
from lora_trainer.storage import Storage
from loraops_contract.config import TrainerConfig, run_defining_changes, run_id

BASE: dict[str, Any] = {
    "model": {"uri": "/models/m"},
    "dataset": {"uri": "/data/d.jsonl"},
    "training": {"maxSteps": 20},
    "output": {"uri": "/out"},
}


def _config(**sections: dict[str, Any]) -> TrainerConfig:
    return TrainerConfig.model_validate(
        {key: {**BASE.get(key, {}), **sections.get(key, {})} for key in BASE | sections}
    )


RUN = Run.of(_config())


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
    (local / "trainer_state.json").write_text(json.dumps({"global_step": step, "max_steps": 20}))
    return local


def _save(  # noqa: PLR0917 - the order every call reads in
    storage: Storage, tmp_path: Path, out: str, attempt: int, step: int, run: Run = RUN
) -> RemoteCheckpoint:
    local = _local(tmp_path, step, f"{run.id}-a{attempt}-")
    return publish(storage, local, out, run, attempt=attempt)


def _legacy(out: str, step: int, *, attempt: int | None = None, fingerprint: str = "") -> None:
    """A checkpoint in a layout before run namespaces: checkpoints/attempt-<N>/checkpoint-
    <step>/, or before the fencing (no attempt) checkpoints/checkpoint-<step>/; its
    marker holds the old fingerprint, or none (older still)."""
    ckpt = Path(out) / "checkpoints"
    if attempt is not None:
        ckpt /= f"attempt-{attempt}"
    ckpt /= f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    (ckpt / "adapter_model.safetensors").write_bytes(b"legacy")
    marker: dict[str, Any] = {"step": step, "files": ["adapter_model.safetensors"]}
    if fingerprint:
        marker["fingerprint"] = fingerprint
    (ckpt / "COMPLETE").write_text(json.dumps(marker))


def _names(out: str, run: Run | None = RUN) -> list[str]:
    """Complete checkpoints, relative to checkpoints/run-<run>/ (or to checkpoints/)."""
    root = Path(out) / "checkpoints"
    if run is not None:
        root /= f"run-{run.id}"
    return sorted(p.parent.relative_to(root).as_posix() for p in root.rglob("COMPLETE"))


def test_each_attempt_writes_under_its_own_prefix(
    storage: Storage, out: str, tmp_path: Path
) -> None:
    first = _save(storage, tmp_path, out, attempt=1, step=10)
    second = _save(storage, tmp_path, out, attempt=2, step=10)
    assert first.uri == f"{out}/checkpoints/run-{RUN.id}/attempt-1/checkpoint-10"
    assert second.uri == f"{out}/checkpoints/run-{RUN.id}/attempt-2/checkpoint-10"
    # Same step, two trainers: neither overwrote the other.
    assert _names(out) == ["attempt-1/checkpoint-10", "attempt-2/checkpoint-10"]
    assert (
        Path(first.uri) / "adapter_model.safetensors"
    ).read_bytes() == f"{RUN.id}-a1-10".encode()
    assert (
        Path(second.uri) / "adapter_model.safetensors"
    ).read_bytes() == f"{RUN.id}-a2-10".encode()
    marker = json.loads((Path(second.uri) / "COMPLETE").read_text())
    assert marker["attempt"] == 2
    assert marker["step"] == 10
    assert marker["run"] == RUN.id
    assert marker["length"] == {"maxSteps": 20, "epochs": 1.0}


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
    assert len(list_complete(storage, out, RUN, attempt=2)) == REMOTE_KEPT


def test_pruning_never_deletes_the_checkpoint_just_written(
    storage: Storage, out: str, tmp_path: Path
) -> None:
    # attempt-1/ of the run holds higher steps of an earlier job with the same output.
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
    latest = find_latest(storage, out, RUN, attempt=3)
    assert latest is not None
    assert (latest.attempt, latest.step) == (1, 30)
    # Its own and later attempts' checkpoints are never resumed from.
    _save(storage, tmp_path, out, attempt=3, step=40)
    _save(storage, tmp_path, out, attempt=4, step=50)
    latest = find_latest(storage, out, RUN, attempt=3)
    assert latest is not None
    assert (latest.attempt, latest.step) == (1, 30)
    latest = find_latest(storage, out, RUN, attempt=4)
    assert latest is not None
    assert (latest.attempt, latest.step) == (3, 40)


def test_resume_tie_goes_to_the_later_attempt(storage: Storage, out: str, tmp_path: Path) -> None:
    # In the old layouts (attempt 0 is before the fencing) ...
    _legacy(out, 20)
    _legacy(out, 20, attempt=1, fingerprint=RUN.legacy_fingerprint)
    latest = find_latest(storage, out, RUN, attempt=2)
    assert latest is not None
    assert (latest.attempt, latest.step) == (1, 20)
    assert latest.uri.endswith("/checkpoints/attempt-1/checkpoint-20")
    # ... and in the run's namespace.
    _save(storage, tmp_path, out, attempt=2, step=20)
    _save(storage, tmp_path, out, attempt=3, step=20)
    latest = find_latest(storage, out, RUN, attempt=4)
    assert latest is not None
    assert (latest.attempt, latest.step) == (3, 20)
    assert latest.uri.endswith(f"/checkpoints/run-{RUN.id}/attempt-3/checkpoint-20")


def test_checkpoints_of_the_old_layouts_resume_within_the_same_run(
    storage: Storage, out: str, tmp_path: Path
) -> None:
    # Written before run namespaces: one without attempt and fingerprint, one with both.
    _legacy(out, 40)
    _legacy(out, 30, attempt=2, fingerprint=RUN.legacy_fingerprint)
    for attempt in (1, 3):
        latest = find_latest(storage, out, RUN, attempt=attempt)
        assert latest is not None
        assert (latest.attempt, latest.step) == (0, 40)
        assert latest.uri == f"{out}/checkpoints/checkpoint-40"
        restored = restore(storage, latest, tmp_path / f"restore-{attempt}")
        assert (restored.path / "adapter_model.safetensors").read_bytes() == b"legacy"
    # A newer checkpoint of the run wins over them, and supersedes them: once the run
    # has one of its own, the old layouts are deleted.
    _save(storage, tmp_path, out, attempt=3, step=50)
    latest = find_latest(storage, out, RUN, attempt=4)
    assert latest is not None
    assert (latest.attempt, latest.step, latest.run) == (3, 50, RUN.id)
    assert _names(out, None) == [f"run-{RUN.id}/attempt-3/checkpoint-50"]


def test_the_old_fingerprint_is_computed_as_it_was() -> None:
    # The value the trainer wrote into markers before run namespaces, for this config.
    cfg = _config(
        model={"uri": "s3://models/m"},
        dataset={"uri": "s3://data/d.jsonl"},
        output={"uri": "s3://out/x"},
        training={"maxSteps": 20, "learningRate": 1e-3},
        lora={"targetModules": ["q_proj", "v_proj"]},
    )
    assert legacy_fingerprint(cfg) == "4260dec3cdf64529"


def test_an_old_layout_checkpoint_of_another_config_is_another_run(
    storage: Storage, out: str, tmp_path: Path
) -> None:
    other = _config(training={"learningRate": 1e-3})
    _legacy(out, 30, attempt=1, fingerprint=Run.of(other).legacy_fingerprint)
    assert find_latest(storage, out, RUN, attempt=2) is None
    # It is not resumed, and stays until this run has a checkpoint of its own.
    assert _names(out, None) == ["attempt-1/checkpoint-30"]
    _save(storage, tmp_path, out, attempt=2, step=5)
    assert _names(out, None) == [f"run-{RUN.id}/attempt-2/checkpoint-5"]


def test_first_attempt_resumes_what_an_earlier_job_left(
    storage: Storage, out: str, tmp_path: Path
) -> None:
    # A job re-created with the same output numbers its attempts from 1 again.
    _save(storage, tmp_path, out, attempt=3, step=80)
    latest = find_latest(storage, out, RUN, attempt=1)
    assert latest is not None
    assert (latest.attempt, latest.step) == (3, 80)


def test_next_attempt_for_local_runs(storage: Storage, out: str, tmp_path: Path) -> None:
    assert next_attempt(storage, out) == 1
    _legacy(out, 10)
    assert next_attempt(storage, out) == 1
    _save(storage, tmp_path, out, attempt=1, step=20)
    assert next_attempt(storage, out) == 2
    # An attempt that wrote nothing complete still owns its prefix.
    partial = Path(out) / "checkpoints" / f"run-{RUN.id}" / "attempt-4" / "checkpoint-30"
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
    new = publish(storage, _local(tmp_path, 10, "again-"), out, RUN, attempt=1)
    assert new.uri == old.uri
    assert seen
    assert not any(seen)
    assert (Path(new.uri) / "adapter_model.safetensors").read_bytes() == b"again-10"
    assert (Path(new.uri) / "COMPLETE").exists()


# --------------------------------------------------------------------------- runs


def test_the_run_is_defined_by_model_data_lora_quantization_and_optimisation() -> None:
    base = _config()
    # A checkpoint carries across these: same run.
    for resumable in (
        {"training": {"maxSteps": 40}},
        {"training": {"maxSteps": None, "epochs": 3.0}},  # epochs instead of steps
        {"training": {"checkpointEverySteps": 7, "evalEverySteps": 3, "loggingSteps": 5}},
        {"training": {"gradientCheckpointing": False}},
        {"output": {"uri": "/elsewhere", "mergedModel": True}},
        {"training": {"learningRate": 2e-4}},  # the default, spelled out
    ):
        changed = _config(**resumable)
        assert run_id(changed) == run_id(base), resumable
        assert run_defining_changes(base, changed) == [], resumable
    # These start a new run.
    for defining, path in (
        ({"model": {"uri": "/models/other"}}, "model.uri"),
        ({"dataset": {"uri": "/data/other.jsonl"}}, "dataset.uri"),
        ({"dataset": {"maxRecords": 10}}, "dataset.maxRecords"),
        ({"lora": {"r": 8}}, "lora.r"),
        ({"lora": {"targetModules": ["q_proj"]}}, "lora.targetModules"),
        ({"quantization": {"mode": "none"}}, "quantization.mode"),
        ({"training": {"learningRate": 1e-3}}, "training.learningRate"),
        ({"training": {"scheduler": "linear"}}, "training.scheduler"),
        ({"training": {"batchSize": 8}}, "training.batchSize"),
        ({"training": {"maxSeqLength": 512}}, "training.maxSeqLength"),
        ({"training": {"seed": 7}}, "training.seed"),
    ):
        changed = _config(**defining)
        assert run_id(changed) != run_id(base), defining
        assert run_defining_changes(base, changed) == [path]
    assert len(run_id(base)) == 12


def test_a_new_run_never_resumes_the_old_runs_checkpoints(
    storage: Storage, out: str, tmp_path: Path
) -> None:
    new = Run.of(_config(training={"learningRate": 1e-3}))
    assert new.id != RUN.id
    for step in (10, 20):
        _save(storage, tmp_path, out, attempt=1, step=step)
    # Attempt 2 runs the changed spec: nothing of its run to resume, so step 0 ...
    assert find_latest(storage, out, new, attempt=2) is None
    assert list_complete(storage, out, new) == []
    # ... and the old run's checkpoints stay until the new run has one of its own.
    assert _names(out) == ["attempt-1/checkpoint-10", "attempt-1/checkpoint-20"]
    first = _save(storage, tmp_path, out, attempt=2, step=5, run=new)
    assert first.uri == f"{out}/checkpoints/run-{new.id}/attempt-2/checkpoint-5"
    assert _names(out, None) == [f"run-{new.id}/attempt-2/checkpoint-5"]
    latest = find_latest(storage, out, new, attempt=3)
    assert latest is not None
    assert (latest.attempt, latest.step, latest.run) == (2, 5, new.id)


def test_a_resumable_change_resumes_the_same_runs_checkpoints(
    storage: Storage, out: str, tmp_path: Path
) -> None:
    _save(storage, tmp_path, out, attempt=1, step=20)
    longer = Run.of(_config(training={"maxSteps": 40}, output={"mergedModel": True}))
    assert longer.id == RUN.id
    latest = find_latest(storage, out, longer, attempt=2)
    assert latest is not None
    assert (latest.attempt, latest.step) == (1, 20)


def test_a_checkpoint_of_the_last_step_is_finished_only_for_the_same_length(
    storage: Storage, out: str, tmp_path: Path
) -> None:
    ckpt = _save(storage, tmp_path, out, attempt=1, step=20)
    restored = restore(storage, ckpt, tmp_path / "restore")
    state = restored.state
    assert state == TrainedState(20, 20, {"maxSteps": 20, "epochs": 1.0})
    assert state.finished(RUN)
    # More steps: the run trains on from step 20; fewer: nothing left to train.
    assert not state.finished(Run.of(_config(training={"maxSteps": 40})))
    assert state.finished(Run.of(_config(training={"maxSteps": 10})))
    # An epoch-based run: finished at its own end, unless the epochs changed since.
    by_epochs = TrainedState(30, 30, {"maxSteps": None, "epochs": 2.0})
    epochs = {"maxSteps": None, "epochs": 2.0}
    two = Run.of(TrainerConfig.model_validate({**BASE, "training": epochs}))
    three = Run.of(TrainerConfig.model_validate({**BASE, "training": {"epochs": 3.0}}))
    assert by_epochs.finished(two)
    assert not by_epochs.finished(three)
    assert not TrainedState(29, 30, None).finished(two)
    assert TrainedState(30, 30, None).finished(two)  # an older marker: same length


def test_next_attempt_counts_every_run(storage: Storage, out: str, tmp_path: Path) -> None:
    other = Run.of(_config(training={"seed": 1}))
    _save(storage, tmp_path, out, attempt=6, step=5, run=other)
    assert next_attempt(storage, out) == 7


def test_names_that_are_not_checkpoints_are_left_alone(
    storage: Storage, out: str, tmp_path: Path
) -> None:
    notes = Path(out) / "checkpoints" / "README.txt"
    notes.parent.mkdir(parents=True)
    notes.write_text("kept")
    _save(storage, tmp_path, out, attempt=1, step=5)
    assert notes.read_text() == "kept"


def test_a_new_adapter_replaces_the_old_one_manifest_first_out_and_last_in(
    storage: Storage, out: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job that runs again (its spec changed) publishes over its old adapter: no reader
    may see the old manifest vouch for new files, nor a manifest before every file."""
    cfg = _config(output={"uri": out})
    old = Path(out)
    old.mkdir(parents=True)
    (old / "adapter_model.safetensors").write_bytes(b"old weights")
    (old / "manifest.json").write_text('{"files": []}')
    new = tmp_path / "new-adapter"
    new.mkdir()
    for name in ("adapter_model.safetensors", "adapter_config.json", "README.md"):
        (new / name).write_bytes(f"new {name}".encode())
    seen: list[bool] = []
    put_file = Storage.put_file

    def watching(self: Storage, local: Path, uri: str) -> None:
        seen.append((old / "manifest.json").exists())
        put_file(self, local, uri)

    monkeypatch.setattr(Storage, "put_file", watching)
    info = upload_output(storage, new, out, cfg, steps=7)
    assert seen == [False, False, False]  # gone before the first new file
    manifest = json.loads((old / "manifest.json").read_text())
    assert sorted(f["path"] for f in manifest["files"]) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert (old / "adapter_model.safetensors").read_bytes() == b"new adapter_model.safetensors"
    assert info.files == 3
