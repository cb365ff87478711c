"""Trainer benchmark (CPU): our trainer vs TRL's SFTTrainer, defaults and best setup.

Four recipes (bench/trainer_worker.py: ours, ours_bf16, trl_defaults, trl_best) train
the same model file on the same records for the same number of optimizer steps with
the same batch, LoRA shape, NF4 base, learning rate and seed; each run is its own
process (its memory peak is its own), and the recipes run interleaved (A, B, C, D, A,
B, ...) over the repeats so that load from other processes hits each alike. Medians
and spread over the repeats are reported, for each record-length distribution
(DISTRIBUTIONS: fitted to published dataset statistics, and the issue's case).

* effective tokens/s = non-padding tokens fed to the model / wall time of
  `trainer.train()` (tokens counted from the batches themselves);
* loss tokens/s = tokens that carry a label (completion tokens);
* peak memory = peak RSS of the run minus its RSS once the recipe's libraries are
  imported (the import cost is reported apart);
* eval loss at equal wall time: each run keeps copies of its adapter at evenly spaced
  steps with the training time at which it reached them; after training they are
  evaluated on the same held-out records. Within a repeat, T = the fastest recipe's
  training time, and each recipe's eval loss at T is that of its last copy taken by T.

`--scaling` adds ours at 1 and 2 ranks (torchrun, gloo) with the same global batch.

    python -m bench.trainer                # CPU, ~15 minutes on 2 quiet cores
    python -m bench.trainer --quick        # seconds; the smoke test
    python -m bench.trainer_gpu            # CUDA, Llama-3-8B-shaped, 4-bit
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from bench.common import REPO_ROOT, add_common_args, format_table, ratio, write_results
from bench.trainer_worker import RECIPES, Job

__all__ = [
    "DISTRIBUTIONS",
    "Distribution",
    "eval_at_equal_time",
    "length_records",
    "main",
    "mixed_length_records",
    "run_recipes",
    "run_worker",
    "summarize",
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
# Model shapes (random init, the tiny byte-level tokenizer's 1,024-token vocabulary).
# smollm_4_layers: SmolLM-135M's layer shape (config.json of HuggingFaceTB/SmolLM-135M:
# hidden 576, intermediate 1536, 9 heads, 3 KV heads), 4 of its 30 layers: matmuls as
# wide as the 135M model, at a step time 2 shared cores can repeat.
SHAPES: dict[str, dict[str, Any]] = {
    "smollm_4_layers": {
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 4,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
    },
    # SmolLM-135M's whole shape (30 layers, 49,152-token vocabulary: the output layer
    # is a large, unquantized matmul), its embeddings untied; for the dtype rows.
    "smollm_135m": {
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "vocab_size": 49152,
    },
    "tiny": {
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
    # --quick; hidden 64: bitsandbytes packs 4-bit CPU weights in blocks of 64.
    "quick": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
}
_SHAPE_COMMON = {
    "vocab_size": 1024,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}


@dataclass(frozen=True)
class Distribution:
    """Record lengths in tokens: prompt and completion each log-normal with the given
    mean and log-space sigma, so records are mostly short with a long tail."""

    name: str
    source: str
    prompt_mean: float
    completion_mean: float
    sigma: float
    max_seq_length: int


DISTRIBUTIONS: dict[str, Distribution] = {
    d.name: d
    for d in (
        Distribution(
            name="alpaca",
            source="Alpaca (52,002 records): mean prompt 27.8 and completion 64.6 Llama "
            "tokens, Table 1 of Wang et al. 2023, 'How Far Can Camels Go?' "
            "(arXiv:2306.04751); only means are published, sigma 0.8 is assumed",
            prompt_mean=27.8,
            completion_mean=64.6,
            sigma=0.8,
            # 256, not 512: 9 in 10 records fit, and TRL's one-row padding-free batches
            # cost (batch x maxSeqLength)^2 attention on a CPU (see the README).
            max_seq_length=256,
        ),
        Distribution(
            name="oasst1",
            source="Open Assistant 1 (34,795 records): mean prompt 34.8 and completion "
            "212.5 Llama tokens, same table; sigma 0.8 assumed",
            prompt_mean=34.8,
            completion_mean=212.5,
            sigma=0.8,
            max_seq_length=512,
        ),
        Distribution(
            name="issue_215_of_256",
            source="the issue's case: real text averaging ~215 tokens against a 256 "
            "limit (prompt 60 + completion 150 tokens on average, sigma 0.2: about 1 "
            "record in 10 reaches the limit and is cut)",
            prompt_mean=60.0,
            completion_mean=150.0,
            sigma=0.2,
            max_seq_length=256,
        ),
    )
}


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


def _tokens_per_word(tokenizer: Any, seed: int = 1) -> float:
    rng = random.Random(seed)
    text = " ".join(rng.choice(_WORDS) for _ in range(2000))
    return len(tokenizer(text)["input_ids"]) / 2000


def length_records(
    dist: Distribution, n: int, tokenizer: Any, seed: int = 0
) -> list[dict[str, str]]:
    """`n` prompt/completion records whose token lengths follow `dist` (random words;
    the tokenizer's tokens per word sets how many words)."""
    rng = random.Random(seed)
    per_word = _tokens_per_word(tokenizer)

    def text(mean: float) -> str:
        mu = math.log(mean) - dist.sigma**2 / 2  # log-normal with this mean
        k = max(1, round(rng.lognormvariate(mu, dist.sigma) / per_word))
        return " ".join(rng.choice(_WORDS) for _ in range(k))

    return [
        {"prompt": text(dist.prompt_mean) + "? ", "completion": text(dist.completion_mean) + "."}
        for _ in range(n)
    ]


def write_jsonl(path: Path, records: list[dict[str, str]]) -> Path:
    """`records` as a JSON Lines file at `path`."""
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def length_stats(records: list[dict[str, str]], tokenizer: Any, limit: int) -> dict[str, Any]:
    """Measured token lengths of `records` (prompt + completion), as trained."""
    lengths = sorted(
        len(tokenizer(r["prompt"] + r["completion"])["input_ids"]) + 1 for r in records
    )
    kept = [min(n, limit) for n in lengths]

    def q(p: float) -> int:
        return lengths[min(len(lengths) - 1, int(p * len(lengths)))]

    return {
        "records": len(lengths),
        "mean_tokens": statistics.fmean(lengths),
        "mean_tokens_after_cut": statistics.fmean(kept),
        "p10": q(0.1),
        "p50": q(0.5),
        "p90": q(0.9),
        "max": lengths[-1],
        "over_limit_fraction": sum(n > limit for n in lengths) / len(lengths),
        "limit": limit,
    }


def run_worker(job: Job, timeout_s: float, ranks: int = 1) -> dict[str, Any]:
    """One recipe in a fresh process (`ranks` > 1: under torchrun); its result dict."""
    work = Path(job.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    job_file, result_file = work / "job.json", work / "result.json"
    job_file.write_text(json.dumps(asdict(job)))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT), str(REPO_ROOT / "trainer_image"), env.get("PYTHONPATH", "")]
    )
    launcher = [sys.executable]
    if ranks > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    proc = subprocess.run(
        [*launcher, "-m", "bench.trainer_worker", str(job_file), str(result_file)],
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


def eval_at_equal_time(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Each recipe's eval loss at T = the shortest training time among `runs` (one
    repeat): the loss of its last adapter copy taken by T (step-wise, no interpolation)."""
    curves = {k: r["eval_curve"] for k, r in runs.items() if r.get("eval_curve")}
    if not curves:
        return {}
    t_equal = min(runs[k]["train_s"] for k in curves)
    out: dict[str, Any] = {"time_s": t_equal}
    for recipe, curve in curves.items():
        reached = [p for p in curve if p["time_s"] <= t_equal + 1e-9] or curve[:1]
        out[recipe] = {"eval_loss": reached[-1]["eval_loss"], "step": reached[-1]["step"]}
    return out


def run_recipes(
    job: Job, recipes: tuple[str, ...], repeats: int, timeout_s: float
) -> list[dict[str, dict[str, Any]]]:
    """`recipes` interleaved over `repeats` (A, B, C, A, B, C, ...); results per repeat."""
    out = []
    for rep in range(repeats):
        runs = {}
        for recipe in recipes:
            print(f"  {recipe} (repeat {rep + 1}/{repeats}) ...", file=sys.stderr, flush=True)
            work = str(Path(job.work_dir) / f"{recipe}-{rep}")
            runs[recipe] = run_worker(replace(job, recipe=recipe, work_dir=work), timeout_s)
        out.append(runs)
    return out


_METRICS = (
    "real_tokens_per_s",
    "loss_tokens_per_s",
    "padding_fraction",
    "train_s",
    "train_loss",
    "real_tokens",
    "records",
)


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(repeats: list[dict[str, dict[str, Any]]], mem_key: str) -> dict[str, Any]:
    """Median (and min/max) of each metric per recipe, eval loss at equal wall time,
    and ours' median ratios over each peer."""
    recipes = list(repeats[0])
    equal = [eval_at_equal_time(runs) for runs in repeats]
    per: dict[str, Any] = {}
    for recipe in recipes:
        rows = [runs[recipe] for runs in repeats]
        stats: dict[str, Any] = {
            k: _spread([float(r[k]) for r in rows]) for k in (*_METRICS, mem_key)
        }
        final = [r["eval_curve"][-1]["eval_loss"] for r in rows if r.get("eval_curve")]
        if final:
            stats["final_eval_loss"] = _spread(final)
        at_t = [e[recipe]["eval_loss"] for e in equal if recipe in e]
        if at_t:
            stats["eval_loss_at_equal_time"] = _spread(at_t)
        for key in ("compute_dtype", "mixed_precision", "liger_kernel", "collator"):
            stats[key] = rows[0].get(key)
        stats["first_batch_shapes"] = rows[0]["first_batch_shapes"]
        per[recipe] = stats
    ratios: dict[str, Any] = {}
    for peer in recipes:
        if peer == "ours":
            continue
        o, p = per["ours"], per[peer]
        ratios[peer] = {
            "effective_tokens_per_s": ratio(
                o["real_tokens_per_s"]["median"], p["real_tokens_per_s"]["median"]
            ),
            "loss_tokens_per_s": ratio(
                o["loss_tokens_per_s"]["median"], p["loss_tokens_per_s"]["median"]
            ),
            "peak_memory": ratio(o[mem_key]["median"], p[mem_key]["median"]),
        }
    return {"recipes": per, "ours_over": ratios, "equal_time": equal}


def table(summary: dict[str, Any], mem_key: str) -> str:
    """Medians per recipe (min-max in the JSON) and ours/peer ratios."""
    per = summary["recipes"]
    recipes = list(per)
    mem_label = "peak GPU GiB" if mem_key.startswith("cuda") else "peak RSS delta GiB"
    lines = [
        ("compute dtype", "compute_dtype", 1),
        ("effective tokens/s", "real_tokens_per_s", 1),
        ("loss tokens/s", "loss_tokens_per_s", 1),
        ("padding fraction", "padding_fraction", 1),
        ("train time s", "train_s", 1),
        ("records trained on", "records", 1),
        ("train loss", "train_loss", 1),
        ("final eval loss", "final_eval_loss", 1),
        ("eval loss at equal time", "eval_loss_at_equal_time", 1),
        (mem_label, mem_key, _GiB),
    ]
    rows = []
    for label, key, scale in lines:
        row: list[Any] = [label]
        for r in recipes:
            v = per[r].get(key)
            row.append(v["median"] / scale if isinstance(v, dict) else v)
        rows.append(row)
    for label, key in (
        ("ours/peer effective tok/s", "effective_tokens_per_s"),
        ("ours/peer peak memory", "peak_memory"),
    ):
        rows.append([label, *(summary["ours_over"].get(r, {}).get(key) for r in recipes)])
    return format_table(["median", *recipes], rows)


def _scaling(job: Job, repeats: int, timeout_s: float) -> dict[str, Any]:
    """ours at 1 rank (batch B) and 2 ranks (batch B/2 each): the same global batch."""
    runs: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
    for rep in range(repeats):
        for ranks in (1, 2):
            print(f"  ours, {ranks} rank(s) (repeat {rep + 1}) ...", file=sys.stderr, flush=True)
            j = replace(
                job,
                recipe="ours",
                batch_size=job.batch_size // ranks,
                eval_path=None,
                snapshots=0,
                work_dir=str(Path(job.work_dir) / f"ranks{ranks}-{rep}"),
            )
            runs[ranks].append(run_worker(j, timeout_s, ranks=ranks))
    tps = {r: statistics.median(x["real_tokens_per_s"] for x in v) for r, v in runs.items()}
    return {
        "global_batch": job.batch_size * job.grad_accum,
        "tokens_per_s": {
            str(r): _spread([x["real_tokens_per_s"] for x in v]) for r, v in runs.items()
        },
        "speedup_2_over_1": ratio(tps[2], tps[1]),
        "real_tokens": {str(r): v[0]["real_tokens"] for r, v in runs.items()},
        "cpu_count": os.cpu_count(),
        "threads": "1 rank: torch's default (all cores); 2 ranks: torchrun's OMP_NUM_THREADS=1 each",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.trainer",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_args(parser)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--records", type=int, default=400, help="training records")
    parser.add_argument("--eval-records", type=int, default=48)
    parser.add_argument("--snapshots", type=int, default=4, help="adapter copies evaluated")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--distributions",
        default="alpaca,issue_215_of_256",
        help=f"comma-separated, of {', '.join(DISTRIBUTIONS)}",
    )
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--shape", default="smollm_4_layers", choices=sorted(SHAPES))
    parser.add_argument(
        "--scaling",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also ours at 1 and 2 ranks (gloo), same global batch (default: on, off with --quick)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.records, args.eval_records, args.repeats = 2, 24, 4, 1
        args.shape, args.batch_size, args.snapshots = "quick", 2, 2
        args.distributions = "alpaca"
        args.scaling = bool(args.scaling)
    elif args.scaling is None:
        args.scaling = True
    recipes = tuple(r.strip() for r in args.recipes.split(",") if r.strip())
    unknown = sorted(set(recipes) - set(RECIPES)) + (
        [] if "ours" in recipes else ["(ours missing)"]
    )
    if unknown:
        parser.error(f"--recipes: {unknown}; choose from {', '.join(RECIPES)}, with ours")
    dists = [DISTRIBUTIONS[d.strip()] for d in args.distributions.split(",") if d.strip()]

    from transformers import AutoTokenizer  # noqa: PLC0415 - imports torch

    from bench.trainer_gpu import write_random_llama  # noqa: PLC0415 - it imports this module

    results: dict[str, Any] = {}
    scaling: dict[str, Any] | None = None
    with tempfile.TemporaryDirectory(prefix="bench-trainer-") as tmp_name:
        tmp = Path(tmp_name)
        arch = _SHAPE_COMMON | SHAPES[args.shape]
        model_dir = write_random_llama(tmp / "model", arch)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        for dist in dists:
            max_len = 64 if args.quick else dist.max_seq_length
            work = tmp / dist.name
            work.mkdir()
            train = length_records(dist, args.records, tokenizer, seed=0)
            held_out = length_records(dist, args.eval_records, tokenizer, seed=1)
            write_jsonl(work / "train.jsonl", train)
            write_jsonl(work / "eval.jsonl", held_out)
            job = Job(
                recipe="ours",
                model_dir=str(model_dir),
                data_path=str(work / "train.jsonl"),
                eval_path=str(work / "eval.jsonl"),
                snapshots=args.snapshots,
                work_dir=str(work),
                max_seq_length=max_len,
                batch_size=args.batch_size,
                grad_accum=args.grad_accum,
                steps=args.steps,
            )
            print(f"{dist.name} (maxSeqLength {max_len}):", file=sys.stderr, flush=True)
            repeats = run_recipes(job, recipes, args.repeats, timeout_s=900)
            results[dist.name] = {
                "distribution": asdict(dist),
                "max_seq_length": max_len,
                "lengths": length_stats(train, tokenizer, max_len),
                "summary": summarize(repeats, MEM_KEY),
                "runs": repeats,
            }
            if args.scaling and dist is dists[0]:
                print("scaling:", file=sys.stderr, flush=True)
                scaling = _scaling(job, args.repeats, timeout_s=900)
    result = {
        "quick": args.quick,
        "device": "cpu",
        "params": {k: v for k, v in vars(args).items() if k != "results_dir"},
        "model": {
            "shape": args.shape,
            "architecture": arch,
            "weights": "random (std 0.02), bf16 file, loaded NF4 + double quant",
        },
        "distributions": results,
        "scaling": scaling,
        "targets": {
            "effective_tokens_per_s_over_trl_defaults_min": 1.5,
            "effective_tokens_per_s_over_trl_best_min": 1.0,
            "peak_memory_ratio_max": 1.0,
            "two_ranks_speedup_min_where_cores_allow": 1.7,
        },
    }
    for name, res in results.items():
        lengths = res["lengths"]
        print(
            f"\n{name}: maxSeqLength {res['max_seq_length']}, mean {lengths['mean_tokens']:.0f} "
            f"tokens/record (p50 {lengths['p50']}, p90 {lengths['p90']}), "
            f"{args.repeats} repeat(s), {args.steps} steps, batch {args.batch_size}"
        )
        print(table(res["summary"], MEM_KEY))
    if scaling:
        print(
            f"\nscaling (ours, global batch {scaling['global_batch']}): "
            f"1 rank {scaling['tokens_per_s']['1']['median']:.0f} tok/s, "
            f"2 ranks {scaling['tokens_per_s']['2']['median']:.0f} tok/s, "
            f"{scaling['speedup_2_over_1']:.2f}x"
        )
    path = write_results("trainer_cpu", result, args.results_dir)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
