"""Trainer benchmark (CUDA): Llama-3-8B-shaped QLoRA, ours vs TRL's defaults and best.

A randomly initialised model with Llama-3-8B's shape (hidden 4096, 32 layers,
32 heads, 8 KV heads, intermediate 14336, vocab 128256) is written as bf16
safetensors shards, one tensor at a time (drawn on the GPU, so writing the 16 GB
takes about as long as the disk needs; the whole model is never in memory), then
each recipe loads it in 4-bit NF4 through bitsandbytes exactly as it would a real
checkpoint. maxSeqLength 1024, records like Open Assistant's (bench.trainer's
`oasst1` distribution). The recipes are bench/trainer_worker.py's (ours,
trl_defaults, trl_best with Liger kernels when liger_kernel is installed) at 1 GPU,
and again at all the machine's GPUs (torchrun, DDP, the same per-GPU batch) when it
has more than one. Peak memory is `torch.cuda.max_memory_allocated()` (the largest
over the ranks).

Without CUDA it prints why, writes `{"skipped": ...}` and exits 0.

    python -m bench.trainer_gpu [--steps 10] [--batch-size 2] [--model-dir /scratch/llama8b]
    python -m bench.trainer_gpu --quick    # a small model of the same family, seconds

On one H200 the default run is sized for ~6 minutes: writing the model ~1 min, then
each of the three runs ~1.5 min (loading and quantizing 8B dominates; 10 steps).
"""

# torch/transformers are imported where used: --help and the skip path stay light.
# ruff: noqa: PLC0415

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from bench.common import add_common_args, write_results
from bench.trainer import (
    DISTRIBUTIONS,
    length_records,
    length_stats,
    run_worker,
    summarize,
    table,
    write_jsonl,
)
from bench.trainer_worker import Job

__all__ = ["LLAMA3_8B", "main", "write_random_llama"]

# Llama-3-8B's architecture (config.json of meta-llama/Meta-Llama-3-8B).
LLAMA3_8B: dict[str, Any] = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rope_theta": 500000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}
_SHARD_BYTES = 4 * 2**30
GIB_TARGET = 12.0


