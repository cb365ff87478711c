"""Several training processes: the strategy, the global batch, the run identity across
rank counts, the launcher's one outcome, and (slow) real runs of 2 ranks on the CPU
over gloo: the loss curve of a single process, a lost rank and a SIGTERM resumed from
their checkpoints, and a resume with another number of ranks."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from lora_trainer import distributed
from lora_trainer.distributed import Parallel, Ranks, choose_strategy
from lora_trainer.errors import ConfigError, PeerLost, classify
from lora_trainer.hf import Device, model_load_kwargs, sft_config_kwargs, to_bnb_config
from lora_trainer.launch import Nodes, pick_outcome
from lora_trainer.reporting import failure_message
from loraops_contract.config import TrainerConfig, run_defining_changes, run_id
from loraops_contract.protocol import ExitCode, TerminationMessage
from torch.distributed import DistNetworkError
from torch.distributed.elastic.rendezvous.api import RendezvousConnectionError
from transformers import AutoModelForCausalLM

from devcluster.process import free_port
from devcluster.tiny_model import write_dataset
from tests.trainer.trainer_proc import TrainerRun, reaped, start_trainer

GIB = 2**30
BASE: dict[str, Any] = {
    "model": {"uri": "/models/m"},
    "dataset": {"uri": "/data/train.jsonl"},
    "output": {"uri": "s3://out/adapter"},
}


def _cfg(**training: Any) -> TrainerConfig:
    return TrainerConfig.model_validate(BASE | {"training": training})


# --- the strategy and the batch ------------------------------------------------------


def test_auto_picks_by_gpus_and_model_size() -> None:
    assert choose_strategy("auto", 1)[0] == "single"
    # No size known (the CPU, or no safetensors): a copy per rank.
    assert choose_strategy("auto", 2)[0] == "ddp"
    # A 4-bit 8B model (~4.3 GB) fits an 80 GiB GPU with room to train ...
    strategy, why = choose_strategy("auto", 8, weights=int(4.3e9), device_memory=80 * GIB)
    assert strategy == "ddp"
    assert "fits one GPU" in why
    # ... a 4-bit 70B model (~37 GB) does not fit a 48 GiB one: sharded.
    strategy, why = choose_strategy("auto", 4, weights=int(37e9), device_memory=48 * GIB)
    assert strategy == "fsdp"
    assert "sharded over 4 ranks" in why
    # An explicit choice is kept; one process has nothing to shard over.
    assert choose_strategy("fsdp", 2)[0] == "fsdp"
    assert choose_strategy("ddp", 4, weights=int(37e9), device_memory=48 * GIB)[0] == "ddp"
    assert choose_strategy("fsdp", 1)[0] == "single"
    # accelerate shards over GPUs only: on the CPU the ranks run data parallel, and say so.
    strategy, why = choose_strategy("fsdp", 2, cuda=False)
    assert strategy == "ddp"
    assert "GPUs only" in why


def test_weights_are_counted_from_the_safetensors_headers(tiny_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    stored = {id(p): p.numel() for p in model.parameters()}  # tied weights once
    assert distributed.model_parameters(tiny_model_dir) == sum(stored.values())
    assert distributed.model_parameters(tiny_model_dir.parent) is None
    assert distributed.weight_bytes(8_000_000_000, "nf4", "bfloat16") == int(8e9 * 0.53)
    assert distributed.weight_bytes(1000, "none", "bfloat16") == 2000
    assert distributed.weight_bytes(1000, "int8", "float32") == 1000


def test_global_batch_is_per_device_times_ranks_times_accumulation() -> None:
    p = Parallel("ddp", ranks=8, per_device_batch_size=4, gradient_accumulation_steps=2)
    assert p.global_batch_size == 64
    assert p.to_metrics()["global_batch_size"] == 64


def test_a_run_keeps_the_checkpoint_format_it_was_written_in(tmp_path: Path) -> None:
    """DDP and one process share a checkpoint format, FSDP has its own optimizer state:
    under auto, a run resumes in the family its checkpoints were written with."""
    ddp = Parallel("ddp", ranks=4, per_device_batch_size=2, gradient_accumulation_steps=1)
    distributed.write_record(tmp_path, ddp)
    assert distributed.read_record(tmp_path) == "ddp"
    assert distributed.read_record(tmp_path / "missing") is None
    # auto would shard now (a smaller GPU, say): the ddp checkpoint keeps the run on ddp.
    fsdp = Parallel("fsdp", ranks=4, per_device_batch_size=2, gradient_accumulation_steps=1)
    kept = distributed.follow_checkpoint(fsdp, "ddp", "auto")
    assert kept.strategy == "ddp"
    assert "written with" in kept.why
    assert distributed.follow_checkpoint(ddp, "fsdp", "auto").strategy == "fsdp"
    # Same family, or no record: unchanged.
    assert distributed.follow_checkpoint(ddp, "single", "auto") is ddp
    assert distributed.follow_checkpoint(fsdp, None, "auto") is fsdp
    # One process cannot load FSDP's optimizer state: refused, naming the fix.
    single = Parallel("single", ranks=1, per_device_batch_size=8, gradient_accumulation_steps=1)
    with pytest.raises(ConfigError, match="written by FSDP") as info:
        distributed.follow_checkpoint(single, "fsdp", "auto")
    assert "gpus back to 2 or more" in (info.value.hint or "")


def test_ranks_from_torchrun_environment() -> None:
    assert Ranks.from_env({}) == Ranks()
    assert not Ranks().distributed
    env = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}
    ranks = Ranks.from_env(env)
    assert (ranks.rank, ranks.local_rank, ranks.world_size) == (3, 1, 4)
    assert ranks.distributed
    assert not ranks.is_main
    assert not ranks.is_local_main


def test_each_rank_loads_the_model_onto_its_own_gpu() -> None:
    cfg = _cfg()
    rank3 = Device(cuda=True, bf16=True, name="H100", index=3)
    assert model_load_kwargs(cfg, rank3, "ddp")["device_map"] == {"": 3}
    bnb = to_bnb_config(cfg.quantization, rank3, "ddp")
    assert bnb is not None
    assert bnb.bnb_4bit_quant_storage == torch.uint8
    # FSDP: no device map (the wrapper places the shards), 4-bit weights stored in the
    # compute dtype so FSDP can shard them.
    fsdp = model_load_kwargs(cfg, rank3, "fsdp")
    assert "device_map" not in fsdp
    assert fsdp["quantization_config"].bnb_4bit_quant_storage == torch.bfloat16


def test_trainer_arguments_per_strategy(tmp_path: Path) -> None:
    cfg, cpu = _cfg(), Device(cuda=False)
    ddp = sft_config_kwargs(cfg, cpu, tmp_path, has_eval=False, strategy="ddp")
    assert ddp["ddp_find_unused_parameters"] is False
    assert "fsdp" not in ddp
    fsdp = sft_config_kwargs(cfg, cpu, tmp_path, has_eval=False, strategy="fsdp")
    assert fsdp["fsdp"] is True
    assert fsdp["fsdp_config"]["state_dict_type"] == "FULL_STATE_DICT"
    # FSDP's own activation checkpointing replaces the Trainer's.
    assert fsdp["fsdp_config"]["activation_checkpointing"] is True
    assert fsdp["activation_checkpointing"] is False
    single = sft_config_kwargs(cfg, cpu, tmp_path, has_eval=False)
    assert "fsdp" not in single
    assert "ddp_find_unused_parameters" not in single


# --- the run identity across rank counts ---------------------------------------------


def test_a_run_is_its_global_batch_whatever_the_ranks() -> None:
    one = _cfg(batchSize=8)
    # One rank: the identity is exactly what it was before ranks counted.
    assert run_id(one, 1) == run_id(one)
    # 2 GPUs at batchSize 4 make the same optimizer steps as 1 at batchSize 8: they
    # resume each other's checkpoints.
    assert run_id(_cfg(batchSize=4), 2) == run_id(one, 1)
    assert run_id(_cfg(batchSize=2), 4) == run_id(one, 1)
    # More GPUs at the same batchSize: a larger global batch, a new run.
    assert run_id(_cfg(batchSize=8), 2) != run_id(one, 1)
    assert run_defining_changes(one, one, (1, 2)) == ["training.batchSize"]
    assert run_defining_changes(one, _cfg(batchSize=4), (1, 2)) == []
    # The default batch over 4 ranks of 1: still the default identity.
    assert run_id(_cfg(batchSize=1), 4) == run_id(_cfg())


# --- the launcher's one outcome --------------------------------------------------------


def _failed(reason: str, **extra: Any) -> TerminationMessage:
    return TerminationMessage(outcome="Failed", reason=reason, message=reason, **extra)


def test_outcome_of_a_clean_run_is_rank_zeros() -> None:
    ok = TerminationMessage(outcome="Succeeded", message="trained 10 steps", steps=10)
    done = TerminationMessage(outcome="Succeeded", message="rank 1: trained 10 steps")
    outcome = pick_outcome({0: ok, 1: done}, {}, world_size=2, stopped_by=None)
    assert outcome.exit_code == ExitCode.OK
    assert outcome.message is ok
    # Rank 0 reports success once the adapter is published: that stands, whatever a
    # rank did after it (here: died at exit without a report).
    late = pick_outcome({0: ok}, {1: -9}, world_size=2, stopped_by="SIGTERM")
    assert late.exit_code == ExitCode.OK


def test_outcome_names_the_cause_not_the_ranks_stopped_with_it() -> None:
    interrupted = _failed("Interrupted", steps=7, last_checkpoint="s3://o/ckpt-5")
    # A permanent failure on any rank wins: the job fails for good, with rank 0's progress.
    oom = _failed("CUDAOutOfMemory")
    outcome = pick_outcome({0: interrupted, 1: oom}, {1: 15}, world_size=2, stopped_by=None)
    assert outcome.exit_code == ExitCode.CUDA_OOM
    assert outcome.message.reason == "CUDAOutOfMemory"
    assert outcome.message.last_checkpoint == "s3://o/ckpt-5"
    # A rank killed without a report is the cause; the others only saw it go.
    peer_gone = _failed("InternalError")
    outcome = pick_outcome({0: peer_gone}, {0: 30, 1: -9}, world_size=2, stopped_by=None)
    assert outcome.exit_code == ExitCode.INTERNAL
    assert "rank 1 of 2 was killed by SIGKILL" in outcome.message.message
    assert outcome.message.retryable
    # SIGTERM to the pod: rank 0's Interrupted report, exit INTERRUPTED.
    outcome = pick_outcome(
        {0: interrupted, 1: _failed("Interrupted")}, {}, world_size=2, stopped_by="SIGTERM"
    )
    assert outcome.exit_code == ExitCode.INTERRUPTED
    assert outcome.message is interrupted
    # Stopped before any rank reported.
    outcome = pick_outcome({}, {}, world_size=2, stopped_by="SIGTERM")
    assert outcome.exit_code == ExitCode.INTERRUPTED
    assert "before rank 0 reported" in outcome.message.message


# --- real runs: 2 ranks over gloo on the CPU -------------------------------------------

MAX_STEPS = 12
INTERVAL = 4
# Losses of the 2-rank run and of one process agree to this (relative): the same rows
# make each step, and only the order of float additions differs (all-reduce vs one
# sum). Measured: at most 5e-5 absolute on losses of about 6.
LOSS_TOLERANCE = 1e-4


def _config(out: Path, data: Path, batch: int) -> dict[str, Any]:
    return {
        "model": {"uri": "<set below>"},
        "dataset": {"uri": str(data), "evalSplit": 0.0},
        # No dropout: the only randomness left is the data order, the same for both.
        "lora": {"dropout": 0.0},
        "quantization": {"mode": "nf4"},
        "training": {
            "maxSteps": MAX_STEPS,
            "batchSize": batch,
            "gradientAccumulationSteps": 1,
            "maxSeqLength": 64,
            "learningRate": 1e-3,
            "checkpointEverySteps": INTERVAL,
            "gradientCheckpointing": False,
        },
        "output": {"uri": str(out), "keepCheckpoints": True},
    }


def _start(cfg: dict[str, Any], work: Path, name: str, ranks: int) -> TrainerRun:
    args = ["--nproc-per-node", str(ranks)] if ranks > 1 else []
    # One thread per rank: two ranks share this machine's cores.
    return start_trainer(
        args, {"LORA_TRAINER_CONFIG": json.dumps(cfg), "OMP_NUM_THREADS": "1"}, work, name
    )


def _complete(out: Path) -> list[int]:
    return sorted(int(p.parent.name.removeprefix("checkpoint-")) for p in out.rglob("COMPLETE"))


def _rank_pid(launcher: int, rank: int) -> int:
    """The worker process of `rank` among the launcher's children (torchrun's workers)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if ppid == launcher and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    raise AssertionError(f"no rank {rank} under launcher {launcher}")


