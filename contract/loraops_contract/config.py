"""The trainer's one validated configuration model.

This module must stay importable without torch, transformers or boto3: the
operator embeds these models in the LoRAJob spec and generates the CRD schema
from them, so the operator image never has to carry the training stack.

Field names are camelCase on the wire (the Kubernetes convention) and
snake_case in Python; both spellings are accepted when parsing.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import (
    AliasGenerator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from loraops_contract import rules
from loraops_contract.rules import Rule

__all__ = [
    "RESUMABLE_FIELDS",
    "SOURCE_URI_RULES",
    "DatasetSpec",
    "EvaluationSpec",
    "LoraSpec",
    "MlflowSpec",
    "ModelSpec",
    "OutputSpec",
    "QuantizationSpec",
    "SpecModel",
    "TrackingSpec",
    "TrainerConfig",
    "TrainingSpec",
    "WandbSpec",
    "format_validation_error",
    "parse_uri",
    "run_config",
    "run_defining_changes",
    "run_id",
]

# Sources and destinations the trainer knows how to read and write.
URI_SCHEMES = ("s3", "hf")
# \Z, not $ (which also matches before a final newline), and ASCII \w: as RE2 reads the
# same patterns in the CRD's CEL rules (SOURCE_URI_RULES).
_S3_RE = re.compile(r"^s3://(?P<bucket>[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9])(?:/(?P<key>.*))?\Z")
_HF_RE = re.compile(
    r"^hf://(?P<repo>[A-Za-z0-9][\w.\-]*(?:/[A-Za-z0-9][\w.\-]*)?)(?:@(?P<rev>[\w.\-/]+))?\Z",
    re.ASCII,
)


class SpecModel(BaseModel):
    """Base for every spec model: camelCase aliases, unknown fields rejected.

    `extra="forbid"` is what turns a typo such as `learningrate` into an error
    that names the field instead of a silently ignored setting.
    """

    model_config = ConfigDict(
        alias_generator=AliasGenerator(alias=to_camel),
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        json_schema_extra=rules.model_rules_schema,
    )
    # Rules over more than one field of the model: pydantic enforces them after the
    # fields are valid, and the CRD carries them as CEL (loraops_contract.rules).
    RULES: ClassVar[tuple[Rule, ...]] = ()

    @model_validator(mode="after")
    def _model_rules(self) -> Self:
        rules.enforce(self, type(self).RULES)
        return self

    def to_wire(self) -> dict[str, Any]:
        """The camelCase dict form used in manifests and env vars (None fields omitted)."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


def parse_uri(uri: str) -> tuple[str, str, str]:
    """Split a source/destination URI into (scheme, location, revision-or-key).

    Returns ("s3", bucket, key), ("hf", "org/name", revision) or ("file", path, "").
    Raises ValueError with the accepted forms when the URI fits none of them.
    """
    if uri.startswith("s3://"):
        m = _S3_RE.match(uri)
        if not m:
            raise ValueError(
                f"{uri!r} is not a valid S3 URI; use s3://<bucket>/<prefix> with a "
                "lowercase bucket name of 3-63 characters"
            )
        return "s3", m["bucket"], _plain_segments(uri, m["key"] or "").strip("/")
    if uri.startswith("hf://"):
        m = _HF_RE.match(uri)
        if not m:
            raise ValueError(f"{uri!r} is not a valid Hub URI; use hf://<org>/<name>[@<revision>]")
        return "hf", m["repo"], m["rev"] or "main"
    if "://" in uri:
        scheme = uri.split("://", 1)[0]
        raise ValueError(
            f"URI scheme {scheme!r} is not supported; use s3://bucket/prefix, "
            "hf://org/name[@revision] or an absolute path (e.g. a mounted PVC)"
        )
    if not uri.startswith("/"):
        raise ValueError(
            f"{uri!r} is a relative path; use an absolute path (e.g. /data/train.jsonl), "
            "s3://bucket/key or hf://org/name"
        )
    _plain_segments(uri, uri[1:])
    return "file", uri, ""


