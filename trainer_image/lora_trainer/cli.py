"""Command line: find the config, set up the runtime, run, report, exit.

Config sources, first match wins:
  --job MANIFEST      a LoRAJob manifest (local debugging of a spec)
  --config FILE       a TrainerConfig file (JSON or YAML)
  $LORA_TRAINER_CONFIG       TrainerConfig JSON (what the operator sets)
  $LORA_TRAINER_CONFIG_FILE  path to a TrainerConfig file

Only the config model and the protocol are imported before the config is
valid; torch and the training stack load afterwards, so a bad config fails in
well under a second.

With `--nproc-per-node N` (N > 1) this process is the launcher: it runs torchrun with
N copies of itself, one per GPU (lora_trainer.launch), and reports their outcome. With
`--nnodes M` (M > 1; one pod per node, with `--node-rank`, `--rdzv-endpoint` and
`--rdzv-id`) it is the launcher even for N = 1, and its torchrun joins the other nodes'
in a c10d rendezvous. A copy started by torchrun (WORLD_SIZE set) is one rank of the
run: only global rank 0 serves progress and publishes, and each rank writes its report
for its node's launcher instead of the termination log.
"""

# The training stack (and yaml) load only once the config is valid: a bad config fails fast.
# ruff: noqa: PLC0415

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraops_contract.config import TrainerConfig, format_validation_error
from loraops_contract.protocol import (
    DEFAULT_PROGRESS_PORT,
    DEFAULT_WORK_DIR,
    ENV_ATTEMPT,
    ENV_CACHE_DIR,
    ENV_CONFIG,
    ENV_CONFIG_FILE,
    ENV_CPU_LIMIT,
    ENV_JOB_NAME,
    ENV_PROGRESS_HOST,
    ENV_PROGRESS_PORT,
    ENV_WORK_DIR,
    ExitCode,
    TerminationMessage,
)
from pydantic import ValidationError

from lora_trainer.distributed import Ranks
from lora_trainer.errors import ConfigError, TrainerError, classify, scrub
from lora_trainer.inputs import prepare_inputs
from lora_trainer.launch import DEFAULT_SHUTDOWN_TIMEOUT, Nodes, launch, report_path
from lora_trainer.progress import ProgressBoard, ProgressServer
from lora_trainer.reporting import failure_message, write_termination_message
from lora_trainer.signals import StopRequest
from lora_trainer.storage import Storage

__all__ = ["LoadedConfig", "cpu_threads", "load_config", "main"]

log = logging.getLogger("lora_trainer")

# LoRAJob spec fields that only matter to Kubernetes; `--job` ignores them.
KUBERNETES_ONLY_FIELDS = frozenset(
    {
        "resources",
        "scheduling",
        "storage",
        "image",
        "backoffLimit",
        "activeDeadlineSeconds",
        "suspend",
        "ttlSecondsAfterFinished",
    }
)


@dataclass(frozen=True)
class LoadedConfig:
    config: TrainerConfig
    source: str
    s3_endpoint: str | None = None  # from a manifest's spec.storage
    s3_region: str | None = None
    job_name: str | None = None


def _parse_text(text: str, source: str) -> Any:
    """JSON or YAML (YAML is a superset, but JSON errors read better for JSON)."""
    docs = _parse_documents(text, source)
    if len(docs) > 1:
        raise ConfigError(f"{source}: expected one YAML document, found {len(docs)}")
    return docs[0] if docs else None


def _parse_documents(text: str, source: str) -> list[Any]:
    if text.lstrip().startswith("{"):
        try:
            return [json.loads(text)]
        except json.JSONDecodeError as e:
            raise ConfigError(f"{source}: invalid JSON at line {e.lineno}: {e.msg}") from e
    import yaml

    try:
        return [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: invalid YAML: {e}") from e


def _read(path: str, what: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path}: {e.strerror}") from e


def _validate(data: Any, source: str, prefix: str = "") -> TrainerConfig:
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: expected a mapping of config fields, got {type(data).__name__}"
        )
    try:
        return TrainerConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(
            f"invalid config ({source}): {format_validation_error(e, prefix=prefix)}"
        ) from e


