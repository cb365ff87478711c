"""Cluster-admin policy: what LoRAJobs may ask for, checked at admission and reconcile.

The policy lives in the operator's settings (Helm values `policy:`), not in the
cluster, so a user who can create LoRAJobs cannot loosen it. Every violation names
the spec field, the policy value it breaks and what to do instead.
"""

from __future__ import annotations

import fnmatch

from loraops_contract.config import parse_uri
from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.alias_generators import to_camel

from lorajob_operator.api import DEFAULT_GPU_RESOURCE, LoRAJobSpec, private_endpoint_refusal

__all__ = ["Policy", "check_policy", "concurrency_limit"]


class Policy(BaseModel):
    """Limits set by the cluster admin. Empty/None means "not restricted" unless noted."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )

    allowed_gpu_resource_names: list[str] = Field(
        default_factory=list,
        description="Extended resources jobs may request (e.g. nvidia.com/gpu, "
        "nvidia.com/mig-1g.10gb); empty = any.",
    )
    allowed_gpu_products: list[str] = Field(
        default_factory=list, description="Values allowed in resources.gpuProduct; empty = any."
    )
    max_gpus_per_job: int | None = Field(default=None, ge=0)
    max_concurrent_jobs_per_namespace: dict[str, int] = Field(
        default_factory=dict, description="Running (non-finished) jobs per namespace."
    )
    max_concurrent_jobs_default: int | None = Field(
        default=None, ge=0, description="Limit for namespaces not listed above; None = none."
    )
    allowed_images: list[str] = Field(
        default_factory=list,
        description="Globs (ghcr.io/loraops/*) or registry prefixes ending in / that spec.image "
        "must match; empty = any. The operator's own trainer image is always allowed.",
    )
    allowed_s3_endpoints: list[str] | None = Field(
        default=None,
        description="Globs of storage.endpoint (scheme://host[:port]); None = any.",
    )
    allowed_s3_endpoints_by_namespace: dict[str, list[str]] = Field(
        default_factory=dict, description="Per-namespace list that replaces the default."
    )
    allowed_output_prefixes: list[str] | None = Field(
        default=None,
        description="Prefixes output.uri must start with; {namespace} is replaced by the "
        "job's namespace (e.g. s3://adapters/{namespace}/). None = any.",
    )
    allowed_output_prefixes_by_namespace: dict[str, list[str]] = Field(
        default_factory=dict, description="Per-namespace list that replaces the default."
    )
    allowed_priority_class_names: list[str] | None = Field(
        default=None, description="PriorityClasses jobs may use; None = any."
    )
    allow_hf_sources: bool = Field(
        default=False, description="Allow hf:// models and datasets (downloads from the Hub)."
    )
    allow_trust_remote_code: bool = Field(
        default=False, description="Allow model.trustRemoteCode (runs the model repo's code)."
    )
    allow_private_endpoints: bool = Field(
        default=False,
        description="Allow loopback, link-local (cloud metadata), unspecified, multicast "
        "and reserved S3 endpoints in any spelling (the trainer also checks the address "
        "a name resolves to) and local paths for model, dataset and output (for "
        "single-node and test clusters). Private ranges (10/8, ...) are always allowed.",
    )

    @field_validator("allowed_output_prefixes", "allowed_output_prefixes_by_namespace")
    @classmethod
    def _prefixes(
        cls, v: list[str] | dict[str, list[str]] | None
    ) -> list[str] | dict[str, list[str]] | None:
        lists = v.values() if isinstance(v, dict) else [v or []]
        for prefix in (p for prefixes in lists for p in prefixes):
            # A prefix that names no place would silently allow nothing.
            parse_uri(prefix.replace("{namespace}", "namespace"))
        return v


def concurrency_limit(policy: Policy, namespace: str) -> int | None:
    """How many unfinished LoRAJobs `namespace` may run at once (None = no limit)."""
    return policy.max_concurrent_jobs_per_namespace.get(
        namespace, policy.max_concurrent_jobs_default
    )


def _origin(url: str) -> str:
    return url.lower().rstrip("/")


def _segments(uri: str) -> tuple[str, ...] | None:
    """`uri` as (scheme, bucket or first directory, key segments...), None if invalid.

    parse_uri refuses '.', '..' and empty segments, so equal tuples mean the same place
    to S3 and to the file system."""
    try:
        scheme, location, key = parse_uri(uri)
    except ValueError:
        return None
    parts = location.split("/") if scheme == "file" else [location, *key.split("/")]
    return (scheme, *(p for p in parts if p))


def _under_prefix(uri: str, prefix: str) -> bool:
    """Whether `uri` is `prefix` or below it, segment by segment: s3://a/team-a covers
    s3://a/team-a/x, never s3://a/team-ab/x (with or without a trailing slash)."""
    path, base = _segments(uri), _segments(prefix)
    return path is not None and base is not None and path[: len(base)] == base


def _image_allowed(image: str, patterns: list[str]) -> bool:
    return any(
        image.startswith(p) if p.endswith("/") else fnmatch.fnmatchcase(image, p) for p in patterns
    )


