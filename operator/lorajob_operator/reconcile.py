"""The LoRAJob state machine, as pure functions.

`decide()` looks at one LoRAJob, its trainer pods and a few facts the controller
gathered when it asked for them (missing Secrets, how many jobs run in the
namespace, live progress: `Observed`) and returns a `Decision`: which pod to create
or delete, the status merge patch (status is written through the typed
api.LoRAJobStatus), the Events to post, the metrics to count and when to look again.
Nothing here talks to the API, so every transition is a table-driven unit test and
a restarted operator that sees the same objects makes the same decision.

State lives only in the resources, never in memory:

* `status.attempts` is the number of the latest attempt whose pod was created;
  pods are named `objects.pod_name(job, attempt)` and labelled with the attempt,
  so a pod created just before a crash (status not yet written) is adopted, and a
  retried create hits 409 AlreadyExists instead of making a twin.
* `status.podName` is set while the latest attempt's outcome is still open and
  cleared (in the same merge patch that counts it) once the outcome is
  accounted, so a failed pod left for `kubectl logs` is never counted twice.
  Finished jobs keep `podName` so people can find the last pod.
* A new attempt starts only when no pod of the job is alive (not even one that
  is still terminating): a trainer stopped by SIGTERM saves a checkpoint within its
  grace period, and the next attempt resumes from it. The one exception is a pod
  whose node was lost (`nodeloss.node_lost`): it stays terminating, still
  "Running", until PodGC removes it, so it counts as a NodeLost disruption and the
  next attempt starts beside it. Its trainer may still run (a partitioned node);
  that is safe because each attempt writes its checkpoints under its own prefix
  (`<output>/checkpoints/run-<run>/attempt-<N>/`) and prunes only its own. Such a pod is of
  an older attempt than `status.attempts`, so it never holds up (nor is mistaken
  for) the attempt that replaced it.

The order of `decide()`, each step a section below:

  deleted ............ nothing (the finalizer handler owns it)
  finished ........... TTL; runs again when its spec changed (or a limit that failed it
                       was raised); an invalid edit is reported and changes nothing
  invalid spec ....... Failed/InvalidSpec or PolicyViolation, no pod (if none runs)
  current pod ........ pending/queued/running -> conditions + progress;
                       succeeded -> Succeeded + adapter; failed -> Failed (permanent) or
                       retry after backoff (failedAttempts); disrupted/vanished -> next
                       attempt at once (disruptions, capped)
  deadline ........... delete pods, Failed/DeadlineExceeded
  suspend / resume ... delete pods, Suspended; on resume a new attempt
  pod alive .......... a spec change -> the pod is deleted (the trainer checkpoints) and
                       the next attempt runs the new spec; stale pods deleted

Spec changes: the declared spec is what eventually runs (GitOps). `status.runGeneration`,
`specHash` and `runId` say what the latest attempt runs; a change of the pod-shaping part
(api.spec_hash: all but the control fields, which apply live) stops it, not counted
against backoffLimit, and the next attempt resumes from the checkpoint the trainer saves
on SIGTERM, or trains a new run from step 0 when the run-defining fields changed
(loraops_contract.config.RESUMABLE_FIELDS are the others; the trainer keeps each run's
checkpoints apart). `completedGeneration` says which generation the adapter is for.
  no pod ............. wait Queued (Secret, concurrency), backoff, or create the next attempt;
                       a refused create becomes Queued/QuotaExceeded or Failed (create_rejected)
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, Literal

from loraops_contract.config import run_id
from loraops_contract.protocol import Evaluation, Progress
from loraops_contract.reasons import Reason

from lorajob_operator import api, objects, policy, trainer_progress
from lorajob_operator.api import Phase, format_time, parse_time
from lorajob_operator.backoff import exponential, open_ended
from lorajob_operator.conditions import (
    HINTS,
    ConditionType,
    derive_phase,
    get_condition,
    set_condition,
)
from lorajob_operator.health import with_summary
from lorajob_operator.nodeloss import node_lost
from lorajob_operator.pods import finished_at as _finished_at
from lorajob_operator.pods import is_live, pod_attempt
from lorajob_operator.pods import is_terminating as _is_terminating
from lorajob_operator.pods import pod_name as _pod_name
from lorajob_operator.podstatus import PodOutcome, classify_pod
from lorajob_operator.settings import OperatorSettings

__all__ = [
    "CreatePod",
    "Decision",
    "DeletePod",
    "Event",
    "Observed",
    "ParsedSpec",
    "Refusal",
    "Tally",
    "create_rejected",
    "decide",
    "parse_job_spec",
    "parse_time",
    "progress_patch",
    "secret_refs",
]

EventType = Literal["Normal", "Warning"]
# attempt: a pod was created; disruption / attempt_failure: an attempt ended so;
# failure: the job failed (by reason); finished: the job ended (value = seconds);
# skipped_records: a job succeeded with invalid records left out (value = how many).
TallyKind = Literal[
    "attempt", "disruption", "attempt_failure", "failure", "finished", "skipped_records"
]

# How long to wait before re-checking a job that waits for a free slot in its
# namespace; finishing pods also wake waiting jobs, this is only the safety net.
CONCURRENCY_RECHECK_SECONDS = 30.0
# Re-check interval while an old pod is still terminating before the next attempt.
TERMINATING_RECHECK_SECONDS = 5.0
# Re-check interval for a pod whose state could not be classified.
UNKNOWN_RECHECK_SECONDS = 15.0
# Longest checkpoint URI copied from a trainer's report into status.
MAX_URI_LENGTH = 1024


# --------------------------------------------------------------------------- types


@dataclass(frozen=True)
class Observed:
    """Everything `decide()` may look at, gathered by the controller.

    The facts that cost API calls are gathered only when decide() asks for them: a
    decision with `needs_facts` (it would start an attempt) or `progress_ip` (a trainer
    runs) is made again with them. None means "not gathered".
    """

    job: Mapping[str, Any]
    pods: Sequence[Mapping[str, Any]]
    now: datetime
    # (field path, Secret name) of referenced Secrets that do not exist.
    missing_secrets: Sequence[tuple[str, str]] | None = None
    # Other LoRAJobs of the namespace that have a live pod (for the concurrency limit).
    active_in_namespace: int | None = None
    # Progress just read from the running pod, if any.
    progress: Progress | None = None
    # The API server refused the pod that the same decision without it would create.
    refused: Refusal | None = None
    # `parse_job_spec(job.spec, ...)` if the caller has it already (the controller
    # keeps it per job uid and generation: a spec is validated once, not on every
    # pass); None: decide() parses the spec itself.
    parsed: ParsedSpec | None = None


@dataclass(frozen=True)
class Refusal:
    """Why the API server refused a trainer pod: exceeded quota (`quota`) is a wait,
    anything else permanent (create_rejected)."""

    message: str
    quota: bool


@dataclass(frozen=True)
class ParsedSpec:
    """A spec as the operator's rules judge it: the model, its hash and run, or why it
    cannot run (api.parse_spec's error, the cluster policy's violations)."""

    spec: api.LoRAJobSpec | None
    hash: str | None
    error: api.InvalidSpecError | None = None
    # The training run the spec defines (loraops_contract.config.run_id).
    run: str | None = None
    # How a valid spec breaks the cluster policy (policy.check_policy), one per rule.
    violations: tuple[str, ...] = ()

    @property
    def invalid(self) -> tuple[Reason, str] | None:
        """Why the spec cannot run (the condition reason and message), or None."""
        if self.error is not None:
            return Reason.INVALID_SPEC, self.error.message
        if self.violations:
            return Reason.POLICY_VIOLATION, "; ".join(self.violations)
        return None


def parse_job_spec(spec: Any, namespace: str, settings: OperatorSettings) -> ParsedSpec:
    """Judge a job's `spec` once, for any number of decisions about it: the one place
    the spec rules and the cluster policy are applied (the admission webhook calls it
    too, so both refuse the same specs with the same words)."""
    try:
        parsed = api.parse_spec(spec)
    except api.InvalidSpecError as err:
        return ParsedSpec(None, None, err)
    violations = policy.check_policy(
        parsed,
        namespace,
        settings.policy,
        default_gpu_resource_name=settings.gpu_resource_name,
        default_image=settings.trainer_image,
    )
    run = run_id(api.trainer_config(parsed), api.training_ranks(parsed))
    return ParsedSpec(parsed, api.spec_hash(parsed), run=run, violations=tuple(violations))


@dataclass(frozen=True)
class SpecChange:
    """A spec change the latest attempt has not applied (see _spec_change)."""

    generation: int | None
    # Fields that define the training run changed: the next attempt trains from step 0.
    new_run: bool


@dataclass(frozen=True)
class Event:
    type: EventType
    reason: str
    message: str


@dataclass(frozen=True)
class Tally:
    """Something metrics count: an attempt started, a disruption, a failure, a finish."""

    kind: TallyKind
    reason: str
    value: float = 1.0


@dataclass(frozen=True)
class DeletePod:
    name: str
    reason: str


@dataclass
class Decision:
    status: dict[str, Any] = field(default_factory=dict)  # merge patch for .status
    create: CreatePod | None = None
    delete: list[DeletePod] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    tallies: list[Tally] = field(default_factory=list)
    requeue_after: float | None = None
    delete_job: bool = False
    phase: Phase | None = None  # the phase after this decision
    # Nothing decided: an attempt may start, so decide again with the Secrets and the
    # namespace's running jobs gathered (Observed.missing_secrets, active_in_namespace).
    needs_facts: bool = False
    # The IP of the trainer that runs after this decision: its progress can be read.
    progress_ip: str | None = None
    # Pods of a job on several nodes whose gang gate (objects.GANG_GATE) comes off now.
    ungate: list[str] = field(default_factory=list)
    # The rendezvous Service of an earlier attempt, no longer needed.
    delete_service: str | None = None


@dataclass(frozen=True)
class CreatePod:
    attempt: int
    body: dict[str, Any]
    # A job on several nodes: the pods of the other node ranks, created after `body`
    # (rank 0), and the attempt's rendezvous Service, created before them.
    more: tuple[dict[str, Any], ...] = ()
    service: dict[str, Any] | None = None


# --------------------------------------------------------------------------- helpers


def secret_refs(spec: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(field path, Secret name) of every Secret the spec references."""
    storage = spec.get("storage") if isinstance(spec, Mapping) else None
    if not isinstance(storage, Mapping):
        return []
    refs = []
    for key in ("credentialsSecret", "hfTokenSecret"):
        value = storage.get(key)
        if isinstance(value, str) and value:
            refs.append((f"spec.storage.{key}", value))
    return refs


