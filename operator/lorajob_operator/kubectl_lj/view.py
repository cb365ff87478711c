"""How the plugin shows a job: pure functions of its body (status as the operator writes it)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "BAR_WIDTH",
    "FINISHED",
    "current_attempt",
    "finished",
    "job_key",
    "progress_line",
    "why_report",
]

FINISHED = ("Succeeded", "Failed")
BAR_WIDTH = 24


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def progress_line(job: Mapping[str, Any], width: int = BAR_WIDTH) -> str:
    """One line per job: phase, a progress bar, step, loss, tokens/s and ETA."""
    meta = job.get("metadata") or {}
    status = job.get("status") or {}
    progress = status.get("progress") or {}
    phase = status.get("phase") or "Pending"
    step, total = progress.get("step") or 0, progress.get("totalSteps")
    ratio = 1.0 if phase == "Succeeded" else (min(1.0, step / total) if total else 0.0)
    filled = round(ratio * width)
    bar = "[" + "#" * filled + "-" * (width - filled) + "]"
    loss = progress.get("loss")
    tps = progress.get("tokensPerSecond")
    eta = 0.0 if phase in FINISHED else progress.get("etaSeconds")
    steps = f"{step}/{total}" if total else "-"
    ready = status.get("ranksReady")
    ranks = f"  ranks {ready}" if ready and phase not in FINISHED else ""
    detail = ""
    if phase not in ("Running", "Succeeded"):
        reason = _waiting_reason(status)
        detail = f"  ({reason})" if reason else ""
    return (
        f"{meta.get('namespace', '')}/{meta.get('name', '')}  {phase:<9} {bar} {ratio:4.0%}"
        f"  step {steps:>9}  loss {'-' if loss is None else f'{loss:.4f}':>7}"
        f"  tok/s {'-' if tps is None else f'{tps:.0f}':>6}  eta {_duration(eta)}{ranks}{detail}"
    )


def _waiting_reason(status: Mapping[str, Any]) -> str:
    if status.get("phase") == "Failed":
        return str(status.get("failureReason") or "")
    for ctype in ("Stalled", "Suspended", "Queued", "Reconciling"):
        for cond in status.get("conditions") or []:
            if cond.get("type") == ctype and cond.get("status") == "True":
                return str(cond.get("reason") or "")
    return ""


def why_report(job: Mapping[str, Any], log: Sequence[str] | None, pod: str | None) -> str:
    """Why the job is where it is: failure reason, message, hint, and the log tail."""
    meta = job.get("metadata") or {}
    status = job.get("status") or {}
    phase = status.get("phase") or "Pending"
    name = f"{meta.get('namespace')}/{meta.get('name')}"
    lines: list[str] = []
    if phase == "Failed":
        lines.append(f"lorajob {name} failed: {status.get('failureReason') or 'unknown reason'}")
        lines.append(f"  message: {status.get('failureMessage') or '-'}")
        lines.append(f"  hint:    {status.get('hint') or '-'}")
    elif phase == "Succeeded":
        adapter = (status.get("adapter") or {}).get("uri", "-")
        lines.append(f"lorajob {name} succeeded: the adapter is at {adapter}")
    else:
        stalled = _condition(status, "Stalled")
        waiting = stalled or _condition(status, "Suspended") or _condition(status, "Queued")
        running = _condition(status, "Running")
        if waiting is not None:
            what = "cannot run" if stalled else phase.lower()
            lines.append(f"lorajob {name} {what}: {waiting.get('reason')}")
            lines.append(f"  message: {waiting.get('message') or '-'}")
            if status.get("hint"):
                lines.append(f"  hint:    {status['hint']}")
        elif running is not None:
            lines.append(f"lorajob {name} is running: {running.get('message') or '-'}")
        else:
            lines.append(f"lorajob {name} is {phase.lower()}")
    lines.append(
        f"  attempts: {status.get('attempts', 0)} (failed {status.get('failedAttempts', 0)}, "
        f"disruptions {status.get('disruptions', 0)})"
    )
    lines.extend(_rank_lines(status))
    if pod is None:
        lines.append("no trainer pod to read logs from")
    elif log is None:
        lines.append(f"the log of pod {pod} cannot be read (the pod is gone or not started)")
    else:
        lines.append(f"last {len(log)} log lines of pod {pod}:")
        lines.extend(f"  {line}" for line in log)
    return "\n".join(lines)


def _rank_lines(status: Mapping[str, Any]) -> list[str]:
    """A job on several nodes: each node rank's pod, node and state in the latest attempt."""
    ranks = status.get("ranks") or []
    if not ranks:
        return []
    lines = [f"  ranks:    {status.get('ranksReady') or '-'} running"]
    lines.extend(
        f"    rank {r.get('rank')}  {r.get('state', '-'):<11} pod {r.get('pod', '-')}"
        f"  node {r.get('node') or '-'}"
        for r in ranks
    )
    return lines


def _condition(status: Mapping[str, Any], ctype: str) -> Mapping[str, Any] | None:
    for cond in status.get("conditions") or []:
        if cond.get("type") == ctype and cond.get("status") == "True":
            return dict(cond)
    return None


def current_attempt(job: Mapping[str, Any]) -> int:
    return int((job.get("status") or {}).get("attempts") or 0)


def job_key(job: Mapping[str, Any]) -> tuple[str, str]:
    meta = job.get("metadata") or {}
    return str(meta.get("namespace", "")), str(meta.get("name", ""))


def finished(job: Mapping[str, Any]) -> bool:
    return (job.get("status") or {}).get("phase") in FINISHED
