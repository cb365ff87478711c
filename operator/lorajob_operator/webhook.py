"""Validating admission for LoRAJobs: bad specs are refused at `kubectl apply` time.

The rules are the operator's own (api.parse_spec, policy.check_policy, the
spec-change rule of reconcile.py), so the webhook and the operator never
disagree; without the webhook the operator applies them when it reconciles.
Enabled by LORAJOB_WEBHOOK_ENABLED; kopf's WebhookServer serves it at
`/<handler id>` (`/lorajob`) with the certificate in LORAJOB_WEBHOOK_CERT_FILE/KEY_FILE.
The ValidatingWebhookConfiguration is either kopf's (LORAJOB_WEBHOOK_MANAGED, named
MANAGED_CONFIGURATION, caBundle = the certificate) or the Helm chart's.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import kopf

from lorajob_operator import api, policy
from lorajob_operator.settings import OperatorSettings

__all__ = ["configure", "register", "review"]

MANAGED_CONFIGURATION = f"lorajob-validation.{api.GROUP}"
HANDLER_ID = "lorajob"  # kopf serves the webhook at /<HANDLER_ID>
# How kopf logs the AdmissionError a denial raises (execution.py: PermanentError).
_KOPF_DENIAL = f"Webhook {HANDLER_ID!r} failed permanently: "
# Phases in which a pod may be running with the spec it started with.
_ACTIVE_PHASES = frozenset({api.Phase.PENDING, api.Phase.QUEUED, api.Phase.RUNNING})


def review(
    operation: str,
    new: Mapping[str, Any],
    old: Mapping[str, Any] | None,
    namespace: str,
    settings: OperatorSettings,
) -> str | None:
    """Why the LoRAJob must be refused, or None to admit it."""
    if operation not in ("CREATE", "UPDATE"):
        return None
    new_spec = new.get("spec") or {}
    if operation == "UPDATE" and old is not None and (old.get("spec") or {}) == new_spec:
        return None  # metadata-only change (labels, finalizers): nothing to check
    try:
        spec = api.parse_spec(new_spec)
    except api.InvalidSpecError as err:
        return f"invalid LoRAJob spec: {err.message}"
    problems = policy.check_policy(spec, namespace, settings.policy, settings)
    if problems:
        return "the LoRAJob violates the cluster policy: " + "; ".join(problems)
    if operation == "UPDATE" and old is not None:
        return _spec_change_problem(spec, old)
    return None


def _spec_change_problem(spec: api.LoRAJobSpec, old: Mapping[str, Any]) -> str | None:
    status = old.get("status") or {}
    old_spec = old.get("spec") or {}
    phase = status.get("phase")
    running_hash = status.get("specHash")
    if not running_hash or api.spec_hash(spec) == running_hash:
        return None  # never started, or only control fields (suspend, ...) changed
    if phase in (api.Phase.SUCCEEDED, api.Phase.FAILED):
        return (
            f"the LoRAJob has finished ({phase}); its spec can no longer change. "
            "Create a new LoRAJob to train again"
        )
    # status.podName is set exactly while an attempt's pod runs (or may still run).
    attempt_open = phase in _ACTIVE_PHASES and bool(status.get("podName"))
    if attempt_open and old_spec.get("suspend") is not True and not spec.suspend:
        return (
            "the LoRAJob is running and its spec cannot change under a running trainer: "
            "suspend the job (spec.suspend: true) to change its spec, or create a new job"
        )
    return None


def register(settings: OperatorSettings, registry: kopf.OperatorRegistry | None = None) -> None:
    """Register the handler only when enabled: kopf refuses to start with
    admission handlers but no server."""
    if not settings.webhook_enabled:
        return

    def validate_lorajob(
        body: kopf.Body, namespace: str | None, subresource: str | None, **kwargs: Any
    ) -> None:
        if subresource:  # status writes are the operator's own
            return
        previous = kwargs.get("old")
        problem = review(
            str(kwargs.get("operation") or ""), body, previous, namespace or "", settings
        )
        if problem:
            raise kopf.AdmissionError(problem, code=422)

    kopf.on.validate(
        api.GROUP,
        api.VERSION,
        api.PLURAL,
        id=HANDLER_ID,
        operations=["CREATE", "UPDATE"],
        registry=registry,
    )(validate_lorajob)


def denials_are_info(record: logging.LogRecord) -> bool:
    """Log kopf's line for a refused LoRAJob at INFO, not ERROR: the spec was the user's
    mistake, answered with a clear message, not a fault of the operator. The line stays
    one line (kopf logs no traceback for it) and keeps the message the user got."""
    message = str(record.msg)
    if record.levelno == logging.ERROR and message.startswith(_KOPF_DENIAL):
        record.levelno, record.levelname = logging.INFO, "INFO"
        record.msg = "admission refused: " + message.removeprefix(_KOPF_DENIAL)
    return True


def configure(kopf_settings: kopf.OperatorSettings, settings: OperatorSettings) -> None:
    """Point kopf's admission server at our port (called from the startup handler)."""
    if not settings.webhook_enabled:
        return
    logging.getLogger("kopf.objects").addFilter(denials_are_info)
    kopf_settings.admission.server = kopf.WebhookServer(
        addr="0.0.0.0",
        port=settings.webhook_port,
        host=settings.webhook_host,
        certfile=settings.webhook_cert_file,
        pkeyfile=settings.webhook_key_file,
    )
    if settings.webhook_managed:
        # kopf creates and keeps up to date the ValidatingWebhookConfiguration;
        # otherwise the Helm chart renders it (with cert-manager's CA).
        kopf_settings.admission.managed = MANAGED_CONFIGURATION
