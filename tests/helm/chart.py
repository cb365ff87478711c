"""Render the chart with the real `helm` binary and read the result."""

from __future__ import annotations

import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.harness.tools import helm

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "lorajob-operator"
RELEASE = "lorajob"
NAMESPACE = "lorajob-system"

Manifest = dict[str, Any]


class HelmError(Exception):
    """helm exited non-zero; the message is its stderr."""


def run_helm(*args: str) -> str:
    proc = subprocess.run(
        [str(helm()), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        # Keep helm away from any user config, cache or kube context on the machine.
        env={
            "HOME": str(REPO / ".tools"),
            "HELM_CACHE_HOME": str(REPO / ".tools" / "helm-cache"),
            "HELM_CONFIG_HOME": str(REPO / ".tools" / "helm-config"),
            "HELM_DATA_HOME": str(REPO / ".tools" / "helm-data"),
            "KUBECONFIG": "/dev/null",
            "PATH": "/usr/bin:/bin",
        },
    )
    if proc.returncode != 0:
        raise HelmError(proc.stderr.strip())
    return proc.stdout


def set_args(values: dict[str, str]) -> list[str]:
    out: list[str] = []
    for key, value in values.items():
        out += ["--set", f"{key}={value}"]
    return out


def render(values: dict[str, str] | None = None, *, include_crds: bool = False) -> list[Manifest]:
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    if include_crds:
        args.append("--include-crds")
    docs = yaml.safe_load_all(run_helm(*args, *set_args(values or {})))
    return [d for d in docs if d]


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
