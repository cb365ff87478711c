"""Every Kubernetes object the operator creates, built by pure functions.

No I/O here: the builders take the job, its parsed spec and the settings and return
plain dicts ready for the API. Golden-file tests pin their output.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from loraops_contract import protocol

from lorajob_operator import names
from lorajob_operator.api import API_VERSION, GROUP, KIND, LoRAJobSpec, spec_hash, trainer_config
from lorajob_operator.settings import OperatorSettings

__all__ = [
    "ANNOTATION_KUEUE_GROUP_TOTAL",
    "ANNOTATION_KUEUE_RETRIABLE",
    "ANNOTATION_NODES",
    "ANNOTATION_SPEC_HASH",
    "CONTAINER_NAME",
    "GANG_GATE",
    "LABEL_ATTEMPT",
    "LABEL_JOB",
    "LABEL_JOB_UID",
    "LABEL_KUEUE_POD_GROUP",
    "LABEL_KUEUE_QUEUE",
    "LABEL_NODE_RANK",
    "MANAGED_BY",
    "JobRef",
    "build_rendezvous_service",
    "build_trainer_pod",
    "build_trainer_pods",
    "group_name",
    "group_size",
    "node_rank",
    "owner_reference",
    "pod_labels",
    "pod_name",
    "pod_selector",
    "rendezvous_service_name",
    "selector_string",
]

CONTAINER_NAME = "trainer"
LABEL_JOB = f"{GROUP}/job"
LABEL_JOB_UID = f"{GROUP}/job-uid"
LABEL_ATTEMPT = f"{GROUP}/attempt"
LABEL_KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"
ANNOTATION_SPEC_HASH = f"{GROUP}/spec-hash"
MANAGED_BY = "lorajob-operator"
# A job on several nodes (spec.resources.nodes > 1): each pod's node rank, and how many
# pods its attempt has (what decide() waits for and counts, whatever the spec says now).
LABEL_NODE_RANK = f"{GROUP}/node-rank"
ANNOTATION_NODES = f"{GROUP}/nodes"
# Without Kueue, every pod of such a job is created behind this scheduling gate, and the
# operator removes it from all of them at once, when all exist (reconcile.py).
GANG_GATE = f"{GROUP}/gang"
# Kueue's plain-pod groups (v0.17, pkg/controller/jobs/pod/constants): pods with the same
# group name form one Workload, admitted once all total-count pods exist. With
# retriable-in-group "false" a failed pod ends the group (Kueue releases its quota
# instead of waiting for a replacement): the operator replaces the whole group, under a
# new group name, on the next attempt.
LABEL_KUEUE_POD_GROUP = "kueue.x-k8s.io/pod-group-name"
ANNOTATION_KUEUE_GROUP_TOTAL = "kueue.x-k8s.io/pod-group-total-count"
ANNOTATION_KUEUE_RETRIABLE = "kueue.x-k8s.io/retriable-in-group"
RENDEZVOUS_PORT_NAME = "c10d"

SCRATCH_DIR = protocol.DEFAULT_WORK_DIR  # /scratch
CACHE_MOUNT = "/cache"
UID = 1000  # the trainer image's non-root user
TMP_SIZE_LIMIT = "2Gi"
TRAINER_COMMAND = ("python", "-m", "lora_trainer")


@dataclass(frozen=True)
class JobRef:
    """The identity of a LoRAJob, enough to name and own its objects."""

    name: str
    namespace: str
    uid: str


def pod_name(job_name: str, attempt: int, rank: int | None = None) -> str:
    """`<job>-<attempt>`, or `<job>-<attempt>-n<rank>` for the pod of node rank `rank`
    of a job on several nodes: deterministic, a DNS-1123 label (<= 63 chars).

    Deterministic so that a retried create after a lost response finds the pod it
    already made (409) instead of making a second one. Long or dotted job names are
    shortened and get a hash of the full name, so two such jobs never collide.
    """
    suffix = f"-{attempt}" if rank is None else f"-{attempt}-n{rank}"
    candidate = job_name + suffix
    if len(candidate) <= 63 and "." not in job_name:
        return candidate
    digest = names.short_hash(job_name)
    room = 63 - len(suffix) - len(digest) - 1
    base = re.sub(r"[^a-z0-9-]", "-", job_name)[:room].strip("-")
    return f"{base}-{digest}{suffix}" if base else f"{digest}{suffix}"


def group_name(job: JobRef, attempt: int) -> str:
    """The pod group of one attempt of a job on several nodes: Kueue's pod-group name and
    torchrun's rendezvous id. `<job>-<attempt>-<hash of the job's uid>`: unique per attempt
    (a group that ended is never joined again) and per job (a job re-created under the
    same name gets new groups), a DNS-1123 label."""
    base = pod_name(job.name, attempt)[:54].rstrip("-")
    return f"{base}-{names.short_hash(job.uid)}"


def rendezvous_service_name(job_name: str, attempt: int) -> str:
    """The headless Service of an attempt's rank-0 pod, `<job>-<attempt>-rdzv`: a Service
    name must be a DNS-1035 label (starting with a letter), so a job name that starts
    with a digit gets an `lj-` prefix."""
    suffix = "-rdzv"
    base = pod_name(job_name, attempt)
    if not base[0].isalpha():
        base = f"lj-{base}"
    if len(base) + len(suffix) > 63:
        digest = names.short_hash(job_name)
        base = f"{base[: 63 - len(suffix) - len(digest) - 1].rstrip('-')}-{digest}"
    return base + suffix


def node_rank(pod: Mapping[str, Any]) -> int:
    """The node rank of a trainer pod (0 for a job on one node)."""
    labels = (pod.get("metadata") or {}).get("labels") or {}
    try:
        return int(labels.get(LABEL_NODE_RANK, "0"))
    except ValueError:
        return 0


def group_size(pod: Mapping[str, Any]) -> int:
    """How many pods the pod's attempt was created with (1 for a job on one node)."""
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    try:
        return max(1, int(annotations.get(ANNOTATION_NODES, "1")))
    except ValueError:
        return 1


def pod_selector(job: JobRef) -> dict[str, str]:
    """Labels that select every pod of `job` (by uid: a re-created job is a new job)."""
    return {"app.kubernetes.io/managed-by": MANAGED_BY, LABEL_JOB_UID: job.uid}


def selector_string(job: JobRef) -> str:
    """pod_selector() as a label-selector query string."""
    return ",".join(f"{k}={v}" for k, v in pod_selector(job).items())


def owner_reference(job: JobRef) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": job.name,
        "uid": job.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def queue_name(spec: LoRAJobSpec, namespace: str, settings: OperatorSettings) -> str | None:
    """The Kueue LocalQueue for the job: the spec's, else the namespace's or global default."""
    return spec.scheduling.queue_name or settings.queue_for(namespace)


def pod_labels(
    job: JobRef, spec: LoRAJobSpec, settings: OperatorSettings, attempt: int, rank: int = 0
) -> dict[str, str]:
    labels = {
        "app.kubernetes.io/name": "lora-trainer",
        "app.kubernetes.io/instance": names.label_safe(job.name),
        "app.kubernetes.io/component": "trainer",
        "app.kubernetes.io/managed-by": MANAGED_BY,
        LABEL_JOB: names.label_safe(job.name),
        LABEL_JOB_UID: job.uid,
        LABEL_ATTEMPT: str(attempt),
    }
    queue = queue_name(spec, job.namespace, settings)
    if queue:
        labels[LABEL_KUEUE_QUEUE] = queue
    if spec.resources.nodes > 1:
        labels[LABEL_NODE_RANK] = str(rank)
        if queue:
            labels[LABEL_KUEUE_POD_GROUP] = group_name(job, attempt)
    return labels


def _secret_env(name: str, secret: str, key: str, *, optional: bool = False) -> dict[str, Any]:
    ref: dict[str, Any] = {"name": secret, "key": key}
    if optional:
        ref["optional"] = True
    return {"name": name, "valueFrom": {"secretKeyRef": ref}}


def _env(
    job: JobRef, spec: LoRAJobSpec, settings: OperatorSettings, attempt: int
) -> list[dict[str, Any]]:
    cache_dir = CACHE_MOUNT if settings.cache_pvc_name else f"{SCRATCH_DIR}/cache"
    config = json.dumps(trainer_config(spec).to_wire(), separators=(",", ":"))
    env: list[dict[str, Any]] = [
        {"name": protocol.ENV_CONFIG, "value": config},
        {"name": protocol.ENV_WORK_DIR, "value": SCRATCH_DIR},
        {"name": protocol.ENV_CACHE_DIR, "value": cache_dir},
        {
            "name": protocol.ENV_PROGRESS_HOST,
            "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "status.podIP"}},
        },
        {"name": protocol.ENV_PROGRESS_PORT, "value": str(settings.progress_port)},
        {"name": protocol.ENV_TERMINATION_LOG, "value": protocol.DEFAULT_TERMINATION_LOG},
        {"name": protocol.ENV_ATTEMPT, "value": str(attempt)},
        {"name": protocol.ENV_JOB_NAME, "value": f"{job.namespace}/{job.name}"},
        {
            # The trainer runs as many torch threads as the limit has whole cores.
            "name": protocol.ENV_CPU_LIMIT,
            "valueFrom": {
                "resourceFieldRef": {
                    "containerName": CONTAINER_NAME,
                    "resource": "limits.cpu",
                    "divisor": "1m",
                }
            },
        },
        {"name": protocol.ENV_S3_REGION, "value": spec.storage.region},
    ]
    if spec.storage.endpoint:
        # The policy checked how the endpoint is spelled; the trainer checks what its
        # name resolves to when it connects (AWS's own endpoints need no check).
        allowed = settings.policy.allow_private_endpoints
        env += [
            {"name": protocol.ENV_S3_ENDPOINT, "value": spec.storage.endpoint},
            {"name": protocol.ENV_ALLOW_PRIVATE_ENDPOINTS, "value": str(allowed).lower()},
        ]
    if spec.storage.credentials_secret:
        # Only references: the values stay in the Secret and never pass through the
        # operator, its logs, the pod spec or the LoRAJob.
        secret = spec.storage.credentials_secret
        env += [
            _secret_env(protocol.ENV_S3_ACCESS_KEY, secret, protocol.ENV_S3_ACCESS_KEY),
            _secret_env(protocol.ENV_S3_SECRET_KEY, secret, protocol.ENV_S3_SECRET_KEY),
            _secret_env(
                protocol.ENV_S3_SESSION_TOKEN, secret, protocol.ENV_S3_SESSION_TOKEN, optional=True
            ),
        ]
    if spec.storage.hf_token_secret:
        env.append(
            _secret_env(protocol.ENV_HF_TOKEN, spec.storage.hf_token_secret, protocol.ENV_HF_TOKEN)
        )
    if (mlflow := spec.tracking.mlflow) and mlflow.credentials_secret:
        # Basic auth or a token, whichever keys the Secret has (MLflow reads these itself).
        env += [
            _secret_env(name, mlflow.credentials_secret, name, optional=True)
            for name in (
                protocol.ENV_MLFLOW_USERNAME,
                protocol.ENV_MLFLOW_PASSWORD,
                protocol.ENV_MLFLOW_TOKEN,
            )
        ]
    if (wandb := spec.tracking.wandb) and wandb.api_key_secret:
        env.append(
            _secret_env(
                protocol.ENV_WANDB_API_KEY, wandb.api_key_secret, protocol.ENV_WANDB_API_KEY
            )
        )
    # The root filesystem is read-only: point every library cache at writable volumes.
    env += [
        {"name": "HOME", "value": SCRATCH_DIR},
        {"name": "XDG_CACHE_HOME", "value": f"{SCRATCH_DIR}/.cache"},
        {"name": "HF_HOME", "value": f"{cache_dir}/huggingface"},
        {"name": "TRITON_CACHE_DIR", "value": f"{SCRATCH_DIR}/.triton"},
        {"name": "TMPDIR", "value": "/tmp"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    env += [{"name": k, "value": v} for k, v in sorted(settings.trainer_extra_env.items())]
    return env


def _resources(spec: LoRAJobSpec, settings: OperatorSettings) -> dict[str, Any]:
    # requests == limits for every resource: the pod gets the Guaranteed QoS class,
    # the last to be evicted under node pressure, which matters for hours-long runs.
    amounts: dict[str, str] = {
        "cpu": spec.resources.cpu or settings.default_cpu,
        "memory": spec.resources.memory or settings.default_memory,
    }
    if spec.resources.gpus > 0:
        gpu = spec.resources.gpu_resource_name or settings.gpu_resource_name
        amounts[gpu] = str(spec.resources.gpus)
    return {"requests": dict(amounts), "limits": dict(amounts)}


def _trainer_args(
    job: JobRef, spec: LoRAJobSpec, settings: OperatorSettings, attempt: int, rank: int
) -> list[str]:
    """Arguments of the trainer command: with several GPUs, one training process per GPU
    under torchrun (the trainer's launcher), and the pod's grace period for them to save
    a checkpoint on SIGTERM before torchrun kills them. On several nodes also the pod's
    node rank and torchrun's c10d rendezvous: the store runs in the rank-0 pod, reached
    through the attempt's headless Service (build_rendezvous_service)."""
    nodes = spec.resources.nodes
    if spec.resources.gpus <= 1 and nodes == 1:
        return []
    args = ["--nproc-per-node", str(max(spec.resources.gpus, 1))]
    if nodes > 1:
        service = rendezvous_service_name(job.name, attempt)
        args += [
            "--nnodes",
            str(nodes),
            "--node-rank",
            str(rank),
            "--rdzv-endpoint",
            f"{service}.{job.namespace}.svc:{protocol.RENDEZVOUS_PORT}",
            "--rdzv-id",
            group_name(job, attempt),
        ]
    return [*args, "--shutdown-timeout", str(settings.termination_grace_seconds)]


def _spread(job: JobRef, spec: LoRAJobSpec, attempt: int) -> dict[str, Any] | None:
    """The pod affinity of a job on several nodes: the spec's, plus a *preferred*
    anti-affinity between the pods of one attempt, so the scheduler puts them on different
    nodes where it can (one node's loss then stops one rank's pod, and each pod gets a
    node's network) but still starts them side by side when one node has room for
    several: that is legal, and better than waiting."""
    affinity = copy.deepcopy(spec.scheduling.affinity) if spec.scheduling.affinity else None
    if spec.resources.nodes <= 1:
        return affinity
    affinity = affinity or {}
    anti = affinity.setdefault("podAntiAffinity", {})
    preferred = anti.setdefault("preferredDuringSchedulingIgnoredDuringExecution", [])
    preferred.append(
        {
            "weight": 100,
            "podAffinityTerm": {
                "labelSelector": {
                    "matchLabels": {LABEL_JOB_UID: job.uid, LABEL_ATTEMPT: str(attempt)}
                },
                "topologyKey": "kubernetes.io/hostname",
            },
        }
    )
    return affinity


def _node_selector(spec: LoRAJobSpec, settings: OperatorSettings) -> dict[str, str]:
    selector = {**settings.default_node_selector, **spec.scheduling.node_selector}
    if spec.resources.gpu_product:
        selector[settings.gpu_product_label] = spec.resources.gpu_product
    return selector


def _tolerations(spec: LoRAJobSpec, settings: OperatorSettings) -> list[dict[str, Any]]:
    tolerations = (
        [t.to_wire() for t in settings.default_gpu_tolerations] if spec.resources.gpus else []
    )
    for toleration in (t.to_wire() for t in spec.scheduling.tolerations):
        if toleration not in tolerations:
            tolerations.append(toleration)
    return tolerations


def _volumes(settings: OperatorSettings) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    scratch: dict[str, Any] = {}
    if settings.scratch_size_limit:
        scratch["sizeLimit"] = settings.scratch_size_limit
    volumes: list[dict[str, Any]] = [
        {"name": "scratch", "emptyDir": scratch},
        {"name": "tmp", "emptyDir": {"sizeLimit": TMP_SIZE_LIMIT}},
        # Data loader workers share batches through /dev/shm; the runtime default is 64Mi.
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": settings.shm_size_limit}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "scratch", "mountPath": SCRATCH_DIR},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    if settings.cache_pvc_name:
        volumes.append(
            {"name": "cache", "persistentVolumeClaim": {"claimName": settings.cache_pvc_name}}
        )
        mounts.append({"name": "cache", "mountPath": CACHE_MOUNT})
    return volumes, mounts


def build_trainer_pods(
    job: JobRef, spec: LoRAJobSpec, settings: OperatorSettings, attempt: int
) -> list[dict[str, Any]]:
    """Every trainer pod of attempt `attempt`: one, or one per node (rank 0 first)."""
    return [
        build_trainer_pod(job, spec, settings, attempt, rank)
        for rank in range(spec.resources.nodes)
    ]


def build_rendezvous_service(job: JobRef, attempt: int) -> dict[str, Any]:
    """The headless Service that names attempt `attempt`'s rank-0 pod for torchrun's c10d
    rendezvous (`<service>.<namespace>.svc:29400`). Headless: the name resolves to the
    pod's own IP, no proxy in between. publishNotReadyAddresses: the pods of the group
    meet there before any of them is ready. One Service per attempt, its selector
    including the attempt, so a pod of an earlier attempt left on a lost node (still
    "Running", nodeloss.py) is never a second address of the name."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": rendezvous_service_name(job.name, attempt),
            "namespace": job.namespace,
            "labels": {
                "app.kubernetes.io/name": "lora-trainer",
                "app.kubernetes.io/instance": names.label_safe(job.name),
                "app.kubernetes.io/component": "rendezvous",
                "app.kubernetes.io/managed-by": MANAGED_BY,
                LABEL_JOB_UID: job.uid,
                LABEL_ATTEMPT: str(attempt),
            },
            "ownerReferences": [owner_reference(job)],
        },
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {LABEL_JOB_UID: job.uid, LABEL_ATTEMPT: str(attempt), LABEL_NODE_RANK: "0"},
            "ports": [
                {
                    "name": RENDEZVOUS_PORT_NAME,
                    "port": protocol.RENDEZVOUS_PORT,
                    "targetPort": protocol.RENDEZVOUS_PORT,
                    "protocol": "TCP",
                }
            ],
        },
    }


def build_trainer_pod(
    job: JobRef, spec: LoRAJobSpec, settings: OperatorSettings, attempt: int, rank: int = 0
) -> dict[str, Any]:
    """The trainer pod for attempt number `attempt` (1-based) of `job`; with several
    nodes, the pod of node rank `rank`.

    activeDeadlineSeconds is deliberately not set: the job's deadline spans all
    attempts and the operator enforces it, a per-pod deadline would restart the clock.
    """
    volumes, mounts = _volumes(settings)
    port = settings.progress_port
    nodes = spec.resources.nodes
    ports: list[dict[str, Any]] = [{"name": "progress", "containerPort": port, "protocol": "TCP"}]
    if nodes > 1:
        # Every rank declares it (only rank 0 listens): Kueue puts pods of one shape in
        # one pod set, and the ports are part of the shape (its role hash).
        ports.append(
            {
                "name": RENDEZVOUS_PORT_NAME,
                "containerPort": protocol.RENDEZVOUS_PORT,
                "protocol": "TCP",
            }
        )
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": spec.image or settings.trainer_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": list(settings.trainer_command or TRAINER_COMMAND),
        "env": _env(job, spec, settings, attempt),
        "ports": ports,
        "resources": _resources(spec, settings),
        "volumeMounts": mounts,
        "terminationMessagePath": protocol.DEFAULT_TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "runAsUser": UID,
            "runAsGroup": UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    if nodes == 1:
        # Generous: model loading can starve the HTTP thread, and a false kill costs
        # an attempt (the trainer resumes from its last checkpoint either way). On several
        # nodes only the pod that torch's rendezvous gives global rank 0 serves /healthz,
        # so a probe would stop the others; a hung rank fails its peers' next collective
        # step instead (the process group's timeout), which ends the attempt.
        container["livenessProbe"] = {
            "httpGet": {"path": protocol.HEALTH_PATH, "port": "progress"},
            "initialDelaySeconds": 60,
            "periodSeconds": 30,
            "timeoutSeconds": 10,
            "failureThreshold": 10,
        }
    if args := _trainer_args(job, spec, settings, attempt, rank):
        container["args"] = args
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": settings.termination_grace_seconds,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": UID,
            "runAsGroup": UID,
            "fsGroup": UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
    }
    if settings.trainer_service_account:
        pod_spec["serviceAccountName"] = settings.trainer_service_account
    if settings.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": n} for n in settings.image_pull_secrets]
    if settings.runtime_class_name:
        pod_spec["runtimeClassName"] = settings.runtime_class_name
    if selector := _node_selector(spec, settings):
        pod_spec["nodeSelector"] = selector
    if tolerations := _tolerations(spec, settings):
        pod_spec["tolerations"] = tolerations
    if affinity := _spread(job, spec, attempt):
        pod_spec["affinity"] = affinity
    if spec.scheduling.priority_class_name:
        pod_spec["priorityClassName"] = spec.scheduling.priority_class_name
    annotations = {
        ANNOTATION_SPEC_HASH: spec_hash(spec),
        "kubectl.kubernetes.io/default-container": CONTAINER_NAME,
    }
    if nodes > 1:
        annotations[ANNOTATION_NODES] = str(nodes)
        if queue_name(spec, job.namespace, settings):
            annotations[ANNOTATION_KUEUE_GROUP_TOTAL] = str(nodes)
            annotations[ANNOTATION_KUEUE_RETRIABLE] = "false"
        else:
            # Kueue gates a group until it admits all of it; without Kueue the
            # operator's own gate holds every pod until all exist (reconcile.py).
            pod_spec["schedulingGates"] = [{"name": GANG_GATE}]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod_name(job.name, attempt, rank if nodes > 1 else None),
            "namespace": job.namespace,
            "labels": pod_labels(job, spec, settings, attempt, rank),
            "annotations": annotations,
            "ownerReferences": [owner_reference(job)],
        },
        "spec": pod_spec,
    }
