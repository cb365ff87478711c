"""Admission for the API emulator: ResourceQuota and validating webhooks.

* Quota: pod creation is rejected with 403 "exceeded quota: ..." when the sum of
  non-terminal pods' requests/limits in the namespace would pass a quota's
  `spec.hard` (keys `pods`, `count/pods`, `cpu`, `memory`, `requests.<res>`,
  `limits.<res>`); quota `status.hard/used` is kept current like the quota controller.
* Webhooks: every ValidatingWebhookConfiguration whose rules match gets an
  AdmissionReview v1 POSTed to its `clientConfig.url` (TLS verified against
  `caBundle`); a denial becomes the real server's error text.
"""

from __future__ import annotations

import base64
import json
import ssl
import uuid
from fractions import Fraction
from typing import Any

import aiohttp
import jsonpatch

from tests.harness import kube_errors as errors
from tests.harness.kube_quantity import (
    QuantityError,
    format_quantity,
    parse_quantity,
    sum_containers,
)
from tests.harness.kube_resources import ResourceType
from tests.harness.kube_store import TERMINAL_POD_PHASES, Obj, Store

_COMPUTE = ("cpu", "memory", "ephemeral-storage")


# ------------------------------------------------------------------------ quota
def _container_amounts(pod: Obj, section: str) -> dict[str, Fraction]:
    return sum_containers(pod, lambda res: res.get(section) or {})


def pod_usage(pod: Obj, key: str) -> Fraction:
    """How much of quota key `key` one pod consumes."""
    if key in ("pods", "count/pods"):
        return Fraction(1)
    if key.startswith("requests."):
        return _container_amounts(pod, "requests").get(key[len("requests.") :], Fraction(0))
    if key.startswith("limits."):
        return _container_amounts(pod, "limits").get(key[len("limits.") :], Fraction(0))
    if key in _COMPUTE:
        return _container_amounts(pod, "requests").get(key, Fraction(0))
    return Fraction(0)


def _counts(pod: Obj) -> bool:
    return (pod.get("status") or {}).get("phase") not in TERMINAL_POD_PHASES


# Object-count quota keys the real server also accepts without the count/ prefix.
_LEGACY_COUNT_KEYS = {
    "services",
    "secrets",
    "configmaps",
    "persistentvolumeclaims",
    "resourcequotas",
}


def count_keys(resource: ResourceType) -> set[str]:
    """Quota keys that count objects of `resource` (`count/<plural>.<group>` etc.)."""
    keys = {f"count/{resource.storage_key}"}
    if not resource.group and resource.plural in _LEGACY_COUNT_KEYS:
        keys.add(resource.plural)
    return keys


def _counted_resource(store: Store, key: str) -> ResourceType | None:
    name = key.removeprefix("count/")
    if key == name and name not in _LEGACY_COUNT_KEYS:
        return None
    for resource in store.types.values():
        if resource.storage_key == name and resource.namespaced:
            return resource
    return None


def namespace_usage(store: Store, namespace: str, keys: list[str]) -> dict[str, Fraction]:
    """Current usage of each quota key in `namespace` (non-terminal pods, object counts)."""
    pods = store.resource("", "v1", "pods")
    used = dict.fromkeys(keys, Fraction(0))
    pod_keys = []
    for key in keys:
        counted = _counted_resource(store, key) if key not in ("pods", "count/pods") else None
        if counted is not None:
            used[key] = Fraction(sum(1 for _ in store.iter_entries(counted, namespace)))
        else:
            pod_keys.append(key)
    if pod_keys:
        for entry in store.iter_entries(pods, namespace):
            if not _counts(entry.obj):
                continue
            for key in pod_keys:
                used[key] += pod_usage(entry.obj, key)
    return used


def quota_admission(
    store: Store, operation: str, resource: ResourceType, obj: Obj, old: Obj | None
) -> None:
    """Reject a creation that would exceed a ResourceQuota of its namespace: compute
    resources and counts for pods, object counts (`count/...`) for everything."""
    del old
    if operation != "CREATE" or not resource.namespaced:
        return
    is_pod = not resource.group and resource.plural == "pods"
    counted_here = count_keys(resource)
    namespace = obj["metadata"]["namespace"]
    quotas = store.resource("", "v1", "resourcequotas")
    for entry in store.iter_entries(quotas, namespace):
        hard_spec: dict[str, Any] = (entry.obj.get("spec") or {}).get("hard") or {}
        hard = {k: parse_quantity(v) for k, v in hard_spec.items()}
        if is_pod:
            requested = {k: pod_usage(obj, k) for k in hard}
        else:
            requested = {k: Fraction(1) for k in hard if k in counted_here}
        requested = {k: v for k, v in requested.items() if v > 0}
        if not requested:
            continue
        used = namespace_usage(store, namespace, list(requested))
        exceeded = sorted(k for k, v in requested.items() if used[k] + v > hard[k])
        if exceeded:

            def render(values: dict[str, Fraction], keys: list[str]) -> str:
                return ",".join(f"{k}={format_quantity(values[k])}" for k in keys)

            raise errors.forbidden(
                resource.group,
                resource.plural,
                obj["metadata"]["name"],
                f"exceeded quota: {entry.obj['metadata']['name']}, requested: {render(requested, exceeded)}, "
                f"used: {render(used, exceeded)}, limited: {render(hard, exceeded)}",
            )


