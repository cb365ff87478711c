"""The validating webhook, served by the operator's kopf WebhookServer and called
by the API server emulator on `kubectl apply`."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from devcluster.controlplane import ControlPlane, free_port
from tests.operator.integration.conftest import BASE_SPEC, GROUP, HERE, REPO, Cluster

# Each module starts a whole control plane (API server, kubelet, operator).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1: its own CA, as kopf expects of a cert file."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lorajob-webhook")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "tls.crt", directory / "tls.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


@pytest.fixture(scope="module")
def hooked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    fake_dir = tmp_path_factory.mktemp("fake-trainer")
    cert, key = self_signed(tmp_path_factory.mktemp("tls"))
    env = {
        "LORAJOB_TRAINER_COMMAND": json.dumps(["python", str(HERE / "fake_trainer.py")]),
        "LORAJOB_PROGRESS_PORT": str(free_port()),
        "LORAJOB_METRICS_PORT": str(free_port()),
        "LORAJOB_PROGRESS_INTERVAL_SECONDS": "0.3",
        "LORAJOB_STATUS_MIN_INTERVAL_SECONDS": "0.3",
        "LORAJOB_WEBHOOK_ENABLED": "true",
        "LORAJOB_WEBHOOK_PORT": str(free_port()),
        "LORAJOB_WEBHOOK_HOST": "127.0.0.1",
        "LORAJOB_WEBHOOK_CERT_FILE": str(cert),
        "LORAJOB_WEBHOOK_KEY_FILE": str(key),
        "LORAJOB_POLICY": json.dumps({"maxGpusPerJob": 2}),
    }
    kubelet_env = {
        "FAKE_TRAINER_DIR": str(fake_dir),
        "PYTHONPATH": os.pathsep.join(str(REPO / p) for p in ("trainer_image", "operator")),
    }
    with ControlPlane(
        tmp_path_factory.mktemp("cluster"), operator=True, operator_env=env, kubelet_env=kubelet_env
    ) as cp:
        cluster = Cluster(cp, fake_dir, 0)
        # kopf registers the ValidatingWebhookConfiguration once its server listens.
        cp.wait_for(
            lambda: cp.get(
                "validatingwebhookconfigurations", f"lorajob-validation.{GROUP}", namespace=""
            ),
            timeout=30,
            message="webhook configuration registered",
        )
        # kopf's managed mode keeps a (here empty) MutatingWebhookConfiguration as well;
        # under the chart's RBAC it must manage both without an error in the log.
        cp.wait_for(
            lambda: cp.get(
                "mutatingwebhookconfigurations", f"lorajob-validation.{GROUP}", namespace=""
            ),
            timeout=30,
            message="kopf's mutating configuration (no webhooks) created",
        )
        errors = [line for line in cp.operator_log.read_text().splitlines() if "ERROR" in line]
        assert not errors, "\n".join(errors)
        yield cluster


def _apply_fails(cluster: Cluster, obj: dict[str, object]) -> str:
    result = cluster.cp.kubectl("apply", "-f", "-", input=json.dumps(obj), check=False)
    assert result.returncode != 0, result.stdout
    return result.stderr


def _job(name: str, **spec: object) -> dict[str, object]:
    return {
        "apiVersion": f"{GROUP}/v1alpha1",
        "kind": "LoRAJob",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {**BASE_SPEC, "output": {"uri": f"s3://adapters/{name}"}, **spec},
    }


def test_invalid_spec_is_refused_at_apply_time(hooked: Cluster) -> None:
    error = _apply_fails(hooked, _job("refused", storage={"endpoint": "https://s3.example.com"}))
    assert "spec.storage.credentialsSecret" in error
    assert hooked.job("refused") is None


def test_policy_violation_is_refused(hooked: Cluster) -> None:
    error = _apply_fails(hooked, _job("greedy", resources={"gpus": 4}))
    assert "policy" in error
    assert hooked.job("greedy") is None


def test_a_refused_spec_is_logged_at_info_not_as_an_operator_error(hooked: Cluster) -> None:
    # A policy violation: only the webhook refuses it (the CRD schema cannot).
    error = _apply_fails(hooked, _job("too-many-gpus", resources={"gpus": 3}))
    assert "maxGpusPerJob" in error
    log = hooked.cp.operator_log

    def refusal_lines() -> list[str]:
        lines = log.read_text(errors="replace").splitlines()
        return [line for line in lines if "too-many-gpus" in line or "gpus: 3" in line]

    (line,) = hooked.cp.wait_for(refusal_lines, timeout=15, message="the refusal logged")
    assert "[INFO" in line, line
    assert "[default/too-many-gpus] admission refused: " in line
    assert "maxGpusPerJob" in line
    # No refusal (of this or the other tests) reads as an operator error.
    errors = [x for x in log.read_text(errors="replace").splitlines() if "[ERROR" in x]
    assert not [x for x in errors if "Webhook 'lorajob'" in x or "refused" in x], errors


def test_a_spec_change_is_admitted_with_a_warning_and_applied(hooked: Cluster) -> None:
    hooked.create_job("guided", script={"hold_at_step": 2})
    hooked.wait_phase("guided", "Running")
    result = hooked.cp.kubectl(
        "patch",
        f"lorajobs.{GROUP}",
        "guided",
        "--type=merge",
        "-p",
        json.dumps({"spec": {"training": {"maxSteps": 10, "checkpointEverySteps": 5}}}),
    )
    assert "Warning: the current attempt is stopped" in result.stderr, result.stderr
    assert "spec.training.maxSteps" in result.stderr
    hooked.release("guided")
    status = hooked.wait_status(
        "guided",
        lambda s: s.get("phase") == "Succeeded" and s.get("completedGeneration") == 2,
        "generation 2 completed",
    )
    assert status["progress"]["step"] == 10
    assert status.get("failedAttempts", 0) == 0


def test_suspend_change_the_learning_rate_resume_runs_a_new_run(hooked: Cluster) -> None:
    """The README's way to change a job: suspend it, change it, resume it. A run-defining
    change trains a new run from step 0 (it used to fail InvalidSpec, mixing two runs)."""
    hooked.create_job("tuned", script={"hold_at_step": 6})
    hooked.wait_status("tuned", lambda s: (s.get("progress") or {}).get("step", 0) >= 6, "step 6")
    hooked.patch_job("tuned", {"spec": {"suspend": True}})
    hooked.wait_phase("tuned", "Suspended")
    result = hooked.cp.kubectl(
        "patch",
        f"lorajobs.{GROUP}",
        "tuned",
        "--type=merge",
        "-p",
        json.dumps({"spec": {"training": {"learningRate": 1e-3}}}),
    )
    assert "spec.training.learningRate define the training run" in result.stderr
    hooked.release("tuned")
    hooked.patch_job("tuned", {"spec": {"suspend": False}})
    status = hooked.wait_phase("tuned", "Succeeded")
    (_, old_run, _), (_, new_run, resumed_from) = hooked.runs_log("tuned")
    assert new_run == status["runId"] != old_run
    assert resumed_from == 0
    assert status["progress"]["step"] == 20
    assert status["completedGeneration"] == status["runGeneration"] == 4  # the resume