def write_random_llama(
    out_dir: Path, arch: dict[str, Any], seed: int = 0, device: str = "cpu"
) -> Path:
    """A Llama checkpoint with random bf16 weights (std 0.02, norms 1), written shard by
    shard, plus the tiny test tokenizer (its ids fit in any vocab >= 1024). `device`:
    where the numbers are drawn (a GPU draws 8B of them in seconds, a CPU in minutes)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from devcluster.tiny_model import build_tokenizer

    if (out_dir / "model.safetensors.index.json").is_file():
        return out_dir  # reuse a model written by an earlier run
    tokenizer = build_tokenizer()
    config = LlamaConfig(
        **arch,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="bfloat16",
    )
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(config).state_dict().items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device=device).manual_seed(seed)
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    size = total = 0
    names: list[list[str]] = [[]]

    def flush() -> None:
        nonlocal shard, size
        if shard:
            file = f"model-{len(names):05d}.safetensors"
            save_file(shard, str(out_dir / file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, file))
            names.append([])
        shard, size = {}, 0

    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            tensor = torch.ones(shape, dtype=torch.bfloat16)
        else:
            drawn = torch.empty(shape, dtype=torch.bfloat16, device=device)
            tensor = drawn.normal_(0.0, 0.02, generator=gen).cpu()
        shard[name] = tensor
        nbytes = tensor.numel() * tensor.element_size()
        size += nbytes
        total += nbytes
        if size >= _SHARD_BYTES:
            flush()
    flush()
    # Shard names carry their index only; rename to the usual -of-N form.
    count = len(names) - 1
    renamed = {}
    for i in range(1, count + 1):
        old = out_dir / f"model-{i:05d}.safetensors"
        new = f"model-{i:05d}-of-{count:05d}.safetensors"
        old.rename(out_dir / new)
        renamed[old.name] = new
    index = {
        "metadata": {"total_size": total},
        "weight_map": {k: renamed[v] for k, v in weight_map.items()},
    }
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


RECIPES_GPU = ("ours", "trl_defaults", "trl_best")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.trainer_gpu",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_args(parser)
    parser.add_argument("--max-seq-length", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=2, help="per GPU")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--records", type=int, default=400)
    parser.add_argument("--eval-records", type=int, default=24)
    parser.add_argument("--snapshots", type=int, default=2)
    parser.add_argument("--distribution", default="oasst1", choices=sorted(DISTRIBUTIONS))
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="where the random 8B checkpoint (~16 GB) is written and reused "
        "(default: a temp dir, removed afterwards)",
    )
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        reason = "no CUDA device (torch.cuda.is_available() is False)"
        print(f"skipped: {reason}; the GPU trainer benchmark needs an NVIDIA GPU")
        write_results("trainer_gpu", {"skipped": reason}, args.results_dir)
        return 0
    from transformers import AutoTokenizer

    arch = dict(LLAMA3_8B)
    if args.quick:  # same shape family, small enough for any GPU in seconds
        arch |= {
            "hidden_size": 256,
            "intermediate_size": 512,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        }
        args.steps, args.records, args.max_seq_length, args.eval_records = 2, 32, 128, 4
    gpus = torch.cuda.device_count()
    rank_counts = [1] if gpus == 1 else [1, gpus]
    dist = DISTRIBUTIONS[args.distribution]
    mem_key = "cuda_max_allocated_bytes"
    by_ranks: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-trainer-gpu-") as tmp_name:
        tmp = Path(tmp_name)
        model_dir = write_random_llama(args.model_dir or tmp / "model", arch, device="cuda")
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        train = length_records(dist, args.records, tokenizer, seed=0)
        held_out = length_records(dist, args.eval_records, tokenizer, seed=1)
        write_jsonl(tmp / "train.jsonl", train)
        write_jsonl(tmp / "eval.jsonl", held_out)
        base = Job(
            recipe="ours",
            model_dir=str(model_dir),
            data_path=str(tmp / "train.jsonl"),
            eval_path=str(tmp / "eval.jsonl"),
            snapshots=args.snapshots,
            work_dir=str(tmp),
            max_seq_length=args.max_seq_length,
            batch_size=args.batch_size,
            grad_accum=args.grad_accum,
            steps=args.steps,
        )
        for ranks in rank_counts:
            runs = {}
            for recipe in RECIPES_GPU:
                print(f"  {recipe}, {ranks} GPU(s) ...", file=sys.stderr, flush=True)
                job = replace(base, recipe=recipe, work_dir=str(tmp / f"{recipe}-{ranks}"))
                if ranks > 1:  # the eval curve is a 1-GPU comparison; N GPUs: throughput
                    job = replace(job, eval_path=None, snapshots=0)
                runs[recipe] = run_worker(job, timeout_s=1800, ranks=ranks)
            summary = summarize([runs], mem_key)
            by_ranks[str(ranks)] = {"summary": summary, "runs": runs}
    one = by_ranks["1"]["summary"]["recipes"]["ours"]
    ours_gib = one[mem_key]["median"] / 2**30
    result = {
        "quick": args.quick,
        "device": torch.cuda.get_device_name(),
        "gpus": gpus,
        "params": {k: v for k, v in vars(args).items() if k != "results_dir"},
        "model": {"architecture": arch, "weights": "random, bf16 file, loaded NF4 + double quant"},
        "distribution": asdict(dist),
        "lengths": length_stats(train, tokenizer, args.max_seq_length),
        "by_ranks": by_ranks,
        "ours_peak_gib_1_gpu": ours_gib,
        "within_12_gib": ours_gib <= GIB_TARGET,
        "scaling": {
            "ranks": rank_counts,
            "ours_tokens_per_s": {
                r: v["summary"]["recipes"]["ours"]["real_tokens_per_s"]["median"]
                for r, v in by_ranks.items()
            },
        },
        "targets": {
            "effective_tokens_per_s_over_trl_defaults_min": 1.5,
            "effective_tokens_per_s_over_trl_best_min": 1.0,
            "peak_memory_ratio_max": 1.0,
            "ours_peak_gib_max": GIB_TARGET,
            "two_gpus_speedup_min": 1.7,
        },
    }
    for count, res in by_ranks.items():
        print(f"\n{count} GPU(s), {arch['num_hidden_layers']} layers, hidden {arch['hidden_size']}")
        print(table(res["summary"], mem_key))
    path = write_results("trainer_gpu", result, args.results_dir)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
