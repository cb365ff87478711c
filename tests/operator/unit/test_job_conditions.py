"""Condition helpers: transitions, phase derivation, hints, scrubbing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from lorajob_operator.api import Condition, Phase
from lorajob_operator.conditions import (
    HINTS,
    MAX_MESSAGE_LENGTH,
    ConditionType,
    derive_phase,
    get_condition,
    scrub,
    set_condition,
)
from loraops_contract.protocol import REASON_EXIT_CODES
from loraops_contract.reasons import TRAINER_REASONS, Reason, reason_from_trainer

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
T1 = T0 + timedelta(minutes=5)


def test_set_condition_adds_and_does_not_mutate() -> None:
    before: list[dict[str, object]] = []
    after = set_condition(before, "Running", True, Reason.TRAINER_RUNNING, "go", 3, T0)
    assert before == []
    assert after == [
        {
            "type": "Running",
            "status": "True",
            "reason": "TrainerRunning",
            "message": "go",
            "lastTransitionTime": "2026-01-02T03:04:05Z",
            "observedGeneration": 3,
        }
    ]
    Condition.model_validate(after[0])  # matches the status model / CRD


def test_transition_time_changes_only_on_flip() -> None:
    c = set_condition([], "Running", True, "A", "one", 1, T0)
    same = set_condition(c, "Running", "True", "B", "two", 2, T1)
    assert same[0]["lastTransitionTime"] == "2026-01-02T03:04:05Z"
    assert same[0]["reason"] == "B"
    assert same[0]["message"] == "two"
    assert same[0]["observedGeneration"] == 2
    flipped = set_condition(same, "Running", False, "C", "stopped", 2, T1)
    assert flipped[0]["lastTransitionTime"] == "2026-01-02T03:09:05Z"


def test_position_is_kept_and_types_unique() -> None:
    c = set_condition([], "Accepted", True, "SpecValid", "", 1, T0)
    c = set_condition(c, "Running", True, "TrainerRunning", "", 1, T0)
    c = set_condition(c, "Accepted", False, "InvalidSpec", "bad", 2, T1)
    assert [x["type"] for x in c] == ["Accepted", "Running"]
    assert get_condition(c, "Accepted") == c[0]
    assert get_condition(c, "Failed") is None


def test_naive_datetime_is_utc() -> None:
    c = set_condition([], "Queued", True, "Unschedulable", "", None, datetime(2026, 5, 6, 7, 8, 9))
    assert c[0]["lastTransitionTime"] == "2026-05-06T07:08:09Z"
    assert "observedGeneration" not in c[0]


def test_bad_status_rejected() -> None:
    with pytest.raises(ValueError, match="True, False or Unknown"):
        set_condition([], "Running", "yes", "A", "", 1, T0)


def test_message_is_scrubbed_and_limited() -> None:
    c = set_condition(
        [], "Failed", True, "StorageError", "x" * 5000 + " AKIAABCDEFGHIJKLMNOP", 1, T0
    )
    message = c[0]["message"]
    assert len(message) <= MAX_MESSAGE_LENGTH
    assert "AKIA" not in message
    assert message.endswith("<redacted-access-key>")  # the end is kept: that's where errors are


@pytest.mark.parametrize(
    ("text", "leak"),
    [
        ("auth failed for AKIAIOSFODNN7EXAMPLE", "AKIAIOSFODNN7EXAMPLE"),
        ("aws_secret_access_key=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "wJalrXUtnFEMI"),
        ("token: hf_abcdefghijklmnopqrstuvwxyz123456", "hf_abcdefghij"),
        ("Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.payload.sig", "eyJhbGciOiJIUzI1NiJ9"),
        ("GET https://b.s3.amazonaws.com/k?X-Amz-Signature=deadbeef1234&x=1", "deadbeef1234"),
        ("endpoint http://user:hunter2@minio:9000 refused", "hunter2"),
        ('{"password": "p@ss"}', "p@ss"),
    ],
)
def test_scrub_redacts_secrets(text: str, leak: str) -> None:
    assert leak not in scrub(text)


def test_scrub_keeps_ordinary_text() -> None:
    text = "dataset s3://data/train.jsonl line 3: missing field 'output'"
    assert scrub(text) == text


@pytest.mark.parametrize(
    ("types", "phase"),
    [
        ([], Phase.PENDING),
        (["Accepted"], Phase.PENDING),
        (["Accepted", "Queued"], Phase.QUEUED),
        (["Queued", "Running"], Phase.RUNNING),
        (["Running", "Suspended"], Phase.SUSPENDED),
        (["Suspended", "Succeeded"], Phase.SUCCEEDED),
        (["Succeeded", "Failed"], Phase.FAILED),
        (["Running", "Failed"], Phase.FAILED),
    ],
)
def test_derive_phase_precedence(types: list[str], phase: Phase) -> None:
    conditions: list[dict[str, object]] = []
    for t in types:
        conditions = set_condition(conditions, t, True, "X", "", 1, T0)
    # A False condition of a higher-precedence type changes nothing.
    conditions = set_condition(conditions, "Unrelated", True, "X", "", 1, T0)
    if "Failed" not in types:
        conditions = set_condition(conditions, "Failed", False, "X", "", 1, T0)
    assert derive_phase(conditions) is phase


def test_condition_types_match_phases() -> None:
    # Ready/Reconciling/Stalled summarize the others for kstatus readers (health.py);
    # AdapterWorseThanBase is a warning about a succeeded job's result, not a phase.
    beside = {"Accepted", "Ready", "Reconciling", "Stalled", "AdapterWorseThanBase"}
    assert {t.value for t in ConditionType} - beside == {p.value for p in Phase} - {"Pending"}


def test_every_failure_reason_has_a_hint() -> None:
    failing = [
        Reason.OOM_KILLED, Reason.CUDA_OUT_OF_MEMORY, Reason.INVALID_DATASET,
        Reason.TARGET_MODULES_NOT_FOUND, Reason.CREDENTIALS_ERROR, Reason.SOURCE_NOT_FOUND,
        Reason.IMAGE_PULL_ERROR, Reason.SECRET_NOT_FOUND, Reason.DEADLINE_EXCEEDED,
        Reason.BACKOFF_LIMIT_EXCEEDED, Reason.UNSCHEDULABLE, Reason.INVALID_SPEC,
        Reason.POLICY_VIOLATION, Reason.SCRATCH_SPACE_EXCEEDED, Reason.CONTAINER_START_ERROR,
    ]  # fmt: skip
    for reason in failing:
        assert HINTS[reason]
    assert "resources.memory" in HINTS[Reason.OOM_KILLED]
    assert "gradientCheckpointing" in HINTS[Reason.CUDA_OUT_OF_MEMORY]


def test_reason_from_trainer() -> None:
    # Every reason a trainer reports has an exit code and names a job reason with a hint.
    assert set(REASON_EXIT_CODES) == TRAINER_REASONS
    for failure in TRAINER_REASONS:
        job_reason = reason_from_trainer(failure.value)
        assert job_reason not in (Reason.INTERRUPTED, Reason.INTERNAL_ERROR)
        assert job_reason in HINTS
    assert reason_from_trainer("CUDAOutOfMemory") is Reason.CUDA_OUT_OF_MEMORY
    assert reason_from_trainer("Interrupted") is Reason.DISRUPTED
    assert reason_from_trainer("InternalError") is Reason.TRAINER_ERROR
    assert reason_from_trainer("SomethingNew") is Reason.TRAINER_ERROR
    assert reason_from_trainer(None, Reason.STORAGE_ERROR) is Reason.STORAGE_ERROR


@pytest.mark.parametrize(
    "text",
    [
        "Unable to locate credentials",
        "tokens_per_second: 1234.5",
        "max_steps=100 reached",
        "credentials: none configured for s3://bucket",
    ],
)
def test_scrub_does_not_eat_plain_words(text: str) -> None:
    assert scrub(text) == text
