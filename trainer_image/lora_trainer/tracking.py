"""Experiment tracking, through each tool's own library: TensorBoard event files, MLflow
and Weights & Biases runs, fed by transformers' own callbacks (TensorBoardCallback,
MLflowCallback, WandbCallback) with the Trainer's logs.

* TensorBoard (spec.tracking.tensorboard, on by default): event files are written
  locally under logs/run-<run>/attempt-<N>/ and copied to <output.uri>/logs/ at most
  every UPLOAD_EVERY_S seconds while the job trains, so `tensorboard --logdir
  <output.uri>/logs/` shows live curves (each attempt of a resumed run is one
  TensorBoard run, continuing at its step).
* MLflow (spec.tracking.mlflow): one MLflow run per job spec, found again by its tags
  when an attempt resumes; the Trainer's arguments and the spec are its params, the
  logs its metrics, and at the end the base/adapter eval losses and the adapter's files
  (as the artifact `adapter/`). Credentials come from the env (MLFLOW_TRACKING_USERNAME
  and _PASSWORD, or _TOKEN), which MLflow reads itself.
* W&B (spec.tracking.wandb): WANDB_API_KEY from the env; offline mode writes the run
  under the logs directory, so it is uploaded with the TensorBoard files for a later
  `wandb sync`.
"""

# Each hook must keep TrainerCallback's full signature, used parts or not; mlflow, wandb
# and tensorboard are imported only by the jobs that use them.
# ruff: noqa: ARG002, PLC0415

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from loraops_contract.config import MlflowSpec, TrainerConfig, WandbSpec, canonical_digest
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.integrations.integration_utils import (
    MLflowCallback,
    TensorBoardCallback,
    WandbCallback,
)

from lora_trainer.errors import CredentialsError, StorageError, shorten
from lora_trainer.storage import Storage, join_uri

__all__ = ["LOGS_DIR", "UPLOAD_EVERY_S", "LogSync", "Tracker"]

log = logging.getLogger(__name__)

LOGS_DIR = "logs"
# How often the event files are copied up while training: fresh enough for a live view,
# rare enough that the copies cost nothing next to a training step.
UPLOAD_EVERY_S = 30.0
# MLflow tags that find a job's run again when a later attempt resumes it.
TAG_JOB = "lorajob.job"
TAG_CONFIG = "lorajob.config"
TAG_RUN = "lorajob.run"
# MLflow refuses longer param values.
_MAX_PARAM = 500


class LogSync(TrainerCallback):
    """Copies new and changed files under `local_dir` to `remote_uri`, at most every
    `every_s` seconds from the Trainer's log events, and whenever `sync(force=True)`."""

    def __init__(
        self, storage: Storage, local_dir: Path, remote_uri: str, every_s: float | None = None
    ) -> None:
        self.storage = storage
        self.local_dir = local_dir
        self.remote_uri = remote_uri
        self.every_s = UPLOAD_EVERY_S if every_s is None else every_s
        self._sent: dict[Path, tuple[int, int]] = {}
        self._last = 0.0

    def sync(self, *, force: bool = False) -> int:
        """Upload what changed since the last sync; returns how many files went up."""
        now = time.monotonic()
        if not force and now - self._last < self.every_s:
            return 0
        self._last = now
        sent = 0
        for path in _files(self.local_dir):
            st = path.stat()
            stamp = (st.st_size, st.st_mtime_ns)
            if self._sent.get(path) == stamp:
                continue
            rel = path.relative_to(self.local_dir).as_posix()
            self.storage.put_file(path, join_uri(self.remote_uri, rel))
            self._sent[path] = stamp
            sent += 1
        return sent

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if state.is_world_process_zero:
            self.sync()

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if state.is_world_process_zero:
            self.sync(force=True)


def _files(root: Path) -> Iterator[Path]:
    if root.is_dir():
        yield from sorted(p for p in root.rglob("*") if p.is_file())


