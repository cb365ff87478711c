"""Training data: read files, detect and check the record format, tokenize with loss masks.

Formats (one per dataset; `auto` detects it from the first record, then every
record must fit it):

* text               {"text": "..."}                              loss on every token
* alpaca             {"instruction", "input"?, "output"}          loss on the response
* messages           {"messages": [{"role", "content"}, ...]}     loss on assistant turns
                     (ShareGPT {"conversations": [{"from", "value"}]} is accepted too)
* prompt_completion  {"prompt", "completion"}                     loss on the completion

Tokenization happens here rather than in TRL so the loss mask is exact for any
chat template: each assistant turn's character span is found by rendering the
conversation up to that turn, and tokens are masked by their character offsets.
TRL then receives `input_ids` + `completion_mask` (lora_trainer.hf.to_dataset) and
builds labels, packs and collates. This module imports nothing of the training stack.
A record that does not fit raises a `DatasetError` naming the file and record number
and what is wrong with it, or, with `dataset.invalidRecords: skip`, is skipped and
counted.

Files are streamed, never held: a `Source` is read record by record on every pass
(one to check it, one to tokenize it), and reading stops at `dataset.maxRecords`.
What the trainer keeps is the tokenized rows. Only a `.json` file (one JSON document)
is parsed whole; large datasets belong in JSONL or Parquet.
"""

from __future__ import annotations

import json
import logging
import random
import re
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lora_trainer.errors import DatasetError

__all__ = [
    "ALPACA_PROMPT",
    "ALPACA_PROMPT_NO_INPUT",
    "Checked",
    "Example",
    "Record",
    "Source",
    "TokenizedData",
    "check_source",
    "convert",
    "convert_record",
    "detect_format",
    "held_out",
    "iter_records",
    "load_records",
    "tokenize",
]

log = logging.getLogger(__name__)

Format = Literal["text", "alpaca", "messages", "prompt_completion"]
SUPPORTED_SUFFIXES = (".jsonl", ".json", ".parquet")
ROLES = ("system", "user", "assistant", "tool")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
_SHAREGPT_ROLES |= {"system": "system", "tool": "tool"}

# The Stanford Alpaca prompt, the de-facto standard for this record shape.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


# What a JSON Lines file must look like, for a line that does not parse.
JSON_LINES_HINT = (
    "Each line of a .jsonl file must be one complete JSON object: keys and strings in "
    "double quotes, no trailing commas, no line breaks inside a record (json.dumps of "
    "each record, one per line, writes it so)."
)
# Skipped records whose reason is logged one by one; the rest are only counted.
LOGGED_SKIPS = 10


@dataclass(frozen=True)
class Record:
    """One raw record and where it came from (for error messages)."""

    data: Any
    file: str
    number: int  # 1-based within its file (the line number for JSONL)
    error: str | None = None  # why the record could not be read (e.g. invalid JSON)

    @property
    def where(self) -> str:
        return f"{self.file} record {self.number}"


@dataclass(frozen=True)
class Example:
    """A record in one canonical shape: a prompt/completion pair, text, or a chat."""

    text: str | None = None
    prompt: str | None = None
    completion: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None
    where: str = ""  # "train.jsonl record 12", for errors found while tokenizing