def _status(job: Mapping[str, Any]) -> Mapping[str, Any]:
    status = job.get("status")
    return status if isinstance(status, Mapping) else {}


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _current_attempt(job: Mapping[str, Any], pods: Sequence[Mapping[str, Any]]) -> int:
    """The latest attempt: from status, or a pod created just before a crash."""
    return max([_int(_status(job).get("attempts"))] + [pod_attempt(p) for p in pods])


def _is_finished(job: Mapping[str, Any]) -> bool:
    return _status(job).get("phase") in (Phase.SUCCEEDED, Phase.FAILED)


def _blocking(pods: Sequence[Mapping[str, Any]], now: datetime) -> list[Mapping[str, Any]]:
    """The live pods the next attempt must wait for: all but those whose node is lost."""
    return [p for p in pods if is_live(p) and node_lost(p, now) is None]


def apply_progress(
    status: api.LoRAJobStatus, live: Progress, now: datetime, min_interval: float
) -> None:
    """Copy what live progress changes into `status` (progress, lastCheckpoint,
    skippedRecords), at most once per `min_interval` (trainer_progress.status_progress)."""
    copied = trainer_progress.status_progress(live, status.progress, now, min_interval)
    if copied is not None:
        status.progress = copied
    checkpoint = (live.last_checkpoint or "")[:MAX_URI_LENGTH]
    if checkpoint:
        status.last_checkpoint = checkpoint
    if live.skipped_records:
        status.skipped_records = live.skipped_records


def progress_patch(
    job: Mapping[str, Any], live: Progress, now: datetime, min_interval: float
) -> dict[str, Any]:
    """The status merge patch live progress makes ({} for none): between full
    reconciliations, the progress-only poll writes just this (decide() applies the
    same apply_progress)."""
    before = api.parse_status(_status(job))
    after = before.model_copy(deep=True)
    apply_progress(after, live, now, min_interval)
    return api.status_patch(before, after)


# --------------------------------------------------------------------------- builder


class _Builder:
    """Accumulates one decision: condition changes, status fields, events, actions."""

    def __init__(self, obs: Observed, settings: OperatorSettings) -> None:
        self.obs = obs
        self.settings = settings
        self.now = obs.now
        meta = obs.job.get("metadata") or {}
        self.name = str(meta.get("name", ""))
        self.namespace = str(meta.get("namespace", ""))
        self.generation = _int(meta.get("generation")) or None
        status_in = _status(obs.job)
        # The status as read, and as it will be after this decision: the decision writes
        # it field by field (a misspelt field is a type error), and the merge patch is
        # the difference (api.status_patch). Conditions are kept as written, to compare
        # them exactly.
        self.before = api.parse_status(status_in)
        self.status = self.before.model_copy(deep=True)
        self.conditions_in: list[dict[str, Any]] = [
            dict(c) for c in status_in.get("conditions") or [] if isinstance(c, Mapping)
        ]
        self.conditions = copy.deepcopy(self.conditions_in)
        self.decision = Decision()
        self._parsed = obs.parsed

    def parsed(self) -> ParsedSpec:
        """The job's spec, parsed at most once per decision (or not at all: obs.parsed)."""
        if self._parsed is None:
            spec = self.obs.job.get("spec") or {}
            self._parsed = parse_job_spec(spec, self.namespace, self.settings)
        return self._parsed

    # -- reading
    def cond(self, ctype: ConditionType) -> Mapping[str, Any] | None:
        return get_condition(self.conditions, ctype)

    def cond_is(self, ctype: ConditionType, reason: str | None = None) -> bool:
        c = self.cond(ctype)
        return bool(
            c and c.get("status") == "True" and (reason is None or c.get("reason") == reason)
        )

    # -- writing
    def condition(
        self,
        ctype: ConditionType,
        status: bool,
        reason: str,
        message: str,
        *,
        event: EventType | None = None,
        per_generation: bool = False,
    ) -> bool:
        """Set a condition; post `event` only on a transition (status or reason
        changed; with `per_generation` also a new generation), so a replayed
        decision posts nothing."""
        before = self.cond(ctype)
        self.conditions = set_condition(
            self.conditions, ctype, status, reason, message, self.generation, self.now
        )
        after = self.cond(ctype) or {}
        keys = (
            ("status", "reason", "observedGeneration") if per_generation else ("status", "reason")
        )
        changed = before is None or any(before.get(k) != after.get(k) for k in keys)
        if changed and event is not None and (before is not None or status):
            self.event(event, reason, message)
        return changed

    def event(self, type_: EventType, reason: str, message: str) -> None:
        self.decision.events.append(Event(type_, reason, message))

    def tally(self, kind: TallyKind, reason: str, value: float = 1.0) -> None:
        self.decision.tallies.append(Tally(kind, reason, value))

    def requeue(self, seconds: float) -> None:
        seconds = max(0.0, float(seconds))
        current = self.decision.requeue_after
        self.decision.requeue_after = seconds if current is None else min(current, seconds)

    def delete_pod(self, name: str, reason: str) -> None:
        if all(d.name != name for d in self.decision.delete):
            self.decision.delete.append(DeletePod(name, reason))

    def finish(self) -> Decision:
        # The kstatus summary (Ready, Reconciling, Stalled) follows what was decided.
        self.conditions = with_summary(self.conditions, self.generation, self.now)
        decision = self.decision
        patch = api.status_patch(self.before, self.status)
        if self.conditions != self.conditions_in:
            patch["conditions"] = self.conditions
        phase = derive_phase(self.conditions)
        if self.before.phase != phase:
            patch["phase"] = str(phase)
        if self.generation is not None and self.before.observed_generation != self.generation:
            patch["observedGeneration"] = self.generation
        decision.status = patch
        decision.phase = phase
        if phase != Phase.RUNNING or decision.delete or not self.status.pod_name:
            decision.progress_ip = None  # no trainer runs on after this decision
        if phase in (Phase.SUCCEEDED, Phase.FAILED) and self.before.phase != phase:
            created = parse_time((self.obs.job.get("metadata") or {}).get("creationTimestamp"))
            duration = (self.now - created).total_seconds() if created else 0.0
            self.tally("finished", str(phase), max(0.0, duration))
        return decision


