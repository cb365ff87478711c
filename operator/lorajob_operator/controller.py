"""The controller: passes over LoRAJobs from one work queue, and their execution.

LoRAJobs are reconciled from a shared work queue (workqueue.WorkQueue, in the manner
of controller-runtime), not one task per job: a job's watch events (handlers.py hands
them to `Controller.job_event`) and its trainer pods' (the informer wakes the job) put
the job's key in the queue; a fixed pool of WORKERS takes keys and runs one pass each
(`process`): `reconcile.decide()` says what to do, `execute` does it through kube.py.
A key is queued once however many events arrive, and one job never has two passes at
once, so all writes for one job happen in order. Each pass queues the job's next turn:
at the decision's requeue time, at the next progress read while the trainer runs
(every `progress_interval_seconds`), after a backoff when it failed, and every
RESYNC_SECONDS at the latest. Routine pod events queue it DEBOUNCE_SECONDS later. A
new job's first pass waits behind known jobs' passes (one turn in
workqueue.NEW_KEY_EVERY while both wait), so in a burst of new jobs the running ones'
status stays current and a new job is never starved.

A pass reads the job and its pods from the informer's caches (informer.py), not from
the API, except where that view may be incomplete: see `_cached_view`. All of this is
only a copy: kopf's initial listing at startup delivers every existing job, which
queues it, and the first pass of a job that has had an attempt reads the API; that is
how an operator restart resumes: from the objects, not from memory. A deleted job's
pods are stopped by `finalize` (kopf's finalizer); the queue drops a job when its
DELETED event arrives.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from loraops_contract.protocol import Progress

from lorajob_operator import api, objects, podwatch, policy, reconcile
from lorajob_operator.backoff import exponential
from lorajob_operator.conditions import scrub
from lorajob_operator.events import build_event
from lorajob_operator.informer import Informer, JobKey, compare_versions, is_newer
from lorajob_operator.kube import Kube, PodRejected, QuotaExceeded
from lorajob_operator.metrics import Metrics
from lorajob_operator.pods import is_live
from lorajob_operator.settings import OperatorSettings
from lorajob_operator.trainer_progress import ProgressError, ProgressReader
from lorajob_operator.workqueue import WorkQueue

__all__ = [
    "Controller",
    "JobState",
    "PodsStillStopping",
    "Reconciled",
    "execute",
    "job_logger",
    "poll_progress",
    "process",
    "reconcile_job",
]

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
# Passes of different jobs run concurrently on this many workers (one job never has
# two at once). API calls are bounded by kube.MAX_CONNECTIONS anyway; the pool is
# larger so that progress reads of unreachable trainers (up to ProgressReader's 3 s
# timeout each) cannot hold every worker, and so that in a burst a job's follow-up
# pass (its pod went Running) waits less behind new jobs' first passes (which the
# queue also takes only when no follow-up waits). 1,000-job burst, status lag p50:
# ~14 s with 64 workers and one lane, ~8 s with 256 and one lane, 0.25 s with both.
WORKERS = 256

log = logging.getLogger("lorajob_operator")
JobLogger = logging.LoggerAdapter[logging.Logger]


class _JobLogger(logging.LoggerAdapter[logging.Logger]):
    def process(self, msg: str, kwargs: Any) -> tuple[str, Any]:
        return f"[{self.extra['job'] if self.extra else '?'}] {msg}", kwargs


def job_logger(namespace: str, name: str) -> JobLogger:
    """Messages about one job, prefixed like kopf's: `[namespace/name] ...`."""
    return _JobLogger(log, {"job": f"{namespace}/{name}"})


class PodsStillStopping(Exception):
    """The deleted job's trainer pods have not stopped within their grace period."""

    def __init__(self, count: int) -> None:
        super().__init__(f"{count} trainer pod(s) still stopping")
        self.retry_after = POD_GONE_RECHECK


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


@dataclass
class JobState:
    """What the controller remembers about one LoRAJob between passes; all of it
    can be rebuilt from the objects (a restart starts from none of it)."""

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
            namespace = str(meta.get("namespace"))
            self.parsed = (key, reconcile.parse_job_spec(spec, namespace, settings))
        return self.parsed[1]