def refresh_quota_status(
    store: Store, resource: ResourceType, operation: str, obj: Obj, old: Obj | None
) -> None:
    """After-commit hook: keep `status.used` of the namespace's quotas current.

    Usage only changes when objects appear or disappear, or pods become terminal,
    so other writes (the bulk: status updates) cost nothing here."""
    if not resource.namespaced:
        return
    is_pod = not resource.group and resource.plural == "pods"
    is_quota = not resource.group and resource.plural == "resourcequotas"
    # Usage changes on create/delete, and for pods when they turn terminal.
    pod_unchanged = not is_pod or (old is not None and _counts(old) == _counts(obj))
    if operation == "update" and not is_quota and pod_unchanged:
        return
    namespace = obj["metadata"].get("namespace", "")
    quotas = store.resource("", "v1", "resourcequotas")
    counted_here = count_keys(resource)
    for entry in list(store.iter_entries(quotas, namespace)):
        hard = (entry.obj.get("spec") or {}).get("hard") or {}
        if not (is_quota or is_pod or counted_here.intersection(hard)):
            continue  # e.g. an Event in a namespace with a GPU quota
        try:
            used = namespace_usage(store, namespace, list(hard))
        except QuantityError:
            continue
        status = {
            "hard": dict(hard),
            "used": {k: format_quantity(v) if v else "0" for k, v in used.items()},
        }
        if entry.obj.get("status") != status:
            updated = entry.fresh()
            updated["status"] = status
            store.internal_update(quotas, namespace, entry.obj["metadata"]["name"], updated)


# ------------------------------------------------------------------- priority
_SYSTEM_PRIORITIES = {
    "system-cluster-critical": 2_000_000_000,
    "system-node-critical": 2_000_001_000,
}


def priority_admission(
    store: Store, operation: str, resource: ResourceType, obj: Obj, old: Obj | None
) -> None:
    """The Priority admission plugin: resolve spec.priorityClassName to spec.priority,
    rejecting unknown classes (403) like the real server."""
    del old
    if operation != "CREATE" or resource.group or resource.plural != "pods":
        return
    spec = obj.setdefault("spec", {})
    classes = store.resource("scheduling.k8s.io", "v1", "priorityclasses")
    name = spec.get("priorityClassName")
    if not name:
        default = next(
            (e.obj for e in store.iter_entries(classes, "") if e.obj.get("globalDefault")), None
        )
        if default is not None:
            spec["priorityClassName"] = default["metadata"]["name"]
            spec["priority"] = int(default.get("value", 0))
        return
    if name in _SYSTEM_PRIORITIES:
        spec["priority"] = _SYSTEM_PRIORITIES[name]
        return
    found = store.find(classes, "", name)
    if found is None:
        raise errors.forbidden(
            "", "pods", obj["metadata"]["name"], f"no PriorityClass with name {name} was found"
        )
    spec["priority"] = int(found.get("value", 0))
    if found.get("preemptionPolicy"):
        spec["preemptionPolicy"] = found["preemptionPolicy"]


