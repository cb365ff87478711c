"""parse_spec: every malformed spec is rejected with the field path and a fix."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from lorajob_operator.api import (
    InvalidSpecError,
    LoRAJobSpec,
    Phase,
    ProgressStatus,
    parse_spec,
    parse_status,
    private_endpoint_refusal,
    spec_changes,
    spec_hash,
    status_patch,
    trainer_config,
)
from loraops_contract.config import TrainerConfig

BASE: dict[str, Any] = {
    "model": {"uri": "s3://models/llama-3-8b"},
    "dataset": {"uri": "s3://data/train.jsonl"},
    "output": {"uri": "s3://adapters/run-1"},
}


def with_(path: str, value: Any) -> dict[str, Any]:
    """BASE with `value` set at dotted `path` (value DELETE removes the key)."""
    spec = copy.deepcopy(BASE)
    *parents, leaf = path.split(".")
    node = spec
    for part in parents:
        node = node.setdefault(part, {})
    if value is DELETE:
        node.pop(leaf, None)
    else:
        node[leaf] = value
    return spec


DELETE = object()

# (spec, field path that must be named, a word of the fix that must be suggested)
MALFORMED: list[tuple[str, dict[str, Any], str, str]] = [
    ("model missing", with_("model", DELETE), "spec.model", "add it"),
    ("dataset missing", with_("dataset", DELETE), "spec.dataset", "add it"),
    ("output missing", with_("output", DELETE), "spec.output", "add it"),
    ("model not object", with_("model", "llama"), "spec.model", "key: value"),
    ("model uri empty", with_("model.uri", ""), "spec.model.uri", "at least 1"),
    ("model uri scheme", with_("model.uri", "gs://b/m"), "spec.model.uri", "s3://"),
    ("model uri relative", with_("model.uri", "models/llama"), "spec.model.uri", "absolute"),
    ("model bad bucket", with_("model.uri", "s3://UPPER/x"), "spec.model.uri", "lowercase"),
    ("bad hf uri", with_("model.uri", "hf://"), "spec.model.uri", "hf://<org>/<name>"),
    (
        "trustRemoteCode type",
        with_("model.trustRemoteCode", "maybe"),
        "spec.model.trustRemoteCode",
        "boolean",
    ),
    ("dataset format", with_("dataset.format", "csv"), "spec.dataset.format", "'alpaca'"),
    (
        "evalSplit too big",
        with_("dataset.evalSplit", 0.7),
        "spec.dataset.evalSplit",
        "less than 0.5",
    ),
    (
        "maxRecords zero",
        with_("dataset.maxRecords", 0),
        "spec.dataset.maxRecords",
        "greater than 0",
    ),
    ("output to hub", with_("output.uri", "hf://org/adapter"), "spec.output.uri", "s3://"),
    ("lora rank zero", with_("lora.r", 0), "spec.lora.r", "greater than or equal to 1"),
    ("lora alpha text", with_("lora.alpha", "big"), "spec.lora.alpha", "integer"),
    ("lora dropout 1", with_("lora.dropout", 1.0), "spec.lora.dropout", "less than 1"),
    (
        "targetModules word",
        with_("lora.targetModules", "all"),
        "spec.lora.targetModules",
        "all-linear",
    ),
    (
        "targetModules empty",
        with_("lora.targetModules", []),
        "spec.lora.targetModules",
        "at least one",
    ),
    (
        "fsdp+int8",
        with_("quantization.mode", "int8") | {"training": {"strategy": "fsdp"}},
        "training.strategy",
        "int8",
    ),
    (
        "dora+int8",
        with_("quantization.mode", "int8") | {"lora": {"useDora": True}},
        "lora.useDora",
        "nf4",
    ),
    ("quant mode", with_("quantization.mode", "4bit"), "spec.quantization.mode", "'nf4'"),
    (
        "compute dtype",
        with_("quantization.computeDtype", "fp16"),
        "spec.quantization.computeDtype",
        "'float16'",
    ),
    (
        "learning rate negative",
        with_("training.learningRate", -1),
        "spec.training.learningRate",
        "greater than 0",
    ),
    (
        "learningrate typo",
        with_("training.learningrate", 1e-4),
        "spec.training.learningrate",
        "learningRate",
    ),
    (
        "learningRate misplaced",
        with_("learningRate", 1e-4),
        "spec.learningRate",
        "spec.training.learningRate",
    ),
    (
        "batch size zero",
        with_("training.batchSize", 0),
        "spec.training.batchSize",
        "greater than or equal to 1",
    ),
    (
        "seq length tiny",
        with_("training.maxSeqLength", 8),
        "spec.training.maxSeqLength",
        "greater than or equal to 16",
    ),
    ("optimizer", with_("training.optimizer", "adam"), "spec.training.optimizer", "'adamw_torch'"),
    ("scheduler", with_("training.scheduler", "step"), "spec.training.scheduler", "'cosine'"),
    ("epochs zero", with_("training.epochs", 0), "spec.training.epochs", "greater than 0"),
    (
        "checkpoint every 0",
        with_("training.checkpointEverySteps", 0),
        "spec.training.checkpointEverySteps",
        "greater than or equal to 1",
    ),
    (
        "gpus negative",
        with_("resources.gpus", -1),
        "spec.resources.gpus",
        "greater than or equal to 0",
    ),
    (
        "gpus too many",
        with_("resources.gpus", 65),
        "spec.resources.gpus",
        "less than or equal to 64",
    ),
    ("gpus text", with_("resources.gpus", "two"), "spec.resources.gpus", "integer"),
    (
        "nodes zero",
        with_("resources.nodes", 0),
        "spec.resources.nodes",
        "greater than or equal to 1",
    ),
    (
        "nodes too many",
        with_("resources.nodes", 17),
        "spec.resources.nodes",
        "less than or equal to 16",
    ),
    (
        "nodes x gpus too many",
        {**BASE, "resources": {"gpus": 64, "nodes": 5}},
        "spec.resources.nodes",
        "fewer nodes or fewer GPUs per node",
    ),
    (
        "fsdp on cpu nodes",
        {**BASE, "resources": {"gpus": 0, "nodes": 2}, "training": {"strategy": "fsdp"}},
        "spec.training.strategy",
        "gpus 1 on 2 or more nodes",
    ),
    (
        "gpu resource name",
        with_("resources.gpuResourceName", "gpu"),
        "spec.resources.gpuResourceName",
        "nvidia.com/gpu",
    ),
    (
        "gpu resource builtin",
        with_("resources.gpuResourceName", "kubernetes.io/cpu"),
        "spec.resources.gpuResourceName",
        "device plugin",
    ),
    (
        "MIG times two",
        with_("resources.gpuResourceName", "nvidia.com/mig-1g.10gb")
        | {"resources": {"gpuResourceName": "nvidia.com/mig-1g.10gb", "gpus": 2}},
        "spec.resources",
        "gpus: 1",
    ),
    (
        "gpuProduct without gpus",
        {**BASE, "resources": {"gpus": 0, "gpuProduct": "NVIDIA-A100"}},
        "spec.resources",
        "drop gpuProduct",
    ),
    (
        "gpuProduct spaces",
        with_("resources.gpuProduct", "NVIDIA A100"),
        "spec.resources.gpuProduct",
        "letters, digits",
    ),
    ("memory GB", with_("resources.memory", "16GB"), "spec.resources.memory", "16Gi"),
    ("memory negative", with_("resources.memory", "-1Gi"), "spec.resources.memory", "16Gi"),
    ("cpu zero", with_("resources.cpu", "0"), "spec.resources.cpu", "greater than zero"),
    ("gpus at top level", with_("gpus", 2), "spec.gpus", "spec.resources.gpus"),
    (
        "node selector key",
        with_("scheduling.nodeSelector", {"bad key": "x"}),
        "spec.scheduling.nodeSelector",
        "prefix/",
    ),
    (
        "node selector value",
        with_("scheduling.nodeSelector", {"a": "b c"}),
        "spec.scheduling.nodeSelector",
        "letters, digits",
    ),
    (
        "toleration operator",
        with_("scheduling.tolerations", [{"key": "a", "operator": "In"}]),
        "spec.scheduling.tolerations.0.operator",
        "'Exists'",
    ),
    (
        "toleration exists value",
        with_("scheduling.tolerations", [{"key": "a", "operator": "Exists", "value": "x"}]),
        "spec.scheduling.tolerations.0",
        "drop value",
    ),
    (
        "toleration seconds",
        with_(
            "scheduling.tolerations",
            [{"key": "a", "operator": "Exists", "effect": "NoSchedule", "tolerationSeconds": 5}],
        ),
        "spec.scheduling.tolerations.0",
        "NoExecute",
    ),
    (
        "affinity junk",
        with_("scheduling.affinity", {"nodeAfinity": {}}),
        "spec.scheduling.affinity",
        "nodeAffinity",
    ),
    (
        "priority class",
        with_("scheduling.priorityClassName", "High_Prio"),
        "spec.scheduling.priorityClassName",
        "lowercase",
    ),
    (
        "queue name",
        with_("scheduling.queueName", "Team A"),
        "spec.scheduling.queueName",
        "lowercase",
    ),
    (
        "endpoint scheme",
        with_("storage.endpoint", "minio:9000"),
        "spec.storage.endpoint",
        "http://",
    ),
    (
        "endpoint creds",
        with_("storage.endpoint", "https://AKIA:s3cr3t@minio"),
        "spec.storage.endpoint",
        "credentialsSecret",
    ),
    (
        "endpoint port",
        with_("storage.endpoint", "http://minio:99999"),
        "spec.storage.endpoint",
        "1-65535",
    ),
    (
        "secret name",
        with_("storage.credentialsSecret", "S3_Creds"),
        "spec.storage.credentialsSecret",
        "lowercase",
    ),
    (
        "hf secret name",
        with_("storage.hfTokenSecret", "hf token"),
        "spec.storage.hfTokenSecret",
        "lowercase",
    ),
    ("region", with_("storage.region", "US East"), "spec.storage.region", "lowercase"),
    (
        "custom endpoint no creds",
        with_("storage.endpoint", "https://minio.example.com"),
        "spec.storage.credentialsSecret",
        "AWS_ACCESS_KEY_ID",
    ),
    ("image", with_("image", "Ghcr.io/Foo/Bar:latest"), "spec.image", "lowercase repository"),
    ("image spaces", with_("image", "my image"), "spec.image", "repository[:tag]"),
    (
        "backoffLimit negative",
        with_("backoffLimit", -1),
        "spec.backoffLimit",
        "greater than or equal to 0",
    ),
    (
        "backoffLimit huge",
        with_("backoffLimit", 1000),
        "spec.backoffLimit",
        "less than or equal to 100",
    ),
    (
        "deadline zero",
        with_("activeDeadlineSeconds", 0),
        "spec.activeDeadlineSeconds",
        "greater than 0",
    ),
    (
        "ttl negative",
        with_("ttlSecondsAfterFinished", -5),
        "spec.ttlSecondsAfterFinished",
        "greater than or equal to 0",
    ),
    ("suspend text", with_("suspend", "sometimes"), "spec.suspend", "boolean"),
    (
        "paged optimizer on cpu",
        {**BASE, "resources": {"gpus": 0}, "training": {"optimizer": "paged_adamw_8bit"}},
        "spec.training.optimizer",
        "adamw_torch",
    ),
    (
        "fsdp on one gpu",
        {**BASE, "resources": {"gpus": 1}, "training": {"strategy": "fsdp"}},
        "spec.training.strategy",
        "gpus to 2 or more",
    ),
    (
        "eval every without data",
        {
            **BASE,
            "dataset": {"uri": "s3://data/t.jsonl", "evalSplit": 0},
            "training": {"evalEverySteps": 10},
        },
        "spec.training.evalEverySteps",
        "evalSplit",
    ),
    ("unknown section", with_("hyperparameters", {}), "spec.hyperparameters", "remove it"),
    (
        "targetModules number",
        with_("lora.targetModules", 5),
        "spec.lora.targetModules",
        "all-linear",
    ),
    (
        "targetModules mixed",
        with_("lora.targetModules", ["q_proj", 3]),
        "spec.lora.targetModules",
        "q_proj, v_proj",
    ),
    (
        "memory unquoted",
        with_("resources.memory", 16),
        "spec.resources.memory",
        'quote it, e.g. "16"',
    ),
    (
        "tolerations map",
        with_("scheduling.tolerations", {"key": "a"}),
        "spec.scheduling.tolerations",
        "YAML list",
    ),
    (
        "too many prompts",
        with_("evaluation.prompts", ["what color is the sky"] * 9),
        "spec.evaluation.prompts",
        "at most 8",
    ),
    (
        "empty prompt",
        with_("evaluation.prompts", [""]),
        "spec.evaluation.prompts.0",
        "at least 1",
    ),
    (
        "mlflow uri not http",
        with_("tracking.mlflow", {"trackingUri": "ftp://mlflow"}),
        "spec.tracking.mlflow.trackingUri",
        "http://mlflow.mlflow.svc:5000",
    ),
    (
        "mlflow secret name",
        with_("tracking.mlflow", {"trackingUri": "http://mlflow:5000", "credentialsSecret": "A_b"}),
        "spec.tracking.mlflow.credentialsSecret",
        "lowercase letters",
    ),
    (
        "wandb online without key",
        with_("tracking.wandb", {"project": "support-bot"}),
        "spec.tracking.wandb.apiKeySecret",
        "WANDB_API_KEY",
    ),
]


def test_table_is_large_enough() -> None:
    assert len(MALFORMED) >= 40
    assert len({m[0] for m in MALFORMED}) == len(MALFORMED)


@pytest.mark.parametrize(
    ("spec", "field", "fix"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED]
)
def test_malformed_spec_is_rejected_with_field_and_fix(
    spec: dict[str, Any], field: str, fix: str
) -> None:
    with pytest.raises(InvalidSpecError) as info:
        parse_spec(spec)
    message = info.value.message
    assert field in message, message
    assert fix in message, message
    # Every line names a field under spec.
    assert all(p.startswith("spec") for p in info.value.problems), info.value.problems
    # One line per problem: a union field (targetModules) is not reported once per branch.
    assert len(info.value.problems) == len(set(info.value.problems))


def test_every_problem_is_reported_at_once() -> None:
    spec = with_("resources", {"gpus": -1, "memory": "1GB"}) | {"training": {"batchSize": 0}}
    with pytest.raises(InvalidSpecError) as info:
        parse_spec(spec)
    assert len(info.value.problems) == 3
    assert "spec.resources.gpus" in info.value.message
    assert "spec.resources.memory" in info.value.message
    assert "spec.training.batchSize" in info.value.message


def test_credentials_in_endpoint_are_never_echoed() -> None:
    with pytest.raises(InvalidSpecError) as info:
        parse_spec(with_("storage.endpoint", "ftp://AKIAXXXX:topsecret@minio"))
    assert "topsecret" not in info.value.message
    assert "AKIAXXXX" not in info.value.message


def test_long_bad_values_are_truncated() -> None:
    with pytest.raises(InvalidSpecError) as info:
        parse_spec(with_("training.optimizer", "x" * 5000))
    assert len(info.value.message) < 600


def test_non_mapping_spec() -> None:
    with pytest.raises(InvalidSpecError, match=r"^spec: must be an object"):
        parse_spec([1, 2])  # type: ignore[arg-type]


def test_minimal_spec_gets_defaults() -> None:
    spec = parse_spec(BASE)
    assert spec.resources.gpus == 1
    assert spec.resources.gpu_resource_name is None  # operator setting applies
    assert spec.storage.region == "us-east-1"
    assert spec.backoff_limit == 3
    assert spec.suspend is False
    assert spec.lora.target_modules == "all-linear"


def test_snake_case_is_accepted_too() -> None:
    spec = parse_spec(BASE | {"backoff_limit": 1, "training": {"learning_rate": 1e-4}})
    assert spec.backoff_limit == 1
    assert spec.training.learning_rate == 1e-4


def test_valid_full_spec() -> None:
    spec = parse_spec(
        BASE
        | {
            "resources": {
                "gpus": 1,
                "gpuResourceName": "nvidia.com/mig-3g.40gb",
                "cpu": "500m",
                "memory": "1.5e9",
            },
            "scheduling": {
                "nodeSelector": {"topology.kubernetes.io/zone": "eu-west-1a"},
                "tolerations": [{"operator": "Exists"}, {"key": "spot", "value": "true"}],
                "affinity": {"nodeAffinity": {}},
                "queueName": "team-a",
            },
            "storage": {
                "endpoint": "http://minio.storage.svc:9000/",
                "credentialsSecret": "s3-creds",
                "hfTokenSecret": "hf-token",
            },
            "image": "registry.local:5000/ml/lora-trainer:1.2@sha256:" + "a" * 64,
            "activeDeadlineSeconds": 3600,
            "ttlSecondsAfterFinished": 0,
        }
    )
    assert spec.storage.endpoint == "http://minio.storage.svc:9000"  # trailing / dropped


def test_cpu_job_with_quantization_is_allowed() -> None:
    # bitsandbytes NF4/int8 work on CPU; the trainer computes in float32 there.
    spec = parse_spec(BASE | {"resources": {"gpus": 0}, "quantization": {"mode": "int8"}})
    assert spec.resources.gpus == 0


def test_local_paths_parse() -> None:
    # Whether a pod may use them is the admin policy's call (allowPrivateEndpoints).
    spec = parse_spec(BASE | {"model": {"uri": "/models/tiny"}, "output": {"uri": "/out/a"}})
    assert spec.model.uri == "/models/tiny"


def test_trainer_config_strips_kubernetes_fields() -> None:
    spec = parse_spec(BASE | {"resources": {"gpus": 2}, "suspend": True, "image": "a/b:1"})
    config = trainer_config(spec)
    assert type(config) is TrainerConfig
    wire = config.to_wire()
    assert set(wire) == {
        "model",
        "dataset",
        "lora",
        "quantization",
        "training",
        "output",
        "evaluation",
        "tracking",
    }
    assert TrainerConfig.model_validate(wire) == config


def test_spec_hash_ignores_control_fields() -> None:
    base = parse_spec(BASE)
    assert spec_hash(base) == spec_hash(parse_spec(BASE | {"suspend": True, "backoffLimit": 9}))
    assert spec_hash(base) == spec_hash(parse_spec(BASE | {"ttlSecondsAfterFinished": 5}))
    assert spec_hash(base) != spec_hash(parse_spec(BASE | {"training": {"learningRate": 1e-5}}))
    assert spec_hash(base) != spec_hash(parse_spec(BASE | {"resources": {"gpus": 2}}))
    # Spelling a default explicitly is the same spec.
    assert spec_hash(base) == spec_hash(parse_spec(BASE | {"lora": {"r": 16}}))


def test_spec_model_is_lorajob_spec() -> None:
    assert issubclass(LoRAJobSpec, TrainerConfig)


@pytest.mark.parametrize(
    ("url", "private"),
    [
        ("http://localhost:9000", True),
        ("http://127.0.0.1:9000", True),
        ("http://[::1]:9000", True),
        ("http://169.254.169.254", True),
        ("http://metadata.google.internal", True),
        ("http://0.0.0.0", True),
        ("https://s3.amazonaws.com", False),
        ("http://minio.storage.svc:9000", False),
        ("http://10.0.0.5:9000", False),
    ],
)
def test_private_endpoints(url: str, private: bool) -> None:
    assert (private_endpoint_refusal(url) is not None) is private


def test_status_parses_garbage_without_failing() -> None:
    status = parse_status(
        {
            "phase": "Exploded",
            "attempts": "many",
            "failedAttempts": 2,
            "conditions": [{"type": "Running", "status": "True", "reason": "TrainerRunning"}],
            "progress": {"step": 5, "totalSteps": 10, "percent": 50.0, "futureField": 1},
            "somethingNew": {"a": 1},
        }
    )
    assert status.phase is None
    assert status.attempts == 0
    assert status.failed_attempts == 2
    assert status.progress is not None
    assert status.progress.total_steps == 10
    assert status.conditions[0].reason == "TrainerRunning"
    assert parse_status(None).attempts == 0


def test_status_round_trip() -> None:
    status = parse_status({"phase": "Running", "specHash": "abc", "podName": "p-1"})
    assert status.phase is Phase.RUNNING
    assert status.to_wire()["specHash"] == "abc"
    assert parse_status(status.to_wire()) == status


def test_status_patch_is_the_merge_patch_between_two_statuses() -> None:
    before = parse_status(
        {"attempts": 2, "failedAttempts": 1, "podName": "p-2", "progress": {"step": 5, "loss": 1.5}}
    )
    after = before.model_copy(deep=True)
    assert status_patch(before, after) == {}
    after.pod_name = None  # back to its default: removed
    after.failed_attempts = 0  # a counter back to 0: removed
    after.attempts = 2  # unchanged: not written
    after.progress = ProgressStatus(step=6)  # only what was set: the stored loss stays
    after.hint = "h"
    assert status_patch(before, after) == {
        "podName": None,
        "failedAttempts": None,
        "progress": {"step": 6},
        "hint": "h",
    }


def test_the_global_batch_decides_whether_more_gpus_resume_the_run() -> None:
    """GPUs x batchSize rows make each accumulation step: keeping that product keeps the
    run (and its checkpoints); more GPUs at the same batchSize are a new run."""
    one = parse_spec({**BASE, "resources": {"gpus": 1}, "training": {"batchSize": 8}})
    same_rows = parse_spec({**BASE, "resources": {"gpus": 2}, "training": {"batchSize": 4}})
    more_rows = parse_spec({**BASE, "resources": {"gpus": 2}, "training": {"batchSize": 8}})
    kept = spec_changes(one, same_rows)
    assert kept.new_run == []
    assert set(kept.resumable) == {"resources.gpus", "training.batchSize"}
    assert spec_changes(one, more_rows).new_run == ["resources.gpus"]


def test_nodes_count_in_the_global_batch_as_gpus_do() -> None:
    """gpus is per node: 2 nodes of 2 GPUs are 4 ranks. A change of nodes that keeps the
    global batch resumes the run; one that changes it is a new run, named by nodes."""
    two = parse_spec({**BASE, "resources": {"gpus": 2}, "training": {"batchSize": 4}})
    four = parse_spec({**BASE, "resources": {"gpus": 2, "nodes": 2}, "training": {"batchSize": 2}})
    assert spec_changes(two, four).new_run == []
    more = parse_spec({**BASE, "resources": {"gpus": 2, "nodes": 2}, "training": {"batchSize": 4}})
    assert spec_changes(two, more).new_run == ["resources.nodes"]