# --------------------------------------------------------------------------- decide


def decide(obs: Observed, settings: OperatorSettings) -> Decision:
    """The next step for one LoRAJob. Pure: same inputs, same decision."""
    b = _Builder(obs, settings)
    meta = obs.job.get("metadata") or {}
    if meta.get("deletionTimestamp"):
        return Decision()  # the finalizer handler owns deleted jobs
    parsed = b.parsed()
    spec = parsed.spec
    invalid = parsed.invalid
    change = _spec_change(b, invalid)
    if _is_finished(obs.job) and not _run_again(b, change):
        _finished(b, invalid)
        return b.finish()

    spec_in = obs.job.get("spec") or {}
    suspend_requested = isinstance(spec_in, Mapping) and spec_in.get("suspend") is True
    # Pods of lost nodes never finish terminating: they are left to PodGC and hold
    # nothing up (nodeloss.py says why, and why they are not force-deleted).
    live = _blocking(obs.pods, obs.now)
    if invalid is not None and not live and not suspend_requested and not b.status.pod_name:
        return _reject_spec(b, *invalid)

    # From here on a pod may run. Spec problems only block the *next* attempt.
    _account_current_pod(b, spec, change)
    if _is_final(b):
        _stop_live_pods(b, live, Reason.COMPLETED)
        _ttl(b)
        return b.finish()

    if _deadline_exceeded(b, spec_in, live):
        _ttl(b)
        return b.finish()

    if suspend_requested:
        _suspend(b, live)
        return b.finish()
    if b.cond_is(ConditionType.SUSPENDED) and not _resume(b, live):
        return b.finish()

    current_hash = parsed.hash
    if live:
        if change is not None:
            _restart_for_change(b, live, change)
        else:
            _check_spec(b, invalid)
        _stale_pods(b, live)
        return b.finish()
    if invalid is not None:
        return _reject_spec(b, *invalid)
    assert spec is not None
    assert current_hash is not None
    _accept_spec(b, current_hash)
    _maybe_create(b, spec, current_hash)
    if b.decision.needs_facts:
        return Decision(needs_facts=True)
    return b.finish()


def _is_final(b: _Builder) -> bool:
    return b.cond_is(ConditionType.SUCCEEDED) or b.cond_is(ConditionType.FAILED)


def _ran_generation(b: _Builder) -> int | None:
    """The generation whose spec the latest attempt runs (or ran); None before any."""
    status = b.before
    if not status.spec_hash:
        return None
    if status.run_generation is not None:
        return status.run_generation
    # Written by an operator before runGeneration: the attempt ran the generation that
    # operator last observed, unless it refused to apply it (SpecChangeRejected).
    observed = status.observed_generation or 0
    accepted = get_condition(b.conditions_in, ConditionType.ACCEPTED) or {}
    if observed == b.generation and accepted.get("reason") != Reason.SPEC_CHANGE_REJECTED:
        return observed
    return (b.generation or 1) - 1


def _spec_change(b: _Builder, invalid: tuple[Reason, str] | None) -> SpecChange | None:
    """The spec change the latest attempt has not applied, or None: no attempt yet, a
    spec that cannot run (reported instead), or nothing to apply, which this records:
    the same spec (an operator upgrade may hash it differently: only a new generation
    is a change), or a change of control fields only (they apply live)."""
    parsed = b.parsed()
    ran_generation = _ran_generation(b)
    ran_hash = b.before.spec_hash
    if invalid is not None or parsed.hash is None or ran_generation is None:
        return None
    if ran_generation != b.generation and parsed.hash != ran_hash:
        ran_run = b.before.run_id
        return SpecChange(b.generation, new_run=bool(ran_run) and ran_run != parsed.run)
    b.status.run_generation = b.generation
    b.status.spec_hash = parsed.hash
    b.status.run_id = parsed.run
    if b.cond_is(ConditionType.SUCCEEDED):
        b.status.completed_generation = b.generation  # the adapter fulfils this spec too
    return None


def _revalidate_after_invalid_spec(b: _Builder) -> bool:
    """A job that failed validation before any pod ran gets a second chance when
    its spec is edited: the fix is what the error message asked for."""
    status = b.before
    if status.failure_reason not in (Reason.INVALID_SPEC, Reason.POLICY_VIOLATION):
        return False
    if status.attempts or b.generation == status.observed_generation:
        return False
    b.condition(ConditionType.FAILED, False, Reason.SPEC_VALID, "the spec was changed")
    _clear_failure(b)
    b.status.completion_time = None
    return True


def _run_again(b: _Builder, change: SpecChange | None) -> bool:
    """Reopen a finished job whose spec changed, or whose edit raised the limit that
    failed it; True when it runs again (this decision goes on to start it)."""
    if _revalidate_after_invalid_spec(b):
        return True
    if change is not None:
        how = _next_run_note(b, new_run=change.new_run)
        _reopen(
            b,
            f"spec generation {change.generation} changed the spec of the finished job: "
            f"it runs again, {how}",
            fresh=True,
        )
        return True
    lifted = _lifted_limit(b)
    if lifted is not None:
        how = _next_run_note(b, new_run=False)
        _reopen(b, f"{lifted}: the job runs again, {how}", fresh=False)
        return True
    return False


def _reopen(b: _Builder, message: str, *, fresh: bool) -> None:
    """Turn a finished job into one about to start its next attempt.

    `adapter` and `completedGeneration` stay: they describe the adapter still at
    output.uri, until the new one replaces it (its manifest is removed first). A
    changed spec (`fresh`) gets the whole backoffLimit and disruption budget again.
    """
    for ctype in (ConditionType.SUCCEEDED, ConditionType.FAILED):
        if b.cond(ctype) is not None:
            b.condition(ctype, False, Reason.SPEC_CHANGED, message)
    b.condition(ConditionType.RUNNING, False, Reason.SPEC_CHANGED, message, event="Normal")
    b.condition(ConditionType.QUEUED, False, Reason.SPEC_CHANGED, message)
    _clear_failure(b)
    b.status.completion_time = None
    b.status.start_time = None
    b.status.pod_name = None
    b.status.progress = None
    if fresh:
        b.status.failed_attempts = 0
        b.status.disruptions = 0


def _clear_failure(b: _Builder) -> None:
    b.status.failure_reason = None
    b.status.failure_message = None
    b.status.hint = None


def _lifted_limit(b: _Builder) -> str | None:
    """What an edit of a job that failed on backoffLimit or activeDeadlineSeconds raised
    past the point that failed it (None when it did not): the job can go on."""
    spec = b.parsed().spec
    if spec is None or _ran_generation(b) == b.generation:
        return None
    reason = b.before.failure_reason
    failed = _int(b.before.failed_attempts)
    if reason == Reason.BACKOFF_LIMIT_EXCEEDED and spec.backoff_limit >= failed:
        return f"spec.backoffLimit is now {spec.backoff_limit} ({failed} failed attempts so far)"
    started = parse_time(b.before.start_time)
    done = parse_time(b.before.completion_time)
    deadline = spec.active_deadline_seconds
    if reason == Reason.DEADLINE_EXCEEDED and started is not None and done is not None:
        ran = (done - started).total_seconds()
        if deadline is None or deadline > ran:
            limit = f"{deadline}s" if deadline is not None else "unset"
            return f"spec.activeDeadlineSeconds is now {limit} (the job had run {ran:g}s)"
    return None


