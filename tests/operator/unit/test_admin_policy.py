"""check_policy: each rule, namespace-specific overrides, and the wording of violations."""

from __future__ import annotations

from typing import Any

import pytest
from lorajob_operator.api import LoRAJobSpec, parse_spec
from lorajob_operator.policy import Policy, check_policy, concurrency_limit
from lorajob_operator.settings import OperatorSettings

BASE: dict[str, Any] = {
    "model": {"uri": "s3://models/llama"},
    "dataset": {"uri": "s3://data/train.jsonl"},
    "output": {"uri": "s3://adapters/team-a/run-1"},
}


def spec(**extra: Any) -> LoRAJobSpec:
    return parse_spec(BASE | extra)


def test_default_policy_allows_a_plain_s3_job() -> None:
    assert check_policy(spec(), "team-a", Policy()) == []


def test_max_gpus() -> None:
    violations = check_policy(spec(resources={"gpus": 16}), "ns", Policy(max_gpus_per_job=8))
    assert violations == [
        "spec.resources.gpus: 16 exceeds the cluster policy maxGpusPerJob=8; ask for at most 8 GPUs"
    ]
    assert check_policy(spec(resources={"gpus": 8}), "ns", Policy(max_gpus_per_job=8)) == []
    # gpus is per node: a job on several nodes holds nodes x gpus.
    (violation,) = check_policy(
        spec(resources={"gpus": 8, "nodes": 2}), "ns", Policy(max_gpus_per_job=8)
    )
    assert violation.startswith("spec.resources.gpus: 8 per node x 2 nodes exceeds")


def test_gpu_resource_names_use_settings_default() -> None:
    policy = Policy(allowed_gpu_resource_names=["nvidia.com/mig-1g.10gb"])
    settings = OperatorSettings(gpu_resource_name="nvidia.com/mig-1g.10gb")
    default = settings.gpu_resource_name
    assert check_policy(spec(), "ns", policy, default_gpu_resource_name=default) == []
    (violation,) = check_policy(spec(), "ns", policy)  # default nvidia.com/gpu
    assert violation.startswith("spec.resources.gpuResourceName: nvidia.com/gpu")
    assert "allowedGpuResourceNames" in violation
    # CPU-only jobs request no GPU resource at all.
    assert check_policy(spec(resources={"gpus": 0}), "ns", policy) == []


def test_gpu_products() -> None:
    policy = Policy(allowed_gpu_products=["NVIDIA-H100-80GB-HBM3"])
    (v,) = check_policy(spec(resources={"gpuProduct": "NVIDIA-A100"}), "ns", policy)
    assert v.startswith("spec.resources.gpuProduct: NVIDIA-A100")
    assert "drop gpuProduct" in v
    assert check_policy(spec(), "ns", policy) == []


@pytest.mark.parametrize(
    ("image", "allowed"),
    [
        ("ghcr.io/loraops/lora-trainer:0.2.0", True),
        ("registry.corp/ml/trainer:1", True),
        ("docker.io/evil/miner:latest", False),
        ("ghcr.io/loraops-fork/lora-trainer:1", False),
    ],
)
def test_allowed_images(image: str, allowed: bool) -> None:
    policy = Policy(allowed_images=["ghcr.io/loraops/*", "registry.corp/"])
    violations = check_policy(spec(image=image), "ns", policy)
    assert (violations == []) is allowed
    if not allowed:
        assert violations[0].startswith(f"spec.image: {image}")
        assert "remove spec.image" in violations[0]


def test_operator_image_is_always_allowed() -> None:
    settings = OperatorSettings(trainer_image="quay.io/me/trainer:9")
    policy = Policy(allowed_images=["ghcr.io/*"])
    image = spec(image="quay.io/me/trainer:9")
    assert check_policy(image, "ns", policy, default_image=settings.trainer_image) == []


def test_hf_sources() -> None:
    job = spec(model={"uri": "hf://meta-llama/Llama-3-8B"}, dataset={"uri": "hf://org/ds"})
    violations = check_policy(job, "ns", Policy())
    assert [v.split(":")[0] for v in violations] == ["spec.model.uri", "spec.dataset.uri"]
    assert "allowHfSources=false" in violations[0]
    assert "s3://" in violations[0]
    assert check_policy(job, "ns", Policy(allow_hf_sources=True)) == []


def test_trust_remote_code() -> None:
    job = spec(model={"uri": "s3://models/x", "trustRemoteCode": True})
    (v,) = check_policy(job, "ns", Policy())
    assert v.startswith("spec.model.trustRemoteCode:")
    assert "allowTrustRemoteCode=false" in v
    assert check_policy(job, "ns", Policy(allow_trust_remote_code=True)) == []


