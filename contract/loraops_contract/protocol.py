"""The contract between the operator and a trainer pod.

Torch-free on purpose: the operator imports it to build pods and to read what
the trainer reports. Anything both sides must agree on lives here and only here.

Channels, trainer -> operator (the pod holds no Kubernetes credentials):
  * live progress: HTTP GET http://<podIP>:<port>/progress -> `Progress` JSON
    (also /healthz for the container probes);
  * final outcome: `TerminationMessage` JSON in the container's termination
    message file (Kubernetes copies it into pod status), and the exit code.
"""

from __future__ import annotations

from enum import IntEnum

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from loraops_contract.reasons import Reason

# --- environment set on the trainer container by the operator -----------------
ENV_CONFIG = "LORA_TRAINER_CONFIG"  # TrainerConfig as camelCase JSON
ENV_CONFIG_FILE = "LORA_TRAINER_CONFIG_FILE"  # alternative: path to a JSON/YAML file
ENV_WORK_DIR = "LORA_TRAINER_WORK_DIR"  # writable scratch (emptyDir); default /scratch
ENV_CACHE_DIR = "LORA_TRAINER_CACHE_DIR"  # download cache shared by jobs on a node
ENV_PROGRESS_HOST = "LORA_TRAINER_PROGRESS_HOST"  # bind address; pods pass status.podIP
ENV_PROGRESS_PORT = "LORA_TRAINER_PROGRESS_PORT"
ENV_TERMINATION_LOG = "LORA_TRAINER_TERMINATION_LOG"  # default /dev/termination-log
ENV_ATTEMPT = "LORA_TRAINER_ATTEMPT"  # 1-based attempt number; fences the checkpoints
ENV_JOB_NAME = "LORA_TRAINER_JOB_NAME"  # "<namespace>/<name>", for the model card
# The admin policy's allowPrivateEndpoints: "false" makes the trainer refuse, at connect
# time, an S3 endpoint that resolves to a loopback, link-local (metadata), unspecified,
# multicast or reserved address (loraops_contract.endpoints). Unset (a trainer run outside
# the operator, under no admin policy) = "true".
ENV_ALLOW_PRIVATE_ENDPOINTS = "LORA_TRAINER_ALLOW_PRIVATE_ENDPOINTS"
# The container's CPU limit in millicores (resourceFieldRef limits.cpu, divisor 1m): torch
# runs that many threads, not one per core of the node (the limit would throttle them).
ENV_CPU_LIMIT = "LORA_TRAINER_CPU_LIMIT_MILLICORES"
# Several nodes (spec.resources.nodes > 1): torchrun's c10d rendezvous store listens on
# this port in the rank-0 pod, reached at the job's headless Service
# (`--rdzv-endpoint <service>.<namespace>.svc:RENDEZVOUS_PORT`). 29400 is torchrun's own
# default c10d port.
RENDEZVOUS_PORT = 29400
# Standard names boto3 and huggingface_hub read themselves.
ENV_S3_ENDPOINT = "AWS_ENDPOINT_URL"
ENV_S3_REGION = "AWS_DEFAULT_REGION"
ENV_S3_ACCESS_KEY = "AWS_ACCESS_KEY_ID"
ENV_S3_SECRET_KEY = "AWS_SECRET_ACCESS_KEY"
ENV_S3_SESSION_TOKEN = "AWS_SESSION_TOKEN"
ENV_HF_TOKEN = "HF_TOKEN"
# Experiment tracking credentials, by the names MLflow and wandb read themselves.
ENV_MLFLOW_USERNAME = "MLFLOW_TRACKING_USERNAME"
ENV_MLFLOW_PASSWORD = "MLFLOW_TRACKING_PASSWORD"
ENV_MLFLOW_TOKEN = "MLFLOW_TRACKING_TOKEN"
ENV_WANDB_API_KEY = "WANDB_API_KEY"

DEFAULT_PROGRESS_PORT = 8080
DEFAULT_TERMINATION_LOG = "/dev/termination-log"
DEFAULT_WORK_DIR = "/scratch"
PROGRESS_PATH = "/progress"
HEALTH_PATH = "/healthz"

# Kubernetes caps the termination message at 4096 bytes; stay under it.
TERMINATION_MESSAGE_LIMIT = 4000

# Object names under the output prefix.
MANIFEST_NAME = "manifest.json"  # written last: its presence means "complete"
CHECKPOINTS_DIR = "checkpoints"
# Checkpoints: <output>/checkpoints/run-<run>/attempt-<N>/checkpoint-<step>/: one prefix per
# training run (config.run_id) and, within it, per attempt (lora_trainer.checkpoints).
CHECKPOINT_COMPLETE_MARKER = "COMPLETE"  # written last inside each checkpoint