def _finished(b: _Builder, invalid: tuple[Reason, str] | None) -> None:
    """A Succeeded/Failed job that does not run again: nothing runs; an edit that cannot
    run is reported (the job keeps its result); the TTL."""
    live = [p for p in b.obs.pods if is_live(p) and not _is_terminating(p)]
    _stop_live_pods(b, live, Reason.COMPLETED)
    # A pod stopped as the job failed (a deadline) reports its checkpoint as it ends.
    last = next((p for p in b.obs.pods if _pod_name(p) == b.status.pod_name), None)
    if last is not None and not is_live(last):
        _record_checkpoint(b, classify_pod(last, b.now))
    edited = b.generation != b.before.observed_generation
    if invalid is not None and edited:
        reason, problem = invalid
        b.condition(
            ConditionType.ACCEPTED,
            False,
            reason,
            f"spec generation {b.generation} cannot run, so the job keeps its result "
            f"({b.before.phase}): {problem}",
            event="Warning",
            per_generation=True,
        )
    elif invalid is None and not b.cond_is(ConditionType.ACCEPTED):
        b.condition(ConditionType.ACCEPTED, True, Reason.SPEC_VALID, "the spec is valid")
    _ttl(b)


def _ttl(b: _Builder) -> None:
    """Delete the job ttlSecondsAfterFinished after completion (or requeue until then)."""
    spec = b.obs.job.get("spec") or {}
    ttl = spec.get("ttlSecondsAfterFinished") if isinstance(spec, Mapping) else None
    done = parse_time(b.status.completion_time)
    if isinstance(ttl, int) and not isinstance(ttl, bool) and ttl >= 0 and done is not None:
        left = (done + timedelta(seconds=ttl) - b.now).total_seconds()
        if left <= 0:
            b.decision.delete_job = True
            b.event("Normal", "Deleted", f"ttlSecondsAfterFinished ({ttl}s) has passed")
        else:
            b.requeue(left)


def _stop_live_pods(b: _Builder, live: Sequence[Mapping[str, Any]], reason: str) -> None:
    for pod in live:
        if not _is_terminating(pod):
            b.delete_pod(_pod_name(pod), reason)


def _fail(b: _Builder, reason: str, message: str, *, hint: str | None = None) -> None:
    """The job ends Failed with `reason`; live pods are the caller's business."""
    b.condition(ConditionType.FAILED, True, reason, message, event="Warning")
    b.condition(ConditionType.RUNNING, False, reason, message)
    b.condition(ConditionType.QUEUED, False, reason, message)
    if b.cond_is(ConditionType.SUSPENDED):
        b.condition(ConditionType.SUSPENDED, False, reason, message)
    b.status.failure_reason = reason
    b.status.failure_message = message
    b.status.hint = hint or _hint(reason)
    b.status.completion_time = b.status.completion_time or format_time(b.now)
    b.tally("failure", reason)


def _hint(reason: str) -> str | None:
    try:
        return HINTS.get(Reason(reason))
    except ValueError:
        return None


def _reject_spec(b: _Builder, reason: Reason, message: str) -> Decision:
    """Invalid spec or policy violation before (or between) attempts: fail, no pod."""
    b.condition(ConditionType.ACCEPTED, False, reason, message)
    _fail(b, reason, message)
    return b.finish()


# -- the current attempt's pod ------------------------------------------------------


def _account_current_pod(
    b: _Builder, spec: api.LoRAJobSpec | None, change: SpecChange | None
) -> None:
    """Fold the current attempt's pod state into status (once per outcome)."""
    obs = b.obs
    attempt = _current_attempt(obs.job, obs.pods)
    recorded = _int(b.before.attempts)
    # The rank-0 pod stands for its attempt (a job on several nodes has one per rank).
    by_attempt = {pod_attempt(p): p for p in sorted(obs.pods, key=objects.node_rank, reverse=True)}
    if attempt > recorded:
        # Created just before the operator stopped: adopt it instead of making another.
        pod = by_attempt[attempt]
        b.status.attempts = attempt
        b.status.pod_name = _pod_name(pod)
        annotations = (pod.get("metadata") or {}).get("annotations") or {}
        ran = annotations.get(objects.ANNOTATION_SPEC_HASH)
        if ran:
            b.status.spec_hash = ran
        # Its spec hash tells whether it runs this generation's spec or an earlier one
        # (then the next pass applies the change).
        current_spec = ran == b.parsed().hash
        b.status.run_generation = b.generation if current_spec else (b.generation or 1) - 1
        b.status.start_time = b.status.start_time or format_time(b.now)
    name = b.status.pod_name
    if not name:
        return
    current = next((p for p in obs.pods if _pod_name(p) == name), None)
    # Stopped (or about to be) to apply a spec change: its end is neither a failure nor
    # a disruption, and whatever it reached was for a spec the job no longer declares.
    restarting = change is not None or _restarting(b)
    if current is None:
        if b.cond_is(ConditionType.SUSPENDED) or (obs.job.get("spec") or {}).get("suspend"):
            b.status.pod_name = None  # we deleted it to suspend; not a disruption
            return
        if restarting:
            b.status.pod_name = None
            return
        _disrupted(b, attempt, Reason.DISRUPTED, f"pod {name} was deleted")
        return
    outcome = classify_pod(current, obs.now)
    if change is None or not change.new_run:  # a new run never resumes the old run's
        _record_checkpoint(b, outcome)
    _record_ranks(b, attempt, current)
    suspending = (obs.job.get("spec") or {}).get("suspend") is True or b.cond_is(
        ConditionType.SUSPENDED
    )
    if (suspending and outcome.kind != "succeeded") or restarting:
        # We stop this pod on purpose: its end is neither a failure nor a disruption.
        if not is_live(current):
            b.status.pod_name = None
        return
    group = _gang(b, attempt, current, outcome, spec)
    if group is not None:
        _apply_outcome(b, attempt, *group, spec)


def _restarting(b: _Builder) -> bool:
    """The current attempt's pod was deleted to apply a spec change (_restart_for_change
    marks it so on the Running condition, like Suspended marks a suspend)."""
    running = b.cond(ConditionType.RUNNING) or {}
    return running.get("reason") == Reason.SPEC_CHANGED and bool(b.status.pod_name)


# -- a job on several nodes ----------------------------------------------------------
#
# spec.resources.nodes > 1 runs one pod per node rank; status.podName names the node-rank-0
# pod, which stands for the group. Global rank 0, which serves progress and publishes the
# adapter, is in whichever pod torch's rendezvous puts it (_lead). The group is one
# attempt: any pod failing, disrupted or deleted ends it and the others are deleted (no
# rank hangs in a collective holding GPUs); the next attempt starts all of them again
# from the last checkpoint, counted as a single pod's end would be.
# Starting together: through Kueue, a pod group Kueue admits whole; without Kueue, the
# operator's gang gate comes off all pods at once when all exist, and a group not all on
# nodes within settings.gang_timeout_seconds is deleted whole and created again after
# settings.gang_retry_seconds (Queued/GangTimeout), so half a gang never holds GPUs.

# Which pod of a group that still runs speaks for it: the furthest from running first.
_GROUP_ORDER = {"queued": 0, "pending": 1, "unknown": 2, "running": 3, "succeeded": 4}


def _members(b: _Builder, attempt: int) -> dict[int, Mapping[str, Any]]:
    """The pods of attempt `attempt`, by node rank."""
    return {objects.node_rank(p): p for p in b.obs.pods if pod_attempt(p) == attempt}


def _gates(pod: Mapping[str, Any]) -> list[str]:
    gates = (pod.get("spec") or {}).get("schedulingGates") or []
    return [str(g.get("name")) for g in gates if isinstance(g, Mapping)]


