"""Render the project's Helm chart with the real `helm` binary (`helm template`)."""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from devcluster.tools import REPO_ROOT, helm

CHART = REPO_ROOT / "helm" / "lorajob-operator"
RELEASE = "lorajob"
NAMESPACE = "lorajob-system"

Manifest = dict[str, Any]


class HelmError(Exception):
    """helm exited non-zero; the message is its stderr."""


def run_helm(*args: str) -> str:
    tools = REPO_ROOT / ".tools"
    proc = subprocess.run(
        [str(helm()), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        # Keep helm away from any user config, cache or kube context on the machine.
        env={
            "HOME": str(tools),
            "HELM_CACHE_HOME": str(tools / "helm-cache"),
            "HELM_CONFIG_HOME": str(tools / "helm-config"),
            "HELM_DATA_HOME": str(tools / "helm-data"),
            "KUBECONFIG": "/dev/null",
            "PATH": "/usr/bin:/bin",
        },
    )
    if proc.returncode != 0:
        raise HelmError(proc.stderr.strip())
    return proc.stdout


def set_args(values: Mapping[str, str]) -> list[str]:
    out: list[str] = []
    for key, value in values.items():
        out += ["--set", f"{key}={value}"]
    return out


def render(
    values: Mapping[str, str] | None = None,
    *,
    include_crds: bool = False,
    chart: Path = CHART,
    namespace: str = NAMESPACE,
) -> list[Manifest]:
    """The chart's documents as `helm template` renders them with `--set` values."""
    args = ["template", RELEASE, str(chart), "--namespace", namespace]
    if include_crds:
        args.append("--include-crds")
    docs = yaml.safe_load_all(run_helm(*args, *set_args(values or {})))
    return [d for d in docs if isinstance(d, dict)]
