"""SIGTERM/SIGINT handling: stop at a step boundary with a checkpoint, or stop now.

Before training starts there is nothing worth saving, so the signal interrupts
the main thread at once (raising `Interrupted`). Once training runs, the signal
only sets a flag: the training callback saves a checkpoint after the current
step and ends the loop, and the run exits with `ExitCode.INTERRUPTED`.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

from lora_trainer.errors import Interrupted

__all__ = ["StopRequest"]

log = logging.getLogger(__name__)


class StopRequest:
    def __init__(self) -> None:
        self._event = threading.Event()
        self.training = False  # set by train.py once the Trainer loop owns stopping
        self.signal_name: str | None = None

    @property
    def requested(self) -> bool:
        return self._event.is_set()

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
        if self.training and first:
            log.warning("%s received: saving a checkpoint after the current step", name)
            return
        log.warning("%s received: stopping", name)
        raise Interrupted(f"stopped by {name} before training started")
