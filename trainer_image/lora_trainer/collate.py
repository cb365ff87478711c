"""How packed training rows are laid out in a batch, by attention implementation.

TRL's best-fit-decreasing packing fills rows of at most maxSeqLength with whole
records (`seq_lengths` says where each record ends). Its padding-free collator
then joins the whole micro-batch into ONE row ([1, batch * maxSeqLength]) and
marks record boundaries only through `position_ids` / `cu_seq_lens`:

* flash-attention (2/3, or a hub flash kernel) reads those boundaries and runs a
  varlen kernel: no mask, no padding, no wasted work. There it stays.
* every other implementation (sdpa, eager: CPUs, GPUs without flash-attn) turns
  the boundaries into a block-diagonal mask over the whole joined row, so
  attention costs (batch * maxSeqLength)^2 instead of batch * maxSeqLength^2:
  4x the attention work and mask memory at batch 4.

`PackedRowsCollator` keeps TRL's packed rows as rows instead: a batch is
[batch, longest row], each row padded at its tail only. There is no
attention_mask; `position_ids` restart at 0 for every record (and are 0 on
padding), which transformers' masking (`find_packed_sequence_indices`) turns
into a per-row block-causal mask, so no record attends to another, nor to
padding. The first label of every record is -100, as in TRL's padding-free
path: it would otherwise be predicted from the previous record's last token.
"""

# torch/transformers/trl load with the training stack, not with the CLI.
# ruff: noqa: PLC0415

from __future__ import annotations

from typing import Any

__all__ = ["PackedRowsCollator", "has_varlen_attention", "use_packed_rows"]

IGNORE_INDEX = -100


def has_varlen_attention(config: Any) -> bool:
    """Whether the model's attention uses sequence boundaries directly (flash varlen)."""
    from transformers.utils.generic import is_flash_attention_requested

    return bool(is_flash_attention_requested(config=config))


class PackedRowsCollator:
    """Packed rows -> {input_ids, labels, position_ids}, each [batch, longest row]."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None) -> None:
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        # TRL's row collator: pads each row at its tail and, from `seq_lengths`, gives
        # position_ids that restart at every record. Its attention_mask (all ones over a
        # row's records) would let records see each other, so it is dropped below.
        self._rows = DataCollatorForLanguageModeling(
            pad_token_id=pad_token_id,
            padding_free=False,
            return_position_ids=True,
            pad_to_multiple_of=pad_to_multiple_of,
        )

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = self._rows(examples)
        # Without a 2D mask transformers derives the block-causal mask from position_ids.
        del batch["attention_mask"]
        batch["labels"][batch["position_ids"] == 0] = IGNORE_INDEX
        return batch


def use_packed_rows(trainer: Any) -> bool:
    """Give a packing SFTTrainer the row layout unless its model has flash varlen attention.

    SFTTrainer always picks its padding-free collator for best-fit packing (and refuses
    a custom collator next to it), so the collator is swapped after construction;
    nothing else in the trainer depends on which collator it is. Returns whether it
    was swapped.
    """
    args = trainer.args
    if not args.packing or has_varlen_attention(trainer.model.config):
        return False
    multiple = args.pad_to_multiple_of if isinstance(args.pad_to_multiple_of, int) else None
    # The pad token TRL settled on (the tokenizer's, else EOS) is on its own collator.
    trainer.data_collator = PackedRowsCollator(trainer.data_collator.pad_token_id, multiple)
    return True
