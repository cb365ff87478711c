"""The LoRAJob API: spec and status models, and the one function that parses a spec.

`LoRAJobSpec` is `TrainerConfig` plus the Kubernetes-only fields, so the trainer's
own validation runs on every LoRAJob and the CRD schema (crd.py) is generated from
these models: there is a single source of truth for field names, types and docs.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import types
import typing
from collections.abc import Mapping
from enum import StrEnum
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from lora_trainer import endpoints
from lora_trainer.config import SpecModel, TrainerConfig, parse_uri
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from lorajob_operator import names

__all__ = [
    "API_VERSION",
    "CATEGORIES",
    "GROUP",
    "KIND",
    "PLURAL",
    "SHORT_NAMES",
    "SINGULAR",
    "VERSION",
    "AdapterStatus",
    "Condition",
    "InvalidSpecError",
    "LoRAJobSpec",
    "LoRAJobStatus",
    "Phase",
    "Progress",
    "ResourcesSpec",
    "SchedulingSpec",
    "StorageSpec",
    "Toleration",
    "parse_spec",
    "parse_status",
    "private_endpoint_refusal",
    "spec_hash",
    "trainer_config",
]

GROUP = "finetune.loraops.dev"
VERSION = "v1alpha1"
KIND = "LoRAJob"
PLURAL = "lorajobs"
SINGULAR = "lorajob"
SHORT_NAMES = ["lj"]
CATEGORIES = ["finetune"]
API_VERSION = f"{GROUP}/{VERSION}"

DEFAULT_GPU_RESOURCE = "nvidia.com/gpu"
MAX_GPUS = 64
# Longest "got ..." echo of a bad value in an error message.
_MAX_ECHO = 120


def _secret_name(value: str) -> str:
    return names.check_dns_subdomain(value, "Secret name")


Quantity = Annotated[str, AfterValidator(names.check_quantity)]
SecretName = Annotated[str, AfterValidator(_secret_name)]


# --------------------------------------------------------------------------- spec


class Toleration(SpecModel):
    """A pod toleration (core/v1 Toleration)."""

    key: str | None = Field(default=None, description="Taint key; empty with Exists matches all.")
    operator: Literal["Exists", "Equal"] | None = Field(
        default=None, description="Exists or Equal (Kubernetes default: Equal)."
    )
    value: str | None = Field(default=None, description="Taint value for operator Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to tolerate; empty matches all effects."
    )
    toleration_seconds: int | None = Field(
        default=None, ge=0, description="For NoExecute: how long the pod stays bound."
    )

    @field_validator("key")
    @classmethod
    def _key(cls, v: str | None) -> str | None:
        return None if v is None else names.check_label_key(v, "taint key")

    @model_validator(mode="after")
    def _consistent(self) -> Toleration:
        if self.operator == "Exists" and self.value:
            raise ValueError("value must be empty when operator is Exists; drop value")
        if self.key is None and self.operator != "Exists":
            raise ValueError("a toleration without key must use operator: Exists")
        if self.toleration_seconds is not None and self.effect != "NoExecute":
            raise ValueError("tolerationSeconds only applies to effect: NoExecute")
        return self


class ResourcesSpec(SpecModel):
    """Compute for the trainer pod."""

    gpus: int = Field(
        default=1,
        ge=0,
        le=MAX_GPUS,
        description="GPUs (devices of gpuResourceName) for the trainer; 0 runs on CPU "
        "(for tests and demos).",
    )
    gpu_resource_name: str | None = Field(
        default=None,
        description="Device-plugin resource to request, e.g. nvidia.com/gpu or a MIG slice "
        "such as nvidia.com/mig-1g.10gb; default: the operator's setting (nvidia.com/gpu).",
    )
    gpu_product: str | None = Field(
        default=None,
        description="Run only on nodes whose nvidia.com/gpu.product label equals this "
        "(e.g. NVIDIA-A100-SXM4-80GB).",
    )
    cpu: Quantity | None = Field(
        default=None, description="CPU request and limit (e.g. 8); default: operator setting."
    )
    memory: Quantity | None = Field(
        default=None,
        description="Memory request and limit (e.g. 64Gi); default: operator setting.",
    )

    @field_validator("gpu_resource_name")
    @classmethod
    def _gpu_resource(cls, v: str | None) -> str | None:
        return None if v is None else names.check_extended_resource_name(v)

    @field_validator("gpu_product")
    @classmethod
    def _gpu_product(cls, v: str | None) -> str | None:
        if v is not None and not v:
            raise ValueError("must not be empty; remove the field to run on any GPU model")
        return None if v is None else names.check_label_value(v, "GPU product label value")

    @model_validator(mode="after")
    def _gpu_consistency(self) -> ResourcesSpec:
        if self.gpus == 0 and self.gpu_product:
            raise ValueError(
                "gpuProduct selects a GPU model but gpus is 0; set gpus >= 1 or drop gpuProduct"
            )
        if self.gpu_resource_name and "/mig-" in self.gpu_resource_name and self.gpus > 1:
            # CUDA shows a process only one MIG instance, so a second one is wasted.
            raise ValueError(
                f"gpus={self.gpus} with MIG resource {self.gpu_resource_name}: a CUDA process "
                "can use only one MIG instance; set gpus: 1 or pick a larger MIG profile"
            )
        return self


class SchedulingSpec(SpecModel):
    """Where and when the trainer pod may run."""

    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Extra node labels the pod requires."
    )
    tolerations: list[Toleration] = Field(
        default_factory=list,
        description="Extra tolerations (the operator adds its default GPU tolerations).",
    )
    affinity: dict[str, Any] | None = Field(
        default=None, description="A core/v1 Affinity (nodeAffinity, podAffinity, podAntiAffinity)."
    )
    priority_class_name: str | None = Field(
        default=None, description="PriorityClass of the trainer pod."
    )
    queue_name: str | None = Field(
        default=None,
        description="Kueue LocalQueue to admit the job through (label kueue.x-k8s.io/queue-name).",
    )

    @field_validator("node_selector")
    @classmethod
    def _node_selector(cls, v: dict[str, str]) -> dict[str, str]:
        for key, value in v.items():
            names.check_label_key(key, "node label key")
            names.check_label_value(value, f"node label value for {key}")
        return v

    @field_validator("affinity")
    @classmethod
    def _affinity(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        allowed = {"nodeAffinity", "podAffinity", "podAntiAffinity"}
        if v is not None and (unknown := sorted(set(v) - allowed)):
            raise ValueError(
                f"unknown affinity field(s) {', '.join(unknown)}; use nodeAffinity, "
                "podAffinity or podAntiAffinity"
            )
        return v

    @field_validator("priority_class_name")
    @classmethod
    def _priority(cls, v: str | None) -> str | None:
        return None if v is None else names.check_dns_subdomain(v, "PriorityClass name")

    @field_validator("queue_name")
    @classmethod
    def _queue(cls, v: str | None) -> str | None:
        # Used as a label value, so the stricter DNS label rule applies.
        return None if v is None else names.check_dns_label(v, "LocalQueue name")


# A URL host as every client reads it alike: an ASCII DNS name or IPv4 in any
# inet_aton spelling (the policy normalises those), or an IPv6 literal with an optional
# zone (urlsplit's hostname drops the brackets).
_ENDPOINT_HOST = re.compile(r"^(?:[a-z0-9_.-]+|[0-9a-f.]*:[0-9a-f:.]*(?:%[a-z0-9_.%-]+)?)$")


class StorageSpec(SpecModel):
    """S3 endpoint and the Secrets holding credentials (never the credentials themselves)."""

    endpoint: str | None = Field(
        default=None,
        description="S3-compatible endpoint URL (e.g. https://minio.storage:9000); default: AWS.",
    )
    region: str = Field(default="us-east-1", description="S3 region.")
    credentials_secret: SecretName | None = Field(
        default=None,
        description="Secret in the job's namespace with keys AWS_ACCESS_KEY_ID and "
        "AWS_SECRET_ACCESS_KEY (optional AWS_SESSION_TOKEN).",
    )
    hf_token_secret: SecretName | None = Field(
        default=None,
        description="Secret in the job's namespace with key HF_TOKEN, for gated hf:// models.",
    )

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        if v is None:
            return None
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                f"{v!r} is not an http(s) URL; use e.g. https://s3.example.com or "
                "http://minio.storage.svc:9000"
            )
        if not _ENDPOINT_HOST.match(parts.hostname):
            # Percent-escapes and non-ASCII characters are decoded differently by
            # different clients, so the host the policy checks might not be the one
            # the trainer reaches.
            raise ValueError(
                f"{parts.hostname!r} is not a host name or IP address; use ASCII letters, "
                "digits, '-' and '.' (or an IPv6 address in brackets)"
            )
        if parts.username or parts.password:
            raise ValueError(
                "credentials must not be put in the endpoint URL; remove them and name a "
                "Secret in storage.credentialsSecret"
            )
        if parts.query or parts.fragment:
            raise ValueError("the endpoint URL must not have a query or fragment; remove it")
        try:
            _ = parts.port
        except ValueError as exc:
            raise ValueError(f"{v!r} has an invalid port; use a number 1-65535") from exc
        return v.rstrip("/")

    @field_validator("region")
    @classmethod
    def _region(cls, v: str) -> str:
        return names.check_dns_label(v, "region")


class LoRAJobSpec(TrainerConfig):
    """A LoRA/QLoRA fine-tuning job: the trainer configuration plus Kubernetes settings."""

    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    scheduling: SchedulingSpec = Field(default_factory=SchedulingSpec)
    storage: StorageSpec = Field(default_factory=StorageSpec)
    image: str | None = Field(
        default=None,
        description="Trainer image; default: the operator's trainer image. Must speak the "
        "lora-trainer protocol.",
    )
    backoff_limit: int = Field(
        default=3,
        ge=0,
        le=100,
        description="Failed attempts retried before the job fails; disruptions (eviction, "
        "preemption, node loss) do not count.",
    )
    active_deadline_seconds: int | None = Field(
        default=None,
        gt=0,
        description="Fail the job when it has run this long in total, across attempts.",
    )
    suspend: bool = Field(
        default=False,
        description="True stops the trainer (after a checkpoint) and frees the GPU; false resumes.",
    )
    ttl_seconds_after_finished: int | None = Field(
        default=None,
        ge=0,
        description="Delete the LoRAJob this many seconds after it succeeds or fails.",
    )

    @field_validator("image")
    @classmethod
    def _image(cls, v: str | None) -> str | None:
        return None if v is None else names.check_image(v)


# Fields that only steer the job controller: changing them does not change what a
# trainer pod runs, so they are left out of the spec hash (see spec_hash()).
CONTROL_FIELDS = frozenset(
    {"suspend", "backoff_limit", "active_deadline_seconds", "ttl_seconds_after_finished"}
)


class InvalidSpecError(Exception):
    """A LoRAJob spec that cannot run; `.message` names every bad field and the fix."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        self.message = "; ".join(problems)
        super().__init__(self.message)