def load_job_manifest(path: str) -> LoadedConfig:
    """The LoRAJob in a manifest file (other documents, e.g. a Secret, are skipped)."""
    docs = _parse_documents(_read(path, "LoRAJob manifest"), path)
    jobs = [d for d in docs if isinstance(d, dict) and d.get("kind") == "LoRAJob"]
    if len(jobs) > 1:
        raise ConfigError(f"{path}: holds {len(jobs)} LoRAJobs; run one manifest at a time")
    doc = jobs[0] if jobs else None
    if doc is None or not isinstance(doc.get("spec"), dict):
        raise ConfigError(f"{path}: not a LoRAJob manifest (expected kind: LoRAJob with a spec)")
    spec = doc["spec"]
    storage = spec.get("storage") if isinstance(spec.get("storage"), dict) else {}
    trainer_fields = {k: v for k, v in spec.items() if k not in KUBERNETES_ONLY_FIELDS}
    meta = doc.get("metadata") or {}
    name = meta.get("name")
    return LoadedConfig(
        config=_validate(trainer_fields, path, prefix="spec."),
        source=path,
        s3_endpoint=storage.get("endpoint"),
        s3_region=storage.get("region"),
        job_name=f"{meta.get('namespace', 'default')}/{name}" if name else None,
    )