class Tracker:
    """One attempt's tracking: the callbacks to train with, then the final record."""

    def __init__(
        self,
        cfg: TrainerConfig,
        storage: Storage,
        work_dir: Path,
        *,
        run_id: str,
        attempt: int,
        job_name: str | None,
    ) -> None:
        self.cfg = cfg
        self.job_name = job_name
        self.logs_dir = work_dir / LOGS_DIR
        self.run_dir = self.logs_dir / f"run-{run_id}" / f"attempt-{attempt}"
        self.run_id = run_id
        self.attempt = attempt
        self.sync = LogSync(storage, self.logs_dir, join_uri(cfg.output.uri, LOGS_DIR))
        self._tb: Any = None
        self._mlflow: Any = None  # the mlflow module, once a run is active
        self._wandb: Any = None

    @property
    def enabled(self) -> bool:
        t = self.cfg.tracking
        return t.tensorboard or t.mlflow is not None or t.wandb is not None

    def start(self) -> list[TrainerCallback]:
        """Open the runs; returns the callbacks that feed them from the Trainer's logs."""
        t = self.cfg.tracking
        callbacks: list[TrainerCallback] = []
        if t.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._tb = SummaryWriter(log_dir=str(self.run_dir))
            callbacks.append(TensorBoardCallback(tb_writer=self._tb))  # type: ignore[no-untyped-call]
            log.info(
                "TensorBoard: event files under %s (tensorboard --logdir %s)",
                self.run_dir,
                self.sync.remote_uri,
            )
        if t.mlflow is not None:
            self._mlflow = _start_mlflow(t.mlflow, self.cfg, self.job_name, self.run_id)
            callbacks.append(MLflowCallback())  # type: ignore[no-untyped-call]
        if t.wandb is not None:
            self._wandb = _start_wandb(t.wandb, self.cfg, self.logs_dir, self.job_name)
            callbacks.append(WandbCallback())  # type: ignore[no-untyped-call]
        if self.enabled:
            callbacks.append(self.sync)
        return callbacks

    def finish(self, final: dict[str, float | None], adapter_dir: Path) -> None:
        """Record the final numbers (base vs adapter eval loss, ...) and the adapter's
        files, close the runs and upload the logs a last time."""
        numbers = {k: v for k, v in final.items() if isinstance(v, int | float)}
        step = int(numbers.get("steps", 0))
        if self._tb is not None:
            # TensorBoardCallback closes its writer at the end of training: reopen it.
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(log_dir=str(self.run_dir))
            for key, value in numbers.items():
                writer.add_scalar(f"final/{key}", value, step)
            writer.close()
        if self._mlflow is not None:
            mlflow = self._mlflow
            mlflow.log_metrics({f"final.{k}": v for k, v in numbers.items()}, step=step)
            mlflow.log_artifacts(str(adapter_dir), artifact_path="adapter")
            mlflow.end_run(status="FINISHED")
            log.info("MLflow: run finished with the adapter as artifact adapter/")
            self._mlflow = None
        if self._wandb is not None:
            self._wandb.summary.update({f"final/{k}": v for k, v in numbers.items()})
            _finish_wandb(self._wandb, exit_code=0)
            self._wandb = None
        if self.enabled:
            self.sync.sync(force=True)

    def abort(self) -> None:
        """The attempt ends without an adapter: close the runs (a later attempt resumes
        the MLflow run) and upload what the logs hold. Never raises: the attempt's own
        error is what gets reported."""
        try:
            if self._mlflow is not None:
                self._mlflow.end_run(status="KILLED")
            if self._wandb is not None:
                _finish_wandb(self._wandb, exit_code=1)
                self._wandb = None
            if self.enabled:
                self.sync.sync(force=True)
        except Exception:  # the tracking server or the store may be what failed
            log.warning("tracking: could not close the runs cleanly", exc_info=True)


# --------------------------------------------------------------------------- MLflow


def config_digest(cfg: TrainerConfig) -> str:
    """The whole trainer config's hash: an MLflow run is resumed only under the very
    same config, whose params it already holds (MLflow refuses a changed param)."""
    return canonical_digest(cfg.to_wire())


