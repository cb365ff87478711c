"""Operator settings from the environment (`LORAJOB_*`); the Helm chart's values map onto them.

Scalars are plain env values (LORAJOB_PROGRESS_PORT=8080); lists, maps and the
policy are JSON (LORAJOB_POLICY='{"maxGpusPerJob": 8}'); LORAJOB_NAMESPACES also
takes a comma-separated list. Nested models accept camelCase and snake_case keys.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from pydantic_settings import SettingsError as _SourceError

from lorajob_operator import names
from lorajob_operator.api import DEFAULT_GPU_RESOURCE, Toleration
from lorajob_operator.policy import Policy

__all__ = ["ENV_PREFIX", "OperatorSettings", "SettingsError", "load_settings", "unknown_env_vars"]

ENV_PREFIX = "LORAJOB_"

# Env names the operator sets on the trainer itself; trainer_extra_env must not shadow them.
_RESERVED_ENV_PREFIXES = ("LORA_TRAINER_", "AWS_", "HF_TOKEN")


class OperatorSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="ignore", frozen=True, validate_default=True
    )

    # --- trainer pod ---------------------------------------------------------------
    trainer_image: str = "ghcr.io/loraops/lora-trainer:0.1.0"
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    image_pull_secrets: list[str] = Field(
        default_factory=list, description="Secrets (in each job namespace) for private registries."
    )
    trainer_service_account: str | None = Field(
        default=None,
        description="ServiceAccount of trainer pods (e.g. one bound to an IAM role); its API "
        "token is never mounted.",
    )
    runtime_class_name: str | None = Field(
        default=None, description="RuntimeClass for trainer pods (e.g. nvidia)."
    )
    gpu_resource_name: str = DEFAULT_GPU_RESOURCE
    gpu_product_label: str = Field(
        default="nvidia.com/gpu.product",
        description="Node label that resources.gpuProduct selects on (GPU feature discovery).",
    )
    default_gpu_tolerations: list[Toleration] = Field(
        default_factory=lambda: [
            Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")
        ],
        description="Added to pods that request GPUs (GPU nodes are usually tainted).",
    )
    default_node_selector: dict[str, str] = Field(default_factory=dict)
    default_cpu: str = Field(default="4", description="CPU request = limit when spec omits it.")
    default_memory: str = Field(
        default="32Gi", description="Memory request = limit when spec omits it."
    )
    scratch_size_limit: str | None = Field(
        default="200Gi", description="sizeLimit of the /scratch emptyDir (model + checkpoints)."
    )
    shm_size_limit: str = Field(
        default="8Gi", description="sizeLimit of /dev/shm (memory-backed, for data loaders)."
    )
    cache_pvc_name: str | None = Field(
        default=None,
        description="PVC (ReadWriteMany, present in every job namespace) mounted at /cache and "
        "used as the download cache; default: a cache inside /scratch.",
    )
    trainer_extra_env: dict[str, str] = Field(
        default_factory=dict,
        description="Plain env vars for every trainer (e.g. HTTPS_PROXY); never secrets.",
    )
    termination_grace_seconds: int = Field(
        default=120, ge=1, description="Time a trainer gets to checkpoint after SIGTERM."
    )

    # --- progress and status -------------------------------------------------------
    progress_port: int = Field(default=8080, ge=1, le=65535)
    progress_interval_seconds: float = Field(default=10, gt=0)
    status_min_interval_seconds: float = Field(
        default=5, ge=0, description="Least time between two status updates of one job."
    )

    # --- retries and waits (reconcile.py) ------------------------------------------
    retry_backoff_seconds: float = Field(
        default=10, gt=0, description="Wait before retrying a failed attempt; doubles per failure."
    )
    retry_backoff_max_seconds: float = Field(default=300, gt=0)
    wait_backoff_seconds: float = Field(
        default=15,
        gt=0,
        description="First re-check of a job waiting for a Secret or for quota; the interval "
        "grows up to wait_backoff_max_seconds.",
    )
    wait_backoff_max_seconds: float = Field(default=300, gt=0)
    max_disruptions: int = Field(
        default=20,
        ge=0,
        description="Evictions, preemptions and node losses a job survives before it fails "
        "(they never count against backoffLimit).",
    )
    gang_timeout_seconds: float = Field(
        default=300,
        gt=0,
        description="A job on several nodes without Kueue: how long its pods, started "
        "together, may wait for nodes; past it the operator deletes all of them (no half "
        "gang holds GPUs) and tries again after gang_retry_seconds.",
    )
    gang_retry_seconds: float = Field(
        default=60,
        gt=0,
        description="The pause after a gang timeout before the job's pods are created again.",
    )
    trainer_command: list[str] | None = Field(
        default=None,
        description="Override of the trainer container command (JSON list); for tests that "
        "run a fake trainer, never needed in production.",
    )

    # --- scheduling ----------------------------------------------------------------
    kueue_default_queue: str | None = Field(
        default=None, description="LocalQueue for jobs without scheduling.queueName."
    )
    kueue_namespace_queues: dict[str, str] = Field(
        default_factory=dict, description="Per-namespace LocalQueue, overriding the default."
    )

    # --- operator process ----------------------------------------------------------
    namespaces: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Namespaces to watch; empty = all."
    )
    api_qps: float = Field(
        default=50,
        gt=0,
        description="Client-side rate limit of Kubernetes API requests (requests per second "
        "on average; client-go's rest.Config QPS). Watch streams count when opened. The API "
        "server's own throttling (429 with Retry-After) is honoured on top of it.",
    )
    api_burst: int = Field(
        default=100,
        gt=0,
        description="Kubernetes API requests allowed at once above api_qps after a quiet "
        "spell (client-go's rest.Config Burst).",
    )
    metrics_port: int = Field(default=8000, ge=1, le=65535)
    health_port: int = Field(default=8081, ge=1, le=65535)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    webhook_enabled: bool = False
    webhook_port: int = Field(default=9443, ge=1, le=65535)
    webhook_host: str | None = Field(
        default=None, description="DNS name the API server uses to reach the webhook."
    )
    webhook_cert_file: str | None = None
    webhook_key_file: str | None = None
    webhook_managed: bool = Field(
        default=True,
        description="kopf creates and patches the ValidatingWebhookConfiguration (URL "
        "https://<webhook_host>:<webhook_port>); false when the Helm chart renders it with "
        "a Service reference instead.",
    )

    policy: Policy = Field(default_factory=Policy)

    @field_validator("namespaces", mode="before")
    @classmethod
    def _split_namespaces(cls, v: Any) -> Any:
        if isinstance(v, str):
            text = v.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return v

    @field_validator("namespaces")
    @classmethod
    def _check_namespaces(cls, v: list[str]) -> list[str]:
        for ns in v:
            names.check_dns_label(ns, "namespace")
        return v

    @field_validator("trainer_image")
    @classmethod
    def _image(cls, v: str) -> str:
        return names.check_image(v)

    @field_validator("gpu_resource_name")
    @classmethod
    def _gpu(cls, v: str) -> str:
        return names.check_extended_resource_name(v)

    @field_validator("gpu_product_label")
    @classmethod
    def _product_label(cls, v: str) -> str:
        return names.check_label_key(v)

    @field_validator("default_cpu", "default_memory", "shm_size_limit", "scratch_size_limit")
    @classmethod
    def _quantity(cls, v: str | None) -> str | None:
        return None if v is None else names.check_quantity(v)

    @field_validator("default_node_selector")
    @classmethod
    def _node_selector(cls, v: dict[str, str]) -> dict[str, str]:
        for key, value in v.items():
            names.check_label_key(key, "node label key")
            names.check_label_value(value, "node label value")
        return v

    @field_validator("kueue_default_queue")
    @classmethod
    def _queue(cls, v: str | None) -> str | None:
        return None if v is None else names.check_dns_label(v, "LocalQueue name")

    @field_validator("kueue_namespace_queues")
    @classmethod
    def _queues(cls, v: dict[str, str]) -> dict[str, str]:
        for queue in v.values():
            names.check_dns_label(queue, "LocalQueue name")
        return v

    @field_validator("trainer_extra_env")
    @classmethod
    def _extra_env(cls, v: dict[str, str]) -> dict[str, str]:
        for key in v:
            if key.startswith(_RESERVED_ENV_PREFIXES):
                raise ValueError(
                    f"{key} is set by the operator itself (credentials come from Secrets); "
                    "remove it"
                )
        return v

    @field_validator(
        "trainer_service_account", "runtime_class_name", "cache_pvc_name", "image_pull_secrets"
    )
    @classmethod
    def _object_names(cls, v: str | list[str] | None) -> str | list[str] | None:
        for name in [v] if isinstance(v, str) else v or []:
            names.check_dns_subdomain(name)
        return v

    def queue_for(self, namespace: str) -> str | None:
        """The LocalQueue a job without spec.scheduling.queueName goes to."""
        return self.kueue_namespace_queues.get(namespace, self.kueue_default_queue)


class SettingsError(Exception):
    """Bad operator configuration; the message names each LORAJOB_* variable to fix."""


def unknown_env_vars(environ: Mapping[str, str]) -> list[str]:
    """LORAJOB_* variables that name no setting (each with a suggestion when one is close)."""
    known = [ENV_PREFIX + name.upper() for name in OperatorSettings.model_fields]
    out = []
    for key in sorted(environ):
        if key.upper().startswith(ENV_PREFIX) and key.upper() not in known:
            close = difflib.get_close_matches(key.upper(), known, n=1, cutoff=0.8)
            out.append(f"{key} (did you mean {close[0]}?)" if close else key)
    return out


def load_settings(**overrides: Any) -> OperatorSettings:
    """Settings from the environment (plus keyword overrides, for tests and tools).

    An unknown LORAJOB_* variable is an error: a misspelt setting would otherwise be
    ignored silently and the operator would run with the default.
    """
    if unknown := unknown_env_vars(os.environ):
        raise SettingsError(
            "invalid operator settings: unknown variable(s) "
            + ", ".join(unknown)
            + "; fix the name or remove it"
        )
    try:
        return OperatorSettings(**overrides)
    except _SourceError as err:
        # Raised for a value that is not JSON where JSON is needed (lists, maps, policy).
        field = str(err).split('"')[1] if '"' in str(err) else "*"
        raise SettingsError(
            f"invalid operator settings: {ENV_PREFIX}{field.upper()}: not valid JSON; "
            'write lists and maps as JSON, e.g. {"maxGpusPerJob": 8}'
        ) from None
    except ValidationError as err:
        lines = []
        for e in err.errors():
            loc = [str(p) for p in e["loc"]]
            env = ENV_PREFIX + loc[0].upper() if loc else ENV_PREFIX + "*"
            where = env + ("" if len(loc) < 2 else " at " + ".".join(loc[1:]))
            lines.append(f"{where}: {e['msg'].removeprefix('Value error, ')}")
        raise SettingsError("invalid operator settings: " + "; ".join(lines)) from None