def _rank_state(pod: Mapping[str, Any]) -> str:
    if _is_terminating(pod):
        return "Terminating"
    if _gates(pod):
        return "Gated"
    return str((pod.get("status") or {}).get("phase") or "Pending")


def _record_ranks(b: _Builder, attempt: int, rank0: Mapping[str, Any]) -> None:
    """status.ranks and ranksReady: each node rank's pod, node and state."""
    size = objects.group_size(rank0)
    if size <= 1:
        b.status.ranks = []
        b.status.ranks_ready = None
        return
    members = _members(b, attempt)
    ranks = []
    for rank in range(size):
        pod = members.get(rank)
        if pod is None:
            name = objects.pod_name(b.name, attempt, rank)
            ranks.append(api.RankStatus(rank=rank, pod=name, state="Missing"))
            continue
        rank_status = api.RankStatus(rank=rank, pod=_pod_name(pod), state=_rank_state(pod))
        if node := (pod.get("spec") or {}).get("nodeName"):
            rank_status.node = str(node)
        ranks.append(rank_status)
    b.status.ranks = ranks
    b.status.ranks_ready = f"{sum(r.state == 'Running' for r in ranks)}/{size}"


def _stop_group(b: _Builder, members: Mapping[int, Mapping[str, Any]], reason: str) -> None:
    for pod in members.values():
        if is_live(pod) and not _is_terminating(pod):
            b.delete_pod(_pod_name(pod), reason)


def _job_ref(b: _Builder) -> objects.JobRef:
    uid = str((b.obs.job.get("metadata") or {}).get("uid", ""))
    return objects.JobRef(name=b.name, namespace=b.namespace, uid=uid)


def _gang(
    b: _Builder,
    attempt: int,
    rank0: Mapping[str, Any],
    outcome: PodOutcome,
    spec: api.LoRAJobSpec | None,
) -> tuple[Mapping[str, Any], PodOutcome] | None:
    """The pod and outcome that stand for the current attempt: the rank-0 pod's own for
    a job on one node; for a group, what its pods say together (see above). None when
    this decided the attempt's end itself."""
    size = objects.group_size(rank0)
    if size <= 1:
        return rank0, outcome
    members = _members(b, attempt)
    outcomes = {r: outcome if r == 0 else classify_pod(p, b.now) for r, p in members.items()}
    published = [r for r, o in sorted(outcomes.items()) if o.kind == "succeeded" and _adapter(o)]
    if published:
        # Global rank 0 published the adapter (from whichever pod torch's rendezvous put it
        # in); the other pods have finished their part or are about to.
        _stop_group(b, members, Reason.COMPLETED)
        return members[published[0]], outcomes[published[0]]
    ended = [(r, o) for r, o in sorted(outcomes.items()) if o.kind in ("failed", "disrupted")]
    if ended:
        # A permanent failure first (it fails the job), then a failure, then a disruption.
        rank, why = min(ended, key=lambda e: (e[1].kind != "failed", e[1].retryable, e[0]))
        _stop_group(b, members, why.reason)
        note = f"node rank {rank} of {size}; the group's other pods are stopped"
        return members[rank], replace(why, message=f"{why.message} ({note})")
    missing = [r for r in range(size) if r not in members]
    started = any(not _gates(p) for p in members.values())
    if missing and (started or spec is None):
        _stop_group(b, members, Reason.DISRUPTED)
        name = objects.pod_name(b.name, attempt, missing[0])
        _disrupted(
            b,
            attempt,
            Reason.DISRUPTED,
            f"pod {name} (node rank {missing[0]} of {size}) was deleted; the group's other "
            "pods are stopped",
        )
        return None
    kueue = objects.LABEL_KUEUE_POD_GROUP in ((rank0.get("metadata") or {}).get("labels") or {})
    if not kueue and _gang_timed_out(b, attempt, members, size):
        return None
    if missing:
        assert spec is not None
        if b.obs.refused is not None:
            _refused(b, b.obs.refused)
            return None
        # Created in part (the operator stopped, or the API server refused one): the
        # rest, while none of the group has started.
        job = _job_ref(b)
        bodies = [objects.build_trainer_pod(job, spec, b.settings, attempt, r) for r in missing]
        service = objects.build_rendezvous_service(job, attempt)
        b.decision.create = CreatePod(attempt, bodies[0], tuple(bodies[1:]), service)
        names = ", ".join(_pod_name(body) for body in bodies)
        waiting = f"attempt {attempt}: creating pods {names}; the group's pods start together"
        return rank0, replace(
            outcome, kind="queued", reason=Reason.SCHEDULING_GATED, message=waiting
        )
    gated = [p for p in members.values() if objects.GANG_GATE in _gates(p)]
    if gated:
        # All of the group exists: release all of it in this one pass.
        b.decision.ungate = [_pod_name(p) for p in gated]
    # A pod that finished its part (exit 0, no adapter: not global rank 0's) waits for the
    # others; the one furthest from running speaks for the group.
    rank, pod = min(members.items(), key=lambda m: (_GROUP_ORDER.get(outcomes[m[0]].kind, 2), m[0]))
    worst = outcomes[rank]
    if worst.kind == "succeeded":
        return rank0, outcome  # all ended with exit 0 and none published: _succeeded says so
    if worst.kind == "running":
        lead = _lead(members, outcomes)
        return members[lead], outcomes[lead]
    message = worst.message
    if objects.GANG_GATE in _gates(pod):
        message = f"the group's {size} pods start together; released now that all exist"
    return rank0, replace(worst, message=f"pod {_pod_name(pod)} (node rank {rank}): {message}")


def _adapter(outcome: PodOutcome) -> bool:
    return outcome.termination is not None and outcome.termination.adapter is not None


def _lead(members: Mapping[int, Mapping[str, Any]], outcomes: Mapping[int, PodOutcome]) -> int:
    """The node rank of the running pod that holds global rank 0, which serves progress.

    torchrun's c10d rendezvous numbers the nodes by their sorted node descriptors
    (torch.distributed.elastic.rendezvous.dynamic_rendezvous: `sorted(participants)`,
    address first), not by --node-rank, and the trainer's launcher gives each pod's IP as
    its address (--local-addr): global rank 0 runs in the pod whose IP sorts first, as a
    string. Rank 0's pod while no pod has an IP."""
    running = {
        r: str((p.get("status") or {}).get("podIP") or "")
        for r, p in members.items()
        if outcomes[r].kind == "running"
    }
    with_ip = [(ip, r) for r, ip in running.items() if ip]
    return min(with_ip)[1] if with_ip else min(running, default=0)


def _gang_timed_out(
    b: _Builder, attempt: int, members: Mapping[int, Mapping[str, Any]], size: int
) -> bool:
    """Without Kueue: when the group has not all got nodes within gang_timeout_seconds of
    its creation, delete all of it (an unscheduled pod holds nothing, a scheduled one may
    hold GPUs while waiting for the rest), and say when it is created again."""
    bound = sum(bool((p.get("spec") or {}).get("nodeName")) for p in members.values())
    if bound == size:
        return False
    created = [
        parse_time((p.get("metadata") or {}).get("creationTimestamp")) for p in members.values()
    ]
    since = min((c for c in created if c is not None), default=None)
    if since is None:
        return False
    timeout = b.settings.gang_timeout_seconds
    left = (since + timedelta(seconds=timeout) - b.now).total_seconds()
    if left > 0:
        b.requeue(left)
        return False
    _stop_group(b, members, Reason.GANG_TIMEOUT)
    retry = b.settings.gang_retry_seconds
    message = (
        f"attempt {attempt}: only {bound} of the {size} pods got a node within {timeout:g}s; "
        f"all were deleted so that no part of the group holds GPUs, and they are created "
        f"again in {retry:g}s (not counted against backoffLimit)"
    )
    b.status.pod_name = None
    # Queued restarts now (False, then True in one decision): the pause before the next
    # attempt counts from its lastTransitionTime (_gang_pause_left).
    b.condition(ConditionType.QUEUED, False, Reason.GANG_TIMEOUT, message)
    b.condition(ConditionType.QUEUED, True, Reason.GANG_TIMEOUT, message, event="Warning")
    b.condition(ConditionType.RUNNING, False, Reason.GANG_TIMEOUT, message)
    b.tally("disruption", Reason.GANG_TIMEOUT)
    return True


