"""The trainer pod builder: golden files, Pod Security "restricted", no secret values."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from lorajob_operator.api import LoRAJobSpec, parse_spec, spec_hash
from lorajob_operator.objects import (
    ANNOTATION_KUEUE_GROUP_TOTAL,
    ANNOTATION_KUEUE_RETRIABLE,
    ANNOTATION_SPEC_HASH,
    GANG_GATE,
    LABEL_KUEUE_POD_GROUP,
    JobRef,
    build_rendezvous_service,
    build_trainer_pod,
    build_trainer_pods,
    group_name,
    pod_name,
    pod_selector,
    rendezvous_service_name,
    selector_string,
)
from lorajob_operator.settings import OperatorSettings
from loraops_contract import protocol
from loraops_contract.config import TrainerConfig

GOLDEN = Path(__file__).parent / "golden"
REPO = Path(__file__).resolve().parents[3]
JOB = JobRef(name="llama-support", namespace="team-a", uid="0b7c4a6e-1f0d-4b7e-9a4e-2a1c3b5d6e7f")
MINIMAL: dict[str, Any] = {
    "model": {"uri": "s3://models/llama-3-8b"},
    "dataset": {"uri": "s3://data/train.jsonl"},
    "output": {"uri": "s3://adapters/llama-support"},
}


def full_spec() -> LoRAJobSpec:
    doc = yaml.safe_load((REPO / "examples" / "lorajob-full.yaml").read_text())
    return parse_spec(doc["spec"])


def full_settings() -> OperatorSettings:
    return OperatorSettings(
        trainer_service_account="lora-trainer",
        image_pull_secrets=["registry-creds"],
        runtime_class_name="nvidia",
        default_node_selector={"node-pool": "gpu"},
        cache_pvc_name="model-cache",
        trainer_extra_env={"HTTPS_PROXY": "http://proxy.corp:3128"},
    )


CASES: dict[str, tuple[LoRAJobSpec, OperatorSettings, int]] = {
    "minimal": (parse_spec(MINIMAL), OperatorSettings(), 1),
    "full": (full_spec(), full_settings(), 3),
    "mig": (
        parse_spec(
            MINIMAL
            | {
                "resources": {"gpus": 1, "gpuResourceName": "nvidia.com/mig-3g.40gb"},
                "storage": {"endpoint": "http://minio.storage.svc:9000", "credentialsSecret": "s3"},
            }
        ),
        OperatorSettings(),
        1,
    ),
    "queue": (
        parse_spec(MINIMAL | {"scheduling": {"queueName": "team-a-gpus"}}),
        OperatorSettings(kueue_default_queue="shared"),
        2,
    ),
    "cpu-namespace-queue": (
        parse_spec(MINIMAL | {"resources": {"gpus": 0, "cpu": "1", "memory": "2Gi"}}),
        OperatorSettings(kueue_namespace_queues={"team-a": "team-a-cpu"}),
        1,
    ),
    # One GPU per training process: torchrun with 8 ranks on one node.
    "multi-gpu": (
        parse_spec(
            MINIMAL
            | {
                "resources": {"gpus": 8, "cpu": "32", "memory": "256Gi"},
                "training": {"strategy": "fsdp"},
            }
        ),
        OperatorSettings(),
        1,
    ),
}
# Two nodes of 4 GPUs each: the pods of node rank 0 and 1 (gated by the operator, no
# Kueue), and a Kueue pod group.
NODES = MINIMAL | {"resources": {"gpus": 4, "nodes": 2, "cpu": "16", "memory": "128Gi"}}
CASES |= {
    "nodes-rank0": (parse_spec(NODES), OperatorSettings(), 2),
    "nodes-rank1": (parse_spec(NODES), OperatorSettings(), 2),
    "nodes-queue": (parse_spec(NODES), OperatorSettings(kueue_default_queue="shared"), 1),
}
RANKS = {"nodes-rank1": 1}


def build(case: str) -> dict[str, Any]:
    spec, settings, attempt = CASES[case]
    return build_trainer_pod(JOB, spec, settings, attempt, RANKS.get(case, 0))


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden(case: str) -> None:
    path = GOLDEN / f"pod-{case}.yaml"
    rendered = yaml.safe_dump(build(case), sort_keys=True, width=100)
    if os.environ.get("UPDATE_GOLDEN"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(rendered)
    assert path.exists(), f"{path} missing; run UPDATE_GOLDEN=1 pytest {__file__}"
    assert rendered == path.read_text(), (
        f"pod for case {case!r} changed; if intended, run UPDATE_GOLDEN=1 pytest {__file__} "
        "and review the diff"
    )


def test_golden_rendezvous_service() -> None:
    path = GOLDEN / "service-rendezvous.yaml"
    rendered = yaml.safe_dump(build_rendezvous_service(JOB, 2), sort_keys=True, width=100)
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(rendered)
    assert rendered == path.read_text(), (
        f"the rendezvous Service changed; if intended, run UPDATE_GOLDEN=1 pytest {__file__}"
    )
    kubernetes_validate.validate(build_rendezvous_service(JOB, 2), "1.35.0", strict=True)


def test_nodes_build_one_pod_per_node_that_meet_at_rank_0() -> None:
    """nodes: 2 gives two pods, named by node rank, whose torchrun arguments the trainer
    parses; the Service selects rank 0 of the same attempt only."""
    spec, settings, attempt = CASES["nodes-rank0"]
    pods = build_trainer_pods(JOB, spec, settings, attempt)
    assert [p["metadata"]["name"] for p in pods] == ["llama-support-2-n0", "llama-support-2-n1"]
    service = build_rendezvous_service(JOB, attempt)
    selected = [
        p for p in pods if service["spec"]["selector"].items() <= p["metadata"]["labels"].items()
    ]
    assert [p["metadata"]["name"] for p in selected] == ["llama-support-2-n0"]
    from lora_trainer.cli import _parser  # noqa: PLC0415 - the trainer side of the contract

    grace = settings.termination_grace_seconds
    for rank, pod in enumerate(pods):
        args = pod["spec"]["containers"][0]["args"]
        assert args == [
            "--nproc-per-node", "4", "--nnodes", "2", "--node-rank", str(rank),
            "--rdzv-endpoint", f"llama-support-2-rdzv.team-a.svc:{protocol.RENDEZVOUS_PORT}",
            "--rdzv-id", group_name(JOB, 2), "--shutdown-timeout", str(grace),
        ]  # fmt: skip
        assert pod["spec"]["schedulingGates"] == [{"name": GANG_GATE}]
        if _parser_knows_nodes():
            parsed = _parser().parse_args(args)
            assert (parsed.nnodes, parsed.node_rank) == (2, rank)
    # A single-node job keeps its names and arguments.
    single = build_trainer_pods(JOB, parse_spec(MINIMAL), OperatorSettings(), 1)
    assert [p["metadata"]["name"] for p in single] == ["llama-support-1"]


def _parser_knows_nodes() -> bool:
    """The trainer's launcher parses --nnodes once its side of issue 12 lands."""
    from lora_trainer.cli import _parser  # noqa: PLC0415

    return any("--nnodes" in a.option_strings for a in _parser()._actions)