@pytest.mark.parametrize(
    "endpoint",
    ["http://127.0.0.1:9000", "http://localhost:9000", "http://169.254.169.254", "http://[::1]"],
)
def test_private_endpoints_blocked(endpoint: str) -> None:
    job = spec(storage={"endpoint": endpoint, "credentialsSecret": "s3"})
    (v,) = check_policy(job, "ns", Policy())
    assert v.startswith("spec.storage.endpoint:")
    assert "allowPrivateEndpoints=false" in v
    assert check_policy(job, "ns", Policy(allow_private_endpoints=True)) == []


def test_local_paths_blocked_unless_private_allowed() -> None:
    job = spec(model={"uri": "/models/tiny"}, output={"uri": "/out/x"})
    violations = check_policy(job, "ns", Policy())
    assert [v.split(":")[0] for v in violations] == ["spec.model.uri", "spec.output.uri"]
    assert check_policy(job, "ns", Policy(allow_private_endpoints=True)) == []


def test_s3_endpoints_per_namespace() -> None:
    policy = Policy(
        allowed_s3_endpoints=["https://*.s3.corp"],
        allowed_s3_endpoints_by_namespace={"lab": ["http://minio.lab.svc:9000"]},
    )
    corp = spec(storage={"endpoint": "https://eu.s3.corp/", "credentialsSecret": "s"})
    lab = spec(storage={"endpoint": "http://minio.lab.svc:9000", "credentialsSecret": "s"})
    assert check_policy(corp, "team-a", policy) == []
    assert check_policy(lab, "lab", policy) == []
    (v,) = check_policy(lab, "team-a", policy)
    assert "allowedS3Endpoints for namespace team-a" in v
    (v,) = check_policy(corp, "lab", policy)
    assert "http://minio.lab.svc:9000" in v
    # No endpoint = AWS; not restricted by the endpoint list.
    assert check_policy(spec(), "team-a", policy) == []


def test_output_prefixes_with_namespace_placeholder() -> None:
    policy = Policy(
        allowed_output_prefixes=["s3://adapters/{namespace}"],
        allowed_output_prefixes_by_namespace={"research": ["s3://scratch/"]},
    )
    assert check_policy(spec(), "team-a", policy) == []
    (v,) = check_policy(spec(), "team-b", policy)
    assert v.startswith("spec.output.uri: s3://adapters/team-a/run-1 is outside")
    assert "s3://adapters/team-b" in v
    # A prefix without a trailing slash is a path boundary, not a string prefix.
    evil = spec(output={"uri": "s3://adapters/team-ab/x"})
    assert check_policy(evil, "team-a", policy) != []
    assert check_policy(spec(output={"uri": "s3://scratch/x"}), "research", policy) == []
    assert check_policy(spec(), "research", policy) != []


def test_priority_classes() -> None:
    policy = Policy(allowed_priority_class_names=["batch-low"])
    ok = spec(scheduling={"priorityClassName": "batch-low"})
    bad = spec(scheduling={"priorityClassName": "system-cluster-critical"})
    assert check_policy(ok, "ns", policy) == []
    (v,) = check_policy(bad, "ns", policy)
    assert v.startswith("spec.scheduling.priorityClassName: system-cluster-critical")


def test_all_violations_reported_together() -> None:
    job = spec(
        resources={"gpus": 4},
        model={"uri": "hf://a/b", "trustRemoteCode": True},
        image="docker.io/x/y:1",
    )
    policy = Policy(max_gpus_per_job=2, allowed_images=["ghcr.io/*"])
    assert len(check_policy(job, "ns", policy)) == 4


def test_concurrency_limit() -> None:
    policy = Policy(
        max_concurrent_jobs_per_namespace={"team-a": 2, "free": 0},
        max_concurrent_jobs_default=5,
    )
    assert concurrency_limit(policy, "team-a") == 2
    assert concurrency_limit(policy, "free") == 0
    assert concurrency_limit(policy, "other") == 5
    assert concurrency_limit(Policy(), "x") is None


def test_policy_accepts_camel_case_and_rejects_typos() -> None:
    assert Policy.model_validate({"maxGpusPerJob": 3}).max_gpus_per_job == 3
    with pytest.raises(ValueError, match="maxGpus"):
        Policy.model_validate({"maxGpus": 3})


def test_chart_default_policy_parses() -> None:
    # The chart renders values.policy into LORAJOB_POLICY; a key Policy does not know
    # would stop the operator at start-up.
    from pathlib import Path  # noqa: PLC0415

    import yaml  # noqa: PLC0415

    values = Path(__file__).resolve().parents[3] / "helm" / "lorajob-operator" / "values.yaml"
    assert values.exists(), f"the chart's values are missing: {values}"
    policy = Policy.model_validate(yaml.safe_load(values.read_text())["policy"])
    assert policy == Policy()  # the chart's defaults are the operator's defaults
