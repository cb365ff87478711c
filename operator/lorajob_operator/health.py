"""The kstatus summary conditions (`Ready`, `Reconciling`, `Stalled`) of a LoRAJob.

Flux health checks, `kubectl wait --for=condition=Ready`, kpt and Argo CD read these
instead of the job's own conditions. They follow the kstatus conventions
(sigs.k8s.io/cli-utils/pkg/kstatus, as Flux's controllers write them):

* `Ready` is always present: True only once the adapter of the declared spec is written.
* `Reconciling` and `Stalled` are "abnormal-true": present only while True (removed
  otherwise), so their absence with a matching `observedGeneration` means "done".
  `Reconciling=True` while the job is pending, queued or running; `Stalled=True` when it
  failed for good, or when its declared spec cannot run (the spec was refused).
* Each carries `observedGeneration`, so a reader can tell a stale summary from a current one.

A suspended job is neither: Ready=False with reason SuspendedByUser, which kstatus reads
as InProgress (it is not done, and nothing is wrong with it).

Pure, and derived from the other conditions on every status write, never set alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from lorajob_operator.api import Phase
from lorajob_operator.conditions import ConditionType, derive_phase, get_condition, set_condition

__all__ = ["Summary", "summarize", "with_summary"]


@dataclass(frozen=True)
class Summary:
    ready: bool
    reconciling: bool
    stalled: bool
    reason: str
    message: str


def _source(
    conditions: Sequence[Mapping[str, Any]], *types: ConditionType
) -> Mapping[str, Any] | None:
    """The first of `types` that is True (where the summary's reason comes from)."""
    for type_ in types:
        condition = get_condition(conditions, type_)
        if condition and condition.get("status") == "True":
            return condition
    return None


def _from(
    condition: Mapping[str, Any] | None,
    reason: str,
    message: str,
    *,
    ready: bool = False,
    reconciling: bool = False,
    stalled: bool = False,
) -> Summary:
    """A summary whose reason and message are `condition`'s, or the defaults given."""
    condition = condition or {}
    return Summary(
        ready,
        reconciling,
        stalled,
        str(condition.get("reason") or reason),
        str(condition.get("message") or message),
    )


def summarize(conditions: Sequence[Mapping[str, Any]] | None) -> Summary:
    """What the summary conditions say, from the job's own conditions."""
    conditions = conditions or []
    phase = derive_phase(conditions)
    accepted = get_condition(conditions, ConditionType.ACCEPTED)
    if phase == Phase.FAILED:
        failed = get_condition(conditions, ConditionType.FAILED)
        return _from(failed, phase, "the job failed", stalled=True)
    if accepted is not None and accepted.get("status") == "False":
        # The declared spec cannot run: only an edit moves the job on, whatever an
        # attempt of the previous spec still does.
        return _from(accepted, "SpecRefused", "the spec was refused", stalled=True)
    if phase == Phase.SUCCEEDED:
        succeeded = get_condition(conditions, ConditionType.SUCCEEDED)
        return _from(succeeded, phase, "the adapter is written", ready=True)
    if phase == Phase.SUSPENDED:
        suspended = get_condition(conditions, ConditionType.SUSPENDED)
        return _from(suspended, phase, "the job is suspended")
    source = _source(conditions, ConditionType.RUNNING, ConditionType.QUEUED)
    return _from(source, phase, f"the job is {str(phase).lower()}", reconciling=True)


def with_summary(
    conditions: Sequence[Mapping[str, Any]] | None,
    observed_generation: int | None,
    now: datetime,
) -> list[dict[str, Any]]:
    """`conditions` with Ready set and Reconciling/Stalled present only while True.

    The input is not modified; lastTransitionTime moves only when a status flips
    (conditions.set_condition).
    """
    summary = summarize(conditions)
    out = set_condition(
        conditions,
        ConditionType.READY,
        summary.ready,
        summary.reason,
        summary.message,
        observed_generation,
        now,
    )
    for type_, true in (
        (ConditionType.RECONCILING, summary.reconciling),
        (ConditionType.STALLED, summary.stalled),
    ):
        if true:
            out = set_condition(
                out, type_, True, summary.reason, summary.message, observed_generation, now
            )
        else:
            out = [c for c in out if c.get("type") != type_]
    return out
