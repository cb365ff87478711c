"""The trainer's live progress, as the operator sees it: read from the pod, and copied
into status.progress when it moved (the trainer's side, which serves it, is
lora_trainer/progress.py).

The trainer serves `GET http://<podIP>:<port>/progress` (loraops_contract.protocol).
Reading is cheap, writing status is not (every write is an etcd revision and a
watch event for every client), so `status_progress()` copies only what changed
and at most once per `min_interval` seconds.
"""

from __future__ import annotations

import ipaddress
import math
from datetime import datetime

import aiohttp
from loraops_contract.protocol import PROGRESS_PATH, Progress
from pydantic import ValidationError

from lorajob_operator.api import ProgressStatus, format_time, parse_time

__all__ = ["ProgressError", "ProgressReader", "rounded", "status_progress"]

# Fields of status.progress that count as "changed" (lastUpdated does not).
_COMPARED = ("stage", "step", "total_steps", "percent", "epoch", "loss", "eval_loss")
# Largest progress document we accept; the trainer's is a few hundred bytes.
_MAX_BODY = 64 * 1024
MAX_STAGE_LENGTH = 32


class ProgressError(Exception):
    """The pod's progress endpoint could not be read (yet)."""


def rounded(value: float | None, digits: int) -> float | None:
    """`value` rounded for status (what `kubectl get lj` prints), None if not finite."""
    if value is None or not math.isfinite(value):
        return None
    return round(value, digits)


def _as_status(progress: Progress) -> ProgressStatus:
    """The status.progress form: rounded, with the fields the trainer reported (a field
    without a value is not set, so writing it keeps what status has)."""
    total = progress.total_steps if progress.total_steps and progress.total_steps > 0 else None
    out = ProgressStatus(
        # The trainer image may be the user's own: keep what it says short.
        stage=progress.stage[:MAX_STAGE_LENGTH],
        step=max(0, progress.step),
    )
    if total:
        out.total_steps = total
        out.percent = round(min(100.0, max(0.0, 100.0 * progress.step / total)), 1)
    if (epoch := rounded(progress.epoch, 3)) is not None:
        out.epoch = epoch
    if (loss := rounded(progress.loss, 4)) is not None:
        out.loss = loss
    if (eval_loss := rounded(progress.eval_loss, 4)) is not None:
        out.eval_loss = eval_loss
    if (speed := rounded(progress.tokens_per_second, 1)) is not None:
        out.tokens_per_second = speed
    if (eta := rounded(progress.eta_seconds, 0)) is not None:
        out.eta_seconds = eta
    if progress.strategy:
        out.strategy = progress.strategy[:MAX_STAGE_LENGTH]
    if progress.ranks and progress.ranks > 0:
        out.ranks = progress.ranks
    if progress.global_batch_size and progress.global_batch_size > 0:
        out.global_batch_size = progress.global_batch_size
    return out


def status_progress(
    progress: Progress,
    previous: ProgressStatus | None,
    now: datetime,
    min_interval: float,
) -> ProgressStatus | None:
    """The new status.progress, or None when nothing changed or it is too soon.

    Throughput and ETA jitter on every read, so they never make an update by
    themselves; they ride along when step, loss or stage move.
    """
    current = _as_status(progress)
    previous = previous or ProgressStatus()
    if all(getattr(current, k) == getattr(previous, k) for k in _COMPARED):
        return None
    when = parse_time(previous.last_updated)
    if when is not None and (now - when).total_seconds() < min_interval:
        return None
    current.last_updated = format_time(now)
    return current


class ProgressReader:
    """Reads `Progress` from trainer pods over one pooled HTTP session."""

    def __init__(self, port: int, timeout: float = 3.0) -> None:
        self.port = port
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def url(self, pod_ip: str) -> str:
        host = f"[{pod_ip}]" if ipaddress.ip_address(pod_ip).version == 6 else pod_ip
        return f"http://{host}:{self.port}{PROGRESS_PATH}"

    async def read(self, pod_ip: str) -> Progress:
        """GET the pod's progress; raises ProgressError on any failure."""
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self.timeout)
        try:
            url = self.url(pod_ip)
            async with self._session.get(url) as resp:
                if resp.status != 200:
                    raise ProgressError(f"{url} answered HTTP {resp.status}")
                body = await resp.content.read(_MAX_BODY + 1)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise ProgressError(f"cannot read progress from {pod_ip}: {exc!r}") from exc
        if len(body) > _MAX_BODY:
            raise ProgressError(f"progress document from {pod_ip} is larger than {_MAX_BODY} bytes")
        try:
            return Progress.model_validate_json(body)
        except ValidationError as exc:
            raise ProgressError(f"malformed progress document from {pod_ip}: {exc}") from exc