def _model_fields_by_alias(model: type[BaseModel]) -> dict[str, Any]:
    return {(f.alias or n): f.annotation for n, f in model.model_fields.items()}


def _submodel(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation such as `X | None` or `list[X]`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, list, typing.Annotated):
        for arg in typing.get_args(annotation):
            found = _submodel(arg)
            if found is not None:
                return found
    return None


def _unknown_field_hint(loc: tuple[Any, ...]) -> str:
    """'did you mean ...' for an unknown field: a close spelling or the right section."""
    model: type[BaseModel] | None = LoRAJobSpec
    for part in loc[:-1]:
        if isinstance(part, int) or model is None:
            continue
        model = _submodel(_model_fields_by_alias(model).get(str(part)))
    if model is None:
        return ""
    key = str(loc[-1])
    fields = _model_fields_by_alias(model)
    close = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.7)
    if not close:
        close = [f for f in fields if f.lower() == key.lower().replace("_", "")]
    if close:
        return f"; did you mean {close[0]}?"
    # A field that belongs one level down, e.g. spec.learningRate -> spec.training.learningRate.
    parent = ".".join(str(p) for p in loc[:-1])
    for section, annotation in fields.items():
        sub = _submodel(annotation)
        if sub is not None and key in _model_fields_by_alias(sub):
            where = f"{parent}.{section}" if parent else section
            return f"; it belongs under spec.{where} (spec.{where}.{key})"
    return ""


