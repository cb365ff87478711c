"""The trainer pods, followed by list + watch (a reflector, as client-go's informers do).

The operator keeps a cache of its trainer pods (informer.Informer.pods) and wakes a
job when one of its pods changes. A plain watch stream feeds it instead of kopf's
per-event handler machinery, for two reasons:

* Missed deletions. A watch that breaks and cannot resume (410 Gone: the server
  no longer has the history from our last resourceVersion) is replaced by a new
  listing, and a pod deleted in between is then simply absent: no DELETED event
  ever comes. Each listing here *replaces* what was cached for its scope, so such a
  pod is dropped at once (and its job woken), not at the next full resync.
* Cost. Trainer pods change a few times each (created, bound, started, finished);
  at thousands of jobs kopf's processing of each event cost more CPU than the
  reconciliation it triggered.

A stream that ends normally (the server's timeout) or fails is resumed from the
last resourceVersion seen, so nothing is listed again unless the server says the
history is gone; bookmarks keep that version current while nothing changes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any, Protocol

from lorajob_operator.backoff import exponential

__all__ = ["PodSink", "PodSource", "follow_pods"]

log = logging.getLogger("lorajob_operator.podwatch")

# Seconds before the next attempt after a failed listing or a stream that broke,
# doubled after each failure in a row up to RETRY_MAX_SECONDS (a watch the RBAC
# forbids, an API server that is down: a warning a minute, not one a second).
RETRY_SECONDS = 1.0
RETRY_MAX_SECONDS = 60.0


class PodSource(Protocol):
    """The API calls a reflector needs (kube.Kube provides them)."""

    async def list_trainer_pods_at(
        self, namespace: str | None
    ) -> tuple[list[dict[str, Any]], str]: ...

    def watch_trainer_pods(
        self, namespace: str | None, resource_version: str
    ) -> AsyncIterator[tuple[str, dict[str, Any]]]: ...


class PodSink(Protocol):
    """Where the pods go (informer.Informer)."""

    def pods_listed(
        self, namespace: str | None, pods: list[dict[str, Any]], resource_version: str
    ) -> None:
        """Every trainer pod of the scope (a namespace, or all for None), as listed
        at `resource_version`."""

    def pod_changed(self, type: str, pod: Mapping[str, Any]) -> None:
        """One watch event: ADDED, MODIFIED or DELETED."""

    def pod_watch_restarted(self, reason: str) -> None:
        """The watch starts again: `expired` (it lists again) or `error` (it resumes)."""


class Gone(Exception):
    """The watch cannot resume from its resourceVersion (410): list again."""


def _version(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("resourceVersion") or "")


async def follow_pods(source: PodSource, sink: PodSink, namespace: str | None) -> None:
    """List and watch the trainer pods of `namespace` (all for None) until cancelled."""
    scope = namespace or "all namespaces"
    loop = asyncio.get_running_loop()
    version: str | None = None  # None: list (again) before watching
    failures = 0  # in a row
    while True:
        started = loop.time()
        try:
            if version is None:
                pods, version = await source.list_trainer_pods_at(namespace)
                sink.pods_listed(namespace, pods, version)
                failures = 0
            async for kind, obj in source.watch_trainer_pods(namespace, version):
                if kind == "ERROR":
                    raise Gone(str(obj.get("message") or obj))
                version = _version(obj) or version
                failures = 0
                if kind != "BOOKMARK":
                    sink.pod_changed(kind, obj)
        except asyncio.CancelledError:
            raise
        except Gone as exc:
            log.info("pod watch of %s lists again: %s", scope, exc)
            sink.pod_watch_restarted("expired")
            version = None
        except Exception as exc:  # API unreachable, a broken stream: retry, never stop
            failures += 1
            delay = exponential(failures, RETRY_SECONDS, RETRY_MAX_SECONDS)
            log.warning("pod watch of %s failed (%s); retrying in %gs", scope, exc, delay)
            sink.pod_watch_restarted("error")
            await asyncio.sleep(delay)
            continue
        # The server ended the stream (its timeout, or 410). One that ends at once,
        # again and again, must not spin: wait a little before the next.
        if loop.time() - started < RETRY_SECONDS:
            await asyncio.sleep(RETRY_SECONDS)