@dataclass
class TokenizedData:
    """Token ids and loss masks (1 = the token counts in the loss), one row per record.

    `tokenize` stores each row as a compact `array` (4 bytes a token id, 1 a mask
    entry) rather than a list of Python ints (~36 and 8 bytes): at millions of tokens
    the lists cost gigabytes of RSS that the allocator keeps for the rest of the run.
    Any int sequences work (the tests use lists).
    """

    input_ids: list[Sequence[int]] = field(default_factory=list)
    completion_mask: list[Sequence[int]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(len(ids) for ids in self.input_ids)

    def drop_unlearnable(self, max_length: int) -> int:
        """Drop rows with no loss token within the first `max_length` tokens; returns how many.

        Longer rows are truncated to `max_length` when trained, so a record whose
        prompt alone fills it would only cost compute and teach nothing.
        """
        keep = [i for i, m in enumerate(self.completion_mask) if any(m[:max_length])]
        dropped = len(self.input_ids) - len(keep)
        self.input_ids = [self.input_ids[i] for i in keep]
        self.completion_mask = [self.completion_mask[i] for i in keep]
        return dropped

    def split(self, held: frozenset[int]) -> tuple[TokenizedData, TokenizedData]:
        """(rows not in `held`, rows in `held`), by row index; the rows are not copied."""
        kept, out = TokenizedData(), TokenizedData()
        for i, (ids, mask) in enumerate(zip(self.input_ids, self.completion_mask, strict=True)):
            part = out if i in held else kept
            part.input_ids.append(ids)
            part.completion_mask.append(mask)
        return kept, out

    def count_longer_than(self, max_length: int) -> int:
        return sum(1 for ids in self.input_ids if len(ids) > max_length)


# --- reading files ---------------------------------------------------------------


def iter_records(path: Path) -> Iterator[Record]:
    """The records of one file, or of every supported file in a directory (sorted), read
    as they are needed: a JSONL line or a Parquet batch at a time."""
    for f in _data_files(path):
        yield from _read_file(f, root=path if path.is_dir() else f.parent)


def load_records(path: Path, *, limit: int | None = None) -> list[Record]:
    """The first `limit` (or all) records, in a list: for small files and the tests;
    the trainer streams a `Source` instead."""
    out: list[Record] = []
    for record in iter_records(path):
        if limit is not None and len(out) >= limit:
            break
        out.append(record)
    if not out:
        raise DatasetError(f"{path.name}: the dataset has no records")
    return out


def _data_files(path: Path) -> list[Path]:
    if path.is_file():
        if path.suffix not in SUPPORTED_SUFFIXES:
            raise DatasetError(
                f"{path.name}: unsupported file type {path.suffix!r}",
                hint="Use .jsonl, .json or .parquet files.",
            )
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUPPORTED_SUFFIXES)
    # A dataset repository often ships its splits side by side (data/train-*.parquet,
    # data/test-*.parquet): train on the train split only.
    train = [p for p in files if _split_of(p.relative_to(path)) == "train"]
    if train:
        files = train
    if not files:
        raise DatasetError(
            f"no .jsonl, .json or .parquet files under {path.name}/",
            hint="Point spec.dataset.uri at a data file or a prefix that contains some.",
        )
    return files


_SPLIT_RE = re.compile(r"(?:^|[/_.\-])(train|test|validation|valid|eval|dev)(?=[/_.\-]|$)")


def _split_of(rel: Path) -> str | None:
    """The split a file's path names ("train", "test", ...), if any."""
    found = _SPLIT_RE.findall(rel.as_posix().lower())
    return found[-1] if found else None


def _read_file(f: Path, root: Path) -> Iterator[Record]:
    name = f.relative_to(root).as_posix() if f.is_relative_to(root) else f.name
    if f.suffix == ".parquet":
        yield from _read_parquet(f, name)
    elif f.suffix == ".json":
        yield from _read_json(f, name)
    else:
        yield from _read_json_lines(f, name)


# Rows converted to Python objects at a time from a Parquet file.
_PARQUET_BATCH_ROWS = 1024


def _read_parquet(f: Path, name: str) -> Iterator[Record]:
    import pyarrow.parquet as pq  # type: ignore[import-untyped]  # noqa: PLC0415

    try:
        batches = pq.ParquetFile(f).iter_batches(batch_size=_PARQUET_BATCH_ROWS)
        number = 0
        for batch in batches:
            for row in batch.to_pylist():
                number += 1
                yield Record(row, name, number)
    except DatasetError:
        raise
    except Exception as e:  # pyarrow's errors share no base class we could name
        raise DatasetError(f"{name}: not a readable Parquet file ({e})") from e


