"""A finished run shows what it learned and where: the base model's eval loss before
training against the adapter's after (metrics.json, the model card, the termination
message), the prompts answered by both (samples.jsonl), PNG plots, the vLLM verdict,
TensorBoard event files under <output>/logs/, a real MLflow tracking server's run
with the params, the metrics and the adapter as an artifact, and an offline W&B run."""

from __future__ import annotations

import json
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import pytest
import torch
from lora_trainer.inputs import prepare_inputs
from lora_trainer.progress import ProgressBoard
from lora_trainer.signals import StopRequest
from lora_trainer.storage import Storage
from lora_trainer.tracking import LogSync, Tracker
from lora_trainer.train import Runtime, run
from loraops_contract.config import TrainerConfig
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import TrainerControl, TrainerState, TrainingArguments

from devcluster.process import Process, free_port, log_tail, wait_for
from devcluster.s3 import S3Server
from devcluster.tiny_model import make_records, write_dataset

PROMPTS = ["what color is the sky", "tell me the color of snow"]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real MLflow tracking server (PyPI mlflow) on a free 127.0.0.1 port, with a
    SQLite backend and served artifacts, as a cluster would run it."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    server = Process(
        "mlflow",
        [
            str(Path(sys.executable).with_name("mlflow")),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{root}/mlflow.db",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--workers",
            "1",
        ],
        root / "mlflow.log",
    ).start()
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        server.check_running()
        with urllib.request.urlopen(f"{url}/health", timeout=5) as resp:
            return bool(resp.status == 200)

    try:
        # Its start (database migrations, imports) takes a minute on a loaded machine.
        wait_for(healthy, timeout=300, interval=1, message=lambda: log_tail(server.log))
        yield url
    finally:
        server.stop()


