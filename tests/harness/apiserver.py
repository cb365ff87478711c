"""A small Kubernetes API server emulator for tests (aiohttp, 127.0.0.1, bearer token).

Real clients talk to it: `kubectl` 1.35, helm, the `kubernetes` Python client and
`kopf run`. The semantics live in `kube_store.py` (CRUD, watch, GC), the admission
plugins in `kube_admission.py`, the Table printer in `kube_table.py`; this module is
the HTTP surface: discovery, routing, content negotiation, watch streaming.

Use it as a context manager; it runs its own event loop in a background thread so
synchronous tests can drive it:

    with ApiServer(workdir) as api:
        subprocess.run([kubectl(), "--kubeconfig", api.kubeconfig, "get", "ns"])
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import concurrent.futures
import contextlib
import json
import os
import secrets
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import aiohttp
import yaml
from aiohttp import web

from tests.harness import kube_errors as errors
from tests.harness.kube_admission import (
    WebhookAdmission,
    priority_admission,
    quota_admission,
    refresh_quota_status,
)
from tests.harness.kube_kueue import FakeKueue, kueue_crds
from tests.harness.kube_protobuf import PROTOBUF, ProtobufError
from tests.harness.kube_protobuf import decode as decode_protobuf
from tests.harness.kube_resources import ResourceType
from tests.harness.kube_selectors import SelectorError, parse_field_selector, parse_label_selector
from tests.harness.kube_store import DeleteOptions, Entry, Obj, Store, encode, now_rfc3339
from tests.harness.kube_table import table
from tests.harness.kube_tls import make_tls
from tests.harness.kubeconfig import write_kubeconfig

T = TypeVar("T")
_REPO_ROOT = Path(__file__).resolve().parents[2]
KUBERNETES_VERSION = {"major": "1", "minor": "35", "gitVersion": "v1.35.0+loraops-harness"}
_JSON = "application/json"
_UNAUTHENTICATED_PATHS = frozenset({"/healthz", "/readyz", "/livez", "/version"})
DEFAULT_WATCH_TIMEOUT = 1800.0
MAX_REQUEST_BYTES = 3 * 1024 * 1024  # the real server's request body limit
BOOKMARK_INTERVAL = 5.0


def _json_response(body: Any, status: int = 200) -> web.Response:
    raw = body if isinstance(body, bytes) else encode(body)
    return web.Response(body=raw, status=status, content_type=_JSON)


def _error_response(error: errors.ApiError) -> web.Response:
    return _json_response(error.status(), status=error.code)


def _success_status(code: int = 200, details: dict[str, Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Success",
        "code": code,
    }
    if details:
        body["details"] = details
    return body


def _served(resource: ResourceType, entry: Entry) -> bytes:
    """The object's JSON as `resource`'s version (CRDs may serve several versions)."""
    if entry.obj.get("apiVersion") == resource.api_version:
        return entry.raw
    obj = entry.fresh()
    obj["apiVersion"] = resource.api_version
    return encode(obj)


def _served_obj(resource: ResourceType, obj: Obj) -> Obj:
    if obj.get("apiVersion") == resource.api_version:
        return obj
    return {**obj, "apiVersion": resource.api_version}


def _wants_table(request: web.Request) -> bool:
    return "as=Table" in request.headers.get("Accept", "")


def _flag(request: web.Request, name: str) -> bool:
    return request.query.get(name, "").lower() in ("true", "1")


# ------------------------------------------------------------------- discovery
def _api_versions() -> Obj:
    return {
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}],
    }


def _group(name: str, versions: list[str]) -> Obj:
    entries = [{"groupVersion": f"{name}/{v}", "version": v} for v in versions]
    return {
        "kind": "APIGroup",
        "apiVersion": "v1",
        "name": name,
        "versions": entries,
        "preferredVersion": entries[0],
    }


def _group_list(store: Store) -> Obj:
    groups = [_group(name, versions) for name, versions in store.group_versions().items() if name]
    return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}


def _resource_list(store: Store, group: str, version: str) -> Obj:
    resources = store.resources_in(group, version)
    if not resources:
        raise errors.ApiError(404, "NotFound", "the server could not find the requested resource")
    gv = f"{group}/{version}" if group else version
    entries = [item for r in resources for item in r.discovery()]
    return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": entries}


# --------------------------------------------------------------------- routing
class _Target:
    """A parsed resource URL."""

    def __init__(
        self, resource: ResourceType, namespace: str | None, name: str | None, sub: str | None
    ) -> None:
        self.resource = resource
        self.namespace = namespace
        self.name = name
        self.sub = sub


def _parse_path(store: Store, parts: list[str]) -> _Target | Obj:
    """Resolve `/api/v1/...` or `/apis/g/v/...`; returns a discovery document for
    group/version roots."""
    if parts[0] == "api":
        group, rest = "", parts[1:]
        if not rest:
            return _api_versions()
    else:
        if len(parts) == 1:
            return _group_list(store)
        group, rest = parts[1], parts[2:]
        if not rest:
            versions = store.group_versions().get(group)
            if not versions:
                raise errors.ApiError(
                    404, "NotFound", "the server could not find the requested resource"
                )
            return _group(group, versions)
    version, rest = rest[0], rest[1:]
    if not rest:
        return _resource_list(store, group, version)
    namespace: str | None = None
    if (
        rest[0] == "namespaces"
        and len(rest) >= 3
        and not (len(rest) == 3 and rest[2] in ("status", "finalize"))
    ):
        namespace, rest = rest[1], rest[2:]
    resource = store.resource(group, version, rest[0])
    if namespace is not None and not resource.namespaced:
        raise errors.ApiError(404, "NotFound", "the server could not find the requested resource")
    name = rest[1] if len(rest) > 1 else None
    sub = rest[2] if len(rest) > 2 else None
    if len(rest) > 3 or (sub is not None and sub not in resource.subresources):
        raise errors.ApiError(404, "NotFound", "the server could not find the requested resource")
    return _Target(resource, namespace, name, sub)


async def _read_body(request: web.Request) -> Any:
    if (request.content_length or 0) > MAX_REQUEST_BYTES:
        raise errors.ApiError(
            413, "RequestEntityTooLarge", f"Request entity too large: limit is {MAX_REQUEST_BYTES}"
        )
    raw = await request.read()
    if len(raw) > MAX_REQUEST_BYTES:
        raise errors.ApiError(
            413, "RequestEntityTooLarge", f"Request entity too large: limit is {MAX_REQUEST_BYTES}"
        )
    if not raw:
        return None
    content_type = request.headers.get("Content-Type", "")
    try:
        if content_type.startswith(PROTOBUF):
            return decode_protobuf(raw)
        if "yaml" in content_type:
            return yaml.safe_load(raw)
        return json.loads(raw)
    except ProtobufError as exc:
        raise errors.ApiError(415, "UnsupportedMediaType", str(exc)) from exc
    except ValueError as exc:
        raise errors.bad_request(f"the body of the request could not be decoded: {exc}") from exc


class ApiHandlers:
    """aiohttp handlers bound to one Store."""

    def __init__(self, store: Store, token: str) -> None:
        self.store = store
        self.token = token
        self.webhooks = WebhookAdmission(store)
        self.mutating_webhooks = WebhookAdmission(store, kind="mutating")
        self._client: aiohttp.ClientSession | None = None
        self._streams: set[asyncio.Task[Any]] = set()  # watch / log handlers, cancelled on stop
        store.sync_admission.append(priority_admission)
        store.sync_admission.append(quota_admission)
        store.async_admission.append(self.webhooks)
        store.async_mutation.append(self.mutating_webhooks)
        store.after_commit.append(_crd_lifecycle)
        store.after_commit.append(refresh_quota_status)

    async def close(self) -> None:
        for task in list(self._streams):
            task.cancel()
        await self.webhooks.close()
        await self.mutating_webhooks.close()
        if self._client is not None:
            await self._client.close()

    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        authorized = request.headers.get("Authorization", "") == f"Bearer {self.token}"
        if request.path not in _UNAUTHENTICATED_PATHS and not authorized:
            return _error_response(errors.ApiError(401, "Unauthorized", "Unauthorized"))
        try:
            return await handler(request)
        except errors.ApiError as exc:
            return _error_response(exc)
        except SelectorError as exc:
            return _error_response(errors.bad_request(str(exc)))

    # ---------------------------------------------------------------- simple
    async def version(self, request: web.Request) -> web.Response:
        del request
        return _json_response(
            {**KUBERNETES_VERSION, "platform": "linux/amd64", "goVersion": "go1.25"}
        )

    async def healthz(self, request: web.Request) -> web.Response:
        del request
        return web.Response(text="ok")

    async def openapi_v3_root(self, request: web.Request) -> web.Response:
        del request
        stamp = len(self.store.types)
        paths = {
            (f"apis/{g}/{v}" if g else f"api/{v}"): {
                "serverRelativeURL": f"/openapi/v3/{'apis/' + g if g else 'api'}/{v}?hash={stamp:08X}"
            }
            for g, versions in self.store.group_versions().items()
            for v in versions
        }
        return _json_response({"paths": paths})

    async def openapi_v3_group_version(self, request: web.Request) -> web.Response:
        parts = [p for p in request.match_info["tail"].split("/") if p]
        group, version = (
            ("", parts[1])
            if parts[:1] == ["api"] and len(parts) == 2
            else ((parts[1], parts[2]) if parts[:1] == ["apis"] and len(parts) == 3 else ("", ""))
        )
        resources = self.store.resources_in(group, version) if version else []
        if not resources:
            raise errors.ApiError(
                404, "NotFound", "the server could not find the requested resource"
            )
        return _json_response(openapi_v3_document(group, version, resources))

    async def openapi_v2(self, request: web.Request) -> web.Response:
        del request
        raise errors.ApiError(404, "NotFound", "the server could not find the requested resource")

    # ------------------------------------------------------------- resources
    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        parts = [p for p in request.path.split("/") if p]
        if not parts or parts[0] not in ("api", "apis"):
            raise errors.ApiError(
                404, "NotFound", "the server could not find the requested resource"
            )
        parsed = _parse_path(self.store, parts)
        if not isinstance(parsed, _Target):
            if request.method != "GET":
                raise errors.method_not_allowed(
                    "the server does not allow this method on the requested resource"
                )
            return _json_response(parsed)
        method = request.method
        target = parsed
        if target.resource.namespaced and target.namespace is None and target.name is not None:
            raise errors.ApiError(
                404, "NotFound", "the server could not find the requested resource"
            )
        if target.name is None:
            if method == "GET":
                return await self._list_or_watch(request, target)
            if method == "POST":
                return await self._create(request, target)
            if method == "DELETE":
                return await self._delete_collection(request, target)
        elif target.sub == "eviction" and method == "POST":
            return await self._evict(request, target)
        elif target.sub == "binding" and method == "POST":
            return await self._bind(request, target)
        elif target.sub == "log" and method == "GET":
            return await self._logs(request, target)
        elif method == "GET":
            entry = self.store.get_entry(target.resource, target.namespace or "", target.name)
            if _wants_table(request):
                return _json_response(
                    table(
                        target.resource,
                        [_served_obj(target.resource, entry.obj)],
                        include_object=request.query.get("includeObject", "Metadata"),
                    )
                )
            return _json_response(_served(target.resource, entry))
        elif method == "PUT":
            return await self._update(request, target)
        elif method == "PATCH":
            return await self._patch(request, target)
        elif method == "DELETE" and target.sub is None:
            return await self._delete(request, target)
        raise errors.method_not_allowed(
            "the server does not allow this method on the requested resource"
        )

    def _selectors(self, request: web.Request) -> tuple[Any, Any]:
        return (
            parse_label_selector(request.query.get("labelSelector")),
            parse_field_selector(request.query.get("fieldSelector")),
        )

    async def _list_or_watch(self, request: web.Request, target: _Target) -> web.StreamResponse:
        labels, fields = self._selectors(request)
        if _flag(request, "watch"):
            return await self._watch(request, target, labels, fields)
        resource = target.resource
        entries = self.store.list_entries(resource, target.namespace, labels, fields)
        rv = str(self.store.rv)
        if _wants_table(request):
            objs = [_served_obj(resource, e.obj) for e in entries]
            return _json_response(
                table(
                    resource,
                    objs,
                    resource_version=rv,
                    include_object=request.query.get("includeObject", "Metadata"),
                )
            )
        head = encode(
            {
                "kind": f"{resource.kind}List",
                "apiVersion": resource.api_version,
                "metadata": {"resourceVersion": rv},
            }
        )
        body = head[:-1] + b',"items":[' + b",".join(_served(resource, e) for e in entries) + b"]}"
        return _json_response(body)

    async def _watch(
        self, request: web.Request, target: _Target, labels: Any, fields: Any
    ) -> web.StreamResponse:
        resource = target.resource
        timeout = float(request.query.get("timeoutSeconds") or DEFAULT_WATCH_TIMEOUT)
        bookmarks = _flag(request, "allowWatchBookmarks")
        as_table = _wants_table(request)
        send_initial = _flag(request, "sendInitialEvents")
        response = web.StreamResponse(headers={"Content-Type": _JSON, "Cache-Control": "no-cache"})
        response.enable_chunked_encoding()
        try:
            watcher = self.store.watch(
                resource,
                target.namespace,
                labels,
                fields,
                request.query.get("resourceVersion"),
                send_initial_events=send_initial,
            )
        except errors.ApiError as exc:
            if exc.code != 410:
                raise
            await response.prepare(request)
            await response.write(encode({"type": "ERROR", "object": exc.status()}) + b"\n")
            return response
        if send_initial:
            watcher.queue.put_nowait(("BOOKMARK", self._bookmark(resource, initial_end=True)))
        task = asyncio.current_task()
        if task is not None:
            self._streams.add(task)
        await response.prepare(request)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        headers_sent = False
        try:
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(
                        watcher.queue.get(), timeout=min(remaining, BOOKMARK_INTERVAL)
                    )
                except TimeoutError:
                    if bookmarks and watcher.queue.empty():
                        await response.write(self._bookmark_line(resource))
                    continue
                batch = [item]
                while not watcher.queue.empty():
                    batch.append(watcher.queue.get_nowait())
                if as_table:
                    chunks = []
                    for kind, entry in batch:
                        obj: Obj = entry.obj
                        if kind != "BOOKMARK":
                            obj = table(
                                resource,
                                [_served_obj(resource, entry.obj)],
                                resource_version=entry.obj["metadata"].get("resourceVersion", ""),
                                include_object=request.query.get("includeObject", "Metadata"),
                                headers=not headers_sent,
                            )
                            headers_sent = True
                        chunks.append(encode({"type": kind, "object": obj}) + b"\n")
                    await response.write(b"".join(chunks))
                else:
                    await response.write(
                        b"".join(
                            b'{"type":"'
                            + kind.encode()
                            + b'","object":'
                            + _served(resource, entry)
                            + b"}\n"
                            for kind, entry in batch
                        )
                    )
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.store.unwatch(resource, watcher)
            if task is not None:
                self._streams.discard(task)
        return response

    def _bookmark(self, resource: ResourceType, *, initial_end: bool = False) -> Entry:
        meta: Obj = {"resourceVersion": str(self.store.rv)}
        if initial_end:
            meta["annotations"] = {"k8s.io/initial-events-end": "true"}
        obj = {"kind": resource.kind, "apiVersion": resource.api_version, "metadata": meta}
        return Entry(obj, encode(obj))

    def _bookmark_line(self, resource: ResourceType) -> bytes:
        return b'{"type":"BOOKMARK","object":' + self._bookmark(resource).raw + b"}\n"

    async def _create(self, request: web.Request, target: _Target) -> web.Response:
        resource = target.resource
        if resource.namespaced and target.namespace is None:
            raise errors.ApiError(
                404, "NotFound", "the server could not find the requested resource"
            )
        body = await _read_body(request)
        if not isinstance(body, dict):
            raise errors.bad_request("the body of the request must be a JSON object")
        if resource.plural == "selfsubjectaccessreviews":
            # One user, cluster-admin: every access review is allowed (nothing stored).
            reason = "the harness has a single user with every permission"
            return _json_response(
                {**body, "status": {"allowed": True, "reason": reason}}, status=201
            )
        created = await self.store.create(
            resource,
            target.namespace or "",
            body,
            dry_run=request.query.get("dryRun") == "All",
            field_validation=request.query.get("fieldValidation", ""),
        )
        return _json_response(_served_obj(resource, created), status=201)

    async def _update(self, request: web.Request, target: _Target) -> web.Response:
        assert target.name is not None
        body = await _read_body(request)
        if not isinstance(body, dict):
            raise errors.bad_request("the body of the request must be a JSON object")
        updated = await self.store.update(
            target.resource,
            target.namespace or "",
            target.name,
            body,
            subresource=target.sub,
            dry_run=request.query.get("dryRun") == "All",
            field_validation=request.query.get("fieldValidation", ""),
        )
        return _json_response(_served_obj(target.resource, updated))

    async def _patch(self, request: web.Request, target: _Target) -> web.Response:
        assert target.name is not None
        body = await _read_body(request)
        content_type = request.headers.get("Content-Type", "application/merge-patch+json")
        dry_run = request.query.get("dryRun") == "All"
        try:
            patched = await self.store.patch(
                target.resource,
                target.namespace or "",
                target.name,
                content_type,
                body,
                subresource=target.sub,
                dry_run=dry_run,
                field_validation=request.query.get("fieldValidation", ""),
            )
        except errors.ApiError as exc:
            # Server-side apply creates what does not exist yet.
            if exc.code != 404 or "apply-patch" not in content_type or target.sub:
                raise
            created = await self.store.create(
                target.resource, target.namespace or "", body, dry_run=dry_run
            )
            return _json_response(_served_obj(target.resource, created), status=201)
        return _json_response(_served_obj(target.resource, patched))

    async def _delete(self, request: web.Request, target: _Target) -> web.Response:
        assert target.name is not None
        body = await _read_body(request)
        options = DeleteOptions.parse(body if isinstance(body, dict) else None, dict(request.query))
        result = await self.store.delete(
            target.resource,
            target.namespace or "",
            target.name,
            options,
            dry_run=request.query.get("dryRun") == "All",
        )
        return _json_response(_served_obj(target.resource, result))

    async def _delete_collection(self, request: web.Request, target: _Target) -> web.Response:
        labels, fields = self._selectors(request)
        body = await _read_body(request)
        options = DeleteOptions.parse(body if isinstance(body, dict) else None, dict(request.query))
        deleted = await self.store.delete_collection(
            target.resource, target.namespace, labels, fields, options
        )
        resource = target.resource
        return _json_response(
            {
                "kind": f"{resource.kind}List",
                "apiVersion": resource.api_version,
                "metadata": {"resourceVersion": str(self.store.rv)},
                "items": [_served_obj(resource, o) for o in deleted],
            }
        )

    # ------------------------------------------------------------ pod extras
    async def _evict(self, request: web.Request, target: _Target) -> web.Response:
        """policy/v1 Eviction: mark the pod disrupted, then delete it gracefully."""
        assert target.name is not None
        namespace = target.namespace or ""
        body = await _read_body(request) or {}
        entry = self.store.get_entry(target.resource, namespace, target.name)
        phase = (entry.obj.get("status") or {}).get("phase")
        if phase not in ("Succeeded", "Failed") and not entry.obj["metadata"].get(
            "deletionTimestamp"
        ):
            pod = entry.fresh()
            _set_condition(
                pod,
                {
                    "type": "DisruptionTarget",
                    "status": "True",
                    "reason": "EvictionByEvictionAPI",
                    "message": "Eviction API: evicting",
                },
            )
            self.store.internal_update(target.resource, namespace, target.name, pod)
        options = DeleteOptions.parse(
            body.get("deleteOptions") if isinstance(body, dict) else None, {}
        )
        await self.store.delete(target.resource, namespace, target.name, options)
        return _json_response(_success_status(201), status=201)

    async def _bind(self, request: web.Request, target: _Target) -> web.Response:
        """pods/binding: what a scheduler posts to assign a node."""
        assert target.name is not None
        namespace = target.namespace or ""
        body = await _read_body(request) or {}
        node = ((body.get("target") or {}) if isinstance(body, dict) else {}).get("name")
        if not node:
            raise errors.invalid(
                "",
                "Binding",
                target.name,
                [
                    {
                        "reason": "FieldValueRequired",
                        "field": "target.name",
                        "message": "Required value",
                    }
                ],
            )
        entry = self.store.get_entry(target.resource, namespace, target.name)
        pod = entry.fresh()
        if pod["spec"].get("nodeName"):
            raise errors.ApiError(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on pods/binding "{target.name}": pod {target.name} is already assigned to node "{pod["spec"]["nodeName"]}"',
            )
        if pod["spec"].get("schedulingGates"):
            raise errors.ApiError(
                409, "Conflict", f"pod {target.name} has non-empty .spec.schedulingGates"
            )
        pod["spec"]["nodeName"] = node
        _set_condition(pod, {"type": "PodScheduled", "status": "True", "reason": "", "message": ""})
        self.store.internal_update(target.resource, namespace, target.name, pod)
        return _json_response(_success_status(201), status=201)

    async def _logs(self, request: web.Request, target: _Target) -> web.StreamResponse:
        """pods/log: proxied to the node's kubelet endpoint, like the real server."""
        assert target.name is not None
        namespace = target.namespace or ""
        pod = self.store.get_entry(target.resource, namespace, target.name).obj
        containers = [c["name"] for c in pod["spec"].get("containers") or []]
        container = request.query.get("container") or (
            containers[0] if len(containers) == 1 else ""
        )
        if not container:
            raise errors.bad_request(
                f"a container name must be specified for pod {target.name}, choose one of: {containers}"
            )
        if container not in containers:
            raise errors.bad_request(f"container {container} is not valid for pod {target.name}")
        node_name = pod["spec"].get("nodeName")
        node = (
            self.store.find(self.store.resource("", "v1", "nodes"), "", node_name)
            if node_name
            else None
        )
        port = (
            (((node or {}).get("status") or {}).get("daemonEndpoints") or {})
            .get("kubeletEndpoint", {})
            .get("Port")
        )
        if not node or not port:
            raise errors.bad_request(
                f'container "{container}" in pod "{target.name}" is waiting to start: ContainerCreating'
            )
        url = f"http://127.0.0.1:{port}/containerLogs/{namespace}/{target.name}/{container}"
        if self._client is None:
            self._client = aiohttp.ClientSession()
        params = {
            k: v
            for k, v in request.query.items()
            if k in ("follow", "tailLines", "previous", "timestamps")
        }
        async with self._client.get(
            url, params=params, timeout=aiohttp.ClientTimeout(total=None)
        ) as upstream:
            if upstream.status != 200:
                text = await upstream.text()
                raise errors.bad_request(text.strip() or f"kubelet returned {upstream.status}")
            response = web.StreamResponse(headers={"Content-Type": "text/plain"})
            response.enable_chunked_encoding()
            await response.prepare(request)
            with contextlib.suppress(ConnectionResetError):
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
            return response


