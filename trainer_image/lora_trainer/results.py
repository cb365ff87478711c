"""What a finished run writes next to its adapter, besides the weights: metrics.json,
samples.jsonl, the plots, and the model card (README.md) that shows them, with the
evaluation against the base model and the vLLM verdict; and the same evaluation for the
termination message (and so for the job's status)."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loraops_contract.config import TrainerConfig
from loraops_contract.protocol import Evaluation

from lora_trainer import plots, vllm_compat
from lora_trainer.errors import shorten
from lora_trainer.evaluation import SAMPLES_FILE, Comparison, Sample, write_samples
from lora_trainer.model_card import Card, model_card

__all__ = ["architecture_of", "write_results"]

log = logging.getLogger(__name__)

# The vLLM verdict goes into the termination message, which Kubernetes caps at 4 KiB.
_VERDICT_LIMIT = 600


def architecture_of(model_dir: Path) -> str | None:
    """The model class its config.json names (e.g. LlamaForCausalLM), or None."""
    try:
        archs = json.loads((model_dir / "config.json").read_text()).get("architectures")
    except (OSError, ValueError):
        return None
    return str(archs[0]) if isinstance(archs, list) and archs else None


def write_results(
    cfg: TrainerConfig,
    out_dir: Path,
    *,
    metrics: dict[str, Any],
    log_history: Sequence[dict[str, Any]],
    throughput: list[tuple[int, float]],
    base_eval_loss: float | None,
    samples: Sequence[Sample],
    architecture: str | None,
    job_name: str | None,
) -> Evaluation:
    """Write metrics.json, samples.jsonl, plots/*.png and README.md into `out_dir`, which
    already holds the saved adapter; returns the evaluation for the termination message."""
    comparison = Comparison(base_eval_loss=base_eval_loss, eval_loss=metrics.get("eval_loss"))
    serving = vllm_compat.check_adapter(out_dir, architecture)
    log.info("%s; %s", comparison.summary(), serving.summary())
    if comparison.worse:
        log.warning(
            "the adapter's eval loss %.4f is above the base model's %.4f: it predicts the "
            "held-out records worse than the model it was trained from",
            comparison.eval_loss,
            comparison.base_eval_loss,
        )
    if samples:
        write_samples(samples, out_dir / SAMPLES_FILE)
    history = plots.History.from_log(
        log_history, tokens_per_second=throughput, base_eval_loss=base_eval_loss
    )
    drawn = plots.write_plots(history, out_dir)
    metrics = metrics | {
        "base_eval_loss": base_eval_loss,
        "eval_loss_change": (
            comparison.eval_loss - comparison.base_eval_loss
            if comparison.eval_loss is not None and comparison.base_eval_loss is not None
            else None
        ),
        "worse_than_base": comparison.worse,
        "vllm": {
            "loads": serving.loads,
            "reason": serving.reason,
            "max_lora_rank": serving.max_lora_rank,
        },
    }
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    card = Card(
        cfg,
        metrics,
        job_name,
        comparison=comparison if cfg.evaluation.compare_to_base else None,
        samples=samples,
        plots=drawn,
        serving=serving,
    )
    (out_dir / "README.md").write_text(model_card(card))
    return Evaluation(
        base_eval_loss=base_eval_loss,
        eval_loss=comparison.eval_loss,
        worse_than_base=comparison.worse,
        summary=comparison.summary(),
        vllm_loadable=serving.loads,
        vllm=shorten(serving.summary(), _VERDICT_LIMIT),
    )