@pytest.mark.slow
def test_a_run_reports_its_evaluation_plots_and_tracking(
    tiny_model_dir: Path, tmp_path: Path, mlflow_server: str
) -> None:
    data = write_dataset(tmp_path / "chat.jsonl", "messages", records=make_records("messages", 32))
    out = tmp_path / "out"
    cfg = TrainerConfig.model_validate(
        {
            "model": {"uri": str(tiny_model_dir)},
            "dataset": {"uri": str(data), "evalSplit": 0.25},
            "quantization": {"mode": "none"},
            "training": {
                "maxSteps": 6,
                "batchSize": 2,
                "learningRate": 0.003,
                "maxSeqLength": 96,
                "evalEverySteps": 3,
                "gradientCheckpointing": False,
            },
            "output": {"uri": str(out)},
            "evaluation": {"prompts": PROMPTS, "maxNewTokens": 8},
            "tracking": {
                "mlflow": {"trackingUri": mlflow_server, "experiment": "results-test"},
                "wandb": {"project": "results-test", "mode": "offline"},
            },
        }
    )
    board = ProgressBoard()
    storage = Storage(tmp_path / "cache", {})
    inputs = prepare_inputs(cfg, storage, board)
    threads = torch.get_num_threads()
    try:
        rt = Runtime(tmp_path / "work", storage, board, StopRequest(), job_name="ns/results")
        msg = run(cfg, inputs, rt)
    finally:
        torch.set_num_threads(threads)
    assert msg.outcome == "Succeeded"

    # Base vs adapter, measured on the same held-out records.
    ev = msg.evaluation
    assert ev is not None
    assert ev.base_eval_loss is not None
    assert ev.eval_loss == pytest.approx(msg.eval_loss)
    assert ev.eval_loss is not None
    assert ev.eval_loss < ev.base_eval_loss  # it learned the colour task
    assert not ev.worse_than_base
    assert ev.summary.startswith(f"eval loss {ev.base_eval_loss:.3f} → {ev.eval_loss:.3f}")
    assert ev.vllm_loadable is True
    assert ev.vllm is not None
    assert ev.vllm.startswith("loads in vLLM: yes, plain LoRA, rank 16 on ")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["base_eval_loss"] == pytest.approx(ev.base_eval_loss)
    assert metrics["worse_than_base"] is False
    assert metrics["vllm"]["loads"] is True

    # The prompts, answered by both models.
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["prompt"] for s in samples] == PROMPTS
    assert all(isinstance(s["base"], str) and isinstance(s["adapter"], str) for s in samples)

    # Plots, embedded in the card, listed in the manifest (uploaded before it).
    card = (out / "README.md").read_text()
    assert f"**{ev.summary}** on the held-out split" in card
    assert "**loads in vLLM: yes, plain LoRA, rank 16" in card
    manifest = {f["path"] for f in json.loads((out / "manifest.json").read_text())["files"]}
    for name in ("loss", "learning_rate", "tokens_per_second"):
        assert f"(plots/{name}.png)" in card
        assert f"plots/{name}.png" in manifest
        assert (out / "plots" / f"{name}.png").read_bytes().startswith(b"\x89PNG")
    assert "samples.jsonl" in manifest
    assert "### Prompt 2" in card

    # TensorBoard event files under <output>/logs/, with the training curves in them.
    events = sorted((out / "logs").rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file under <output>/logs/"
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/learning_rate", "eval/loss", "eval/base_loss"} <= tags
    assert [e.step for e in acc.Scalars("train/loss")][-1] == 6
    assert "final/base_eval_loss" in tags

    # MLflow: the run with the spec as params, the curves and the adapter as an artifact.
    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("results-test")
    assert experiment is not None
    (mlrun,) = client.search_runs([experiment.experiment_id])
    assert mlrun.info.status == "FINISHED"
    assert mlrun.data.tags["lorajob.job"] == "ns/results"
    assert mlrun.data.params["spec.lora.r"] == "16"
    assert mlrun.data.params["learning_rate"] == "0.003"  # the Trainer's args, by MLflowCallback
    assert [m.step for m in client.get_metric_history(mlrun.info.run_id, "loss")][-1] == 6
    assert mlrun.data.metrics["final.base_eval_loss"] == pytest.approx(ev.base_eval_loss)
    artifacts = {a.path for a in client.list_artifacts(mlrun.info.run_id, "adapter")}
    assert {"adapter/adapter_model.safetensors", "adapter/README.md"} <= artifacts
    local = Path(
        client.download_artifacts(mlrun.info.run_id, "adapter/adapter_config.json", str(tmp_path))
    )
    assert json.loads(local.read_text())["r"] == 16

    # W&B offline: the run's transaction log is kept under <output>/logs/wandb for
    # `wandb sync`; it holds the Trainer's curves (WandbCallback) and the final numbers.
    (run_dir,) = (out / "logs" / "wandb").glob("offline-run-*")
    record = next(run_dir.glob("run-*.wandb")).read_bytes()
    for key in (b"train/loss", b"eval/loss", b"eval/base_loss", b"final/base_eval_loss"):
        assert key in record


def test_log_sync_uploads_new_and_changed_files_only(tmp_path: Path) -> None:
    storage = Storage(tmp_path / "cache", {})
    local, remote = tmp_path / "logs", tmp_path / "out" / "logs"
    (local / "run-a" / "attempt-1").mkdir(parents=True)
    events = local / "run-a" / "attempt-1" / "events.out.tfevents.1"
    events.write_bytes(b"one")
    sync = LogSync(storage, local, str(remote), every_s=3600)
    assert sync.sync(force=True) == 1
    assert (remote / "run-a" / "attempt-1" / "events.out.tfevents.1").read_bytes() == b"one"
    assert sync.sync() == 0  # within the interval: nothing is even looked at
    assert sync.sync(force=True) == 0  # nothing changed
    events.write_bytes(b"one two")
    (local / "run-a" / "attempt-2").mkdir()
    (local / "run-a" / "attempt-2" / "events.out.tfevents.2").write_bytes(b"x")
    assert sync.sync(force=True) == 2
    assert (remote / "run-a" / "attempt-1" / "events.out.tfevents.1").read_bytes() == b"one two"


def test_a_later_attempt_of_the_same_spec_resumes_its_mlflow_run(
    tmp_path: Path, mlflow_server: str
) -> None:
    """The MLflow run is found again by its tags: a retried attempt continues it (its
    params are already there), a changed spec records a new run."""
    spec: dict[str, Any] = {
        "model": {"uri": "/models/m"},
        "dataset": {"uri": "/data/d.jsonl"},
        "output": {"uri": str(tmp_path / "out")},
        "tracking": {
            "tensorboard": False,
            "mlflow": {"trackingUri": mlflow_server, "experiment": "resume-test"},
        },
    }
    storage = Storage(tmp_path / "cache", {})

    def attempt(cfg: TrainerConfig, n: int) -> str:
        tracker = Tracker(cfg, storage, tmp_path / "work", run_id="r", attempt=n, job_name="ns/j")
        tracker.start()
        active = mlflow.active_run()
        assert active is not None
        tracker.abort()  # the attempt is interrupted
        return str(active.info.run_id)

    cfg = TrainerConfig.model_validate(spec)
    first = attempt(cfg, 1)
    assert attempt(cfg, 2) == first
    client = MlflowClient(tracking_uri=mlflow_server)
    assert client.get_run(first).info.status == "KILLED"
    assert client.get_run(first).data.params["spec.lora.r"] == "16"
    changed = TrainerConfig.model_validate(spec | {"lora": {"r": 8}})
    second = attempt(changed, 3)
    assert second != first
    assert client.get_run(second).data.params["spec.lora.r"] == "8"


def test_log_sync_copies_event_files_to_s3_as_the_trainer_logs(
    tmp_path: Path, s3: S3Server
) -> None:
    """What `tensorboard --logdir s3://.../logs/` reads: the files appear under the prefix
    from the Trainer's log events (every `every_s`), not only at the end."""
    storage = Storage(tmp_path / "cache", s3.env())
    local = tmp_path / "logs"
    events = local / "run-a" / "attempt-1" / "events.out.tfevents.1"
    events.parent.mkdir(parents=True)
    sync = LogSync(storage, local, "s3://out/live/logs", every_s=0)
    state = TrainerState()
    events.write_bytes(b"step 1")
    sync.on_log(TrainingArguments(output_dir=str(tmp_path / "ckpt")), state, TrainerControl())
    listed = {o.name: o.size for o in storage.list_objects("s3://out/live/logs")}
    assert listed == {"run-a/attempt-1/events.out.tfevents.1": 6}
    events.write_bytes(b"step 1, step 2")
    sync.on_log(TrainingArguments(output_dir=str(tmp_path / "ckpt")), state, TrainerControl())
    listed = {o.name: o.size for o in storage.list_objects("s3://out/live/logs")}
    assert listed == {"run-a/attempt-1/events.out.tfevents.1": 14}