def openapi_v3_document(group: str, version: str, resources: list[ResourceType]) -> Obj:
    """A minimal OpenAPI v3 document for one group-version.

    kubectl reads it to learn that the server validates fields itself (the
    `fieldValidation` query parameter on PATCH) and then leaves validation to us;
    CRD schemas are included so `kubectl explain` has something to show.
    """
    prefix = f"/apis/{group}/{version}" if group else f"/api/{version}"
    paths: dict[str, Any] = {}
    schemas: dict[str, Any] = {}
    param = {
        "name": "fieldValidation",
        "in": "query",
        "schema": {"type": "string", "uniqueItems": True},
    }
    for resource in resources:
        gvk = {"group": resource.group, "version": resource.version, "kind": resource.kind}
        scope = f"{prefix}/namespaces/{{namespace}}" if resource.namespaced else prefix
        operation = {
            "x-kubernetes-group-version-kind": gvk,
            "parameters": [param],
            "responses": {"200": {"description": "OK"}},
        }
        paths[f"{scope}/{resource.plural}/{{name}}"] = {
            "put": operation,
            "patch": {**operation, "x-kubernetes-action": "patch"},
        }
        paths[f"{scope}/{resource.plural}"] = {"post": operation}
        schema: Obj = dict(resource.schema.schema) if resource.schema else {"type": "object"}
        schema["x-kubernetes-group-version-kind"] = [gvk]
        dotted = (
            ".".join(reversed(resource.group.split("."))) if resource.group else "io.k8s.api.core"
        )
        schemas[f"{dotted}.{resource.version}.{resource.kind}"] = schema
    return {
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": KUBERNETES_VERSION["gitVersion"]},
        "paths": paths,
        "components": {"schemas": schemas},
    }