def test_kueue_pod_group() -> None:
    """Through Kueue: one pod group per attempt (label and total count, not retriable in
    place), no operator gate (Kueue gates and admits the group)."""
    pod = build("nodes-queue")
    meta = pod["metadata"]
    assert meta["labels"][LABEL_KUEUE_POD_GROUP] == group_name(JOB, 1)
    assert meta["annotations"][ANNOTATION_KUEUE_GROUP_TOTAL] == "2"
    assert meta["annotations"][ANNOTATION_KUEUE_RETRIABLE] == "false"
    assert "schedulingGates" not in pod["spec"]


@pytest.mark.parametrize(
    ("job", "attempt", "expected"),
    [
        ("llama", 3, "llama-3-rdzv"),
        ("7b-run", 1, "lj-7b-run-1-rdzv"),
    ],
)
def test_rendezvous_service_name(job: str, attempt: int, expected: str) -> None:
    assert rendezvous_service_name(job, attempt) == expected


def test_long_names_stay_dns_labels() -> None:
    long = "x" * 63
    ref = JobRef(name=long, namespace="team-a", uid=JOB.uid)
    for name in (
        rendezvous_service_name(long, 120),
        group_name(ref, 120),
        pod_name(long, 120, 15),
        rendezvous_service_name("9" * 253, 3),
    ):
        assert len(name) <= 63, name
        assert name[0].isalnum(), name
        assert name[-1].isalnum(), name
    assert rendezvous_service_name("9" * 253, 3)[0].isalpha()


