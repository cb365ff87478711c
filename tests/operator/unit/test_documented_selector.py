"""The README's `kubectl logs` command finds the trainer pod for every legal job name.

Label values stop at 63 characters while LoRAJob names may have 253, so a long name's
`finetune.loraops.dev/job` label is shortened with a hash and `-l ...job=<name>` finds
nothing; the documented command selects by the job's uid instead. This test runs the
README's command the way the shell would (the `$(kubectl get lj ...)` substitution
yields the job's uid) against the labels of the pod the operator builds.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from lorajob_operator.api import parse_spec
from lorajob_operator.objects import JobRef, build_trainer_pod
from lorajob_operator.settings import OperatorSettings

README = Path(__file__).resolve().parents[3] / "README.md"
EXAMPLE_NAME = "support-bot"  # the job the README's commands are written for
UID = "0b7c4a6e-1f0d-4b7e-9a4e-2a1c3b5d6e7f"
# `kubectl get lj <name> -o jsonpath='{.metadata.uid}'` inside $(...): prints the uid.
_UID_LOOKUP = re.compile(
    r"\$\(kubectl get (?:lj|lorajobs?) (\S+) -o jsonpath='\{\.metadata\.uid\}'\)"
)
LONGEST = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])  # 253: a DNS subdomain's limit


def documented_log_commands() -> list[str]:
    return [
        line.split("#", 1)[0].strip()
        for line in README.read_text().splitlines()
        if line.startswith("kubectl logs")
    ]


def selector_for(command: str, name: str, uid: str) -> str:
    """The -l value of `command` for job `name`, after the shell's substitutions."""
    command = command.replace(EXAMPLE_NAME, name)
    command = _UID_LOOKUP.sub(lambda m: uid if m[1] == name else "<other job>", command)
    args = shlex.split(command)
    return next(args[i + 1] for i, arg in enumerate(args) if arg in ("-l", "--selector"))


def selects(selector: str, labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in (t.split("=", 1) for t in selector.split(",")))


def test_the_readme_documents_one_log_command() -> None:
    assert len(documented_log_commands()) == 1


@pytest.mark.parametrize("name", [EXAMPLE_NAME, "x" * 63, "x" * 64, LONGEST, "team-a.bot"])
def test_the_documented_log_command_selects_the_trainer_pod(name: str) -> None:
    assert len(name) <= 253
    spec = parse_spec(
        {
            "model": {"uri": "s3://models/llama"},
            "dataset": {"uri": "s3://data/train.jsonl"},
            "output": {"uri": "s3://adapters/x"},
        }
    )
    pod = build_trainer_pod(JobRef(name, "team-a", UID), spec, OperatorSettings(), 1)
    other = build_trainer_pod(
        JobRef(name + "x", "team-a", "another-uid"), spec, OperatorSettings(), 1
    )
    (command,) = documented_log_commands()
    selector = selector_for(command, name, UID)
    assert selects(selector, pod["metadata"]["labels"]), (selector, pod["metadata"]["labels"])
    assert not selects(selector, other["metadata"]["labels"])
