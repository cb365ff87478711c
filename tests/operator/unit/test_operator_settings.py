"""OperatorSettings from LORAJOB_* env vars, and the errors for bad values."""

from __future__ import annotations

import pytest
from lorajob_operator.settings import OperatorSettings, SettingsError, load_settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os  # noqa: PLC0415

    for key in list(os.environ):
        if key.startswith("LORAJOB_"):
            monkeypatch.delenv(key)


def test_defaults() -> None:
    s = load_settings()
    assert s.trainer_image == "ghcr.io/loraops/lora-trainer:0.1.0"
    assert s.gpu_resource_name == "nvidia.com/gpu"
    assert s.progress_port == 8080
    assert s.metrics_port == 8000
    assert s.health_port == 8081
    assert s.termination_grace_seconds == 120
    assert s.status_min_interval_seconds == 5
    assert s.namespaces == []
    assert [t.to_wire() for t in s.default_gpu_tolerations] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    assert s.policy.allow_hf_sources is False
    assert (s.api_qps, s.api_burst) == (50, 100)


def test_scalars_lists_and_policy_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAJOB_TRAINER_IMAGE", "registry.local:5000/trainer:dev")
    monkeypatch.setenv("LORAJOB_PROGRESS_PORT", "9090")
    monkeypatch.setenv("LORAJOB_NAMESPACES", "team-a, team-b")
    monkeypatch.setenv("LORAJOB_DEFAULT_NODE_SELECTOR", '{"pool": "gpu"}')
    monkeypatch.setenv("LORAJOB_DEFAULT_GPU_TOLERATIONS", "[]")
    monkeypatch.setenv("LORAJOB_KUEUE_NAMESPACE_QUEUES", '{"team-a": "a-queue"}')
    monkeypatch.setenv("LORAJOB_KUEUE_DEFAULT_QUEUE", "shared")
    monkeypatch.setenv(
        "LORAJOB_POLICY",
        '{"maxGpusPerJob": 8, "allow_hf_sources": true, "maxConcurrentJobsPerNamespace": {"team-a": 2}}',
    )
    s = load_settings()
    assert s.trainer_image == "registry.local:5000/trainer:dev"
    assert s.progress_port == 9090
    assert s.namespaces == ["team-a", "team-b"]
    assert s.default_node_selector == {"pool": "gpu"}
    assert s.default_gpu_tolerations == []
    assert s.policy.max_gpus_per_job == 8
    assert s.policy.allow_hf_sources is True
    assert s.policy.max_concurrent_jobs_per_namespace == {"team-a": 2}
    assert s.queue_for("team-a") == "a-queue"
    assert s.queue_for("team-b") == "shared"


def test_namespaces_as_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAJOB_NAMESPACES", '["x", "y"]')
    assert load_settings().namespaces == ["x", "y"]


@pytest.mark.parametrize(
    ("env", "value", "needle"),
    [
        ("LORAJOB_PROGRESS_PORT", "eighty", "LORAJOB_PROGRESS_PORT"),
        ("LORAJOB_PROGRESS_PORT", "70000", "LORAJOB_PROGRESS_PORT"),
        ("LORAJOB_NAMESPACES", "Team_A", "LORAJOB_NAMESPACES"),
        ("LORAJOB_TRAINER_IMAGE", "Not An Image", "LORAJOB_TRAINER_IMAGE"),
        ("LORAJOB_DEFAULT_MEMORY", "32GB", "LORAJOB_DEFAULT_MEMORY"),
        ("LORAJOB_GPU_RESOURCE_NAME", "gpu", "LORAJOB_GPU_RESOURCE_NAME"),
        ("LORAJOB_IMAGE_PULL_POLICY", "Sometimes", "LORAJOB_IMAGE_PULL_POLICY"),
        ("LORAJOB_POLICY", '{"maxGpus": 1}', "LORAJOB_POLICY at maxGpus"),
        ("LORAJOB_POLICY", "{not json", "LORAJOB_POLICY: not valid JSON"),
        ("LORAJOB_TRAINER_EXTRA_ENV", '{"AWS_SECRET_ACCESS_KEY": "x"}', "Secrets"),
        ("LORAJOB_KUEUE_DEFAULT_QUEUE", "Bad Queue", "LORAJOB_KUEUE_DEFAULT_QUEUE"),
        ("LORAJOB_API_QPS", "0", "LORAJOB_API_QPS"),
        ("LORAJOB_API_QPS", "nan", "LORAJOB_API_QPS"),
        ("LORAJOB_API_BURST", "0", "LORAJOB_API_BURST"),
        ("LORAJOB_API_BURST", "1.5", "LORAJOB_API_BURST"),
    ],
)
def test_bad_env_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, env: str, value: str, needle: str
) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert needle in str(info.value)


def test_overrides_for_tests() -> None:
    s = load_settings(progress_port=1234, policy={"allowPrivateEndpoints": True})
    assert s.progress_port == 1234
    assert s.policy.allow_private_endpoints is True
    assert isinstance(s, OperatorSettings)


def test_retry_settings_and_trainer_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAJOB_TRAINER_COMMAND", '["python", "fake_trainer.py"]')
    monkeypatch.setenv("LORAJOB_MAX_DISRUPTIONS", "2")
    s = load_settings()
    assert s.trainer_command == ["python", "fake_trainer.py"]
    assert s.max_disruptions == 2
    assert s.retry_backoff_seconds <= s.retry_backoff_max_seconds
    assert s.wait_backoff_seconds <= s.wait_backoff_max_seconds


def test_api_rate_limit_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAJOB_API_QPS", "12.5")
    monkeypatch.setenv("LORAJOB_API_BURST", "25")
    s = load_settings()
    assert (s.api_qps, s.api_burst) == (12.5, 25)


def test_unknown_variable_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAJOB_TRAINER_IMAGES", "x/y:1")
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert "LORAJOB_TRAINER_IMAGES (did you mean LORAJOB_TRAINER_IMAGE?)" in str(info.value)