def _plain_segments(uri: str, path: str) -> str:
    """`path` (an S3 key or a local path without its leading /) when every segment is a
    plain name: "." and ".." would let `s3://adapters/team-a/../team-b` pass a policy
    prefix of team-a and then mean another place to S3 or the file system, and an empty
    segment ("a//b") is another key than "a/b" on S3. One trailing "/" is allowed.
    `path` is returned unchanged."""
    segments = path.removesuffix("/").split("/") if path else []
    # Some stores also read "\" as a separator (SeaweedFS does): "a\..\b" is "a/../b".
    dots = [p for s in segments for p in s.split("\\") if p in (".", "..")]
    if "" in segments or dots:
        what = "an empty segment (//)" if "" in segments else f"a {dots[0]!r} segment"
        raise ValueError(
            f"{uri!r} has {what}; write the path without '.', '..' or '//' segments "
            "(e.g. s3://bucket/team-a/run-1)"
        )
    return path


def _check_uri(value: str, *, allow_hf: bool = True) -> str:
    scheme, _, _ = parse_uri(value)
    if scheme == "hf" and not allow_hf:
        raise ValueError(_NO_HUB_OUTPUT)
    return value


# The URI shapes parse_uri accepts, as rules the CRD enforces too (CEL). They run before
# parse_uri (kept as the trainer's parser and a backstop), so pydantic and the API server
# give the same message; a unit test checks the rules accept exactly what parse_uri does.
MAX_URI_LENGTH = 2048
# A path segment other than "", "." and ".." (no lookahead in RE2, so spelled out).
_SEGMENT = r"(?:[^/.][^/]*|\.[^/.][^/]*|\.\.[^/]+)"
# An S3 key or a local path after its leading "/": plain segments, one trailing "/" allowed.
_PLAIN_PATH = rf"(?:s3://[^/]*)?(?:/(?:{_SEGMENT}(?:/{_SEGMENT})*/?)?)?"
_S3_URI, _S3_URI_OK = rules.matches(r"s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](?:/.*)?")
_HF_URI, _HF_URI_OK = rules.matches(
    r"hf://[A-Za-z0-9][\w.\-]*(?:/[A-Za-z0-9][\w.\-]*)?(?:@[\w.\-/]+)?"
)
_PLAIN_URI, _PLAIN_URI_OK = rules.matches(_PLAIN_PATH)
_NO_HUB_OUTPUT = "the output cannot be a Hub repository; use s3://bucket/prefix or a path"

SOURCE_URI_RULES: tuple[Rule, ...] = (
    Rule(
        cel="self.startsWith('s3://') || self.startsWith('hf://') || !self.contains('://')",
        message="this URI scheme is not supported; use s3://bucket/prefix, "
        "hf://org/name[@revision] or an absolute path (e.g. a mounted PVC)",
        check=lambda v: v.startswith(("s3://", "hf://")) or "://" not in v,
    ),
    Rule(
        cel="self.contains('://') || self.startsWith('/')",
        message="a relative path is not allowed; use an absolute path "
        "(e.g. /data/train.jsonl), s3://bucket/key or hf://org/name",
        check=lambda v: "://" in v or v.startswith("/"),
    ),
    Rule(
        cel=f"!self.startsWith('s3://') || {_S3_URI}",
        message="not a valid S3 URI; use s3://<bucket>/<prefix> with a lowercase bucket "
        "name of 3-63 characters",
        check=lambda v: not v.startswith("s3://") or _S3_URI_OK(v),
    ),
    Rule(
        cel=f"!self.startsWith('hf://') || {_HF_URI}",
        message="not a valid Hub URI; use hf://<org>/<name>[@<revision>]",
        check=lambda v: not v.startswith("hf://") or _HF_URI_OK(v),
    ),
    Rule(
        cel=f"!(self.startsWith('s3://') || self.startsWith('/')) || {_PLAIN_URI}",
        message="the path has a '.', '..' or empty (//) segment; write it without them "
        "(e.g. s3://bucket/team-a/run-1)",
        check=lambda v: not v.startswith(("s3://", "/")) or _PLAIN_URI_OK(v),
    ),
)
SourceUri = Annotated[str, *SOURCE_URI_RULES]
OutputUri = Annotated[
    str,
    *SOURCE_URI_RULES,
    Rule(
        cel="!self.startsWith('hf://')",
        message=_NO_HUB_OUTPUT,
        check=lambda v: not v.startswith("hf://"),
    ),
]