def _gang_pause_left(b: _Builder) -> float:
    """Seconds until a group deleted for a gang timeout is created again."""
    queued = b.cond(ConditionType.QUEUED) or {}
    if queued.get("status") != "True" or queued.get("reason") != Reason.GANG_TIMEOUT:
        return 0.0
    since = parse_time(queued.get("lastTransitionTime"))
    if since is None:
        return 0.0
    return (since + timedelta(seconds=b.settings.gang_retry_seconds) - b.now).total_seconds()


def _record_checkpoint(b: _Builder, outcome: PodOutcome) -> None:
    """The checkpoint an ended attempt reports, e.g. the one its trainer saved on SIGTERM
    after the last progress read: status.lastCheckpoint must not lag behind what the next
    attempt resumes from. A success's is _succeeded's (None once the trainer has deleted
    its checkpoints)."""
    term = outcome.termination
    if outcome.kind != "succeeded" and term is not None and term.last_checkpoint:
        b.status.last_checkpoint = term.last_checkpoint[:MAX_URI_LENGTH]


def _apply_outcome(
    b: _Builder,
    attempt: int,
    pod: Mapping[str, Any],
    outcome: PodOutcome,
    spec: api.LoRAJobSpec | None,
) -> None:
    name = _pod_name(pod)
    node = (pod.get("spec") or {}).get("nodeName")
    if node:
        b.status.node_name = node
    reason = outcome.reason or ""
    kind = outcome.kind
    if kind == "queued":
        b.condition(
            ConditionType.QUEUED,
            True,
            reason or Reason.UNSCHEDULABLE,
            outcome.message,
            event="Normal",
        )
        b.condition(ConditionType.RUNNING, False, reason or Reason.POD_PENDING, outcome.message)
    elif kind == "pending":
        b.condition(ConditionType.QUEUED, False, Reason.POD_PENDING, outcome.message)
        b.condition(ConditionType.RUNNING, False, reason or Reason.POD_PENDING, outcome.message)
    elif kind == "running":
        _running(b, attempt, name, node)
        ip = (pod.get("status") or {}).get("podIP")
        if ip and not _is_terminating(pod) and (pod.get("status") or {}).get("phase") == "Running":
            b.decision.progress_ip = str(ip)
    elif kind == "succeeded":
        _succeeded(b, attempt, pod, outcome)
    elif kind == "disrupted":
        _disrupted(b, attempt, reason or Reason.DISRUPTED, outcome.message)
    elif outcome.counts_toward_backoff:  # a failure: one of spec.backoffLimit's retries
        _failed(b, attempt, pod, outcome, spec)
    else:
        b.requeue(UNKNOWN_RECHECK_SECONDS)


def _running(b: _Builder, attempt: int, name: str, node: Any) -> None:
    resumed = attempt > 1
    reason = Reason.RESUMING if resumed else Reason.TRAINER_RUNNING
    where = f" on node {node}" if node else ""
    what = "resumed from the last checkpoint" if resumed else "started"
    message = f"attempt {attempt}: trainer {what} in pod {name}{where}"
    b.condition(ConditionType.QUEUED, False, reason, message)
    b.condition(ConditionType.RUNNING, True, reason, message, event="Normal")
    if b.obs.progress is not None:
        apply_progress(b.status, b.obs.progress, b.now, b.settings.status_min_interval_seconds)


def _succeeded(b: _Builder, attempt: int, pod: Mapping[str, Any], outcome: PodOutcome) -> None:
    term = outcome.termination
    if term is None or term.adapter is None:
        # Exit 0 without a report is a trainer bug, never a finished adapter.
        broken = replace(
            outcome,
            kind="failed",
            reason=Reason.TRAINER_ERROR,
            retryable=True,
            message="the trainer exited 0 but reported no adapter in its termination message",
        )
        _failed(b, attempt, pod, broken, None)
        return
    adapter = term.adapter
    message = f"adapter written to {adapter.uri} (attempt {attempt})"
    b.condition(ConditionType.RUNNING, False, Reason.COMPLETED, message)
    b.condition(ConditionType.QUEUED, False, Reason.COMPLETED, message)
    b.condition(ConditionType.SUCCEEDED, True, Reason.COMPLETED, message, event="Normal")
    b.status.adapter = api.AdapterStatus(
        uri=adapter.uri,
        manifest_uri=adapter.manifest_uri,
        sha256=adapter.sha256,
        size=adapter.size,
        files=adapter.files,
    )
    _record_evaluation(b, term.evaluation)
    done = _finished_at(pod) or b.now
    b.status.completion_time = format_time(done)
    b.status.completed_generation = b.status.run_generation
    # None: the trainer deleted its checkpoints once the adapter was complete.
    b.status.last_checkpoint = term.last_checkpoint
    if term.skipped_records:
        b.status.skipped_records = term.skipped_records
        b.tally("skipped_records", "invalid", term.skipped_records)
    # The last progress read, completed (fields assigned are written, the others kept).
    final = (b.before.progress or api.ProgressStatus()).model_copy()
    final.stage = "done"
    final.step = term.steps if term.steps is not None else final.step
    final.total_steps = final.total_steps or final.step
    final.percent = 100.0
    final.eta_seconds = 0.0
    final.last_updated = format_time(b.now)
    # Rounded as the live progress is, so the LOSS column stays readable.
    if (loss := trainer_progress.rounded(term.train_loss, 4)) is not None:
        final.loss = loss
    if (eval_loss := trainer_progress.rounded(term.eval_loss, 4)) is not None:
        final.eval_loss = eval_loss
    if (speed := trainer_progress.rounded(term.tokens_per_second, 1)) is not None:
        final.tokens_per_second = speed
    b.status.progress = final
    _clear_failure(b)


def _record_evaluation(b: _Builder, ev: Evaluation | None) -> None:
    """The adapter against its base model (and the vLLM verdict) into status. An adapter
    whose eval loss is above its base model's is a Warning condition and event: the job
    succeeded, but what it learned made the model worse on the held-out records."""
    if ev is None:  # a trainer that does not evaluate (older image): nothing to say
        b.status.evaluation = None
        return
    b.status.evaluation = api.EvaluationStatus(
        base_eval_loss=_round(ev.base_eval_loss),
        eval_loss=_round(ev.eval_loss),
        summary=ev.summary or None,
        worse_than_base=ev.worse_than_base,
        vllm=ev.vllm,
    )
    if ev.worse_than_base:
        b.condition(
            ConditionType.ADAPTER_WORSE_THAN_BASE,
            True,
            Reason.EVAL_LOSS_ABOVE_BASE,
            f"{ev.summary}: the adapter predicts the held-out records worse than its base "
            "model; check training.learningRate, the number of steps and whether the eval "
            "data resembles the training data",
            event="Warning",
        )
    elif b.cond(ConditionType.ADAPTER_WORSE_THAN_BASE) is not None:
        # An earlier adapter of this job was worse; this one is not.
        b.condition(
            ConditionType.ADAPTER_WORSE_THAN_BASE,
            False,
            Reason.EVAL_LOSS_NOT_ABOVE_BASE,
            ev.summary or "the adapter's eval loss was not measured against the base model",
        )


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _disrupted(b: _Builder, attempt: int, reason: str, message: str) -> None:
    count = _int(b.status.disruptions) + 1
    b.status.disruptions = count
    b.status.pod_name = None
    b.tally("disruption", reason)
    limit = b.settings.max_disruptions
    text = f"attempt {attempt} was interrupted ({reason}: {message})"
    if count > limit:
        _fail(
            b,
            Reason.DISRUPTED,
            f"{text}; the job was disrupted {count} times, more than the operator's limit "
            f"of {limit}",
            hint="check the node pool's stability and the job's priority class; the adapter "
            "can be resumed from the last checkpoint by creating a new job with the same output",
        )
        return
    message = (
        f"{text}; a new attempt resumes from the last checkpoint (not counted against backoffLimit)"
    )
    b.condition(ConditionType.RUNNING, False, reason, message, event="Warning")


