"""Bad input gets a clear, specific answer; nothing crash-loops and nothing leaks."""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from devcluster.controlplane import free_port
from tests.e2e.conftest import SECRET, Cluster

WRONG_SECRET_KEY = "wrong-secret-key-ABCDEFGHIJ0123456789"


def _self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 that is its own CA, as cert-manager's selfSigned makes."""
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
        .not_valid_after(now + dt.timedelta(hours=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
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


def test_invalid_specs_are_refused_at_apply_time_by_the_webhook(
    cluster_factory: Callable[..., Cluster], tmp_path: Path
) -> None:
    cert, key = _self_signed(tmp_path / "tls")
    cluster = cluster_factory(
        {
            "LORAJOB_WEBHOOK_ENABLED": "true",
            "LORAJOB_WEBHOOK_HOST": "127.0.0.1",
            "LORAJOB_WEBHOOK_PORT": str(free_port()),
            "LORAJOB_WEBHOOK_CERT_FILE": str(cert),
            "LORAJOB_WEBHOOK_KEY_FILE": str(key),
            "LORAJOB_POLICY": '{"allowPrivateEndpoints": true, "maxGpusPerJob": 2}',
        }
    )
    # kopf registers its configuration shortly after startup.
    cluster.cp.wait_for(
        lambda: cluster.cp.get(
            "validatingwebhookconfigurations", "lorajob-validation.finetune.loraops.dev", ""
        ),
        timeout=30,
        message="the operator's ValidatingWebhookConfiguration",
    )
    # A cross-field rule: the CRD's CEL refuses it before the webhook is asked, with the
    # message the webhook would give.
    dora_int8 = cluster.manifest(
        "dora-int8", {"spec": {"lora": {"useDora": True}, "quantization": {"mode": "int8"}}}
    )
    refused = cluster.apply(dora_int8, check=False)
    assert refused.returncode != 0
    assert "spec.lora.useDora: Invalid value: DoRA is not supported with" in refused.stderr
    # The admin policy: only the webhook knows it.
    greedy = cluster.manifest("greedy", {"spec": {"resources": {"gpus": 4}}})
    refused = cluster.apply(greedy, check=False)
    assert refused.returncode != 0
    assert "spec.resources.gpus" in refused.stderr
    assert "maxGpusPerJob" in refused.stderr
    assert cluster.kubectl("get", "lj", "-o", "name").stdout.strip() == ""
    # A good job still goes through the webhook.
    assert cluster.apply(cluster.manifest("fine"), check=False).returncode == 0


def test_schema_violations_are_refused_by_the_api_server(cluster: Cluster) -> None:
    """The CRD's schema alone (no webhook) refuses typos, out-of-range values and specs
    that break a cross-field rule (CEL)."""
    typo = cluster.apply(
        cluster.manifest("typo", {"spec": {"training": {"learningrate": 0.1}}}), check=False
    )
    assert typo.returncode != 0
    assert 'unknown field "spec.training.learningrate"' in typo.stderr
    zero_rank = cluster.apply(
        cluster.manifest("zero-rank", {"spec": {"lora": {"r": 0}}}), check=False
    )
    assert zero_rank.returncode != 0
    assert "spec.lora.r" in zero_rank.stderr
    both = cluster.apply(
        cluster.manifest("epochs-and-steps", {"spec": {"training": {"epochs": 3}}}), check=False
    )
    assert both.returncode != 0
    assert "spec.training.epochs: Invalid value: set together with maxSteps" in both.stderr
    assert cluster.kubectl("get", "lj", "-o", "name").stdout.strip() == ""


def test_invalid_spec_without_the_webhook_is_refused_at_apply(cluster: Cluster) -> None:
    """A cross-field rule the operator checks (InvalidSpec in status for a job stored
    before the CRD had it: tests/operator/integration/test_operator.py) is refused
    at `kubectl apply` by the CRD, naming the field and the fix."""
    bad = cluster.manifest(
        "dora-int8", {"spec": {"lora": {"useDora": True}, "quantization": {"mode": "int8"}}}
    )
    refused = cluster.apply(bad, check=False)
    assert refused.returncode != 0
    assert "spec.lora.useDora" in refused.stderr
    assert "use quantization.mode nf4 or none" in refused.stderr
    assert cluster.kubectl("get", "lj", "-o", "name").stdout.strip() == ""


def test_missing_credentials_secret_waits_then_starts_once_created(cluster: Cluster) -> None:
    cluster.apply(cluster.manifest("no-secret"))
    status = cluster.wait_status(
        "no-secret",
        lambda s: (
            s.get("phase") == "Queued"
            and any(c.get("reason") == "SecretNotFound" for c in s.get("conditions", []))
        ),
        "SecretNotFound",
        timeout=30,
    )
    message = " ".join(c.get("message", "") for c in status["conditions"])
    assert SECRET in message
    assert cluster.pods("no-secret") == []

    cluster.create_secret()
    cluster.wait_status(
        "no-secret", lambda s: s.get("phase") == "Running", "the job to start", timeout=60
    )
    # Deleting the job stops its trainer and removes its pod (finalizer).
    cluster.kubectl("delete", "lj", "no-secret", "--timeout=60s")
    assert cluster.pods("no-secret") == []


def test_wrong_credentials_fail_fast_without_retries_or_leaks(cluster: Cluster) -> None:
    cluster.create_secret(secret_key=WRONG_SECRET_KEY)
    cluster.apply(cluster.manifest("bad-keys"))
    status = cluster.wait_phase("bad-keys", "Failed", timeout=120)
    assert status["failureReason"] == "CredentialsError", status
    assert status["attempts"] == 1, "a permanent failure must not be retried"
    assert "credentialsSecret" in status["hint"]
    cluster.assert_no_secret_leaks([WRONG_SECRET_KEY, cluster.s3.secret_key])


def test_unreachable_storage_is_retried_then_reported(cluster: Cluster) -> None:
    cluster.create_secret()
    closed = f"http://127.0.0.1:{free_port()}"
    job = cluster.manifest(
        "no-storage", {"spec": {"storage": {"endpoint": closed}, "backoffLimit": 1}}
    )
    cluster.apply(job)
    status = cluster.wait_phase("no-storage", "Failed", timeout=180)
    # Transient: retried (backoffLimit 1 = two attempts), then given up with the cause.
    assert status["attempts"] == 2, status
    assert status["failureReason"] == "BackoffLimitExceeded", status
    assert "cannot reach S3 endpoint" in status["failureMessage"]
    assert closed in status["failureMessage"]
    cluster.assert_no_secret_leaks([cluster.s3.secret_key])


def test_exhausted_quota_queues_the_job_until_it_frees_up(cluster: Cluster) -> None:
    cluster.create_secret()
    quota = {
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": {"name": "cpu-quota"},
        "spec": {"hard": {"requests.cpu": "500m"}},
    }
    cluster.apply(quota)
    cluster.apply(cluster.manifest("over-quota"))  # asks for cpu: "1"
    status = cluster.wait_status(
        "over-quota",
        lambda s: (
            s.get("phase") == "Queued"
            and any(c.get("reason") == "QuotaExceeded" for c in s.get("conditions", []))
        ),
        "QuotaExceeded",
        timeout=60,
    )
    assert status.get("attempts", 0) == 0
    assert cluster.pods("over-quota") == []
    # More quota: the job starts by itself and finishes.
    quota["spec"] = {"hard": {"requests.cpu": "2"}}
    cluster.apply(quota)
    cluster.wait_phase("over-quota", "Succeeded")
