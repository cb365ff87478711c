"""The final word: the container's termination message and the matching exit code."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from loraops_contract.protocol import (
    DEFAULT_TERMINATION_LOG,
    ENV_TERMINATION_LOG,
    TERMINATION_MESSAGE_LIMIT,
    TerminationMessage,
)

from lora_trainer.errors import TrainerError, scrub, shorten

__all__ = ["failure_message", "termination_log_path", "write_termination_message"]

log = logging.getLogger(__name__)


def termination_log_path() -> Path:
    return Path(os.environ.get(ENV_TERMINATION_LOG) or DEFAULT_TERMINATION_LOG)


def failure_message(err: TrainerError, **extra: object) -> TerminationMessage:
    return TerminationMessage.model_validate(
        {
            "outcome": "Failed",
            "reason": err.reason.value,
            "message": err.message,
            "hint": err.hint,
            "retryable": err.retryable,
            **extra,
        }
    )


def encode(msg: TerminationMessage) -> str:
    """JSON under Kubernetes' 4 KiB limit: the message text is shortened if needed (at a
    sentence or word boundary, its beginning kept: that is where the cause is)."""
    msg = msg.model_copy(update={"message": scrub(msg.message)})
    text = msg.to_json()
    while len(text.encode()) > TERMINATION_MESSAGE_LIMIT and msg.message:
        excess = len(text.encode()) - TERMINATION_MESSAGE_LIMIT
        # Characters may take several bytes: cut by the byte excess (at least that many
        # characters go), and loop until it fits.
        keep = max(0, len(msg.message) - excess - 4)
        msg = msg.model_copy(update={"message": shorten(msg.message, keep) if keep else ""})
        text = msg.to_json()
    return text


def write_termination_message(msg: TerminationMessage, path: Path | None = None) -> None:
    """Write the message; outside Kubernetes the default path may be unwritable (fine)."""
    target = path or termination_log_path()
    text = encode(msg)
    try:
        target.write_text(text)
    except OSError as e:
        if target != Path(DEFAULT_TERMINATION_LOG):
            log.warning("could not write termination message to %s: %s", target, e)
    level = logging.INFO if msg.outcome == "Succeeded" else logging.ERROR
    log.log(level, "outcome: %s", text)
