"""Per-job metrics: taken from status, bounded by the jobs that exist.

A live scrape of the operator on a control plane is in
tests/operator/integration/test_monitoring.py.
"""

from __future__ import annotations

from typing import Any

from lorajob_operator.metrics import Metrics
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families


def _samples(m: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(m.registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _job(name: str, status: dict[str, Any]) -> dict[str, Any]:
    return {"metadata": {"namespace": "team", "name": name}, "status": status}


def _cond(type_: str, status: str, when: str) -> dict[str, Any]:
    return {"type": type_, "status": status, "reason": "R", "lastTransitionTime": when}


QUEUED = {
    "phase": "Queued",
    "attempts": 0,
    "conditions": [_cond("Queued", "True", "2026-01-01T00:00:00Z")],
}
RUNNING = {
    "phase": "Running",
    "attempts": 2,
    "disruptions": 1,
    "conditions": [
        _cond("Queued", "False", "2026-01-01T00:01:30Z"),
        _cond("Running", "True", "2026-01-01T00:01:30Z"),
    ],
    "progress": {
        "step": 25,
        "totalSteps": 100,
        "loss": 1.5,
        "tokensPerSecond": 812.5,
        "etaSeconds": 300.0,
        "lastUpdated": "2026-01-01T00:05:00Z",
    },
}


def _per_job(samples: dict[Any, float], name: str) -> dict[str, float]:
    return {
        metric: value
        for (metric, labels), value in samples.items()
        if ("lorajob", name) in labels and metric != "lorajob_job_phase"
    }


def test_running_job_series_come_from_its_status() -> None:
    m = Metrics()
    m.observe_job(_job("a", RUNNING))
    samples = _samples(m)
    assert _per_job(samples, "a") == {
        "lorajob_job_progress_ratio": 0.25,
        "lorajob_job_step": 25.0,
        "lorajob_job_loss": 1.5,
        "lorajob_job_tokens_per_second": 812.5,
        "lorajob_job_eta_seconds": 300.0,
        "lorajob_job_attempts": 2.0,
        "lorajob_job_disruptions": 1.0,
        "lorajob_job_last_progress_timestamp_seconds": 1767225900.0,  # 00:05:00
    }
    key = ("lorajob_job_phase", (("lorajob", "a"), ("namespace", "team"), ("phase", "Running")))
    assert samples[key] == 1.0
    assert samples[("lorajob_jobs", (("phase", "Running"),))] == 1.0


def test_queue_wait_is_observed_once_when_a_queued_job_starts() -> None:
    m = Metrics()
    m.observe_job(_job("q", QUEUED))
    queued = _per_job(_samples(m), "q")
    assert queued["lorajob_job_queued_timestamp_seconds"] == 1767225600.0
    m.observe_job(_job("q", RUNNING))
    m.observe_job(_job("q", RUNNING))  # a later pass observes nothing more
    samples = _samples(m)
    assert samples[("lorajob_queue_wait_seconds_count", ())] == 1.0
    assert samples[("lorajob_queue_wait_seconds_sum", ())] == 90.0
    assert "lorajob_job_queued_timestamp_seconds" not in _per_job(samples, "q")


def test_queue_wait_counts_from_pod_creation_through_pending_and_queued() -> None:
    m = Metrics()
    pending = {
        "phase": "Pending",
        "conditions": [
            _cond("Queued", "False", "2026-01-01T00:00:00Z"),
            _cond("Running", "False", "2026-01-01T00:00:00Z"),
        ],
    }
    m.observe_job(_job("p", pending))
    m.observe_job(
        _job(
            "p",
            {
                **pending,
                "phase": "Queued",
                "conditions": [
                    _cond("Queued", "True", "2026-01-01T00:00:10Z"),
                    _cond("Running", "False", "2026-01-01T00:00:00Z"),
                ],
            },
        )
    )
    # the clock started at pod creation, not when it became Queued
    assert _per_job(_samples(m), "p")["lorajob_job_queued_timestamp_seconds"] == 1767225600.0
    m.observe_job(_job("p", RUNNING))
    assert _samples(m)[("lorajob_queue_wait_seconds_sum", ())] == 90.0


def test_series_are_bounded_by_live_jobs() -> None:
    m = Metrics()
    for i in range(50):
        m.observe_job(_job(f"j{i}", RUNNING))
    for i in range(40):
        m.observe_job(_job(f"j{i}", {"phase": "Succeeded" if i % 2 else "Failed"}))
    for i in range(20):
        m.forget("team", f"j{i}")
    samples = _samples(m)
    per_job = [(metric, labels) for metric, labels in samples if ("namespace", "team") in labels]
    # 30 jobs exist: one phase series each; only the 10 unfinished ones have the rest.
    assert sum(1 for metric, _ in per_job if metric == "lorajob_job_phase") == 30
    assert sum(1 for metric, _ in per_job if metric == "lorajob_job_loss") == 10
    assert len(per_job) == 30 + 10 * 8
    failed = ("lorajob_job_phase", (("lorajob", "j20"), ("namespace", "team"), ("phase", "Failed")))
    assert samples[failed] == 1.0


def test_a_job_without_status_yet_has_no_series() -> None:
    m = Metrics()
    m.observe_job({"metadata": {"namespace": "team", "name": "new"}})
    assert _per_job(_samples(m), "new") == {}