def check_policy(
    spec: LoRAJobSpec,
    namespace: str,
    policy: Policy,
    *,
    default_gpu_resource_name: str = DEFAULT_GPU_RESOURCE,
    default_image: str | None = None,
) -> list[str]:
    """Every way `spec` breaks `policy`, one message per violation (empty = allowed).

    The defaults are the operator's (OperatorSettings.gpu_resource_name, trainer_image):
    what a spec that leaves the field out gets. reconcile.parse_job_spec is the one
    caller in the operator and the webhook.
    """
    out: list[str] = []
    res = spec.resources

    gpu_name = res.gpu_resource_name or default_gpu_resource_name
    if (
        res.gpus > 0
        and policy.allowed_gpu_resource_names
        and gpu_name not in policy.allowed_gpu_resource_names
    ):
        out.append(
            f"spec.resources.gpuResourceName: {gpu_name} is not in the cluster policy "
            f"allowedGpuResourceNames={policy.allowed_gpu_resource_names}; use one of them"
        )
    if (
        res.gpu_product
        and policy.allowed_gpu_products
        and res.gpu_product not in policy.allowed_gpu_products
    ):
        out.append(
            f"spec.resources.gpuProduct: {res.gpu_product} is not in the cluster policy "
            f"allowedGpuProducts={policy.allowed_gpu_products}; use one of them or drop gpuProduct"
        )
    if policy.max_gpus_per_job is not None and res.gpus * res.nodes > policy.max_gpus_per_job:
        # gpus is per pod: a job on several nodes holds nodes x gpus.
        total = f"{res.gpus}" if res.nodes == 1 else f"{res.gpus} per node x {res.nodes} nodes"
        out.append(
            f"spec.resources.gpus: {total} exceeds the cluster policy "
            f"maxGpusPerJob={policy.max_gpus_per_job}; ask for at most "
            f"{policy.max_gpus_per_job} GPUs"
        )

    if (
        spec.image
        and spec.image != default_image
        and policy.allowed_images
        and not _image_allowed(spec.image, policy.allowed_images)
    ):
        out.append(
            f"spec.image: {spec.image} is not allowed by the cluster policy "
            f"allowedImages={policy.allowed_images}; use a matching image or remove spec.image "
            "to use the operator's trainer image"
        )

    prio = spec.scheduling.priority_class_name
    if (
        prio
        and policy.allowed_priority_class_names is not None
        and prio not in policy.allowed_priority_class_names
    ):
        out.append(
            f"spec.scheduling.priorityClassName: {prio} is not in the cluster policy "
            f"allowedPriorityClassNames={policy.allowed_priority_class_names}; use one of them"
        )

    if spec.model.trust_remote_code and not policy.allow_trust_remote_code:
        out.append(
            "spec.model.trustRemoteCode: running a model repository's code is disabled by the "
            "cluster policy allowTrustRemoteCode=false; set it to false (use a model that "
            "transformers supports natively) or ask your admin"
        )

    out.extend(_uri_violations(spec, policy))
    out.extend(_endpoint_violations(spec, namespace, policy))
    out.extend(_output_violations(spec, namespace, policy))
    return out


def _uri_violations(spec: LoRAJobSpec, policy: Policy) -> list[str]:
    out = []
    uris = [
        ("spec.model.uri", spec.model.uri),
        ("spec.dataset.uri", spec.dataset.uri),
        ("spec.dataset.evalUri", spec.dataset.eval_uri),
        ("spec.output.uri", spec.output.uri),
    ]
    for path, uri in uris:
        if not uri:
            continue
        scheme = parse_uri(uri)[0]
        if scheme == "hf" and not policy.allow_hf_sources:
            out.append(
                f"{path}: hf:// sources are disabled by the cluster policy allowHfSources=false; "
                "copy the files to S3 and use s3://bucket/prefix, or ask your admin"
            )
        if scheme == "file" and not policy.allow_private_endpoints:
            out.append(
                f"{path}: local paths are disabled by the cluster policy "
                "allowPrivateEndpoints=false (the trainer pod has no such volume and its files "
                "are lost when it exits); use s3://bucket/prefix"
            )
    return out


def _endpoint_violations(spec: LoRAJobSpec, namespace: str, policy: Policy) -> list[str]:
    endpoint = spec.storage.endpoint
    if not endpoint:
        return []
    out = []
    refusal = private_endpoint_refusal(endpoint)
    if refusal and not policy.allow_private_endpoints:
        out.append(
            f"spec.storage.endpoint: {endpoint}: {refusal}, blocked by the cluster policy "
            "allowPrivateEndpoints=false; use the storage service's cluster DNS name or "
            "public URL"
        )
    allowed = policy.allowed_s3_endpoints_by_namespace.get(namespace, policy.allowed_s3_endpoints)
    if allowed is not None and not any(
        fnmatch.fnmatchcase(_origin(endpoint), _origin(p)) for p in allowed
    ):
        out.append(
            f"spec.storage.endpoint: {endpoint} is not in the cluster policy "
            f"allowedS3Endpoints for namespace {namespace} ({allowed}); use one of them"
        )
    return out


def _output_violations(spec: LoRAJobSpec, namespace: str, policy: Policy) -> list[str]:
    prefixes = policy.allowed_output_prefixes_by_namespace.get(
        namespace, policy.allowed_output_prefixes
    )
    if prefixes is None:
        return []
    resolved = [p.replace("{namespace}", namespace) for p in prefixes]
    if any(_under_prefix(spec.output.uri, p) for p in resolved):
        return []
    return [
        f"spec.output.uri: {spec.output.uri} is outside the cluster policy "
        f"allowedOutputPrefixes for namespace {namespace} ({resolved}); write under one of them"
    ]