def _assert_on_reference_curve(
    curve: dict[int, float], reference: dict[int, float], after_step: int
) -> None:
    """`curve` logged every step after `after_step` up to MAX_STEPS, each loss the single
    process's at that step within LOSS_TOLERANCE."""
    assert sorted(curve) == list(range(after_step + 1, MAX_STEPS + 1)), curve
    for step, loss in curve.items():
        assert loss == pytest.approx(reference[step], rel=LOSS_TOLERANCE), (step, curve, reference)


def _losses(out: Path) -> dict[int, float]:
    metrics = json.loads((out / "metrics.json").read_text())
    return {int(step): float(loss) for step, loss in metrics["loss_history"]}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data") / "train.parquet", "messages", n=96)


def _run_config(model: Path, out: Path, data: Path, batch: int) -> dict[str, Any]:
    cfg = _config(out, data, batch)
    cfg["model"]["uri"] = str(model)
    return cfg


@pytest.fixture(scope="module")
def reference(
    tiny_model_dir: Path, dataset: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[int, float]:
    """The loss curve of one process at 4 rows per step."""
    tmp = tmp_path_factory.mktemp("reference")
    cfg = _run_config(tiny_model_dir, tmp / "out", dataset, 4)
    with reaped(_start(cfg, tmp / "work", "reference", 1)) as ref:
        rc, log, _ = ref.finish(timeout=600)
    assert rc == ExitCode.OK, log[-3000:]
    losses = _losses(tmp / "out")
    assert sorted(losses) == list(range(1, MAX_STEPS + 1))
    return losses


@pytest.mark.slow
def test_two_ranks_match_one_process_step_by_step(
    tiny_model_dir: Path, dataset: Path, reference: dict[int, float], tmp_path: Path
) -> None:
    """2 ranks x 2 rows against 1 process x 4 rows: the same loss at every step."""
    out = tmp_path / "out"
    cfg = _run_config(tiny_model_dir, out, dataset, 2)
    with reaped(_start(cfg, tmp_path / "work", "two-ranks", 2)) as run:
        rc, log, term = run.finish(timeout=600)
    assert rc == ExitCode.OK, log[-3000:]
    assert term is not None
    assert term["steps"] == MAX_STEPS
    _assert_on_reference_curve(_losses(out), reference, after_step=0)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["parallel"]["strategy"] == "ddp"
    assert metrics["parallel"]["global_batch_size"] == 4
    # Only rank 0 published: one adapter, one manifest, one report.
    assert (out / "manifest.json").is_file()
    # Rank 0's and the launcher's (rank 1 logs only warnings; its report went to the
    # launcher alone).
    assert log.count("outcome:") == 2


@pytest.mark.slow
def test_a_lost_rank_and_sigterm_resume_the_group_from_its_checkpoint(
    tiny_model_dir: Path, dataset: Path, reference: dict[int, float], tmp_path: Path
) -> None:
    work = tmp_path / "work"
    out = tmp_path / "out"
    two = _run_config(tiny_model_dir, out, dataset, 2)

    # 1. Two ranks of 2 rows. Kill rank 1 once a checkpoint is complete: the group
    # stops, and the report names the rank that was lost.
    first = _start(two, work, "first", 2)
    seen: dict[str, Any] = {}

    def past_first_checkpoint() -> bool:
        p = first.progress() or {}
        seen.update(p)
        return bool(_complete(out)) and p.get("step", 0) > INTERVAL

    with reaped(first):
        first.wait_until(past_first_checkpoint, timeout=600)
        os.kill(_rank_pid(first.proc.pid, 1), signal.SIGKILL)
        rc, log, term = first.finish(timeout=300)
    assert rc == ExitCode.INTERNAL, log[-3000:]
    assert term is not None
    assert "rank 1 of 2 was killed by SIGKILL" in term["message"]
    assert term["retryable"] is True
    # Status showed how the run is spread.
    assert (seen["strategy"], seen["ranks"], seen["globalBatchSize"]) == ("ddp", 2, 4)

    # 2. The group starts again from that checkpoint; SIGTERM stops every rank after the
    # same step with one checkpoint that holds each rank's part.
    second = _start(two, work, "second", 2)
    with reaped(second):
        resumed = second.wait_resumed(steps=2, timeout=600)
        second.proc.send_signal(signal.SIGTERM)
        rc, log, term = second.finish(timeout=300)
    assert resumed["resumedFromStep"] == INTERVAL
    assert rc == ExitCode.INTERRUPTED, log[-3000:]
    assert term is not None
    assert term["reason"] == "Interrupted"
    stopped_at = max(_complete(out))
    assert stopped_at > INTERVAL
    assert term["lastCheckpoint"].endswith(f"checkpoint-{stopped_at}")
    [ckpt] = [p.parent for p in out.rglob("COMPLETE") if p.parent.name.endswith(f"-{stopped_at}")]
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in ckpt.iterdir()}
    assert distributed.read_record(ckpt) == "ddp"
    assert log.count("saving a checkpoint after the current step") == 2  # once per rank

    # 3. One process at 4 rows per step is the same run (the same global batch): it
    # resumes the two ranks' checkpoint and ends at exactly maxSteps, on the reference's
    # loss curve.
    with reaped(_start(_run_config(tiny_model_dir, out, dataset, 4), work, "third", 1)) as third:
        rc, log, term = third.finish(timeout=600)
    assert rc == ExitCode.OK, log[-3000:]
    assert term is not None
    assert term["steps"] == MAX_STEPS
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed_from_step"] == stopped_at
    assert metrics["parallel"] == metrics["parallel"] | {"ranks": 1, "global_batch_size": 4}
    _assert_on_reference_curve(_losses(out), reference, after_step=stopped_at)


