"""What a finished trainer measured reaches status.evaluation; an adapter worse than its
base model is a Warning condition and event, not a plain success."""

from __future__ import annotations

from lorajob_operator.conditions import ConditionType, get_condition
from loraops_contract.protocol import Evaluation, TerminationMessage
from loraops_contract.reasons import Reason

from tests.operator.runtime.kubefakes import at, pod, termination
from tests.operator.runtime.test_reconcile import World

VLLM = "loads in vLLM: yes, plain LoRA, rank 16 on q_proj, v_proj; serve with --enable-lora"


def _finish(w: World, evaluation: Evaluation | None, attempt: int = 1, at_s: int = 100) -> None:
    final = TerminationMessage.model_validate_json(termination()).model_copy(
        update={"evaluation": evaluation}
    )
    w.replace_pod(
        pod(attempt, "Succeeded", exit_code=0, message=final.to_json(), finished=at(at_s))
    )


def test_a_better_adapter_is_recorded_without_a_warning() -> None:
    w = World()
    w.started()
    better = Evaluation(
        base_eval_loss=3.00012345,
        eval_loss=2.26,
        summary="eval loss 3.000 → 2.260 (-24.7%)",
        vllm_loadable=True,
        vllm=VLLM,
    )
    _finish(w, better)
    d = w.step(at(101))
    assert w.status["phase"] == "Succeeded"
    assert w.status["evaluation"] == {
        "baseEvalLoss": 3.0001,
        "evalLoss": 2.26,
        "summary": "eval loss 3.000 → 2.260 (-24.7%)",
        "worseThanBase": False,
        "vllm": VLLM,
    }
    assert get_condition(w.status["conditions"], ConditionType.ADAPTER_WORSE_THAN_BASE) is None
    assert [e.type for e in d.events] == ["Normal"]


def test_an_adapter_worse_than_its_base_is_a_warning() -> None:
    w = World()
    w.started()
    worse = Evaluation(
        base_eval_loss=2.0,
        eval_loss=2.4,
        worse_than_base=True,
        summary="eval loss 2.000 → 2.400 (+20.0%)",
        vllm=VLLM,
    )
    _finish(w, worse)
    d = w.step(at(101))
    assert w.status["phase"] == "Succeeded"  # it ran to the end; the warning says the rest
    assert w.status["evaluation"]["worseThanBase"] is True
    cond = w.cond(ConditionType.ADAPTER_WORSE_THAN_BASE)
    assert cond["status"] == "True"
    assert cond["reason"] == Reason.EVAL_LOSS_ABOVE_BASE
    assert cond["message"].startswith("eval loss 2.000 → 2.400 (+20.0%): the adapter predicts")
    warnings = [e for e in d.events if e.type == "Warning"]
    assert [e.reason for e in warnings] == [Reason.EVAL_LOSS_ABOVE_BASE]
    assert w.step(at(200)).events == []  # posted once, not on every pass


def test_a_trainer_that_reports_no_evaluation_leaves_none() -> None:
    w = World()
    w.started()
    _finish(w, None)
    w.step(at(101))
    assert w.status["phase"] == "Succeeded"
    assert "evaluation" not in w.status
