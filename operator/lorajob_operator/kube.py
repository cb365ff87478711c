"""The only module that calls the Kubernetes API.

Calls go out over one shared aiohttp session (keep-alive connections, no
threads): the operator makes a handful of calls per job, and at thousands of
jobs the synchronous client's thread hand-offs and per-call connection setup
cost more CPU than the reconciler itself. Where to connect and how to
authenticate still come from the official client's configuration
(kubeconfig or the in-cluster service account, token refresh included).
Everything is raw JSON, so the rest of the operator deals in the same
camelCase dicts kopf hands to handlers.
API errors become a few exceptions that mean something to the reconciler:
AlreadyExists is success, exceeded quota is a wait, other 4xx on create is a
refusal. Secret *values* are never read into memory beyond the HTTP response.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any
from urllib.parse import quote

import aiohttp
from kubernetes import client, config

from lorajob_operator import api
from lorajob_operator.objects import LABEL_JOB_UID, MANAGED_BY, JobRef, selector_string

__all__ = ["Kube", "KubeError", "PodRejected", "QuotaExceeded", "load_config"]

log = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"
# Seconds for one API call; the default (none) could hang a reconciliation forever.
REQUEST_TIMEOUT = 30.0
# Connections kept open to the API server; more requests than this wait for one.
MAX_CONNECTIONS = 32
# Seconds the Authorization header is reused before the client's configuration is
# asked again (the official client re-reads a service-account token once a minute
# too; asking costs an environment scan for proxy settings per call).
TOKEN_REUSE_SECONDS = 60.0
# Seconds a pod watch stream lasts before the server ends it (it is then resumed);
# the client gives up on a stream silent for WATCH_SECONDS + WATCH_SLACK (bookmarks
# and events keep a healthy one busy).
WATCH_SECONDS = 300
WATCH_SLACK = 30
# Every trainer pod this operator manages (the jobs' pods carry their job's uid).
TRAINER_PODS = f"app.kubernetes.io/managed-by={MANAGED_BY},{LABEL_JOB_UID}"
_JOBS = f"/apis/{api.GROUP}/{api.VERSION}/namespaces/{{ns}}/{api.PLURAL}"


class KubeError(Exception):
    """An API call failed in a way that is worth retrying later."""


class QuotaExceeded(KubeError):
    """A ResourceQuota has no room for the object (HTTP 403 'exceeded quota')."""


class PodRejected(KubeError):
    """The API server refused the pod for good (admission policy, invalid object)."""


class _ApiStatus(Exception):
    """A non-2xx answer: its code and the server's human message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def load_config() -> None:
    """KUBECONFIG / ~/.kube/config, or the in-cluster service account."""
    try:
        config.load_kube_config()  # type: ignore[no-untyped-call]
    except (config.ConfigException, FileNotFoundError, TypeError):
        config.load_incluster_config()  # type: ignore[no-untyped-call]


def _message(status: int, reason: str, payload: bytes) -> str:
    """The server's human message (never the request body, which may hold data)."""
    try:
        body = json.loads(payload or b"{}")
    except (TypeError, ValueError):
        body = {}
    if isinstance(body, dict) and body.get("message"):
        return str(body["message"])
    return f"HTTP {status} {reason or ''}".strip()


def _ssl_context(cfg: client.Configuration) -> ssl.SSLContext | bool:
    if not cfg.verify_ssl:
        return False
    ctx = ssl.create_default_context(cafile=cfg.ssl_ca_cert)
    if cfg.cert_file:
        ctx.load_cert_chain(cfg.cert_file, cfg.key_file)
    return ctx


def _q(segment: str) -> str:
    return quote(segment, safe="")


def _pods_path(namespace: str | None) -> str:
    return "/api/v1/pods" if namespace is None else f"/api/v1/namespaces/{_q(namespace)}/pods"


def _scope(namespace: str | None) -> str:
    return "all namespaces" if namespace is None else f"namespace {namespace}"