def _set_condition(obj: Obj, condition: Obj) -> None:
    conditions = obj.setdefault("status", {}).setdefault("conditions", [])
    condition = {**condition, "lastTransitionTime": now_rfc3339(), "lastProbeTime": None}
    for i, existing in enumerate(conditions):
        if existing.get("type") == condition["type"]:
            conditions[i] = condition
            return
    conditions.append(condition)


def _crd_lifecycle(
    store: Store, resource: ResourceType, operation: str, obj: Obj, old: Obj | None
) -> None:
    """After-commit hook: CRDs register/unregister their resources and get
    NamesAccepted/Established conditions like on the real server."""
    if resource.group != "apiextensions.k8s.io" or resource.plural != "customresourcedefinitions":
        return
    del old
    if operation == "delete":
        store.unregister_crd(obj)
        return
    store.register_crd(obj)
    spec = obj.get("spec") or {}
    storage = [v["name"] for v in spec.get("versions") or [] if v.get("storage")]
    status = obj.get("status") or {}
    accepted = spec.get("names") or {}
    if status.get("acceptedNames") == accepted and any(
        c.get("type") == "Established" and c.get("status") == "True"
        for c in status.get("conditions") or []
    ):
        return
    updated = json.loads(encode(obj))
    now = now_rfc3339()
    updated["status"] = {
        "acceptedNames": accepted,
        "storedVersions": sorted(set((status.get("storedVersions") or []) + storage)),
        "conditions": [
            {
                "type": "NamesAccepted",
                "status": "True",
                "reason": "NoConflicts",
                "message": "no conflicts found",
                "lastTransitionTime": now,
            },
            {
                "type": "Established",
                "status": "True",
                "reason": "InitialNamesAccepted",
                "message": "the initial names have been accepted",
                "lastTransitionTime": now,
            },
        ],
    }
    store.internal_update(resource, "", obj["metadata"]["name"], updated)