# --------------------------------------------------------------------- webhooks
def _selector_matches(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    if not selector:
        return True
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr.get("key"), expr.get("operator"), expr.get("values") or []
        present = key in labels
        if (
            (op == "In" and (not present or labels[key] not in values))
            or (op == "NotIn" and present and labels[key] in values)
            or (op == "Exists" and not present)
            or (op == "DoesNotExist" and present)
        ):
            return False
    return True


def _rule_matches(
    rule: dict[str, Any], operation: str, resource: ResourceType, subresource: str | None
) -> bool:
    def any_of(values: list[str] | None, value: str) -> bool:
        return bool(values) and ("*" in values or value in values)  # type: ignore[operator]

    full = f"{resource.plural}/{subresource}" if subresource else resource.plural
    resources = rule.get("resources") or []
    resource_ok = (
        full in resources
        or "*/*" in resources
        or (not subresource and "*" in resources)
        or (subresource is not None and f"*/{subresource}" in resources)
        or (subresource is not None and f"{resource.plural}/*" in resources)
    )
    scope = rule.get("scope", "*")
    scope_ok = scope == "*" or (scope == "Namespaced") == resource.namespaced
    return (
        any_of(rule.get("operations"), operation)
        and any_of(rule.get("apiGroups"), resource.group)
        and any_of(rule.get("apiVersions"), resource.version)
        and resource_ok
        and scope_ok
    )


def _apply_admission_patch(name: str, obj: Obj, result: dict[str, Any]) -> Obj:
    if result.get("patchType", "JSONPatch") != "JSONPatch":
        raise errors.ApiError(
            500,
            "InternalError",
            f'webhook "{name}": unsupported patchType {result.get("patchType")!r}',
        )
    try:
        operations = json.loads(base64.b64decode(result["patch"]))
        patched: Obj = jsonpatch.JsonPatch(operations).apply(obj)
    except (ValueError, jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
        raise errors.ApiError(
            500,
            "InternalError",
            f'Internal error occurred: admission webhook "{name}" returned an invalid patch: {exc}',
        ) from exc
    return patched


class WebhookAdmission:
    """Calls the Validating- (or Mutating-) WebhookConfigurations' webhooks that match
    a request. Mutating webhooks' JSONPatch responses are applied in order; the
    (possibly patched) object is returned."""

    def __init__(self, store: Store, kind: str = "validating") -> None:
        self.store = store
        self.kind = kind
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def _session_for(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    async def __call__(
        self,
        operation: str,
        resource: ResourceType,
        obj: Obj,
        old: Obj | None,
        subresource: str | None,
    ) -> Obj:
        configs = self.store.resource(
            "admissionregistration.k8s.io", "v1", f"{self.kind}webhookconfigurations"
        )
        entries = list(self.store.iter_entries(configs, ""))
        if not entries:
            return obj
        for entry in entries:
            for webhook in entry.obj.get("webhooks") or []:
                if not any(
                    _rule_matches(r, operation, resource, subresource)
                    for r in webhook.get("rules") or []
                ):
                    continue
                labels = (obj.get("metadata") or {}).get("labels") or {}
                if not _selector_matches(webhook.get("objectSelector"), labels):
                    continue
                if resource.namespaced:
                    ns = self.store.find(
                        self.store.resource("", "v1", "namespaces"),
                        "",
                        obj["metadata"].get("namespace", ""),
                    )
                    ns_labels = ((ns or {}).get("metadata") or {}).get("labels") or {}
                    if not _selector_matches(webhook.get("namespaceSelector"), ns_labels):
                        continue
                result = await self._call(
                    webhook,
                    operation=operation,
                    resource=resource,
                    obj=obj,
                    old=old,
                    subresource=subresource,
                )
                if self.kind == "mutating" and result.get("patch"):
                    obj = _apply_admission_patch(webhook.get("name", ""), obj, result)
        return obj

    async def _call(
        self,
        webhook: dict[str, Any],
        *,
        operation: str,
        resource: ResourceType,
        obj: Obj,
        old: Obj | None,
        subresource: str | None,
    ) -> dict[str, Any]:
        name = webhook.get("name", "")
        client = webhook.get("clientConfig") or {}
        url = client.get("url")
        meta = obj.get("metadata") or {}
        gvk = {"group": resource.group, "version": resource.version, "kind": resource.kind}
        gvr = {"group": resource.group, "version": resource.version, "resource": resource.plural}
        review = {
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": str(uuid.uuid4()),
                "kind": gvk,
                "resource": gvr,
                "requestKind": gvk,
                "requestResource": gvr,
                "name": meta.get("name", ""),
                "namespace": meta.get("namespace", ""),
                "operation": operation,
                "userInfo": {
                    "username": "harness-admin",
                    "groups": ["system:masters", "system:authenticated"],
                },
                "object": None if operation == "DELETE" else obj,
                "oldObject": old if operation != "CREATE" else None,
                "dryRun": False,
                "options": None,
            },
        }
        if subresource:
            review["request"]["subResource"] = subresource  # type: ignore[index]
        ignore = webhook.get("failurePolicy", "Fail") == "Ignore"
        try:
            if not url:
                raise RuntimeError("only clientConfig.url is reachable from the harness API server")
            ssl_context = ssl.create_default_context()
            if client.get("caBundle"):
                ssl_context = ssl.create_default_context(
                    cadata=base64.b64decode(client["caBundle"]).decode()
                )
            async with self._session_for().post(
                url,
                json=review,
                ssl=ssl_context if url.startswith("https") else False,
                timeout=aiohttp.ClientTimeout(total=float(webhook.get("timeoutSeconds", 10))),
            ) as response:
                if response.status != 200:
                    raise RuntimeError(f"received status {response.status}")
                answer = await response.json(content_type=None)
        except (aiohttp.ClientError, RuntimeError, ssl.SSLError, TimeoutError, ValueError) as exc:
            if ignore:
                return {"allowed": True}
            raise errors.ApiError(
                500,
                "InternalError",
                f'Internal error occurred: failed calling webhook "{name}": failed to call webhook: '
                f'Post "{url}": {exc}',
            ) from exc
        result: dict[str, Any] = answer.get("response") or {}
        if result.get("allowed"):
            return result
        status = result.get("status") or {}
        code = max(int(status.get("code") or 400), 400)
        denied = f'admission webhook "{name}" denied the request'
        message = status.get("message") or status.get("reason")
        raise errors.ApiError(
            code,
            status.get("reason") or "BadRequest",
            f"{denied}: {message}" if message else f"{denied} without explanation",
        )
