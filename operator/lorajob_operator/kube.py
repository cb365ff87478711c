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

Like client-go, every request first takes a token from a client-side token
bucket (`TokenBucket`: `LORAJOB_API_QPS` / `LORAJOB_API_BURST`), and an answer
that means "too many requests" (429, or 503 with Retry-After, which API Priority
and Fairness and a shutting-down server send *before* handling the request) is
retried after the server's Retry-After, which also pauses every other request of
this client until then. Watch streams take a token to open, not while they run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import aiohttp
from kubernetes import client, config

from lorajob_operator import api
from lorajob_operator.objects import LABEL_JOB_UID, MANAGED_BY, JobRef, selector_string

if TYPE_CHECKING:
    from lorajob_operator.metrics import Metrics

__all__ = [
    "Kube",
    "KubeError",
    "PodRejected",
    "QuotaExceeded",
    "TokenBucket",
    "load_config",
    "retry_after_seconds",
]

log = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"
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
# A throttled request (see _throttle_delay) is sent again after the server's
# Retry-After, read as RETRY_AFTER_DEFAULT seconds when missing or unreadable and
# capped at RETRY_AFTER_MAX; it is given up (the caller gets the 429 as an error, and
# the reconciler its own backoff) after THROTTLE_MAX_TRIES tries or when the next
# try would start more than THROTTLE_DEADLINE seconds after the first.
RETRY_AFTER_DEFAULT = 1.0
RETRY_AFTER_MAX = 60.0
THROTTLE_MAX_TRIES = 10
THROTTLE_DEADLINE = 60.0
# A wait for the client-side limiter this long is logged (at DEBUG, as client-go does
# at its verbosity 1); shorter ones are routine under load.
THROTTLE_LOG_SECONDS = 1.0
# Least seconds between two INFO messages about the server throttling this client.
THROTTLE_LOG_INTERVAL = 60.0

# Seconds of float rounding (and of an early wake-up) below which no wait is a wait.
_CLOCK_SLACK = 1e-6

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


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


def _refusal(exc: _ApiStatus) -> KubeError | None:
    """What a refused create of a pod or Service is: over quota, or rejected (invalid,
    forbidden, refused by an admission webhook); None for any other error."""
    if exc.status == 403 and "exceeded quota" in exc.message:
        return QuotaExceeded(exc.message)
    if exc.status in (400, 403, 422):
        return PodRejected(exc.message)
    return None


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


def retry_after_seconds(value: str | None, now: datetime | None = None) -> float:
    """The wait a Retry-After header asks for: delay-seconds or an HTTP date (RFC 9110),
    RETRY_AFTER_DEFAULT when missing or unreadable, within 0..RETRY_AFTER_MAX."""
    text = (value or "").strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return RETRY_AFTER_DEFAULT
        if when.tzinfo is None:  # "-0000": UTC by the RFC
            when = when.replace(tzinfo=UTC)
        # A date already past means "now".
        seconds = max(0.0, (when - (now or datetime.now(UTC))).total_seconds())
    if not (math.isfinite(seconds) and seconds >= 0):
        return RETRY_AFTER_DEFAULT
    return min(RETRY_AFTER_MAX, seconds)


def _throttle_delay(status: int, headers: Mapping[str, str]) -> float | None:
    """Seconds to wait before sending the request again, or None: not a throttle answer.

    Retrying is safe for every request this client makes, POST creates included:
    a 429 comes from API Priority and Fairness (or max-in-flight), which rejects the
    request before any handler ran, and the server sends 503 *with* Retry-After only
    from filters that equally never ran it (shutting down, not ready). A 503 without
    Retry-After (an unavailable aggregated API) and every other status are answers.
    (Even a create that had run would be safe here: a repeated create is a 409, which
    create_pod takes as "already there" after checking the owner.)
    """
    if status == 429:
        return retry_after_seconds(headers.get("Retry-After"))
    if status == 503 and "Retry-After" in headers:
        return retry_after_seconds(headers.get("Retry-After"))
    return None


