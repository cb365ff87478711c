"""Backoff: how long to wait before trying again, the one place it is computed.

Every retry in the operator doubles its interval up to a cap: a failed attempt before
the next (spec.backoffLimit's retries), a reconciliation that raised, a pod watch that
broke (`exponential`, counted); a job that waits for something outside it, a Secret or
quota room (`open_ended`, from how long it has waited).
"""

from __future__ import annotations

from datetime import datetime

__all__ = ["exponential", "open_ended"]


def exponential(failures: int, base: float, cap: float) -> float:
    """Seconds before retry number `failures` (1-based): base, 2 x base, ... up to cap."""
    if failures <= 0:
        return 0.0
    return float(min(cap, base * 2 ** min(failures - 1, 30)))


def open_ended(since: datetime | None, now: datetime, low: float, high: float) -> float:
    """Seconds before looking again at a wait without a counter (missing Secret, quota).

    Waiting as long again as we have waited so far doubles the interval each
    time, from `low` up to `high`: quick for a typo fixed at once, quiet for a
    quota that stays full for an hour.
    """
    waited = (now - since).total_seconds() if since else 0.0
    # Never below a second, whatever the settings say: this must not become a hot loop.
    return float(max(1.0, min(high, max(low, waited))))