# --- several nodes: one launcher per pod, torchrun's c10d rendezvous between them -------


def test_node_flags_are_checked_naming_the_flag() -> None:
    assert Nodes.parse(1, 0, None, None) == Nodes()
    two = Nodes.parse(2, 1, "job-rdzv.team.svc:29400", "job-abc")
    assert (two.count, two.rank) == (2, 1)
    with pytest.raises(ConfigError, match=r"--node-rank 2 is out of range for --nnodes 2"):
        Nodes.parse(2, 2, "h:29400", "id")
    with pytest.raises(ConfigError, match=r"--node-rank -1 is out of range"):
        Nodes.parse(2, -1, "h:29400", "id")
    with pytest.raises(ConfigError, match=r"--nnodes must be 1 or more"):
        Nodes.parse(0, 0, None, None)
    for endpoint in ("job-rdzv.team.svc", "job rdzv:29400", ":29400", "h:0", "h:70000", "h:x"):
        with pytest.raises(ConfigError, match=r"--rdzv-endpoint .* is not HOST:PORT"):
            Nodes.parse(2, 0, endpoint, "id")
    with pytest.raises(ConfigError, match=r"needs --rdzv-endpoint"):
        Nodes.parse(2, 0, None, "id")
    with pytest.raises(ConfigError, match=r"needs --rdzv-id"):
        Nodes.parse(2, 0, "h:29400", None)
    with pytest.raises(ConfigError, match=r"for runs on several nodes"):
        Nodes.parse(1, 0, "h:29400", "id")
    assert Nodes.parse(2, 0, "[fd00::1]:29400", "id").endpoint == "[fd00::1]:29400"


