"""Trainer benchmark (CPU): our trainer vs the plain SFTTrainer recipe, tiny Llama.

Both recipes train the same model file on the same mixed-length records for the
same number of optimizer steps with the same batch size; each run is a separate
process (bench/trainer_worker.py) so its memory peak is its own. Reported:

* effective tokens/s = non-padding tokens fed to the model / wall time of
  `trainer.train()` (tokens counted from the batches themselves);
* loss tokens/s = tokens that carry a label (completion tokens);
* peak memory = peak RSS of the run minus its RSS once the recipe's libraries are
  imported (the import cost is reported apart).

Besides the main row, two memory rows run a few steps each: a wider model
(activations dominate) and a 50,000-record dataset (the data path dominates).

    python -m bench.trainer                # CPU, ~5 minutes (--no-memory-rows: ~2)
    python -m bench.trainer_gpu            # CUDA, Llama-3-8B-shaped, 4-bit
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.common import REPO_ROOT, add_common_args, format_table, ratio, write_results
from bench.trainer_worker import Job

__all__ = [
    "MEMORY_ROWS",
    "compare",
    "compare_recipes",
    "main",
    "mixed_length_records",
    "run_both",
    "run_worker",
    "table",
]

_WORDS = [
    "the",
    "a",
    "is",
    "of",
    "and",
    "what",
    "color",
    "tell",
    "me",
    "please",
    "answer",
    "red",
    "green",
    "blue",
    "yellow",
    "purple",
    "orange",
    "black",
    "white",
    "apple",
    "leaf",
    "sky",
    "sun",
    "grape",
    "carrot",
    "night",
    "snow",
]
_GiB = 2**30
_MiB = 2**20
# Peak RSS growth over the RSS after imports (bench/trainer_worker.py).
MEM_KEY = "peak_rss_delta_bytes"


def mixed_length_records(n: int, max_words: int, seed: int = 0) -> list[dict[str, str]]:
    """`n` prompt/completion records whose lengths are log-uniform: many short, a few
    near the limit, like real instruction data. Prompt 4..max_words*0.7 words,
    completion 2..max_words*0.3 words."""
    rng = random.Random(seed)

    def words(lo: int, hi: int) -> str:
        k = int(math.exp(rng.uniform(math.log(lo), math.log(max(hi, lo + 1)))))
        return " ".join(rng.choice(_WORDS) for _ in range(k))

    return [
        {
            "prompt": words(4, int(max_words * 0.7)) + "? ",
            "completion": words(2, int(max_words * 0.3)) + ".",
        }
        for _ in range(n)
    ]


def run_worker(job: Job, timeout_s: float) -> dict[str, Any]:
    """One recipe in a fresh process; its result dict."""
    work = Path(job.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    job_file, result_file = work / "job.json", work / "result.json"
    job_file.write_text(json.dumps(asdict(job)))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT), str(REPO_ROOT / "trainer_image"), env.get("PYTHONPATH", "")]
    )
    proc = subprocess.run(
        [sys.executable, "-m", "bench.trainer_worker", str(job_file), str(result_file)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"{job.recipe} run failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
        )
    result: dict[str, Any] = json.loads(result_file.read_text())
    return result


def compare(ours: dict[str, Any], plain: dict[str, Any], mem_key: str) -> dict[str, Any]:
    return {
        "effective_tokens_per_s_ratio": ratio(
            ours["real_tokens_per_s"], plain["real_tokens_per_s"]
        ),
        "loss_tokens_per_s_ratio": ratio(ours["loss_tokens_per_s"], plain["loss_tokens_per_s"]),
        "peak_memory_ratio": ratio(ours[mem_key], plain[mem_key]),
        "memory_metric": mem_key,
    }


def table(ours: dict[str, Any], plain: dict[str, Any], mem_key: str) -> str:
    mem_label = "peak GPU GiB" if mem_key.startswith("cuda") else "peak RSS delta GiB"
    metrics = [
        ("steps", "steps"),
        ("records trained on", "records"),
        ("effective tokens", "real_tokens"),
        ("token slots (incl. padding)", "token_slots"),
        ("padding fraction", "padding_fraction"),
        ("train time s", "train_s"),
        ("effective tokens/s", "real_tokens_per_s"),
        ("loss tokens/s", "loss_tokens_per_s"),
        (mem_label, mem_key),
    ]
    rows = []
    for label, key in metrics:
        o, p = ours[key], plain[key]
        if key == mem_key:
            o, p = o / _GiB, p / _GiB
        rows.append([label, o, p, ratio(o, p) if key != "padding_fraction" else None])
    if "imports_rss_bytes" in ours and "imports_rss_bytes" in plain:  # not in the delta
        o, p = ours["imports_rss_bytes"] / _MiB, plain["imports_rss_bytes"] / _MiB
        rows.append(["imports RSS MiB (not in delta)", o, p, ratio(o, p)])
    return format_table(["metric", "ours", "plain SFTTrainer", "ours/plain"], rows)


# Memory-only rows (a few steps each; their throughput is not comparable to the main
# row's): where activations dominate, and where the dataset does.
MEMORY_ROWS: dict[str, dict[str, int]] = {
    "wide_model": {"hidden_size": 768, "layers": 4, "records": 400, "steps": 6},
    "large_dataset": {"hidden_size": 256, "layers": 4, "records": 50_000, "steps": 3},
}


def run_both(
    model_dir: Path,
    rows: list[dict[str, str]],
    work: Path,
    args: argparse.Namespace,
    *,
    steps: int,
    timeout_s: float,
) -> dict[str, dict[str, Any]]:
    """Write `rows` as JSONL, then train the plain recipe and ours on them, each in
    its own worker process (so each memory peak is its own); results by recipe."""
    data_path = work / "train.jsonl"
    data_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    runs = {}
    for recipe in ("plain", "ours"):
        job = Job(
            recipe=recipe,
            model_dir=str(model_dir),
            data_path=str(data_path),
            work_dir=str(work / recipe),
            max_seq_length=args.max_seq_length,
            batch_size=args.batch_size,
            grad_accum=args.grad_accum,
            steps=steps,
        )
        print(f"running {recipe} ({work.name}) ...", file=sys.stderr, flush=True)
        runs[recipe] = run_worker(job, timeout_s=timeout_s)
    return runs


def compare_recipes(
    tmp: Path, args: argparse.Namespace, *, hidden_size: int, layers: int, records: int, steps: int
) -> dict[str, Any]:
    """Both recipes on one model and record set; their results and the comparison."""
    from devcluster.tiny_model import build_tiny_model  # noqa: PLC0415 - imports torch

    tmp.mkdir(parents=True, exist_ok=True)
    model_dir = build_tiny_model(tmp / "model", hidden_size=hidden_size, layers=layers)
    # ~1.3 tokens per word with the tiny tokenizer: the longest records reach the limit.
    rows = mixed_length_records(records, max_words=int(args.max_seq_length * 0.8))
    runs = run_both(model_dir, rows, tmp, args, steps=steps, timeout_s=900)
    return {
        "model": f"tiny Llama, hidden {hidden_size}, {layers} layers, NF4 (bitsandbytes)",
        "records": records,
        "steps": steps,
        "ours": runs["ours"],
        "plain": runs["plain"],
        "comparison": compare(runs["ours"], runs["plain"], MEM_KEY),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.trainer",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_args(parser)
    parser.add_argument("--max-seq-length", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--records", type=int, default=400)
    parser.add_argument("--hidden-size", type=int, default=256, help="tiny Llama width")
    parser.add_argument("--layers", type=int, default=4, help="tiny Llama depth")
    parser.add_argument(
        "--memory-rows",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=f"also run the memory rows {sorted(MEMORY_ROWS)} (~3 min; off with --quick)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.max_seq_length, args.steps, args.records = 64, 2, 32
        args.hidden_size, args.layers, args.batch_size = 32, 1, 2
        args.memory_rows = False

    with tempfile.TemporaryDirectory(prefix="bench-trainer-") as tmp_name:
        tmp = Path(tmp_name)
        main_row = compare_recipes(
            tmp / "main",
            args,
            hidden_size=args.hidden_size,
            layers=args.layers,
            records=args.records,
            steps=args.steps,
        )
        memory_rows = {
            name: compare_recipes(tmp / name, args, **shape)
            for name, shape in (MEMORY_ROWS.items() if args.memory_rows else [])
        }
    result = {
        "quick": args.quick,
        "device": "cpu",
        "params": {k: v for k, v in vars(args).items() if k != "results_dir"},
        "model": main_row["model"],
        "ours": main_row["ours"],
        "plain": main_row["plain"],
        "comparison": main_row["comparison"],
        "memory_rows": memory_rows,
        "targets": {"effective_tokens_per_s_ratio_min": 2.0, "peak_memory_ratio_max": 1.0},
    }
    print(table(main_row["ours"], main_row["plain"], MEM_KEY))
    for name, row in memory_rows.items():
        print(f"\n{name}: {row['model']}, {row['records']} records, {row['steps']} steps")
        print(table(row["ours"], row["plain"], MEM_KEY))
    path = write_results("trainer_cpu", result, args.results_dir)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
