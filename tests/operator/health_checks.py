"""Readers of a LoRAJob's health as GitOps tools see it, run for real.

* Argo CD: `deploy/argocd/health.lua` in Lua 5.1 (lupa; Argo CD runs gopher-lua, a
  Lua 5.1), with its test cases in Argo CD's own layout (`health_test.yaml` listing
  `inputPath` + `healthStatus`, objects under `testdata/`).
* Flux / kpt: the kstatus library of sigs.k8s.io/cli-utils, through the `kstatus`
  helper built from `devcluster/gomod/kstatus` into `.tools/`.

The test data are objects recorded from a real control plane by
tests/operator/integration/test_gitops_health.py.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from lupa import lua51  # type: ignore[import-untyped]

from devcluster import binaries

REPO = Path(__file__).resolve().parents[2]
ARGOCD_DIR = REPO / "deploy" / "argocd"
HEALTH_LUA = ARGOCD_DIR / "health.lua"
HEALTH_TESTS = ARGOCD_DIR / "health_test.yaml"
TESTDATA = ARGOCD_DIR / "testdata"
ARGOCD_CM = ARGOCD_DIR / "argocd-cm.yaml"
# Argo CD's key for a custom health check: resource.customizations.health.<group>_<kind>
ARGOCD_HEALTH_KEY = "resource.customizations.health.finetune.loraops.dev_LoRAJob"


def _to_lua(runtime: Any, value: Any) -> Any:
    """Python JSON-like data as Lua tables (what Argo CD hands the script as `obj`)."""
    if isinstance(value, Mapping):
        return runtime.table_from({k: _to_lua(runtime, v) for k, v in value.items()})
    if isinstance(value, list):
        return runtime.table_from([_to_lua(runtime, v) for v in value])
    return value


def argocd_health(obj: Mapping[str, Any], script: str | None = None) -> dict[str, str]:
    """Run the health script on `obj` as Argo CD does: a global `obj`, a returned table."""
    runtime = lua51.LuaRuntime(unpack_returned_tuples=True)
    runtime.globals().obj = _to_lua(runtime, obj)
    source = script if script is not None else HEALTH_LUA.read_text()
    # Argo CD wraps nothing: the file is a chunk that returns the health table.
    result = runtime.execute(source)
    return {str(k): str(v) for k, v in dict(result).items()}


def kstatus(objects: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """kstatus `status.Compute` of each object: {"status", "message", "conditions"}."""
    binaries.ensure((binaries.KSTATUS,))
    out = subprocess.run(
        [str(binaries.KSTATUS.path)],
        input=json.dumps(list(objects)),
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    if out.returncode != 0:
        raise RuntimeError(f"kstatus failed: {out.stderr.strip()}")
    results: list[dict[str, Any]] = json.loads(out.stdout)
    return results


def health_cases() -> list[tuple[str, dict[str, Any], dict[str, str]]]:
    """(name, object, expected Argo CD health) from health_test.yaml."""
    spec = yaml.safe_load(HEALTH_TESTS.read_text())
    cases = []
    for test in spec["tests"]:
        path = ARGOCD_DIR / test["inputPath"]
        cases.append((path.stem, yaml.safe_load(path.read_text()), dict(test["healthStatus"])))
    return cases


def recorded(job: Mapping[str, Any]) -> dict[str, Any]:
    """A LoRAJob as stored in testdata/: what health readers look at (metadata trimmed
    of server bookkeeping: uid, resourceVersion, managedFields, kopf's annotations)."""
    meta = job.get("metadata") or {}
    return {
        "apiVersion": job["apiVersion"],
        "kind": job["kind"],
        "metadata": {
            "name": meta["name"],
            "namespace": meta["namespace"],
            "generation": meta["generation"],
            "creationTimestamp": meta["creationTimestamp"],
        },
        "spec": job.get("spec") or {},
        "status": job.get("status") or {},
    }


def shape(job: Mapping[str, Any]) -> dict[str, Any]:
    """What must not drift between a stored object and a fresh recording: the phase,
    the status fields present, each condition's type/status/reason and whether the
    status (and every condition) observed the current generation. Times, names and
    messages may differ run to run."""
    status = job.get("status") or {}
    generation = (job.get("metadata") or {}).get("generation")
    return {
        "phase": status.get("phase"),
        "fields": sorted(status),
        "observed": status.get("observedGeneration") == generation,
        "conditions": sorted(
            (
                c["type"],
                c["status"],
                c.get("reason"),
                c.get("observedGeneration") == generation,
            )
            for c in status.get("conditions") or []
        ),
    }