@dataclass
class Controller:
    """One operator's controller: the informer, the work queue and each job's state.
    Nothing here must survive a restart."""

    settings: OperatorSettings
    kube: Kube
    metrics: Metrics
    reader: ProgressReader
    informer: Informer = field(init=False)
    # Every LoRAJob the job watch has shown, and the queue of those due a pass.
    states: dict[JobKey, JobState] = field(default_factory=dict)
    queue: WorkQueue[JobKey] = field(default_factory=WorkQueue)
    queued: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    # Held while a job counts its namespace's running jobs and creates a pod, so
    # two jobs never both take the last slot of a concurrency limit.
    namespace_locks: dict[str, asyncio.Lock] = field(
        default_factory=lambda: defaultdict(asyncio.Lock)
    )
    pod_watches: list[asyncio.Task[None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.informer = Informer(
            self.metrics, lambda key, urgent: self.wake(key, urgent=urgent), self.wake_queued
        )

    # -- lifecycle

    def start(self) -> None:
        """Start the workers and the pod reflectors (one per watched namespace, what
        namespaced RBAC allows, or one for all), before kopf's first listing is
        processed: its events queue every existing job."""
        self.queue.start(functools.partial(process, self), WORKERS)
        self.pod_watches = [
            asyncio.create_task(
                podwatch.follow_pods(self.kube, self.informer, namespace), name="pod-watch"
            )
            for namespace in pod_watch_scopes(self.settings)
        ]

    async def stop(self) -> None:
        for task in self.pod_watches:
            task.cancel()
        await asyncio.gather(*self.pod_watches, return_exceptions=True)
        await self.queue.stop()
        await self.reader.close()
        await self.kube.close()

    # -- job events (from kopf's watch)

    def job_event(self, type: str, body: Mapping[str, Any], namespace: str, name: str) -> None:
        """Keep the job's latest body; queue a pass for a job seen for the first time
        and on spec or metadata changes (not on our own status writes)."""
        key = (namespace, name)
        if type == "DELETED":
            self.forget_job(key, _uid(body))
            self.queued[namespace].discard(name)
            self.metrics.forget(namespace, name)
            return
        known = key in self.states
        state = self.watch_job(key, body)
        status = body.get("status") or {}
        meta = body.get("metadata") or {}
        generation = meta.get("generation")
        # A spec no pass has taken up yet: not written back as observedGeneration, nor
        # parsed by a pass under way (kopf's finalizer write, which has no status yet,
        # comes back while the job's first pass runs: no second pass for it).
        changed = generation not in (status.get("observedGeneration"), state.parsed_generation)
        if known and (changed or meta.get("deletionTimestamp")):
            self.wake(key)

    def watch_job(self, key: JobKey, body: Mapping[str, Any]) -> JobState:
        """Record the job as the watch shows it; a job seen for the first time (the
        startup listing, a new job, one recreated under the same name) is queued."""
        state = self.states.get(key)
        if self.informer.job_changed(key, body) or state is None:
            state = self.states[key] = JobState()
            if not _has_attempts(body):
                # No attempt yet: its only pods are the ones its passes create (a
                # create replayed after a crash finds its pod by name, 409), so its
                # first pass can trust the watch instead of a GET and a LIST.
                state.next_resync = time.monotonic() + RESYNC_SECONDS
            self.queue.add(key, new=True)
        return state

    def forget_job(self, key: JobKey, job_uid: str) -> None:
        """The job is gone from the API: no more passes, no timers, no cached pods."""
        self.states.pop(key, None)
        self.queue.forget(key)
        self.informer.job_deleted(key, job_uid)

    def wake(self, key: JobKey, *, urgent: bool = True) -> None:
        """Ask for a full pass of a known job: now, or (not urgent) after
        DEBOUNCE_SECONDS so the rest of a burst of routine events is in it too.
        A job's first pass is never delayed."""
        state = self.states.get(key)
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

    # -- deletion

    async def finalize(self, body: Mapping[str, Any]) -> None:
        """Stop a deleted job's trainer pods (they checkpoint on SIGTERM) and wait
        until they are gone; the adapter and checkpoints in object storage are kept.

        Waits as long as a trainer may take to checkpoint and stop, then raises
        PodsStillStopping (kopf retries), so a stuck node never blocks forever silently.
        """
        ref = _ref(body)
        jlog = job_logger(ref.namespace, ref.name)
        grace = self.settings.termination_grace_seconds
        deadline = time.monotonic() + grace + POD_GONE_SLACK
        while pods := await self.kube.list_job_pods(ref):
            for pod in pods:
                meta = pod.get("metadata") or {}
                if not meta.get("deletionTimestamp"):
                    jlog.info("deleting pod %s (the LoRAJob is being deleted)", meta.get("name"))
                    await self.kube.delete_pod(ref.namespace, str(meta.get("name")), grace)
            if time.monotonic() > deadline:
                raise PodsStillStopping(len(pods))
            await asyncio.sleep(POD_GONE_POLL)
        self.metrics.forget(ref.namespace, ref.name)
        jlog.info("trainer pods removed; the adapter in object storage is kept")


def pod_watch_scopes(settings: OperatorSettings) -> list[str | None]:
    """One pod watch per watched namespace (what namespaced RBAC allows), or one
    for all of them."""
    return list(settings.namespaces) if settings.namespaces else [None]


def _uid(body: Mapping[str, Any]) -> str:
    return str((body.get("metadata") or {}).get("uid", ""))


def _has_attempts(job: Mapping[str, Any]) -> bool:
    """Whether the job's status records a trainer pod (it may have pods we did not see)."""
    status = job.get("status") or {}
    return bool(status.get("attempts") or status.get("podName"))


# --------------------------------------------------------------------------- the passes


async def process(ctl: Controller, key: JobKey) -> None:
    """One turn of the work queue for one job (see the module docstring).

    A full reconciliation (decide, execute) runs when an event asked for one, when
    the decision's requeue time has come, and every RESYNC_SECONDS as a safety net.
    In between, while the trainer runs, only its progress is read and copied: pod
    changes always come with a watch event. The job and its pods are read from what
    the watches delivered whenever that is known to be complete; see _cached_view
    for when the API is asked instead. Ends by queueing the job's next turn.
    """
    state = ctl.states.get(key)
    watched = ctl.informer.jobs.get(key)
    if state is None or state.gone or watched is None:
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
            seen = None if now >= state.next_resync else _cached_view(ctl, watched, last)
            parse = functools.partial(state.parsed_spec, settings=ctl.settings)
            with ctl.metrics.reconcile_seconds.time():
                last = await reconcile_job(
                    ctl, namespace, name, jlog, poll_progress=poll, seen=seen, parse=parse
                )
            if last is None:
                state.gone = True  # its DELETED event removes the state
                return
            if seen is None:
                state.next_resync = now + RESYNC_SECONDS
            state.next_full = now + _until_next_full(last)
        elif poll and last.pod_ip:
            last = await poll_progress(ctl, last, jlog)
    except Exception as exc:
        state.errors += 1
        ctl.metrics.reconcile_errors.inc()
        delay = exponential(state.errors, ERROR_BACKOFF_MIN, ERROR_BACKOFF_MAX)
        jlog.warning("reconciliation failed (%s); retrying in %gs", exc, delay)
        state.last = None
        state.next_resync = 0.0  # after a failure, read everything from the API again
        ctl.queue.add_after(key, delay)  # an event brings the retry forward
        return
    state.errors = 0
    if last is None:  # the progress write found the job changed: reconcile now
        state.last, state.dirty = None, True
        ctl.queue.add(key)
        return
    state.last = last = _share_watched(ctl.informer.jobs.get(key, watched), last)
    if last.pod_ip and poll:
        state.next_poll = now + ctl.settings.progress_interval_seconds
    wake_at = min(state.next_full, state.next_poll) if last.pod_ip else state.next_full
    if wake_at != math.inf:
        ctl.queue.add_after(key, wake_at - time.monotonic())


def _cached_view(
    ctl: Controller, watched: Mapping[str, Any], last: Reconciled | None
) -> Mapping[str, Any] | None:
    """The job to reconcile without reading the API, or None to read it.

    The job is the newer of the watch's body and the one our last status write
    returned (the watch may not have delivered our own write yet). Its pods come
    from the pod cache, which is complete for pods this process created or saw
    listed; the API is asked when that cannot be trusted:

    * the job's versions do not compare (informer.compare_versions);
    * on the first pass since startup (or a failure) for a job that already has
      attempts (after an operator restart its pods may not have been listed by the
      watch yet; a new job's only pods are the ones its passes create, and a create
      replayed after a crash finds its pod by name, 409);
    * the current attempt's pod is not in the cache (not seen yet, or gone).
    """
    job: Mapping[str, Any] = dict(watched)  # a snapshot: kopf swaps the body on events
    if last is not None:
        order = compare_versions(_version(last.job), _version(job))
        if order is None:
            return None
        if order > 0:
            job = last.job
    if last is None and _has_attempts(job):
        return None
    pod_name = (job.get("status") or {}).get("podName")
    if pod_name and all(
        (p.get("metadata") or {}).get("name") != pod_name for p in ctl.informer.job_pods(_uid(job))
    ):
        return None
    return job


def _version(body: Mapping[str, Any]) -> str:
    return str((body.get("metadata") or {}).get("resourceVersion") or "")


def _share_watched(watched: Mapping[str, Any], last: Reconciled) -> Reconciled:
    """`last` holding the watch's body instead of our own write's response once the
    watch has delivered that write (or a later one): one copy of each job in
    memory instead of two. The copy is shallow, so it shares kopf's nested dicts."""
    if last.job.get("metadata") is watched.get("metadata"):
        return last  # already shared
    if (
        is_newer(last.job, watched)
        or compare_versions(_version(watched), _version(last.job)) is None
    ):
        return last
    return replace(last, job=dict(watched))


def _until_next_full(last: Reconciled) -> float:
    """Seconds until the next full reconciliation without a watch event."""
    if last.requeue_after is not None:
        return min(last.requeue_after, RESYNC_SECONDS)
    # A finished job without a TTL changes only when someone edits it (an event).
    return math.inf if last.finished else RESYNC_SECONDS


async def _read_progress(ctl: Controller, pod_ip: str, logger: JobLogger) -> Progress | None:
    try:
        return await ctl.reader.read(pod_ip)
    except ProgressError as exc:
        # Expected while the trainer starts up; status keeps the last progress.
        ctl.metrics.progress_poll_errors.inc()
        logger.debug("progress not readable: %s", exc)
        return None


async def poll_progress(ctl: Controller, last: Reconciled, logger: JobLogger) -> Reconciled | None:
    """Between reconciliations: copy the trainer's progress into status (rate-limited).

    Returns None when the job needs a full reconciliation (it is gone).
    """
    assert last.pod_ip is not None
    live = await _read_progress(ctl, last.pod_ip, logger)
    if live is None:
        return last
    patch = reconcile.progress_patch(
        last.job, live, _now(), ctl.settings.status_min_interval_seconds
    )
    if not patch:
        return last
    meta = last.job.get("metadata") or {}
    updated = await ctl.kube.patch_job_status(str(meta["namespace"]), str(meta["name"]), patch)
    if updated is None:
        return None
    ctl.metrics.observe_job(updated)
    return replace(last, job=updated)


async def reconcile_job(
    ctl: Controller,
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
        got = await ctl.kube.get_job(namespace, name)
        if got is None:
            return None
        job = got
        ref = _ref(job)
        pods = await ctl.kube.list_job_pods(ref)
        ctl.informer.replace_pods(ref.uid, pods)
    else:
        job = seen
        ref = _ref(job)
        pods = ctl.informer.job_pods(ref.uid)
    parsed = parse(job) if parse is not None else None
    observed = reconcile.Observed(job, pods, _now(), parsed=parsed)
    decision = reconcile.decide(observed, ctl.settings)
    # decide() asks for the facts that cost a call: the trainer's progress while one runs
    # (when it is due), the Secrets and running jobs when an attempt may start.
    if decision.progress_ip and poll_progress:
        live = await _read_progress(ctl, decision.progress_ip, logger)
        if live is not None:
            observed = replace(observed, progress=live)
            decision = reconcile.decide(observed, ctl.settings)
    if decision.needs_facts:
        async with ctl.namespace_locks[namespace]:
            missing = [
                (path, secret)
                for path, secret in reconcile.secret_refs(job.get("spec") or {})
                if not await ctl.kube.secret_exists(namespace, secret)
            ]
            active = await _active_jobs(ctl, namespace, exclude=ref.uid)
            observed = replace(observed, missing_secrets=missing, active_in_namespace=active)
            decision = reconcile.decide(observed, ctl.settings)
            decision, written = await execute(ctl, observed, decision, logger)
    else:
        decision, written = await execute(ctl, observed, decision, logger)

    if decision.delete_job:
        return None  # deleted after its TTL: no more passes
    if decision.phase == api.Phase.QUEUED:
        ctl.queued[namespace].add(name)
    else:
        ctl.queued[namespace].discard(name)
    return Reconciled(
        job=written, pod_ip=decision.progress_ip, requeue_after=decision.requeue_after
    )


async def _active_jobs(ctl: Controller, namespace: str, *, exclude: str) -> int:
    """Other LoRAJobs of the namespace with a live trainer pod.

    Counted from the pod cache once the pod watch has listed the namespace (a
    queue of jobs waiting for a slot would otherwise list every pod of the
    namespace once per job, each time a slot frees), from the API before that.
    The count stays exact under the namespace lock either way: a pass caches the
    pod it creates before it lets go of the lock. A pod that ended but whose
    event is still on its way is counted a moment too long: a job waits, never
    one too many runs."""
    if policy.concurrency_limit(ctl.settings.policy, namespace) is None:
        return 0
    cached = ctl.informer.live_jobs_in(namespace)
    uids: set[str | None] = (
        set(cached)
        if cached is not None
        else {
            (p.get("metadata") or {}).get("labels", {}).get(objects.LABEL_JOB_UID)
            for p in await ctl.kube.list_trainer_pods(namespace)
            if is_live(p)
        }
    )
    uids.discard(exclude)
    uids.discard(None)
    return len(uids)


async def execute(
    ctl: Controller,
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
        await ctl.kube.delete_pod(namespace, delete.name, ctl.settings.termination_grace_seconds)
    for gated in decision.ungate:
        logger.info("releasing pod %s (all pods of its group exist)", gated)
        await ctl.kube.remove_scheduling_gate(namespace, gated, objects.GANG_GATE)
    if decision.delete_service is not None:
        await ctl.kube.delete_service(namespace, decision.delete_service)
    if decision.create is not None:
        create = decision.create
        try:
            if create.service is not None:
                await ctl.kube.create_service(namespace, create.service)
            # Rank 0 first: it stands for the attempt (status.podName) if the rest fail.
            for body in (create.body, *create.more):
                created = await ctl.kube.create_pod(namespace, body)
                if created is not None:
                    # The next pass must see the pod even if its watch event is late.
                    ctl.informer.remember_pod(created, newer=False)
                logger.info(
                    "pod %s for attempt %d %s",
                    body["metadata"]["name"],
                    create.attempt,
                    "created" if created is not None else "already existed",
                )
        except QuotaExceeded as exc:
            decision = reconcile.create_rejected(observed, ctl.settings, str(exc), quota=True)
        except PodRejected as exc:
            decision = reconcile.create_rejected(observed, ctl.settings, str(exc), quota=False)
    written: Mapping[str, Any] = job
    if decision.status:
        written = await ctl.kube.patch_job_status(namespace, name, decision.status) or job
    now = observed.now
    for event in decision.events:
        await ctl.kube.post_event(
            namespace, build_event(job, event.type, event.reason, event.message, now)
        )
        log_fn = logger.warning if event.type == "Warning" else logger.info
        log_fn("%s: %s", event.reason, scrub(event.message))
    ctl.metrics.record(decision.tallies)
    ctl.metrics.observe_job(written)  # phase and per-job series, from the status written
    if decision.delete_job:
        await ctl.kube.delete_job(namespace, name)
    return decision, written


def _ref(job: Mapping[str, Any]) -> objects.JobRef:
    meta = job.get("metadata") or {}
    return objects.JobRef(
        name=str(meta.get("name")), namespace=str(meta.get("namespace")), uid=str(meta.get("uid"))
    )


def _now() -> datetime:
    return datetime.now(UTC)
