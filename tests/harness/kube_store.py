"""The object store behind the API emulator: CRUD semantics, watches, GC.

Everything runs on the API server's event loop thread; no locks. Stored objects
are immutable: every write builds a new dict and encodes it to JSON exactly once,
and that encoding is shared by GET, LIST and every watcher of the event (fan-out
costs one queue put per watcher, never a re-encode).

Semantics kept from the real server (each one pinned by a test in
tests/harness_tests): uid / resourceVersion (one global counter) / generation
(bumped on non-metadata, non-status changes) / creationTimestamp / generateName;
namespaces must exist; 409 on stale resourceVersion and on duplicate names;
status subresource separation; finalizers + deletionTimestamp; graceful pod
deletion; ownerReference garbage collection; watches that replay from a
resourceVersion (410 when it is too old); label and field selectors.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import datetime as dt
import json
import random
import re
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any

from tests.harness import kube_errors as errors
from tests.harness.kube_patch import PatchError, apply_patch
from tests.harness.kube_resources import ResourceType, builtin_resources, crd_resource_types
from tests.harness.kube_selectors import (
    FieldRequirement,
    LabelRequirement,
    fields_match,
    labels_match,
)
from tests.harness.kube_validation import metadata_causes, pod_causes

Obj = dict[str, Any]
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_GENERATE_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"
# Watch events kept per resource for resourceVersion replays (older ones get 410
# Gone, which clients answer by relisting, as with etcd compaction). Bounded: each
# event pins up to two object versions in memory.
HISTORY_LIMIT = 20_000
FOREGROUND_FINALIZER = "foregroundDeletion"
ORPHAN_GRACE_SECONDS = 0.5  # before the GC removes an object whose owners never existed
TERMINAL_POD_PHASES = frozenset({"Succeeded", "Failed"})
DEFAULT_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def encode(obj: Any) -> bytes:
    return _dumps(obj).encode()


def now_rfc3339() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _meta(obj: Obj) -> Obj:
    meta = obj.get("metadata")
    if not isinstance(meta, dict):
        meta = {}
        obj["metadata"] = meta
    return meta


@dataclass(slots=True)
class Entry:
    """One stored object and its JSON encoding (both immutable by convention)."""

    obj: Obj
    raw: bytes

    def fresh(self) -> Obj:
        """A private deep copy (json round-trip is the fastest deep copy in CPython)."""
        result: Obj = json.loads(self.raw)
        return result


@dataclass(slots=True)
class WatchEvent:
    rv: int
    type: str  # ADDED | MODIFIED | DELETED
    namespace: str
    entry: Entry
    old: Obj | None  # previous state, for filtered watches (None on ADDED)

    @property
    def line(self) -> bytes:
        return b'{"type":"' + self.type.encode() + b'","object":' + self.entry.raw + b"}\n"


@dataclass(eq=False)
class Watcher:
    """One watch connection's filter and queue."""

    namespace: str | None
    labels: tuple[LabelRequirement, ...]
    fields: tuple[FieldRequirement, ...]
    queue: asyncio.Queue[tuple[str, Entry]] = field(default_factory=asyncio.Queue)

    def matches(self, obj: Obj) -> bool:
        meta = obj.get("metadata") or {}
        return labels_match(self.labels, meta.get("labels")) and fields_match(self.fields, obj)

    def offer(self, event: WatchEvent) -> None:
        if self.namespace is not None and event.namespace != self.namespace:
            return
        if not self.labels and not self.fields:
            self.queue.put_nowait((event.type, event.entry))
            return
        now = self.matches(event.entry.obj)
        before = event.old is not None and self.matches(event.old)
        if event.type == "DELETED":
            if now:
                self.queue.put_nowait(("DELETED", event.entry))
        elif now and before:
            self.queue.put_nowait(("MODIFIED", event.entry))
        elif now:
            self.queue.put_nowait(("ADDED", event.entry))
        elif before:
            # The object left the filtered set: real watches report that as DELETED.
            self.queue.put_nowait(("DELETED", event.entry))


@dataclass(frozen=True)
class DeleteOptions:
    grace_period_seconds: int | None = None
    propagation_policy: str = "Background"
    precondition_uid: str | None = None
    precondition_rv: str | None = None

    @classmethod
    def parse(cls, body: Obj | None, query: dict[str, str]) -> DeleteOptions:
        body = body or {}
        grace = body.get("gracePeriodSeconds", query.get("gracePeriodSeconds"))
        preconditions = body.get("preconditions") or {}
        policy = body.get("propagationPolicy") or query.get("propagationPolicy") or "Background"
        if body.get("orphanDependents") is True or query.get("orphanDependents") == "true":
            policy = "Orphan"
        return cls(
            grace_period_seconds=int(grace) if grace is not None else None,
            propagation_policy=policy,
            precondition_uid=preconditions.get("uid"),
            precondition_rv=preconditions.get("resourceVersion"),
        )