def _validate_crd(
    store: Store, operation: str, resource: ResourceType, obj: Obj, old: Obj | None
) -> None:
    del store, old
    if resource.plural != "customresourcedefinitions" or operation == "DELETE":
        return
    spec = obj.get("spec") or {}
    names = spec.get("names") or {}
    name = obj["metadata"]["name"]
    causes = []
    if not names.get("plural") or not names.get("kind"):
        causes.append(
            {
                "reason": "FieldValueRequired",
                "field": "spec.names",
                "message": "Required value: plural and kind are required",
            }
        )
    elif name != f"{names['plural']}.{spec.get('group')}":
        causes.append(
            {
                "reason": "FieldValueInvalid",
                "field": "metadata.name",
                "message": f'Invalid value: "{name}": must be spec.names.plural+"."+spec.group',
            }
        )
    versions = spec.get("versions") or []
    if not versions:
        causes.append(
            {
                "reason": "FieldValueRequired",
                "field": "spec.versions",
                "message": "Required value: must have exactly one version marked as storage version",
            }
        )
    elif sum(1 for v in versions if v.get("storage")) != 1:
        causes.append(
            {
                "reason": "FieldValueInvalid",
                "field": "spec.versions",
                "message": "Invalid value: must have exactly one version marked as storage version",
            }
        )
    if causes:
        raise errors.invalid("apiextensions.k8s.io", "CustomResourceDefinition", name, causes)


