"""`python -m lora_trainer --nproc-per-node N [--nnodes M ...]`: torchrun in this
process, one training process per GPU, and one outcome for the pod.

The launcher runs torch's elastic launcher (`torch.distributed.run`, the code behind
the `torchrun` command), which starts `python -m lora_trainer` once per GPU with RANK,
LOCAL_RANK and WORLD_SIZE set. On one node its c10d rendezvous runs on this node
(`--standalone`). On several (`--nnodes M`, one pod per node) it is torchrun's c10d
rendezvous backend at `--rdzv-endpoint`, the headless Service of the node-rank-0 pod:

* The node-rank-0 pod hosts the rendezvous store (`--rdzv-conf is_host=true`, the
  others false). Left to itself, the c10d backend guesses whether it hosts the store by
  comparing the endpoint's addresses with the machine's host name and addresses
  (`_matches_machine_hostname`); that guess is wrong in a pod that cannot resolve its
  own Service yet, and wherever several nodes share a host.
* `--node-rank` decides only that. torchrun uses it for the static backend alone; the
  c10d backend numbers the nodes itself once all have joined (sorted by address), so
  global rank 0, the rank that publishes and serves progress, may be on any pod. Every
  pod's report names its own ranks.
* Waiting for the rank-0 pod's DNS record: the Service gets the pod's address only once
  the pod has an IP, so the others (and the host itself, which connects to its own
  store) may find no record at first. torch's TCPStore client retries name resolution
  and connection with its own backoff until its timeout, the backend's `read_timeout`
  (RENDEZVOUS_READ_TIMEOUT); all nodes must then join within `join_timeout`.
* `--local-addr` is the pod's IP when the pod says it (LORA_TRAINER_PROGRESS_HOST,
  status.podIP): the address other nodes use for the node that gets global rank 0 (its
  workers' store). A pod's host name, torch's default, resolves only inside the pod.

torchrun does the process management; the launcher adds what the pod protocol needs
and torchrun does not do:

* One termination message and one exit code. torchrun exits 1 whatever failed, which
  would turn a permanent failure (a bad dataset) into a retry and a SIGTERM into a
  failure. Each worker writes its report to `rank-<r>.json` in a directory named by
  `LORA_TRAINER_RANK_REPORTS` instead of the termination log, and the launcher
  publishes the one that says why the group stopped (`pick_outcome`).
* Time to checkpoint. torchrun forwards the SIGTERM it gets to every worker once; they
  agree on a step, save one checkpoint and exit. It waits `--shutdown-timeout` seconds
  for them before SIGKILL: the operator passes the pod's terminationGracePeriodSeconds,
  so a checkpoint gets the whole grace period and a hung rank no longer than that.

Restarts stay the operator's: torchrun's `--max-restarts` is 0, and a group that lost a
rank ends the attempt; the next attempt resumes the group from its last checkpoint. On
several nodes each pod ends on its own: a pod whose rank died says so, and the others'
ranks fail their next collective step with the lost peer's address (a retryable
outcome, see errors.classify).
"""

# torch loads only here, once the config is known to be valid.
# ruff: noqa: PLC0415

from __future__ import annotations

import json
import logging
import os
import re
import signal
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from loraops_contract.protocol import (
    PERMANENT_EXIT_CODES,
    REASON_EXIT_CODES,
    RENDEZVOUS_PORT,
    ExitCode,
    TerminationMessage,
)
from loraops_contract.reasons import Reason
from pydantic import ValidationError

from lora_trainer.errors import ConfigError

__all__ = [
    "DEFAULT_SHUTDOWN_TIMEOUT",
    "ENV_RANK_REPORTS",
    "Nodes",
    "Outcome",
    "launch",
    "pick_outcome",
    "read_reports",
    "report_path",
]

log = logging.getLogger(__name__)

# Where each worker writes its report (set by the launcher for its workers only).
ENV_RANK_REPORTS = "LORA_TRAINER_RANK_REPORTS"
# Seconds torchrun waits for stopping workers before SIGKILL, outside a pod (a pod passes
# its terminationGracePeriodSeconds).
DEFAULT_SHUTDOWN_TIMEOUT = 300
# Seconds a node waits for the rendezvous store (the rank-0 pod's DNS record and its
# store), and for each store call during the rendezvous.
RENDEZVOUS_READ_TIMEOUT = 300
# Seconds all nodes have to join (torch's default): pods of one group may start minutes
# apart (image pulls, a node being provisioned).
RENDEZVOUS_JOIN_TIMEOUT = 600
_HOST = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\]")
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_FLAGS_HINT = (
    "The operator sets these flags from spec.resources.nodes; by hand, give every node the "
    "same --nnodes, --rdzv-endpoint and --rdzv-id and a distinct --node-rank 0..N-1."
)