# After-commit hooks (server-side controllers): (store, resource, operation, new, old).
AfterCommit = Callable[["Store", ResourceType, str, "Obj", "Obj | None"], None]
# Admission: sync plugins (quota) and async ones (webhooks). Both may raise ApiError.
SyncAdmission = Callable[["Store", str, ResourceType, Obj, Obj | None], None]
AsyncAdmission = Callable[[str, ResourceType, Obj, Obj | None, str | None], Awaitable[Obj]]


_PATCH_RETRIES = 5


class _ConcurrentWriteError(errors.ApiError):
    """409 Conflict because another write landed while this one awaited admission."""

    def __init__(self, group: str, plural: str, name: str) -> None:
        base = errors.conflict(group, plural, name)
        super().__init__(base.code, base.reason, base.message, base.details)


class Store:
    """All objects of one emulated cluster."""

    def __init__(self) -> None:
        self.rv = 0
        self.types: dict[tuple[str, str, str], ResourceType] = {}
        self.data: dict[str, dict[str, dict[str, Entry]]] = collections.defaultdict(dict)
        self.history: dict[str, collections.deque[WatchEvent]] = collections.defaultdict(
            lambda: collections.deque(maxlen=HISTORY_LIMIT)
        )
        self.history_floor: dict[str, int] = collections.defaultdict(int)
        self.watchers: dict[str, set[Watcher]] = collections.defaultdict(set)
        self.by_uid: dict[str, tuple[str, str, str]] = {}
        self.dependents: dict[str, set[str]] = collections.defaultdict(set)
        self.crd_types: dict[str, list[ResourceType]] = {}
        self.sync_admission: list[SyncAdmission] = []
        self.async_admission: list[AsyncAdmission] = []  # validating: return obj unchanged
        self.async_mutation: list[AsyncAdmission] = []  # mutating: may return a new obj
        self.after_commit: list[AfterCommit] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        for resource in builtin_resources():
            self.types[(resource.group, resource.version, resource.plural)] = resource
        for name in DEFAULT_NAMESPACES:
            ns = {
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {"name": name, "labels": {"kubernetes.io/metadata.name": name}},
            }
            self._stamp_new(ns)
            ns["spec"] = {"finalizers": ["kubernetes"]}
            ns["status"] = {"phase": "Active"}
            self._commit(self.resource("", "v1", "namespaces"), "", name, ns, None)

    # ----------------------------------------------------------------- registry
    def resource(self, group: str, version: str, plural: str) -> ResourceType:
        found = self.types.get((group, version, plural))
        if found is None:
            gv = f"{group}/{version}" if group else version
            raise errors.ApiError(
                404, "NotFound", f"the server could not find the requested resource ({plural} {gv})"
            )
        return found

    def group_versions(self) -> dict[str, list[str]]:
        """{group: [versions]} in registration order (core group under "")."""
        result: dict[str, list[str]] = {}
        for group, version, _ in self.types:
            versions = result.setdefault(group, [])
            if version not in versions:
                versions.append(version)
        return result

    def resources_in(self, group: str, version: str) -> list[ResourceType]:
        return [r for (g, v, _), r in self.types.items() if g == group and v == version]

    # -------------------------------------------------------------------- reads
    def _bucket(self, resource: ResourceType) -> dict[str, dict[str, Entry]]:
        return self.data[resource.storage_key]

    def get_entry(self, resource: ResourceType, namespace: str, name: str) -> Entry:
        entry = self._bucket(resource).get(namespace, {}).get(name)
        if entry is None:
            raise errors.not_found(resource.group, resource.plural, name)
        return entry

    def find(self, resource: ResourceType, namespace: str, name: str) -> Obj | None:
        entry = self._bucket(resource).get(namespace, {}).get(name)
        return entry.obj if entry else None

    def iter_entries(self, resource: ResourceType, namespace: str | None) -> Iterator[Entry]:
        bucket = self._bucket(resource)
        if namespace is not None:
            yield from bucket.get(namespace, {}).values()
            return
        for objects in list(bucket.values()):
            yield from objects.values()

    def list_entries(
        self,
        resource: ResourceType,
        namespace: str | None,
        labels: tuple[LabelRequirement, ...] = (),
        fields: tuple[FieldRequirement, ...] = (),
    ) -> list[Entry]:
        """Matching objects in the real server's order: by namespace, then name."""
        if namespace is not None:
            buckets = [self._bucket(resource).get(namespace, {})]
        else:
            bucket = self._bucket(resource)
            buckets = [bucket[ns] for ns in sorted(bucket)]
        entries = [objects[name] for objects in buckets for name in sorted(objects)]
        if not labels and not fields:
            return entries
        return [
            e
            for e in entries
            if labels_match(labels, (e.obj.get("metadata") or {}).get("labels"))
            and fields_match(fields, e.obj)
        ]

    # ---------------------------------------------------------------- internals
    def _next_rv(self) -> int:
        self.rv += 1
        return self.rv

    def _stamp_new(self, obj: Obj) -> None:
        meta = _meta(obj)
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = now_rfc3339()
        meta["generation"] = 1
        for transient in (
            "resourceVersion",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "selfLink",
        ):
            meta.pop(transient, None)

    def _commit(
        self, resource: ResourceType, namespace: str, name: str, obj: Obj, old: Entry | None
    ) -> Entry:
        rv = self._next_rv()
        meta = _meta(obj)
        meta["resourceVersion"] = str(rv)
        if resource.api_version != obj.get("apiVersion") and resource.custom:
            obj["apiVersion"] = f"{resource.group}/{resource.storage_version}"
        entry = Entry(obj, encode(obj))
        self._bucket(resource).setdefault(namespace, {})[name] = entry
        self._index_owners(resource, namespace, name, obj, old.obj if old else None)
        self._emit(
            resource,
            WatchEvent(
                rv, "MODIFIED" if old else "ADDED", namespace, entry, old.obj if old else None
            ),
        )
        for hook in self.after_commit:
            hook(self, resource, "update" if old else "create", obj, old.obj if old else None)
        return entry

    def _remove(self, resource: ResourceType, namespace: str, name: str, entry: Entry) -> Obj:
        bucket = self._bucket(resource)
        objects = bucket.get(namespace, {})
        objects.pop(name, None)
        if not objects:
            bucket.pop(namespace, None)
        final = entry.fresh()
        rv = self._next_rv()
        _meta(final)["resourceVersion"] = str(rv)
        final_entry = Entry(final, encode(final))
        uid = _meta(final).get("uid", "")
        self.by_uid.pop(uid, None)
        for ref in _meta(final).get("ownerReferences") or []:
            self.dependents.get(ref.get("uid", ""), set()).discard(uid)
        self._emit(resource, WatchEvent(rv, "DELETED", namespace, final_entry, entry.obj))
        for hook in self.after_commit:
            hook(self, resource, "delete", final, entry.obj)
        if self.dependents.get(uid):
            self._spawn(self._collect_dependents(uid))
        return final

    def _emit(self, resource: ResourceType, event: WatchEvent) -> None:
        key = resource.storage_key
        history = self.history[key]
        if len(history) == history.maxlen:
            self.history_floor[key] = history[0].rv
        history.append(event)
        for watcher in self.watchers.get(key, ()):
            watcher.offer(event)

    def _index_owners(
        self, resource: ResourceType, namespace: str, name: str, obj: Obj, old: Obj | None
    ) -> None:
        meta = _meta(obj)
        uid = meta["uid"]
        self.by_uid[uid] = (resource.storage_key, namespace, name)
        new_owners = {r.get("uid") for r in meta.get("ownerReferences") or []}
        old_owners = (
            {r.get("uid") for r in (_meta(old).get("ownerReferences") or [])} if old else set()
        )
        for owner in old_owners - new_owners:
            self.dependents.get(owner or "", set()).discard(uid)
        for owner in new_owners - old_owners:
            if owner:
                self.dependents[owner].add(uid)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            coro.close()
            return
        task = loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _type_by_storage_key(self, key: str) -> ResourceType | None:
        for resource in self.types.values():
            if resource.storage_key == key:
                return resource
        return None

    def _check_namespace(self, resource: ResourceType, namespace: str, name: str) -> None:
        if not resource.namespaced:
            return
        ns_type = self.resource("", "v1", "namespaces")
        ns = self.find(ns_type, "", namespace)
        if ns is None:
            raise errors.not_found("", "namespaces", namespace)
        if (ns.get("metadata") or {}).get("deletionTimestamp"):
            raise errors.forbidden(
                resource.group,
                resource.plural,
                name,
                f"unable to create new content in namespace {namespace} because it is being terminated",
            )

    def _validate_builtin(
        self, resource: ResourceType, obj: Obj, name: str, *, creating: bool
    ) -> None:
        causes = metadata_causes(obj)
        if creating and not resource.group and resource.plural == "pods":
            causes += pod_causes(obj)
        if causes:
            raise errors.invalid(resource.group, resource.kind, name, [c.as_dict() for c in causes])

    def _validate_name(self, resource: ResourceType, name: str) -> None:
        pattern = _DNS_LABEL if resource.plural == "namespaces" else _DNS_SUBDOMAIN
        limit = 63 if resource.plural == "namespaces" else 253
        if len(name) > limit or not pattern.match(name):
            kind_text = (
                "RFC 1123 label" if resource.plural == "namespaces" else "RFC 1123 subdomain"
            )
            raise errors.invalid(
                resource.group,
                resource.kind,
                name,
                [
                    {
                        "reason": "FieldValueInvalid",
                        "field": "metadata.name",
                        "message": f'Invalid value: "{name}": a lowercase {kind_text} must consist of lower '
                        "case alphanumeric characters, '-' or '.', and must start and end with an "
                        "alphanumeric character",
                    }
                ],
            )

    def _validate_schema(
        self,
        resource: ResourceType,
        obj: Obj,
        name: str,
        field_validation: str,
        old: Obj | None = None,
    ) -> None:
        if resource.schema is None:
            return
        causes, unknown = resource.schema.admit(obj, old)
        if unknown and field_validation == "Strict":
            fields = ", ".join(f'unknown field "{path}"' for path in unknown)
            raise errors.bad_request(
                f'{resource.kind} in version "{resource.version}" cannot be handled as a {resource.kind}: '
                f"strict decoding error: {fields}"
            )
        if causes:
            raise errors.invalid(resource.group, resource.kind, name, [c.as_dict() for c in causes])

    # ---------------------------------------------------------------- create
    async def create(
        self,
        resource: ResourceType,
        namespace: str,
        obj: Obj,
        *,
        dry_run: bool = False,
        field_validation: str = "",
    ) -> Obj:
        if not isinstance(obj, dict):
            raise errors.bad_request("the body of the request must be a JSON object")
        meta = _meta(obj)
        namespace = namespace if resource.namespaced else ""
        if resource.namespaced:
            body_ns = meta.get("namespace")
            if body_ns and body_ns != namespace:
                raise errors.bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request"
                )
            meta["namespace"] = namespace
        else:
            meta.pop("namespace", None)
        if not meta.get("name"):
            prefix = meta.get("generateName")
            if not prefix:
                raise errors.invalid(
                    resource.group,
                    resource.kind,
                    "",
                    [
                        {
                            "reason": "FieldValueRequired",
                            "field": "metadata.name",
                            "message": "Required value: name or generateName is required",
                        }
                    ],
                )
            meta["name"] = prefix + "".join(random.choices(_GENERATE_ALPHABET, k=5))
        name = meta["name"]
        self._validate_name(resource, name)
        obj["apiVersion"] = resource.api_version
        obj["kind"] = resource.kind
        self._check_namespace(resource, namespace, name)
        self._stamp_new(obj)
        if resource.has_status and resource.custom:
            obj.pop("status", None)  # CRs with a status subresource ignore status on create
        _defaults_on_create(resource, obj)
        for mutate in self.async_mutation:
            obj = await mutate("CREATE", resource, obj, None, None)
        self._validate_builtin(resource, obj, name, creating=True)
        self._validate_schema(resource, obj, name, field_validation)
        for plugin in self.sync_admission:
            plugin(self, "CREATE", resource, obj, None)
        for hook in self.async_admission:
            await hook("CREATE", resource, obj, None, None)
        if self.find(resource, namespace, name) is not None:
            raise errors.already_exists(resource.group, resource.plural, name)
        if dry_run:
            return obj
        entry = self._commit(resource, namespace, name, obj, None)
        owners = [r.get("uid") for r in obj["metadata"].get("ownerReferences") or []]
        if owners and not any(owner in self.by_uid for owner in owners):
            # Dangling owner references: the garbage collector removes such objects.
            self._spawn(self._collect_if_orphaned(resource, namespace, name))
        return entry.obj

    # ---------------------------------------------------------------- update
    def _prepare_update(
        self,
        resource: ResourceType,
        current: Entry,
        obj: Obj,
        subresource: str | None,
        *,
        require_rv: bool,
        field_validation: str,
    ) -> Obj:
        old = current.obj
        old_meta = old["metadata"]
        name = old_meta["name"]
        if not isinstance(obj, dict):
            raise errors.bad_request("the body of the request must be a JSON object")
        meta = _meta(obj)
        if meta.get("name", name) != name:
            raise errors.bad_request(
                f"the name of the object ({meta.get('name')}) does not match the name on the URL ({name})"
            )
        given_rv = meta.get("resourceVersion")
        if given_rv:
            if given_rv != old_meta["resourceVersion"]:
                raise errors.conflict(resource.group, resource.plural, name)
        elif require_rv and resource.custom:
            raise errors.invalid(
                resource.group,
                resource.kind,
                name,
                [
                    {
                        "reason": "FieldValueInvalid",
                        "field": "metadata.resourceVersion",
                        "message": "Invalid value: 0x0: must be specified for an update",
                    }
                ],
            )
        if subresource == "status" and resource.has_status:
            # /status changes nothing but .status.
            updated = current.fresh()
            if "status" in obj:
                updated["status"] = obj["status"]
            else:
                updated.pop("status", None)
            obj = updated
            meta = obj["metadata"]
        elif resource.has_status:
            # The main resource ignores .status when a status subresource exists.
            if "status" in old:
                obj["status"] = json.loads(encode(old["status"]))
            else:
                obj.pop("status", None)
        # System-owned metadata cannot be changed by clients.
        for key in (
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "namespace",
        ):
            if key in old_meta:
                meta[key] = old_meta[key]
            else:
                meta.pop(key, None)
        meta["name"] = name
        meta["generation"] = old_meta.get("generation", 1)
        obj["apiVersion"] = old.get("apiVersion", resource.api_version)
        obj["kind"] = resource.kind
        if old_meta.get("deletionTimestamp"):
            added = set(meta.get("finalizers") or []) - set(old_meta.get("finalizers") or [])
            if added:
                raise errors.forbidden(
                    resource.group,
                    resource.plural,
                    name,
                    f"no new finalizers can be added if the object is being deleted, found new finalizers {sorted(added)}",
                )
        if _spec_changed(old, obj):
            meta["generation"] = meta["generation"] + 1
        _validate_update(resource, old, obj)
        if obj["metadata"] != old_meta:
            self._validate_builtin(resource, obj, name, creating=False)
        self._validate_schema(resource, obj, name, field_validation, old)
        return obj

    async def update(
        self,
        resource: ResourceType,
        namespace: str,
        name: str,
        obj: Obj,
        *,
        subresource: str | None = None,
        dry_run: bool = False,
        require_rv: bool = True,
        field_validation: str = "",
    ) -> Obj:
        namespace = namespace if resource.namespaced else ""
        current = self.get_entry(resource, namespace, name)
        _defaults_on_update(resource, obj)
        new = self._prepare_update(
            resource,
            current,
            obj,
            subresource,
            require_rv=require_rv,
            field_validation=field_validation,
        )
        for mutate in self.async_mutation:
            mutated = await mutate("UPDATE", resource, new, current.obj, subresource)
            if mutated != new:
                _validate_update(resource, current.obj, mutated)
                self._validate_schema(resource, mutated, name, field_validation, current.obj)
                new = mutated
        for plugin in self.sync_admission:
            plugin(self, "UPDATE", resource, new, current.obj)
        for hook in self.async_admission:
            await hook("UPDATE", resource, new, current.obj, subresource)
        latest = self.get_entry(resource, namespace, name)
        if latest is not current:
            # Written by someone else while admission webhooks ran.
            raise _ConcurrentWriteError(resource.group, resource.plural, name)
        if dry_run:
            return new
        entry = self._commit(resource, namespace, name, new, current)
        return self._maybe_finalize(resource, namespace, name, entry)

    async def patch(
        self,
        resource: ResourceType,
        namespace: str,
        name: str,
        content_type: str,
        body: Any,
        *,
        subresource: str | None = None,
        dry_run: bool = False,
        field_validation: str = "",
    ) -> Obj:
        """Apply a patch; like the real server, a patch without a resourceVersion
        precondition is re-applied to the latest object when a concurrent write
        (e.g. during a webhook call) got in first, instead of failing with 409."""
        namespace = namespace if resource.namespaced else ""
        for _ in range(_PATCH_RETRIES):
            current = self.get_entry(resource, namespace, name)
            try:
                patched = apply_patch(content_type, current.obj, body)
            except PatchError as exc:
                raise errors.bad_request(str(exc)) from exc
            if not isinstance(patched, dict):
                raise errors.bad_request("the patch must produce a JSON object")
            # A patch only conflicts when it carries a resourceVersion precondition.
            patched_meta = _meta(patched)
            if patched_meta.get("resourceVersion") != current.obj["metadata"]["resourceVersion"]:
                raise errors.conflict(resource.group, resource.plural, name)
            try:
                return await self.update(
                    resource,
                    namespace,
                    name,
                    patched,
                    subresource=subresource,
                    dry_run=dry_run,
                    field_validation=field_validation,
                )
            except _ConcurrentWriteError:
                continue
        raise errors.conflict(resource.group, resource.plural, name)

    # ---------------------------------------------------------------- delete
    async def delete(
        self,
        resource: ResourceType,
        namespace: str,
        name: str,
        options: DeleteOptions | None = None,
        *,
        dry_run: bool = False,
    ) -> Obj:
        options = options or DeleteOptions()
        namespace = namespace if resource.namespaced else ""
        current = self.get_entry(resource, namespace, name)
        meta = current.obj["metadata"]
        if options.precondition_uid and options.precondition_uid != meta.get("uid"):
            raise errors.ApiError(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on {resource.qualified} "{name}": Precondition failed: '
                f"UID in precondition: {options.precondition_uid}, UID in object meta: {meta.get('uid')}",
                {"name": name, "kind": resource.plural, "group": resource.group},
            )
        if options.precondition_rv and options.precondition_rv != meta.get("resourceVersion"):
            raise errors.conflict(resource.group, resource.plural, name)
        for hook in self.async_admission:
            await hook("DELETE", resource, current.obj, current.obj, None)
        current = self.get_entry(resource, namespace, name)
        if dry_run:
            return current.obj
        if options.propagation_policy == "Orphan":
            self._orphan_dependents(meta.get("uid", ""))
        if resource.plural == "namespaces" and not resource.group:
            return self._delete_namespace(resource, current)
        grace = self._grace_period(resource, current.obj, options)
        finalizers = meta.get("finalizers") or []
        uid = meta.get("uid", "")
        foreground = options.propagation_policy == "Foreground" and bool(self.dependents.get(uid))
        if not finalizers and grace == 0 and not foreground:
            return self._remove(resource, namespace, name, current)
        obj = current.fresh()
        new_meta = obj["metadata"]
        if foreground and FOREGROUND_FINALIZER not in finalizers:
            # The owner stays (deletionTimestamp + finalizer) until its dependents are gone.
            new_meta["finalizers"] = [*finalizers, FOREGROUND_FINALIZER]
            self._spawn(self._delete_foreground(resource, namespace, name, uid))
        if new_meta.get("deletionTimestamp"):
            # Already terminating: a second delete may only shorten the grace period.
            if grace >= new_meta.get("deletionGracePeriodSeconds", 0):
                return current.obj
        else:
            new_meta["generation"] = new_meta.get("generation", 1) + 1
        new_meta["deletionTimestamp"] = _rfc3339_in(grace)
        new_meta["deletionGracePeriodSeconds"] = grace
        entry = self._commit(resource, namespace, name, obj, current)
        return self._maybe_finalize(resource, namespace, name, entry)

    def _grace_period(self, resource: ResourceType, obj: Obj, options: DeleteOptions) -> int:
        if resource.plural != "pods" or resource.group:
            return 0
        spec = obj.get("spec") or {}
        phase = (obj.get("status") or {}).get("phase")
        if not spec.get("nodeName") or phase in TERMINAL_POD_PHASES:
            return 0  # nothing runs it: no kubelet to wait for
        if options.grace_period_seconds is not None:
            return max(0, options.grace_period_seconds)
        return int(spec.get("terminationGracePeriodSeconds", 30))

    def _maybe_finalize(
        self, resource: ResourceType, namespace: str, name: str, entry: Entry
    ) -> Obj:
        meta = entry.obj["metadata"]
        if (
            meta.get("deletionTimestamp")
            and not meta.get("finalizers")
            and not meta.get("deletionGracePeriodSeconds")
        ):
            return self._remove(resource, namespace, name, entry)
        return entry.obj

    def _delete_namespace(self, resource: ResourceType, current: Entry) -> Obj:
        obj = current.fresh()
        name = obj["metadata"]["name"]
        if not obj["metadata"].get("deletionTimestamp"):
            obj["metadata"]["deletionTimestamp"] = now_rfc3339()
            obj["metadata"]["deletionGracePeriodSeconds"] = 0
            obj["status"] = {"phase": "Terminating"}
            current = self._commit(resource, "", name, obj, current)
            self._spawn(self._drain_namespace(name))
        return current.obj

    async def _drain_namespace(self, namespace: str) -> None:
        ns_type = self.resource("", "v1", "namespaces")
        while True:
            remaining = 0
            for key, bucket in list(self.data.items()):
                objects = bucket.get(namespace)
                if not objects:
                    continue
                resource = self._type_by_storage_key(key)
                if resource is None or not resource.namespaced:
                    continue
                for name, entry in list(objects.items()):
                    remaining += 1
                    if not entry.obj["metadata"].get("deletionTimestamp"):
                        with contextlib.suppress(errors.ApiError):
                            await self.delete(resource, namespace, name)
            if remaining == 0:
                break
            await asyncio.sleep(0.05)
        current = self._bucket(ns_type).get("", {}).get(namespace)
        if current is not None:
            self._remove(ns_type, "", namespace, current)

    def _orphan_dependents(self, owner_uid: str) -> None:
        for uid in list(self.dependents.get(owner_uid, ())):
            location = self.by_uid.get(uid)
            resource = self._type_by_storage_key(location[0]) if location else None
            if location is None or resource is None:
                continue
            entry = self._bucket(resource).get(location[1], {}).get(location[2])
            if entry is None:
                continue
            obj = entry.fresh()
            refs = [
                r for r in obj["metadata"].get("ownerReferences") or [] if r.get("uid") != owner_uid
            ]
            if refs:
                obj["metadata"]["ownerReferences"] = refs
            else:
                obj["metadata"].pop("ownerReferences", None)
            self._commit(resource, location[1], location[2], obj, entry)

    async def _delete_foreground(
        self, resource: ResourceType, namespace: str, name: str, owner_uid: str
    ) -> None:
        """Foreground cascading deletion: delete the dependents, wait for them to
        disappear, then drop the owner's foregroundDeletion finalizer."""
        for uid in list(self.dependents.get(owner_uid, ())):
            location = self.by_uid.get(uid)
            dependent = self._type_by_storage_key(location[0]) if location else None
            if location is not None and dependent is not None:
                with contextlib.suppress(errors.ApiError):
                    await self.delete(dependent, location[1], location[2])
        while any(uid in self.by_uid for uid in self.dependents.get(owner_uid, ())):
            await asyncio.sleep(0.05)
        entry = self._bucket(resource).get(namespace, {}).get(name)
        if entry is None or FOREGROUND_FINALIZER not in (
            entry.obj["metadata"].get("finalizers") or []
        ):
            return
        obj = entry.fresh()
        remaining = [f for f in obj["metadata"]["finalizers"] if f != FOREGROUND_FINALIZER]
        if remaining:
            obj["metadata"]["finalizers"] = remaining
        else:
            obj["metadata"].pop("finalizers")
        committed = self._commit(resource, namespace, name, obj, entry)
        self._maybe_finalize(resource, namespace, name, committed)

    async def _collect_dependents(self, owner_uid: str) -> None:
        """Background garbage collection: delete dependents whose owners are all gone."""
        await asyncio.sleep(0)
        for uid in list(self.dependents.pop(owner_uid, ())):
            location = self.by_uid.get(uid)
            resource = self._type_by_storage_key(location[0]) if location else None
            if location is None or resource is None:
                continue
            entry = self._bucket(resource).get(location[1], {}).get(location[2])
            if entry is None or entry.obj["metadata"].get("deletionTimestamp"):
                continue
            owners = {r.get("uid") for r in entry.obj["metadata"].get("ownerReferences") or []}
            if any(owner in self.by_uid for owner in owners):
                continue
            with contextlib.suppress(errors.ApiError):
                await self.delete(resource, location[1], location[2])

    async def _collect_if_orphaned(self, resource: ResourceType, namespace: str, name: str) -> None:
        await asyncio.sleep(ORPHAN_GRACE_SECONDS)
        entry = self._bucket(resource).get(namespace, {}).get(name)
        if entry is None or entry.obj["metadata"].get("deletionTimestamp"):
            return
        owners = {r.get("uid") for r in entry.obj["metadata"].get("ownerReferences") or []}
        if owners and not any(owner in self.by_uid for owner in owners):
            with contextlib.suppress(errors.ApiError):
                await self.delete(resource, namespace, name)

    async def delete_collection(
        self,
        resource: ResourceType,
        namespace: str | None,
        labels: tuple[LabelRequirement, ...],
        fields: tuple[FieldRequirement, ...],
        options: DeleteOptions,
    ) -> list[Obj]:
        deleted = []
        for entry in self.list_entries(resource, namespace, labels, fields):
            meta = entry.obj["metadata"]
            try:
                deleted.append(
                    await self.delete(resource, meta.get("namespace", ""), meta["name"], options)
                )
            except errors.ApiError as exc:
                if exc.code != 404:
                    raise
        return deleted

    # ------------------------------------------------------------------ watch
    def watch(
        self,
        resource: ResourceType,
        namespace: str | None,
        labels: tuple[LabelRequirement, ...],
        fields: tuple[FieldRequirement, ...],
        resource_version: str | None,
        *,
        send_initial_events: bool = False,
    ) -> Watcher:
        """Register a watcher, pre-filled with what the client has not seen yet."""
        watcher = Watcher(namespace, labels, fields)
        key = resource.storage_key
        if send_initial_events or resource_version in (None, "", "0"):
            for entry in self.list_entries(resource, namespace, labels, fields):
                watcher.queue.put_nowait(("ADDED", entry))
        else:
            try:
                since = int(resource_version)
            except ValueError as exc:
                raise errors.bad_request(f"invalid resource version: {resource_version}") from exc
            if since < self.history_floor[key]:
                raise errors.gone(
                    f"too old resource version: {since} ({self.history_floor[key] + 1})"
                )
            for event in _events_after(self.history[key], since):
                watcher.offer(event)
        self.watchers[key].add(watcher)
        return watcher

    def unwatch(self, resource: ResourceType, watcher: Watcher) -> None:
        self.watchers[resource.storage_key].discard(watcher)

    # ------------------------------------------------------------------- CRDs
    def register_crd(self, crd: Obj) -> None:
        name = crd["metadata"]["name"]
        for old in self.crd_types.pop(name, []):
            self.types.pop((old.group, old.version, old.plural), None)
        types = crd_resource_types(crd)
        for resource in types:
            self.types[(resource.group, resource.version, resource.plural)] = resource
        self.crd_types[name] = types

    def unregister_crd(self, crd: Obj) -> None:
        types = self.crd_types.pop(crd["metadata"]["name"], [])
        for resource in types:
            self.types.pop((resource.group, resource.version, resource.plural), None)
        if types:
            # The real server deletes every custom object of a deleted CRD.
            resource = types[0]
            for entry in list(self.iter_entries(resource, None)):
                meta = entry.obj["metadata"]
                self._remove(resource, meta.get("namespace", ""), meta["name"], entry)

    def internal_update(
        self, resource: ResourceType, namespace: str, name: str, obj: Obj
    ) -> Obj | None:
        """A write by a server-side controller (no admission, no preconditions)."""
        current = self._bucket(resource).get(namespace, {}).get(name)
        if current is None:
            return None
        return self._commit(resource, namespace, name, obj, current).obj


