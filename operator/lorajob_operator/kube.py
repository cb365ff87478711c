"""The only module that calls the Kubernetes API.

It uses the official synchronous client from async code through
`asyncio.to_thread`, and asks for raw JSON (`_preload_content=False`) so the
rest of the operator deals in the same camelCase dicts kopf hands to handlers.
API errors become a few exceptions that mean something to the reconciler:
AlreadyExists is success, exceeded quota is a wait, other 4xx on create is a
refusal. Secret *values* are never read into memory beyond the HTTP response.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from lorajob_operator import api
from lorajob_operator.objects import LABEL_JOB_UID, MANAGED_BY, JobRef, selector_string

__all__ = ["Kube", "KubeError", "PodRejected", "QuotaExceeded", "load_config"]

log = logging.getLogger(__name__)
T = TypeVar("T")

MERGE_PATCH = "application/merge-patch+json"
# Seconds for one API call; the default (none) could hang a reconciliation forever.
REQUEST_TIMEOUT = 30.0


class KubeError(Exception):
    """An API call failed in a way that is worth retrying later."""


class QuotaExceeded(KubeError):
    """A ResourceQuota has no room for the object (HTTP 403 'exceeded quota')."""


class PodRejected(KubeError):
    """The API server refused the pod for good (admission policy, invalid object)."""


def load_config() -> None:
    """KUBECONFIG / ~/.kube/config, or the in-cluster service account."""
    try:
        config.load_kube_config()  # type: ignore[no-untyped-call]
    except (config.ConfigException, FileNotFoundError, TypeError):
        config.load_incluster_config()  # type: ignore[no-untyped-call]


def _message(exc: ApiException) -> str:
    """The server's human message (never the request body, which may hold data)."""
    try:
        body = json.loads(exc.body or "{}")
    except (TypeError, ValueError):
        body = {}
    if isinstance(body, dict) and body.get("message"):
        return str(body["message"])
    return f"HTTP {exc.status} {exc.reason or ''}".strip()


def _json(response: Any) -> Any:
    return json.loads(response.data)


