"""A small stand-in for Kueue's plain-Pod integration (opt-in: `ApiServer(kueue=True)`).

What it does, as Kueue does for pods labelled `kueue.x-k8s.io/queue-name`:
* on creation the pod gets the scheduling gate `kueue.x-k8s.io/admission`;
* a pod is admitted when its LocalQueue's ClusterQueue has nominal quota left in
  a ResourceFlavor for everything it requests (first fitting flavor, in order);
  admission removes the gate and adds the flavor's nodeLabels to nodeSelector;
* quota frees when admitted pods finish or go away; queued pods are admitted in
  priority order, then oldest first.

Not emulated: Workload objects, borrowing/cohorts, fair sharing, preemption.
"""

from __future__ import annotations

import asyncio
from fractions import Fraction

from tests.harness.kube_quantity import parse_quantity, pod_requests
from tests.harness.kube_resources import ResourceType
from tests.harness.kube_store import TERMINAL_POD_PHASES, Obj, Store

GROUP = "kueue.x-k8s.io"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
ADMISSION_GATE = "kueue.x-k8s.io/admission"
ADMITTED_ANNOTATION = "harness.loraops.dev/kueue-admission"  # "<clusterqueue>/<flavor>"


def _crd(plural: str, kind: str, scope: str) -> Obj:
    schema = {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}}
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "names": {
                "plural": plural,
                "singular": kind.lower(),
                "kind": kind,
                "listKind": f"{kind}List",
            },
            "scope": scope,
            "versions": [
                {
                    "name": name,
                    "served": True,
                    "storage": name == "v1beta2",
                    "schema": schema,
                    "subresources": {"status": {}},
                }
                for name in ("v1beta2", "v1beta1")
            ],
        },
    }


def kueue_crds() -> list[Obj]:
    """Minimal (schema-less) CRDs for the Kueue kinds the examples use."""
    return [
        _crd("resourceflavors", "ResourceFlavor", "Cluster"),
        _crd("clusterqueues", "ClusterQueue", "Cluster"),
        _crd("localqueues", "LocalQueue", "Namespaced"),
        _crd("workloads", "Workload", "Namespaced"),
    ]


def _queued(pod: Obj) -> bool:
    return QUEUE_LABEL in ((pod.get("metadata") or {}).get("labels") or {})


class FakeKueue:
    """Admission plugin + controller; `install()` hooks it into a Store."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._scheduled = False

    def install(self) -> None:
        self.store.sync_admission.append(self.gate_new_pods)
        self.store.after_commit.append(self.on_change)

    # ---------------------------------------------------------------- admission
    def gate_new_pods(
        self, store: Store, operation: str, resource: ResourceType, obj: Obj, old: Obj | None
    ) -> None:
        del store, old
        if operation != "CREATE" or resource.group or resource.plural != "pods" or not _queued(obj):
            return
        gates = obj.setdefault("spec", {}).setdefault("schedulingGates", [])
        if not any(g.get("name") == ADMISSION_GATE for g in gates):
            gates.append({"name": ADMISSION_GATE})

    # --------------------------------------------------------------- controller
    def on_change(
        self, store: Store, resource: ResourceType, operation: str, obj: Obj, old: Obj | None
    ) -> None:
        del store, operation, old
        relevant = resource.group == GROUP or (
            not resource.group and resource.plural == "pods" and _queued(obj)
        )
        if relevant and not self._scheduled:
            self._scheduled = True  # one reconcile per burst of changes
            try:
                asyncio.get_running_loop().call_soon(self._reconcile)
            except RuntimeError:
                self._scheduled = False

    def _find(self, plural: str, namespace: str, name: str) -> Obj | None:
        for resource in self.store.types.values():
            if resource.group == GROUP and resource.plural == plural:
                return self.store.find(resource, namespace if resource.namespaced else "", name)
        return None

    def _reconcile(self) -> None:
        self._scheduled = False
        pods_type = self.store.resource("", "v1", "pods")
        pods = [e.obj for e in self.store.iter_entries(pods_type, None) if _queued(e.obj)]
        usage: dict[tuple[str, str, str], Fraction] = {}
        waiting = []
        for pod in pods:
            meta = pod["metadata"]
            gated = any(
                g.get("name") == ADMISSION_GATE
                for g in (pod.get("spec") or {}).get("schedulingGates") or []
            )
            if gated and not meta.get("deletionTimestamp"):
                waiting.append(pod)
                continue
            admission = (meta.get("annotations") or {}).get(ADMITTED_ANNOTATION)
            if admission and (pod.get("status") or {}).get("phase") not in TERMINAL_POD_PHASES:
                queue, _, flavor = admission.partition("/")
                for key, amount in pod_requests(pod).items():
                    usage[(queue, flavor, key)] = (
                        usage.get((queue, flavor, key), Fraction(0)) + amount
                    )
        waiting.sort(
            key=lambda p: (
                -int((p.get("spec") or {}).get("priority", 0)),
                p["metadata"].get("creationTimestamp", ""),
            )
        )
        for pod in waiting:
            self._try_admit(pods_type, pod, usage)

    def _try_admit(
        self, pods_type: ResourceType, pod: Obj, usage: dict[tuple[str, str, str], Fraction]
    ) -> None:
        meta = pod["metadata"]
        local = self._find("localqueues", meta["namespace"], meta["labels"][QUEUE_LABEL])
        cluster_name = ((local or {}).get("spec") or {}).get("clusterQueue", "")
        cluster = self._find("clusterqueues", "", cluster_name) if cluster_name else None
        if cluster is None:
            return
        requested = {k: v for k, v in pod_requests(pod).items() if v > 0}
        chosen: dict[str, str] = {}  # resource -> flavor
        for group in (cluster.get("spec") or {}).get("resourceGroups") or []:
            covered = [r for r in group.get("coveredResources") or [] if r in requested]
            if not covered:
                continue
            for flavor in group.get("flavors") or []:
                quotas = {
                    r.get("name"): r.get("nominalQuota", 0) for r in flavor.get("resources") or []
                }
                fits = all(
                    usage.get((cluster_name, flavor["name"], r), Fraction(0)) + requested[r]
                    <= parse_quantity(quotas.get(r, 0))
                    for r in covered
                )
                if fits:
                    chosen.update(dict.fromkeys(covered, flavor["name"]))
                    break
            else:
                return  # this resource group has no flavor with room: stay queued
        if set(chosen) != set(requested):
            return  # something requested is not covered by the ClusterQueue
        flavor_name = next(iter(chosen.values()), "")
        flavor_obj = self._find("resourceflavors", "", flavor_name) or {}
        admitted = self.store.get_entry(pods_type, meta["namespace"], meta["name"]).fresh()
        spec = admitted.setdefault("spec", {})
        spec["schedulingGates"] = [
            g for g in spec.get("schedulingGates") or [] if g.get("name") != ADMISSION_GATE
        ]
        if not spec["schedulingGates"]:
            del spec["schedulingGates"]
        node_labels = (flavor_obj.get("spec") or {}).get("nodeLabels") or {}
        if node_labels:
            spec["nodeSelector"] = {**(spec.get("nodeSelector") or {}), **node_labels}
        admitted["metadata"].setdefault("annotations", {})[ADMITTED_ANNOTATION] = (
            f"{cluster_name}/{flavor_name}"
        )
        self.store.internal_update(pods_type, meta["namespace"], meta["name"], admitted)
        for key, amount in requested.items():
            slot = (cluster_name, chosen.get(key, flavor_name), key)
            usage[slot] = usage.get(slot, Fraction(0)) + amount