def build_app(store: Store, token: str) -> tuple[web.Application, ApiHandlers]:
    handlers = ApiHandlers(store, token)
    store.sync_admission.append(_validate_crd)
    app = web.Application(middlewares=[handlers.middleware], client_max_size=64 * 1024**2)
    app.router.add_get("/version", handlers.version)
    for path in ("/healthz", "/readyz", "/livez"):
        app.router.add_get(path, handlers.healthz)
    app.router.add_get("/openapi/v3", handlers.openapi_v3_root)
    app.router.add_get("/openapi/v3/{tail:.*}", handlers.openapi_v3_group_version)
    app.router.add_get("/openapi/v2", handlers.openapi_v2)
    app.router.add_route("*", "/{tail:.*}", handlers.dispatch)
    return app, handlers


# ----------------------------------------------------------------- the server
class ApiServer:
    """Runs the emulator on 127.0.0.1:<free port> in a background thread.

    `kubeconfig` is written into `workdir` (a temp dir when omitted). `run(coro)`
    executes a coroutine on the server's loop, e.g. to inspect `store` safely.
    """

    def __init__(
        self,
        workdir: Path | None = None,
        *,
        token: str | None = None,
        port: int = 0,
        kueue: bool = False,
    ) -> None:
        self._tempdir: tempfile.TemporaryDirectory[str] | None = None
        if workdir is None:
            self._tempdir = tempfile.TemporaryDirectory(prefix="kube-harness-")
            workdir = Path(self._tempdir.name)
        self.workdir = workdir
        self.token = token or secrets.token_hex(16)
        self._requested_port = port
        self.kueue = kueue
        self.port = 0
        self.store: Store | None = None
        self.kubeconfig = workdir / "kubeconfig"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._handlers: ApiHandlers | None = None
        self.tls = make_tls(workdir / "pki")

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def start(self) -> ApiServer:
        ready: concurrent.futures.Future[int] = concurrent.futures.Future()
        self._loop = asyncio.new_event_loop()

        def serve() -> None:
            assert self._loop is not None
            asyncio.set_event_loop(self._loop)
            try:
                ready.set_result(self._loop.run_until_complete(self._start_async()))
            except BaseException as exc:
                ready.set_exception(exc)
                return
            self._loop.run_forever()
            self._loop.run_until_complete(self._stop_async())
            self._loop.close()

        self._thread = threading.Thread(target=serve, name="kube-apiserver", daemon=True)
        self._thread.start()
        self.port = ready.result(timeout=30)
        write_kubeconfig(self.kubeconfig, self.url, self.token, self.tls.ca_cert.read_bytes())
        return self

    async def _start_async(self) -> int:
        self.store = Store()
        app, self._handlers = build_app(self.store, self.token)
        if self.kueue:
            FakeKueue(self.store).install()
            crd_type = self.store.resource(
                "apiextensions.k8s.io", "v1", "customresourcedefinitions"
            )
            for crd in kueue_crds():
                await self.store.create(crd_type, "", crd)
        self._runner = web.AppRunner(
            app, handler_cancellation=True, access_log=None, shutdown_timeout=2.0
        )
        await self._runner.setup()
        site = web.TCPSite(
            self._runner,
            "127.0.0.1",
            self._requested_port,
            backlog=1024,
            ssl_context=self.tls.server_context(),
        )
        await site.start()
        server = site._server
        assert server is not None
        return int(server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]

    async def _stop_async(self) -> None:
        if self._handlers is not None:
            await self._handlers.close()
        if self._runner is not None:
            await self._runner.cleanup()

    def run(self, coro: Awaitable[T], timeout: float = 30) -> T:
        """Run a coroutine on the server's loop (thread-safe) and return its result."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)  # type: ignore[arg-type]

    def call(self, fn: Callable[[], T], timeout: float = 30) -> T:
        """Call a function on the server's loop (thread-safe), e.g. to read the store."""

        async def wrapper() -> T:
            return fn()

        return self.run(wrapper(), timeout)

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)
        self._thread = None
        if self._tempdir is not None:
            self._tempdir.cleanup()
            self._tempdir = None

    def __enter__(self) -> ApiServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# ------------------------------------------------------------ write ceiling