def load_config(args: argparse.Namespace, env: dict[str, str]) -> LoadedConfig:
    if args.job:
        return load_job_manifest(args.job)
    if args.config:
        return LoadedConfig(
            _validate(_parse_text(_read(args.config, "config file"), args.config), args.config),
            args.config,
        )
    if env.get(ENV_CONFIG):
        return LoadedConfig(
            _validate(_parse_text(env[ENV_CONFIG], ENV_CONFIG), ENV_CONFIG), ENV_CONFIG
        )
    if env.get(ENV_CONFIG_FILE):
        path = env[ENV_CONFIG_FILE]
        return LoadedConfig(_validate(_parse_text(_read(path, "config file"), path), path), path)
    raise ConfigError(
        f"no config: pass --config FILE or --job MANIFEST, or set {ENV_CONFIG} / {ENV_CONFIG_FILE}"
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lora_trainer",
        description="Fine-tune a LoRA/QLoRA adapter (the program every LoRAJob pod runs).",
        epilog=f"Without --config/--job the config comes from ${ENV_CONFIG} (JSON) or "
        f"${ENV_CONFIG_FILE}. Exit codes: " + ", ".join(f"{c.value}={c.name}" for c in ExitCode),
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--config", metavar="FILE", help="TrainerConfig as JSON or YAML")
    src.add_argument(
        "--job",
        metavar="MANIFEST",
        help="run a LoRAJob manifest's training locally (Kubernetes-only fields are ignored; "
        "spec.storage.endpoint/region apply when AWS_ENDPOINT_URL/AWS_DEFAULT_REGION are unset)",
    )
    p.add_argument("--validate-only", action="store_true", help="check the config and exit")
    p.add_argument(
        "--nproc-per-node",
        type=_positive,
        default=1,
        metavar="N",
        help="training processes on this node, one per GPU: N > 1 runs torchrun with N "
        "ranks (DDP or FSDP, spec.training.strategy)",
    )
    p.add_argument(
        "--nnodes",
        type=int,
        default=1,
        metavar="M",
        help="nodes (pods) the run spreads over, each running --nproc-per-node ranks; M > 1 "
        "needs --node-rank, --rdzv-endpoint and --rdzv-id",
    )
    p.add_argument(
        "--node-rank",
        type=int,
        default=0,
        metavar="R",
        help="this node's place, 0..M-1; node 0 hosts the rendezvous store",
    )
    p.add_argument(
        "--rdzv-endpoint",
        metavar="HOST:PORT",
        help="with M > 1: the rendezvous store, the node-rank-0 pod's Service "
        "(<service>.<namespace>.svc:29400)",
    )
    p.add_argument(
        "--rdzv-id",
        metavar="ID",
        help="with M > 1: the rendezvous to join, the same on every node",
    )
    p.add_argument(
        "--shutdown-timeout",
        type=_positive,
        default=DEFAULT_SHUTDOWN_TIMEOUT,
        metavar="SECONDS",
        help="with N > 1 or M > 1: how long stopping ranks get to save their checkpoint "
        "before SIGKILL (a pod passes its terminationGracePeriodSeconds)",
    )
    return p


def _positive(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value!r}")
    return int(value)


def _setup_logging(ranks: Ranks) -> None:
    # Every rank logs to the same pod log: ranks other than 0 (which repeat rank 0's
    # progress) log only warnings and errors, each line naming its rank.
    where = f"[rank {ranks.rank}] " if ranks.distributed else ""
    logging.basicConfig(
        level=logging.INFO if ranks.is_main else logging.WARNING,
        format=f"%(asctime)s %(levelname)s {where}%(name)s: %(message)s",
        stream=sys.stderr,
    )
    # Every log line passes through scrub(): no secret reaches the pod log.
    for handler in logging.getLogger().handlers:
        handler.addFilter(_ScrubFilter())


class _ScrubFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = scrub(record.getMessage())
        record.args = None
        return True


def _work_dir(env: dict[str, str], local: bool) -> tuple[Path, bool]:
    """The scratch directory, and whether it is a temporary one to remove at exit."""
    configured = env.get(ENV_WORK_DIR)
    if configured:
        path = Path(configured)
    elif not local and os.access(DEFAULT_WORK_DIR, os.W_OK):
        path = Path(DEFAULT_WORK_DIR)
    else:  # local runs keep nothing here: checkpoints and results go to output.uri
        return Path(tempfile.mkdtemp(prefix="lora-trainer-")), True
    path.mkdir(parents=True, exist_ok=True)
    return path, False


def _attempt(env: dict[str, str]) -> int | None:
    """The operator's attempt number (it fences the checkpoints); None when unset."""
    value = env.get(ENV_ATTEMPT, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(f"{ENV_ATTEMPT}={value!r} is not an attempt number (1, 2, ...)")
    return int(value)


def cpu_threads(env: dict[str, str]) -> int | None:
    """Whole cores of the pod's CPU limit (at least 1; a 1500m limit runs 1 thread: a
    second would be throttled half the time); None when the variable is unset or odd."""
    value = env.get(ENV_CPU_LIMIT, "").strip()
    if not value.isdigit() or int(value) == 0:
        return None
    return max(1, int(value) // 1000)


def _cache_dir(env: dict[str, str], work_dir: Path, local: bool) -> Path:
    if env.get(ENV_CACHE_DIR):
        return Path(env[ENV_CACHE_DIR])
    return Path.home() / ".cache" / "lora_trainer" if local else work_dir / "cache"


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    env = dict(os.environ)
    ranks = Ranks.from_env(env)
    _setup_logging(ranks)
    # A rank reports to the launcher; the launcher (or a single process) to the pod.
    report = report_path(env, ranks.rank) if ranks.distributed else None
    board = ProgressBoard()
    stop = StopRequest().install()
    server: ProgressServer | None = None
    temp_work: Path | None = None
    try:
        loaded = load_config(args, env)
        if args.validate_only:
            write_termination_message(
                TerminationMessage(outcome="Succeeded", message="config is valid")
            )
            print(json.dumps(loaded.config.to_wire(), indent=2))
            return ExitCode.OK
        nodes = Nodes.parse(args.nnodes, args.node_rank, args.rdzv_endpoint, args.rdzv_id)
        if (args.nproc_per_node > 1 or nodes.count > 1) and not ranks.distributed:
            source = ["--job", args.job] if args.job else ["--config", args.config]
            worker_args = source if (args.job or args.config) else []
            return _launch(args.nproc_per_node, args.shutdown_timeout, env, worker_args, nodes)
        local = args.job is not None or args.config is not None
        attempt = _attempt(env)
        log.info("config from %s (attempt %s)", loaded.source, attempt or "not numbered")
        if ranks.is_main:  # one endpoint per pod
            server = _start_progress_server(board, env, local)
        work_dir, is_temp = _work_dir(env, local)
        temp_work = work_dir if is_temp else None
        storage = Storage(
            _cache_dir(env, work_dir, local),
            env,
            default_endpoint=loaded.s3_endpoint,
            default_region=loaded.s3_region,
        )
        inputs = prepare_inputs(loaded.config, storage, board)

        from lora_trainer.train import Runtime, run  # torch & co. load only now

        rt = Runtime(
            work_dir=work_dir,
            storage=storage,
            board=board,
            stop=stop,
            job_name=env.get(ENV_JOB_NAME) or loaded.job_name,
            attempt=attempt,
            cpu_threads=cpu_threads(env),
            ranks=ranks,
        )
        write_termination_message(run(loaded.config, inputs, rt), report)
        return ExitCode.OK
    except BaseException as exc:  # every exit path writes a termination message
        if isinstance(exc, SystemExit):
            raise
        err = classify(exc)
        if not isinstance(exc, TrainerError):
            log.error("unexpected error:\n%s", scrub("".join(traceback.format_exception(exc))))
        snap = board.update(stage="failed")
        write_termination_message(
            failure_message(
                err,
                steps=snap.step or None,
                last_checkpoint=snap.last_checkpoint,
                skipped_records=snap.skipped_records,
            ),
            report,
        )
        return err.exit_code
    finally:
        if ranks.distributed and "torch" in sys.modules:
            from lora_trainer.distributed import shutdown

            shutdown()
        if server is not None:
            server.stop()
        if temp_work is not None:
            shutil.rmtree(temp_work, ignore_errors=True)


def _launch(
    nproc: int, shutdown_timeout: int, env: dict[str, str], worker_args: list[str], nodes: Nodes
) -> int:
    """Run `nproc` ranks under torchrun (with the other `nodes`) and report this node's
    outcome. The node's ranks share one scratch directory (the Trainer writes a
    checkpoint's parts from every rank into the same folder), a temporary one outside a
    pod."""
    temp: str | None = None
    if not env.get(ENV_WORK_DIR):
        temp = tempfile.mkdtemp(prefix="lora-trainer-")
        os.environ[ENV_WORK_DIR] = temp
    # Where other nodes reach this one: the pod's IP, which the pod passes as the
    # progress bind address (0.0.0.0, outside a pod, says nothing).
    host = env.get(ENV_PROGRESS_HOST, "")
    local_addr = host if host and host != "0.0.0.0" else None
    try:
        outcome = launch(nproc, shutdown_timeout, worker_args, nodes, local_addr)
    finally:
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)
    write_termination_message(outcome.message)
    return outcome.exit_code


def _start_progress_server(
    board: ProgressBoard, env: dict[str, str], local: bool
) -> ProgressServer | None:
    # In a pod the operator passes the pod IP; locally nothing outside needs to reach it.
    host = env.get(ENV_PROGRESS_HOST) or ("127.0.0.1" if local else "0.0.0.0")
    port = int(env.get(ENV_PROGRESS_PORT) or (0 if local else DEFAULT_PROGRESS_PORT))
    try:
        server = ProgressServer(board, host, port).start()
    except OSError as e:
        log.warning("progress endpoint not started on %s:%d: %s", host, port, e)
        return None
    log.info("progress at %s/progress", server.url)
    return server
