"""Dataset memory benchmark: peak RSS reading one large generated JSONL file.

Every case runs in its own process (a clean memory peak), on the same file, in the
same run. Each first reads a one-record copy of the file, so what it imports lazily is
loaded; then the peak is reset (Linux VmHWM) and the case reads the file. Reported:
the peak RSS over the RSS before that read (the import cost is reported apart), wall
time and records read.

* ours: what the trainer does before torch loads (`lora_trainer.data.check_source`,
  as `inputs.prepare_inputs` calls it): every record parsed, checked and counted,
  streamed and not kept;
* ours, maxRecords=100: the same with `dataset.maxRecords: 100` (reading stops there);
* ours, tokenized: the check, then the trainer's tokenizing pass (`Source.examples()`
  into `data.tokenize` with the tiny BPE tokenizer): what stays is the token rows,
  whose size is reported beside the peak (4 bytes an id, 1 a mask entry). Tokenizing
  is slow in Python (~1 MiB/s on 2 shared cores), so this case reads a smaller file of
  the same records (`--tokenize-mib`);
* datasets: the peer a user would write, `datasets.load_dataset("json", data_files=...,
  split="train")` with a fresh cache directory;
* datasets, train[:100]: `split="train[:100]"`, the peer's spelling of maxRecords;
* datasets, streaming take(100): `load_dataset(..., streaming=True).take(100)`.

    python -m bench.dataset_memory --size-mib 200 --tokenize-mib 10
"""

# The libraries each case measures are imported inside the worker, after the baseline.
# ruff: noqa: PLC0415

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import REPO_ROOT, add_common_args, format_table, ratio, write_results
from bench.trainer import mixed_length_records

__all__ = ["CASES", "main", "run_case", "write_jsonl"]

_MiB = 2**20
# Case name -> what its row is labelled with.
CASES = {
    "ours": "ours (check pass)",
    "ours_max100": "ours, maxRecords=100",
    "ours_tokenized": "ours, check + tokenize",
    "datasets": 'datasets.load_dataset("json")',
    "datasets_max100": 'datasets.load_dataset(split="train[:100]")',
    "datasets_streaming100": "datasets streaming .take(100)",
}
# Which of our cases each peer is compared with.
_PAIRS = (("ours", "datasets"), ("ours_max100", "datasets_max100"))


def write_jsonl(path: Path, size: int, seed: int = 0) -> int:
    """The trainer benchmark's mixed-length prompt/completion records (up to 600 words)
    until the file has `size` bytes; returns how many records it holds."""
    written = records = 0
    with path.open("w") as fh:
        for batch in itertools.count(seed):
            for record in mixed_length_records(1000, max_words=600, seed=batch):
                line = json.dumps(record) + "\n"
                fh.write(line)
                written += len(line)
                records += 1
                if written >= size:
                    return records
    raise AssertionError("unreachable")


# --- worker: one case in this process ------------------------------------------------


def _rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def _reset_peak() -> None:
    """Start the peak over from the current RSS (Linux: clear_refs 5 resets VmHWM), so
    the peak measured is the case's own, not the imports' (they may peak higher than
    the RSS they leave)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _peak_rss_bytes() -> int:
    """VmHWM (the peak since _reset_peak), else ru_maxrss (the peak since start)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux


def _token_bytes(rows: Any) -> int:
    return sum(len(i) * i.itemsize + len(m) * m.itemsize for i, m in zip(*rows, strict=True))


def run_case(case: str, path: Path, work: Path) -> dict[str, Any]:
    """Measure one case in this process: the case runs once on a one-record file first,
    so modules it imports lazily count as imports, not as its data's memory."""
    start = _rss_bytes()
    tiny = work / "warm-up.jsonl"
    tiny.write_text(path.open().readline())
    tokenizer = None
    if case == "ours_tokenized":
        from devcluster.tiny_model import build_tokenizer

        tokenizer = build_tokenizer()
    if case.startswith("ours"):
        _read_ours(tiny, 100 if case == "ours_max100" else None, tokenizer)
    else:
        _read_datasets(case, tiny, work / "hf-cache-warm-up")
    before = _rss_bytes()
    _reset_peak()
    t0 = time.perf_counter()
    if case.startswith("ours"):
        out = _read_ours(path, 100 if case == "ours_max100" else None, tokenizer)
    else:
        out = _read_datasets(case, path, work / "hf-cache")
    out["seconds"] = time.perf_counter() - t0
    out["file_bytes"] = path.stat().st_size
    out["peak_rss_delta_bytes"] = _peak_rss_bytes() - before
    out["imports_rss_bytes"] = before - start
    return {"case": case, **out}


