"""Packed rows without flash varlen attention: [batch, <= maxSeqLength], and each record
computes exactly what it computes alone (no attention across records or into padding)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from lora_trainer import data
from lora_trainer.hf import (
    Device,
    PackedRowsCollator,
    build_trainer,
    has_varlen_attention,
    load_model,
    use_packed_rows,
)
from lora_trainer.inputs import Inputs
from lora_trainer.train import tokenize_inputs
from loraops_contract.config import TrainerConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from devcluster.tiny_model import write_dataset

PAD = 1
# Two packed rows: three records, then one record that leaves the row's tail padded.
# Labels are -100 on the "prompt" part, as completion-only loss makes them.
RECORDS = [
    ([5, 17, 42, 9, 33], [-100, -100, 42, 9, 33]),
    ([8, 61, 12, 90], [-100, 61, 12, 90]),
    ([7, 7, 30, 31, 32, 40], [-100, -100, -100, 31, 32, 40]),
    ([50, 51, 52, 53, 54, 55, 56], [-100, -100, -100, -100, 54, 55, 56]),
]
ROWS = [[0, 1, 2], [3]]


def _examples() -> list[dict[str, Any]]:
    return [
        {
            "input_ids": [t for i in row for t in RECORDS[i][0]],
            "labels": [t for i in row for t in RECORDS[i][1]],
            "seq_lengths": [len(RECORDS[i][0]) for i in row],
        }
        for row in ROWS
    ]


def test_rows_keep_their_records_and_pad_only_the_tail() -> None:
    batch = PackedRowsCollator(pad_token_id=PAD)(_examples())
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no attention_mask
    assert batch["input_ids"].shape == (2, 15)
    assert batch["position_ids"].tolist() == [
        [0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2, 3, 4, 5],
        [0, 1, 2, 3, 4, 5, 6, 0, 0, 0, 0, 0, 0, 0, 0],
    ]
    assert batch["input_ids"][1, 7:].tolist() == [PAD] * 8
    # Labels: the records' own, never on padding nor on a record's first token.
    assert batch["labels"].tolist() == [
        [-100, -100, 42, 9, 33, -100, 61, 12, 90, -100, -100, -100, 31, 32, 40],
        [-100, -100, -100, -100, 54, 55, 56, *[-100] * 8],
    ]


def test_packed_rows_compute_what_each_record_computes_alone(tiny_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa"
    ).eval()  # type: ignore[no-untyped-call]
    batch = PackedRowsCollator(pad_token_id=PAD)(_examples())
    with torch.no_grad():
        # use_cache=False as in training: with a KV cache transformers skips the
        # per-record mask that it derives from position_ids.
        packed = model(**batch, use_cache=False)
        solo = [model(input_ids=torch.tensor([ids])).logits[0] for ids, _ in RECORDS]
        # Control: TRL's row collator keeps an all-ones attention_mask over the
        # records of a row, and then they do see each other.
        rows = DataCollatorForLanguageModeling(pad_token_id=PAD, return_position_ids=True)
        mixed = model(**rows(_examples()), use_cache=False).logits

    starts = {0: (0, 0), 1: (0, 5), 2: (0, 9), 3: (1, 0)}
    for i, (ids, _) in enumerate(RECORDS):
        row, start = starts[i]
        got = packed.logits[row, start : start + len(ids)]
        torch.testing.assert_close(got, solo[i], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(mixed[0, 5:9], solo[1], atol=1e-3)

    # The batch loss is the mean over every record's completion tokens, as if alone.
    losses = []
    for (_, labels), logits in zip(RECORDS, solo, strict=True):
        target = torch.tensor(labels[1:])
        losses.append(torch.nn.functional.cross_entropy(logits[:-1], target, reduction="none"))
    expected = torch.cat(losses)[torch.cat([torch.tensor(lbl[1:]) for _, lbl in RECORDS]) != -100]
    torch.testing.assert_close(packed.loss, expected.mean(), atol=1e-5, rtol=1e-4)


def _config(attn: str) -> LlamaConfig:
    config = LlamaConfig()
    config._attn_implementation = attn
    return config


@pytest.mark.parametrize(
    ("attn", "varlen"),
    [("sdpa", False), ("eager", False), ("flash_attention_2", True), ("flash_attention_3", True)],
)
def test_only_flash_attention_keeps_the_one_row_layout(attn: str, varlen: bool) -> None:
    assert has_varlen_attention(_config(attn)) is varlen
    stock = SimpleNamespace(pad_token_id=PAD)
    trainer = SimpleNamespace(
        args=SimpleNamespace(packing=True, pad_to_multiple_of=None),
        model=SimpleNamespace(config=_config(attn)),
        data_collator=stock,
    )
    assert use_packed_rows(trainer) is not varlen
    assert (trainer.data_collator is stock) is varlen

    unpacked = SimpleNamespace(
        args=SimpleNamespace(packing=False, pad_to_multiple_of=None),
        model=SimpleNamespace(config=_config(attn)),
        data_collator=stock,
    )
    assert not use_packed_rows(unpacked)


def test_trainer_batches_are_rows_with_completion_only_labels(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """What SFTTrainer hands the model on CPU (sdpa): packed rows of <= maxSeqLength,
    each record labelled on its completion tokens only."""
    # Records of several lengths, so that rows hold different numbers of them.
    records = [
        {
            "prompt": " ".join(["what color is the sky"] * (1 + i % 5)) + "?",
            "completion": " blue" * (1 + i % 3) + ".",
        }
        for i in range(40)
    ]
    dataset = write_dataset(tmp_path / "train.jsonl", "prompt_completion", records=records)
    max_len, batch_size = 64, 4
    cfg = TrainerConfig.model_validate(
        {
            "model": {"uri": str(tiny_model_dir)},
            "dataset": {"uri": str(dataset), "evalSplit": 0},
            "training": {"maxSteps": 1, "batchSize": batch_size, "maxSeqLength": max_len},
            "output": {"uri": str(tmp_path / "out")},
        }
    )
    assert cfg.training.packing
    assert cfg.training.completion_only_loss
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    inputs = Inputs(model_dir=tiny_model_dir, train=data.Source(dataset, "prompt_completion"))
    train_ds, _ = tokenize_inputs(cfg, tokenizer, inputs)
    device = Device(cuda=False)
    model, peft_config = load_model(cfg, tiny_model_dir, device)
    trainer = build_trainer(
        cfg,
        model,
        tokenizer,
        device=device,
        peft_config=peft_config,
        datasets=(train_ds, None),
        ckpt_dir=tmp_path / "ckpt",
    )
    batch = next(iter(trainer.get_train_dataloader()))

    assert "attention_mask" not in batch
    rows, width = batch["input_ids"].shape
    assert rows == batch_size
    assert width <= max_len
    # Every record in the batch, found by its position_ids, carries exactly the labels
    # of its completion tokens (and none on the first token or on padding).
    expected = {
        tuple(ids): [tok if m else -100 for tok, m in zip(ids, mask, strict=True)]
        for ids, mask in zip(train_ds["input_ids"], train_ds["completion_mask"], strict=True)
    }
    seen, widths = 0, []
    for ids, labels, pos in zip(
        batch["input_ids"].tolist(),
        batch["labels"].tolist(),
        batch["position_ids"].tolist(),
        strict=True,
    ):
        real = len(ids)  # the tail padding: pad tokens at position 0
        while real and pos[real - 1] == 0 and ids[real - 1] == tokenizer.pad_token_id:
            real -= 1
        starts = [i for i in range(real) if pos[i] == 0]
        ends = [*starts[1:], real]
        for start, end in zip(starts, ends, strict=True):
            record = tuple(ids[start:end])
            assert record in expected
            assert labels[start:end] == [-100, *expected[record][1:]]
            seen += 1
        assert all(lbl == -100 for lbl in labels[real:])  # padding
        widths.append(real)
    assert seen > batch_size  # several records share a row
    assert len(set(widths)) > 1  # rows of different lengths: the shorter ones padded
