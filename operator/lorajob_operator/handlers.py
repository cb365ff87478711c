"""kopf handlers: thin glue between watch events, reconcile.decide() and kube.py.

Run with `kopf run --standalone --all-namespaces -m lorajob_operator.handlers`
(or `python -m lorajob_operator`).

LoRAJobs are reconciled from a shared work queue (workqueue.WorkQueue, in the
manner of controller-runtime), not one task per job: watch events on a job (a
kopf on.event handler) and on its trainer pods (podwatch.follow_pods, a plain
list + watch; see there why not kopf) put the job's key in the queue; a fixed
pool of WORKERS takes keys and runs one pass each (`process`): decide what to do
with `reconcile.decide()` and do it via kube.py. A key is queued once however
many events arrive, and one job never has two passes at once, so all writes for
one job happen in order. Each pass queues the job's next turn: at the decision's
requeue time, at the next progress read while the trainer runs (every
`progress_interval_seconds`), after a backoff when it failed, and every
RESYNC_SECONDS at the latest. Routine pod events queue it DEBOUNCE_SECONDS later.
A new job's first pass waits behind known jobs' passes (one turn in
workqueue.NEW_KEY_EVERY while both wait), so in a burst of new jobs the running
ones' status stays current and a new job is never starved.

A pass reads the job and its pods from what the watches delivered (the job's
latest watched body, kept per job in `JobState`; a cache of slimmed pod bodies
filled by the pod watch, replaced by each of its listings, and by our own
creates), not from the API, except where that view may be incomplete: see
`_cached_view`. All of this is only a copy: kopf's initial listing at startup
delivers every existing job, which queues it, and the first pass of a job that
has had an attempt reads the API; that is how an operator restart resumes: from
the objects, not from memory. Deletion is kopf's finalizer (`job_deleted`); the
queue drops a job when its DELETED event arrives.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import math
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import kopf
from lora_trainer.protocol import Progress

from lorajob_operator import api, objects, podwatch, policy, reconcile, webhook
from lorajob_operator.conditions import scrub
from lorajob_operator.events import build_event
from lorajob_operator.kube import Kube, PodRejected, QuotaExceeded, TokenBucket, load_config
from lorajob_operator.metrics import Metrics
from lorajob_operator.pods import is_live, is_stopping, job_key_of_pod, pod_view
from lorajob_operator.progress import ProgressError, ProgressReader
from lorajob_operator.settings import OperatorSettings, load_settings
from lorajob_operator.workqueue import WorkQueue

SETTINGS: OperatorSettings = load_settings()
ANNOTATION_PREFIX = f"kopf.{api.GROUP}"
FINALIZER = f"{api.GROUP}/finalizer"
# Backoff for a reconciliation that raised (API unreachable, conflict, bug).
ERROR_BACKOFF_MIN = 2.0
ERROR_BACKOFF_MAX = 300.0
# The finalizer polls for the trainer pods to be gone every POD_GONE_POLL seconds,
# up to their grace period plus POD_GONE_SLACK, then kopf retries after POD_GONE_RECHECK.
POD_GONE_POLL = 0.5
POD_GONE_SLACK = 30.0
POD_GONE_RECHECK = 10.0
# A full reconciliation at least this often even without a watch event: a safety
# net for a lost event, never the mechanism. It reads the job and its pods from the
# API, not from the watch cache, so a missed watch event is repaired within this time.
RESYNC_SECONDS = 300.0
# A job queued by a routine pod event (created, bound, started) gets its pass this
# long later, so such a burst costs one pass and one status write instead of one
# each (the pod's ADDED event, which comes while the pass that created it still
# runs, included). Not a job's first pass (pod creation), and cut short by an urgent
# wake-up: a pod that stops or is being stopped must be seen before it is gone
# (its last state says why, e.g. Evicted), and spec edits or deletion are acted on at once.
DEBOUNCE_SECONDS = 0.25
# Uids of recently deleted pods, so an API listing taken just before a deletion
# does not bring the pod back into the watch cache.
DELETED_POD_MEMORY = 4096
# Passes of different jobs run concurrently on this many workers (one job never has
# two at once). API calls are bounded by kube.MAX_CONNECTIONS anyway; the pool is
# larger so that progress reads of unreachable trainers (up to ProgressReader's 3 s
# timeout each) cannot hold every worker, and so that in a burst a job's follow-up
# pass (its pod went Running) waits less behind new jobs' first passes (which the
# queue also takes only when no follow-up waits). 1,000-job burst, status lag p50:
# ~14 s with 64 workers and one lane, ~8 s with 256 and one lane, 0.25 s with both.
WORKERS = 256

log = logging.getLogger("lorajob_operator")
JobKey = tuple[str, str]
JobLogger = logging.LoggerAdapter[logging.Logger]


class _JobLogger(logging.LoggerAdapter[logging.Logger]):
    def process(self, msg: str, kwargs: Any) -> tuple[str, Any]:
        return f"[{self.extra['job'] if self.extra else '?'}] {msg}", kwargs


def job_logger(namespace: str, name: str) -> JobLogger:
    """Messages about one job, prefixed like kopf's: `[namespace/name] ...`."""
    return _JobLogger(log, {"job": f"{namespace}/{name}"})