def _events_after(history: collections.deque[WatchEvent], since: int) -> list[WatchEvent]:
    """Events newer than `since`; history is ordered by rv, so walk back from the end."""
    result: list[WatchEvent] = []
    for event in reversed(history):
        if event.rv <= since:
            break
        result.append(event)
    result.reverse()
    return result


def _rfc3339_in(seconds: int) -> str:
    moment = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=seconds)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _spec_changed(old: Obj, new: Obj) -> bool:
    ignored = ("metadata", "status", "apiVersion", "kind")
    old_rest = {k: v for k, v in old.items() if k not in ignored}
    new_rest = {k: v for k, v in new.items() if k not in ignored}
    return old_rest != new_rest


_POD_MUTABLE_SPEC = (
    "activeDeadlineSeconds",
    "tolerations",
    "schedulingGates",
    "terminationGracePeriodSeconds",
)


def _validate_update(resource: ResourceType, old: Obj, new: Obj) -> None:
    if resource.group or resource.plural != "pods":
        return
    old_spec = dict(old.get("spec") or {})
    new_spec = dict(new.get("spec") or {})
    gated = bool(old_spec.get("schedulingGates"))
    for key in _POD_MUTABLE_SPEC:
        old_spec.pop(key, None)
        new_spec.pop(key, None)
    if gated:
        # A gated pod's scheduling directives may still be set (Kueue does this).
        for key in ("nodeSelector", "affinity"):
            old_spec.pop(key, None)
            new_spec.pop(key, None)
    if old_spec.get("nodeName") and not new_spec.get("nodeName"):
        new_spec["nodeName"] = old_spec["nodeName"]
    if not old_spec.get("nodeName"):
        old_spec.pop("nodeName", None)
        new_spec.pop("nodeName", None)
    for spec in (old_spec, new_spec):
        spec["containers"] = [
            {k: v for k, v in c.items() if k != "image"} for c in spec.get("containers") or []
        ]
    if old_spec != new_spec:
        name = old["metadata"]["name"]
        raise errors.invalid(
            "",
            "Pod",
            name,
            [
                {
                    "reason": "FieldValueForbidden",
                    "field": "spec",
                    "message": "Forbidden: pod updates may not change fields other than `spec.containers[*].image`,"
                    "`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,`spec.tolerations` "
                    "(only additions to existing tolerations),`spec.terminationGracePeriodSeconds` "
                    "(allow it to be set to 1 if it was previously negative)",
                }
            ],
        )


