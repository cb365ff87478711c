"""Prometheus metrics of the operator.

Counters are fed from `reconcile.Decision.tallies`, i.e. from transitions that
were actually written to status: a restarted operator replaying the same state
decides no transition and so counts nothing twice.

Per-job series (labels `namespace`, `lorajob`) come from each job's status as last
written, computed at scrape time, and are bounded by the jobs that exist: one
`lorajob_job_phase` series per LoRAJob, and the progress family (progress, loss,
tokens/s, ETA, attempts, disruptions, queued/progress timestamps) only while the job
is unfinished. A finished job keeps only its phase series; a deleted one keeps none.
"""

from __future__ import annotations

from collections import Counter as _Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from lorajob_operator.api import Phase, parse_time
from lorajob_operator.conditions import ConditionType, get_condition
from lorajob_operator.reconcile import Tally

__all__ = ["JobView", "Metrics", "job_view"]

# Fine-tuning runs last minutes to days.
_DURATION_BUCKETS = (60, 300, 900, 1800, 3600, 7200, 14400, 28800, 86400, 259200, float("inf"))
_RECONCILE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, float("inf"))


_FINISHED = (str(Phase.SUCCEEDED), str(Phase.FAILED))
_WAITING = (str(Phase.PENDING), str(Phase.QUEUED))
# Queueing and training last seconds to days.
_QUEUE_WAIT_BUCKETS = (
    1,
    5,
    15,
    30,
    60,
    120,
    300,
    600,
    1800,
    3600,
    7200,
    21600,
    86400,
    float("inf"),
)


@dataclass(frozen=True)
class JobView:
    """What the metrics keep of one job: a handful of numbers, not its body."""

    phase: str
    queued_since: float | None = None  # epoch seconds it started waiting (Pending/Queued)
    running_since: float | None = None  # epoch seconds the current attempt started running
    last_progress: float | None = None  # epoch seconds status.progress last moved
    progress_ratio: float | None = None
    step: int | None = None
    loss: float | None = None
    tokens_per_second: float | None = None
    eta_seconds: float | None = None
    attempts: int = 0
    disruptions: int = 0


def _epoch(value: Any) -> float | None:
    when = parse_time(value)
    return when.timestamp() if when is not None else None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def job_view(
    status: Mapping[str, Any], created: Any = None, previous: JobView | None = None
) -> JobView | None:
    """The metrics' view of a job from its status (None before its first status).

    A job waits (Pending or Queued: for its pod to be admitted, scheduled or started,
    for quota, a Secret or a concurrency slot) from the last flip of its Queued or
    Running condition, or its creation; a later flip while it still waits (Pending to
    Queued) does not restart the clock, so `previous` carries it over."""
    phase = status.get("phase")
    if not isinstance(phase, str) or not phase:
        return None
    if phase in _FINISHED:
        return JobView(phase)  # its progress family goes; the phase series stays
    conditions = status.get("conditions") or []
    queued = get_condition(conditions, ConditionType.QUEUED) or {}
    running = get_condition(conditions, ConditionType.RUNNING) or {}
    raw_progress = status.get("progress")
    progress: Mapping[str, Any] = raw_progress if isinstance(raw_progress, Mapping) else {}
    running_since = _epoch(running.get("lastTransitionTime")) if phase == Phase.RUNNING else None
    moved = _epoch(progress.get("lastUpdated"))
    step, total = progress.get("step"), progress.get("totalSteps")
    ratio = (
        min(1.0, step / total)
        if isinstance(step, int) and isinstance(total, int) and total > 0
        else None
    )
    return JobView(
        phase=phase,
        queued_since=_waiting_since(phase, queued, running, created, previous),
        running_since=running_since,
        # A trainer that has not reported yet counts from when its attempt started.
        last_progress=(
            max(t for t in (moved, running_since) if t is not None)
            if phase == Phase.RUNNING and (moved or running_since)
            else None
        ),
        progress_ratio=ratio,
        step=step if isinstance(step, int) else None,
        loss=_number(progress.get("loss")),
        tokens_per_second=_number(progress.get("tokensPerSecond")),
        eta_seconds=_number(progress.get("etaSeconds")),
        attempts=int(status.get("attempts") or 0),
        disruptions=int(status.get("disruptions") or 0),
    )