async def _write_throughput(
    url: str, token: str, ca_file: Path, *, count: int, concurrency: int, namespace: str
) -> float:
    headers = {"Authorization": f"Bearer {token}"}
    ssl_context = ssl.create_default_context(cafile=str(ca_file))
    connector = aiohttp.TCPConnector(limit=concurrency, ssl=ssl_context)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(count):
        queue.put_nowait(i)
    prefix = f"tp-{uuid.uuid4().hex[:6]}"
    async with aiohttp.ClientSession(url, headers=headers, connector=connector) as session:

        async def worker() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                body = {"metadata": {"name": f"{prefix}-{i}"}, "data": {"i": str(i)}}
                async with session.post(
                    f"/api/v1/namespaces/{namespace}/configmaps", json=body
                ) as r:
                    if r.status != 201:
                        raise RuntimeError(f"create failed: {r.status} {await r.text()}")
                async with session.patch(
                    f"/api/v1/namespaces/{namespace}/configmaps/{prefix}-{i}",
                    data=json.dumps({"data": {"patched": "yes"}}),
                    headers={"Content-Type": "application/merge-patch+json"},
                ) as r:
                    if r.status != 200:
                        raise RuntimeError(f"patch failed: {r.status} {await r.text()}")

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
        await session.delete(f"/api/v1/namespaces/{namespace}/configmaps")
    return (2 * count) / elapsed


