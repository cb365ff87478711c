"""Run `python -m lora_trainer` as a child process the way a pod would, and watch it."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from devcluster.s3 import free_port


@dataclass
class TrainerRun:
    proc: subprocess.Popen[str]
    termination_log: Path
    progress_url: str
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def progress(self) -> dict[str, Any] | None:
        try:
            with urllib.request.urlopen(self.progress_url, timeout=1) as resp:
                data: dict[str, Any] = json.loads(resp.read())
                return data
        except OSError:
            return None

    def wait_until(self, predicate: Callable[[], bool], timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"trainer exited {self.proc.returncode} early:\n{self.log_text()[-4000:]}"
                )
            time.sleep(0.02)
        raise TimeoutError("condition not reached")

    def wait_resumed(self, steps: int, timeout: float) -> dict[str, Any]:
        """Wait until the run has resumed from a checkpoint and trained `steps` steps past
        it; returns the progress that showed it (its `resumedFromStep` is the resume step)."""
        seen: dict[str, Any] = {}

        def moved_past_resume() -> bool:
            p = self.progress() or {}
            resumed_from = p.get("resumedFromStep")
            if resumed_from is not None and p.get("step", 0) >= resumed_from + steps:
                seen.update(p)
                return True
            return False

        self.wait_until(moved_past_resume, timeout)
        return seen

    def finish(self, timeout: float = 300) -> tuple[int, str, dict[str, Any] | None]:
        try:
            self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        err = self.log_text()
        term = (
            json.loads(self.termination_log.read_text()) if self.termination_log.exists() else None
        )
        return self.proc.returncode, err, term


def start_trainer(
    args: list[str], env: dict[str, str], work: Path, name: str = "run"
) -> TrainerRun:
    work.mkdir(parents=True, exist_ok=True)
    term = work / f"{name}-termination-log"
    term.unlink(missing_ok=True)
    port = free_port()
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("LORA_TRAINER_", "AWS_"))}
    full_env |= {
        "LORA_TRAINER_TERMINATION_LOG": str(term),
        "LORA_TRAINER_PROGRESS_HOST": "127.0.0.1",
        "LORA_TRAINER_PROGRESS_PORT": str(port),
        "LORA_TRAINER_WORK_DIR": str(work / f"{name}-scratch"),
        "LORA_TRAINER_CACHE_DIR": str(work / "cache"),
        # Two cores shared with other work: keep torch from oversubscribing them.
        "OMP_NUM_THREADS": "2",
        **env,
    }
    log = work / f"{name}.log"
    with log.open("w") as log_fh:  # a file, not a pipe: nobody has to drain it
        proc = subprocess.Popen(
            [sys.executable, "-m", "lora_trainer", *args],
            env=full_env,
            stdout=log_fh,
            stderr=subprocess.STDOUT,
            text=True,
        )
    return TrainerRun(proc, term, f"http://127.0.0.1:{port}/progress", log)


@contextlib.contextmanager
def reaped(run: TrainerRun) -> Any:
    """Never leave a trainer process behind, whatever the test does."""
    try:
        yield run
    finally:
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.wait()