_USERINFO = re.compile(r"://[^/@\s]*@")


def _echo(value: Any) -> str:
    # Never echo credentials someone pasted into a URL.
    text = _USERINFO.sub("://***@", repr(value))
    return text if len(text) <= _MAX_ECHO else text[: _MAX_ECHO - 3] + "..."


def _is_union_tag(part: Any) -> bool:
    # pydantic names the branch of a union it tried: "str", "list[str]", ...
    text = str(part)
    return text in ("str", "int", "float", "bool") or "[" in text


def _field_description(loc: tuple[Any, ...]) -> str:
    model: type[BaseModel] | None = LoRAJobSpec
    for part in loc[:-1]:
        if not isinstance(part, int) and model is not None:
            model = _submodel(_model_fields_by_alias(model).get(str(part)))
    if model is None:
        return ""
    for name, field in model.model_fields.items():
        if str(loc[-1]) in (name, field.alias):
            return field.description or ""
    return ""


def _problems(err: ValidationError) -> list[str]:
    """One line per error, like lora_trainer.config.format_validation_error, plus hints."""
    lines: list[str] = []
    union_fields: set[tuple[Any, ...]] = set()
    for e in err.errors():
        raw_loc = tuple(p for p in e["loc"] if not str(p).startswith("function-"))
        tag_at = next((i for i, p in enumerate(raw_loc) if _is_union_tag(p)), None)
        if tag_at is not None:
            # A value that fits no branch of a union (lora.targetModules): one line that
            # says what the field accepts instead of one line per branch.
            field_loc = raw_loc[:tag_at]
            if field_loc not in union_fields:
                union_fields.add(field_loc)
                what = _field_description(field_loc) or "see kubectl explain lorajob.spec"
                lines.append(
                    f"spec.{'.'.join(str(p) for p in field_loc)}: wrong type or value; "
                    f"expected: {what}"
                )
            continue
        loc = raw_loc
        path = "spec." + ".".join(str(p) for p in loc) if loc else "spec"
        msg = e["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
        kind = e["type"]
        if kind == "extra_forbidden":
            msg = (
                "unknown field; check the spelling (fields are camelCase) or remove it"
                + _unknown_field_hint(loc)
            )
        elif kind == "missing":
            msg = "required field is missing; add it"
        elif kind in ("model_type", "model_attributes_type", "dict_type"):
            msg = "must be an object (a mapping of fields); write it as key: value pairs"
        got = e.get("input")
        if kind == "string_type" and isinstance(got, int | float) and not isinstance(got, bool):
            msg += f'; quote it, e.g. "{got}"'
        elif kind == "list_type":
            msg += "; write it as a YAML list (- item)"
        tail = ""
        if (
            kind not in ("missing", "extra_forbidden")
            and not isinstance(got, dict | list)
            and repr(got) not in msg
        ):
            tail = f" (got {_echo(got)})"
        msg = _USERINFO.sub("://***@", msg)
        lines.append(f"{path}: {msg}{tail}")
    return lines


def _cross_field_problems(spec: LoRAJobSpec) -> list[str]:
    """Rules that need more than one section of the spec."""
    problems = []
    uris = {
        "spec.model.uri": spec.model.uri,
        "spec.dataset.uri": spec.dataset.uri,
        "spec.output.uri": spec.output.uri,
    }
    if spec.dataset.eval_uri:
        uris["spec.dataset.evalUri"] = spec.dataset.eval_uri
    schemes = {path: parse_uri(uri)[0] for path, uri in uris.items()}
    if (
        schemes["spec.output.uri"] == "s3"
        and spec.storage.endpoint
        and not spec.storage.credentials_secret
    ):
        # The pod holds no cloud identity for a non-AWS endpoint, so the upload would
        # fail only after the whole training run.
        problems.append(
            "spec.storage.credentialsSecret: required when spec.storage.endpoint is set and "
            "spec.output.uri is an s3:// URI (a custom S3 endpoint has no ambient identity); "
            "create a Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY and name it here"
        )
    if spec.resources.gpus == 0 and spec.training.optimizer.startswith("paged_"):
        problems.append(
            f"spec.training.optimizer: {spec.training.optimizer} pages optimizer state through "
            "CUDA memory and needs a GPU; use adamw_torch when spec.resources.gpus is 0"
        )
    if (
        spec.training.eval_every_steps
        and spec.dataset.eval_split == 0
        and not spec.dataset.eval_uri
    ):
        problems.append(
            "spec.training.evalEverySteps: set but there is no evaluation data "
            "(spec.dataset.evalSplit is 0 and spec.dataset.evalUri is unset); set one of them "
            "or drop evalEverySteps"
        )
    return problems


def parse_spec(spec: Mapping[str, Any]) -> LoRAJobSpec:
    """Validate a LoRAJob `spec` (camelCase, as stored in Kubernetes).

    Raises InvalidSpecError listing every problem, each prefixed with its field path
    (e.g. "spec.training.learningRate: ...") and saying how to fix it.
    """
    if not isinstance(spec, Mapping):
        raise InvalidSpecError(
            [f"spec: must be an object with model, dataset and output (got {_echo(spec)})"]
        )
    try:
        parsed = LoRAJobSpec.model_validate(dict(spec))
    except ValidationError as err:
        raise InvalidSpecError(_problems(err)) from None
    problems = _cross_field_problems(parsed)
    if problems:
        raise InvalidSpecError(problems)
    return parsed


def trainer_config(spec: LoRAJobSpec) -> TrainerConfig:
    """The part of the spec the trainer sees (Kubernetes-only fields stripped)."""
    return TrainerConfig.model_validate(
        {name: getattr(spec, name) for name in TrainerConfig.model_fields}
    )


def spec_hash(spec: LoRAJobSpec) -> str:
    """Hash of everything that shapes a trainer pod (control fields excluded).

    Stored on the pod and in status so the operator can tell a spec change that
    needs a new attempt from one (suspend, backoffLimit, ...) it honours live.
    """
    wire = spec.model_dump(by_alias=True, mode="json", exclude=set(CONTROL_FIELDS))
    canonical = json.dumps(wire, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def private_endpoint_refusal(url: str) -> str | None:
    """Why `url`'s host is a private endpoint (loopback, link-local/metadata, ... in
    any spelling: lora_trainer.endpoints), or None."""
    host = urlsplit(url).hostname
    return endpoints.host_refusal(host) if host else None


# --------------------------------------------------------------------------- status


class Phase(StrEnum):
    PENDING = "Pending"
    QUEUED = "Queued"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"


class _StatusModel(BaseModel):
    # extra="ignore": a status written by another operator version must still parse.
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    def to_wire(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class Condition(_StatusModel):
    """A metav1.Condition."""

    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str = Field(default="", description="CamelCase machine-readable reason.")
    message: str = Field(default="", description="What happened, for people.")
    last_transition_time: str | None = Field(default=None, description="RFC 3339 time.")
    observed_generation: int | None = None


class Progress(_StatusModel):
    """Latest progress reported by the trainer."""

    stage: str | None = Field(default=None, description="starting, downloading, training, ...")
    step: int = 0
    total_steps: int | None = None
    percent: float | None = Field(default=None, description="step / totalSteps * 100.")
    epoch: float | None = None
    loss: float | None = None
    eval_loss: float | None = None
    tokens_per_second: float | None = None
    eta_seconds: float | None = None
    last_updated: str | None = Field(default=None, description="RFC 3339 time.")


class AdapterStatus(_StatusModel):
    """The finished adapter."""

    uri: str = Field(description="Output prefix holding the adapter.")
    manifest_uri: str | None = Field(default=None, description="manifest.json, written last.")
    sha256: str | None = Field(default=None, description="sha256 of adapter_model.safetensors.")
    size: int | None = Field(default=None, description="Bytes of adapter_model.safetensors.")
    files: int | None = Field(default=None, description="Files listed in the manifest.")


class LoRAJobStatus(_StatusModel):
    """Observed state of a LoRAJob, written only by the operator."""

    phase: Phase | None = Field(default=None, description="Summary of the conditions.")
    conditions: list[Condition] = Field(default_factory=list)
    observed_generation: int | None = None
    attempts: int = Field(default=0, description="Trainer pods created so far.")
    failed_attempts: int = Field(default=0, description="Attempts counted against backoffLimit.")
    disruptions: int = Field(
        default=0, description="Attempts ended by eviction, preemption or node loss."
    )
    start_time: str | None = None
    completion_time: str | None = None
    progress: Progress | None = None
    pod_name: str | None = None
    node_name: str | None = None
    adapter: AdapterStatus | None = None
    last_checkpoint: str | None = Field(
        default=None, description="Latest complete checkpoint; a new attempt resumes from it."
    )
    failure_reason: str | None = None
    failure_message: str | None = None
    hint: str | None = Field(default=None, description="What to change to make the job succeed.")
    spec_hash: str | None = Field(
        default=None, description="Hash of the spec the current attempt runs."
    )


def parse_status(status: Mapping[str, Any] | None) -> LoRAJobStatus:
    """Parse a stored status, dropping (never failing on) fields it cannot read."""
    data = dict(status or {})
    for _ in range(len(data) + 1):
        try:
            return LoRAJobStatus.model_validate(data)
        except ValidationError as err:
            bad = {e["loc"][0] for e in err.errors() if e["loc"]}
            if not bad:
                break
            for key in bad:
                data.pop(str(key), None)
    return LoRAJobStatus()