def measure_write_throughput(
    server: ApiServer,
    count: int = 1000,
    concurrency: int = 16,
    namespace: str = "default",
    *,
    in_process: bool = False,
) -> float:
    """Raw writes/second (create + merge-patch of ConfigMaps over HTTPS): the
    ceiling any operator benchmark against this server can reach.

    The load comes from a separate process by default, like the operator's
    requests do, so the figure includes the same process boundary and CPU sharing.
    `in_process=True` runs the client in this process instead (call it from a
    thread without a running event loop)."""
    if in_process:
        return asyncio.run(
            _write_throughput(
                server.url,
                server.token,
                server.tls.ca_cert,
                count=count,
                concurrency=concurrency,
                namespace=namespace,
            )
        )
    command = [
        sys.executable,
        "-m",
        "tests.harness.apiserver",
        "measure",
        "--kubeconfig",
        str(server.kubeconfig),
        "--count",
        str(count),
        "--concurrency",
        str(concurrency),
        "--namespace",
        namespace,
    ]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(_REPO_ROOT), os.environ.get("PYTHONPATH")])
        ),
    }
    result = subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=600, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"throughput measurement failed:\n{result.stderr[-2000:]}")
    return float(result.stdout.strip().splitlines()[-1])


def _measure_from_kubeconfig(
    kubeconfig: Path, count: int, concurrency: int, namespace: str
) -> float:
    config = yaml.safe_load(kubeconfig.read_text())
    cluster = config["clusters"][0]["cluster"]
    with tempfile.NamedTemporaryFile("wb", suffix=".crt") as ca:
        ca.write(base64.b64decode(cluster["certificate-authority-data"]))
        ca.flush()
        return asyncio.run(
            _write_throughput(
                cluster["server"],
                config["users"][0]["user"]["token"],
                Path(ca.name),
                count=count,
                concurrency=concurrency,
                namespace=namespace,
            )
        )


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    del signum, frame
    raise KeyboardInterrupt


def main() -> None:
    parser = argparse.ArgumentParser(description="Run the harness Kubernetes API emulator.")
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="run a server until Ctrl-C (the default)")
    for p in (parser, serve):
        p.add_argument("--port", type=int, default=0)
        p.add_argument("--workdir", type=Path, default=None)
    measure = sub.add_parser("measure", help="print raw writes/s against a running server")
    measure.add_argument("--kubeconfig", type=Path, required=True)
    measure.add_argument("--count", type=int, default=1000)
    measure.add_argument("--concurrency", type=int, default=16)
    measure.add_argument("--namespace", default="default")
    args = parser.parse_args()
    if args.command == "measure":
        rate = _measure_from_kubeconfig(
            args.kubeconfig, args.count, args.concurrency, args.namespace
        )
        print(f"{rate:.1f}")
        return
    # SIGTERM (e.g. from `timeout` or a process manager) unwinds like Ctrl-C, so
    # everything started below is stopped and its temp files removed.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    with ApiServer(args.workdir, port=args.port) as server:
        print(f"API server on {server.url}; export KUBECONFIG={server.kubeconfig}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)


if __name__ == "__main__":
    main()