@dataclass(frozen=True)
class Nodes:
    """The pods (nodes) one run spreads over, and this pod's place among them."""

    count: int = 1
    rank: int = 0
    endpoint: str = ""  # host:port of the rendezvous store (the node-rank-0 pod)
    run_id: str = ""  # the same on every node: which rendezvous to join

    @classmethod
    def parse(cls, count: int, rank: int, endpoint: str | None, run_id: str | None) -> Nodes:
        """Checked command-line values; a ConfigError naming the flag otherwise."""
        if count < 1:
            raise ConfigError(f"--nnodes must be 1 or more, got {count}", hint=_FLAGS_HINT)
        if not 0 <= rank < count:
            raise ConfigError(
                f"--node-rank {rank} is out of range for --nnodes {count} (0..{count - 1})",
                hint=_FLAGS_HINT,
            )
        if count == 1:
            if endpoint or run_id:
                raise ConfigError(
                    "--rdzv-endpoint and --rdzv-id are for runs on several nodes (--nnodes 2 "
                    "or more); one node rendezvouses with itself",
                    hint=_FLAGS_HINT,
                )
            return cls()
        if not endpoint:
            raise ConfigError(
                f"--nnodes {count} needs --rdzv-endpoint HOST:PORT (the node-rank-0 pod's "
                f"Service, port {RENDEZVOUS_PORT})",
                hint=_FLAGS_HINT,
            )
        host, _, port = endpoint.rpartition(":")
        if not (host and _HOST.fullmatch(host) and port.isdigit() and 0 < int(port) < 65536):
            raise ConfigError(
                f"--rdzv-endpoint {endpoint!r} is not HOST:PORT (a DNS name or IP address, "
                f"then a port 1-65535, e.g. job-rdzv.team.svc:{RENDEZVOUS_PORT})",
                hint=_FLAGS_HINT,
            )
        if not run_id or not _RUN_ID.fullmatch(run_id):
            raise ConfigError(
                f"--nnodes {count} needs --rdzv-id: letters, digits, '.', '_' or '-', at most "
                f"128 (got {run_id!r}); the same on every node",
                hint=_FLAGS_HINT,
            )
        return cls(count, rank, endpoint, run_id)

    def torchrun_args(self, local_addr: str | None) -> list[str]:
        """torchrun's rendezvous flags for these nodes (see the module docstring)."""
        if self.count == 1:
            return ["--standalone"]
        conf = (
            f"is_host={'true' if self.rank == 0 else 'false'},"
            f"read_timeout={RENDEZVOUS_READ_TIMEOUT},join_timeout={RENDEZVOUS_JOIN_TIMEOUT}"
        )
        return [
            f"--nnodes={self.count}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={self.endpoint}",
            f"--rdzv-id={self.run_id}",
            f"--rdzv-conf={conf}",
            *([f"--local-addr={local_addr}"] if local_addr else []),
        ]


@dataclass(frozen=True)
class Outcome:
    """What the pod reports: the termination message and the exit code."""

    message: TerminationMessage
    exit_code: int


def report_path(env: Mapping[str, str], rank: int) -> Path | None:
    """Where worker `rank` writes its report, or None outside the launcher."""
    directory = env.get(ENV_RANK_REPORTS)
    return Path(directory) / f"rank-{rank}.json" if directory else None


def read_reports(directory: Path) -> dict[int, TerminationMessage]:
    """The workers' reports by rank; unreadable ones are left out (a worker killed
    mid-write has no report)."""
    reports: dict[int, TerminationMessage] = {}
    for path in directory.glob("rank-*.json"):
        try:
            rank = int(path.stem.removeprefix("rank-"))
            reports[rank] = TerminationMessage.model_validate(json.loads(path.read_text()))
        except (OSError, ValueError, ValidationError):
            continue
    return reports