class Kube:
    """Typed async calls for the few things the operator does.

    `api_client` only supplies the configuration (server, CA, credentials); by
    default the one `load_config()` set up.
    """

    def __init__(self, api_client: client.ApiClient | None = None) -> None:
        self.configuration: client.Configuration = (
            api_client.configuration if api_client else client.Configuration.get_default_copy()
        )
        self._host = str(self.configuration.host).rstrip("/")
        self._session: aiohttp.ClientSession | None = None
        # Watch streams hold a connection for minutes each: they get their own pool,
        # so a watch per namespace can never take every connection calls need.
        self._watch_session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._token: str | None = None
        self._token_until = 0.0  # time.monotonic()

    def _get_session(self) -> aiohttp.ClientSession:
        """The shared session, made on first use inside the running event loop."""
        loop = asyncio.get_running_loop()
        if self._session is None or self._session.closed or self._loop is not loop:
            connector = aiohttp.TCPConnector(
                limit=MAX_CONNECTIONS, ssl=_ssl_context(self.configuration)
            )
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
            )
            self._loop = loop
        return self._session

    def _get_watch_session(self) -> aiohttp.ClientSession:
        """The session for watch streams (no connection limit: one stream per watch)."""
        loop = asyncio.get_running_loop()
        session = self._watch_session
        if session is None or session.closed or session.loop is not loop:
            connector = aiohttp.TCPConnector(limit=0, ssl=_ssl_context(self.configuration))
            session = self._watch_session = aiohttp.ClientSession(connector=connector)
        return session

    async def close(self) -> None:
        for session in (self._session, self._watch_session):
            if session is not None and not session.closed:
                await session.close()
        self._session = self._watch_session = None

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        now = time.monotonic()
        if now >= self._token_until:
            # As the official client does it: this re-reads a rotated service-account
            # token (or re-runs a kubeconfig exec plugin) when due.
            token = self.configuration.get_api_key_with_prefix("BearerToken", alias="authorization")
            self._token = str(token) if token else None
            self._token_until = now + TOKEN_REUSE_SECONDS
        if self._token:
            headers["Authorization"] = self._token
        return headers

    async def _request(
        self,
        method: str,
        path: str,
        *,
        body: Mapping[str, Any] | None = None,
        params: Mapping[str, str] | None = None,
        content_type: str = "application/json",
        keep_body: bool = True,
    ) -> Any:
        """The decoded JSON answer (None with keep_body=False); _ApiStatus for non-2xx,
        KubeError when the server cannot be reached or does not answer in time."""
        headers = self._headers()
        data = None
        if body is not None:
            headers["Content-Type"] = content_type
            data = json.dumps(body)
        try:
            async with self._get_session().request(
                method, self._host + path, params=params, data=data, headers=headers
            ) as resp:
                if resp.status >= 300:
                    payload = await resp.read()
                    raise _ApiStatus(resp.status, _message(resp.status, resp.reason or "", payload))
                if not keep_body:
                    # Read and drop (the connection is reused only once the body is consumed).
                    async for _ in resp.content.iter_chunked(65536):
                        pass
                    return None
                return json.loads(await resp.read())
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise KubeError(f"{method} {path}: {type(exc).__name__}: {exc}") from exc

    # -- LoRAJobs

    async def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            result: dict[str, Any] = await self._request(
                "GET", f"{_JOBS.format(ns=_q(namespace))}/{_q(name)}"
            )
        except _ApiStatus as exc:
            if exc.status == 404:
                return None
            raise KubeError(f"get LoRAJob {namespace}/{name}: {exc.message}") from exc
        return result

    async def patch_job_status(
        self, namespace: str, name: str, patch: Mapping[str, Any]
    ) -> dict[str, Any] | None:
        """Merge-patch `.status` through the status subresource (None if the job is gone)."""
        try:
            result: dict[str, Any] = await self._request(
                "PATCH",
                f"{_JOBS.format(ns=_q(namespace))}/{_q(name)}/status",
                body={"status": dict(patch)},
                content_type=MERGE_PATCH,
            )
        except _ApiStatus as exc:
            if exc.status == 404:
                return None
            raise KubeError(f"patch status of {namespace}/{name}: {exc.message}") from exc
        return result

    async def delete_job(self, namespace: str, name: str) -> None:
        try:
            await self._request(
                "DELETE",
                f"{_JOBS.format(ns=_q(namespace))}/{_q(name)}",
                params={"propagationPolicy": "Background"},
                keep_body=False,
            )
        except _ApiStatus as exc:
            if exc.status != 404:
                raise KubeError(f"delete LoRAJob {namespace}/{name}: {exc.message}") from exc

    # -- trainer pods

    async def list_job_pods(self, job: JobRef) -> list[dict[str, Any]]:
        """The job's pods, selected by uid: a re-created job never sees old pods."""
        return await self._list_pods(job.namespace, selector_string(job))

    async def list_trainer_pods(self, namespace: str) -> list[dict[str, Any]]:
        """Every LoRAJob trainer pod of the namespace."""
        return await self._list_pods(namespace, TRAINER_PODS)

    async def list_trainer_pods_at(self, namespace: str | None) -> tuple[list[dict[str, Any]], str]:
        """Every trainer pod of `namespace` (all namespaces for None), and the
        resourceVersion of the listing (where a watch picks up)."""
        try:
            result = await self._request(
                "GET", _pods_path(namespace), params={"labelSelector": TRAINER_PODS}
            )
        except _ApiStatus as exc:
            raise KubeError(f"list trainer pods in {_scope(namespace)}: {exc.message}") from exc
        items: list[dict[str, Any]] = result.get("items") or []
        return items, str((result.get("metadata") or {}).get("resourceVersion") or "")

    async def watch_trainer_pods(
        self, namespace: str | None, resource_version: str
    ) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """The watch events on trainer pods after `resource_version`, as (type, object),
        until the server ends the stream. A version too old to resume from comes as
        an ERROR event (HTTP 410 Gone), as Kubernetes itself sends it in the stream."""
        params = {
            "labelSelector": TRAINER_PODS,
            "watch": "true",
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(WATCH_SECONDS),
        }
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=REQUEST_TIMEOUT, sock_read=WATCH_SECONDS + WATCH_SLACK
        )
        path = _pods_path(namespace)
        try:
            async with self._get_watch_session().get(
                self._host + path, params=params, headers=self._headers(), timeout=timeout
            ) as resp:
                if resp.status == 410:
                    message = _message(resp.status, resp.reason or "", await resp.read())
                    yield "ERROR", {"code": 410, "reason": "Expired", "message": message}
                    return
                if resp.status >= 300:
                    message = _message(resp.status, resp.reason or "", await resp.read())
                    raise KubeError(f"watch trainer pods in {_scope(namespace)}: {message}")
                buffer = b""
                async for chunk in resp.content.iter_any():
                    # Lines may be longer than aiohttp's line limit (big pods): split here.
                    buffer += chunk
                    *lines, buffer = buffer.split(b"\n")
                    for line in lines:
                        if line.strip():
                            event = json.loads(line)
                            yield str(event.get("type")), event.get("object") or {}
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise KubeError(f"watch {path}: {type(exc).__name__}: {exc}") from exc

    async def _list_pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        try:
            result = await self._request(
                "GET",
                f"/api/v1/namespaces/{_q(namespace)}/pods",
                params={"labelSelector": selector},
            )
        except _ApiStatus as exc:
            raise KubeError(f"list pods in {namespace} ({selector}): {exc.message}") from exc
        items: list[dict[str, Any]] = result.get("items") or []
        return items

    async def create_pod(self, namespace: str, body: Mapping[str, Any]) -> dict[str, Any] | None:
        """Create the pod: the pod as created, or None when it already exists (a
        replayed create).

        A pod of that name that belongs to someone else is a refusal, not ours.
        """
        try:
            created: dict[str, Any] = await self._request(
                "POST", f"/api/v1/namespaces/{_q(namespace)}/pods", body=body
            )
        except _ApiStatus as exc:
            if exc.status == 409:
                await self._check_owner(namespace, body)
                return None
            if exc.status == 403 and "exceeded quota" in exc.message:
                raise QuotaExceeded(exc.message) from exc
            if exc.status in (400, 403, 422):
                raise PodRejected(exc.message) from exc
            raise KubeError(f"create pod in {namespace}: {exc.message}") from exc
        return created

    async def _check_owner(self, namespace: str, body: Mapping[str, Any]) -> None:
        name = str(body["metadata"]["name"])
        try:
            existing_pod = await self._request(
                "GET", f"/api/v1/namespaces/{_q(namespace)}/pods/{_q(name)}"
            )
        except _ApiStatus as exc:
            raise KubeError(f"get pod {namespace}/{name}: {exc.message}") from exc
        existing = (existing_pod.get("metadata") or {}).get("labels") or {}
        wanted = (body["metadata"].get("labels") or {}).get(LABEL_JOB_UID)
        if existing.get(LABEL_JOB_UID) != wanted:
            raise PodRejected(
                f"a pod named {name} already exists in namespace {namespace} and does not "
                "belong to this LoRAJob; delete or rename it"
            )

    async def delete_pod(self, namespace: str, name: str, grace_seconds: int | None) -> None:
        """Delete (SIGTERM, then SIGKILL after the grace period); a missing pod is fine."""
        params = {} if grace_seconds is None else {"gracePeriodSeconds": str(grace_seconds)}
        try:
            await self._request(
                "DELETE",
                f"/api/v1/namespaces/{_q(namespace)}/pods/{_q(name)}",
                params=params,
                keep_body=False,
            )
        except _ApiStatus as exc:
            if exc.status != 404:
                raise KubeError(f"delete pod {namespace}/{name}: {exc.message}") from exc

    # -- Secrets and Events

    async def secret_exists(self, namespace: str, name: str) -> bool:
        """GET the Secret and keep only whether it exists; its data is dropped unread."""
        try:
            await self._request(
                "GET", f"/api/v1/namespaces/{_q(namespace)}/secrets/{_q(name)}", keep_body=False
            )
        except _ApiStatus as exc:
            if exc.status == 404:
                return False
            raise KubeError(f"get Secret {namespace}/{name}: {exc.message}") from exc
        return True

    async def post_event(self, namespace: str, body: Mapping[str, Any]) -> None:
        """Best effort: a lost Event must never fail a reconciliation."""
        try:
            await self._request(
                "POST", f"/api/v1/namespaces/{_q(namespace)}/events", body=body, keep_body=False
            )
        except (_ApiStatus, KubeError) as exc:
            log.warning("could not post event %s: %s", body.get("reason"), exc)