@dataclass
class JobState:
    """What the work queue remembers about one LoRAJob between passes; all of it
    can be rebuilt from the objects (a restart starts from none of it)."""

    watched: Mapping[str, Any]  # the job as its watch last showed it (a shallow copy)
    last: Reconciled | None = None  # the last pass's outcome; None: read the API next
    # An event asked for a full pass (a job edit, a pod change, a queue slot freed).
    dirty: bool = True
    # A pass has begun: routine pod events are debounced from then on (the pod the
    # first pass creates shows up while that pass still runs).
    started: bool = False
    errors: int = 0  # consecutive failed passes (the backoff grows with them)
    # time.monotonic() deadlines: next full pass without an event, next progress
    # read, next pass that reads the API instead of the watch cache.
    next_full: float = 0.0
    next_poll: float = 0.0
    next_resync: float = 0.0
    # The job's spec as parse_job_spec judged it, for the (uid, generation) it was
    # parsed at: a spec changes only with the generation.
    parsed: tuple[tuple[str, Any], reconcile.ParsedSpec] | None = None
    gone: bool = False  # deleted (or being deleted after its TTL): no more passes

    @property
    def parsed_generation(self) -> Any:
        """The generation a pass has parsed (and so is handling or has handled)."""
        return self.parsed[0][1] if self.parsed else None

    def parsed_spec(
        self, job: Mapping[str, Any], settings: OperatorSettings
    ) -> reconcile.ParsedSpec | None:
        """The cached parse of `job`'s spec, (re)parsed when its generation moved;
        None where the job has no generation to key it by."""
        meta = job.get("metadata") or {}
        generation = meta.get("generation")
        if generation is None:
            return None
        key = (str(meta.get("uid", "")), generation)
        if self.parsed is None or self.parsed[0] != key:
            spec = job.get("spec") or {}
            self.parsed = (
                key,
                reconcile.parse_job_spec(spec, str(meta.get("namespace")), settings),
            )
        return self.parsed[1]