class ModelSpec(SpecModel):
    """The base model to fine-tune."""

    uri: SourceUri = Field(
        description="Base model: s3://bucket/prefix (a Hugging Face model directory), "
        "hf://org/name[@revision], or an absolute local/PVC path.",
        min_length=1,
        max_length=MAX_URI_LENGTH,
    )
    trust_remote_code: bool = Field(
        default=False,
        description="Run the model repository's own Python code. Off by default; an admin "
        "policy may forbid it.",
    )

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        return _check_uri(v)


DatasetFormat = Literal["auto", "text", "alpaca", "messages", "prompt_completion"]
InvalidRecords = Literal["fail", "skip"]


class DatasetSpec(SpecModel):
    """Training data: JSONL, JSON or Parquet, in one of the common record formats."""

    uri: SourceUri = Field(
        description="Training data file (or a prefix/directory of files): .jsonl, .json or "
        ".parquet at s3://..., hf://org/name[@revision] or an absolute path.",
        min_length=1,
        max_length=MAX_URI_LENGTH,
    )
    format: DatasetFormat = Field(
        default="auto",
        description="Record format: text ({text}), alpaca ({instruction,input,output}), "
        "messages ({messages:[{role,content}]}), prompt_completion ({prompt,completion}); "
        "auto detects it from the first record.",
    )
    eval_uri: SourceUri | None = Field(
        default=None,
        max_length=MAX_URI_LENGTH,
        description="Optional separate evaluation file, same formats as uri.",
    )
    eval_split: float = Field(
        default=0.05,
        ge=0.0,
        lt=0.5,
        description="Fraction of the training records held out for evaluation when evalUri "
        "is not set; 0 disables evaluation.",
    )
    max_records: int | None = Field(
        default=None,
        gt=0,
        description="Use at most this many training records, the first ones in the file: "
        "reading stops there.",
    )
    invalid_records: InvalidRecords = Field(
        default="fail",
        description="What a record that cannot be used does (invalid JSON, missing or "
        "mistyped fields, a conversation with no assistant turn): fail stops the job with "
        "an error naming the record; skip leaves it out and counts it "
        "(status.skippedRecords, metric lorajob_skipped_records_total).",
    )

    @field_validator("uri", "eval_uri")
    @classmethod
    def _uri(cls, v: str | None) -> str | None:
        return None if v is None else _check_uri(v)


ALL_LINEAR = "all-linear"
MAX_TARGET_MODULES = 64
MAX_MODULE_NAME = 128


class LoraSpec(SpecModel):
    """LoRA adapter shape. Defaults follow "LoRA Without Regret": all linear layers."""

    r: int = Field(default=16, ge=1, le=1024, description="Adapter rank.")
    alpha: int = Field(default=32, ge=1, le=4096, description="Scaling numerator (lora_alpha).")
    dropout: float = Field(
        default=0.05, ge=0.0, lt=1.0, description="Dropout on the adapter input."
    )
    target_modules: str | list[str] = Field(
        default=ALL_LINEAR,
        description='Layers to adapt: "all-linear" (every linear layer but the output head) or '
        "a list of module name suffixes such as [q_proj, v_proj].",
        # A string or a list has no structural schema: the CRD turns these typed branches
        # into value checks on an untyped field (crd.py), the strictest form Kubernetes
        # allows (CEL cannot see an untyped field).
        json_schema_extra={
            "anyOf": [
                {"type": "string", "enum": [ALL_LINEAR]},
                {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": MAX_TARGET_MODULES,
                    "items": {
                        "type": "string",
                        "minLength": 1,
                        "maxLength": MAX_MODULE_NAME,
                        "pattern": r"\S",
                    },
                },
            ]
        },
    )

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, str):
            if v != ALL_LINEAR:
                raise ValueError(
                    f'use "all-linear" or a list of module names such as [q_proj, v_proj], not {v!r}'
                )
            return v
        if not v or any(not m.strip() for m in v):
            raise ValueError("list must name at least one module, with no empty names")
        if len(v) > MAX_TARGET_MODULES or any(len(m) > MAX_MODULE_NAME for m in v):
            raise ValueError(
                f"list at most {MAX_TARGET_MODULES} module names of at most "
                f"{MAX_MODULE_NAME} characters (name suffixes such as q_proj)"
            )
        return v

    use_rslora: bool = Field(default=False, description="Rank-stabilised scaling alpha/sqrt(r).")
    use_dora: bool = Field(default=False, description="Weight-decomposed LoRA (DoRA).")
    modules_to_save: list[str] | None = Field(
        default=None, description="Extra modules trained in full and saved with the adapter."
    )


