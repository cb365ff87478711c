"""Validating admission for LoRAJobs: bad specs are refused at `kubectl apply` time.

The rules are the operator's own (reconcile.parse_job_spec), so the
webhook and the operator never disagree; without the webhook the operator applies
them when it reconciles. Every valid spec change is admitted, whatever the job's
phase (a GitOps repository's spec is what eventually runs): the operator restarts a
running trainer, or runs a finished job again, as reconcile.py says. The webhook
only warns what an update will do (admission warnings: kubectl prints them), with
the field classes of api.spec_changes, the rule the operator follows too.
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

from lorajob_operator import api, reconcile
from lorajob_operator.settings import OperatorSettings

__all__ = ["change_warnings", "configure", "register", "review"]

MANAGED_CONFIGURATION = f"lorajob-validation.{api.GROUP}"
HANDLER_ID = "lorajob"  # kopf serves the webhook at /<HANDLER_ID>
# How kopf logs the AdmissionError a denial raises (execution.py: PermanentError).
_KOPF_DENIAL = f"Webhook {HANDLER_ID!r} failed permanently: "
_FINISHED = frozenset({api.Phase.SUCCEEDED, api.Phase.FAILED})
# Fields named in a warning before "and N more".
_NAMED = 3


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
    # The operator's own judgement of a spec (reconcile.parse_job_spec), in its words.
    parsed = reconcile.parse_job_spec(new_spec, namespace, settings)
    if parsed.error is not None:
        return f"invalid LoRAJob spec: {parsed.error.message}"
    if parsed.violations:
        return "the LoRAJob violates the cluster policy: " + "; ".join(parsed.violations)
    return None


def _named(paths: list[str]) -> str:
    shown = ", ".join(f"spec.{p}" for p in paths[:_NAMED])
    return shown + (f" and {len(paths) - _NAMED} more" if len(paths) > _NAMED else "")


def change_warnings(new: Mapping[str, Any], old: Mapping[str, Any] | None) -> list[str]:
    """What an admitted update does to a job that has started (for kubectl to print)."""
    status = (old or {}).get("status") or {}
    if old is None or not status.get("specHash"):
        return []  # never started: the first attempt runs whatever the spec says
    try:
        changes = api.spec_changes(
            api.parse_spec(old.get("spec") or {}), api.parse_spec(new.get("spec") or {})
        )
    except api.InvalidSpecError:
        return []  # an old spec that no longer parses: nothing to compare with
    if not changes.restarts:
        return []
    if changes.new_run:
        effect = (
            f"{_named(changes.new_run)} define the training run, so the job trains a new run "
            "from step 0 (its checkpoints apart from the old run's, which are deleted once "
            "the new run has one)"
        )
    else:
        effect = (
            f"{_named(changes.resumable)} changed; the job resumes from its last checkpoint "
            "with them"
        )
    phase = status.get("phase")
    if phase in _FINISHED:
        return [f"the LoRAJob has finished ({phase}) and runs again: {effect}"]
    if status.get("podName") and not (old.get("spec") or {}).get("suspend"):
        return [
            "the current attempt is stopped (a running trainer saves a checkpoint first) and "
            f"the next one runs this spec: {effect}"
        ]
    return [f"the next attempt applies this change: {effect}"]


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
        operation = str(kwargs.get("operation") or "")
        problem = review(operation, body, previous, namespace or "", settings)
        if problem:
            raise kopf.AdmissionError(problem, code=422)
        warnings = kwargs.get("warnings")  # kopf's list: kubectl prints what we add
        if operation == "UPDATE" and isinstance(warnings, list):
            warnings.extend(change_warnings(body, previous))

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
