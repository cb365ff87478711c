"""The LoRAJob API: spec and status models, and the one function that parses a spec.

`LoRAJobSpec` is `TrainerConfig` plus the Kubernetes-only fields, so the trainer's
own validation runs on every LoRAJob and the CRD schema (crd.py) is generated from
these models: there is a single source of truth for field names, types and docs.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal
from urllib.parse import urlsplit

from loraops_contract import endpoints, rules
from loraops_contract.config import (
    SpecModel,
    TrainerConfig,
    canonical_digest,
    run_defining_changes,
)
from loraops_contract.rules import Rule
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
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
    "ProgressStatus",
    "RankStatus",
    "ResourcesSpec",
    "SchedulingSpec",
    "SpecChanges",
    "StorageSpec",
    "Toleration",
    "format_time",
    "parse_spec",
    "parse_status",
    "parse_time",
    "private_endpoint_refusal",
    "spec_changes",
    "spec_hash",
    "status_patch",
    "trainer_config",
    "training_ranks",
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
# Pods of one job on several nodes. 16 keeps status.ranks and the pod group small and
# the CEL cost low; LoRA fine-tuning rarely gains from more nodes than that.
MAX_NODES = 16
# Training processes of one job (nodes x GPUs per node): torch.distributed's c10d
# rendezvous and the pod group stay well within what they handle.
MAX_RANKS = 256
# Longest "got ..." echo of a bad value in an error message.
_MAX_ECHO = 120


# Single-value syntax rules: pydantic and the CRD (CEL) enforce each with one message.
Quantity = Annotated[str, *names.quantity_rules("quantity")]
SecretName = Annotated[str, names.DNS_SUBDOMAIN.rule("Secret name")]
LabelValue = Annotated[str, names.LABEL_VALUE.rule("label value")]
# Bounds that keep the CRD's CEL rules within the API server's cost budget.
MAX_TOLERATIONS = 64
MAX_NODE_SELECTOR = 64
MAX_URL_LENGTH = 2048
_LABEL_KEY_CEL, _LABEL_KEY_OK = names.label_key_rule("k")


# --------------------------------------------------------------------------- spec


class Toleration(SpecModel):
    """A pod toleration (core/v1 Toleration)."""

    key: Annotated[str, names.LABEL_KEY.rule("taint key")] | None = Field(
        default=None,
        max_length=names.LABEL_KEY.max_length,
        description="Taint key; empty with Exists matches all.",
    )
    operator: Literal["Exists", "Equal"] | None = Field(
        default=None, description="Exists or Equal (Kubernetes default: Equal)."
    )
    value: LabelValue | None = Field(
        default=None, max_length=63, description="Taint value for operator Equal."
    )
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to tolerate; empty matches all effects."
    )
    toleration_seconds: int | None = Field(
        default=None, ge=0, description="For NoExecute: how long the pod stays bound."
    )

    RULES: ClassVar[tuple[Rule, ...]] = (
        Rule(
            field="value",
            cel="!has(self.operator) || self.operator != 'Exists' || !has(self.value) "
            "|| self.value == ''",
            message="must be empty when operator is Exists; drop value",
            check=lambda t: not (t.operator == "Exists" and t.value),
        ),
        Rule(
            field="operator",
            cel="has(self.key) || (has(self.operator) && self.operator == 'Exists')",
            message="a toleration without key must use operator: Exists",
            check=lambda t: t.key is not None or t.operator == "Exists",
        ),
        Rule(
            field="tolerationSeconds",
            cel="!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
            message="only applies to effect: NoExecute; set effect: NoExecute or drop "
            "tolerationSeconds",
            check=lambda t: t.toleration_seconds is None or t.effect == "NoExecute",
        ),
    )


class ResourcesSpec(SpecModel):
    """Compute for the trainer pod (each trainer pod, with several nodes)."""

    gpus: int = Field(
        default=1,
        ge=0,
        le=MAX_GPUS,
        description="GPUs (devices of gpuResourceName) for the trainer; 0 runs on CPU "
        "(for tests and demos). With nodes > 1, GPUs per node: each of the job's pods gets "
        "this many, and the job trains on nodes x gpus processes.",
    )
    nodes: int = Field(
        default=1,
        ge=1,
        le=MAX_NODES,
        description="Trainer pods, one per node, started together as a gang (a Kueue pod "
        "group when the job goes through Kueue); torchrun's c10d rendezvous joins them. "
        "cpu, memory and gpus are per pod. Losing any pod restarts all of them from the "
        "last checkpoint.",
    )
    gpu_resource_name: (
        Annotated[str, *names.extended_resource_rules("extended resource name")] | None
    ) = Field(
        default=None,
        max_length=names.EXTENDED_RESOURCE.max_length,
        description="Device-plugin resource to request, e.g. nvidia.com/gpu or a MIG slice "
        "such as nvidia.com/mig-1g.10gb; default: the operator's setting (nvidia.com/gpu).",
    )
    gpu_product: (
        Annotated[
            str,
            Rule(
                cel="size(self) > 0",
                message="must not be empty; remove the field to run on any GPU model",
                check=bool,
            ),
            names.LABEL_VALUE.rule("GPU product label value"),
        ]
        | None
    ) = Field(
        default=None,
        max_length=63,
        description="Run only on nodes whose nvidia.com/gpu.product label equals this "
        "(e.g. NVIDIA-A100-SXM4-80GB).",
    )
    cpu: Quantity | None = Field(
        default=None,
        max_length=names.QUANTITY.max_length,
        description="CPU request and limit (e.g. 8); default: operator setting.",
    )
    memory: Quantity | None = Field(
        default=None,
        max_length=names.QUANTITY.max_length,
        description="Memory request and limit (e.g. 64Gi); default: operator setting.",
    )

    RULES: ClassVar[tuple[Rule, ...]] = (
        Rule(
            field="gpuProduct",
            cel="!has(self.gpuProduct) || self.gpus >= 1",
            message="selects a GPU model but gpus is 0; set gpus >= 1 or drop gpuProduct",
            check=lambda r: r.gpus >= 1 or not r.gpu_product,
        ),
        # CUDA shows a process only one MIG instance, so a second one is wasted.
        Rule(
            field="gpus",
            cel="!has(self.gpuResourceName) || !self.gpuResourceName.contains('/mig-') "
            "|| self.gpus <= 1",
            message="more than 1 with a MIG resource (gpuResourceName nvidia.com/mig-...): a "
            "CUDA process can use only one MIG instance; set gpus: 1 or pick a larger MIG "
            "profile",
            check=lambda r: r.gpus <= 1 or "/mig-" not in (r.gpu_resource_name or ""),
        ),
        Rule(
            field="nodes",
            cel=f"self.nodes * (self.gpus > 0 ? self.gpus : 1) <= {MAX_RANKS}",
            message=f"nodes x gpus (the job's training processes) must be at most "
            f"{MAX_RANKS}; ask for fewer nodes or fewer GPUs per node",
            check=lambda r: r.nodes * max(r.gpus, 1) <= MAX_RANKS,
        ),
    )


class SchedulingSpec(SpecModel):
    """Where and when the trainer pod may run."""

    node_selector: Annotated[
        dict[str, Annotated[str, Field(max_length=63), names.LABEL_VALUE.rule("node label value")]],
        Rule(
            cel=f"self.all(k, {_LABEL_KEY_CEL})",
            message=f"has a key that is not a valid node label key; {names.LABEL_KEY.fix}",
            check=lambda v: all(_LABEL_KEY_OK(k) for k in v),
        ),
    ] = Field(
        default_factory=dict,
        max_length=MAX_NODE_SELECTOR,
        description="Extra node labels the pod requires.",
    )
    tolerations: list[Toleration] = Field(
        default_factory=list,
        max_length=MAX_TOLERATIONS,
        description="Extra tolerations (the operator adds its default GPU tolerations).",
    )
    affinity: dict[str, Any] | None = Field(
        default=None,
        description="A core/v1 Affinity (nodeAffinity, podAffinity, podAntiAffinity).",
        # Its three parts are declared so that the API server refuses (or prunes) any
        # other key; their contents are Kubernetes' own to validate at pod creation.
        json_schema_extra={
            "properties": {
                part: {"type": "object", "additionalProperties": True}
                for part in ("nodeAffinity", "podAffinity", "podAntiAffinity")
            },
            "additionalProperties": False,
        },
    )
    priority_class_name: Annotated[str, names.DNS_SUBDOMAIN.rule("PriorityClass name")] | None = (
        Field(default=None, max_length=253, description="PriorityClass of the trainer pod.")
    )
    # Used as a label value, so the stricter DNS label rule applies.
    queue_name: Annotated[str, names.DNS_LABEL.rule("LocalQueue name")] | None = Field(
        default=None,
        max_length=63,
        description="Kueue LocalQueue to admit the job through (label kueue.x-k8s.io/queue-name).",
    )

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


# A URL host as every client reads it alike: an ASCII DNS name or IPv4 in any
# inet_aton spelling (the policy normalises those), or an IPv6 literal with an optional
# zone (urlsplit's hostname drops the brackets).
_ENDPOINT_HOST = re.compile(r"^(?:[a-z0-9_.-]+|[0-9a-f.]*:[0-9a-f:.]*(?:%[a-z0-9_.%-]+)?)$")


# The endpoint URL's shape, as rules the CRD enforces too. The Python-only checks of
# StorageSpec._endpoint (the host's characters, urlsplit's reading) run after them.
_HTTP_URL, _HTTP_URL_OK = rules.matches(
    r"(?i:https?)://(?:[^/?#@]*@)?(?:\[[^\]/?#@]*\]|[^/?#@:\[\]]+)(?::[^/?#]*)?(?:[/?#].*)?"
)
_USERINFO_URL, _USERINFO_URL_OK = rules.matches(r"[^/]*//[^/?#]*@.*")
_PORT = r"(?:6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3})"
_PORT_URL, _PORT_URL_OK = rules.matches(
    rf"[^/]*//(?:[^/?#]*@)?(?:\[[^\]/?#]*\]|[^/?#:\[\]]*)(?::{_PORT})?(?:[/?#].*)?"
)
_ENDPOINT_RULES = (
    Rule(
        cel=_HTTP_URL,
        message="not an http(s) URL; use e.g. https://s3.example.com or "
        "http://minio.storage.svc:9000",
        check=_HTTP_URL_OK,
    ),
    Rule(
        cel=f"!{_USERINFO_URL}",
        message="credentials must not be put in the endpoint URL; remove them and name a "
        "Secret in storage.credentialsSecret",
        check=lambda v: not _USERINFO_URL_OK(v),
    ),
    Rule(
        cel="!self.contains('?') && !self.contains('#')",
        message="the endpoint URL must not have a query or fragment; remove it",
        check=lambda v: "?" not in v and "#" not in v,
    ),
    Rule(
        cel=_PORT_URL,
        message="the endpoint URL has an invalid port; use a number 1-65535",
        check=_PORT_URL_OK,
    ),
)


class StorageSpec(SpecModel):
    """S3 endpoint and the Secrets holding credentials (never the credentials themselves)."""

    endpoint: Annotated[str, *_ENDPOINT_RULES] | None = Field(
        default=None,
        max_length=MAX_URL_LENGTH,
        description="S3-compatible endpoint URL (e.g. https://minio.storage:9000); default: AWS.",
    )
    region: Annotated[str, names.DNS_LABEL.rule("region")] = Field(
        default="us-east-1", max_length=63, description="S3 region."
    )
    credentials_secret: SecretName | None = Field(
        default=None,
        max_length=253,
        description="Secret in the job's namespace with keys AWS_ACCESS_KEY_ID and "
        "AWS_SECRET_ACCESS_KEY (optional AWS_SESSION_TOKEN).",
    )
    hf_token_secret: SecretName | None = Field(
        default=None,
        max_length=253,
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


class LoRAJobSpec(TrainerConfig):
    """A LoRA/QLoRA fine-tuning job: the trainer configuration plus Kubernetes settings."""

    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    scheduling: SchedulingSpec = Field(default_factory=SchedulingSpec)
    storage: StorageSpec = Field(default_factory=StorageSpec)
    image: Annotated[str, names.IMAGE.rule("container image reference")] | None = Field(
        default=None,
        max_length=names.IMAGE.max_length,
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

    # Rules across sections (see also TrainerConfig.RULES, which this extends).
    RULES: ClassVar[tuple[Rule, ...]] = (
        *TrainerConfig.RULES,
        # The pod holds no cloud identity for a non-AWS endpoint, so the upload would
        # fail only after the whole training run.
        Rule(
            field="storage.credentialsSecret",
            cel="!self.output.uri.startsWith('s3://') || !has(self.storage) "
            "|| !has(self.storage.endpoint) || has(self.storage.credentialsSecret)",
            message="required when spec.storage.endpoint is set and spec.output.uri is an "
            "s3:// URI (a custom S3 endpoint has no ambient identity); create a Secret with "
            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY and name it here",
            check=lambda s: (
                not (
                    s.output.uri.startswith("s3://")
                    and s.storage.endpoint
                    and not s.storage.credentials_secret
                )
            ),
            reason="FieldValueRequired",
        ),
        Rule(
            field="training.optimizer",
            cel="!has(self.training) || !self.training.optimizer.startsWith('paged_') "
            "|| !has(self.resources) || self.resources.gpus >= 1",
            message="the paged_* optimizers page optimizer state through CUDA memory and "
            "need a GPU; use adamw_torch when spec.resources.gpus is 0",
            check=lambda s: s.resources.gpus >= 1 or not s.training.optimizer.startswith("paged_"),
        ),
        # FSDP shards the model over the job's GPUs; one GPU has nothing to shard over.
        Rule(
            field="training.strategy",
            cel="!has(self.training) || self.training.strategy != 'fsdp' "
            "|| (has(self.resources) && self.resources.gpus >= 1 "
            "&& self.resources.gpus * self.resources.nodes >= 2)",
            message="fsdp shards the model over several GPUs; set spec.resources.gpus to 2 "
            "or more (or gpus 1 on 2 or more nodes), or use strategy auto or ddp",
            check=lambda s: (
                s.training.strategy != "fsdp"
                or (s.resources.gpus >= 1 and s.resources.gpus * s.resources.nodes >= 2)
            ),
        ),
        Rule(
            field="training.evalEverySteps",
            cel="!has(self.training) || !has(self.training.evalEverySteps) "
            "|| has(self.dataset.evalUri) || self.dataset.evalSplit > 0.0",
            message="set but there is no evaluation data (spec.dataset.evalSplit is 0 and "
            "spec.dataset.evalUri is unset); set one of them or drop evalEverySteps",
            check=lambda s: (
                s.training.eval_every_steps is None
                or s.dataset.eval_uri is not None
                or s.dataset.eval_split > 0
            ),
        ),
    )


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
    """One line per error, like loraops_contract.config.format_validation_error, plus hints."""
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
            kind not in ("missing", "extra_forbidden", rules.RULE_ERROR)
            and not isinstance(got, dict | list)
            and repr(got) not in msg
        ):
            tail = f" (got {_echo(got)})"
        msg = _USERINFO.sub("://***@", msg)
        lines.append(f"{path}: {msg}{tail}")
    return lines


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
        return LoRAJobSpec.model_validate(dict(spec))
    except ValidationError as err:
        raise InvalidSpecError(_problems(err)) from None


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
    if spec.resources.nodes == 1:
        # A job on one node hashes as before resources.nodes existed: an operator
        # upgrade does not restart it.
        del wire["resources"]["nodes"]
    return canonical_digest(wire)


@dataclass(frozen=True)
class SpecChanges:
    """The fields (camelCase paths) that differ between two specs, by what a change of
    them does to a job that has started."""

    new_run: list[str]  # define the training run: the next attempt starts from step 0
    resumable: list[str]  # a restart with the new spec resumes from the last checkpoint
    live: list[str]  # CONTROL_FIELDS: honoured without touching the trainer

    @property
    def restarts(self) -> bool:
        """A running trainer must be restarted for the change to apply."""
        return bool(self.new_run or self.resumable)


def _leaf_values(value: Any, path: str = "") -> dict[str, Any]:
    if not isinstance(value, dict) or not value:
        return {path: value}
    out: dict[str, Any] = {}
    for key, item in value.items():
        out |= _leaf_values(item, f"{path}.{key}" if path else key)
    return out


def spec_changes(old: LoRAJobSpec, new: LoRAJobSpec) -> SpecChanges:
    """Classify what differs between `old` and `new`: the run-defining fields are
    loraops_contract.config's (the same rule the trainer's checkpoint namespaces and the
    operator's run id follow), the control fields this module's, the rest resumable."""
    before = _leaf_values(old.model_dump(by_alias=True, mode="json"))
    after = _leaf_values(new.model_dump(by_alias=True, mode="json"))
    changed = sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))
    new_run = run_defining_changes(
        trainer_config(old), trainer_config(new), (training_ranks(old), training_ranks(new))
    )
    if "training.batchSize" in new_run and old.training.batch_size == new.training.batch_size:
        # The global batch changed with the number of GPUs or nodes (run_config).
        scaled = {
            path
            for path, before, after in (
                ("resources.gpus", old.resources.gpus, new.resources.gpus),
                ("resources.nodes", old.resources.nodes, new.resources.nodes),
            )
            if before != after
        }
        new_run = sorted({*new_run, *(scaled or {"resources.gpus"})} - {"training.batchSize"})
    control = {to_camel(name) for name in CONTROL_FIELDS}
    live = [p for p in changed if p.split(".")[0] in control]
    resumable = [
        p
        for p in changed
        if p not in live and not any(p == f or p.startswith(f"{f}.") for f in new_run)
    ]
    return SpecChanges(new_run=new_run, resumable=resumable, live=live)


def training_ranks(spec: LoRAJobSpec) -> int:
    """Training processes of a job: one per GPU (torchrun), one per pod on the CPU, on
    each of its nodes."""
    return max(1, spec.resources.gpus) * spec.resources.nodes


def private_endpoint_refusal(url: str) -> str | None:
    """Why `url`'s host is a private endpoint (loopback, link-local/metadata, ... in
    any spelling: loraops_contract.endpoints), or None."""
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


# status.progress: the trainer's loraops_contract.protocol.Progress as copied into status
# (rounded, throttled: trainer_progress.status_progress). The docstring is the CRD's description.
class ProgressStatus(_StatusModel):
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
    strategy: str | None = Field(
        default=None,
        description="How the run spreads over its GPUs: single (one process), ddp or fsdp.",
    )
    ranks: int | None = Field(default=None, description="Training processes (one per GPU).")
    global_batch_size: int | None = Field(
        default=None,
        description="Rows per optimizer step: batchSize x ranks x gradientAccumulationSteps.",
    )
    last_updated: str | None = Field(default=None, description="RFC 3339 time.")


class EvaluationStatus(_StatusModel):
    """How the finished adapter compares with its base model, and whether vLLM loads it
    (reported by the trainer: loraops_contract.protocol.Evaluation)."""

    base_eval_loss: float | None = Field(
        default=None, description="The base model's loss on the held-out split, before training."
    )
    eval_loss: float | None = Field(
        default=None, description="The adapter's loss on the same records, after training."
    )
    summary: str | None = Field(default=None, description="e.g. eval loss 3.000 → 2.260 (-24.7%).")
    worse_than_base: bool | None = Field(
        default=None, description="The adapter's eval loss is above the base model's."
    )
    vllm: str | None = Field(
        default=None, description="loads in vLLM: yes/no, why (vLLM's LoRA loader rules)."
    )


class AdapterStatus(_StatusModel):
    """The finished adapter."""

    uri: str = Field(description="Output prefix holding the adapter.")
    manifest_uri: str | None = Field(default=None, description="manifest.json, written last.")
    sha256: str | None = Field(default=None, description="sha256 of adapter_model.safetensors.")
    size: int | None = Field(default=None, description="Bytes of adapter_model.safetensors.")
    files: int | None = Field(default=None, description="Files listed in the manifest.")


class RankStatus(_StatusModel):
    """One trainer pod of a job on several nodes (spec.resources.nodes > 1)."""

    rank: int = Field(description="Node rank (torchrun's --node-rank); 0 reports progress.")
    pod: str = Field(description="The pod of this rank in the latest attempt.")
    node: str | None = Field(default=None, description="The node it was scheduled to.")
    state: str = Field(
        description="Gated (held until the whole group exists or Kueue admits it), "
        "Pending, Running, Succeeded, Failed, Terminating or Missing."
    )


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
    progress: ProgressStatus | None = None
    pod_name: str | None = None
    node_name: str | None = None
    ranks: list[RankStatus] = Field(
        default_factory=list,
        max_length=MAX_NODES,
        description="The pods of the latest attempt of a job on several nodes, by node rank.",
    )
    ranks_ready: str | None = Field(
        default=None,
        description="Running pods of the latest attempt of a job on several nodes, e.g. 2/2.",
    )
    adapter: AdapterStatus | None = None
    evaluation: EvaluationStatus | None = Field(
        default=None,
        description="The adapter in status.adapter against its base model, and the vLLM verdict.",
    )
    last_checkpoint: str | None = Field(
        default=None, description="Latest complete checkpoint; a new attempt resumes from it."
    )
    skipped_records: int | None = Field(
        default=None,
        description="Dataset records the trainer left out as invalid "
        "(spec.dataset.invalidRecords: skip).",
    )
    failure_reason: str | None = None
    failure_message: str | None = None
    hint: str | None = Field(default=None, description="What to change to make the job succeed.")
    spec_hash: str | None = Field(
        default=None,
        description="Hash of the spec the latest attempt runs (control fields excluded).",
    )
    run_generation: int | None = Field(
        default=None,
        description="metadata.generation of the spec the latest attempt runs (or ran).",
    )
    run_id: str | None = Field(
        default=None,
        description="The training run of the latest attempt, a hash of the fields that define "
        "it (model, data, LoRA shape, quantization, optimisation); its checkpoints are under "
        "<output.uri>/checkpoints/run-<runId>/. A spec change that keeps it resumes from them.",
    )
    completed_generation: int | None = Field(
        default=None,
        description="metadata.generation of the spec the adapter in status.adapter was trained "
        "for; equal to metadata.generation once the declared spec has run to completion.",
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


def status_patch(before: LoRAJobStatus, after: LoRAJobStatus) -> dict[str, Any]:
    """The JSON merge patch (wire names) that turns status `before` into `after`.

    A field set back to its default (None, or 0 for a counter) is removed (null), so a
    status shows only what applies. Nested models are written with the fields that
    were set on them, None included: a merge patch keeps the other keys the stored
    object has (status.progress keeps its last loss when a read has none) and
    removes the ones set to None.
    """
    patch: dict[str, Any] = {}
    for name, info in LoRAJobStatus.model_fields.items():
        new = getattr(after, name)
        wire = _wire(new)
        if wire == _wire(getattr(before, name)):
            continue
        default = info.get_default(call_default_factory=True)
        patch[info.alias or name] = None if new == default else wire
    return patch


def _wire(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(by_alias=True, mode="json", exclude_unset=True)
    if isinstance(value, list):
        return [_wire(item) for item in value]
    if isinstance(value, StrEnum):
        return str(value)
    return value


def format_time(when: datetime) -> str:
    """RFC 3339 in UTC with a Z, second precision (what metav1.Time serializes): every
    time the operator writes (status, conditions, Events) is formatted here."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: Any) -> datetime | None:
    """An RFC 3339 timestamp from the API (None when absent or unreadable)."""
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
