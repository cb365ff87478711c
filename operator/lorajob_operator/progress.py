"""Live trainer progress: read it from the pod, and decide when status gets a copy.

The trainer serves `GET http://<podIP>:<port>/progress` (lora_trainer.protocol).
Reading is cheap, writing status is not (every write is an etcd revision and a
watch event for every client), so `status_progress()` copies only what changed
and at most once per `min_interval` seconds.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import aiohttp
from lora_trainer.protocol import PROGRESS_PATH, Progress
from pydantic import ValidationError

__all__ = ["ProgressError", "ProgressReader", "rounded", "status_progress"]

# Fields of status.progress that count as "changed" (lastUpdated does not).
_COMPARED = ("stage", "step", "totalSteps", "percent", "epoch", "loss", "evalLoss")
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


def _as_status(progress: Progress) -> dict[str, Any]:
    """The status.progress form (camelCase, rounded, no None values)."""
    total = progress.total_steps if progress.total_steps and progress.total_steps > 0 else None
    percent = None
    if total:
        percent = round(min(100.0, max(0.0, 100.0 * progress.step / total)), 1)
    out: dict[str, Any] = {
        # The trainer image may be the user's own: keep what it says short.
        "stage": progress.stage[:MAX_STAGE_LENGTH],
        "step": max(0, progress.step),
        "totalSteps": total,
        "percent": percent,
        "epoch": rounded(progress.epoch, 3),
        "loss": rounded(progress.loss, 4),
        "evalLoss": rounded(progress.eval_loss, 4),
        "tokensPerSecond": rounded(progress.tokens_per_second, 1),
        "etaSeconds": rounded(progress.eta_seconds, 0),
    }
    return {k: v for k, v in out.items() if v is not None}


def status_progress(
    progress: Progress,
    previous: Mapping[str, Any] | None,
    now: datetime,
    min_interval: float,
) -> dict[str, Any] | None:
    """The new status.progress, or None when nothing changed or it is too soon.

    Throughput and ETA jitter on every read, so they never make an update by
    themselves; they ride along when step, loss or stage move.
    """
    current = _as_status(progress)
    previous = previous or {}
    if all(current.get(k) == previous.get(k) for k in _COMPARED):
        return None
    last = previous.get("lastUpdated")
    if isinstance(last, str) and last:
        try:
            when = datetime.fromisoformat(last.replace("Z", "+00:00"))
        except ValueError:
            when = None
        if when is not None and (now - when).total_seconds() < min_interval:
            return None
    current["lastUpdated"] = now.strftime("%Y-%m-%dT%H:%M:%SZ")
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