class QuantizationSpec(SpecModel):
    """How the frozen base model is loaded."""

    mode: Literal["nf4", "fp4", "int8", "none"] = Field(
        default="nf4",
        description="nf4 (QLoRA, default), fp4, int8 (bitsandbytes LLM.int8) or none.",
    )
    double_quant: bool = Field(
        default=True,
        description="Quantize the 4-bit quantization constants too (saves ~0.4 bit/param).",
    )
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        default="auto",
        description="Dtype of the matmuls (mixed precision): auto = bfloat16 on Ampere+ "
        "GPUs, float16 on older GPUs, float32 on CPU (measured fastest there); bfloat16 "
        "on a CPU runs bfloat16 autocast.",
    )


Strategy = Literal["auto", "ddp", "fsdp"]
Optimizer = Literal[
    "adamw_torch",
    "adamw_torch_fused",
    "paged_adamw_8bit",
    "adamw_8bit",
    "paged_adamw_32bit",
    "adafactor",
    "sgd",
]
Scheduler = Literal["linear", "cosine", "cosine_with_min_lr", "constant", "constant_with_warmup"]


class TrainingSpec(SpecModel):
    """Optimisation hyper-parameters."""

    # epochs: 1 is allowed beside maxSteps: it is the default, and the CRD wrote it into
    # every stored job that left epochs out, so refusing it would fail those jobs.
    RULES: ClassVar[tuple[Rule, ...]] = (
        Rule(
            field="epochs",
            cel="!has(self.maxSteps) || self.epochs == 1.0",
            message="set together with maxSteps, which alone decides how long the job "
            "trains; remove epochs, or remove maxSteps to train by epochs",
            check=lambda t: t.max_steps is None or t.epochs == 1.0,
        ),
    )

    epochs: float = Field(
        default=1.0,
        gt=0,
        le=1000,
        description="Passes over the data. Leave it unset (1) when maxSteps is set: "
        "maxSteps alone then decides how long the job trains.",
    )
    max_steps: int | None = Field(
        default=None, gt=0, description="Stop after this many optimizer steps."
    )
    learning_rate: float = Field(
        default=2e-4,
        gt=0,
        le=1.0,
        description="Peak learning rate; LoRA wants ~10x a full fine-tune's.",
    )
    batch_size: int = Field(default=4, ge=1, le=1024, description="Per-device micro-batch size.")
    gradient_accumulation_steps: int = Field(default=4, ge=1, le=1024)
    max_seq_length: int = Field(
        default=1024, ge=16, le=131072, description="Tokens per training sequence."
    )
    packing: bool = Field(
        default=True,
        description="Pack several short records into each sequence (no padding waste; "
        "attention stays within each record).",
    )
    gradient_checkpointing: bool = Field(
        default=True, description="Trade compute for activation memory."
    )
    optimizer: Optimizer = Field(default="adamw_torch")
    scheduler: Scheduler = Field(default="cosine")
    warmup_ratio: float = Field(default=0.03, ge=0.0, lt=1.0)
    weight_decay: float = Field(default=0.0, ge=0.0, le=1.0)
    max_grad_norm: float = Field(default=1.0, gt=0)
    seed: int = Field(default=42, ge=0)
    completion_only_loss: bool = Field(
        default=True,
        description="Train only on completions/assistant turns where the format has them.",
    )
    checkpoint_every_steps: int = Field(
        default=50,
        ge=1,
        description="Save a resumable checkpoint to <output>/checkpoints every N steps.",
    )
    eval_every_steps: int | None = Field(
        default=None, ge=1, description="Evaluate every N steps (default: at the end only)."
    )
    logging_steps: int = Field(default=1, ge=1, description="Report loss every N steps.")
    strategy: Strategy = Field(
        default="auto",
        description="How a job with several GPUs (one training process each, under "
        "torchrun) trains: ddp keeps a whole copy of the (4-bit) model on every GPU and "
        "all-reduces the adapter's gradients; fsdp shards the model over the GPUs (FSDP "
        "with QLoRA: 4-bit weights stored in the compute dtype), for a model too big for "
        "one GPU; auto picks fsdp when the model's weights take more than half of one "
        "GPU's memory, else ddp. One GPU or the CPU trains in one process. The global "
        "batch is batchSize x GPUs x gradientAccumulationSteps rows per optimizer step.",
    )