@dataclass
class Runtime:
    """Process-wide helpers; nothing here is state that must survive a restart."""

    settings: OperatorSettings
    kube: Kube
    metrics: Metrics
    reader: ProgressReader
    # Every LoRAJob the job watch has shown, and the queue of those due a pass.
    jobs: dict[JobKey, JobState] = field(default_factory=dict)
    queue: WorkQueue[JobKey] = field(default_factory=WorkQueue)
    queued: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    # Held while a job counts its namespace's running jobs and creates a pod, so
    # two jobs never both take the last slot of a concurrency limit.
    namespace_locks: dict[str, asyncio.Lock] = field(
        default_factory=lambda: defaultdict(asyncio.Lock)
    )
    # The trainer pods as the pod watch last showed them (pod_view()):
    # job uid -> pod key -> view. Reconciliations read pods from here instead of
    # listing them; see _cached_view for when they still ask the API.
    pods: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    deleted_pods: OrderedDict[str, None] = field(default_factory=OrderedDict)
    pod_watches: list[asyncio.Task[None]] = field(default_factory=list)
    # Scopes (a namespace, or None: all) the pod watch has listed: from then on the
    # cache holds every trainer pod there (the watch adds what comes after).
    listed_scopes: set[str | None] = field(default_factory=set)

    def watch_job(self, key: JobKey, body: Mapping[str, Any]) -> JobState:
        """Record the job as the watch shows it; a job seen for the first time (the
        startup listing, a new job, one recreated under the same name) is queued."""
        snapshot = dict(body)  # shallow: kopf hands each event a freshly decoded body
        state = self.jobs.get(key)
        if state is None or _uid(state.watched) != _uid(snapshot):
            state = self.jobs[key] = JobState(watched=snapshot)
            if not _has_attempts(snapshot):
                # No attempt yet: its only pods are the ones its passes create (a
                # create replayed after a crash finds its pod by name, 409), so its
                # first pass can trust the watch instead of a GET and a LIST.
                state.next_resync = time.monotonic() + RESYNC_SECONDS
            self.queue.add(key, new=True)
        else:
            state.watched = snapshot
        return state

    def forget_job(self, key: JobKey, job_uid: str) -> None:
        """The job is gone from the API: no more passes, no timers, no cached pods."""
        self.jobs.pop(key, None)
        self.queue.forget(key)
        self.pods.pop(job_uid, None)

    def wake(self, key: JobKey, *, urgent: bool = True) -> None:
        """Ask for a full pass of a known job: now, or (not urgent) after
        DEBOUNCE_SECONDS so the rest of a burst of routine events is in it too.
        A job's first pass is never delayed."""
        state = self.jobs.get(key)
        if state is None or state.gone:
            return  # not listed yet: its first pass comes with its watch event
        state.dirty = True
        if urgent or not state.started:
            self.queue.add(key)
        else:
            self.queue.add_after(key, DEBOUNCE_SECONDS)

    def wake_queued(self, namespace: str) -> None:
        for name in list(self.queued.get(namespace, ())):
            self.wake((namespace, name))

    # -- the pod cache

    def job_pods(self, job_uid: str) -> list[dict[str, Any]]:
        return list(self.pods.get(job_uid, {}).values())

    def remember_pod(self, pod: Mapping[str, Any], *, newer: bool = True) -> None:
        """Cache a pod from a watch event (`newer`: it replaces what is cached) or a
        create response (`newer=False`: kept only if the watch has not shown it yet;
        the watch may already hold a later version)."""
        job_uid, key = _pod_keys(pod)
        if job_uid is None or key in self.deleted_pods:
            return
        pods = self.pods.setdefault(job_uid, {})
        if newer or key not in pods:
            pods[key] = pod_view(pod)

    def forget_pod(self, pod: Mapping[str, Any]) -> None:
        job_uid, key = _pod_keys(pod)
        self.deleted_pods[key] = None
        while len(self.deleted_pods) > DELETED_POD_MEMORY:
            self.deleted_pods.popitem(last=False)
        pods = self.pods.get(job_uid or "")
        if pods is not None:
            pods.pop(key, None)
            if not pods:
                del self.pods[job_uid or ""]

    # -- podwatch.PodSink: what the pod watch delivers

    def pod_changed(self, type: str, pod: Mapping[str, Any]) -> None:
        """A trainer pod changed: cache it, wake its job; a pod that ended may free a
        queue slot."""
        if type == "DELETED":
            self.forget_pod(pod)
        else:
            self.remember_pod(pod)
        key = job_key_of_pod(pod)
        if key is not None:
            self.wake(key, urgent=type == "DELETED" or is_stopping(pod))
        if type == "DELETED" or not is_live(pod):
            namespace = _namespace(pod)
            if namespace:
                self.wake_queued(namespace)

    def pods_listed(
        self, namespace: str | None, listed: list[dict[str, Any]], resource_version: str
    ) -> None:
        """The watch listed every trainer pod of `namespace` (None: all) at
        `resource_version`: the cache becomes that listing. A cached pod missing
        from it was deleted while no watch ran (no DELETED event will come): it is
        dropped and its job woken, as are the jobs whose pods changed meanwhile.
        A pod newer than the listing (created by a pass while the listing was on
        its way) is kept: its ADDED event is still to come."""
        self.listed_scopes.add(namespace)
        at = int(resource_version) if resource_version.isdigit() else None
        fresh: dict[str, tuple[str, dict[str, Any]]] = {}  # pod key -> (job uid, pod)
        for pod in listed:
            job_uid, key = _pod_keys(pod)
            if job_uid is not None and key not in self.deleted_pods:
                fresh[key] = (job_uid, pod)
        for cached in list(self.pods.values()):
            for key, view in list(cached.items()):
                in_scope = namespace is None or _namespace(view) == namespace
                version = _resource_version(view)
                older_than_listing = at is not None and version is not None and version <= at
                if in_scope and key not in fresh and older_than_listing:
                    self.pod_changed("DELETED", view)
        for key, (job_uid, pod) in fresh.items():
            known = self.pods.get(job_uid, {}).get(key)
            if known is None or _is_newer(pod, known):
                self.pod_changed("MODIFIED" if known else "ADDED", pod)

    def pod_watch_restarted(self, reason: str) -> None:
        self.metrics.pod_watch_restarts.labels(reason=reason).inc()

    def replace_pods(self, job_uid: str, listed: list[dict[str, Any]]) -> None:
        """Cache the job's pods as an API listing shows them (pods gone since the
        last watch event are dropped; a version the watch already superseded is not)."""
        cached = self.pods.get(job_uid, {})
        fresh: dict[str, dict[str, Any]] = {}
        for pod in listed:
            key = _pod_keys(pod)[1]
            if key in self.deleted_pods:
                continue
            known = cached.get(key)
            fresh[key] = known if known and _is_newer(known, pod) else pod_view(pod)
        if fresh:
            self.pods[job_uid] = fresh
        else:
            self.pods.pop(job_uid, None)