class Kube:
    """Typed, async-friendly calls for the few things the operator does."""

    def __init__(self, api_client: client.ApiClient | None = None) -> None:
        self.api_client = api_client or client.ApiClient()
        self.core = client.CoreV1Api(self.api_client)
        self.custom = client.CustomObjectsApi(self.api_client)

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        kwargs.setdefault("_request_timeout", REQUEST_TIMEOUT)
        return await asyncio.to_thread(fn, *args, **kwargs)

    # -- LoRAJobs

    async def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            resp = await self._call(
                self.custom.get_namespaced_custom_object,
                api.GROUP,
                api.VERSION,
                namespace,
                api.PLURAL,
                name,
                _preload_content=False,
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise KubeError(f"get LoRAJob {namespace}/{name}: {_message(exc)}") from exc
        result: dict[str, Any] = _json(resp)
        return result

    async def patch_job_status(
        self, namespace: str, name: str, patch: Mapping[str, Any]
    ) -> dict[str, Any] | None:
        """Merge-patch `.status` through the status subresource (None if the job is gone)."""
        try:
            resp = await self._call(
                self.custom.patch_namespaced_custom_object_status,
                api.GROUP,
                api.VERSION,
                namespace,
                api.PLURAL,
                name,
                {"status": dict(patch)},
                _content_type=MERGE_PATCH,
                _preload_content=False,
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise KubeError(f"patch status of {namespace}/{name}: {_message(exc)}") from exc
        result: dict[str, Any] = _json(resp)
        return result

    async def delete_job(self, namespace: str, name: str) -> None:
        try:
            await self._call(
                self.custom.delete_namespaced_custom_object,
                api.GROUP,
                api.VERSION,
                namespace,
                api.PLURAL,
                name,
                propagation_policy="Background",
                _preload_content=False,
            )
        except ApiException as exc:
            if exc.status != 404:
                raise KubeError(f"delete LoRAJob {namespace}/{name}: {_message(exc)}") from exc

    # -- trainer pods

    async def list_job_pods(self, job: JobRef) -> list[dict[str, Any]]:
        """The job's pods, selected by uid: a re-created job never sees old pods."""
        return await self._list_pods(job.namespace, selector_string(job))

    async def list_trainer_pods(self, namespace: str) -> list[dict[str, Any]]:
        """Every LoRAJob trainer pod of the namespace."""
        return await self._list_pods(
            namespace, f"app.kubernetes.io/managed-by={MANAGED_BY},{LABEL_JOB_UID}"
        )

    async def _list_pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        try:
            resp = await self._call(
                self.core.list_namespaced_pod,
                namespace,
                label_selector=selector,
                _preload_content=False,
            )
        except ApiException as exc:
            raise KubeError(f"list pods in {namespace} ({selector}): {_message(exc)}") from exc
        items: list[dict[str, Any]] = _json(resp).get("items") or []
        return items

    async def create_pod(self, namespace: str, body: Mapping[str, Any]) -> bool:
        """Create the pod; False when it already exists (a replayed create).

        A pod of that name that belongs to someone else is a refusal, not ours.
        """
        try:
            await self._call(
                self.core.create_namespaced_pod, namespace, dict(body), _preload_content=False
            )
        except ApiException as exc:
            message = _message(exc)
            if exc.status == 409:
                await self._check_owner(namespace, body)
                return False
            if exc.status == 403 and "exceeded quota" in message:
                raise QuotaExceeded(message) from exc
            if exc.status in (400, 403, 422):
                raise PodRejected(message) from exc
            raise KubeError(f"create pod in {namespace}: {message}") from exc
        return True

    async def _check_owner(self, namespace: str, body: Mapping[str, Any]) -> None:
        name = str(body["metadata"]["name"])
        try:
            resp = await self._call(
                self.core.read_namespaced_pod, name, namespace, _preload_content=False
            )
        except ApiException as exc:
            raise KubeError(f"get pod {namespace}/{name}: {_message(exc)}") from exc
        existing = (_json(resp).get("metadata") or {}).get("labels") or {}
        wanted = (body["metadata"].get("labels") or {}).get(LABEL_JOB_UID)
        if existing.get(LABEL_JOB_UID) != wanted:
            raise PodRejected(
                f"a pod named {name} already exists in namespace {namespace} and does not "
                "belong to this LoRAJob; delete or rename it"
            )

    async def delete_pod(self, namespace: str, name: str, grace_seconds: int | None) -> None:
        """Delete (SIGTERM, then SIGKILL after the grace period); a missing pod is fine."""
        try:
            await self._call(
                self.core.delete_namespaced_pod,
                name,
                namespace,
                grace_period_seconds=grace_seconds,
                _preload_content=False,
            )
        except ApiException as exc:
            if exc.status != 404:
                raise KubeError(f"delete pod {namespace}/{name}: {_message(exc)}") from exc

    # -- Secrets and Events

    async def secret_exists(self, namespace: str, name: str) -> bool:
        """GET the Secret and keep only whether it exists; its data is dropped unread."""
        try:
            resp: Any = await self._call(
                self.core.read_namespaced_secret, name, namespace, _preload_content=False
            )
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise KubeError(f"get Secret {namespace}/{name}: {_message(exc)}") from exc
        resp.drain_conn()  # discard the body (the Secret's data) without parsing it
        resp.release_conn()
        return True

    async def post_event(self, namespace: str, body: Mapping[str, Any]) -> None:
        """Best effort: a lost Event must never fail a reconciliation."""
        try:
            await self._call(
                self.core.create_namespaced_event, namespace, dict(body), _preload_content=False
            )
        except (ApiException, OSError) as exc:
            log.warning("could not post event %s: %s", body.get("reason"), exc)
