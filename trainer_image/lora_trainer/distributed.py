"""Several training processes, one per GPU, under torchrun: which one this is, which
parallel strategy the run uses, and the few collective steps the run itself needs.

torchrun (torch.distributed.run, started by lora_trainer.launch) starts the processes
and tells each its place in RANK, LOCAL_RANK, WORLD_SIZE and LOCAL_WORLD_SIZE;
accelerate's PartialState initialises the process group as the Trainer would (NCCL
on GPUs, gloo on the CPU). Everything else that crosses processes is the Trainer's:
DDP's gradient all-reduce, FSDP's sharding, the loss and token counts it gathers.
This module adds only what the run's own bookkeeping needs, each through
torch.distributed:

* `agree`: a stop request (SIGTERM) seen by any rank stops every rank after the same
  step, so they save one checkpoint together instead of waiting for each other in the
  next all-reduce;
* `from_main`: rank 0 decides (which checkpoint to resume) and every rank gets its
  answer;
* `barrier`: rank 0 publishes a checkpoint once every rank has written its part;
* `gather`: every rank gets every rank's value (the names of the checkpoint parts the
  other nodes uploaded, for rank 0's marker).

Without torchrun (WORLD_SIZE unset) the run is one process and all of these are
no-ops, so train.py reads the same either way.
"""

# torch and accelerate load only when a run is distributed.
# ruff: noqa: PLC0415

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, TypeVar

from lora_trainer.errors import ConfigError