def test_node_zero_hosts_the_rendezvous_store() -> None:
    """The c10d backend's own guess (does the endpoint resolve to this machine?) fails
    before the Service has the pod's address and where nodes share a host: node 0 is
    told to host, the others not to."""
    host = Nodes.parse(2, 0, "job-rdzv.team.svc:29400", "job-abc").torchrun_args("10.1.2.3")
    assert "--rdzv-backend=c10d" in host
    assert "--rdzv-endpoint=job-rdzv.team.svc:29400" in host
    assert "--rdzv-id=job-abc" in host
    assert "--nnodes=2" in host
    assert "--local-addr=10.1.2.3" in host
    assert "--standalone" not in host
    [conf] = [a for a in host if a.startswith("--rdzv-conf=")]
    assert "is_host=true" in conf
    assert "read_timeout=" in conf
    peer = Nodes.parse(2, 1, "job-rdzv.team.svc:29400", "job-abc").torchrun_args(None)
    assert any("is_host=false" in a for a in peer)
    assert not any(a.startswith("--local-addr") for a in peer)
    assert Nodes().torchrun_args("10.1.2.3") == ["--standalone"]


def test_a_pod_without_rank_zero_reports_its_own_ranks() -> None:
    done = TerminationMessage(outcome="Succeeded", message="rank 2: trained 10 steps")
    outcome = pick_outcome({2: done, 3: done}, {}, world_size=4, stopped_by=None)
    assert outcome.exit_code == ExitCode.OK
    # Its peer on another node died: its ranks fail their next collective step.
    lost = classify(
        RuntimeError(
            "[../third_party/gloo/gloo/transport/tcp/pair.cc:538] Connection closed by peer "
            "[10.1.2.3]:41234"
        )
    )
    assert isinstance(lost, PeerLost)
    assert lost.retryable
    report = failure_message(lost)
    outcome = pick_outcome({2: report, 3: report}, {2: 30, 3: 30}, world_size=4, stopped_by=None)
    assert outcome.exit_code == ExitCode.INTERNAL
    assert outcome.message.retryable
    assert "10.1.2.3" in outcome.message.message
    # The rendezvous itself failed (here: the store's port taken): why, not "a bug".
    try:
        try:
            raise DistNetworkError("failed to listen ... port: 29400, name: EADDRINUSE")
        except DistNetworkError as inner:
            raise RendezvousConnectionError("See inner exception for details.") from inner
    except RendezvousConnectionError as e:
        failed = classify(e)
    assert failed.retryable
    assert "rendezvous with the run's other nodes failed" in failed.message
    assert "EADDRINUSE" in failed.message
    assert "29400" in (failed.hint or "")
    # Its own rank died: named by its global rank, among all nodes' ranks.
    silent = pick_outcome({}, {3: -9}, world_size=4, stopped_by=None)
    assert "rank 3 of 4 was killed by SIGKILL" in silent.message.message
    assert silent.message.retryable


