"""Trainer benchmark (CUDA): Llama-3-8B-shaped QLoRA, our trainer vs the plain recipe.

A randomly initialised model with Llama-3-8B's shape (hidden 4096, 32 layers,
32 heads, 8 KV heads, intermediate 14336, vocab 128256) is written as bf16
safetensors shards, one tensor at a time (nothing is downloaded and the whole
model is never in memory), then both recipes load it in 4-bit NF4 through
bitsandbytes exactly as they would a real checkpoint. maxSeqLength 1024.
Peak memory is `torch.cuda.max_memory_allocated()` of each run's process.

Without CUDA it prints why, writes `{"skipped": ...}` and exits 0.

    python -m bench.trainer_gpu [--steps 20] [--batch-size 2] [--model-dir /scratch/llama8b]
"""

# torch/transformers are imported where used: --help and the skip path stay light.
# ruff: noqa: PLC0415

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.common import add_common_args, write_results
from bench.trainer import compare, mixed_length_records, run_both, table

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


def write_random_llama(out_dir: Path, arch: dict[str, Any], seed: int = 0) -> Path:
    """A Llama checkpoint with random bf16 weights (std 0.02, norms 1), written shard by
    shard, plus the tiny test tokenizer (its ids fit in any vocab >= 1024)."""
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
    gen = torch.Generator().manual_seed(seed)
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
            tensor = torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, 0.02, generator=gen)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.trainer_gpu",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_args(parser)
    parser.add_argument("--max-seq-length", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--records", type=int, default=600)
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

    arch = dict(LLAMA3_8B)
    if args.quick:  # same shape family, small enough for any GPU in seconds
        arch |= {
            "hidden_size": 256,
            "intermediate_size": 512,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        }
        args.steps, args.records, args.max_seq_length = 2, 32, 128

    with tempfile.TemporaryDirectory(prefix="bench-trainer-gpu-") as tmp_name:
        tmp = Path(tmp_name)
        model_dir = write_random_llama(args.model_dir or tmp / "model", arch)
        records = mixed_length_records(args.records, max_words=int(args.max_seq_length * 0.8))
        runs = run_both(model_dir, records, tmp, args, steps=args.steps, timeout_s=3600)
    mem_key = "cuda_max_allocated_bytes"
    ours_gib = runs["ours"][mem_key] / 2**30
    result = {
        "quick": args.quick,
        "device": runs["ours"].get("gpu"),
        "params": {k: v for k, v in vars(args).items() if k != "results_dir"},
        "model": {"architecture": arch, "weights": "random, bf16 file, loaded NF4 + double quant"},
        "ours": runs["ours"],
        "plain": runs["plain"],
        "comparison": compare(runs["ours"], runs["plain"], mem_key)
        | {"ours_peak_gib": ours_gib, "within_12_gib": ours_gib <= GIB_TARGET},
        "targets": {
            "effective_tokens_per_s_ratio_min": 2.0,
            "peak_memory_ratio_max": 1.0,
            "ours_peak_gib_max": GIB_TARGET,
        },
    }
    print(table(runs["ours"], runs["plain"], mem_key))
    path = write_results("trainer_gpu", result, args.results_dir)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