def _failed(
    b: _Builder,
    attempt: int,
    pod: Mapping[str, Any],
    outcome: PodOutcome,
    spec: api.LoRAJobSpec | None,
) -> None:
    reason = outcome.reason or Reason.TRAINER_ERROR
    failed = _int(b.status.failed_attempts) + 1
    b.status.failed_attempts = failed
    b.tally("attempt_failure", reason)
    if is_live(pod) and _finished_at(pod) is None:
        b.delete_pod(_pod_name(pod), reason)  # e.g. stuck in ImagePullBackOff
    code = f" (exit code {outcome.exit_code})" if outcome.exit_code is not None else ""
    text = f"attempt {attempt} (pod {_pod_name(pod)}) failed{code}: {outcome.message}"
    if not outcome.retryable:
        _fail(b, reason, text, hint=outcome.hint)
        b.status.pod_name = _pod_name(pod)
        return
    limit = spec.backoff_limit if spec is not None else _backoff_limit(b.obs.job)
    if failed > limit:
        _fail(
            b,
            Reason.BACKOFF_LIMIT_EXCEEDED,
            f"{text}; {failed} failed attempts exceed backoffLimit={limit}",
            hint=outcome.hint,
        )
        return
    b.status.pod_name = None
    delay = exponential(
        failed, b.settings.retry_backoff_seconds, b.settings.retry_backoff_max_seconds
    )
    checkpoint = _recorded_checkpoint(b)
    resuming = f", resuming from checkpoint {checkpoint}" if checkpoint else ""
    b.condition(
        ConditionType.RUNNING,
        False,
        reason,
        f"{text}; retry {failed} of {limit} in {delay:g}s{resuming}",
        event="Warning",
    )


def _recorded_checkpoint(b: _Builder) -> str | None:
    """The checkpoint status knows of, for messages: they say an attempt resumes only
    when there is one to resume from."""
    checkpoint = b.status.last_checkpoint
    return str(checkpoint) if checkpoint else None


def _backoff_limit(job: Mapping[str, Any]) -> int:
    value = (job.get("spec") or {}).get("backoffLimit")
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 3


# -- deadlines, suspend, spec changes -------------------------------------------------


def _deadline_exceeded(
    b: _Builder, spec_in: Mapping[str, Any], live: Sequence[Mapping[str, Any]]
) -> bool:
    deadline = spec_in.get("activeDeadlineSeconds") if isinstance(spec_in, Mapping) else None
    started = parse_time(b.status.start_time)
    if not isinstance(deadline, int) or isinstance(deadline, bool) or deadline <= 0:
        return False
    if started is None or spec_in.get("suspend") is True or b.cond_is(ConditionType.SUSPENDED):
        return False
    left = (started + timedelta(seconds=deadline) - b.now).total_seconds()
    if left > 0:
        b.requeue(left)
        return False
    _stop_live_pods(b, live, Reason.DEADLINE_EXCEEDED)
    _fail(
        b,
        Reason.DEADLINE_EXCEEDED,
        f"the job ran longer than activeDeadlineSeconds={deadline} (across all attempts)",
    )
    return True


def _suspend(b: _Builder, live: Sequence[Mapping[str, Any]]) -> None:
    message = (
        "spec.suspend is true: the trainer saves a checkpoint and stops; set spec.suspend "
        "to false to resume from it"
    )
    _stop_live_pods(b, live, Reason.SUSPENDED_BY_USER)
    b.condition(ConditionType.SUSPENDED, True, Reason.SUSPENDED_BY_USER, message, event="Normal")
    b.condition(ConditionType.RUNNING, False, Reason.SUSPENDED_BY_USER, message)
    b.condition(ConditionType.QUEUED, False, Reason.SUSPENDED_BY_USER, message)
    if not live:
        b.status.pod_name = None
    # While suspended every (valid) spec is accepted; the next attempt uses it.
    invalid = b.parsed().invalid
    if invalid is not None:
        b.condition(ConditionType.ACCEPTED, False, *invalid, event="Warning")
    else:
        b.condition(ConditionType.ACCEPTED, True, Reason.SPEC_VALID, "the spec is valid")


def _resume(b: _Builder, live: Sequence[Mapping[str, Any]]) -> bool:
    """Leave Suspended once the old pod is gone; True when a new attempt may start."""
    if live:
        b.requeue(TERMINATING_RECHECK_SECONDS)
        return False
    new_run = _new_run(b)
    message = f"spec.suspend is false: a new attempt {_next_run_note(b, new_run=new_run)}"
    b.condition(ConditionType.SUSPENDED, False, Reason.RESUMED, message, event="Normal")
    b.status.pod_name = None
    # Like a Kubernetes Job, the deadline clock restarts on resume.
    b.status.start_time = None
    return True


def _check_spec(b: _Builder, invalid: tuple[Reason, str] | None) -> None:
    """No change to apply while a pod runs: the spec is valid (control fields apply
    live), or it cannot run, and the attempt keeps the spec it started with."""
    if invalid is None:
        if not b.cond_is(ConditionType.ACCEPTED):
            b.condition(ConditionType.ACCEPTED, True, Reason.SPEC_VALID, "the spec is valid")
        return
    reason, problem = invalid
    b.condition(
        ConditionType.ACCEPTED,
        False,
        reason,
        f"spec generation {b.generation} cannot run, so attempt {b.status.attempts} keeps "
        f"running the spec it started with: {problem}",
        event="Warning",
        per_generation=True,
    )


def _restart_for_change(b: _Builder, live: Sequence[Mapping[str, Any]], change: SpecChange) -> None:
    """Apply a spec change to a started attempt: delete its pod (the trainer saves a
    checkpoint on SIGTERM) and let the next attempt run the declared spec. Not a
    failure, nor a disruption of status.disruptions: a GitOps repository may change a
    spec any number of times."""
    how = (
        _next_run_note(b, new_run=True)
        if change.new_run
        else "resuming from the checkpoint its trainer saves as it stops"
    )
    message = (
        f"spec generation {change.generation} changed the spec: attempt {b.status.attempts} "
        f"stops and the next attempt runs the new spec, {how} (not counted against "
        "backoffLimit)"
    )
    _stop_live_pods(b, live, Reason.SPEC_CHANGED)
    if not b.cond_is(ConditionType.ACCEPTED):
        b.condition(ConditionType.ACCEPTED, True, Reason.SPEC_VALID, "the spec is valid")
    if b.condition(
        ConditionType.RUNNING,
        False,
        Reason.SPEC_CHANGED,
        message,
        event="Normal",
        per_generation=True,
    ):
        b.tally("disruption", Reason.SPEC_CHANGED)
    b.condition(ConditionType.QUEUED, False, Reason.SPEC_CHANGED, message)
    b.requeue(TERMINATING_RECHECK_SECONDS)


def _new_run(b: _Builder) -> bool:
    """The next attempt trains another run than the latest one did (from step 0)."""
    ran = b.before.run_id
    return bool(ran) and ran != b.parsed().run


def _next_run_note(b: _Builder, *, new_run: bool) -> str:
    """How the next attempt starts, for messages."""
    if new_run:
        return (
            "as a new training run from step 0 (the change is to fields that define the run: "
            "model, data, LoRA shape, quantization or optimisation); the old run's "
            "checkpoints stay until the new run has one"
        )
    checkpoint = _recorded_checkpoint(b)
    if checkpoint:
        return f"resuming from checkpoint {checkpoint}"
    return "from step 0 (no checkpoint to resume from)"