def _start_node(cfg: dict[str, Any], work: Path, name: str, node: int, endpoint: str) -> TrainerRun:
    args = ["--nnodes", "2", "--node-rank", str(node), "--rdzv-endpoint", endpoint]
    args += ["--rdzv-id", "two-nodes", "--shutdown-timeout", "30"]
    env = {"LORA_TRAINER_CONFIG": json.dumps(cfg), "OMP_NUM_THREADS": "1"}
    return start_trainer(args, env, work, name)


@pytest.mark.slow
def test_two_nodes_match_one_process_step_by_step(
    tiny_model_dir: Path, dataset: Path, reference: dict[int, float], tmp_path: Path
) -> None:
    """Two pods (two launchers, each with its own scratch directory, 1 rank x 2 rows)
    against 1 process x 4 rows: the same loss at every step, one adapter, and
    checkpoints that hold both nodes' parts."""
    out = tmp_path / "out"
    cfg = _run_config(tiny_model_dir, out, dataset, 2)
    endpoint = f"127.0.0.1:{free_port()}"
    # Node 1 first: it waits for node 0's store (the pod whose DNS record comes later).
    node1 = _start_node(cfg, tmp_path / "work", "node-1", 1, endpoint)
    node0 = _start_node(cfg, tmp_path / "work", "node-0", 0, endpoint)
    with reaped(node0), reaped(node1):
        rc0, log0, term0 = node0.finish(timeout=600)
        rc1, log1, term1 = node1.finish(timeout=120)
    assert (rc0, rc1) == (ExitCode.OK, ExitCode.OK), log0[-3000:] + log1[-3000:]
    assert term0 is not None
    assert term1 is not None
    # Global rank 0 is on either pod (the c10d backend numbers the nodes); it alone
    # published and says where the adapter is.
    [main] = [t for t in (term0, term1) if t.get("adapter")]
    assert main["steps"] == MAX_STEPS
    _assert_on_reference_curve(_losses(out), reference, after_step=0)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["parallel"]["ranks"] == 2
    assert metrics["parallel"]["global_batch_size"] == 4
    for ckpt in {p.parent for p in out.rglob("COMPLETE")}:
        assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in ckpt.iterdir()}
        marker = json.loads((ckpt / "COMPLETE").read_text())
        assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(marker["files"])