def _read_json(f: Path, name: str) -> Iterator[Record]:
    """One JSON document (a list of records, or {"data": [...]}), parsed whole; JSON
    Lines saved as .json are streamed as JSON Lines."""
    try:
        with f.open("rb") as fh:
            data = json.load(fh)
    except UnicodeDecodeError as e:
        raise DatasetError(f"{name}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON Lines saved as .json
            yield from _read_json_lines(f, name)
            return
        raise DatasetError(
            f"{name}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}",
            hint='A .json dataset is one JSON document: a list of records or {"data": [...]}.',
        ) from e
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DatasetError(
            f'{name}: a .json dataset must be a list of records (or {{"data": [...]}})'
        )
    for i, row in enumerate(data, 1):
        yield Record(row, name, i)


def _read_json_lines(f: Path, name: str) -> Iterator[Record]:
    with f.open("rb") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            yield _parse_line(line, name, lineno)


def _parse_line(line: bytes, name: str, lineno: int) -> Record:
    try:
        return Record(json.loads(line), name, lineno)
    except UnicodeDecodeError as e:
        error = f"{name} line {lineno}: not UTF-8 text ({e.reason} at byte {e.start} of the line)"
    except json.JSONDecodeError as e:
        error = (
            f"{name} line {lineno}, column {e.colno}: invalid JSON ({e.msg}); each line "
            "must be one JSON object"
        )
    return Record(None, name, lineno, error=error)


# --- formats ---------------------------------------------------------------------


def detect_format(data: Any) -> Format | None:
    """The format a record's keys say it is in, or None."""
    if not isinstance(data, dict):
        return None
    if "messages" in data or "conversations" in data:
        return "messages"
    if "instruction" in data and "output" in data:
        return "alpaca"
    if "prompt" in data and "completion" in data:
        return "prompt_completion"
    if "text" in data:
        return "text"
    return None


def convert(records: Sequence[Record], fmt: str) -> tuple[Format, list[Example]]:
    """Check every record against the format (detected if "auto") and convert it."""
    if not records:
        raise DatasetError("the dataset has no records")
    resolved: Format | None = detect_format(records[0].data) if fmt == "auto" else fmt  # type: ignore[assignment]
    if resolved is None:
        first = records[0]
        _raise_unreadable(first)
        raise DatasetError(f"{first.where}: cannot detect the format from keys {_keys(first.data)}")
    return resolved, [convert_record(r, resolved) for r in records]


def convert_record(record: Record, fmt: Format) -> Example:
    """One record as an Example of `fmt`; DatasetError naming the record if it does not fit."""
    _raise_unreadable(record)
    return _CONVERTERS[fmt](record)


def _raise_unreadable(record: Record) -> None:
    if record.error is not None:
        raise DatasetError(record.error, hint=JSON_LINES_HINT)


def _keys(data: Any) -> str:
    if isinstance(data, dict):
        return str(sorted(data))
    return f"(a JSON {type(data).__name__}, not an object)"


def _need_str(r: Record, key: str, fmt: str, *, allow_empty: bool = False) -> str:
    if not isinstance(r.data, dict):
        raise DatasetError(
            f"{r.where}: expected a JSON object in {fmt} format, got {_keys(r.data)}"
        )
    value = r.data.get(key)
    if not isinstance(value, str) or (not allow_empty and not value.strip()):
        got = "missing" if key not in r.data else f"{type(value).__name__} {value!r}"[:80]
        raise DatasetError(
            f"{r.where}: {fmt} format needs {key!r} as a non-empty string ({got}); "
            f"record keys: {_keys(r.data)}"
        )
    return value


def _text(r: Record) -> Example:
    return Example(text=_need_str(r, "text", "text"), where=r.where)


def _alpaca(r: Record) -> Example:
    instruction = _need_str(r, "instruction", "alpaca")
    output = _need_str(r, "output", "alpaca")
    inp = r.data.get("input") or ""
    if not isinstance(inp, str):
        raise DatasetError(f"{r.where}: alpaca 'input' must be a string, got {type(inp).__name__}")
    template = ALPACA_PROMPT if inp.strip() else ALPACA_PROMPT_NO_INPUT
    return Example(
        prompt=template.format(instruction=instruction, input=inp), completion=output, where=r.where
    )


def _prompt_completion(r: Record) -> Example:
    prompt = _need_str(r, "prompt", "prompt_completion")
    completion = _need_str(r, "completion", "prompt_completion")
    return Example(prompt=prompt, completion=completion, where=r.where)


def _messages(r: Record) -> Example:
    data = r.data
    if not isinstance(data, dict):
        raise DatasetError(
            f"{r.where}: expected a JSON object in messages format, got {_keys(data)}"
        )
    sharegpt = "messages" not in data and "conversations" in data
    turns = data.get("conversations" if sharegpt else "messages")
    if not isinstance(turns, list) or not turns:
        raise DatasetError(f"{r.where}: 'messages' must be a non-empty list of {{role, content}}")
    out: list[tuple[str, str]] = []
    for i, turn in enumerate(turns):
        role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
        if not isinstance(turn, dict):
            raise DatasetError(f"{r.where}: message {i} is not an object")
        role, content = turn.get(role_key), turn.get(content_key)
        if sharegpt and isinstance(role, str):
            role = _SHAREGPT_ROLES.get(role, role)
        if role not in ROLES:
            raise DatasetError(
                f"{r.where}: message {i} has role {role!r}; use one of {', '.join(ROLES)}"
            )
        if not isinstance(content, str):
            raise DatasetError(f"{r.where}: message {i} needs {content_key!r} as a string")
        out.append((role, content))
    if not any(role == "assistant" for role, _ in out):
        raise DatasetError(f"{r.where}: the conversation has no assistant message to learn from")
    return Example(messages=tuple(out), where=r.where)


_CONVERTERS = {
    "text": _text,
    "alpaca": _alpaca,
    "prompt_completion": _prompt_completion,
    "messages": _messages,
}


@dataclass(frozen=True)
class Source:
    """A dataset (a file or a directory of files) in a known format, read afresh by every
    pass: `examples()` streams it, so a pass holds one record at a time."""

    path: Path
    format: Format
    skip_invalid: bool = False  # dataset.invalidRecords: skip
    limit: int | None = None  # dataset.maxRecords: stop after this many usable records

    def examples(self, on_skip: Callable[[DatasetError], None] | None = None) -> Iterator[Example]:
        """The usable records as Examples, in file order; a record that does not fit
        raises, or with `skip_invalid` is passed to `on_skip` and left out."""
        used = 0
        for record in iter_records(self.path):
            if self.limit is not None and used >= self.limit:
                return  # nothing after the limit is read
            try:
                example = convert_record(record, self.format)
            except DatasetError as e:
                if not self.skip_invalid:
                    raise
                if on_skip is not None:
                    on_skip(e)
                continue
            used += 1
            yield example


@dataclass(frozen=True)
class Checked:
    """A Source that was read through once: every record fits (or was skipped)."""

    source: Source
    records: int  # usable records (at most the limit)
    skipped: int  # records left out as invalid


def check_source(
    path: Path, fmt: str, *, skip_invalid: bool = False, limit: int | None = None
) -> Checked:
    """Resolve the format ("auto": from the first record, or with `skip_invalid` the
    first readable one) and read the whole dataset once, record by record, to check and
    count it. Raises DatasetError for the first bad record (unless skipped) and for a
    dataset with no usable record."""
    resolved = _detected_format(path, skip_invalid) if fmt == "auto" else fmt
    source = Source(path, resolved, skip_invalid, limit)  # type: ignore[arg-type]
    skips: list[DatasetError] = []

    def skipped(error: DatasetError) -> None:
        if len(skips) < LOGGED_SKIPS:
            log.warning("skipping an invalid record (dataset.invalidRecords=skip): %s", error)
        skips.append(error)

    records = sum(1 for _ in source.examples(on_skip=skipped))
    if skips:
        log.warning("skipped %d invalid records of %s", len(skips), path.name)
    if not records:
        if skips:
            raise DatasetError(
                f"{path.name}: no usable record; all {len(skips)} were invalid, the first: "
                f"{skips[0].message}"
            )
        raise DatasetError(f"{path.name}: the dataset has no records")
    return Checked(source, records, len(skips))


def _detected_format(path: Path, skip_invalid: bool) -> Format:
    """The format of the first record (of the first one whose keys name a format, when
    invalid records are skipped)."""
    for record in iter_records(path):
        found = None if record.error is not None else detect_format(record.data)
        if found is not None:
            return found
        if not skip_invalid:
            _raise_unreadable(record)
            raise DatasetError(
                f"{record.where}: cannot detect the format from keys {_keys(record.data)}"
            )
    raise DatasetError(
        f"{path.name}: no record has the keys of a known format"
        if skip_invalid
        else f"{path.name}: the dataset has no records"
    )


def held_out(n: int, fraction: float, seed: int) -> frozenset[int]:
    """Indices of the `n` records held out for evaluation: deterministic (the same on
    every attempt of a job), at least one and never all of them; none for fraction 0."""
    if fraction <= 0 or n < 2:
        return frozenset()
    order = array("q", range(n))  # 8 bytes an index, not a Python int each
    random.Random(seed).shuffle(order)  # the same order a list would get
    n_eval = min(n - 1, max(1, round(n * fraction)))
    return frozenset(order[:n_eval])


# --- tokenization ------------------------------------------------------------------

_ZERO, _ONE = array("b", [0]), array("b", [1])  # mask rows: _ONE * n


def tokenize(
    examples: Iterable[Example], tokenizer: Any, *, completion_only: bool
) -> TokenizedData:
    """input_ids (EOS-terminated) and completion_mask (1 = token counts in the loss)."""
    out = TokenizedData()
    warned = False
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DatasetError(
            "the model's tokenizer has no eos_token",
            hint="Use a tokenizer with an EOS token: the model must learn where answers end.",
        )
    for ex in examples:
        if ex.messages is not None:
            chat_ids, chat_mask, exact = _tokenize_chat(ex.messages, tokenizer, ex.where)
            ids, mask = array("i", chat_ids), array("b", chat_mask)
            if not exact and not warned:
                log.warning(
                    "the chat template does not render conversations prefix-stably; "
                    "training on whole conversations instead of assistant turns only"
                )
                warned = True
        elif ex.text is not None:
            ids = array("i", _encode(tokenizer, ex.text, special=True))
            ids.append(eos)
            mask = _ONE * len(ids)
        else:
            assert ex.prompt is not None
            assert ex.completion is not None
            prompt_ids = array("i", _encode(tokenizer, ex.prompt, special=True))
            completion_ids = array("i", _encode(tokenizer, ex.completion, special=False))
            completion_ids.append(eos)
            ids = prompt_ids + completion_ids
            mask = _ZERO * len(prompt_ids) + _ONE * len(completion_ids)
        if not completion_only:
            mask = _ONE * len(ids)
        out.input_ids.append(ids)
        out.completion_mask.append(mask)
    return out


def _encode(tokenizer: Any, text: str, *, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _render(
    tokenizer: Any, messages: Sequence[tuple[str, str]], *, gen_prompt: bool, where: str
) -> str:
    try:
        rendered = tokenizer.apply_chat_template(
            [{"role": r, "content": c} for r, c in messages],
            tokenize=False,
            add_generation_prompt=gen_prompt,
        )
    except Exception as e:  # jinja2 raises whatever the template's raise_exception says
        raise DatasetError(
            f"{where}: the model's chat template rejected this conversation: {e}",
            hint="Many templates require alternating user/assistant turns, optionally after "
            "one leading system message.",
        ) from e
    return str(rendered)


def _tokenize_chat(
    messages: Sequence[tuple[str, str]], tokenizer: Any, where: str
) -> tuple[list[int], list[int], bool]:
    """Tokenize a conversation; mask = assistant turns. `exact` False = fell back to all."""
    if not getattr(tokenizer, "chat_template", None):
        raise DatasetError(
            "the messages format needs a chat template, and the model's tokenizer has none",
            hint="Use an instruct/chat model whose tokenizer_config.json has a chat_template, "
            "or convert the records to prompt/completion.",
        )
    full = _render(tokenizer, messages, gen_prompt=False, where=where)
    spans: list[tuple[int, int]] = []
    exact = True
    for i, (role, _) in enumerate(messages):
        if role != "assistant":
            continue
        before = _render(tokenizer, messages[:i], gen_prompt=True, where=where) if i else ""
        upto = _render(tokenizer, messages[: i + 1], gen_prompt=False, where=where)
        if not (full.startswith(upto) and upto.startswith(before)):
            exact = False
            break
        spans.append((len(before), len(upto)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=exact)
    ids = list(enc["input_ids"])
    if not exact:
        return ids, [1] * len(ids), False
    mask = [
        1 if any(start < e and end > s for s, e in spans) else 0
        for start, end in enc["offset_mapping"]
    ]
    return ids, mask, True