def _stale_pods(b: _Builder, live: Sequence[Mapping[str, Any]]) -> None:
    """Pods of earlier attempts still running (should not happen) are stopped; those of
    the current attempt (each node rank's, on several nodes) are not."""
    current = b.status.attempts if b.status.pod_name else None
    stale = [p for p in live if pod_attempt(p) != current]
    for pod in stale:
        if not _is_terminating(pod):
            b.delete_pod(_pod_name(pod), "Superseded")
    if stale:
        b.requeue(TERMINATING_RECHECK_SECONDS)


def _accept_spec(b: _Builder, current_hash: str) -> None:
    running_hash = b.status.spec_hash
    if running_hash and running_hash != current_hash:
        message = f"spec generation {b.generation} is applied from the next attempt on"
    else:
        message = "the spec is valid"
    b.condition(ConditionType.ACCEPTED, True, Reason.SPEC_VALID, message, event="Normal")


# -- starting an attempt ----------------------------------------------------------


def _maybe_create(b: _Builder, spec: api.LoRAJobSpec, current_hash: str) -> None:
    obs, settings = b.obs, b.settings
    if b.status.pod_name:
        return  # outcome still open (e.g. unknown pod state): wait for it
    if (pause := _gang_pause_left(b)) > 0:
        b.requeue(pause)
        return
    if obs.missing_secrets is None or obs.active_in_namespace is None:
        b.decision.needs_facts = True  # they cost API calls: gathered only now
        return
    if obs.missing_secrets:
        detail = "; ".join(
            f"Secret {name!r} ({path}) does not exist in namespace {b.namespace!r}"
            for path, name in obs.missing_secrets
        )
        _queue(b, Reason.SECRET_NOT_FOUND, f"{detail}; create it and the job starts by itself")
        return
    limit = policy.concurrency_limit(settings.policy, b.namespace)
    if limit is not None and obs.active_in_namespace >= limit:
        _queue(
            b,
            Reason.CONCURRENCY_LIMIT,
            f"{obs.active_in_namespace} LoRAJobs already run in namespace {b.namespace!r} "
            f"(limit {limit}); this one starts when one of them finishes",
            recheck=CONCURRENCY_RECHECK_SECONDS,
        )
        return
    attempt = _current_attempt(obs.job, obs.pods)
    left = _retry_wait_left(b, attempt)
    if left > 0:
        b.requeue(left)
        return
    if obs.refused is not None:
        _refused(b, obs.refused)
        return
    attempt += 1
    job_ref = _job_ref(b)
    bodies = objects.build_trainer_pods(job_ref, spec, settings, attempt)
    body = bodies[0]
    new_run = _new_run(b)
    if new_run:
        # The old run's checkpoint and progress: this attempt never resumes them.
        b.status.last_checkpoint = None
        b.status.progress = None
    name = _pod_name(body) or objects.pod_name(b.name, attempt)
    checkpoint = _recorded_checkpoint(b) if attempt > 1 else None
    resume = f" (resumes from checkpoint {checkpoint})" if checkpoint else ""
    message = f"created pod {name} for attempt {attempt}{resume}"
    group = len(bodies) > 1
    service = None
    if group:
        names = ", ".join(_pod_name(p) for p in bodies)
        message = (
            f"created pods {names} for attempt {attempt}, one per node, started together{resume}"
        )
        service = objects.build_rendezvous_service(job_ref, attempt)
    if b.before.ranks and attempt > 1:
        b.decision.delete_service = objects.rendezvous_service_name(b.name, attempt - 1)
    if new_run:
        message += f"; a new training run (run {b.parsed().run}) from step 0"
    for pod in obs.pods:
        if pod_attempt(pod) == attempt - 1 and (lost := node_lost(pod, b.now)):
            message += f" beside pod {_pod_name(pod)} of attempt {attempt - 1}: {lost}"
    b.status.attempts = attempt
    b.status.pod_name = name
    b.status.node_name = None
    b.status.ranks = (
        [api.RankStatus(rank=r, pod=_pod_name(p), state="Pending") for r, p in enumerate(bodies)]
        if group
        else []
    )
    b.status.ranks_ready = f"0/{len(bodies)}" if group else None
    b.status.spec_hash = current_hash
    b.status.run_generation = b.generation
    b.status.run_id = b.parsed().run
    b.status.start_time = b.status.start_time or format_time(b.now)
    b.condition(ConditionType.QUEUED, False, Reason.POD_CREATED, message)
    b.condition(ConditionType.RUNNING, False, Reason.POD_CREATED, message)
    b.event("Normal", Reason.POD_CREATED, message)
    b.tally("attempt", Reason.RESUMING if attempt > 1 else Reason.POD_CREATED)
    b.decision.create = CreatePod(attempt, body, tuple(bodies[1:]), service)


# Running=False reasons after which the next attempt starts without a backoff.
_NO_BACKOFF_REASONS = frozenset(
    {
        Reason.EVICTED,
        Reason.PREEMPTED,
        Reason.NODE_LOST,
        Reason.DISRUPTED,
        Reason.SUSPENDED_BY_USER,
        Reason.RESUMED,
        Reason.SECRET_NOT_FOUND,
        Reason.CONCURRENCY_LIMIT,
        Reason.QUOTA_EXCEEDED,
        Reason.POD_CREATED,
        Reason.POD_PENDING,
        Reason.TRAINER_RUNNING,
        Reason.RESUMING,
        Reason.SPEC_CHANGED,
        Reason.GANG_TIMEOUT,  # its own pause: _gang_pause_left
    }
)


def _retry_wait_left(b: _Builder, attempt: int) -> float:
    """Seconds until the exponential backoff after a failed attempt has passed."""
    failed = _int(b.status.failed_attempts)
    running = b.cond(ConditionType.RUNNING) or {}
    if not failed or running.get("reason") in _NO_BACKOFF_REASONS:
        return 0.0
    previous = next((p for p in b.obs.pods if pod_attempt(p) == attempt), None)
    finished = _finished_at(previous) if previous is not None else None
    # Pod gone (or no finish time): count from when the failure was recorded.
    finished = finished or parse_time(running.get("lastTransitionTime"))
    if finished is None:
        return 0.0
    delay = exponential(
        failed, b.settings.retry_backoff_seconds, b.settings.retry_backoff_max_seconds
    )
    return (finished + timedelta(seconds=delay) - b.now).total_seconds()


def _queue(b: _Builder, reason: Reason, message: str, *, recheck: float | None = None) -> None:
    b.condition(ConditionType.QUEUED, True, reason, message, event="Warning")
    b.condition(ConditionType.RUNNING, False, reason, message)
    if recheck is not None:
        b.requeue(recheck)
        return
    queued = b.cond(ConditionType.QUEUED) or {}
    since = parse_time(queued.get("lastTransitionTime"))
    b.requeue(
        open_ended(
            since, b.now, b.settings.wait_backoff_seconds, b.settings.wait_backoff_max_seconds
        )
    )


def create_rejected(
    obs: Observed, settings: OperatorSettings, message: str, *, quota: bool
) -> Decision:
    """The decision instead of `decide(obs)`'s when the API server refused the pod it
    asked to create: the same decision, told of the refusal (_refused)."""
    return decide(replace(obs, refused=Refusal(message, quota)), settings)


def _refused(b: _Builder, refusal: Refusal) -> None:
    """The API server refused the trainer pod.

    Exceeded quota is a wait (Queued/QuotaExceeded, re-tried with growing
    intervals until the quota frees up); any other refusal (admission policy,
    invalid pod) is permanent until an admin changes something, so the job fails
    instead of hammering the API server.
    """
    message = refusal.message
    if refusal.quota:
        _queue(
            b,
            Reason.QUOTA_EXCEEDED,
            f"the namespace's ResourceQuota has no room for the trainer pod; waiting for it "
            f"to free up. API server: {message}",
        )
    else:
        _fail(
            b,
            Reason.CONTAINER_CONFIG_ERROR,
            f"the trainer pod could not be created: {message}",
            hint="the API server (an admission policy or webhook, or a clashing object) "
            "refused the pod; fix what the message names, ask your cluster admin, or adjust "
            "spec.resources/spec.scheduling, then create the job again",
        )
