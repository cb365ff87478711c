"""Prometheus metrics of the operator.

Counters are fed from `reconcile.Decision.tallies`, i.e. from transitions that
were actually written to status: a restarted operator replaying the same state
decides no transition and so counts nothing twice.
"""

from __future__ import annotations

from collections import Counter as _Counter
from collections.abc import Iterable, Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from lorajob_operator.api import Phase
from lorajob_operator.reconcile import Tally

__all__ = ["Metrics"]

# Fine-tuning runs last minutes to days.
_DURATION_BUCKETS = (60, 300, 900, 1800, 3600, 7200, 14400, 28800, 86400, 259200, float("inf"))
_RECONCILE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, float("inf"))


class _PhaseCollector(Collector):
    """lorajob_jobs{phase}: computed at scrape time from the last phase seen per job."""

    def __init__(self) -> None:
        self.phases: dict[tuple[str, str], str] = {}

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("lorajob_jobs", "LoRAJobs by phase", labels=["phase"])
        counts = _Counter(self.phases.values())
        for phase in Phase:
            family.add_metric([str(phase)], counts.get(str(phase), 0))
        yield family


class Metrics:
    """All operator metrics on one registry (a fresh one per instance, for tests)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self._phases = _PhaseCollector()
        self.registry.register(self._phases)
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
        self.progress_poll_errors = Counter(
            "lorajob_progress_poll_errors",
            "Failed reads of a trainer pod's progress endpoint",
            registry=self.registry,
        )

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        start_http_server(port, addr=addr, registry=self.registry)

    def set_phase(self, namespace: str, name: str, phase: str | None) -> None:
        if phase:
            self._phases.phases[(namespace, name)] = phase

    def forget(self, namespace: str, name: str) -> None:
        self._phases.phases.pop((namespace, name), None)

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
