"""PNG plots of a run for the model card: loss, learning rate and tokens/s over steps.

Drawn with matplotlib's Agg backend (no display in a pod) at the end of the run, from
the Trainer's log history (which a resumed run carries across attempts) and the
tokens/s of each optimizer step this process trained (`StepThroughput`: the step's
tokens over its time, so evaluations and checkpoints in between do not count). A
series with no points gets no plot.
"""

# Each hook must keep TrainerCallback's full signature, used parts or not.
# ruff: noqa: ARG002

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib as mpl

mpl.use("Agg")  # before pyplot: a pod has no display

import matplotlib.pyplot as plt
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

__all__ = ["PLOTS_DIR", "History", "Plot", "StepThroughput", "write_plots"]

log = logging.getLogger(__name__)

PLOTS_DIR = "plots"
Series = list[tuple[int, float]]


class StepThroughput(TrainerCallback):
    """Tokens/s of every optimizer step: the tokens it consumed over its wall time."""

    def __init__(self) -> None:
        self.history: Series = []
        self._t0 = 0.0
        self._tokens0 = 0

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._t0, self._tokens0 = time.monotonic(), state.num_input_tokens_seen

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        elapsed = time.monotonic() - self._t0
        tokens = state.num_input_tokens_seen - self._tokens0
        if elapsed > 0 and tokens > 0:
            self.history.append((state.global_step, tokens / elapsed))


@dataclass
class History:
    """The run's curves as (step, value) points."""

    loss: Series = field(default_factory=list)
    eval_loss: Series = field(default_factory=list)
    learning_rate: Series = field(default_factory=list)
    tokens_per_second: Series = field(default_factory=list)
    base_eval_loss: float | None = None

    @classmethod
    def from_log(
        cls,
        log_history: Sequence[dict[str, Any]],
        *,
        tokens_per_second: Series,
        base_eval_loss: float | None,
    ) -> History:
        """From `TrainerState.log_history`: one point per step and key, the last logged
        (the final evaluation logs the last step a second time)."""
        h = cls(tokens_per_second=list(tokens_per_second), base_eval_loss=base_eval_loss)
        series = {"loss": h.loss, "eval_loss": h.eval_loss, "learning_rate": h.learning_rate}
        for key, points in series.items():
            by_step: dict[int, float] = {}
            for entry in log_history:
                value, step = entry.get(key), entry.get("step")
                if isinstance(value, int | float) and isinstance(step, int):
                    by_step[step] = float(value)
            points.extend(sorted(by_step.items()))
        return h


@dataclass(frozen=True)
class Plot:
    """A written PNG: its path relative to the output directory and what it shows."""

    path: str
    title: str


def write_plots(history: History, out_dir: Path) -> list[Plot]:
    """Write plots/<name>.png under `out_dir`; returns the plots written, in card order."""
    (out_dir / PLOTS_DIR).mkdir(parents=True, exist_ok=True)
    written: list[Plot] = []

    def save(name: str, title: str, fig: Any) -> None:
        rel = f"{PLOTS_DIR}/{name}.png"
        fig.savefig(out_dir / rel, dpi=100)
        plt.close(fig)
        written.append(Plot(rel, title))

    if history.loss or history.eval_loss:
        fig, ax = _axes("Loss", "loss")
        if history.loss:
            ax.plot(*zip(*history.loss, strict=True), label="training loss", color="tab:blue")
        if history.eval_loss:
            ax.plot(
                *zip(*history.eval_loss, strict=True),
                label="eval loss (adapter)",
                color="tab:orange",
                marker="o",
            )
        if history.base_eval_loss is not None:
            ax.axhline(
                history.base_eval_loss,
                label=f"eval loss (base model) {history.base_eval_loss:.3g}",
                color="tab:gray",
                linestyle="--",
            )
        ax.legend()
        save("loss", "Training and eval loss", fig)
    for name, title, ylabel, points, color in (
        ("learning_rate", "Learning rate", "learning rate", history.learning_rate, "tab:green"),
        (
            "tokens_per_second",
            "Throughput",
            "tokens/s",
            history.tokens_per_second,
            "tab:purple",
        ),
    ):
        if points:
            fig, ax = _axes(title, ylabel)
            ax.plot(*zip(*points, strict=True), color=color)
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))
            save(name, title, fig)
    log.info("plots: %s", ", ".join(p.path for p in written) or "none (nothing logged)")
    return written


def _axes(title: str, ylabel: str) -> tuple[Any, Any]:
    fig, ax = plt.subplots(figsize=(6.4, 3.6), layout="constrained")
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return fig, ax
