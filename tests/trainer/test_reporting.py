"""Progress endpoint, termination message, error classification and secret scrubbing."""

from __future__ import annotations

import json
import os
import signal
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from lora_trainer.checkpoints import (
    Run,
    TrainedState,
    find_latest,
    list_complete,
    publish,
    read_state,
    restore,
)
from lora_trainer.errors import (
    ConfigError,
    CredentialsError,
    Interrupted,
    OutOfMemory,
    StorageError,
    TrainerError,
    classify,
    scrub,
    shorten,
)
from lora_trainer.progress import ProgressBoard, ProgressServer, Throughput
from lora_trainer.reporting import encode, failure_message, write_termination_message
from lora_trainer.signals import StopRequest
from lora_trainer.storage import Storage
from lora_trainer.train import run_mean_loss
from loraops_contract.config import TrainerConfig
from loraops_contract.protocol import (
    PERMANENT_EXIT_CODES,
    TERMINATION_MESSAGE_LIMIT,
    ExitCode,
    Progress,
    TerminationMessage,
)
from loraops_contract.reasons import Reason


def test_progress_server_serves_json_and_health() -> None:
    board = ProgressBoard()
    server = ProgressServer(board, "127.0.0.1", 0).start()
    try:
        board.update(stage="training", step=3, total_steps=10, loss=1.5)
        with urllib.request.urlopen(server.url + "/progress", timeout=5) as resp:
            body = json.loads(resp.read())
        progress = Progress.model_validate(body)
        assert (progress.stage, progress.step, progress.total_steps, progress.loss) == (
            "training",
            3,
            10,
            1.5,
        )
        assert "totalSteps" in body
        assert body["updatedAt"].endswith("Z")
        with urllib.request.urlopen(server.url + "/healthz", timeout=5) as resp:
            assert resp.status == 200
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(server.url + "/nope", timeout=5)
        assert err.value.code == 404
    finally:
        server.stop()