def _exit_code(msg: TerminationMessage) -> int:
    if msg.outcome == "Succeeded":
        return ExitCode.OK
    try:
        return REASON_EXIT_CODES.get(Reason(msg.reason or ""), ExitCode.INTERNAL)
    except ValueError:  # not a reason this version knows
        return ExitCode.INTERNAL


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def pick_outcome(
    reports: Mapping[int, TerminationMessage],
    exit_codes: Mapping[int, int],
    *,
    world_size: int,
    stopped_by: str | None,
) -> Outcome:
    """This node's outcome from its ranks' reports and exit codes (keyed by global rank).

    `exit_codes` holds the ranks that failed (torchrun lists only those); `stopped_by`
    names the signal that stopped the launcher, if one did; `world_size` counts the
    ranks of every node.

    The node's lead rank is its lowest: rank 0 on the node that has it, which reports
    success only once the adapter and its manifest are published, so that stands
    whatever happened to the other ranks afterwards (on another node, the lead's success
    means its part of the run is done). Otherwise the cause is, in order: a permanent
    failure any rank reported (every rank would meet it again); a rank that died
    without a report (killed: the others only saw it go); another failure than
    Interrupted; else the lead's report, which carries the step and last checkpoint.
    """
    here = set(reports) | set(exit_codes)
    lead = min(here) if here else 0
    main = reports.get(lead)
    if main is not None and main.outcome == "Succeeded":
        return Outcome(main, ExitCode.OK)
    failed = {r: m for r, m in reports.items() if m.outcome != "Succeeded"}
    bookkeeping = {
        "steps": main.steps if main else None,
        "last_checkpoint": main.last_checkpoint if main else None,
    }

    def with_progress(msg: TerminationMessage) -> TerminationMessage:
        extra = {k: v for k, v in bookkeeping.items() if getattr(msg, k) is None and v}
        return msg.model_copy(update=extra)

    for rank in sorted(failed):
        if _exit_code(failed[rank]) in PERMANENT_EXIT_CODES:
            return Outcome(with_progress(failed[rank]), _exit_code(failed[rank]))
    silent = sorted(r for r in exit_codes if r not in reports)
    if silent and not stopped_by:
        rank, code = silent[0], exit_codes[silent[0]]
        how = f"was killed by {_signal_name(code)}" if code < 0 else f"exited {code}"
        msg = TerminationMessage(
            outcome="Failed",
            reason=Reason.INTERNAL_ERROR.value,
            message=f"rank {rank} of {world_size} {how} without a report; the other ranks "
            "were stopped with it",
            hint="The next attempt resumes the group from the last checkpoint. If a rank "
            "keeps dying, check the node (GPU errors in dmesg, host memory: "
            "spec.resources.memory).",
            retryable=True,
        )
        return Outcome(with_progress(msg), ExitCode.INTERNAL)
    for rank in sorted(failed):
        if failed[rank].reason != Reason.INTERRUPTED.value and not stopped_by:
            return Outcome(with_progress(failed[rank]), _exit_code(failed[rank]))
    if main is not None:
        return Outcome(main, _exit_code(main))
    reason = f"stopped by {stopped_by}" if stopped_by else "the training processes ended"
    msg = TerminationMessage(
        outcome="Failed",
        reason=(Reason.INTERRUPTED if stopped_by else Reason.INTERNAL_ERROR).value,
        message=f"{reason} before rank {lead} reported",
        retryable=True,
    )
    return Outcome(with_progress(msg), _exit_code(msg))


def launch(
    nproc: int,
    shutdown_timeout: int,
    worker_args: list[str],
    nodes: Nodes | None = None,
    local_addr: str | None = None,
) -> Outcome:
    """Run `nproc` workers (`python -m lora_trainer *worker_args`) under torchrun on this
    node, in a rendezvous with the other `nodes`, and return this node's outcome."""
    nodes = nodes or Nodes()
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser
    from torch.distributed.run import run as torchrun

    with tempfile.TemporaryDirectory(prefix="lora-ranks-") as reports_dir:
        os.environ[ENV_RANK_REPORTS] = reports_dir
        args = get_args_parser().parse_args(
            [
                *nodes.torchrun_args(local_addr),
                f"--nproc-per-node={nproc}",
                "--max-restarts=0",
                f"--shutdown-timeout={shutdown_timeout}",
                "--module",
                "lora_trainer",
                *worker_args,
            ]
        )
        exit_codes: dict[int, int] = {}
        stopped_by: str | None = None
        if nodes.count > 1:
            log.info(
                "starting %d training processes on node %d of %d (torchrun, c10d rendezvous "
                "at %s, %s)",
                nproc,
                nodes.rank,
                nodes.count,
                nodes.endpoint,
                "hosted here" if nodes.rank == 0 else "hosted by node 0",
            )
        else:
            log.info(
                "starting %d training processes (torchrun, c10d rendezvous on this node)", nproc
            )
        try:
            torchrun(args)  # type: ignore[no-untyped-call]
        except ChildFailedError as e:
            exit_codes = {rank: f.exitcode for rank, f in e.failures.items()}
            log.warning(
                "training processes failed: %s",
                ", ".join(f"rank {r} exit {c}" for r, c in sorted(exit_codes.items())),
            )
        except SignalException as e:
            stopped_by = signal.Signals(e.sigval).name
            log.warning("%s received: the training processes were stopped", stopped_by)
        return pick_outcome(
            read_reports(Path(reports_dir)),
            exit_codes,
            world_size=nproc * nodes.count,
            stopped_by=stopped_by,
        )