class TokenBucket:
    """Client-side rate limit, client-go's token bucket (rest.Config QPS / Burst).

    `qps` requests a second on average, up to `burst` at once after a quiet spell
    (math.inf: no limit). Kept as a theoretical arrival time (GCRA), so a request
    reserves its slot when it arrives and waiters go in arrival order without a
    lock. `pause()` holds every request until the server's Retry-After point and
    restarts from an empty bucket there, so the requests that piled up meanwhile
    do not hit the server as one burst. `clock` and `sleep` are injectable (tests).
    """

    def __init__(
        self,
        qps: float,
        burst: int,
        *,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        if not qps > 0 or burst < 1:
            raise ValueError(f"need qps > 0 and burst >= 1, not qps={qps} burst={burst}")
        self.qps = qps
        self.burst = burst
        self.clock = clock
        self.sleep = sleep
        self._interval = 1.0 / qps  # seconds per token (0 for no limit)
        self._tat = clock()  # a full bucket
        self._paused_until = -math.inf

    def reserve(self) -> float:
        """Take a token: the seconds until it may be used (0: now)."""
        now = self.clock()
        self._tat = max(self._tat, now) + self._interval
        delay = max(self._tat - now - self.burst * self._interval, self._paused_until - now)
        return delay if delay > _CLOCK_SLACK else 0.0

    async def acquire(self) -> float:
        """Wait for a token, and for the end of any pause (also one that starts while
        waiting); the seconds waited (0: none)."""
        delay = self.reserve()
        if not delay:
            return 0.0
        start = self.clock()
        while delay > _CLOCK_SLACK:
            await self.sleep(delay)
            delay = self._paused_until - self.clock()
        return self.clock() - start

    def pause(self, seconds: float) -> None:
        """No request starts within `seconds` from now (an earlier end of a pause already
        running is extended, never shortened); after it, requests start at `qps` from an
        empty bucket."""
        until = self.clock() + seconds
        if until > self._paused_until:
            self._paused_until = until
            self._tat = max(self._tat, until + (self.burst - 1) * self._interval)


def _q(segment: str) -> str:
    return quote(segment, safe="")


def _pods_path(namespace: str | None) -> str:
    return "/api/v1/pods" if namespace is None else f"/api/v1/namespaces/{_q(namespace)}/pods"


def _scope(namespace: str | None) -> str:
    return "all namespaces" if namespace is None else f"namespace {namespace}"


class Kube:
    """Typed async calls for the few things the operator does.

    `api_client` only supplies the configuration (server, CA, credentials); by
    default the one `load_config()` set up. `limiter` is the client-side rate limit
    (none by default: the operator passes one built from its settings); `metrics`,
    when given, counts throttled requests (lorajob_api_throttled_total).
    """

    def __init__(
        self,
        api_client: client.ApiClient | None = None,
        *,
        limiter: TokenBucket | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.limiter = limiter or TokenBucket(math.inf, 1)
        self.metrics = metrics
        self._throttle_logged_at = -math.inf  # limiter.clock()
        self._throttled_unlogged = 0
        self.configuration: client.Configuration = (
            api_client.configuration if api_client else client.Configuration.get_default_copy()
        )
        self._host = str(self.configuration.host).rstrip("/")
        self._session: aiohttp.ClientSession | None = None
        # Watch streams hold a connection for minutes each: they get their own pool,
        # so a watch per namespace can never take every connection calls need.
        self._watch_session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # aiohttp deprecated ClientSession.loop, so each session's loop is kept here.
        self._watch_loop: asyncio.AbstractEventLoop | None = None
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
        if session is None or session.closed or self._watch_loop is not loop:
            connector = aiohttp.TCPConnector(limit=0, ssl=_ssl_context(self.configuration))
            session = self._watch_session = aiohttp.ClientSession(connector=connector)
            self._watch_loop = loop
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
        data = None if body is None else json.dumps(body)
        try:
            async with self._response(
                method, path, params=params, data=data, content_type=content_type
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

    @contextlib.asynccontextmanager
    async def _response(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        data: str | None = None,
        content_type: str = "application/json",
        watch_timeout: aiohttp.ClientTimeout | None = None,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """The server's answer to the request, sent when the rate limit allows and sent
        again while the server answers "too many requests" (up to THROTTLE_MAX_TRIES /
        THROTTLE_DEADLINE; then that answer is the one returned). `watch_timeout`: a
        watch stream, on the watch session."""
        deadline = self.limiter.clock() + THROTTLE_DEADLINE
        tries = 0
        while True:
            await self._wait_for_limiter(method, path)
            tries += 1
            headers = self._headers()
            if data is not None:
                headers["Content-Type"] = content_type
            if watch_timeout is None:
                request = self._get_session().request(
                    method, self._host + path, params=params, data=data, headers=headers
                )
            else:
                request = self._get_watch_session().request(
                    method, self._host + path, params=params, headers=headers, timeout=watch_timeout
                )
            async with request as resp:
                delay = _throttle_delay(resp.status, resp.headers)
                if delay is None:
                    yield resp
                    return
                self._server_throttled(resp.status, delay)
                if tries >= THROTTLE_MAX_TRIES or self.limiter.clock() + delay > deadline:
                    log.info(
                        "%s %s: API server still throttling (HTTP %d) after %d tries; giving up",
                        method,
                        path,
                        resp.status,
                        tries,
                    )
                    yield resp
                    return
                log.debug(
                    "%s %s: HTTP %d, retrying in %gs (try %d)",
                    method,
                    path,
                    resp.status,
                    delay,
                    tries + 1,
                )
                await resp.read()  # so the connection is reused

    async def _wait_for_limiter(self, method: str, path: str) -> None:
        waited = await self.limiter.acquire()
        if waited <= 0:
            return
        if self.metrics is not None:
            self.metrics.api_throttled.labels(reason="client").inc()
            self.metrics.api_throttle_wait.inc(waited)
        if waited >= THROTTLE_LOG_SECONDS:
            log.debug("%s %s waited %.2fs for the client-side rate limit", method, path, waited)

    def _server_throttled(self, status: int, delay: float) -> None:
        """The server said "too many requests": hold every request of this client until
        its Retry-After point (the retry included). Logged at INFO at most once per
        THROTTLE_LOG_INTERVAL, with the count since; each answer at DEBUG."""
        if self.metrics is not None:
            self.metrics.api_throttled.labels(reason="server").inc()
        self.limiter.pause(delay)
        self._throttled_unlogged += 1
        now = self.limiter.clock()
        if now >= self._throttle_logged_at + THROTTLE_LOG_INTERVAL:
            log.info(
                "API server throttles this client (HTTP %d, Retry-After %gs; %d such "
                "answer(s) since the last message): requests are paused and retried",
                status,
                delay,
                self._throttled_unlogged,
            )
            self._throttle_logged_at = now
            self._throttled_unlogged = 0

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
            async with self._response("GET", path, params=params, watch_timeout=timeout) as resp:
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
            if (refusal := _refusal(exc)) is not None:
                raise refusal from exc
            raise KubeError(f"create pod in {namespace}: {exc.message}") from exc
        return created

    async def remove_scheduling_gate(self, namespace: str, name: str, gate: str) -> None:
        """Remove one scheduling gate from a pod (a strategic merge patch deletes just that
        entry of spec.schedulingGates, keeping any other, e.g. Kueue's); a pod that is
        gone is fine."""
        patch = {"spec": {"schedulingGates": [{"name": gate, "$patch": "delete"}]}}
        try:
            await self._request(
                "PATCH",
                f"/api/v1/namespaces/{_q(namespace)}/pods/{_q(name)}",
                body=patch,
                content_type=STRATEGIC_MERGE_PATCH,
                keep_body=False,
            )
        except _ApiStatus as exc:
            if exc.status != 404:
                raise KubeError(
                    f"remove gate {gate} of pod {namespace}/{name}: {exc.message}"
                ) from exc

    async def create_service(self, namespace: str, body: Mapping[str, Any]) -> None:
        """Create a Service; one of that name that exists already (a replayed create) is
        fine. A refusal is a PodRejected (QuotaExceeded for quota), as a pod's would be."""
        try:
            await self._request(
                "POST", f"/api/v1/namespaces/{_q(namespace)}/services", body=body, keep_body=False
            )
        except _ApiStatus as exc:
            if exc.status == 409:
                return
            if (refusal := _refusal(exc)) is not None:
                raise refusal from exc
            raise KubeError(f"create service in {namespace}: {exc.message}") from exc

    async def delete_service(self, namespace: str, name: str) -> None:
        """Delete a Service; a missing one is fine."""
        try:
            await self._request(
                "DELETE",
                f"/api/v1/namespaces/{_q(namespace)}/services/{_q(name)}",
                keep_body=False,
            )
        except _ApiStatus as exc:
            if exc.status != 404:
                raise KubeError(f"delete service {namespace}/{name}: {exc.message}") from exc

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
