"""The CLI's config handling: every source, and config errors exit fast with code 10."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from lora_trainer.cli import load_job_manifest
from lora_trainer.errors import ConfigError
from loraops_contract.protocol import ExitCode

GOOD = {
    "model": {"uri": "s3://models/tiny"},
    "dataset": {"uri": "s3://data/train.jsonl"},
    "output": {"uri": "s3://out/adapter"},
}


def _run(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any] | None]:
    term = tmp_path / "termination-log"
    term.unlink(missing_ok=True)
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("LORA_TRAINER_", "AWS_"))}
    full_env |= {"LORA_TRAINER_TERMINATION_LOG": str(term), **(env or {})}
    # Report whether the training stack was imported: a config error must not pay for it.
    code = (
        "import sys; from lora_trainer.cli import main; rc = main(sys.argv[1:]); "
        "print('TORCH_IMPORTED' if 'torch' in sys.modules else 'TORCH_NOT_IMPORTED'); sys.exit(rc)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return proc, json.loads(term.read_text()) if term.exists() else None


def test_missing_config(tmp_path: Path) -> None:
    proc, term = _run(tmp_path)
    assert proc.returncode == ExitCode.INVALID_CONFIG
    assert term is not None
    assert term["reason"] == "InvalidSpec"
    assert "LORA_TRAINER_CONFIG" in term["message"]
    assert term["retryable"] is False


def test_invalid_env_config_names_the_field_and_skips_torch(tmp_path: Path) -> None:
    bad = {**GOOD, "training": {"learningRate": -1, "batchSize": 0}}
    proc, term = _run(tmp_path, env={"LORA_TRAINER_CONFIG": json.dumps(bad)})
    assert proc.returncode == ExitCode.INVALID_CONFIG
    assert term is not None
    assert "training.learningRate" in term["message"]
    assert "training.batchSize" in term["message"]
    assert term["hint"]
    assert "TORCH_NOT_IMPORTED" in proc.stdout


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({**GOOD, "training": {"learningrate": 1e-4}}, "training.learningrate: unknown field"),
        ({k: v for k, v in GOOD.items() if k != "model"}, "model: required field is missing"),
        ({**GOOD, "output": {"uri": "hf://org/name"}}, "output.uri"),
        ({**GOOD, "model": {"uri": "relative/path"}}, "relative path"),
        ({**GOOD, "lora": {"targetModules": "all"}}, "lora.targetModules"),
        ({**GOOD, "quantization": {"mode": "int4"}}, "quantization.mode"),
    ],
)
def test_config_errors_from_file(tmp_path: Path, config: dict[str, Any], expected: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    proc, term = _run(tmp_path, "--config", str(path))
    assert proc.returncode == ExitCode.INVALID_CONFIG, proc.stderr
    assert term is not None
    assert expected in term["message"]


def test_config_file_env_and_validate_only(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(GOOD))
    proc, term = _run(tmp_path, "--validate-only", env={"LORA_TRAINER_CONFIG_FILE": str(path)})
    assert proc.returncode == ExitCode.OK, proc.stderr
    assert json.loads(proc.stdout.split("TORCH_")[0])["training"]["learningRate"] == 2e-4
    assert term is not None
    assert term["outcome"] == "Succeeded"


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    proc, term = _run(tmp_path, "--config", str(tmp_path / "missing.yaml"))
    assert proc.returncode == ExitCode.INVALID_CONFIG
    assert term is not None
    assert "cannot read config file" in term["message"]
    bad = tmp_path / "bad.json"
    bad.write_text('{"model": ')
    proc, term = _run(tmp_path, "--config", str(bad))
    assert proc.returncode == ExitCode.INVALID_CONFIG
    assert term is not None
    assert "invalid JSON at line 1" in term["message"]


def _manifest(spec_overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    spec = {
        **GOOD,
        "resources": {"gpus": 1, "memory": "24Gi"},
        "scheduling": {"queueName": "team-a"},
        "storage": {"endpoint": "http://minio.local:9000", "region": "eu-west-1"},
        "image": "example/trainer:1",
        "backoffLimit": 2,
        "activeDeadlineSeconds": 3600,
        "suspend": False,
        "ttlSecondsAfterFinished": 60,
        **(spec_overrides or {}),
    }
    return {
        "apiVersion": "finetune.loraops.dev/v1alpha1",
        "kind": "LoRAJob",
        "metadata": {"name": "demo", "namespace": "team-a"},
        "spec": spec,
    }


def test_job_manifest_ignores_kubernetes_fields(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(_manifest()))
    loaded = load_job_manifest(str(path))
    assert loaded.config.model.uri == "s3://models/tiny"
    assert loaded.s3_endpoint == "http://minio.local:9000"
    assert loaded.s3_region == "eu-west-1"
    assert loaded.job_name == "team-a/demo"


def test_job_manifest_errors_use_spec_paths(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(_manifest({"training": {"batchSize": -2}})))
    with pytest.raises(ConfigError, match=r"spec\.training\.batchSize"):
        load_job_manifest(str(path))
    path.write_text(yaml.safe_dump({"kind": "Pod", "spec": {}}))
    proc, term = _run(tmp_path, "--job", str(path))
    assert proc.returncode == ExitCode.INVALID_CONFIG
    assert term is not None
    assert "not a LoRAJob manifest" in term["message"]


@pytest.mark.parametrize("name", ["lorajob-tiny.yaml", "lorajob-full.yaml"])
def test_example_manifests_are_valid(name: str) -> None:
    example = Path(__file__).resolve().parents[2] / "examples" / name
    assert example.exists(), f"examples/{name} is missing"
    loaded = load_job_manifest(str(example))
    assert loaded.config.model.uri


def test_job_manifest_among_other_documents(tmp_path: Path) -> None:
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3"}}
    path = tmp_path / "all.yaml"
    path.write_text(yaml.safe_dump_all([secret, _manifest()]))
    assert load_job_manifest(str(path)).job_name == "team-a/demo"
    path.write_text(yaml.safe_dump_all([_manifest(), _manifest()]))
    with pytest.raises(ConfigError, match="holds 2 LoRAJobs"):
        load_job_manifest(str(path))


def test_help_lists_exit_codes() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "lora_trainer", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "--config FILE" in proc.stdout
    assert "--job MANIFEST" in proc.stdout
    assert "10=INVALID_CONFIG" in proc.stdout
    assert "21=INTERRUPTED" in proc.stdout