class OutputSpec(SpecModel):
    """Where the adapter goes."""

    uri: OutputUri = Field(
        description="Destination prefix: s3://bucket/prefix or an absolute path. The adapter "
        "lands there with manifest.json written last; checkpoints go to <uri>/checkpoints/.",
        min_length=1,
        max_length=MAX_URI_LENGTH,
    )
    merged_model: bool = Field(
        default=False,
        description="Also write the base model with the adapter merged in (<uri>/merged/).",
    )
    keep_checkpoints: bool = Field(
        default=False,
        description="Keep the resumable checkpoints under <uri>/checkpoints/ after the job "
        "succeeds. By default they are deleted once the adapter and its manifest are "
        "complete (they hold optimizer state, several times the adapter's size); keep "
        "them to continue a finished job with more steps or epochs.",
    )

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        return _check_uri(v, allow_hf=False)


# Kubernetes object names (a Secret's): lowercase DNS subdomain, as the API server checks.
_SECRET_NAME = rules.regex_rule(
    r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?(?:\.[a-z0-9](?:[-a-z0-9]*[a-z0-9])?)*",
    "not a Secret name; use lowercase letters, digits, '-' and '.' (at most 253 "
    "characters, starting and ending with a letter or digit)",
    max_length=253,
)
SecretName = Annotated[str, _SECRET_NAME]
MAX_PROMPTS = 8
MAX_PROMPT_LENGTH = 2000
_HTTP_URL, _HTTP_URL_OK = rules.matches(r"https?://[^\s/?#@]+(?:/[^\s?#]*)?")


class EvaluationSpec(SpecModel):
    """What the job measures to show the adapter learned something."""

    compare_to_base: bool = Field(
        default=True,
        description="Measure the base model's loss on the held-out split before training, "
        "to set against the adapter's (status.evaluation, metrics.json, the model card). "
        "An adapter worse than the base gets an AdapterWorseThanBase warning.",
    )
    prompts: list[Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_LENGTH)]] = Field(
        default_factory=list,
        max_length=MAX_PROMPTS,
        description=f"Up to {MAX_PROMPTS} prompts (at most {MAX_PROMPT_LENGTH} characters "
        "each) answered by the base model and by the adapter after training, greedily; the "
        "answers go to samples.jsonl next to the adapter and into its model card.",
    )
    max_new_tokens: int = Field(
        default=64, ge=1, le=512, description="Tokens generated per prompt and model."
    )


class MlflowSpec(SpecModel):
    """An MLflow tracking server the run is recorded to."""

    tracking_uri: Annotated[
        str,
        Rule(
            cel=_HTTP_URL,
            message="not an http(s) URL; use e.g. http://mlflow.mlflow.svc:5000",
            check=_HTTP_URL_OK,
        ),
    ] = Field(
        max_length=MAX_URI_LENGTH,
        description="Tracking server URL, e.g. http://mlflow.mlflow.svc:5000.",
    )
    experiment: str = Field(
        default="lorajob",
        min_length=1,
        max_length=256,
        description="Experiment the run is recorded under (created if missing).",
    )
    credentials_secret: SecretName | None = Field(
        default=None,
        max_length=253,
        description="Secret in the job's namespace with MLFLOW_TRACKING_USERNAME and "
        "MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN.",
    )


