"""The chart's namespaced install (watchNamespaces): the operator runs with the Roles
the chart renders for each watched namespace and nothing cluster-wide but its small
ClusterRole. Jobs in a watched namespace run; jobs elsewhere are not the operator's
business, and it never needs a permission the chart does not grant."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.operator.integration.conftest import Cluster, operator_cluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

WATCHED = "team-a"


@pytest.fixture(scope="module")
def namespaced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with operator_cluster(tmp_path_factory, watch_namespaces=[WATCHED]) as cluster:
        yield cluster


def test_a_job_in_a_watched_namespace_runs_with_the_charts_roles(namespaced: Cluster) -> None:
    namespaced.create_job("scoped", namespace=WATCHED, script={"steps": 4})
    status = namespaced.wait_phase("scoped", "Succeeded", namespace=WATCHED, timeout=60)
    assert status["attempts"] == 1
    # Events were written (the Role grants events), and nothing was refused.
    assert namespaced.events("scoped", namespace=WATCHED)
    log = namespaced.cp.operator_log.read_text(errors="replace")
    assert "forbidden" not in log.lower(), namespaced.cp.operator_log_tail(80)


def test_a_job_outside_the_watched_namespaces_is_left_alone(namespaced: Cluster) -> None:
    namespaced.create_job("elsewhere", namespace="default", script={"steps": 4})
    namespaced.create_job("inside", namespace=WATCHED, script={"steps": 4})
    # Once a later job in the watched namespace is done, the other has had every chance.
    namespaced.wait_phase("inside", "Succeeded", namespace=WATCHED, timeout=60)
    job = namespaced.job("elsewhere", namespace="default")
    assert job is not None
    assert "status" not in job
    assert namespaced.pods("elsewhere", namespace="default") == []


def test_the_operator_cannot_reach_beyond_the_chart(namespaced: Cluster) -> None:
    """The token the operator runs with is the chart's ServiceAccount's: it may not
    list pods in a namespace it does not watch (the RBAC is really enforced)."""
    kubeconfig = namespaced.cp.operator_kubeconfig
    assert kubeconfig is not None
    allowed = namespaced.cp.cluster.kubectl(
        "auth", "can-i", "create", "pods", "-n", WATCHED, kubeconfig=kubeconfig, check=False
    )
    assert allowed.stdout.strip() == "yes"
    denied = namespaced.cp.cluster.kubectl(
        "auth", "can-i", "list", "pods", "-n", "default", kubeconfig=kubeconfig, check=False
    )
    assert denied.stdout.strip() == "no"
