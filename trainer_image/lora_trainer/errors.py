"""Failures the trainer knows how to explain, and how unknown ones are classified.

Every failure ends as one `TrainerError`: a `Reason`, a message that says
what happened, a hint that says what to change, and (through the reason) the
exit code the operator uses to decide whether a retry can help. Secret values
are scrubbed from every message before it can reach a log or the termination
message.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

from loraops_contract.protocol import (
    ENV_HF_TOKEN,
    ENV_S3_ACCESS_KEY,
    ENV_S3_SECRET_KEY,
    ENV_S3_SESSION_TOKEN,
    PERMANENT_EXIT_CODES,
    REASON_EXIT_CODES,
    RENDEZVOUS_PORT,
    ExitCode,
)
from loraops_contract.reasons import Reason

__all__ = [
    "ConfigError",
    "CredentialsError",
    "DatasetError",
    "Interrupted",
    "OutOfMemory",
    "PeerLost",
    "PolicyViolation",
    "RendezvousFailed",
    "SourceNotFound",
    "StorageError",
    "TargetModulesNotFound",
    "TrainerError",
    "classify",
    "scrub",
    "shorten",
]

SECRET_ENV_VARS = (ENV_S3_ACCESS_KEY, ENV_S3_SECRET_KEY, ENV_S3_SESSION_TOKEN, ENV_HF_TOKEN)
_REDACTED = "***"
# Token shapes that must never be shown even when they are not in our env
# (e.g. a token pasted into a URI): Hub tokens and AWS access key ids.
_TOKEN_PATTERNS = (
    re.compile(r"hf_[A-Za-z0-9]{20,}"),
    re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b"),
)


def scrub(text: str, secrets: Iterable[str] | None = None) -> str:
    """Replace every secret value (from the env, or given) and token-shaped string."""
    values = list(secrets) if secrets is not None else []
    values += [os.environ.get(name, "") for name in SECRET_ENV_VARS]
    # Longest first, so a secret containing another is replaced whole; very short
    # values are skipped because replacing them would mangle ordinary text.
    for value in sorted({v for v in values if len(v) >= 4}, key=len, reverse=True):
        text = text.replace(value, _REDACTED)
    for pattern in _TOKEN_PATTERNS:
        text = pattern.sub(_REDACTED, text)
    return text


class TrainerError(Exception):
    """A failure with a reason, a user-facing message and a hint."""

    reason: Reason = Reason.INTERNAL_ERROR
    default_hint: str | None = None

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.message = scrub(message)
        self.hint = hint if hint is not None else self.default_hint
        super().__init__(self.message)

    @property
    def exit_code(self) -> ExitCode:
        return REASON_EXIT_CODES[self.reason]

    @property
    def retryable(self) -> bool:
        return self.exit_code not in PERMANENT_EXIT_CODES


class ConfigError(TrainerError):
    reason = Reason.INVALID_SPEC
    default_hint = "Fix the named field(s) in the LoRAJob spec and resubmit."


class PolicyViolation(TrainerError):
    """The spec breaks the cluster admin's policy in a way only the trainer can see
    (e.g. a storage endpoint whose name resolves to a private address)."""

    reason = Reason.POLICY_VIOLATION
    default_hint = "Change the named field to fit the cluster policy, or ask your admin."


class DatasetError(TrainerError):
    reason = Reason.INVALID_DATASET
    default_hint = (
        "Each record must be one of: {text}, {instruction,input,output} (alpaca), "
        "{messages:[{role,content}]} or {prompt,completion}; set spec.dataset.format to "
        "force one."
    )


class TargetModulesNotFound(TrainerError):
    reason = Reason.TARGET_MODULES_NOT_FOUND


class CredentialsError(TrainerError):
    reason = Reason.CREDENTIALS_ERROR
    default_hint = (
        "Check spec.storage.credentialsSecret / hfTokenSecret: the Secret must hold valid "
        "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or HF_TOKEN) with access to this location."
    )


class SourceNotFound(TrainerError):
    reason = Reason.SOURCE_NOT_FOUND
    default_hint = "Check the URI (bucket, prefix, repository and revision) for typos."


class StorageError(TrainerError):
    reason = Reason.STORAGE_ERROR
    default_hint = (
        "A storage or network error. The operator retries up to spec.backoffLimit times; "
        "if it persists, check spec.storage.endpoint and that the pod can reach it."
    )


class OutOfMemory(TrainerError):
    reason = Reason.CUDA_OUT_OF_MEMORY
    default_hint = (
        "Lower spec.training.batchSize (raise gradientAccumulationSteps to keep the "
        "effective batch), enable spec.training.gradientCheckpointing, shorten "
        "spec.training.maxSeqLength, keep quantization.mode=nf4, or request a larger GPU."
    )


class Interrupted(TrainerError):
    reason = Reason.INTERRUPTED
    default_hint = "The pod was asked to stop; the job resumes from the last checkpoint."


class PeerLost(TrainerError):
    """A collective step failed because another rank of the run went away (its process
    or its whole pod): retryable, and the message names the peer's address."""

    reason = Reason.INTERNAL_ERROR
    default_hint = (
        "Another rank of this run stopped (on this pod or another pod of the job; its pod "
        "says why). The next attempt resumes every rank from the last checkpoint."
    )


