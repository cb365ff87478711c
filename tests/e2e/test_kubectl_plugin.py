"""`kubectl lj` through the real kubectl (plugin discovery on PATH) against a cluster
that trains a real tiny job to an adapter in S3, and fails another one.

The plugin is the `kubectl-lj` console script the package installs into the venv.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from devcluster.tools import kubectl
from tests.e2e.conftest import BUCKET, JOB_TIMEOUT_S, Cluster

# Long enough that the trainer pod's name is shortened: `logs` and `why` find it by label.
LONG_NAME = "a-job-whose-name-is-long-enough-that-its-pod-name-gets-shortened"


def _env(cluster: Cluster) -> dict[str, str]:
    plugin = Path(sys.executable).parent / "kubectl-lj"
    if not plugin.is_file():
        pytest.fail(
            f"{plugin} is missing: the package's console scripts are not installed (make venv)"
        )
    return {
        **os.environ,
        **cluster.cp.env(),
        "PATH": f"{plugin.parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def _lj(cluster: Cluster, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(kubectl()), "lj", *args],
        env=_env(cluster),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_kubectl_lj_follows_a_real_job_to_its_verified_adapter(
    cluster: Cluster, tmp_path: Path
) -> None:
    cluster.create_secret()
    name = "plugin-demo"
    cluster.apply(cluster.manifest(name))
    bad = cluster.manifest(LONG_NAME)
    bad["spec"]["dataset"]["uri"] = f"s3://{BUCKET}/datasets/missing.jsonl"
    cluster.apply(bad)
    env = _env(cluster)
    progress = subprocess.Popen(
        [str(kubectl()), "lj", "progress", name, "-w"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    logs = subprocess.Popen(
        [str(kubectl()), "lj", "logs", name, "-f"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    progress_out, progress_err = progress.communicate(timeout=JOB_TIMEOUT_S)
    logs_out, logs_err = logs.communicate(timeout=120)
    print(progress_out, logs_out[-3000:], sep="\n")  # shown with -s; the README quotes it
    assert progress.returncode == 0, progress_err
    lines = [line for line in progress_out.splitlines() if line.startswith(f"default/{name} ")]
    assert lines[-1].startswith(f"default/{name}  Succeeded [{'#' * 24}] 100%")
    percents = [int(m[1]) for line in lines if (m := re.search(r"\] +(\d+)%", line))]
    assert percents == sorted(percents), "progress never goes back"
    assert any(0 < p < 100 for p in percents), "live progress was shown while training"
    assert logs.returncode == 0, logs_err
    assert logs_out.startswith(f"==> attempt 1: pod {name}-1 <==")
    assert "adapter published to" in logs_out
    assert logs_out.rstrip().endswith(f"==> lorajob default/{name}: Succeeded <==")

    # adapter: every file verified against the manifest, identical to what S3 holds
    out = _lj(cluster, "adapter", name, "--credentials-from-secret", "-o", str(tmp_path / "a"))
    print(out.stdout)
    assert out.returncode == 0, out.stderr
    s3 = cluster.s3_objects(f"adapters/{name}/")
    manifest = json.loads(s3[f"adapters/{name}/manifest.json"])
    for entry in manifest["files"]:
        assert (tmp_path / "a" / entry["path"]).read_bytes() == s3[
            f"adapters/{name}/{entry['path']}"
        ]
        assert f"ok    {entry['path']}  {entry['size']} bytes" in out.stdout
    assert "adapter_model.safetensors" in out.stdout
    assert out.stdout.rstrip().endswith(f"adapter in {tmp_path / 'a'}/")

    # a file changed after the job wrote it is caught, and nothing is written
    cluster.s3.client().put_object(
        Bucket=BUCKET, Key=f"adapters/{name}/adapter_config.json", Body=b'{"r": 1024}'
    )
    out = _lj(cluster, "adapter", name, "--credentials-from-secret", "-o", str(tmp_path / "b"))
    assert out.returncode == 1
    assert "does not match its manifest" in out.stderr
    assert "adapter_config.json: " in out.stderr
    assert not (tmp_path / "b").exists()

    # why: the failed job's reason, hint and log tail, found by label whatever its name
    cluster.wait_phase(LONG_NAME, "Failed")
    out = _lj(cluster, "why", LONG_NAME)
    print(out.stdout)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"lorajob default/{LONG_NAME} failed: SourceNotFound\n")
    status = cluster.status(LONG_NAME)
    assert f"  message: {status['failureMessage']}\n" in out.stdout
    assert f"  hint:    {status['hint']}\n" in out.stdout
    assert re.search(r"last \d+ log lines of pod a-job-whose-name-is-long-enough", out.stdout)
    assert "missing.jsonl" in out.stdout.split("log lines of pod", 1)[1]
    out = _lj(cluster, "logs", LONG_NAME, "--tail", "5")
    assert out.returncode == 0, out.stderr
    assert "missing.jsonl" in out.stdout
    # and a job that does not exist is a clear error
    out = _lj(cluster, "why", "no-such-job")
    assert out.returncode == 1
    assert out.stderr.strip() == "error: lorajob default/no-such-job not found"
