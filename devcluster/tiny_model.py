"""Offline tiny models and datasets for tests, the demo and the benchmarks.

Everything here runs in seconds on a laptop CPU without network access:

    from devcluster.tiny_model import build_tiny_model, write_dataset

    model_dir = build_tiny_model(tmp / "model")            # HF model dir (safetensors)
    data = write_dataset(tmp / "train.jsonl", "alpaca", n=64)

The model is a real `LlamaForCausalLM` built with `from_config` (random weights),
the tokenizer a byte-level BPE trained on the fly on the same synthetic language
the datasets use, with a ChatML chat template so the `messages` format works.
"""

# torch/transformers/pyarrow are imported where used: importing the harness stays cheap.
# ruff: noqa: PLC0415

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "CHAT_TEMPLATE",
    "DatasetFormat",
    "build_tiny_model",
    "build_tokenizer",
    "corpus",
    "make_records",
    "write_dataset",
]

DatasetFormat = Literal["text", "alpaca", "messages", "prompt_completion"]

# ChatML. `{% generation %}` marks assistant text for tools that use it.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "<|im_start|>assistant\n{% generation %}{{ message['content'] }}<|im_end|>\n{% endgeneration %}"
    "{% else %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]

_COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
_THINGS = ["apple", "leaf", "sky", "sun", "grape", "carrot", "night", "snow"]
_ANSWER = dict(
    zip(
        _THINGS,
        ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"],
        strict=True,
    )
)
_WORDS = ["the", "a", "is", "of", "and", "what", "color", "tell", "me", "please", "answer"]


def _qa(rng: random.Random) -> tuple[str, str]:
    thing = rng.choice(_THINGS)
    return f"What color is the {thing}?", f"The {thing} is {_ANSWER[thing]}."


def corpus(n_lines: int = 400, seed: int = 0) -> Iterator[str]:
    """Synthetic text in the datasets' language (a few KB), for training the tokenizer."""
    rng = random.Random(seed)
    for _ in range(n_lines):
        q, a = _qa(rng)
        filler = " ".join(rng.choice(_WORDS + _COLORS + _THINGS) for _ in range(8))
        yield f"{q} {a} {filler}"
    # The Alpaca prompt (as rendered by lora_trainer.data) and chat roles, so
    # those formats tokenize into reasonably short sequences too.
    for _ in range(50):
        yield (
            "Below is an instruction that describes a task, paired with an input that provides "
            "further context. Write a response that appropriately completes the request.\n\n"
            "### Instruction:\nAnswer the question.\n\n### Input:\n### Response:\n"
        )
        yield "system user assistant"


def build_tokenizer(vocab_size: int = 1024) -> Any:
    """A byte-level BPE tokenizer (transformers fast tokenizer) with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        bos_token="<|endoftext|>",
        pad_token="<|pad|>",
        unk_token=None,
        model_max_length=512,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(
    out_dir: Path,
    *,
    hidden_size: int = 64,
    layers: int = 2,
    vocab_size: int = 1024,
    seed: int = 0,
) -> Path:
    """Write a tiny random LlamaForCausalLM + tokenizer to `out_dir` (safetensors)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)  # safetensors by default
    tokenizer.save_pretrained(out_dir)
    return out_dir


def make_records(fmt: DatasetFormat, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """`n` records of the colour question/answer task in the given format."""
    rng = random.Random(seed)
    out: list[dict[str, Any]] = []
    for _ in range(n):
        q, a = _qa(rng)
        if fmt == "text":
            out.append({"text": f"{q} {a}"})
        elif fmt == "alpaca":
            out.append({"instruction": "Answer the question.", "input": q, "output": a})
        elif fmt == "messages":
            out.append(
                {
                    "messages": [
                        {"role": "system", "content": "Answer the question."},
                        {"role": "user", "content": q},
                        {"role": "assistant", "content": a},
                    ]
                }
            )
        elif fmt == "prompt_completion":
            out.append({"prompt": q + " ", "completion": a})
        else:
            raise ValueError(f"unknown format {fmt!r}")
    return out


def write_dataset(
    path: Path,
    fmt: DatasetFormat,
    n: int = 64,
    *,
    seed: int = 0,
    records: list[dict[str, Any]] | None = None,
) -> Path:
    """Write records to `path`; the suffix picks the file type (.jsonl, .json, .parquet)."""
    rows = records if records is not None else make_records(fmt, n, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".parquet":
        import pyarrow as pa  # type: ignore[import-untyped]
        import pyarrow.parquet as pq  # type: ignore[import-untyped]

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        raise ValueError(
            f"unsupported dataset suffix {path.suffix!r}; use .jsonl, .json or .parquet"
        )
    return path