@pytest.mark.slow
def test_a_lost_node_rank_ends_both_pods_retryably_and_the_group_resumes(
    tiny_model_dir: Path, dataset: Path, reference: dict[int, float], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    cfg = _run_config(tiny_model_dir, out, dataset, 2)
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [_start_node(cfg, tmp_path / "work", f"first-{n}", n, endpoint) for n in (0, 1)]

    def past_first_checkpoint() -> bool:
        steps = [(node.progress() or {}).get("step", 0) for node in nodes]
        return bool(_complete(out)) and max(steps) > INTERVAL

    # 1. Rank 1 (on whichever pod holds it) dies: its pod names it, the other pod's rank
    # loses its peer; both are retryable.
    with reaped(nodes[0]), reaped(nodes[1]):
        nodes[0].wait_until(past_first_checkpoint, timeout=600)
        [(holder, pid)] = [
            (node, pid)
            for node in nodes
            for pid in [_child_with_rank(node.proc.pid, 1)]
            if pid is not None
        ]
        os.kill(pid, signal.SIGKILL)
        ends = {id(node): node.finish(timeout=300) for node in nodes}
    for node in nodes:
        rc, log, term = ends[id(node)]
        assert rc == ExitCode.INTERNAL, log[-3000:]
        assert term is not None
        assert term["retryable"] is True
        if node is holder:
            assert "rank 1 of 2 was killed by SIGKILL" in term["message"]
        else:
            assert "lost contact with another rank" in term["message"], term

    # 2. Both pods start again: the group resumes from the checkpoint both wrote, on the
    # single process's loss curve.
    endpoint = f"127.0.0.1:{free_port()}"
    again = [_start_node(cfg, tmp_path / "work", f"second-{n}", n, endpoint) for n in (1, 0)]
    with reaped(again[0]), reaped(again[1]):
        results = [node.finish(timeout=600) for node in again]
    assert [rc for rc, _, _ in results] == [ExitCode.OK, ExitCode.OK], results[0][1][-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    resumed = metrics["resumed_from_step"]
    assert resumed >= INTERVAL
    _assert_on_reference_curve(_losses(out), reference, after_step=resumed)


def _child_with_rank(launcher: int, rank: int) -> int | None:
    try:
        return _rank_pid(launcher, rank)
    except AssertionError:
        return None
