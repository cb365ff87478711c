"""Arguments and the entry point of `kubectl lj` (console script kubectl-lj)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from typing import Any, TextIO

from lorajob_operator.kubectl_lj.cluster import Cluster
from lorajob_operator.kubectl_lj.commands import cmd_adapter, cmd_logs, cmd_progress, cmd_why
from lorajob_operator.kubectl_lj.errors import PluginError

__all__ = ["main"]


def _connection_options(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument(
        "--kubeconfig", default=default, help="kubeconfig file (default: $KUBECONFIG)"
    )
    parser.add_argument("--context", default=default, help="kubeconfig context")
    parser.add_argument(
        "-n", "--namespace", default=default, help="namespace (default: the context's)"
    )


def _rank_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--rank",
        type=int,
        default=0,
        help="a job on several nodes: the pod of this node rank (default 0, the one that "
        "reports progress and publishes the adapter)",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kubectl lj", description="LoRAJob (finetune.loraops.dev) kubectl plugin."
    )
    _connection_options(parser, None)
    # The same options after the command (`kubectl lj why NAME -n team`), as kubectl takes them.
    common = argparse.ArgumentParser(add_help=False)
    _connection_options(common, argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    progress = sub.add_parser("progress", parents=[common], help="a progress bar per job")
    progress.add_argument("names", nargs="*", help="jobs (default: every job in the namespace)")
    progress.add_argument("-A", "--all-namespaces", action="store_true")
    progress.add_argument(
        "-w", "--watch", action="store_true", help="update live until every job shown finishes"
    )
    progress.set_defaults(run=cmd_progress)

    logs = sub.add_parser(
        "logs", parents=[common], help="the trainer log of the job's current attempt"
    )
    logs.add_argument("name")
    logs.add_argument("-f", "--follow", action="store_true", help="follow, across attempts")
    logs.add_argument("--tail", type=int, default=-1, help="lines of the past log (-1: all)")
    logs.add_argument("--attempt", type=int, default=0, help="another attempt's pod")
    _rank_option(logs)
    logs.set_defaults(run=cmd_logs)

    adapter = sub.add_parser(
        "adapter", parents=[common], help="download the adapter, verified against its manifest"
    )
    adapter.add_argument("name")
    adapter.add_argument("-o", "--output", help="directory to create (default: <name>-adapter)")
    adapter.add_argument(
        "--credentials-from-secret",
        action="store_true",
        help="read S3 credentials from the job's spec.storage.credentialsSecret (needs get "
        "on Secrets); default: your own AWS credentials (environment, profile)",
    )
    adapter.set_defaults(run=cmd_adapter)

    why = sub.add_parser(
        "why", parents=[common], help="why the job failed (or waits): reason, hint, log tail"
    )
    why.add_argument("name")
    why.add_argument("--tail", type=int, default=20, help="log lines to show")
    _rank_option(why)
    why.set_defaults(run=cmd_why)
    return parser


def main(argv: Iterable[str] | None = None, out: TextIO | None = None) -> int:
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    stream = out or sys.stdout
    try:
        cluster = Cluster(args.kubeconfig, args.context)
        args.namespace = args.namespace or cluster.default_namespace
        code: int = args.run(cluster, args, stream)
    except PluginError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code
