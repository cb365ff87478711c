"""Everything a run reads, fetched and checked before the training stack is imported.

Missing sources, bad credentials and bad records are the common failures; with
this step first they surface in seconds instead of after importing torch and
loading the model. The model folder is checked here too (a config, tokenizer files,
a context long enough for training.maxSeqLength), from its JSON files alone.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraops_contract.config import TrainerConfig

from lora_trainer import data
from lora_trainer.errors import ConfigError, SourceNotFound
from lora_trainer.progress import ProgressBoard
from lora_trainer.storage import Storage

__all__ = ["Inputs", "check_model_dir", "model_context", "prepare_inputs"]

log = logging.getLogger(__name__)

# A tokenizer's vocabulary comes in one of these files (tokenizers' JSON, SentencePiece,
# BPE or WordPiece vocabularies, tiktoken); a folder with none of them has no tokenizer.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "vocab.txt",
    "tokenizer.tiktoken",
)
# Config keys that hold a model's context length (positions), by architecture family.
CONTEXT_KEYS = (
    "max_position_embeddings",
    "n_positions",
    "max_sequence_length",
    "seq_length",
    "n_ctx",
)


@dataclass(frozen=True)
class Inputs:
    """The checked inputs: the model folder and the datasets, which are streamed again
    when tokenized rather than held (see data.Source)."""

    model_dir: Path
    train: data.Source
    eval: data.Source | None = None  # dataset.evalUri
    eval_rows: frozenset[int] = frozenset()  # rows of `train` held out for evaluation
    skipped_records: int = 0  # invalid records left out (dataset.invalidRecords: skip)

    @property
    def format(self) -> str:
        return self.train.format


def prepare_inputs(cfg: TrainerConfig, storage: Storage, board: ProgressBoard) -> Inputs:
    board.update(stage="downloading")
    ds = cfg.dataset
    skip = ds.invalid_records == "skip"
    # Data first: it is small, and a bad record should not wait for a model download.
    train = data.check_source(
        _fetch(storage, ds.uri, "dataset.uri"), ds.format, skip_invalid=skip, limit=ds.max_records
    )
    evals: data.Checked | None = None
    eval_rows: frozenset[int] = frozenset()
    if ds.eval_uri:
        # The train file's format ("auto" is resolved from it) applies to both.
        path = _fetch(storage, ds.eval_uri, "dataset.evalUri")
        evals = data.check_source(path, train.source.format, skip_invalid=skip)
    else:
        eval_rows = data.held_out(train.records, ds.eval_split, cfg.training.seed)
    skipped = train.skipped + (evals.skipped if evals else 0)
    if skipped:
        board.update(skipped_records=skipped)

    model_dir = _fetch(storage, cfg.model.uri, "model.uri")
    check_model_dir(cfg, model_dir)
    n_eval = evals.records if evals else len(eval_rows)
    log.info(
        "inputs: %d training and %d eval records (%s format), %d invalid records skipped",
        train.records - len(eval_rows),
        n_eval,
        train.source.format,
        skipped,
    )
    return Inputs(
        model_dir=model_dir,
        train=train.source,
        eval=evals.source if evals else None,
        eval_rows=eval_rows,
        skipped_records=skipped,
    )


def check_model_dir(cfg: TrainerConfig, model_dir: Path) -> None:
    """A folder the trainer can load: config.json, tokenizer files, and a context at
    least training.maxSeqLength long. Permanent errors naming the field: retrying
    cannot add a file or lengthen a context."""
    config = _model_config(cfg, model_dir)
    _check_tokenizer_files(cfg, model_dir)
    _check_context(cfg, config)


def _model_config(cfg: TrainerConfig, model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not path.is_file():
        raise SourceNotFound(
            f"model.uri {cfg.model.uri} holds no Hugging Face model (config.json missing)",
            hint="Point model.uri at a directory saved with save_pretrained (config.json, "
            "*.safetensors, tokenizer files).",
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SourceNotFound(
            f"model.uri {cfg.model.uri}: config.json is not readable JSON ({e})"
        ) from e
    if not isinstance(config, dict):
        raise SourceNotFound(f"model.uri {cfg.model.uri}: config.json is not a JSON object")
    return config


def _check_tokenizer_files(cfg: TrainerConfig, model_dir: Path) -> None:
    if any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        return
    if _custom_tokenizer(model_dir):
        return  # the repository's own code loads it (trustRemoteCode), from files we can't know
    raise SourceNotFound(
        f"model.uri {cfg.model.uri} holds no tokenizer: none of {', '.join(TOKENIZER_FILES)} "
        "is there",
        hint="Save the tokenizer next to the model (tokenizer.save_pretrained(<model dir>)) "
        "and upload it with the weights: the trainer tokenizes the data with it, and the "
        "adapter is published with it.",
    )


def _custom_tokenizer(model_dir: Path) -> bool:
    try:
        config = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "auto_map" in config


def _check_context(cfg: TrainerConfig, config: dict[str, Any]) -> None:
    found = model_context(config)
    wanted = cfg.training.max_seq_length
    if found is not None and wanted > found[1]:
        key, context = found
        raise ConfigError(
            f"training.maxSeqLength={wanted} is longer than the model's context of {context} "
            f"positions ({key} in the config.json of model.uri {cfg.model.uri})",
            hint=f"Set spec.training.maxSeqLength to {context} or less, or use a model with "
            "a longer context.",
        )


def model_context(config: dict[str, Any]) -> tuple[str, int] | None:
    """(config key, positions) of a model's context length, from its config.json: the
    top level first, then a multimodal model's text config; None when it names none."""
    for section in (config, config.get("text_config")):
        if not isinstance(section, dict):
            continue
        for key in CONTEXT_KEYS:
            value = section.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return key, value
    return None


def _fetch(storage: Storage, uri: str, field: str) -> Path:
    """storage.fetch, with the spec field named when the source is missing."""
    try:
        return storage.fetch(uri, repo_type="model" if field == "model.uri" else "dataset")
    except SourceNotFound as e:
        raise SourceNotFound(f"{field}: {e.message}", hint=e.hint) from e
