"""Resource types the API emulator serves: built-ins plus CRD-registered ones."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tests.harness.kube_schema import CompiledSchema

_ALL_VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]


@dataclass
class ResourceType:
    group: str  # "" for the core group
    version: str
    plural: str
    singular: str
    kind: str
    namespaced: bool
    short_names: list[str] = field(default_factory=list)
    categories: list[str] = field(default_factory=list)
    subresources: frozenset[str] = frozenset()
    printer_columns: list[dict[str, Any]] = field(default_factory=list)
    schema: CompiledSchema | None = None
    custom: bool = False  # registered by a CRD
    storage_version: str = ""  # the version objects are stored in (CRDs with several versions)

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def storage_key(self) -> str:
        """All versions of one resource share storage, as on the real server."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def qualified(self) -> str:
        """How error messages name the resource: `pods`, `lorajobs.finetune.loraops.dev`."""
        return self.storage_key

    @property
    def has_status(self) -> bool:
        return "status" in self.subresources

    def discovery(self) -> list[dict[str, Any]]:
        """APIResource entries (the resource and its subresources) for /api(s)/<gv>."""
        main: dict[str, Any] = {
            "name": self.plural,
            "singularName": self.singular,
            "namespaced": self.namespaced,
            "kind": self.kind,
            "verbs": list(_ALL_VERBS),
            "storageVersionHash": "",
        }
        if self.short_names:
            main["shortNames"] = list(self.short_names)
        if self.categories:
            main["categories"] = list(self.categories)
        entries = [main]
        for sub in sorted(self.subresources):
            verbs = {"eviction": ["create"], "binding": ["create"], "log": ["get"]}.get(
                sub, ["get", "patch", "update"]
            )
            kind = {"eviction": "Eviction", "binding": "Binding", "log": "Pod"}.get(sub, self.kind)
            group = {"eviction": "policy"}.get(sub)
            entry: dict[str, Any] = {
                "name": f"{self.plural}/{sub}",
                "singularName": "",
                "namespaced": self.namespaced,
                "kind": kind,
                "verbs": verbs,
            }
            if group:
                entry.update(group="policy", version="v1")
            entries.append(entry)
        return entries


def _builtin(
    group: str,
    version: str,
    plural: str,
    kind: str,
    *,
    namespaced: bool = True,
    short: tuple[str, ...] = (),
    subresources: tuple[str, ...] = (),
    categories: tuple[str, ...] = (),
) -> ResourceType:
    return ResourceType(
        group=group,
        version=version,
        plural=plural,
        singular=kind.lower(),
        kind=kind,
        namespaced=namespaced,
        short_names=list(short),
        subresources=frozenset(subresources),
        categories=list(categories),
    )


def builtin_resources() -> list[ResourceType]:
    """Built-in kinds: the ones with behaviour (pods, namespaces, quotas, events, CRDs,
    webhooks) plus plain storage for what charts and operators commonly create."""
    return [
        _builtin(
            "",
            "v1",
            "namespaces",
            "Namespace",
            namespaced=False,
            short=("ns",),
            subresources=("status",),
        ),
        _builtin(
            "",
            "v1",
            "pods",
            "Pod",
            short=("po",),
            subresources=("status", "eviction", "binding", "log"),
            categories=("all",),
        ),
        _builtin(
            "", "v1", "nodes", "Node", namespaced=False, short=("no",), subresources=("status",)
        ),
        _builtin("", "v1", "secrets", "Secret"),
        _builtin("", "v1", "configmaps", "ConfigMap", short=("cm",)),
        _builtin("", "v1", "events", "Event", short=("ev",)),
        _builtin(
            "", "v1", "resourcequotas", "ResourceQuota", short=("quota",), subresources=("status",)
        ),
        _builtin("", "v1", "serviceaccounts", "ServiceAccount", short=("sa",)),
        _builtin(
            "",
            "v1",
            "services",
            "Service",
            short=("svc",),
            subresources=("status",),
            categories=("all",),
        ),
        _builtin("", "v1", "endpoints", "Endpoints", short=("ep",)),
        _builtin(
            "",
            "v1",
            "persistentvolumeclaims",
            "PersistentVolumeClaim",
            short=("pvc",),
            subresources=("status",),
        ),
        _builtin("", "v1", "limitranges", "LimitRange", short=("limits",)),
        _builtin("events.k8s.io", "v1", "events", "Event", short=("ev",)),
        _builtin(
            "apiextensions.k8s.io",
            "v1",
            "customresourcedefinitions",
            "CustomResourceDefinition",
            namespaced=False,
            short=("crd", "crds"),
            subresources=("status",),
        ),
        _builtin(
            "admissionregistration.k8s.io",
            "v1",
            "validatingwebhookconfigurations",
            "ValidatingWebhookConfiguration",
            namespaced=False,
        ),
        _builtin(
            "admissionregistration.k8s.io",
            "v1",
            "mutatingwebhookconfigurations",
            "MutatingWebhookConfiguration",
            namespaced=False,
        ),
        _builtin("coordination.k8s.io", "v1", "leases", "Lease"),
        _builtin(
            "apps",
            "v1",
            "deployments",
            "Deployment",
            short=("deploy",),
            subresources=("status",),
            categories=("all",),
        ),
        _builtin("batch", "v1", "jobs", "Job", subresources=("status",), categories=("all",)),
        _builtin(
            "policy",
            "v1",
            "poddisruptionbudgets",
            "PodDisruptionBudget",
            short=("pdb",),
            subresources=("status",),
        ),
        _builtin(
            "scheduling.k8s.io",
            "v1",
            "priorityclasses",
            "PriorityClass",
            namespaced=False,
            short=("pc",),
        ),
        _builtin("rbac.authorization.k8s.io", "v1", "roles", "Role"),
        _builtin("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding"),
        _builtin(
            "rbac.authorization.k8s.io", "v1", "clusterroles", "ClusterRole", namespaced=False
        ),
        _builtin(
            "rbac.authorization.k8s.io",
            "v1",
            "clusterrolebindings",
            "ClusterRoleBinding",
            namespaced=False,
        ),
        _builtin("monitoring.coreos.com", "v1", "servicemonitors", "ServiceMonitor"),
        _builtin(
            "authorization.k8s.io",
            "v1",
            "selfsubjectaccessreviews",
            "SelfSubjectAccessReview",
            namespaced=False,
        ),
    ]


def crd_resource_types(crd: dict[str, Any]) -> list[ResourceType]:
    """ResourceTypes for every served version of a CRD object."""
    spec = crd.get("spec") or {}
    names = spec.get("names") or {}
    versions = spec.get("versions") or []
    storage = next(
        (v["name"] for v in versions if v.get("storage")), versions[0]["name"] if versions else ""
    )
    types = []
    for version in versions:
        if not version.get("served", True):
            continue
        schema = ((version.get("schema") or {}).get("openAPIV3Schema")) or None
        # The scale subresource is not emulated, so it is not advertised either.
        subresources = frozenset(
            name for name in ("status",) if name in (version.get("subresources") or {})
        )
        types.append(
            ResourceType(
                group=spec["group"],
                version=version["name"],
                plural=names["plural"],
                singular=names.get("singular") or names["kind"].lower(),
                kind=names["kind"],
                namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                short_names=list(names.get("shortNames") or []),
                categories=list(names.get("categories") or []),
                subresources=subresources,
                printer_columns=list(version.get("additionalPrinterColumns") or []),
                schema=CompiledSchema(schema) if schema else None,
                custom=True,
                storage_version=storage,
            )
        )
    return types