def spec_params(cfg: TrainerConfig) -> dict[str, str]:
    """The spec, flattened to MLflow params ("spec.lora.r": "16")."""
    out: dict[str, str] = {}

    def walk(value: Any, path: str) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(item, f"{path}.{key}")
        else:
            out[path] = shorten(
                json.dumps(value) if isinstance(value, list) else str(value), _MAX_PARAM
            )

    walk(cfg.to_wire(), "spec")
    return out


def _start_mlflow(spec: MlflowSpec, cfg: TrainerConfig, job_name: str | None, run: str) -> Any:
    """Start (or, for a later attempt of the same spec, resume) the job's MLflow run as
    the active run, which MLflowCallback then logs into."""
    import mlflow
    from mlflow.exceptions import MlflowException

    digest = config_digest(cfg)
    job = job_name or "local"
    try:
        mlflow.set_tracking_uri(spec.tracking_uri)
        experiment = mlflow.set_experiment(spec.experiment)
        found = mlflow.search_runs(
            experiment_ids=[experiment.experiment_id],
            filter_string=f"tags.`{TAG_JOB}` = '{_quote(job)}' "
            f"and tags.`{TAG_CONFIG}` = '{digest}'",
            max_results=1,
            output_format="list",
        )
        if found:
            active = mlflow.start_run(run_id=found[0].info.run_id)
            log.info("MLflow: resuming run %s", active.info.run_id)
        else:
            active = mlflow.start_run(
                run_name=job.replace("/", "-"),
                tags={TAG_JOB: job, TAG_CONFIG: digest, TAG_RUN: run},
            )
            mlflow.log_params(spec_params(cfg))
            log.info(
                "MLflow: run %s in experiment %s at %s",
                active.info.run_id,
                spec.experiment,
                spec.tracking_uri,
            )
    except MlflowException as e:
        raise _mlflow_error(e, spec) from e
    return mlflow


def _quote(text: str) -> str:
    return text.replace("\\", "\\\\").replace("'", "\\'")


def _mlflow_error(e: Any, spec: MlflowSpec) -> Exception:
    status = e.get_http_status_code() if hasattr(e, "get_http_status_code") else None
    what = f"MLflow at spec.tracking.mlflow.trackingUri {spec.tracking_uri}: {shorten(str(e))}"
    if status in (401, 403):
        return CredentialsError(
            what,
            hint="Check spec.tracking.mlflow.credentialsSecret: the Secret must hold "
            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN, "
            "valid for this server.",
        )
    return StorageError(
        what,
        hint="A tracking server or network error; the operator retries. Check that the pod "
        "reaches spec.tracking.mlflow.trackingUri.",
    )


# --------------------------------------------------------------------------- W&B


def _finish_wandb(run: Any, exit_code: int) -> None:
    """Finish the run, then stop wandb's background service (wandb-core) now rather than
    at interpreter exit: the run is this process's last use of it, and a process that
    trains in-process (the tests, a notebook) must not leave the service behind."""
    import wandb

    run.finish(exit_code=exit_code)
    wandb.teardown(exit_code=exit_code)


def _start_wandb(spec: WandbSpec, cfg: TrainerConfig, logs_dir: Path, job_name: str | None) -> Any:
    """Start the job's W&B run (resumed by id on a later attempt of the same spec); the
    WandbCallback then logs into it."""
    import wandb

    logs_dir.mkdir(parents=True, exist_ok=True)
    run_id = f"{(job_name or 'local').replace('/', '-')}-{config_digest(cfg)}"
    run = wandb.init(
        project=spec.project,
        entity=spec.entity,
        mode=spec.mode,
        dir=str(logs_dir),
        id=run_id[:128],
        resume="allow",
        name=job_name,
        config=cfg.to_wire(),
    )
    log.info("W&B: run %s (%s) in project %s", run.id, spec.mode, spec.project)
    return run