class RendezvousFailed(TrainerError):
    """The pods of a run on several nodes did not meet at the rendezvous store."""

    reason = Reason.INTERNAL_ERROR
    default_hint = (
        "The next attempt starts every pod again. If it keeps failing: the pods must resolve "
        "and reach the node-rank-0 pod's Service (<service>.<namespace>.svc, port "
        f"{RENDEZVOUS_PORT}: cluster DNS, NetworkPolicies), and nothing else in that pod may "
        "listen on the port."
    )


# What gloo and the c10d store say when the other end of a connection is gone.
_PEER_GONE = re.compile(r"Connection (closed|reset) by peer|gloo/transport|\bc10d\b")


def _is_a(exc: BaseException, class_name: str) -> bool:
    """Whether `exc` is an instance of a class named `class_name`: torch's errors are
    matched by name so that this module needs no torch."""
    return any(cls.__name__ == class_name for cls in type(exc).__mro__)


def _is_peer_lost(exc: BaseException) -> bool:
    # torch.distributed's errors (DistBackendError, DistNetworkError, DistStoreError)
    # share the base DistError.
    dist_error = _is_a(exc, "DistError")
    return dist_error or (isinstance(exc, RuntimeError) and bool(_PEER_GONE.search(str(exc))))


def classify(exc: BaseException) -> TrainerError:
    """Map any exception to a TrainerError (known ones keep their own reason)."""
    if isinstance(exc, TrainerError):
        return exc
    text = f"{type(exc).__name__}: {exc}"
    if _is_cuda_oom(exc):
        return OutOfMemory(f"CUDA out of memory: {shorten(str(exc))}")
    if isinstance(exc, MemoryError):
        return OutOfMemory(
            "the process ran out of host memory",
            hint="Request more memory (spec.resources.memory) or use a smaller model/batch.",
        )
    if _is_a(exc, "RendezvousError"):
        # torchrun's rendezvous errors say "see inner exception": quote that one too.
        cause = exc.__cause__
        inner = f" ({type(cause).__name__}: {cause})" if cause else ""
        return RendezvousFailed(
            f"the rendezvous with the run's other nodes failed: {shorten(text + inner)}"
        )
    if _is_peer_lost(exc):
        return PeerLost(f"lost contact with another rank of the run: {shorten(text)}")
    if isinstance(exc, ConnectionError | TimeoutError):
        return StorageError(f"network error: {text}")
    return TrainerError(
        f"unexpected error: {shorten(text)}",
        hint="This is likely a trainer bug; the logs have the full traceback.",
    )


def _is_cuda_oom(exc: BaseException) -> bool:
    name = type(exc).__name__
    return name == "OutOfMemoryError" or "CUDA out of memory" in str(exc)


# Longest exception text quoted in a message (the log has the whole traceback).
QUOTED_LIMIT = 500
_ELLIPSIS = "\u2026"
# Where a shortened message may end: after a sentence or clause, else between words.
_SENTENCE_END = re.compile(r"[.;:!?](?=\s)")


def shorten(text: str, limit: int = QUOTED_LIMIT) -> str:
    """`text` on one line, at most `limit` characters, cut where a sentence (or else a
    word) ends, with an ellipsis: the cause, which comes first, is kept whole.

    Exception texts span lines (a numbered list of what was tried, say); taking only the
    first line or the first N characters used to cut them mid-sentence.
    """
    flat = " ".join(text.split())
    if len(flat) <= limit:
        return flat
    room = flat[: max(1, limit - 2)]  # room for " \u2026"
    # A boundary in the first half would throw away most of the room: cut between words.
    floor = len(room) // 2
    sentences = [m.end() for m in _SENTENCE_END.finditer(room + " ") if m.end() > floor]
    if sentences:
        return room[: sentences[-1]] + " " + _ELLIPSIS
    space = room.rfind(" ")
    cut = room[:space] if space > floor else room
    return cut.rstrip(" ,;:") + _ELLIPSIS