def _read_ours(path: Path, limit: int | None, tokenizer: Any) -> dict[str, Any]:
    from lora_trainer import data

    checked = data.check_source(path, "auto", limit=limit)
    out: dict[str, Any] = {"records": checked.records}
    if tokenizer is not None:
        rows = data.tokenize(checked.source.examples(), tokenizer, completion_only=True)
        out["tokens"] = rows.num_tokens
        out["token_bytes"] = _token_bytes((rows.input_ids, rows.completion_mask))
    return out


def _read_datasets(case: str, path: Path, cache: Path) -> dict[str, Any]:
    import datasets

    datasets.disable_progress_bars()
    files = str(path)
    if case == "datasets_streaming100":
        stream = datasets.load_dataset("json", data_files=files, split="train", streaming=True)
        return {"records": sum(1 for _ in stream.take(100))}
    split = "train[:100]" if case == "datasets_max100" else "train"
    loaded = datasets.load_dataset("json", data_files=files, split=split, cache_dir=str(cache))
    return {"records": len(loaded)}


# --- driver --------------------------------------------------------------------------


def _run_worker(case: str, path: Path, work: Path) -> dict[str, Any]:
    result = work / f"{case}.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.dataset_memory", "--worker", case, str(path), str(result)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"case {case} failed:\n{proc.stderr[-4000:]}")
    doc: dict[str, Any] = json.loads(result.read_text())
    return doc


def _table(cases: dict[str, dict[str, Any]]) -> str:
    rows = []
    for name, label in CASES.items():
        if name not in cases:
            continue
        c = cases[name]
        tokens = c.get("token_bytes")
        rows.append(
            [
                label,
                c["file_bytes"] / _MiB,
                c["records"],
                c["peak_rss_delta_bytes"] / _MiB,
                c["peak_rss_delta_bytes"] / c["file_bytes"],
                None if tokens is None else tokens / _MiB,
                c["seconds"],
            ]
        )
    headers = ["case", "file MiB", "records", "peak RSS MiB", "x file", "token rows MiB", "seconds"]
    return format_table(headers, rows)


def main(argv: list[str] | None = None) -> int:
    args_in = sys.argv[1:] if argv is None else argv
    if args_in[:1] == ["--worker"]:
        case, data_file, result = args_in[1:4]
        with tempfile.TemporaryDirectory(prefix="bench-dsmem-") as scratch:
            doc = run_case(case, Path(data_file), Path(scratch))
        Path(result).write_text(json.dumps(doc, indent=2))
        return 0
    parser = argparse.ArgumentParser(
        prog="python -m bench.dataset_memory",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_args(parser)
    parser.add_argument("--size-mib", type=float, default=200.0, help="JSONL file size")
    parser.add_argument(
        "--tokenize-mib",
        type=float,
        default=10.0,
        help="size of the (smaller) file the tokenizing case reads: tokenizing is ~1 MiB/s "
        "on a shared 2-core machine; 0 skips the case",
    )
    args = parser.parse_args(args_in)
    if args.quick:
        args.size_mib, args.tokenize_mib = 2.0, 0.5
    chosen = [c for c in CASES if args.tokenize_mib > 0 or c != "ours_tokenized"]
    with tempfile.TemporaryDirectory(prefix="bench-dsmem-") as tmp_name:
        work = Path(tmp_name)
        path = work / "train.jsonl"
        t0 = time.perf_counter()
        records = write_jsonl(path, int(args.size_mib * _MiB))
        file_bytes = path.stat().st_size
        print(
            f"generated {file_bytes / _MiB:.0f} MiB, {records:,} records in "
            f"{time.perf_counter() - t0:.1f}s",
            file=sys.stderr,
        )
        small = work / "tokenize.jsonl"
        if args.tokenize_mib > 0:
            write_jsonl(small, int(args.tokenize_mib * _MiB))
        cases = {}
        for case in chosen:
            print(f"running {case} ...", file=sys.stderr, flush=True)
            cases[case] = _run_worker(case, small if case == "ours_tokenized" else path, work)
    comparison = {
        f"{ours}_vs_{peer}_peak_rss": ratio(
            cases[ours]["peak_rss_delta_bytes"], cases[peer]["peak_rss_delta_bytes"]
        )
        for ours, peer in _PAIRS
    }
    print(_table(cases))
    print(
        "\npeak RSS = growth over the RSS before the read (imports and a warm-up read "
        "excluded); "
        "ours vs datasets (lower is better): "
        + ", ".join(
            f"{k.removesuffix('_peak_rss')} {v:.3g}x"
            for k, v in comparison.items()
            if v is not None
        )
    )
    write_results(
        "dataset_memory",
        {
            "params": {
                "file_bytes": file_bytes,
                "records": records,
                "tokenize_file_mib": args.tokenize_mib,
                "format": "prompt_completion JSONL, bench.trainer.mixed_length_records(max_words=600)",
                "peer": 'datasets.load_dataset("json", data_files=..., split=...)',
            },
            "cases": cases,
            "comparison": comparison,
        },
        args.results_dir,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