class WandbSpec(SpecModel):
    """A Weights & Biases project the run is recorded to."""

    RULES: ClassVar[tuple[Rule, ...]] = (
        Rule(
            field="apiKeySecret",
            cel="self.mode != 'online' || has(self.apiKeySecret)",
            message="required when mode is online; create a Secret with WANDB_API_KEY and "
            "name it here, or set mode: offline (the run is kept under <output.uri>/logs/wandb "
            "for wandb sync)",
            check=lambda w: w.mode != "online" or w.api_key_secret is not None,
            reason="FieldValueRequired",
        ),
    )

    project: str = Field(min_length=1, max_length=128, description="W&B project.")
    entity: str | None = Field(
        default=None, min_length=1, max_length=128, description="W&B team or user."
    )
    mode: Literal["online", "offline"] = Field(
        default="online",
        description="online streams to W&B; offline writes the run under "
        "<output.uri>/logs/wandb for a later `wandb sync`.",
    )
    api_key_secret: SecretName | None = Field(
        default=None,
        max_length=253,
        description="Secret in the job's namespace with WANDB_API_KEY.",
    )


class TrackingSpec(SpecModel):
    """Where the training curves go besides status and metrics.json."""

    tensorboard: bool = Field(
        default=True,
        description="Write TensorBoard event files to <output.uri>/logs/, uploaded while the "
        "job trains (tensorboard --logdir <output.uri>/logs/).",
    )
    mlflow: MlflowSpec | None = None
    wandb: WandbSpec | None = None


class TrainerConfig(SpecModel):
    """Everything the trainer needs to run one fine-tuning job."""

    model: ModelSpec
    dataset: DatasetSpec
    lora: LoraSpec = Field(default_factory=LoraSpec)
    quantization: QuantizationSpec = Field(default_factory=QuantizationSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    output: OutputSpec
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)

    RULES: ClassVar[tuple[Rule, ...]] = (
        Rule(
            field="lora.useDora",
            cel="!has(self.lora) || !self.lora.useDora || !has(self.quantization) "
            "|| self.quantization.mode != 'int8'",
            message="DoRA is not supported with quantization.mode int8; use quantization.mode "
            "nf4 or none, or set useDora: false",
            check=lambda c: not (c.lora.use_dora and c.quantization.mode == "int8"),
        ),
        # FSDP flattens and shards the weights; bitsandbytes' 4-bit weights can be stored
        # in a float dtype for that (bnb_4bit_quant_storage), its int8 ones cannot.
        Rule(
            field="training.strategy",
            cel="!has(self.training) || self.training.strategy != 'fsdp' "
            "|| !has(self.quantization) || self.quantization.mode != 'int8'",
            message="fsdp cannot shard int8 (LLM.int8) weights; use quantization.mode nf4 "
            "(FSDP with QLoRA) or none, or strategy ddp",
            check=lambda c: not (c.training.strategy == "fsdp" and c.quantization.mode == "int8"),
        ),
    )


# --------------------------------------------------------------------------- runs

# The fields a checkpoint carries across (snake_case paths into TrainerConfig; a section
# name covers every field in it). When only these change between attempts, the next
# attempt resumes the run from its last checkpoint: how long to train (more steps or
# epochs continue where the run is), how often to checkpoint, evaluate and log, whether
# activations are recomputed (the same arithmetic), and where and how the result is
# written. Every other field defines the run: the model, the data, the LoRA shape, the
# quantization and the optimisation (learning rate, schedule, batch shape, sequence
# length, seed, ...). A checkpoint written under other values of those is never resumed
# (the optimizer state and the adapter belong to another run), so a change starts a new
# run from step 0 in a checkpoint namespace of its own. A field added later defines the
# run unless it is listed here: resuming across a change nobody classified could mix runs.
# The Kubernetes-only fields of a LoRAJob (resources, scheduling, storage, image,
# deadlines, backoff, suspend, ttl) are not part of TrainerConfig and never define it.
RESUMABLE_FIELDS: frozenset[str] = frozenset(
    {
        "training.epochs",
        "training.max_steps",
        "training.gradient_checkpointing",
        "training.checkpoint_every_steps",
        "training.eval_every_steps",
        "training.logging_steps",
        "output",
        # What is measured and where it is reported, not what is trained.
        "evaluation",
        "tracking",
    }
)
# Hex digits of a run's identity (checkpoints/run-<id>/): 48 bits, no collision in practice.
RUN_ID_LENGTH = 12