class ExitCode(IntEnum):
    """Process exit codes. Permanent failures must not be retried by the operator."""

    OK = 0
    INVALID_CONFIG = 10  # permanent
    INVALID_DATASET = 11  # permanent
    TARGET_MODULES_NOT_FOUND = 12  # permanent
    CREDENTIALS = 13  # permanent until the Secret/policy is fixed
    SOURCE_NOT_FOUND = 14  # permanent: model or dataset URI does not exist
    CUDA_OOM = 15  # permanent with this spec: needs a smaller batch/sequence
    TRANSIENT = 20  # retryable: network, S3 5xx, node trouble
    INTERRUPTED = 21  # retryable: SIGTERM received, checkpoint saved
    INTERNAL = 30  # retryable once: unexpected bug


PERMANENT_EXIT_CODES = frozenset(
    {
        ExitCode.INVALID_CONFIG,
        ExitCode.INVALID_DATASET,
        ExitCode.TARGET_MODULES_NOT_FOUND,
        ExitCode.CREDENTIALS,
        ExitCode.SOURCE_NOT_FOUND,
        ExitCode.CUDA_OOM,
    }
)


# The exit code of each reason a trainer reports (reasons.TRAINER_REASONS).
REASON_EXIT_CODES: dict[Reason, ExitCode] = {
    Reason.INVALID_SPEC: ExitCode.INVALID_CONFIG,
    Reason.POLICY_VIOLATION: ExitCode.INVALID_CONFIG,
    Reason.INVALID_DATASET: ExitCode.INVALID_DATASET,
    Reason.TARGET_MODULES_NOT_FOUND: ExitCode.TARGET_MODULES_NOT_FOUND,
    Reason.CREDENTIALS_ERROR: ExitCode.CREDENTIALS,
    Reason.SOURCE_NOT_FOUND: ExitCode.SOURCE_NOT_FOUND,
    Reason.CUDA_OUT_OF_MEMORY: ExitCode.CUDA_OOM,
    Reason.STORAGE_ERROR: ExitCode.TRANSIENT,
    Reason.INTERRUPTED: ExitCode.INTERRUPTED,
    Reason.INTERNAL_ERROR: ExitCode.INTERNAL,
}


class _Wire(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True, exclude_none=True)


class Progress(_Wire):
    """Live progress served at PROGRESS_PATH."""

    stage: str = Field(
        default="starting",
        description="starting | downloading | loading | training | evaluating | merging | uploading | done | failed",
    )
    step: int = 0
    total_steps: int | None = None
    epoch: float | None = None
    loss: float | None = None
    eval_loss: float | None = None
    learning_rate: float | None = None
    tokens_per_second: float | None = None
    eta_seconds: float | None = None
    last_checkpoint: str | None = None  # URI of the latest complete checkpoint
    resumed_from_step: int | None = None
    skipped_records: int | None = None  # invalid records left out (dataset.invalidRecords)
    # How the run spreads over its GPUs: single | ddp | fsdp, the training processes,
    # and the rows per optimizer step (batchSize x ranks x gradientAccumulationSteps).
    strategy: str | None = None
    ranks: int | None = None
    global_batch_size: int | None = None
    updated_at: str | None = None  # RFC 3339


class AdapterInfo(_Wire):
    uri: str  # the output prefix
    manifest_uri: str
    sha256: str  # of adapter_model.safetensors
    size: int  # bytes of adapter_model.safetensors
    files: int  # number of files listed in the manifest


class Evaluation(_Wire):
    """What the finished job measured against its base model (lora_trainer.evaluation)."""

    base_eval_loss: float | None = None  # the base model's loss on the held-out split
    eval_loss: float | None = None  # the adapter's, on the same records
    worse_than_base: bool = False  # eval_loss > base_eval_loss
    summary: str = ""  # e.g. "eval loss 3.000 → 2.260 (-24.7%)"
    vllm_loadable: bool | None = None  # None: not checked
    vllm: str | None = None  # "loads in vLLM: yes/no, why"


class TerminationMessage(_Wire):
    """Written to the termination log on every exit, success or failure."""

    outcome: str  # "Succeeded" | "Failed"
    reason: str | None = None  # a reasons.TRAINER_REASONS value on failure
    message: str = ""  # what happened, secrets never included
    hint: str | None = None  # what the user should change
    retryable: bool = False
    adapter: AdapterInfo | None = None
    steps: int | None = None
    train_loss: float | None = None
    eval_loss: float | None = None
    tokens_per_second: float | None = None
    last_checkpoint: str | None = None
    skipped_records: int | None = None  # invalid records left out (dataset.invalidRecords)
    evaluation: Evaluation | None = None
