"""kopf wiring: the operator's handlers, registered by `register(settings, registry)`.

kopf runs the process: the job watch, the finalizer, startup and cleanup, liveness,
the admission webhook. Everything else is the controller's (controller.py: the work
queue and the passes over jobs) and the informer's (informer.py: the job and pod
caches). A job's watch event goes to `Controller.job_event`; its deletion to
`Controller.finalize`. Nothing runs at import: `python -m lorajob_operator`
(__main__.py) loads the settings once and registers the handlers with kopf's default
registry (where kopf keeps its own login handlers), and `kopf run -m
lorajob_operator.kopf_app` does the same for kopf's command line.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Iterable
from typing import Any

import kopf

from lorajob_operator import api, webhook
from lorajob_operator.controller import Controller, PodsStillStopping
from lorajob_operator.kube import Kube, TokenBucket, load_config
from lorajob_operator.metrics import Metrics
from lorajob_operator.settings import OperatorSettings
from lorajob_operator.trainer_progress import ProgressReader

__all__ = ["ANNOTATION_PREFIX", "FINALIZER", "NoDiffBase", "Operator", "register"]

ANNOTATION_PREFIX = f"kopf.{api.GROUP}"
FINALIZER = f"{api.GROUP}/finalizer"

log = logging.getLogger("lorajob_operator")


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


def configure_kopf(kopf_settings: kopf.OperatorSettings, settings: OperatorSettings) -> None:
    """How kopf runs this operator (see the comments)."""
    # kopf's bookkeeping goes to annotations: `status` is our API and only ours.
    kopf_settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
        prefix=ANNOTATION_PREFIX
    )
    kopf_settings.persistence.diffbase_storage = NoDiffBase()
    kopf_settings.persistence.finalizer = FINALIZER
    # We post our own Events for every transition; kopf adds one only for warnings
    # (e.g. a handler that raised).
    kopf_settings.posting.level = logging.WARNING
    # Watches: reconnect quickly after an API server restart, and re-list every
    # few minutes so a silently dropped stream cannot hide changes for long.
    kopf_settings.watching.connect_timeout = 10
    kopf_settings.watching.server_timeout = 300
    kopf_settings.watching.client_timeout = 330
    kopf_settings.watching.reconnect_backoff = 1.0
    # (kopf 1.45 calls these `queueing`; its time-based batch window is gone.)
    kopf_settings.queueing.idle_timeout = 5.0
    kopf_settings.queueing.exit_timeout = 10.0
    kopf_settings.execution.max_workers = 8
    kopf_settings.peering.standalone = True
    kopf_settings.peering.mandatory = False
    webhook.configure(kopf_settings, settings)
    # kopf logs every successful handler call at INFO; with a watch handler on
    # every trainer pod that drowns what matters. Our own messages keep INFO.
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    # API Priority and Fairness answers 429 with Retry-After under load: kopf obeys
    # it (as kube.py does) and logs the retry, which is flow control, not an error.
    kopf_settings.networking.enforce_retry_after = True
    logging.getLogger("kopf.objects").addFilter(_throttled_retries_are_warnings)


class Operator:
    """The handlers of one operator process, over its controller (made at startup).

    The trigger handlers are `async def` on purpose: kopf runs plain `def` handlers
    in a thread pool, and the work queue must be used from the event loop's thread.
    """

    def __init__(self, settings: OperatorSettings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.controller: Controller | None = None

    def _controller(self) -> Controller:
        if self.controller is None:
            raise kopf.TemporaryError("the operator is still starting", delay=1)
        return self.controller

    async def startup(self, settings: kopf.OperatorSettings, logger: kopf.Logger, **_: Any) -> None:
        configure_kopf(settings, self.settings)
        load_config()
        try:
            self.metrics.serve(self.settings.metrics_port)
        except OSError as exc:  # e.g. the port is taken: run on, without metrics
            logger.error("cannot serve metrics on :%d: %s", self.settings.metrics_port, exc)
        limiter = TokenBucket(self.settings.api_qps, self.settings.api_burst)
        self.controller = Controller(
            settings=self.settings,
            kube=Kube(limiter=limiter, metrics=self.metrics),
            metrics=self.metrics,
            reader=ProgressReader(self.settings.progress_port),
        )
        self.controller.start()
        # What is loaded by now (modules, kopf, the API client) lives as long as the
        # process: keep it out of the collector's full passes, which otherwise walk
        # it again every time the heap has grown by a quarter.
        gc.freeze()
        logger.info(
            "lorajob operator ready: metrics on :%d, progress every %gs",
            self.settings.metrics_port,
            self.settings.progress_interval_seconds,
        )

    async def cleanup(self, **_: Any) -> None:
        if self.controller is not None:
            await self.controller.stop()

    def probe_jobs(self, **_: Any) -> int:
        """Liveness detail: how many LoRAJobs this operator follows."""
        return len(self.controller.states) if self.controller else 0

    async def job_event(
        self, type: str, body: kopf.Body, name: str, namespace: str | None, **_: Any
    ) -> None:
        if self.controller is not None and namespace is not None:
            self.controller.job_event(type, body, namespace, name)

    async def job_deleted(self, body: kopf.Body, **_: Any) -> None:
        """Finalizer: the controller stops the trainer pods and waits until they are
        gone; kopf retries when they take longer than their grace period."""
        try:
            await self._controller().finalize(body)
        except PodsStillStopping as exc:
            raise kopf.TemporaryError(str(exc), delay=exc.retry_after) from exc


def register(settings: OperatorSettings, registry: kopf.OperatorRegistry | None = None) -> Operator:
    """Register the operator's handlers (and the admission webhook, when enabled) with
    `registry` (kopf's default one for None). The ids are the handlers' historical
    names: kopf keys its annotations by them (a deletion under way survives an upgrade)."""
    op = Operator(settings)
    jobs = (api.GROUP, api.VERSION, api.PLURAL)
    kopf.on.startup(id="configure", registry=registry)(op.startup)
    kopf.on.cleanup(id="cleanup", registry=registry)(op.cleanup)
    kopf.on.probe(id="jobs", registry=registry)(op.probe_jobs)
    kopf.on.event(*jobs, id="job_event", registry=registry)(op.job_event)
    kopf.on.delete(*jobs, id="job_deleted", registry=registry)(op.job_deleted)
    webhook.register(settings, registry)
    return op
