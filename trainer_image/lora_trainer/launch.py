"""`python -m lora_trainer --nproc-per-node N`: torchrun in this process, one training
process per GPU, and one outcome for the pod.

The launcher runs torch's elastic launcher (`torch.distributed.run`, the code behind
the `torchrun` command) with its c10d rendezvous on this node (`--standalone`), which
starts `python -m lora_trainer` once per GPU with RANK, LOCAL_RANK and WORLD_SIZE set.
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
rank ends the attempt; the next attempt resumes the group from its last checkpoint.
"""

# torch loads only here, once the config is known to be valid.
# ruff: noqa: PLC0415

from __future__ import annotations

import json
import logging
import os
import signal
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from loraops_contract.protocol import (
    PERMANENT_EXIT_CODES,
    REASON_EXIT_CODES,
    ExitCode,
    TerminationMessage,
)
from loraops_contract.reasons import Reason
from pydantic import ValidationError

__all__ = [
    "DEFAULT_SHUTDOWN_TIMEOUT",
    "ENV_RANK_REPORTS",
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
    """The group's outcome from each rank's report and exit code.

    `exit_codes` holds the ranks that failed (torchrun lists only those); `stopped_by`
    names the signal that stopped the launcher, if one did.

    Rank 0 reports success only once the adapter and its manifest are published, so
    that stands whatever happened to the other ranks afterwards. Otherwise the cause
    is, in order: a permanent failure any rank reported (every rank would meet it
    again); a rank that died without a report (killed: the others only saw it go);
    another failure than Interrupted; else rank 0's report, which carries the step and
    last checkpoint.
    """
    main = reports.get(0)
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
        message=f"{reason} before rank 0 reported",
        retryable=True,
    )
    return Outcome(with_progress(msg), _exit_code(msg))


def launch(nproc: int, shutdown_timeout: int, worker_args: list[str]) -> Outcome:
    """Run `nproc` workers (`python -m lora_trainer *worker_args`) under torchrun on this
    node and return the group's outcome."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser
    from torch.distributed.run import run as torchrun

    with tempfile.TemporaryDirectory(prefix="lora-ranks-") as reports_dir:
        os.environ[ENV_RANK_REPORTS] = reports_dir
        args = get_args_parser().parse_args(
            [
                "--standalone",
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
        log.info("starting %d training processes (torchrun, c10d rendezvous on this node)", nproc)
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
            read_reports(Path(reports_dir)), exit_codes, world_size=nproc, stopped_by=stopped_by
        )