def _resumable(path: tuple[str, ...]) -> bool:
    return any(".".join(path[:depth]) in RESUMABLE_FIELDS for depth in range(1, len(path) + 1))


def _run_part(values: dict[str, Any], path: tuple[str, ...] = ()) -> dict[str, Any]:
    """`values` without the resumable fields (and the sections they leave empty)."""
    kept: dict[str, Any] = {}
    for key, value in values.items():
        here = (*path, key)
        if _resumable(here):
            continue
        part = _run_part(value, here) if isinstance(value, dict) else value
        if part != {}:
            kept[key] = part
    return kept


def run_config(cfg: TrainerConfig, ranks: int = 1) -> dict[str, Any]:
    """The values that define `cfg`'s training run on `ranks` training processes
    (snake_case, JSON types).

    Only values that differ from their field's default are included: a release that
    adds a field (with a default) then leaves every run's identity as it was, and its
    checkpoints resumable.

    The batch a run is defined by is the rows of one accumulation step over all ranks
    (training.batch_size here is batchSize x ranks) and the accumulation steps: the
    same rows, in the same order, make each optimizer step. So 2 GPUs at batchSize 4
    are the run 1 GPU at batchSize 8 is, and resume its checkpoints (the Trainer skips
    the batches already trained per rank, which is the same rows only when that
    product is kept), while more GPUs at the same batchSize are a larger global batch:
    a new run. One rank leaves the identity exactly as it was before ranks counted.
    """
    values = cfg.model_dump(mode="json", exclude_defaults=True)
    if ranks > 1:
        rows = cfg.training.batch_size * ranks
        training = values.setdefault("training", {})
        if rows == TrainingSpec.model_fields["batch_size"].default:
            training.pop("batch_size", None)
        else:
            training["batch_size"] = rows
    return _run_part(values)


def run_id(cfg: TrainerConfig, ranks: int = 1) -> str:
    """The identity of `cfg`'s training run on `ranks` processes: checkpoints live
    under checkpoints/run-<id>/, and an attempt resumes only checkpoints of its own run.
    Specs that differ only in RESUMABLE_FIELDS (or in Kubernetes-only fields other than
    the number of GPUs, see run_config) share it."""
    return canonical_digest(run_config(cfg, ranks), RUN_ID_LENGTH)


def canonical_digest(value: Any, length: int = 16) -> str:
    """The sha256 of `value`'s canonical JSON (sorted keys, no spaces), cut to `length`
    hex digits: the one way run ids, spec hashes and config digests are computed, so
    equal values hash equally whichever image computes them."""
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:length]


def _leaves(values: Any, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    if not isinstance(values, dict):
        return {path: values}
    out: dict[tuple[str, ...], Any] = {}
    for key, value in values.items():
        out |= _leaves(value, (*path, key))
    return out


def run_defining_changes(
    old: TrainerConfig, new: TrainerConfig, ranks: tuple[int, int] = (1, 1)
) -> list[str]:
    """The camelCase paths (e.g. training.learningRate) of the run-defining fields whose
    values differ between `old` and `new` (run on ranks[0] and ranks[1] processes):
    empty when a checkpoint of `old` resumes under `new`. A change of the ranks alone
    that changes the global batch reads as training.batchSize."""
    before, after = _leaves(run_config(old, ranks[0])), _leaves(run_config(new, ranks[1]))
    changed = sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))
    return [".".join(to_camel(part) for part in path) for path in changed]


def format_validation_error(err: ValidationError, *, prefix: str = "") -> str:
    """One line per problem, each naming the field by its camelCase path.

    e.g. "spec.training.learningRate: Input should be greater than 0 (got -1)".
    """
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-"))
        path = f"{prefix}{loc}" if loc else prefix.rstrip(".") or "<root>"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field; check the spelling (fields are camelCase) or remove it"
        elif e["type"] == "missing":
            msg = "required field is missing"
        got = e.get("input")
        tail = ""
        if e["type"] not in ("missing", "extra_forbidden", rules.RULE_ERROR) and not isinstance(
            got, dict | list
        ):
            tail = f" (got {got!r})"
        lines.append(f"{path}: {msg}{tail}")
    return "; ".join(lines)