def test_throughput_and_eta(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter([100.0, 110.0])
    monkeypatch.setattr("lora_trainer.progress.time.monotonic", lambda: next(clock))
    t = Throughput()
    assert t.measure(5, 100, 10) == (None, None)
    t.start(step=4, tokens=1000)  # resumed at step 4
    tps, eta = t.measure(step=6, tokens=3000, total_steps=10)
    assert tps == pytest.approx(200.0)  # 2000 tokens in 10 s
    assert eta == pytest.approx(20.0)  # 4 steps left at 5 s/step


def test_termination_message_is_capped_and_scrubbed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value")
    msg = TerminationMessage(outcome="Failed", message="x" * 10000 + " very-secret-value")
    text = encode(msg)
    assert len(text.encode()) <= TERMINATION_MESSAGE_LIMIT
    assert json.loads(text)["message"].endswith("\u2026")
    path = tmp_path / "termination-log"
    write_termination_message(
        TerminationMessage(outcome="Failed", message="key very-secret-value leaked?"), path
    )
    written = json.loads(path.read_text())
    assert "very-secret-value" not in path.read_text()
    assert written["message"] == "key *** leaked?"


def test_messages_are_shortened_where_a_sentence_or_word_ends() -> None:
    # transformers' error for a model folder without tokenizer files: it used to be cut
    # to its first line ("... from one of: ") and read as a trainer bug.
    text = (
        "Couldn't instantiate the backend tokenizer from one of: \n(1) a `tokenizers` library "
        "serialization file, \n(2) a slow tokenizer instance to convert or \n(3) an equivalent "
        "slow tokenizer class to instantiate and convert. \nYou need to have sentencepiece or "
        "tiktoken installed to convert a slow tokenizer to a fast one."
    )
    err = classify(ValueError(text))
    assert err.message.startswith("unexpected error: ValueError: Couldn't instantiate")
    assert err.message.endswith("convert a slow tokenizer to a fast one.")  # whole, one line
    assert "\n" not in err.message
    assert shorten(text, 240) == (
        "Couldn't instantiate the backend tokenizer from one of: (1) a `tokenizers` library "
        "serialization file, (2) a slow tokenizer instance to convert or (3) an equivalent "
        "slow tokenizer class to instantiate and convert. \u2026"
    )
    assert shorten("one two three four five six", 16) == "one two three\u2026"
    assert len(shorten("x" * 600)) <= 500  # no boundary at all: cut, still marked
    assert shorten("x" * 600).endswith("\u2026")


def test_a_long_termination_message_keeps_its_cause_and_whole_words() -> None:
    cause = "model.uri s3://models/x: the tokenizer does not load."
    msg = TerminationMessage(outcome="Failed", message=cause + " detail" * 2000)
    message = json.loads(encode(msg))["message"]
    assert message.startswith(cause)
    assert message.endswith("detail\u2026")


def test_failure_message_carries_reason_hint_and_retryability() -> None:
    msg = failure_message(OutOfMemory("CUDA out of memory"), steps=4)
    assert msg.reason == Reason.CUDA_OUT_OF_MEMORY.value
    assert msg.hint
    assert "batchSize" in msg.hint
    assert "gradientCheckpointing" in msg.hint
    assert "maxSeqLength" in msg.hint
    assert msg.retryable is False
    assert msg.steps == 4
    assert failure_message(StorageError("boom")).retryable is True


def test_classify() -> None:
    class OutOfMemoryError(RuntimeError):  # torch.cuda.OutOfMemoryError's name
        pass

    assert isinstance(classify(OutOfMemoryError("CUDA out of memory. Tried")), OutOfMemory)
    assert isinstance(classify(RuntimeError("CUDA out of memory. Tried to allocate")), OutOfMemory)
    assert isinstance(classify(ConnectionResetError()), StorageError)
    err = classify(KeyError("x"))
    assert type(err) is TrainerError
    assert err.exit_code == ExitCode.INTERNAL
    assert err.retryable
    cfg = ConfigError("bad")
    assert classify(cfg) is cfg
    assert cfg.exit_code == ExitCode.INVALID_CONFIG
    assert CredentialsError("x").exit_code in PERMANENT_EXIT_CODES


def test_scrub(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_abcdefghijklmnopqrstuvwxyz012345")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAABCDEFGHIJKLMNOP")
    text = "token hf_abcdefghijklmnopqrstuvwxyz012345 and AKIAABCDEFGHIJKLMNOP and hf_zzzzzzzzzzzzzzzzzzzzzzzz"
    out = scrub(text)
    assert "hf_" not in out
    assert "AKIA" not in out
    assert scrub("plain text", ["ab"]) == "plain text"  # very short values are left alone


def test_checkpoint_publish_find_restore_prune(tmp_path: Path) -> None:
    storage = Storage(tmp_path / "cache", {})
    out = str(tmp_path / "out")
    run = Run.of(
        TrainerConfig.model_validate(
            {"model": {"uri": "/m"}, "dataset": {"uri": "/d.jsonl"}, "output": {"uri": out}}
        )
    )
    for step in (2, 4, 6):
        local = tmp_path / "local" / f"checkpoint-{step}"
        local.mkdir(parents=True)
        (local / "adapter_model.safetensors").write_bytes(b"w" * step)
        (local / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        publish(storage, local, out, run, attempt=1)
    # Only the newest REMOTE_KEPT survive.
    assert [c.step for c in list_complete(storage, out, run)] == [4, 6]
    # A checkpoint without its marker (an interrupted upload) is never picked.
    partial = tmp_path / "out" / "checkpoints" / f"run-{run.id}" / "attempt-1" / "checkpoint-8"
    partial.mkdir()
    (partial / "adapter_model.safetensors").write_bytes(b"partial")
    latest = find_latest(storage, out, run, attempt=2)
    assert latest is not None
    assert latest.step == 6
    restored = restore(storage, latest, tmp_path / "restore").path
    assert restored.name == "checkpoint-6"
    assert (restored / "adapter_model.safetensors").read_bytes() == b"w" * 6
    assert not (restored / "COMPLETE").exists()
    assert find_latest(storage, str(tmp_path / "nothing"), run, attempt=1) is None


def test_sigterm_before_training_interrupts_at_once() -> None:
    old = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        stop = StopRequest().install()
        with pytest.raises(Interrupted) as err:
            os.kill(os.getpid(), signal.SIGTERM)
        assert err.value.exit_code == ExitCode.INTERRUPTED
        assert stop.requested

        # During training the signal only asks the loop to checkpoint and stop.
        stop = StopRequest().install()
        stop.phase = "training"
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested
        assert stop.signal_name == "SIGTERM"

        # After training (evaluating, publishing) it stops at once, and says so.
        stop = StopRequest().install()
        stop.phase = "training"
        stop.finishing("step 8/8; checkpoint checkpoint-8")
        with pytest.raises(Interrupted) as err:
            os.kill(os.getpid(), signal.SIGTERM)
        assert str(err.value) == (
            "stopped by SIGTERM after training, before the adapter was published "
            "(step 8/8; checkpoint checkpoint-8)"
        )
    finally:
        signal.signal(signal.SIGTERM, old[0])
        signal.signal(signal.SIGINT, old[1])


def test_sigterm_message_names_the_phase_it_arrived_in() -> None:
    stop = StopRequest()
    assert stop.message("SIGTERM") == "stopped by SIGTERM before training started"
    stop.phase = "training"
    assert "before training started" not in stop.message("SIGINT")
    stop.finishing("")
    assert stop.message("SIGTERM") == (
        "stopped by SIGTERM after training, before the adapter was published"
    )


def test_trained_state_of_a_checkpoint(tmp_path: Path) -> None:
    ckpt = tmp_path / "checkpoint-8"
    ckpt.mkdir()
    assert read_state(ckpt) is None  # no trainer_state.json
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 7, "max_steps": 8}))
    assert read_state(ckpt) == TrainedState(7, 8)
    run = Run("r", max_steps=None, epochs=1.0, legacy_fingerprint="")
    assert not TrainedState(7, 8).finished(run)
    assert TrainedState(8, 8).finished(run)


def test_run_mean_loss_weights_each_log_by_its_steps() -> None:
    history = [
        {"loss": 4.0, "step": 1},  # logging_first_step: one step
        {"loss": 2.0, "step": 4},  # mean of steps 2-4
        {"eval_loss": 9.0, "step": 4},
        {"train_loss": 5.0, "step": 4},
    ]
    assert run_mean_loss(history) == pytest.approx((4.0 + 2.0 * 3) / 4)
    assert run_mean_loss([{"eval_loss": 1.0, "step": 2}]) is None