def _waiting_since(
    phase: str,
    queued: Mapping[str, Any],
    running: Mapping[str, Any],
    created: Any,
    previous: JobView | None,
) -> float | None:
    if phase not in _WAITING:
        return None
    if previous is not None and previous.phase in _WAITING and previous.queued_since:
        return previous.queued_since
    flips = [_epoch(c.get("lastTransitionTime")) for c in (queued, running)]
    known = [t for t in flips if t is not None]
    return max(known) if known else _epoch(created)


# name, help, JobView attribute: the per-job gauges exported while a job is unfinished.
_JOB_GAUGES = (
    ("lorajob_job_progress_ratio", "Training progress, step / totalSteps (0-1)", "progress_ratio"),
    ("lorajob_job_step", "Optimizer step the trainer last reported", "step"),
    ("lorajob_job_loss", "Training loss the trainer last reported", "loss"),
    ("lorajob_job_tokens_per_second", "Training throughput, tokens/s", "tokens_per_second"),
    (
        "lorajob_job_eta_seconds",
        "Seconds of training left, as the trainer estimates",
        "eta_seconds",
    ),
    ("lorajob_job_attempts", "Trainer pods created for the job so far", "attempts"),
    (
        "lorajob_job_disruptions",
        "Attempts ended by eviction, preemption or node loss",
        "disruptions",
    ),
    (
        "lorajob_job_queued_timestamp_seconds",
        "When the job started waiting (Unix time), while it is pending or queued",
        "queued_since",
    ),
    (
        "lorajob_job_last_progress_timestamp_seconds",
        "When the running trainer last made progress (Unix time; its start until it reports)",
        "last_progress",
    ),
)


class _JobCollector(Collector):
    """lorajob_jobs{phase} and the per-job series, computed at scrape time from the
    last view of each job. Bounded by the jobs that exist (see the module docstring)."""

    def __init__(self) -> None:
        self.jobs: dict[tuple[str, str], JobView] = {}

    def collect(self) -> Iterator[GaugeMetricFamily]:
        jobs = dict(self.jobs)  # a snapshot: the event loop may change it meanwhile
        family = GaugeMetricFamily("lorajob_jobs", "LoRAJobs by phase", labels=["phase"])
        counts = _Counter(view.phase for view in jobs.values())
        for phase in Phase:
            family.add_metric([str(phase)], counts.get(str(phase), 0))
        yield family
        labels = ["namespace", "lorajob"]
        phases = GaugeMetricFamily(
            "lorajob_job_phase",
            "1 for each LoRAJob, labelled with its phase",
            labels=[*labels, "phase"],
        )
        for (namespace, name), view in sorted(jobs.items()):
            phases.add_metric([namespace, name, view.phase], 1)
        yield phases
        for metric, help_text, attribute in _JOB_GAUGES:
            gauge = GaugeMetricFamily(metric, help_text, labels=labels)
            for (namespace, name), view in sorted(jobs.items()):
                value = getattr(view, attribute)
                if value is not None and view.phase not in _FINISHED:
                    gauge.add_metric([namespace, name], float(value))
            yield gauge