def _defaults_on_update(resource: ResourceType, obj: Obj) -> None:
    if not resource.group and resource.plural == "secrets" and isinstance(obj, dict):
        _fold_string_data(obj)


def _fold_string_data(secret: Obj) -> None:
    string_data = secret.pop("stringData", None) or {}
    if string_data:
        data = secret.setdefault("data", {}) or {}
        for key, value in string_data.items():
            data[key] = base64.b64encode(str(value).encode()).decode()
        secret["data"] = data


def _defaults_on_create(resource: ResourceType, obj: Obj) -> None:
    """Defaulting the real server does for the kinds whose behaviour we emulate."""
    if resource.group:
        return
    if resource.plural == "secrets":
        _fold_string_data(obj)
        obj.setdefault("type", "Opaque")
    elif resource.plural == "namespaces":
        # The NamespaceDefaultLabelName admission: selectors can match a namespace by name.
        labels = obj["metadata"].setdefault("labels", {})
        labels["kubernetes.io/metadata.name"] = obj["metadata"]["name"]
        obj["spec"] = {"finalizers": ["kubernetes"]}
        obj["status"] = {"phase": "Active"}
    elif resource.plural == "pods":
        _default_pod(obj)


def _default_pod(pod: Obj) -> None:
    spec = pod.setdefault("spec", {})
    spec.setdefault("restartPolicy", "Always")
    spec.setdefault("terminationGracePeriodSeconds", 30)
    spec.setdefault("dnsPolicy", "ClusterFirst")
    spec.setdefault("schedulerName", "default-scheduler")
    spec.setdefault("serviceAccountName", "default")
    spec.setdefault("priority", 0)
    spec.setdefault("enableServiceLinks", True)
    tolerations = spec.setdefault("tolerations", [])
    for key in ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable"):
        if not any(t.get("key") == key for t in tolerations):
            tolerations.append(
                {"key": key, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}
            )
    qos_requests = False
    for container in [*spec.get("initContainers", []), *spec.get("containers", [])]:
        container.setdefault("terminationMessagePath", "/dev/termination-log")
        container.setdefault("terminationMessagePolicy", "File")
        image = str(container.get("image", ""))
        tag = image.rsplit(":", 1)[1] if ":" in image.rsplit("/", 1)[-1] else "latest"
        container.setdefault("imagePullPolicy", "Always" if tag == "latest" else "IfNotPresent")
        resources = container.setdefault("resources", {})
        limits = resources.get("limits") or {}
        requests = (
            resources.setdefault("requests", {}) if limits else resources.get("requests") or {}
        )
        for key, value in limits.items():
            requests.setdefault(key, value)  # requests default to limits
        qos_requests = qos_requests or bool(requests)
    pod["status"] = {"phase": "Pending", "qosClass": "Burstable" if qos_requests else "BestEffort"}
