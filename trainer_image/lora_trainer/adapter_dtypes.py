"""The trainable adapter keeps the dtypes it was created with, also after a resume.

Where a fresh run's dtypes come from (TRL 1.16, peft 0.21):

- peft's `get_peft_model` (autocast_adapter_dtype=True) creates LoRA weights in the
  base layer's dtype and upcasts float16/bfloat16 ones to float32. Unquantized
  models (`quantization.mode: none`) therefore train float32 adapters.
- SFTTrainer then casts every trainable parameter of a quantized model to bfloat16
  (QLoRA recipe), whatever the compute dtype, except DoRA magnitude vectors, which
  stay float32. nf4/fp4/int8 runs therefore train and publish bfloat16 adapters.
- `prepare_model_for_kbit_training` is not called (neither here nor by TRL).

On resume, `Trainer.train(resume_from_checkpoint=...)` reloads the checkpoint's
adapter through peft's `load_adapter`, whose autocast_adapter_dtype upcasts it to
float32 again: without a correction a resumed QLoRA run trains the rest of its
steps in float32 and publishes an adapter twice the size of a fresh run's.

`DtypeKeepingTrainer` records the dtypes right after the trainer is built and puts
them back in `create_optimizer`, the one public Trainer hook that runs after the
checkpoint's adapter is loaded and before the optimizer exists. The optimizer is
then built over the right dtypes and its `load_state_dict` casts the checkpoint's
optimizer state to them, as in the fresh run (checkpoints store bfloat16 weights
and state, so the float32 round trip loses nothing). The parameters are cast in
place (`param.data`), so every reference to them stays valid.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from trl.trainer.sft_trainer import SFTTrainer

__all__ = ["DtypeKeepingTrainer", "restore_dtypes", "trainable_dtypes"]

log = logging.getLogger(__name__)


def trainable_dtypes(model: torch.nn.Module) -> dict[str, torch.dtype]:
    """The dtype of every trainable parameter, by name."""
    return {name: p.dtype for name, p in model.named_parameters() if p.requires_grad}


def restore_dtypes(model: torch.nn.Module, dtypes: dict[str, torch.dtype]) -> list[str]:
    """Cast the parameters named in `dtypes` back to those dtypes, in place.

    Returns the names of the parameters that had another dtype.
    """
    changed = []
    for name, param in model.named_parameters():
        dtype = dtypes.get(name)
        if dtype is not None and param.dtype != dtype:
            param.data = param.data.to(dtype)
            changed.append(name)
    return changed


class DtypeKeepingTrainer(SFTTrainer):
    """SFTTrainer whose trainable parameters keep the dtypes they were created with."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.adapter_dtypes = trainable_dtypes(self._peft_model())

    def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
        # Runs after the Trainer loaded a checkpoint's adapter (which upcasts it) and
        # before the checkpoint's optimizer state is loaded into the new optimizer.
        if changed := restore_dtypes(self._peft_model(), self.adapter_dtypes):
            log.info(
                "the checkpoint's adapter was loaded upcast; %d trainable tensors cast back to %s",
                len(changed),
                ", ".join(sorted({str(self.adapter_dtypes[n]) for n in changed})),
            )
        return super().create_optimizer(model)

    def _peft_model(self) -> torch.nn.Module:
        if self.model is None:  # SFTTrainer always has one; typed Optional upstream
            raise RuntimeError("the trainer has no model")
        return self.model
