"""A stand-in trainer that speaks the lora-trainer protocol in milliseconds.

The operator integration tests run it instead of `python -m lora_trainer`
(LORAJOB_TRAINER_COMMAND). It reads the same environment a real trainer gets,
serves /progress and /healthz, checkpoints, resumes, honours SIGTERM, and ends
with a TerminationMessage and an ExitCode, like the real one.

What it does is scripted per job by a JSON file in $FAKE_TRAINER_DIR named
`<namespace>__<name>.json` (all keys optional):

    steps            total optimizer steps (default: training.maxSteps or 20)
    step_seconds     time per step (default 0.05)
    fail             {"<attempt>": <exit code>}: fail that attempt...
    fail_at_step     ...when reaching this step (default: at once)
    hold_at_step     stop making progress at this step until the file
                     `<namespace>__<name>.release` appears in $FAKE_TRAINER_DIR

State that a real trainer keeps in object storage (the last checkpoint) lives
in `<namespace>__<name>.<run>.checkpoint`, one file per training run as the real
trainer keeps one namespace per run (`config.run_id`: a spec change that defines a
new run starts from step 0; a new run's first checkpoint deletes the other runs').
Every attempt appends a line `attempt=<n> resumed_from=<step>` to
`<namespace>__<name>.attempts`, and `attempt=<n> run=<run> resumed_from=<step>` to
`<namespace>__<name>.runs`.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from loraops_contract import protocol
from loraops_contract.config import TrainerConfig, run_id
from loraops_contract.protocol import AdapterInfo, ExitCode, Progress, TerminationMessage
from loraops_contract.reasons import Reason

# Which reason a scripted exit code reports.
_REASONS = {int(code): reason for reason, code in protocol.REASON_EXIT_CODES.items()}


class Fake:
    def __init__(self) -> None:
        self.config = TrainerConfig.model_validate_json(os.environ[protocol.ENV_CONFIG])
        namespace, _, name = os.environ[protocol.ENV_JOB_NAME].partition("/")
        self.attempt = int(os.environ.get(protocol.ENV_ATTEMPT, "1"))
        base = Path(os.environ["FAKE_TRAINER_DIR"]) / f"{namespace}__{name}"
        self.training_run = run_id(self.config)
        self.base = base
        self.checkpoint_file = base.with_suffix(f".{self.training_run}.checkpoint")
        self.release_file = base.with_suffix(".release")
        script_file = base.with_suffix(".json")
        self.script: dict[str, Any] = (
            json.loads(script_file.read_text()) if script_file.exists() else {}
        )
        self.steps = int(self.script.get("steps") or self.config.training.max_steps or 20)
        self.termination = Path(
            os.environ.get(protocol.ENV_TERMINATION_LOG, protocol.DEFAULT_TERMINATION_LOG)
        )
        self.stop = threading.Event()
        start = int(self.checkpoint_file.read_text()) if self.checkpoint_file.exists() else 0
        self.progress = Progress(
            stage="training",
            step=start,
            total_steps=self.steps,
            resumed_from_step=start or None,
            last_checkpoint=self.checkpoint_uri(start) if start else None,
        )
        with base.with_suffix(".attempts").open("a") as log:
            log.write(f"attempt={self.attempt} resumed_from={start}\n")
        with base.with_suffix(".runs").open("a") as log:
            log.write(f"attempt={self.attempt} run={self.training_run} resumed_from={start}\n")
        # Its log, as a trainer pod's (kubectl logs, kubectl lj logs) shows it.
        print(f"fake trainer: attempt {self.attempt} starts at step {start}", flush=True)

    def checkpoint_uri(self, step: int) -> str:
        return (
            f"{self.config.output.uri}/checkpoints/run-{self.training_run}/attempt-{self.attempt}/"
            f"checkpoint-{step}"
        )

    def save_checkpoint(self) -> None:
        step = self.progress.step
        if step:
            self.checkpoint_file.write_text(str(step))
            self.progress = self.progress.model_copy(
                update={"last_checkpoint": self.checkpoint_uri(step)}
            )
            for other in self.base.parent.glob(f"{self.base.name}.*.checkpoint"):
                if other != self.checkpoint_file:
                    other.unlink()  # superseded by this run, as the real trainer does

    def finish(self, message: TerminationMessage, code: int) -> None:
        self.termination.write_text(message.to_json())
        sys.exit(code)

    def run(self) -> None:
        step_seconds = float(self.script.get("step_seconds", 0.05))
        fail_code = (self.script.get("fail") or {}).get(str(self.attempt))
        fail_at = int(self.script.get("fail_at_step") or 0)
        hold_at = int(self.script.get("hold_at_step") or 0)
        every = self.config.training.checkpoint_every_steps
        while self.progress.step < self.steps:
            if self.stop.is_set():
                self.interrupted()
            if fail_code is not None and self.progress.step >= fail_at:
                self.fail(int(fail_code))
            if hold_at and self.progress.step >= hold_at and not self.release_file.exists():
                time.sleep(0.05)
                continue
            time.sleep(step_seconds)
            step = self.progress.step + 1
            self.progress = self.progress.model_copy(
                update={
                    "step": step,
                    "loss": round(3.0 / (1 + step), 4),
                    "tokens_per_second": 1000.0,
                    "eta_seconds": (self.steps - step) * step_seconds,
                    "updated_at": datetime.now(UTC).isoformat(),
                }
            )
            if step % every == 0:
                self.save_checkpoint()
        self.save_checkpoint()
        adapter = AdapterInfo(
            uri=self.config.output.uri,
            manifest_uri=f"{self.config.output.uri}/{protocol.MANIFEST_NAME}",
            sha256="0" * 64,
            size=4096,
            files=6,
        )
        self.progress = self.progress.model_copy(update={"stage": "done"})
        self.finish(
            TerminationMessage(
                outcome="Succeeded",
                message="adapter uploaded",
                adapter=adapter,
                steps=self.progress.step,
                train_loss=self.progress.loss,
                last_checkpoint=self.progress.last_checkpoint,
            ),
            ExitCode.OK,
        )

    def interrupted(self) -> None:
        self.save_checkpoint()
        self.finish(
            TerminationMessage(
                outcome="Failed",
                reason=Reason.INTERRUPTED,
                message=f"SIGTERM at step {self.progress.step}; checkpoint saved",
                retryable=True,
                last_checkpoint=self.progress.last_checkpoint,
            ),
            ExitCode.INTERRUPTED,
        )

    def fail(self, code: int) -> None:
        reason = _REASONS.get(code, Reason.INTERNAL_ERROR)
        self.finish(
            TerminationMessage(
                outcome="Failed",
                reason=reason,
                message=f"scripted failure with exit code {code} at step {self.progress.step}",
                hint="this is the fake trainer",
                retryable=code not in protocol.PERMANENT_EXIT_CODES,
                last_checkpoint=self.progress.last_checkpoint,
            ),
            code,
        )


def serve(fake: Fake) -> None:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == protocol.PROGRESS_PATH:
                body = fake.progress.to_json().encode()
            elif self.path == protocol.HEALTH_PATH:
                body = b"ok"
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    host = os.environ.get(protocol.ENV_PROGRESS_HOST, "127.0.0.1")
    port = int(os.environ.get(protocol.ENV_PROGRESS_PORT, protocol.DEFAULT_PROGRESS_PORT))
    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()


def main() -> None:
    fake = Fake()
    signal.signal(signal.SIGTERM, lambda *_: fake.stop.set())
    serve(fake)
    fake.run()


if __name__ == "__main__":
    main()
