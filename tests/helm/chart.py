"""Render the chart with the real `helm` binary and read the result."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from devcluster.chart import (
    CHART,
    NAMESPACE,
    RELEASE,
    HelmError,
    Manifest,
    render,
    run_helm,
    set_args,
)

__all__ = [
    "CHART",
    "NAMESPACE",
    "RELEASE",
    "SCENARIOS",
    "HelmError",
    "Manifest",
    "Scenario",
    "by_kind",
    "one",
    "render",
    "run_helm",
    "set_args",
]

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Scenario:
    """A named set of --set values every chart test runs against."""

    name: str
    values: dict[str, str]


SCENARIOS = [
    Scenario("default", {}),
    Scenario("namespaced", {"watchNamespaces": "{team-a,team-b}"}),
    Scenario("webhook-cert-manager", {"webhook.enabled": "true"}),
    Scenario(
        "webhook-own-ca",
        {
            "webhook.enabled": "true",
            "webhook.certManager.enabled": "false",
            "webhook.tlsSecretName": "my-webhook-tls",
            "webhook.caBundle": "LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCg==",
        },
    ),
    Scenario("webhook-kopf-managed", {"webhook.enabled": "true", "webhook.configuration": "kopf"}),
    Scenario("service-monitor", {"metrics.serviceMonitor.enabled": "true"}),
    Scenario(
        "everything",
        {
            "watchNamespaces": "{team-a}",
            "webhook.enabled": "true",
            "metrics.serviceMonitor.enabled": "true",
            "trainer.cachePvcName": "hf-cache",
            "trainer.serviceAccountName": "s3-reader",
            "trainer.runtimeClassName": "nvidia",
            "kueue.defaultQueue": "gpus",
            "policy.maxGpusPerJob": "8",
            "policy.allowedS3Endpoints": "{https://s3.example.com}",
        },
    ),
]


def by_kind(manifests: Iterable[Manifest], kind: str) -> list[Manifest]:
    return [m for m in manifests if m["kind"] == kind]


def one(manifests: Iterable[Manifest], kind: str) -> Manifest:
    found = by_kind(manifests, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]