def _namespace(body: Mapping[str, Any]) -> str:
    return str((body.get("metadata") or {}).get("namespace", ""))


def _uid(body: Mapping[str, Any]) -> str:
    return str((body.get("metadata") or {}).get("uid", ""))


def _has_attempts(job: Mapping[str, Any]) -> bool:
    """Whether the job's status records a trainer pod (it may have pods we did not see)."""
    status = job.get("status") or {}
    return bool(status.get("attempts") or status.get("podName"))


def _pod_keys(pod: Mapping[str, Any]) -> tuple[str | None, str]:
    """(job uid label, the pod's uid, or its name where a test body has no uid)."""
    meta = pod.get("metadata") or {}
    job_uid = (meta.get("labels") or {}).get(objects.LABEL_JOB_UID)
    return (str(job_uid) if job_uid else None), str(meta.get("uid") or meta.get("name"))


def _resource_version(body: Mapping[str, Any]) -> int | None:
    """The resourceVersion as a number, where the server's versions are numbers
    (etcd revisions, as on every Kubernetes API server in practice)."""
    rv = str((body.get("metadata") or {}).get("resourceVersion", ""))
    return int(rv) if rv.isdigit() else None


def _is_newer(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether `a` is a later version than `b` (False where that cannot be told)."""
    ra, rb = _resource_version(a), _resource_version(b)
    return ra is not None and rb is not None and ra > rb


RUNTIME: Runtime | None = None
METRICS = Metrics()


def runtime() -> Runtime:
    if RUNTIME is None:
        raise kopf.TemporaryError("the operator is still starting", delay=1)
    return RUNTIME


webhook.register(SETTINGS)


# --------------------------------------------------------------------------- lifecycle


class NoDiffBase(kopf.DiffBaseStorage):
    """kopf's "last handled configuration", kept nowhere.

    kopf diffs each job against that snapshot to find on.create / on.update /
    on.resume causes; this operator has none of those handlers (its work queue
    reconciles every change, and on.delete is detected from the deletion
    timestamp alone). Keeping the snapshot would cost one annotation write per
    job and spec change, plus a deep copy of every body on every watch event.
    With an empty essence every event is a no-op change to kopf.
    """

    def build(
        self,
        *,
        body: kopf.Body,
        extra_fields: Iterable[kopf.FieldSpec] | None = None,
    ) -> kopf.BodyEssence:
        del body, extra_fields
        return kopf.BodyEssence()

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        del body
        return kopf.BodyEssence()

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        del body, patch, essence  # nothing to keep (see the class docstring)


def _throttled_retries_are_warnings(record: logging.LogRecord) -> bool:
    """Log kopf's "Request attempt N failed; will retry: ... 429" at WARNING, not ERROR:
    the server asked for a pause and kopf takes it. A final failure stays an ERROR."""
    if (
        record.levelno == logging.ERROR
        and "will retry" in str(record.msg)
        and "APITooManyRequestsError" in record.getMessage()
    ):
        record.levelno, record.levelname = logging.WARNING, "WARNING"
    return True


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, logger: kopf.Logger, **_: Any) -> None:
    global RUNTIME  # noqa: PLW0603 - one runtime per operator process
    # kopf's bookkeeping goes to annotations: `status` is our API and only ours.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
        prefix=ANNOTATION_PREFIX
    )
    settings.persistence.diffbase_storage = NoDiffBase()
    settings.persistence.finalizer = FINALIZER
    # We post our own Events for every transition; kopf adds one only for warnings
    # (e.g. a handler that raised).
    settings.posting.level = logging.WARNING
    # Watches: reconnect quickly after an API server restart, and re-list every
    # few minutes so a silently dropped stream cannot hide changes for long.
    settings.watching.connect_timeout = 10
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.reconnect_backoff = 1.0
    settings.batching.idle_timeout = 5.0
    settings.batching.batch_window = 0.1
    settings.batching.exit_timeout = 10.0
    settings.execution.max_workers = 8
    settings.peering.standalone = True
    settings.peering.mandatory = False
    webhook.configure(settings, SETTINGS)
    # kopf logs every successful handler call at INFO; with a watch handler on
    # every trainer pod that drowns what matters. Our own messages keep INFO.
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    # API Priority and Fairness answers 429 with Retry-After under load: kopf obeys
    # it (as kube.py does) and logs the retry, which is flow control, not an error.
    settings.networking.enforce_retry_after = True
    logging.getLogger("kopf.objects").addFilter(_throttled_retries_are_warnings)

    load_config()
    metrics = METRICS
    try:
        metrics.serve(SETTINGS.metrics_port)
    except OSError as exc:  # e.g. the port is taken: run on, without metrics
        logger.error("cannot serve metrics on :%d: %s", SETTINGS.metrics_port, exc)
    rt = RUNTIME = Runtime(
        settings=SETTINGS,
        kube=Kube(limiter=TokenBucket(SETTINGS.api_qps, SETTINGS.api_burst), metrics=metrics),
        metrics=metrics,
        reader=ProgressReader(SETTINGS.progress_port),
    )
    # Before kopf's first listing is processed: its events queue every existing job.
    rt.queue.start(lambda key: process(rt, key), WORKERS)
    rt.pod_watches = [
        asyncio.create_task(podwatch.follow_pods(rt.kube, rt, namespace), name="pod-watch")
        for namespace in _pod_watch_scopes(SETTINGS)
    ]
    # What is loaded by now (modules, kopf, the API client) lives as long as the
    # process: keep it out of the collector's full passes, which otherwise walk
    # it again every time the heap has grown by a quarter.
    gc.freeze()
    logger.info(
        "lorajob operator ready: metrics on :%d, progress every %gs",
        SETTINGS.metrics_port,
        SETTINGS.progress_interval_seconds,
    )


def _pod_watch_scopes(settings: OperatorSettings) -> list[str | None]:
    """One pod watch per watched namespace (what namespaced RBAC allows), or one
    for all of them."""
    return list(settings.namespaces) if settings.namespaces else [None]


@kopf.on.cleanup()
async def cleanup(**_: Any) -> None:
    if RUNTIME is not None:
        for task in RUNTIME.pod_watches:
            task.cancel()
        await asyncio.gather(*RUNTIME.pod_watches, return_exceptions=True)
        await RUNTIME.queue.stop()
        await RUNTIME.reader.close()
        await RUNTIME.kube.close()


@kopf.on.probe(id="jobs")
def probe_jobs(**_: Any) -> int:
    """Liveness detail: how many LoRAJobs this operator follows."""
    return len(RUNTIME.jobs) if RUNTIME else 0


# --------------------------------------------------------------------------- triggers
# Both are `async def` on purpose: kopf runs plain `def` handlers in a thread
# pool, and the work queue must be used from the event loop's thread.


@kopf.on.event(api.GROUP, api.VERSION, api.PLURAL)
async def job_event(type: str, body: kopf.Body, name: str, namespace: str | None, **_: Any) -> None:
    """Keep the job's latest body; queue a pass for a job seen for the first time and
    on spec or metadata changes (not on our own status writes)."""
    if RUNTIME is None or namespace is None:
        return
    key = (namespace, name)
    if type == "DELETED":
        RUNTIME.forget_job(key, _uid(body))
        RUNTIME.queued[namespace].discard(name)
        RUNTIME.metrics.forget(namespace, name)
        return
    known = key in RUNTIME.jobs
    state = RUNTIME.watch_job(key, body)
    status = body.get("status") or {}
    meta = body.get("metadata") or {}
    generation = meta.get("generation")
    # A spec no pass has taken up yet: not written back as observedGeneration, nor
    # parsed by a pass under way (kopf's finalizer write, which has no status yet,
    # comes back while the job's first pass runs: no second pass for it).
    changed = generation not in (status.get("observedGeneration"), state.parsed_generation)
    if known and (changed or meta.get("deletionTimestamp")):
        RUNTIME.wake(key)


# --------------------------------------------------------------------------- the passes


@dataclass(frozen=True)
class Reconciled:
    """What one reconciliation leaves for the next pass."""

    job: Mapping[str, Any]  # the job as last written (status included)
    pod_ip: str | None  # the running trainer's IP: progress can be read
    requeue_after: float | None  # the decision's "look again in" (None: only on events)

    @property
    def finished(self) -> bool:
        return (self.job.get("status") or {}).get("phase") in (
            api.Phase.SUCCEEDED,
            api.Phase.FAILED,
        )


async def process(rt: Runtime, key: JobKey) -> None:
    """One turn of the work queue for one job (see the module docstring).

    A full reconciliation (decide, execute) runs when an event asked for one, when
    the decision's requeue time has come, and every RESYNC_SECONDS as a safety net.
    In between, while the trainer runs, only its progress is read and copied: pod
    changes always come with a watch event. The job and its pods are read from what
    the watches delivered whenever that is known to be complete; see _cached_view
    for when the API is asked instead. Ends by queueing the job's next turn.
    """
    state = rt.jobs.get(key)
    if state is None or state.gone:
        return  # deleted while queued
    namespace, name = key
    jlog = job_logger(namespace, name)
    state.started = True
    woken, state.dirty = state.dirty, False
    now = time.monotonic()
    poll = now >= state.next_poll
    last = state.last
    try:
        if last is None or woken or now >= state.next_full:
            seen = None if now >= state.next_resync else _cached_view(rt, state.watched, last)
            parse = functools.partial(state.parsed_spec, settings=rt.settings)
            with rt.metrics.reconcile_seconds.time():
                last = await reconcile_job(
                    rt,
                    namespace,
                    name,
                    jlog,
                    poll_progress=poll,
                    seen=seen,
                    parse=parse,
                )
            if last is None:
                state.gone = True  # its DELETED event removes the state
                return
            if seen is None:
                state.next_resync = now + RESYNC_SECONDS
            state.next_full = now + _until_next_full(last)
        elif poll and last.pod_ip:
            last = await poll_progress(rt, last, jlog)
    except Exception as exc:
        state.errors += 1
        rt.metrics.reconcile_errors.inc()
        delay = reconcile.retry_delay(state.errors, ERROR_BACKOFF_MIN, ERROR_BACKOFF_MAX)
        jlog.warning("reconciliation failed (%s); retrying in %gs", exc, delay)
        state.last = None
        state.next_resync = 0.0  # after a failure, read everything from the API again
        rt.queue.add_after(key, delay)  # an event brings the retry forward
        return
    state.errors = 0
    if last is None:  # the progress write found the job changed: reconcile now
        state.last, state.dirty = None, True
        rt.queue.add(key)
        return
    state.last = last = _share_watched(state.watched, last)
    if last.pod_ip and poll:
        state.next_poll = now + rt.settings.progress_interval_seconds
    wake_at = min(state.next_full, state.next_poll) if last.pod_ip else state.next_full
    if wake_at != math.inf:
        rt.queue.add_after(key, wake_at - time.monotonic())


def _cached_view(
    rt: Runtime, watched: Mapping[str, Any], last: Reconciled | None
) -> Mapping[str, Any] | None:
    """The job to reconcile without reading the API, or None to read it.

    The job is the newer of the watch's body and the one our last status write
    returned (the watch may not have delivered our own write yet). Its pods come
    from the pod cache, which is complete for pods this process created or saw
    listed; the API is asked when that cannot be trusted:

    * the job's versions cannot be compared (non-numeric resourceVersions);
    * on the first pass since startup (or a failure) for a job that already has attempts (after an
      operator restart its pods may not have been listed by the watch yet; a new
      job's only pods are the ones its passes create, and a create replayed
      after a crash finds its pod by name, 409);
    * the current attempt's pod is not in the cache (not seen yet, or gone).
    """
    job: Mapping[str, Any] = dict(watched)  # a snapshot: kopf swaps the body on events
    if last is not None:
        if _is_newer(last.job, job):
            job = last.job
        elif _resource_version(job) is None or _resource_version(last.job) is None:
            return None
    if last is None and _has_attempts(job):
        return None
    pod_name = (job.get("status") or {}).get("podName")
    if pod_name and all(
        (p.get("metadata") or {}).get("name") != pod_name for p in rt.job_pods(_uid(job))
    ):
        return None
    return job


def _share_watched(watched: Mapping[str, Any], last: Reconciled) -> Reconciled:
    """`last` holding the watch's body instead of our own write's response once the
    watch has delivered that write (or a later one): one copy of each job in
    memory instead of two. The copy is shallow, so it shares kopf's nested dicts."""
    if last.job.get("metadata") is watched.get("metadata"):
        return last  # already shared
    watched_rv, written_rv = _resource_version(watched), _resource_version(last.job)
    if watched_rv is None or written_rv is None or watched_rv < written_rv:
        return last
    return replace(last, job=dict(watched))


def _until_next_full(last: Reconciled) -> float:
    """Seconds until the next full reconciliation without a watch event."""
    if last.requeue_after is not None:
        return min(last.requeue_after, RESYNC_SECONDS)
    # A finished job without a TTL changes only when someone edits it (an event).
    return math.inf if last.finished else RESYNC_SECONDS


async def _read_progress(rt: Runtime, pod_ip: str, logger: JobLogger) -> Progress | None:
    try:
        return await rt.reader.read(pod_ip)
    except ProgressError as exc:
        # Expected while the trainer starts up; status keeps the last progress.
        rt.metrics.progress_poll_errors.inc()
        logger.debug("progress not readable: %s", exc)
        return None


async def poll_progress(rt: Runtime, last: Reconciled, logger: JobLogger) -> Reconciled | None:
    """Between reconciliations: copy the trainer's progress into status (rate-limited).

    Returns None when the job needs a full reconciliation (it is gone).
    """
    assert last.pod_ip is not None
    live = await _read_progress(rt, last.pod_ip, logger)
    if live is None:
        return last
    patch = reconcile.progress_patch(
        last.job, live, _now(), rt.settings.status_min_interval_seconds
    )
    if not patch:
        return last
    meta = last.job.get("metadata") or {}
    updated = await rt.kube.patch_job_status(str(meta["namespace"]), str(meta["name"]), patch)
    if updated is None:
        return None
    rt.metrics.observe_job(updated)
    return replace(last, job=updated)


async def reconcile_job(
    rt: Runtime,
    namespace: str,
    name: str,
    logger: JobLogger,
    *,
    poll_progress: bool,
    seen: Mapping[str, Any] | None = None,
    parse: Callable[[Mapping[str, Any]], reconcile.ParsedSpec | None] | None = None,
) -> Reconciled | None:
    """One full reconciliation; None if the job is gone.

    `seen`: the job as the watch (or our last write) showed it; its pods then come
    from the pod cache. Without it, both are read from the API and the cache is
    brought up to date. `parse`: the job's spec as parsed
    before (JobState.parsed_spec), instead of validating it again.
    """
    job: Mapping[str, Any]
    if seen is None:
        got = await rt.kube.get_job(namespace, name)
        if got is None:
            return None
        job = got
        ref = _ref(job)
        pods = await rt.kube.list_job_pods(ref)
        rt.replace_pods(ref.uid, pods)
    else:
        job = seen
        ref = _ref(job)
        pods = rt.job_pods(ref.uid)
    parsed = parse(job) if parse is not None else None
    observed = reconcile.Observed(job, pods, _now(), parsed=parsed)
    decision = reconcile.decide(observed, rt.settings)
    # decide() asks for the facts that cost a call: the trainer's progress while one runs
    # (when it is due), the Secrets and running jobs when an attempt may start.
    if decision.progress_ip and poll_progress:
        live = await _read_progress(rt, decision.progress_ip, logger)
        if live is not None:
            observed = replace(observed, progress=live)
            decision = reconcile.decide(observed, rt.settings)
    if decision.needs_facts:
        async with rt.namespace_locks[namespace]:
            missing = [
                (path, secret)
                for path, secret in reconcile.secret_refs(job.get("spec") or {})
                if not await rt.kube.secret_exists(namespace, secret)
            ]
            active = await _active_jobs(rt, namespace, exclude=ref.uid)
            observed = replace(observed, missing_secrets=missing, active_in_namespace=active)
            decision = reconcile.decide(observed, rt.settings)
            decision, written = await execute(rt, observed, decision, logger)
    else:
        decision, written = await execute(rt, observed, decision, logger)

    if decision.delete_job:
        return None  # deleted after its TTL: no more passes
    if decision.phase == api.Phase.QUEUED:
        rt.queued[namespace].add(name)
    else:
        rt.queued[namespace].discard(name)
    return Reconciled(
        job=written, pod_ip=decision.progress_ip, requeue_after=decision.requeue_after
    )


async def _active_jobs(rt: Runtime, namespace: str, *, exclude: str) -> int:
    """Other LoRAJobs of the namespace with a live trainer pod.

    Counted from the pod cache once the pod watch has listed the namespace (a
    queue of jobs waiting for a slot would otherwise list every pod of the
    namespace once per job, each time a slot frees), from the API before that.
    The count stays exact under the namespace lock either way: a pass caches the
    pod it creates before it lets go of the lock. A pod that ended but whose
    event is still on its way is counted a moment too long: a job waits, never
    one too many runs."""
    if policy.concurrency_limit(rt.settings.policy, namespace) is None:
        return 0
    uids: set[str | None]
    if None in rt.listed_scopes or namespace in rt.listed_scopes:
        uids = {
            job_uid
            for job_uid, pods in rt.pods.items()
            if any(_namespace(p) == namespace and is_live(p) for p in pods.values())
        }
    else:
        uids = {
            (p.get("metadata") or {}).get("labels", {}).get(objects.LABEL_JOB_UID)
            for p in await rt.kube.list_trainer_pods(namespace)
            if is_live(p)
        }
    uids.discard(exclude)
    uids.discard(None)
    return len(uids)


async def execute(
    rt: Runtime,
    observed: reconcile.Observed,
    decision: reconcile.Decision,
    logger: JobLogger,
) -> tuple[reconcile.Decision, Mapping[str, Any]]:
    """Carry out `decide(observed)`'s decision: pods first, then status, then Events
    and metrics. Returns the decision carried out (create_rejected's, when the API
    server refused the pod) and the job as written.

    The order makes every crash point safe: a pod created before a lost status
    write is adopted next time (by its attempt label); Events go out only for
    transitions that reached status, so none is posted twice.
    """
    job = observed.job
    meta = job.get("metadata") or {}
    namespace, name = str(meta["namespace"]), str(meta["name"])
    for delete in decision.delete:
        logger.info("deleting pod %s (%s)", delete.name, delete.reason)
        await rt.kube.delete_pod(namespace, delete.name, rt.settings.termination_grace_seconds)
    if decision.create is not None:
        create = decision.create
        try:
            created = await rt.kube.create_pod(namespace, create.body)
            if created is not None:
                # The next pass must see the pod even if its watch event is late.
                rt.remember_pod(created, newer=False)
            logger.info(
                "pod %s for attempt %d %s",
                create.body["metadata"]["name"],
                create.attempt,
                "created" if created is not None else "already existed",
            )
        except QuotaExceeded as exc:
            decision = reconcile.create_rejected(observed, rt.settings, str(exc), quota=True)
        except PodRejected as exc:
            decision = reconcile.create_rejected(observed, rt.settings, str(exc), quota=False)
    written: Mapping[str, Any] = job
    if decision.status:
        written = await rt.kube.patch_job_status(namespace, name, decision.status) or job
    now = observed.now
    for event in decision.events:
        await rt.kube.post_event(
            namespace, build_event(job, event.type, event.reason, event.message, now)
        )
        log_fn = logger.warning if event.type == "Warning" else logger.info
        log_fn("%s: %s", event.reason, scrub(event.message))
    rt.metrics.record(decision.tallies)
    rt.metrics.observe_job(written)  # phase and per-job series, from the status written
    if decision.delete_job:
        await rt.kube.delete_job(namespace, name)
    return decision, written


def _ref(job: Mapping[str, Any]) -> objects.JobRef:
    meta = job.get("metadata") or {}
    return objects.JobRef(
        name=str(meta.get("name")), namespace=str(meta.get("namespace")), uid=str(meta.get("uid"))
    )


def _now() -> datetime:
    return datetime.now(UTC)


# --------------------------------------------------------------------------- deletion


@kopf.on.delete(api.GROUP, api.VERSION, api.PLURAL)
async def job_deleted(body: kopf.Body, **_: Any) -> None:
    """Finalizer: stop the trainer pods (they checkpoint on SIGTERM) and wait until
    they are gone. The adapter and checkpoints in object storage are kept.

    Waits in the handler for as long as a trainer may take to checkpoint and stop,
    then lets kopf retry (a TemporaryError), so a stuck node never blocks forever
    silently.
    """
    rt = runtime()
    ref = _ref(body)
    jlog = job_logger(ref.namespace, ref.name)
    deadline = time.monotonic() + rt.settings.termination_grace_seconds + POD_GONE_SLACK
    while pods := await rt.kube.list_job_pods(ref):
        for pod in pods:
            meta = pod.get("metadata") or {}
            if not meta.get("deletionTimestamp"):
                jlog.info("deleting pod %s (the LoRAJob is being deleted)", meta.get("name"))
                await rt.kube.delete_pod(
                    ref.namespace, str(meta.get("name")), rt.settings.termination_grace_seconds
                )
        if time.monotonic() > deadline:
            raise kopf.TemporaryError(
                f"{len(pods)} trainer pod(s) still stopping", delay=POD_GONE_RECHECK
            )
        await asyncio.sleep(POD_GONE_POLL)
    rt.metrics.forget(ref.namespace, ref.name)
    jlog.info("trainer pods removed; the adapter in object storage is kept")