class Metrics:
    """All operator metrics on one registry (a fresh one per instance, for tests)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self._jobs = _JobCollector()
        self.registry.register(self._jobs)
        self.attempts = Counter(
            "lorajob_attempts",
            "Trainer pods created, by kind (first attempt or resume)",
            ["kind"],
            registry=self.registry,
        )
        self.disruptions = Counter(
            "lorajob_disruptions",
            "Attempts ended by eviction, preemption or node loss, by reason",
            ["reason"],
            registry=self.registry,
        )
        self.attempt_failures = Counter(
            "lorajob_attempt_failures",
            "Failed attempts (retried or not), by reason",
            ["reason"],
            registry=self.registry,
        )
        self.failures = Counter(
            "lorajob_failures",
            "Jobs that ended Failed, by reason",
            ["reason"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "lorajob_job_duration_seconds",
            "Time from creation to Succeeded/Failed",
            ["phase"],
            buckets=_DURATION_BUCKETS,
            registry=self.registry,
        )
        self.reconcile_seconds = Histogram(
            "lorajob_reconcile_duration_seconds",
            "Time one reconciliation of a LoRAJob took",
            buckets=_RECONCILE_BUCKETS,
            registry=self.registry,
        )
        self.reconcile_errors = Counter(
            "lorajob_reconcile_errors",
            "Reconciliations that raised and will be retried",
            registry=self.registry,
        )
        self.pod_watch_restarts = Counter(
            "lorajob_pod_watch_restarts",
            "Trainer-pod watches started again, by reason (expired: history gone, "
            "listed again; error: resumed after a failure)",
            ["reason"],
            registry=self.registry,
        )
        self.api_throttled = Counter(
            "lorajob_api_throttled",
            "Kubernetes API requests throttled, by reason (client: waited for the "
            "client-side rate limit LORAJOB_API_QPS/BURST or a server-requested pause; "
            "server: answered 429, or 503 with Retry-After, and sent again after it)",
            ["reason"],
            registry=self.registry,
        )
        self.api_throttle_wait = Counter(
            "lorajob_api_throttle_wait_seconds",
            "Seconds Kubernetes API requests waited in the client-side rate limiter",
            registry=self.registry,
        )
        for reason in ("client", "server"):
            self.api_throttled.labels(reason=reason)  # exported as 0 before the first
        self.skipped_records = Counter(
            "lorajob_skipped_records",
            "Dataset records left out as invalid (spec.dataset.invalidRecords: skip), "
            "counted when the job succeeds",
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "lorajob_queue_wait_seconds",
            "Time a job's attempt waited pending or queued (admission, quota, a node, a "
            "Secret, a concurrency slot) before its trainer ran, observed when this operator "
            "saw it start running",
            buckets=_QUEUE_WAIT_BUCKETS,
            registry=self.registry,
        )
        self.progress_poll_errors = Counter(
            "lorajob_progress_poll_errors",
            "Failed reads of a trainer pod's progress endpoint",
            registry=self.registry,
        )

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        start_http_server(port, addr=addr, registry=self.registry)

    def set_phase(self, namespace: str, name: str, phase: str | None) -> None:
        """Record a job's phase when its status is not at hand (observe_job is better)."""
        if phase:
            previous = self._jobs.jobs.get((namespace, name))
            if previous is None or previous.phase != phase:
                self._jobs.jobs[(namespace, name)] = JobView(str(phase))

    def observe_job(self, job: Mapping[str, Any]) -> None:
        """Take a job's per-job series from its status as written."""
        meta = job.get("metadata") or {}
        key = (str(meta.get("namespace", "")), str(meta.get("name", "")))
        status = job.get("status")
        previous = self._jobs.jobs.get(key)
        view = (
            job_view(status, meta.get("creationTimestamp"), previous)
            if isinstance(status, Mapping)
            else None
        )
        if view is None:
            return
        if (
            previous is not None
            and previous.phase in _WAITING
            and previous.queued_since is not None
            and view.phase == Phase.RUNNING
            and view.running_since is not None
        ):
            # Seen waiting, now running: one observation per start this process saw
            # (a restarted operator that first sees a job running observes nothing).
            self.queue_wait.observe(max(0.0, view.running_since - previous.queued_since))
        self._jobs.jobs[key] = view

    def forget(self, namespace: str, name: str) -> None:
        self._jobs.jobs.pop((namespace, name), None)

    def record(self, tallies: Iterable[Tally]) -> None:
        for t in tallies:
            if t.kind == "attempt":
                self.attempts.labels(kind=t.reason).inc(t.value)
            elif t.kind == "disruption":
                self.disruptions.labels(reason=t.reason).inc(t.value)
            elif t.kind == "attempt_failure":
                self.attempt_failures.labels(reason=t.reason).inc(t.value)
            elif t.kind == "failure":
                self.failures.labels(reason=t.reason).inc(t.value)
            elif t.kind == "finished":
                self.duration.labels(phase=t.reason).observe(t.value)
            elif t.kind == "skipped_records":
                self.skipped_records.inc(t.value)
