"""The adapter's README.md: the base-vs-adapter eval loss first (with a warning when the
adapter is worse), the plots, the samples, the vLLM verdict and how to serve it; and the
PNG plots it embeds, drawn from a Trainer log history."""

from __future__ import annotations

from pathlib import Path

from lora_trainer.evaluation import Comparison, Sample, write_samples
from lora_trainer.model_card import Card, model_card
from lora_trainer.plots import History, write_plots
from lora_trainer.vllm_compat import ServingCheck
from loraops_contract.config import TrainerConfig

CFG = TrainerConfig.model_validate(
    {
        "model": {"uri": "s3://models/tiny"},
        "dataset": {"uri": "s3://data/train.jsonl"},
        "output": {"uri": "s3://out/a"},
    }
)
METRICS = {"steps": 8, "train_loss": 2.5, "eval_loss": 2.26, "tokens_per_second": 1234.5}
LOG_HISTORY = [
    {"eval_base_loss": 3.0, "step": 0},
    *({"loss": 3.0 - 0.1 * s, "learning_rate": 2e-4 * (1 - s / 8), "step": s} for s in range(1, 9)),
    {"eval_loss": 2.5, "step": 4},
    {"eval_loss": 2.3, "step": 8},
    {"eval_loss": 2.26, "step": 8},  # the final evaluation logs the last step again
    {"train_loss": 2.5, "step": 8},
]


def test_the_card_says_what_the_adapter_learned() -> None:
    card = model_card(Card(CFG, METRICS, "team-a/support", comparison=Comparison(3.0, 2.26)))
    assert "# LoRA adapter from LoRAJob team-a/support" in card
    assert "**eval loss 3.000 → 2.260 (-24.7%)** on the held-out split" in card
    assert "| Eval loss (base model) | 3 |" in card
    assert "| Eval loss (adapter) | 2.26 |" in card
    assert "Warning" not in card


def test_an_adapter_worse_than_its_base_is_flagged() -> None:
    worse = Comparison(base_eval_loss=2.0, eval_loss=2.4)
    assert worse.worse
    card = model_card(Card(CFG, METRICS | {"eval_loss": 2.4}, comparison=worse))
    assert "> **Warning:** the adapter's eval loss is higher than the base model's" in card
    assert not Comparison(2.0, 2.0).worse
    assert not Comparison(None, 2.0).worse
    assert Comparison(None, 2.0).summary() == "eval loss 2 (base model not measured)"
    assert Comparison(None, None).summary().startswith("no eval loss")


def test_samples_are_fenced_whatever_they_hold(tmp_path: Path) -> None:
    samples = [Sample(prompt="What is ```this```?", base="red | blue", adapter="green")]
    card = model_card(Card(CFG, METRICS, samples=samples))
    assert "### Prompt 1\n\n````text\nWhat is ```this```?\n````" in card
    assert "**Base model**\n\n```text\nred | blue\n```" in card
    assert "**Adapter**\n\n```text\ngreen\n```" in card
    write_samples(samples, tmp_path / "samples.jsonl")
    assert (tmp_path / "samples.jsonl").read_text() == (
        '{"prompt": "What is ```this```?", "base": "red | blue", "adapter": "green"}\n'
    )


def test_the_card_says_how_to_serve_it_in_vllm() -> None:
    yes = ServingCheck(True, "plain LoRA, rank 64 on q_proj; serve with --enable-lora", 64)
    card = model_card(Card(CFG, METRICS, serving=yes))
    assert "**loads in vLLM: yes, plain LoRA, rank 64 on q_proj" in card
    assert "--enable-lora --max-lora-rank 64 --lora-modules my-adapter=<this directory>" in card
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True" in card
    assert "/v1/load_lora_adapter" in card
    assert "spec.output.mergedModel: true" in card
    no = ServingCheck(False, "vLLM does not yet support DoRA (set lora.useDora: false)")
    assert "**loads in vLLM: no, vLLM does not yet support DoRA" in model_card(
        Card(CFG, METRICS, serving=no)
    )


def test_plots_are_drawn_from_the_log_history_and_embedded(tmp_path: Path) -> None:
    history = History.from_log(
        LOG_HISTORY, tokens_per_second=[(2, 900.0), (4, 1000.0), (8, 1100.0)], base_eval_loss=3.0
    )
    assert history.loss[0] == (1, 2.9)
    assert len(history.loss) == 8
    assert history.eval_loss == [(4, 2.5), (8, 2.26)]  # one point per step, the last
    assert len(history.learning_rate) == 8
    plots = write_plots(history, tmp_path)
    assert [p.path for p in plots] == [
        "plots/loss.png",
        "plots/learning_rate.png",
        "plots/tokens_per_second.png",
    ]
    for plot in plots:
        png = (tmp_path / plot.path).read_bytes()
        assert png.startswith(b"\x89PNG\r\n\x1a\n")
        assert len(png) > 5000  # axes, curves and labels, not an empty canvas
    card = model_card(Card(CFG, METRICS, plots=plots))
    assert "## Training curves\n\n![Training and eval loss](plots/loss.png)" in card


def test_a_series_with_no_points_gets_no_plot(tmp_path: Path) -> None:
    history = History.from_log(
        [{"loss": 2.0, "step": 1}], tokens_per_second=[], base_eval_loss=None
    )
    assert [p.path for p in write_plots(history, tmp_path)] == ["plots/loss.png"]
    assert [p.path for p in write_plots(History(), tmp_path / "empty")] == []
