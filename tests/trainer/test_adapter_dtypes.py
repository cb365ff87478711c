"""restore_dtypes puts trainable parameters back to their recorded dtypes in place."""

from __future__ import annotations

import torch
from lora_trainer.hf import restore_dtypes, trainable_dtypes


def _model() -> torch.nn.Sequential:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    model[0].requires_grad_(False)  # a frozen base layer
    return model.to(torch.bfloat16)


def test_only_trainable_parameters_are_recorded() -> None:
    assert trainable_dtypes(_model()) == {"1.weight": torch.bfloat16, "1.bias": torch.bfloat16}


def test_upcast_parameters_are_cast_back_in_place() -> None:
    model = _model()
    recorded = trainable_dtypes(model)
    model[1].float()  # what peft's load_adapter does to a reloaded adapter
    model[0].float()  # frozen: not recorded, left alone
    weight = model[1].weight

    changed = restore_dtypes(model, recorded)

    assert sorted(changed) == ["1.bias", "1.weight"]
    assert model[1].weight is weight  # same Parameter: references to it stay valid
    assert {p.dtype for p in model[1].parameters()} == {torch.bfloat16}
    assert model[0].weight.dtype == torch.float32
    assert restore_dtypes(model, recorded) == []
