"""Everything a run reads, fetched and checked before the training stack is imported.

Missing sources, bad credentials and bad records are the common failures; with
this step first they surface in seconds instead of after importing torch and
loading the model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from lora_trainer import data
from lora_trainer.config import TrainerConfig
from lora_trainer.errors import SourceNotFound
from lora_trainer.progress import ProgressBoard
from lora_trainer.storage import Storage

__all__ = ["Inputs", "prepare_inputs"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Inputs:
    model_dir: Path
    format: str
    train: list[data.Example]
    eval: list[data.Example]


def prepare_inputs(cfg: TrainerConfig, storage: Storage, board: ProgressBoard) -> Inputs:
    board.update(stage="downloading")
    ds = cfg.dataset
    # Data first: it is small, and a bad record should not wait for a model download.
    records = data.load_records(_fetch(storage, ds.uri, "dataset.uri"), limit=ds.max_records)
    fmt, _ = data.convert(records[:1], ds.format)  # "auto" is resolved from record 1
    if ds.eval_uri:
        train_records = records
        eval_records = data.load_records(_fetch(storage, ds.eval_uri, "dataset.evalUri"))
    else:
        train_records, eval_records = data.split_records(records, ds.eval_split, cfg.training.seed)
    _, train = data.convert(train_records, fmt)
    _, evals = data.convert(eval_records, fmt) if eval_records else (fmt, [])

    model_dir = _fetch(storage, cfg.model.uri, "model.uri")
    if not (model_dir / "config.json").is_file():
        raise SourceNotFound(
            f"model.uri {cfg.model.uri} holds no Hugging Face model (config.json missing)",
            hint="Point model.uri at a directory saved with save_pretrained (config.json, "
            "*.safetensors, tokenizer files).",
        )
    log.info("inputs: %d training and %d eval records (%s format)", len(train), len(evals), fmt)
    return Inputs(model_dir=model_dir, format=fmt, train=train, eval=evals)


def _fetch(storage: Storage, uri: str, field: str) -> Path:
    """storage.fetch, with the spec field named when the source is missing."""
    try:
        return storage.fetch(uri, repo_type="model" if field == "model.uri" else "dataset")
    except SourceNotFound as e:
        raise SourceNotFound(f"{field}: {e.message}", hint=e.hint) from e