@pytest.mark.parametrize("case", sorted(CASES))
def test_pod_is_a_valid_kubernetes_pod(case: str) -> None:
    kubernetes_validate.validate(build(case), "1.35.0", strict=True)


_ALLOWED_VOLUME_TYPES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
    "persistentVolumeClaim", "projected", "secret",
}  # fmt: skip


def restricted_violations(pod: dict[str, Any]) -> list[str]:
    """Pod Security Standard "restricted" (v1.35) checks, as the admission plugin runs them."""
    spec = pod["spec"]
    out = []
    pod_sc = spec.get("securityContext") or {}
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(key):
            out.append(f"{key} must not be true")
    for volume in spec.get("volumes") or []:
        kinds = set(volume) - {"name"}
        if not kinds <= _ALLOWED_VOLUME_TYPES:
            out.append(f"volume {volume['name']} uses {kinds}")
    if pod_sc.get("runAsUser") == 0:
        out.append("pod runAsUser 0")
    if pod_sc.get("sysctls"):
        out.append("sysctls set")
    for c in spec.get("containers", []) + spec.get("initContainers", []):
        sc = c.get("securityContext") or {}
        name = c["name"]
        if sc.get("privileged"):
            out.append(f"{name}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{name}: allowPrivilegeEscalation must be false")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            out.append(f"{name}: capabilities must drop ALL")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            out.append(f"{name}: adds capabilities")
        if not (sc.get("runAsNonRoot") or pod_sc.get("runAsNonRoot")):
            out.append(f"{name}: runAsNonRoot must be true")
        if sc.get("runAsUser") == 0:
            out.append(f"{name}: runAsUser 0")
        seccomp = (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(f"{name}: seccompProfile must be RuntimeDefault or Localhost")
        if any(p.get("hostPort") for p in c.get("ports") or []):
            out.append(f"{name}: hostPort")
    return out


def test_restricted_checker_catches_violations() -> None:
    pod = build("minimal")
    container = pod["spec"]["containers"][0]
    del container["securityContext"]["capabilities"]
    container["securityContext"]["allowPrivilegeEscalation"] = True
    pod["spec"]["volumes"].append({"name": "h", "hostPath": {"path": "/"}})
    pod["spec"]["hostNetwork"] = True
    assert len(restricted_violations(pod)) == 4


@pytest.mark.parametrize("case", sorted(CASES))
def test_pod_meets_restricted_pod_security(case: str) -> None:
    pod = build(case)
    assert restricted_violations(pod) == []
    sc = pod["spec"]["containers"][0]["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True


def _env(pod: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}


@pytest.mark.parametrize("case", sorted(CASES))
def test_credentials_only_by_secret_reference(case: str) -> None:
    env = _env(build(case))
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "HF_TOKEN"):
        if name in env:
            assert "value" not in env[name]
            assert set(env[name]["valueFrom"]) == {"secretKeyRef"}


def test_full_pod_env_and_scheduling() -> None:
    pod = build("full")
    env = _env(pod)
    spec, _, _ = CASES["full"]
    config = json.loads(env[protocol.ENV_CONFIG]["value"])
    assert TrainerConfig.model_validate(config).to_wire() == config
    assert "resources" not in config
    assert "storage" not in config
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {
        "name": "s3-credentials",
        "key": "AWS_ACCESS_KEY_ID",
    }
    assert env["AWS_SESSION_TOKEN"]["valueFrom"]["secretKeyRef"]["optional"] is True
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "HF_TOKEN"}
    assert env["AWS_ENDPOINT_URL"]["value"] == "https://s3.us-east-1.amazonaws.com"
    assert env[protocol.ENV_PROGRESS_HOST]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert env[protocol.ENV_CACHE_DIR]["value"] == "/cache"
    assert env[protocol.ENV_ATTEMPT]["value"] == "3"
    assert env[protocol.ENV_JOB_NAME]["value"] == "team-a/llama-support"
    assert env["HTTPS_PROXY"]["value"] == "http://proxy.corp:3128"
    podspec = pod["spec"]
    assert podspec["nodeSelector"] == {
        "node-pool": "gpu",
        "topology.kubernetes.io/zone": "us-east-1a",
        "nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB",
    }
    assert podspec["tolerations"][0] == {
        "key": "nvidia.com/gpu",
        "operator": "Exists",
        "effect": "NoSchedule",
    }
    assert podspec["priorityClassName"] == "batch-low"
    assert podspec["serviceAccountName"] == "lora-trainer"
    assert podspec["automountServiceAccountToken"] is False
    assert podspec["restartPolicy"] == "Never"
    assert "activeDeadlineSeconds" not in podspec
    limits = podspec["containers"][0]["resources"]["limits"]
    assert limits == {"cpu": "8", "memory": "64Gi", "nvidia.com/gpu": "1"}
    assert pod["metadata"]["annotations"][ANNOTATION_SPEC_HASH] == spec_hash(spec)
    assert pod["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a-gpus"


def test_minimal_pod_uses_settings_defaults() -> None:
    pod = build("minimal")
    container = pod["spec"]["containers"][0]
    assert container["image"] == "ghcr.io/loraops/lora-trainer:0.1.0"
    assert container["command"] == ["python", "-m", "lora_trainer"]
    assert container["resources"]["requests"] == container["resources"]["limits"]
    assert container["terminationMessagePath"] == "/dev/termination-log"
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    env = _env(pod)
    assert "AWS_ACCESS_KEY_ID" not in env
    assert "AWS_ENDPOINT_URL" not in env
    assert env["AWS_DEFAULT_REGION"]["value"] == "us-east-1"
    assert env[protocol.ENV_CACHE_DIR]["value"] == "/scratch/cache"
    assert pod["metadata"]["ownerReferences"] == [
        {
            "apiVersion": "finetune.loraops.dev/v1alpha1",
            "kind": "LoRAJob",
            "name": JOB.name,
            "uid": JOB.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    assert "kueue.x-k8s.io/queue-name" not in pod["metadata"]["labels"]
    mounts = {m["mountPath"] for m in pod["spec"]["containers"][0]["volumeMounts"]}
    assert mounts == {"/scratch", "/tmp", "/dev/shm"}


def test_cpu_pod_requests_no_gpu_and_tolerates_nothing() -> None:
    pod = build("cpu-namespace-queue")
    assert pod["spec"]["containers"][0]["resources"]["limits"] == {"cpu": "1", "memory": "2Gi"}
    assert "tolerations" not in pod["spec"]
    assert pod["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a-cpu"


def test_queue_name_from_spec_beats_default() -> None:
    assert build("queue")["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a-gpus"


def test_mig_resource() -> None:
    limits = build("mig")["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/mig-3g.40gb"] == "1"
    assert "nvidia.com/gpu" not in limits


def test_pod_selector_matches_pod_labels() -> None:
    pod = build("minimal")
    assert pod_selector(JOB).items() <= pod["metadata"]["labels"].items()
    assert selector_string(JOB) == (
        "app.kubernetes.io/managed-by=lorajob-operator,"
        "finetune.loraops.dev/job-uid=0b7c4a6e-1f0d-4b7e-9a4e-2a1c3b5d6e7f"
    )


def test_long_job_name_labels_are_valid() -> None:
    job = JobRef(name="a" * 200, namespace="ns", uid="u")
    pod = build_trainer_pod(job, parse_spec(MINIMAL), OperatorSettings(), 1)
    assert all(len(v) <= 63 for v in pod["metadata"]["labels"].values())
    kubernetes_validate.validate(pod, "1.35.0", strict=True)


@pytest.mark.parametrize(
    ("job", "attempt", "expected"),
    [
        ("llama", 1, "llama-1"),
        ("llama", 12, "llama-12"),
        ("a" * 61, 1, "a" * 61 + "-1"),
    ],
)
def test_pod_name_short(job: str, attempt: int, expected: str) -> None:
    assert pod_name(job, attempt) == expected


def test_pod_name_long_and_dotted() -> None:
    long_a = pod_name("x" * 100 + "a", 1)
    long_b = pod_name("x" * 100 + "b", 1)
    assert len(long_a) <= 63
    assert long_a != long_b
    assert long_a.endswith("-1")
    assert pod_name("x" * 100 + "a", 1) == long_a  # deterministic
    dotted = pod_name("llama.v2", 3)
    assert "." not in dotted
    assert dotted != pod_name("llama-v2", 3)
    for name in (long_a, long_b, dotted, pod_name("a" * 253, 99)):
        assert len(name) <= 63
        assert name[0].isalnum()
        assert name[-1].isalnum()


def test_gpus_set_the_training_processes() -> None:
    """One GPU runs the trainer alone; N GPUs run it as torchrun's launcher with N
    ranks, given the pod's grace period to checkpoint on SIGTERM."""
    assert "args" not in build("minimal")["spec"]["containers"][0]
    container = build("multi-gpu")["spec"]["containers"][0]
    grace = OperatorSettings().termination_grace_seconds
    assert container["args"] == ["--nproc-per-node", "8", "--shutdown-timeout", str(grace)]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    # The trainer parses exactly these arguments.
    from lora_trainer.cli import _parser  # noqa: PLC0415 - the trainer side of the contract

    parsed = _parser().parse_args(container["args"])
    assert (parsed.nproc_per_node, parsed.shutdown_timeout) == (8, grace)


def test_trainer_command_override() -> None:
    settings = OperatorSettings(trainer_command=["python", "fake_trainer.py"])
    pod = build_trainer_pod(JOB, parse_spec(MINIMAL), settings, 1)
    assert pod["spec"]["containers"][0]["command"] == ["python", "fake_trainer.py"]


def test_trainer_reads_the_config_the_pod_carries() -> None:
    # The trainer's own loader (cli.load_config) must accept exactly what the pod sets.
    import argparse  # noqa: PLC0415

    from lora_trainer import cli  # noqa: PLC0415

    spec, _, _ = CASES["full"]
    env = {
        e["name"]: e["value"] for e in build("full")["spec"]["containers"][0]["env"] if "value" in e
    }
    args = argparse.Namespace(job=None, config=None)
    loaded = cli.load_config(args, env)
    assert loaded.config.to_wire() == json.loads(env[protocol.ENV_CONFIG])
    assert loaded.config.training.max_steps == spec.training.max_steps


def test_trainer_strips_the_same_kubernetes_fields() -> None:
    from lora_trainer import cli  # noqa: PLC0415

    spec_fields = {f.alias or n for n, f in LoRAJobSpec.model_fields.items()}
    trainer_fields = {f.alias or n for n, f in TrainerConfig.model_fields.items()}
    assert spec_fields - trainer_fields == set(cli.KUBERNETES_ONLY_FIELDS)
