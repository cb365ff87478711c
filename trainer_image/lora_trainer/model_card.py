"""README.md for the adapter: what it is, whether it learned something, how it trained,
what it answers, and how to serve it."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from loraops_contract.config import TrainerConfig

from lora_trainer.evaluation import SAMPLES_FILE, Comparison, Sample
from lora_trainer.plots import Plot
from lora_trainer.vllm_compat import ServingCheck

__all__ = ["Card", "model_card"]


@dataclass(frozen=True)
class Card:
    """Everything the card shows; only `cfg` and `metrics` are required."""

    cfg: TrainerConfig
    metrics: dict[str, Any]
    job_name: str | None = None
    comparison: Comparison | None = None
    samples: Sequence[Sample] = ()
    plots: Sequence[Plot] = ()
    serving: ServingCheck | None = None


def model_card(card: Card) -> str:
    cfg, metrics = card.cfg, card.metrics
    q = cfg.quantization
    title = f"LoRA adapter{f' from LoRAJob {card.job_name}' if card.job_name else ''}"
    parts = [
        f"""---
library_name: peft
tags: [lora, {"qlora, " if q.mode in ("nf4", "fp4") else ""}trl, sft]
---

# {title}
"""
    ]
    if card.comparison is not None:
        parts.append(_evaluation(card.comparison))
    if card.serving is not None:
        parts.append(f"**{card.serving.summary()}**\n")
    parts.append(_table(cfg, metrics, card.comparison))
    if card.plots:
        parts.append(
            "## Training curves\n\n"
            + "\n\n".join(f"![{p.title}]({p.path})" for p in card.plots)
            + "\n"
        )
    if card.samples:
        parts.append(_samples(card.samples))
    parts.append(_use(cfg, card.serving))
    return "\n".join(parts)


def _evaluation(c: Comparison) -> str:
    text = f"**{c.summary()}** on the held-out split"
    if c.measured:
        text += " (base model before training → adapter after)"
    text += "\n"
    if c.worse:
        text += (
            "\n> **Warning:** the adapter's eval loss is higher than the base model's: it "
            "predicts the held-out records worse than the model it was trained from. Check the "
            "learning rate, the number of steps and whether the eval split resembles the "
            "training data.\n"
        )
    return text


def _table(cfg: TrainerConfig, metrics: dict[str, Any], comparison: Comparison | None) -> str:
    lora, t, q = cfg.lora, cfg.training, cfg.quantization
    targets = (
        lora.target_modules
        if isinstance(lora.target_modules, str)
        else ", ".join(lora.target_modules)
    )
    rows = [
        ("Base model", cfg.model.uri),
        ("Dataset", cfg.dataset.uri),
        (
            "Quantization",
            q.mode + (" (double quant)" if q.mode in ("nf4", "fp4") and q.double_quant else ""),
        ),
        (
            "LoRA",
            f"r={lora.r}, alpha={lora.alpha}, dropout={lora.dropout}, targets={targets}"
            + (", rsLoRA" if lora.use_rslora else "")
            + (", DoRA" if lora.use_dora else ""),
        ),
        (
            "Training",
            f"lr={t.learning_rate}, batch={t.batch_size}x{t.gradient_accumulation_steps}, "
            f"maxSeqLength={t.max_seq_length}, packing={t.packing}, scheduler={t.scheduler}",
        ),
        ("Steps", str(metrics.get("steps"))),
        ("Train loss", _fmt(metrics.get("train_loss"))),
        ("Eval loss (base model)", _fmt(comparison.base_eval_loss if comparison else None)),
        ("Eval loss (adapter)", _fmt(metrics.get("eval_loss"))),
        ("Tokens/s", _fmt(metrics.get("tokens_per_second"))),
    ]
    body = "\n".join(f"| {k} | {_cell(v)} |" for k, v in rows)
    return f"| | |\n|---|---|\n{body}\n"


def _samples(samples: Sequence[Sample]) -> str:
    out = [
        f"## Samples\n\nGreedy answers to the job's `evaluation.prompts` (also in `{SAMPLES_FILE}`).\n"
    ]
    for i, s in enumerate(samples, 1):
        out.append(
            f"### Prompt {i}\n\n{_fenced(s.prompt)}\n\n**Base model**\n\n{_fenced(s.base)}\n\n"
            f"**Adapter**\n\n{_fenced(s.adapter)}\n"
        )
    return "\n".join(out)


def _use(cfg: TrainerConfig, serving: ServingCheck | None) -> str:
    rank_flag = (
        f" --max-lora-rank {serving.max_lora_rank}"
        if serving is not None and serving.max_lora_rank and serving.max_lora_rank > 16
        else ""
    )
    merged = (
        "The merged model (base + adapter, no LoRA at serving time) is under `merged/`:\n"
        "`vllm serve <output.uri>/merged`.\n"
        if cfg.output.merged_model
        else "For a merged model (base + adapter in one, no LoRA at serving time) set "
        "`spec.output.mergedModel: true`; it is written under `merged/`.\n"
    )
    return f"""## Use

With PEFT:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import PeftModel

base = AutoModelForCausalLM.from_pretrained("<base model>")
model = PeftModel.from_pretrained(base, "<this directory>")
tokenizer = AutoTokenizer.from_pretrained("<this directory>")
```

With vLLM, at start-up:

```bash
vllm serve <base model> --enable-lora{rank_flag} --lora-modules my-adapter=<this directory>
```

or into a running server started with `--enable-lora` and
`VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`:

```bash
curl -X POST http://<vllm>:8000/v1/load_lora_adapter \\
  -H 'Content-Type: application/json' \\
  -d '{{"lora_name": "my-adapter", "lora_path": "<this directory>"}}'
```

then request `"model": "my-adapter"`. {merged}
`manifest.json` lists every file with its size and sha256.
"""


_BACKTICKS = re.compile(r"`+")


def _fenced(text: str) -> str:
    """`text` in a code fence longer than any run of backticks inside it."""
    longest = max((len(m) for m in _BACKTICKS.findall(text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}"


def _cell(value: str) -> str:
    return value.replace("|", "\\|").replace("\n", " ")


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
