"""kstatus summary conditions (Ready, Reconciling, Stalled) derived from a job's own conditions.

The real kstatus library reads statuses the operator wrote on a control plane in
tests/operator/integration/test_gitops_health.py; these cover every phase by rule.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from lorajob_operator.api import Condition
from lorajob_operator.conditions import ConditionType, get_condition, set_condition
from lorajob_operator.health import summarize, with_summary
from loraops_contract.reasons import Reason

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
T1 = T0 + timedelta(minutes=5)


def _conds(*entries: tuple[ConditionType, bool, str, str]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for type_, status, reason, message in entries:
        out = set_condition(out, type_, status, reason, message, 1, T0)
    return out


ACCEPTED = (ConditionType.ACCEPTED, True, Reason.SPEC_VALID, "spec accepted")


@pytest.mark.parametrize(
    ("conditions", "ready", "reconciling", "stalled", "reason"),
    [
        pytest.param([], False, True, False, "Pending", id="no-conditions"),
        pytest.param(
            _conds(ACCEPTED, (ConditionType.QUEUED, True, Reason.SCHEDULING_GATED, "kueue")),
            False,
            True,
            False,
            "SchedulingGated",
            id="queued",
        ),
        pytest.param(
            _conds(
                ACCEPTED,
                (ConditionType.QUEUED, False, Reason.TRAINER_RUNNING, ""),
                (ConditionType.RUNNING, True, Reason.TRAINER_RUNNING, "step 3"),
            ),
            False,
            True,
            False,
            "TrainerRunning",
            id="running",
        ),
        pytest.param(
            _conds(
                ACCEPTED,
                (ConditionType.RUNNING, False, Reason.COMPLETED, ""),
                (ConditionType.SUCCEEDED, True, Reason.COMPLETED, "adapter written"),
            ),
            True,
            False,
            False,
            "Completed",
            id="succeeded",
        ),
        pytest.param(
            _conds(ACCEPTED, (ConditionType.FAILED, True, Reason.INVALID_DATASET, "bad row 3")),
            False,
            False,
            True,
            "InvalidDataset",
            id="failed",
        ),
        pytest.param(
            _conds(
                (ConditionType.ACCEPTED, False, Reason.INVALID_SPEC, "spec.lora.r: too big"),
                (ConditionType.SUCCEEDED, True, Reason.COMPLETED, "adapter written"),
            ),
            False,
            False,
            True,
            "InvalidSpec",
            id="succeeded-then-refused-edit",
        ),
        pytest.param(
            _conds(
                ACCEPTED,
                (ConditionType.SUSPENDED, True, Reason.SUSPENDED_BY_USER, "suspended"),
            ),
            False,
            False,
            False,
            "SuspendedByUser",
            id="suspended",
        ),
    ],
)
def test_summary_by_phase(
    conditions: list[dict[str, Any]], ready: bool, reconciling: bool, stalled: bool, reason: str
) -> None:
    summary = summarize(conditions)
    assert (summary.ready, summary.reconciling, summary.stalled) == (ready, reconciling, stalled)
    assert summary.reason == reason
    out = with_summary(conditions, 4, T1)
    ready_cond = get_condition(out, ConditionType.READY)
    assert ready_cond is not None
    assert ready_cond["status"] == ("True" if ready else "False")
    assert ready_cond["reason"] == reason
    assert ready_cond["observedGeneration"] == 4
    # abnormal-true: present only while True, as kstatus and Flux's controllers write them
    for type_, expected in (
        (ConditionType.RECONCILING, reconciling),
        (ConditionType.STALLED, stalled),
    ):
        cond = get_condition(out, type_)
        assert (cond is not None) == expected, type_
        if cond is not None:
            assert cond["status"] == "True"
            assert cond["observedGeneration"] == 4
    for cond in out:
        Condition.model_validate(cond)  # fits the status model, so the CRD schema too


def test_summary_transitions_and_input_untouched() -> None:
    running = _conds(ACCEPTED, (ConditionType.RUNNING, True, Reason.TRAINER_RUNNING, "go"))
    first = with_summary(running, 1, T0)
    assert get_condition(running, ConditionType.READY) is None  # input not modified
    again = with_summary(first, 1, T1)
    assert again == first  # a replayed pass writes nothing new (same transition time)
    done = set_condition(first, ConditionType.RUNNING, False, Reason.COMPLETED, "", 1, T1)
    done = set_condition(done, ConditionType.SUCCEEDED, True, Reason.COMPLETED, "ok", 1, T1)
    finished = with_summary(done, 1, T1)
    ready = get_condition(finished, ConditionType.READY) or {}
    assert ready["status"] == "True"
    assert ready["lastTransitionTime"] == "2026-01-02T03:09:05Z"
    assert get_condition(finished, ConditionType.RECONCILING) is None
