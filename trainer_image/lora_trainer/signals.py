"""SIGTERM/SIGINT handling: stop at a step boundary with a checkpoint, or stop now.

What a signal does depends on the run's phase (`StopRequest.phase`):

* "starting": nothing is worth saving yet, so the signal interrupts the main
  thread at once (raising `Interrupted`).
* "training": the signal only sets a flag; the training callback saves a
  checkpoint after the current step and ends the loop, and the run exits with
  `ExitCode.INTERRUPTED`.
* "finishing": training is over and its final checkpoint is complete; the
  signal interrupts evaluation/publishing at once, and the next attempt
  publishes from that checkpoint without training again.

The message names the signal and the phase it arrived in, so a log never says
"before training started" about a run that had finished training.

With several ranks, one that stops because another got the signal first
(`follow`) stops like one that got it: a checkpoint after the same step. Its own
SIGTERM, which torchrun sends every rank, still counts as the first signal, so it
does not interrupt that checkpoint.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Literal

from lora_trainer.errors import Interrupted

__all__ = ["Phase", "StopRequest"]

log = logging.getLogger(__name__)

Phase = Literal["starting", "training", "finishing"]


class StopRequest:
    def __init__(self) -> None:
        self._event = threading.Event()
        self._followed = False
        self.phase: Phase = "starting"  # advanced by train.py
        self.signal_name: str | None = None
        # What "finishing" is about, for the interruption message (set by train.py).
        self.finishing_detail = ""

    @property
    def requested(self) -> bool:
        return self._event.is_set() or self._followed

    def follow(self) -> None:
        """Stop because another rank was asked to (lora_trainer.distributed.agree)."""
        if not self.requested:
            log.warning("another rank was asked to stop: saving a checkpoint with it")
            self._followed = True
            self.signal_name = self.signal_name or "SIGTERM (to another rank)"

    @property
    def training(self) -> bool:
        return self.phase == "training"

    def finishing(self, detail: str) -> None:
        """Training is over; from now on a signal stops evaluation/publishing at once."""
        self.phase = "finishing"
        self.finishing_detail = detail

    def install(self) -> StopRequest:
        """Install the handlers (main thread only)."""
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        first = not self._event.is_set()
        self._event.set()
        self.signal_name = name
        if self.phase == "training" and first:
            log.warning("%s received: saving a checkpoint after the current step", name)
            return
        log.warning("%s received: stopping", name)
        raise Interrupted(self.message(name))

    def message(self, name: str) -> str:
        """Why the run stopped, for a signal `name` arriving now."""
        if self.phase == "finishing":
            detail = f" ({self.finishing_detail})" if self.finishing_detail else ""
            return f"stopped by {name} after training, before the adapter was published{detail}"
        if self.phase == "training":  # a second signal while the checkpoint is being saved
            return f"stopped by {name} (second signal) while saving a checkpoint"
        return f"stopped by {name} before training started"
