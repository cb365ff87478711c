"""`kubectl lj`: rendering and manifest checks on statuses recorded from a control plane
(deploy/argocd/testdata), and its packaging as the `kubectl-lj` console script.

tests/e2e/test_kubectl_plugin.py runs the plugin through the real kubectl against a
cluster training a real job.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import io
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.client.exceptions import ApiException
from lorajob_operator.kubectl_lj.commands import cmd_progress
from lorajob_operator.kubectl_lj.errors import PluginError
from lorajob_operator.kubectl_lj.manifest import manifest_files, verify_file
from lorajob_operator.kubectl_lj.view import progress_line, why_report
from loraops_contract.manifest import ManifestFile

from tests.operator.health_checks import REPO, TESTDATA


def _recorded(name: str) -> dict[str, Any]:
    return dict(yaml.safe_load((TESTDATA / f"{name}.yaml").read_text()))


def test_progress_line_of_each_phase() -> None:
    running = progress_line(_recorded("running"))
    assert running.startswith("default/health-running  Running   [##########--------------]  40%")
    assert "step      8/20" in running
    assert "tok/s   1000" in running
    done = progress_line(_recorded("succeeded"))
    assert "[########################] 100%" in done
    assert "eta 0:00:00" in done
    assert progress_line(_recorded("queued")).endswith("(SecretNotFound)")
    assert progress_line(_recorded("failed")).endswith("(InvalidDataset)")
    assert progress_line(_recorded("suspended")).endswith("(SuspendedByUser)")


def test_why_names_reason_hint_and_log_tail() -> None:
    report = why_report(_recorded("failed"), ["line one", "ValueError: bad row"], "health-failed-1")
    assert report.splitlines()[:3] == [
        "lorajob default/health-failed failed: InvalidDataset",
        "  message: attempt 1 (pod health-failed-1) failed (exit code 11): scripted failure "
        "with exit code 11 at step 0",
        "  hint:    this is the fake trainer",
    ]
    assert report.endswith(
        "last 2 log lines of pod health-failed-1:\n  line one\n  ValueError: bad row"
    )
    queued = why_report(_recorded("queued"), None, None)
    assert queued.startswith(
        "lorajob default/health-queued queued: SecretNotFound\n  message: Secret"
    )
    assert queued.endswith("no trainer pod to read logs from")


def test_a_job_on_several_nodes_shows_its_ranks() -> None:
    job = _recorded("running")
    job["status"]["ranksReady"] = "1/2"
    job["status"]["ranks"] = [
        {"rank": 0, "pod": "health-running-1-n0", "node": "gpu-a", "state": "Running"},
        {"rank": 1, "pod": "health-running-1-n1", "state": "Pending"},
    ]
    assert progress_line(job).endswith("eta 0:00:01  ranks 1/2")
    report = why_report(job, None, "health-running-1-n0").splitlines()
    assert report[-4:] == [
        "  ranks:    1/2 running",
        "    rank 0  Running     pod health-running-1-n0  node gpu-a",
        "    rank 1  Pending     pod health-running-1-n1  node -",
        "the log of pod health-running-1-n0 cannot be read (the pod is gone or not started)",
    ]
    job["status"]["phase"] = "Succeeded"
    assert "ranks" not in progress_line(job)


def _manifest(*files: dict[str, Any]) -> dict[str, Any]:
    return {
        "version": 1,
        "createdAt": "2026-12-03T12:00:00Z",
        "baseModel": "s3://models/llama",
        "steps": 3,
        "files": list(files),
    }


def test_manifest_paths_cannot_leave_the_output_directory() -> None:
    for bad in ("../x", "/etc/passwd", "a/../../b", "./a", "a\\b", ""):
        with pytest.raises(PluginError, match=r"files\.0\.path: unsafe path"):
            manifest_files(_manifest({"path": bad, "size": 1, "sha256": "0"}))
    with pytest.raises(PluginError, match="files: the manifest lists no files"):
        manifest_files(_manifest())
    with pytest.raises(PluginError, match="steps: Field required"):
        manifest_files({k: v for k, v in _manifest().items() if k != "steps"})
    good = manifest_files(_manifest({"path": "sub/a.bin", "size": 1, "sha256": "ab"}))
    assert [(f.path, f.size, f.sha256) for f in good] == [("sub/a.bin", 1, "ab")]


def test_verify_file_reports_size_and_hash_mismatch(tmp_path: Path) -> None:
    data = b"adapter bytes"
    f = tmp_path / "a.bin"
    f.write_bytes(data)
    good = ManifestFile(path="a.bin", size=len(data), sha256=hashlib.sha256(data).hexdigest())
    assert verify_file(f, good) is None
    short = good.model_copy(update={"size": 3})
    assert "bytes, the manifest says" in (verify_file(f, short) or "")
    wrong = good.model_copy(update={"sha256": "0" * 64})
    assert "sha256" in (verify_file(f, wrong) or "")


def test_installed_as_the_kubectl_lj_console_script() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    target = project["scripts"]["kubectl-lj"]
    module, _, func = target.partition(":")
    assert callable(getattr(importlib.import_module(module), func))


class _Jobs:
    """The plugin's Cluster for `progress` alone: a listing, then watch streams that
    each end (the first as the API server ends one whose history is compacted)."""

    def __init__(self, listings: list[list[dict[str, Any]]], streams: list[Any]) -> None:
        self.listings = listings
        self.streams = streams

    def jobs(self, namespace: str | None) -> tuple[list[dict[str, Any]], str]:
        del namespace
        return self.listings.pop(0), "1"

    def watch_jobs(self, namespace: str | None, version: str) -> Any:
        del namespace, version
        stream = self.streams.pop(0)
        if isinstance(stream, Exception):
            raise stream
        yield from stream


def test_progress_watch_lists_again_when_its_history_is_gone() -> None:
    running, done = _recorded("running"), _recorded("succeeded")
    done["metadata"]["name"] = "health-running"
    fake = _Jobs([[running], [done]], [ApiException(status=410, reason="Gone")])
    args = argparse.Namespace(all_namespaces=False, namespace="default", names=[], watch=True)
    out = io.StringIO()
    assert cmd_progress(fake, args, out) == 0  # type: ignore[arg-type]
    lines = out.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == ["Running", "Succeeded"]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_on_a_terminal_redraws_the_table_in_place() -> None:
    running, done = _recorded("running"), _recorded("succeeded")
    queued = _recorded("queued")
    done["metadata"]["name"] = "health-running"
    fake = _Jobs([[running, queued]], [[{"type": "MODIFIED", "object": done}], []])
    args = argparse.Namespace(
        all_namespaces=False, namespace="default", names=["health-running"], watch=True
    )
    out = _Terminal()
    assert cmd_progress(fake, args, out) == 0  # type: ignore[arg-type]
    first, redrawn = out.getvalue().split("\x1b[1F\x1b[J")  # up one line, clear below
    assert first == progress_line(running) + "\n"
    assert redrawn == progress_line(done) + "\n"
