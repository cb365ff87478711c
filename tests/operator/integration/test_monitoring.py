"""The operator's /metrics on a real control plane, against what the chart's Grafana
dashboard and PrometheusRule query.

Jobs are driven (fake trainer) through queueing, training, an eviction, a failure and a
success, so every series the dashboard and alerts read has been produced; the scrape is
then parsed with prometheus_client's exposition parser and every metric name the
dashboard panels, its variables and the alert expressions select (parsed by a PromQL
parser from the chart `helm template` renders) must be among the exported samples.
Per-job series must follow the jobs that exist.
"""

from __future__ import annotations

import pytest
from loraops_contract.protocol import ExitCode
from prometheus_client.parser import text_string_to_metric_families

from tests.helm.monitoring import (
    alert_rules,
    dashboard,
    dashboard_queries,
    metric_names,
    monitoring_manifests,
)
from tests.operator.integration.conftest import GROUP, Cluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
# Waits tolerate a loaded 2-core machine (they return as soon as the state is there).
WAIT = 120

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(cluster: Cluster) -> Samples:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(cluster.metrics())
        for s in family.samples
    }


def per_job(samples: Samples, name: str) -> dict[str, float]:
    return {
        metric + ("{phase=" + dict(labels)["phase"] + "}" if "phase" in dict(labels) else ""): v
        for (metric, labels), v in samples.items()
        if dict(labels).get("lorajob") == name
    }


@pytest.fixture(scope="module")
def driven(cluster: Cluster) -> Cluster:
    """Jobs in every state the dashboard shows; returns when they are there."""
    cluster.create_job("mon-queued", storage={"credentialsSecret": "not-created-yet"})
    cluster.create_job("mon-evicted", script={"hold_at_step": 8})
    cluster.create_job("mon-failed", script={"fail": {"1": int(ExitCode.INVALID_DATASET)}})
    cluster.create_job("mon-done")
    cluster.wait_status(
        "mon-evicted",
        lambda s: (s.get("progress") or {}).get("step", 0) >= 8,
        "step 8",
        timeout=WAIT,
    )
    assert cluster.cp.kubelet is not None
    cluster.cp.kubelet.evict("default", "mon-evicted-1")
    cluster.wait_status(
        "mon-evicted",
        lambda s: (
            s.get("attempts") == 2
            and s.get("phase") == "Running"
            and (s.get("progress") or {}).get("step", 0) >= 8
        ),
        "attempt 2 at step 8",
        timeout=WAIT,
    )
    cluster.wait_phase("mon-failed", "Failed", timeout=WAIT)
    cluster.wait_phase("mon-done", "Succeeded", timeout=WAIT)
    cluster.wait_status("mon-queued", lambda s: s.get("phase") == "Queued", "queued", timeout=WAIT)
    return cluster


def test_every_metric_the_dashboard_and_alerts_query_is_exported(driven: Cluster) -> None:
    def settled() -> Samples | None:
        # The operator publishes what it wrote; wait until the scrape has the latest passes.
        s = scrape(driven)
        evicted, failed = per_job(s, "mon-evicted"), per_job(s, "mon-failed")
        ok = evicted.get("lorajob_job_attempts") == 2.0 and (
            "lorajob_job_phase{phase=Failed}" in failed
        )
        return s if ok else None

    samples: Samples = driven.cp.wait_for(settled, message="metrics to show the jobs", timeout=WAIT)
    exported = {name for name, _ in samples}
    manifests = monitoring_manifests()
    queries = dashboard_queries(dashboard(manifests))
    queries += [(f"alert {r['alert']}", r["expr"]) for r in alert_rules(manifests)]
    missing = {
        where: sorted(metric_names(expr) - exported)
        for where, expr in queries
        if metric_names(expr) - exported
    }
    assert not missing, f"queried but not exported: {missing}"
    # Every name is backed by a real sample, not only a declaration.
    for name in (
        "lorajob_attempts_total",
        "lorajob_disruptions_total",
        "lorajob_failures_total",
        "lorajob_attempt_failures_total",
    ):
        assert any(n == name and v > 0 for (n, _), v in samples.items()), name


def test_per_job_series_follow_the_jobs(driven: Cluster) -> None:
    samples = scrape(driven)
    shown = [line for line in driven.metrics().splitlines() if "lorajob=" in line]
    print("\n".join(shown))  # shown with -s
    running = per_job(samples, "mon-evicted")
    assert running["lorajob_job_phase{phase=Running}"] == 1.0
    assert running["lorajob_job_progress_ratio"] == 0.4  # step 8 of 20
    assert running["lorajob_job_disruptions"] == 1.0
    for metric in ("lorajob_job_loss", "lorajob_job_tokens_per_second", "lorajob_job_eta_seconds"):
        assert metric in running
    assert "lorajob_job_last_progress_timestamp_seconds" in running
    queued = per_job(samples, "mon-queued")
    assert set(queued) == {
        "lorajob_job_phase{phase=Queued}",
        "lorajob_job_queued_timestamp_seconds",
        "lorajob_job_attempts",
        "lorajob_job_disruptions",
    }
    # Finished jobs keep one series (their phase, which LoRAJobFailed reads), no more.
    assert per_job(samples, "mon-done") == {"lorajob_job_phase{phase=Succeeded}": 1.0}
    assert per_job(samples, "mon-failed") == {"lorajob_job_phase{phase=Failed}": 1.0}
    assert samples[("lorajob_queue_wait_seconds_count", ())] >= 1
    # A deleted job leaves nothing behind.
    driven.cp.kubectl("delete", f"lorajobs.{GROUP}", "mon-done", "--wait=true")
    driven.cp.wait_for(
        lambda: not per_job(scrape(driven), "mon-done"),
        message="mon-done's series gone",
        timeout=WAIT,
    )
