"""Evaluation that shows the job learned something.

Two measurements, both against the base model the adapter was trained on:

* the loss on the held-out split of the base model (measured before training, with the
  adapter switched off) and of the adapter (measured after): `Comparison`;
* the answers of the base model and of the adapter to the spec's prompts
  (`evaluation.prompts`), generated greedily: `Sample`, saved to samples.jsonl.

What touches the model (the adapter switched off, generation) is in lora_trainer.hf.

An adapter whose eval loss is above the base model's learned the wrong thing (a learning
rate far too high, data unlike the eval split): `Comparison.worse` says so, and the
operator turns it into a Warning condition instead of a plain success.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lora_trainer import hf
from lora_trainer.data import ALPACA_PROMPT_NO_INPUT

__all__ = [
    "SAMPLES_FILE",
    "Comparison",
    "Sample",
    "answer_prompts",
    "base_eval_loss",
    "render_prompt",
    "write_samples",
]

log = logging.getLogger(__name__)

SAMPLES_FILE = "samples.jsonl"
# Trainer.evaluate's metric prefix for the base model's evaluation: "eval_base_loss" in
# the log history (eval/base_loss in TensorBoard, beside the adapter's eval/loss), never
# mistaken for the adapter's "eval_loss".
BASE_PREFIX = "eval_base"


@dataclass(frozen=True)
class Comparison:
    """The base model's and the adapter's loss on the same held-out records."""

    base_eval_loss: float | None
    eval_loss: float | None

    @property
    def measured(self) -> bool:
        return self.base_eval_loss is not None and self.eval_loss is not None

    @property
    def worse(self) -> bool:
        """The adapter predicts the held-out records worse than the base model did."""
        return (
            self.base_eval_loss is not None
            and self.eval_loss is not None
            and self.eval_loss > self.base_eval_loss
        )

    def summary(self) -> str:
        """e.g. "eval loss 3.00 -> 2.26 (-24.7%)", or what is missing."""
        if self.eval_loss is None:
            return "no eval loss (no held-out records: dataset.evalSplit is 0 and evalUri unset)"
        if self.base_eval_loss is None:
            return f"eval loss {self.eval_loss:.4g} (base model not measured)"
        change = (self.eval_loss - self.base_eval_loss) / self.base_eval_loss * 100
        return f"eval loss {self.base_eval_loss:.3f} → {self.eval_loss:.3f} ({change:+.1f}%)"


def base_eval_loss(trainer: Any) -> float | None:
    """The base model's loss on the trainer's eval dataset: the same records, batches and
    loss masks as the adapter's evaluation, with the adapter switched off, so the two
    numbers compare like for like. None without an eval dataset or when the loss is not
    finite."""
    if trainer.eval_dataset is None:
        return None
    loss = hf.evaluate_base(trainer, BASE_PREFIX).get(f"{BASE_PREFIX}_loss")
    if not isinstance(loss, int | float) or not math.isfinite(loss):
        return None
    log.info("base model eval loss: %.4f", loss)
    return float(loss)


@dataclass(frozen=True)
class Sample:
    """One prompt with the base model's and the adapter's answers."""

    prompt: str
    base: str
    adapter: str


def render_prompt(tokenizer: Any, prompt: str, dataset_format: str) -> str:
    """`prompt` as the model saw prompts in training: a user turn in the chat template for
    the messages format, the Alpaca instruction template for alpaca records, the text
    itself for text and prompt/completion records."""
    if dataset_format == "messages" and getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return str(rendered)
    if dataset_format == "alpaca":
        return ALPACA_PROMPT_NO_INPUT.format(instruction=prompt)
    return prompt


def answer_prompts(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    dataset_format: str,
    max_new_tokens: int,
) -> list[Sample]:
    """Greedy answers of the base model (adapter off) and of the adapter to each prompt,
    rendered as training saw prompts; `model` is the trained PeftModel."""
    if not prompts:
        return []
    texts = [render_prompt(tokenizer, p, dataset_format) for p in prompts]
    answers = hf.greedy_answers(model, tokenizer, texts, max_new_tokens)
    log.info("answered %d evaluation prompts with the base model and the adapter", len(prompts))
    return [
        Sample(prompt=p, base=base, adapter=adapter)
        for p, (base, adapter) in zip(prompts, answers, strict=True)
    ]


def write_samples(samples: Sequence[Sample], path: Path) -> None:
    """samples.jsonl: one {"prompt", "base", "adapter"} object per line."""
    path.write_text(
        "".join(json.dumps(asdict(s), ensure_ascii=False) + "\n" for s in samples),
        encoding="utf-8",
    )