__all__ = [
    "FIT_FRACTION",
    "Parallel",
    "Ranks",
    "Strategy",
    "agree",
    "barrier",
    "choose_strategy",
    "follow_checkpoint",
    "from_main",
    "gather",
    "init",
    "model_parameters",
    "read_record",
    "shutdown",
    "weight_bytes",
    "write_record",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

# What the run does: one process, data parallel (a whole model per GPU, gradients
# all-reduced) or fully sharded (each GPU holds 1/N of the weights).
Strategy = Literal["single", "ddp", "fsdp"]
# `auto` shards the model (FSDP) when its weights would take more than this fraction of
# one GPU's memory: the rest holds the activations, the adapter with its gradients and
# optimizer state, and the CUDA context, which at maxSeqLength 1024-4096 and batch 4
# take about as much again as a 4-bit 7-8B model's weights.
FIT_FRACTION = 0.5
# Bytes per stored weight by quantization mode (4-bit modes: half a byte plus the
# per-block constants, ~0.03 bytes with double quantization; int8: one byte).
_QUANT_BYTES = {"nf4": 0.53, "fp4": 0.53, "int8": 1.0}
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Written into each checkpoint: the strategy that wrote it (its optimizer state's format).
RECORD_FILE = "parallel.json"


@dataclass(frozen=True)
class Ranks:
    """This process's place among the run's processes (torchrun's environment)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    node: int = 0  # the node's rank in the rendezvous (torchrun's GROUP_RANK); rank 0's is 0

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Ranks:
        """The ranks torchrun set; one process (rank 0 of 1) without them."""
        if not env.get("WORLD_SIZE"):
            return cls()
        names = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK")
        try:
            values = [int(env.get(name) or "0") for name in names]
        except ValueError as e:
            raise ConfigError(
                f"torchrun's {', '.join(names)} must be integers: {e}",
                hint="Start distributed runs with python -m lora_trainer --nproc-per-node N.",
            ) from e
        rank, local_rank, world, local_world, node = values
        return cls(rank, local_rank, max(1, world), max(1, local_world or world), node)

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that publishes checkpoints, the adapter and the report."""
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        """Local rank 0: the one that fills this node's scratch directory."""
        return self.local_rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def beside_main(self) -> bool:
        """On rank 0's node: what this node's ranks write lands in rank 0's scratch
        directory (the node's ranks share one)."""
        return self.node == 0


@dataclass(frozen=True)
class Parallel:
    """How the run spreads over its processes, as status and metrics.json report it."""

    strategy: Strategy
    ranks: int
    per_device_batch_size: int
    gradient_accumulation_steps: int
    why: str = ""

    @property
    def global_batch_size(self) -> int:
        """Rows per optimizer step: per-device batch x ranks x accumulation steps."""
        return self.per_device_batch_size * self.ranks * self.gradient_accumulation_steps

    def to_metrics(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "ranks": self.ranks,
            "per_device_batch_size": self.per_device_batch_size,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "global_batch_size": self.global_batch_size,
            "why": self.why,
        }


def choose_strategy(
    requested: str,
    ranks: int,
    *,
    cuda: bool = True,
    weights: int | None = None,
    device_memory: int | None = None,
) -> tuple[Strategy, str]:
    """The strategy for `ranks` processes, and why.

    `requested` is spec.training.strategy (auto, ddp or fsdp); `cuda` whether the ranks
    have GPUs; `weights` the estimated bytes of the loaded base model (`weight_bytes`)
    and `device_memory` one GPU's total memory, both None when unknown (auto then picks
    ddp).
    """
    if ranks <= 1:
        if requested == "fsdp":
            return "single", "one process: FSDP needs 2 or more GPUs, so it trains unsharded"
        return "single", "one process"
    if requested == "ddp":
        return "ddp", f"strategy ddp: a whole model on each of {ranks} ranks"
    if not cuda:
        # accelerate shards only over accelerators: its multi-CPU mode ignores FSDP.
        why = "fsdp shards over GPUs only" if requested == "fsdp" else "auto"
        return "ddp", f"{why}: on the CPU, a whole model on each of {ranks} ranks"
    if requested == "fsdp":
        return "fsdp", f"strategy fsdp: the model sharded over {ranks} ranks"
    if weights is not None and device_memory:
        gib = 2**30
        size = f"{weights / gib:.1f} GiB of weights, {device_memory / gib:.0f} GiB per GPU"
        if weights > FIT_FRACTION * device_memory:
            return "fsdp", (
                f"auto: the model does not fit one GPU with room to train ({size}), "
                f"so it is sharded over {ranks} ranks"
            )
        return "ddp", f"auto: the model fits one GPU ({size}): a copy on each of {ranks} ranks"
    return "ddp", f"auto: a whole model on each of {ranks} ranks"


def write_record(checkpoint: Path, parallel: Parallel) -> None:
    """Record in a local checkpoint how the run that writes it is spread."""
    (checkpoint / RECORD_FILE).write_text(json.dumps(parallel.to_metrics()))


def read_record(checkpoint: Path) -> str | None:
    """The strategy a checkpoint was written with; None for one without the record."""
    try:
        record = json.loads((checkpoint / RECORD_FILE).read_text())
    except (OSError, ValueError):
        return None
    strategy = record.get("strategy") if isinstance(record, dict) else None
    return strategy if strategy in ("single", "ddp", "fsdp") else None


def follow_checkpoint(parallel: Parallel, written_with: str | None, requested: str) -> Parallel:
    """The strategy to resume a checkpoint written with `written_with` under.

    One process and DDP save the same checkpoint (optimizer.pt); FSDP saves its
    optimizer state in its own format, which the others cannot load. Under `auto` a
    run keeps the family its checkpoints were written with, even when auto would now
    choose the other (on another GPU type, say). An explicit ddp or fsdp is part of the
    run's identity, so it never meets the other family's checkpoints. One process
    cannot run FSDP: an FSDP checkpoint of a run now on one GPU is refused, naming the fix.
    """
    if written_with is None or (written_with == "fsdp") == (parallel.strategy == "fsdp"):
        return parallel
    if parallel.ranks > 1:
        keep: Strategy = "fsdp" if written_with == "fsdp" else "ddp"
        return replace(
            parallel,
            strategy=keep,
            why=f"{requested}: {keep}, the strategy this run's checkpoints were written with",
        )
    raise ConfigError(
        "spec.resources.gpus: this run's checkpoints were written by FSDP over several GPUs, "
        "and one process cannot load FSDP's optimizer state",
        hint="Set spec.resources.gpus back to 2 or more to resume the run, or change a "
        "run-defining field (e.g. training.seed) to train a new run from step 0.",
    )


def model_parameters(model_dir: Path) -> int | None:
    """Parameters stored in the model folder's safetensors files (read from their
    headers, not loaded), or None when it has none (e.g. .bin weights only)."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for path in files:
        with path.open("rb") as fh:
            # safetensors: an 8-byte little-endian header length, then a JSON header
            # with each tensor's shape.
            size = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(size))
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            count = 1
            for dim in entry["shape"]:
                count *= int(dim)
            total += count
    return total


def weight_bytes(parameters: int, quantization: str, compute_dtype: str) -> int:
    """Bytes the base model's weights take on the GPU once loaded (quantized or not)."""
    per = _QUANT_BYTES.get(quantization) or _DTYPE_BYTES.get(compute_dtype, 4)
    return int(parameters * per)


def init(ranks: Ranks, *, cuda: bool) -> None:
    """Join the process group (NCCL on GPUs, gloo on the CPU) as the Trainer would, so
    the collective steps below work before the Trainer exists."""
    if not ranks.distributed:
        return
    from accelerate import PartialState

    state = PartialState(cpu=not cuda)
    log.info(
        "rank %d of %d (local rank %d) joined the process group (%s)",
        ranks.rank,
        ranks.world_size,
        ranks.local_rank,
        state.backend,
    )


def _group() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    """Wait until every rank gets here (no-op for one process)."""
    if _group():
        import torch.distributed as dist

        dist.barrier()


def from_main(value: T) -> T:
    """Rank 0's `value`, on every rank (each passes its own; only rank 0's is kept)."""
    if not _group():
        return value
    import torch.distributed as dist

    box: list[Any] = [value]
    dist.broadcast_object_list(box, src=0)
    result: T = box[0]
    return result


def gather(value: T) -> list[T]:
    """Every rank's `value`, in rank order, on every rank ([value] for one process)."""
    if not _group():
        return [value]
    import torch.distributed as dist

    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def agree(flag: bool, device: Any) -> bool:
    """True on every rank when `flag` is true on any (one small all-reduce; `device` is
    where the process group's tensors live: the rank's GPU, or the CPU for gloo)."""
    if not _group():
        return flag
    import torch
    import torch.distributed as dist

    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def shutdown() -> None:
    """Leave the process group, if this process joined one (at exit: torch warns about
    a group left open, and the other ranks' teardown waits on it)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
