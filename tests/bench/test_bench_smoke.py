"""Every benchmark runs end to end at its smallest size (`--quick`) and writes sane JSON.

The numbers from --quick mean nothing; these tests only keep the scripts from rotting.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from bench import trainer_gpu
from bench.common import REPO_ROOT, format_table, percentile, ratio
from bench.operator_scale import parse_metrics, parse_size
from bench.trainer import (
    DISTRIBUTIONS,
    eval_at_equal_time,
    length_records,
    length_stats,
    mixed_length_records,
)
from devcluster.tiny_model import build_tokenizer


def _run(module: str, results: Path, *extra: str, timeout: float = 300) -> str:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(REPO_ROOT), str(REPO_ROOT / "operator"), str(REPO_ROOT / "trainer_image")]
        ),
    }
    proc = subprocess.run(
        [sys.executable, "-m", module, "--quick", "--results-dir", str(results), *extra],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, f"{module} failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return proc.stdout


def _load(results: Path, name: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((results / f"{name}.json").read_text())
    assert doc["benchmark"] == name
    assert doc["machine"]["cpu_count"] >= 1
    assert doc["machine"]["versions"]["torch"]
    return doc


def test_format_table_aligns_numbers_right_and_text_left() -> None:
    out = format_table(["name", "value"], [["a", 1.5], ["longer", 1234.0], ["c", None]])
    lines = out.splitlines()
    assert lines[0] == "name    value"
    assert lines[2] == "a        1.50"
    assert lines[3] == "longer  1,234"
    assert lines[4] == "c           -"


def test_ratio_and_percentile() -> None:
    assert ratio(4.0, 2.0) == 2.0
    assert ratio(1.0, 0.0) is None
    assert ratio(None, 1.0) is None
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0
    assert percentile([float(i) for i in range(1, 101)], 50) == pytest.approx(50.5)
    assert percentile([float(i) for i in range(1, 101)], 99) == pytest.approx(99.01)


def test_mixed_length_records_span_short_to_long() -> None:
    records = mixed_length_records(300, max_words=400, seed=1)
    lengths = sorted(len((r["prompt"] + r["completion"]).split()) for r in records)
    assert lengths[0] < 20  # plenty of short records ...
    assert lengths[-1] > 150  # ... and some near the limit
    assert lengths[len(lengths) // 2] < 100  # most are short: padding wastes most slots
    assert records == mixed_length_records(300, max_words=400, seed=1)  # deterministic


def test_random_llama_writer_produces_a_loadable_sharded_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The GPU benchmark's 8B model writer, on a tiny shape: from_pretrained loads it."""
    arch = trainer_gpu.LLAMA3_8B | {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 2048,
    }
    monkeypatch.setattr(trainer_gpu, "_SHARD_BYTES", 64 * 1024)  # force several shards
    out = trainer_gpu.write_random_llama(tmp_path / "m", arch)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    assert all((out / s).is_file() for s in shards)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    assert model.config.num_key_value_heads == 2
    weight = model.model.layers[0].self_attn.q_proj.weight
    assert 0.01 < float(weight.detach().float().std()) < 0.03  # random init really happened
    assert float(model.model.norm.weight.detach().float().mean()) == 1.0


@pytest.mark.slow
def test_transfer_quick(tmp_path: Path) -> None:
    out = _run("bench.transfer", tmp_path)
    assert "download" in out
    assert "boto3 default" in out
    doc = _load(tmp_path, "transfer")
    sides = doc["params"]["sides"]
    assert set(sides) == {"ours", "boto3_default", "boto3_tuned"}
    for part in ("download", "upload"):
        for side in sides:
            assert doc[part][side]["median_s"] > 0
            assert doc[part][side]["min_s"] <= doc[part][side]["max_s"]
        for peer in ("boto3_default", "boto3_tuned"):
            assert doc[part]["speedup"][peer]["median"] > 0
    assert doc["cache_hit"]["ours_s"] < doc["download"]["ours"]["median_s"]
    # The limited link really limits: no side beats the cap times the connections it
    # can open (its concurrency, or fewer when the file has fewer parts); load can
    # only make it slower.
    link = doc["limited_link"]
    cap = link["params"]["per_connection_mib_s"]
    sizes = {"download": link["params"]["size_bytes"], "upload": doc["params"]["adapter_bytes"]}
    for part, size in sizes.items():
        for side, p in sides.items():
            streams = min(p["concurrency"], math.ceil(size / p["part_size_bytes"]))
            assert 0 < link[part][side]["mib_s"] <= cap * streams * 1.05, (part, side)
    assert "MiB/s/conn" in out


@pytest.mark.slow
def test_trainer_cpu_quick(tmp_path: Path) -> None:
    out = _run("bench.trainer", tmp_path)
    assert "effective tokens/s" in out
    assert "eval loss at equal time" in out
    doc = _load(tmp_path, "trainer_cpu")
    assert doc["scaling"] is None  # --quick leaves it out unless asked
    (name,) = doc["distributions"]
    res = doc["distributions"][name]
    assert res["distribution"]["source"]  # where the length distribution comes from
    assert res["lengths"]["mean_tokens"] > 0
    (runs,) = res["runs"]
    assert set(runs) == {"ours", "ours_bf16", "trl_defaults", "trl_best"}
    steps, batch = doc["params"]["steps"], doc["params"]["batch_size"]
    assert {r["steps"] for r in runs.values()} == {steps}
    ours, defaults, best = runs["ours"], runs["trl_defaults"], runs["trl_best"]
    # ours: one packed row per pack, padded at the tail only; TRL's padding-free
    # collator joins the micro-batch into one row; its defaults pad to the longest row.
    assert all(s[0] == batch and s[1] <= 64 for s in ours["first_batch_shapes"])
    assert all(s[0] == 1 for s in best["first_batch_shapes"])
    assert best["padding_fraction"] == 0
    assert defaults["padding_fraction"] > ours["padding_fraction"]
    assert ours["real_tokens"] > defaults["real_tokens"]
    # The dtype each recipe trained in: ours float32 on a CPU (auto), the others
    # bfloat16 autocast.
    assert ours["compute_dtype"] == "float32"
    assert ours["mixed_precision"] == "no"
    assert runs["ours_bf16"]["compute_dtype"] == "bfloat16"
    assert runs["ours_bf16"]["mixed_precision"] == "bf16"
    assert defaults["mixed_precision"] == best["mixed_precision"] == "bf16"
    assert best["liger_kernel"].startswith("not run: needs CUDA")
    for run in runs.values():
        curve = run["eval_curve"]
        assert [p["step"] for p in curve] == [0, 1, 2]  # before training, then 2 snapshots
        assert [p["time_s"] for p in curve] == sorted(p["time_s"] for p in curve)
        assert all(math.isfinite(p["eval_loss"]) for p in curve)
        assert 0 < run["loss_tokens"] <= run["real_tokens"]
        assert run["peak_rss_delta_bytes"] > 0
        assert run["imports_rss_bytes"] > 0
    summary = res["summary"]
    equal = summary["equal_time"][0]
    assert equal["time_s"] == min(r["train_s"] for r in runs.values())
    assert set(summary["ours_over"]) == {"ours_bf16", "trl_defaults", "trl_best"}
    assert summary["ours_over"]["trl_best"]["effective_tokens_per_s"] > 0


@pytest.mark.slow
def test_trainer_scaling_quick(tmp_path: Path) -> None:
    out = _run("bench.trainer", tmp_path, "--recipes", "ours", "--scaling")
    assert "scaling (ours, global batch 2)" in out
    scaling = _load(tmp_path, "trainer_cpu")["scaling"]
    assert scaling["global_batch"] == 2
    assert scaling["tokens_per_s"]["1"]["median"] > 0
    assert scaling["tokens_per_s"]["2"]["median"] > 0
    assert scaling["speedup_2_over_1"] > 0


def test_eval_at_equal_time_takes_each_recipes_last_copy_by_the_fastest_finish() -> None:
    def run(train_s: float, points: list[tuple[float, int, float]]) -> dict[str, Any]:
        curve = [{"time_s": t, "step": s, "eval_loss": loss} for t, s, loss in points]
        return {"train_s": train_s, "eval_curve": curve}

    runs = {
        "fast": run(10.0, [(0, 0, 5.0), (5, 2, 4.0), (10, 4, 3.0)]),
        "slow": run(20.0, [(0, 0, 5.0), (9.9, 2, 4.5), (10.1, 3, 4.2), (20, 4, 3.1)]),
    }
    equal = eval_at_equal_time(runs)
    assert equal["time_s"] == 10.0
    assert equal["fast"] == {"eval_loss": 3.0, "step": 4}
    assert equal["slow"] == {"eval_loss": 4.5, "step": 2}


def test_length_records_follow_the_distribution() -> None:
    tokenizer = build_tokenizer()
    dist = DISTRIBUTIONS["issue_215_of_256"]
    records = length_records(dist, 200, tokenizer)
    stats = length_stats(records, tokenizer, dist.max_seq_length)
    assert 180 < stats["mean_tokens"] < 250  # the issue's ~215
    assert stats["p10"] < stats["p50"] < stats["p90"]


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the skip path; with CUDA the benchmark runs"
)
def test_trainer_gpu_skips_cleanly_without_cuda(tmp_path: Path) -> None:
    out = _run("bench.trainer_gpu", tmp_path)
    assert "skipped" in out
    assert "no CUDA" in _load(tmp_path, "trainer_gpu")["skipped"]


@pytest.mark.slow
def test_operator_scale_quick(tmp_path: Path) -> None:
    out = _run("bench.operator_scale", tmp_path)
    assert "ceiling" in out
    doc = _load(tmp_path, "operator_scale")
    assert doc["api_server_writes_per_s"] > 0
    assert "real kube-apiserver v1." in doc["peer"]["api_server"]
    burst, paced = doc["sizes"]
    for size in (burst, paced):
        assert size["jobs_with_pod"] == size["jobs_running"] == size["jobs"]
        assert size["create_to_pod"]["p99_s"] > 0
        assert size["operator_peak_rss_mib"] > 10
        assert size["operator_cpu_s"] > 0
        assert size["ceiling"]["writes_per_s"] > 0
        assert size["control_plane_cpu_s"]["kube-apiserver"] > 0
        # Counted at the API server: at least the job's create and its pod's create.
        assert size["api_writes_per_job_by_resource"]["lorajobs"] >= 1
        assert size["api_writes_per_job_by_resource"]["pods"] >= 1
        assert size["operator_requests_per_job"] > 0
        assert set(size["operator_throttled"]) == {"client", "server", "client_wait_s"}
    assert burst["rate_per_s"] is None
    assert paced["rate_per_s"] == 50
    # 5 jobs at 50/s: the last is created 4/50 s after the first, not at once.
    assert paced["create_s"] >= 4 / 50
    assert "50/s" in out
    assert "burst" in out


def test_operator_scale_sizes_are_bursts_or_rates() -> None:
    assert parse_size("1000") == (1000, None)
    assert parse_size(" 1000@40 ") == (1000, 40.0)
    for bad in ("many", "1000@", "0", "10@-1", "10@x"):
        with pytest.raises(ValueError, match="--sizes"):
            parse_size(bad)


def test_operator_scale_reads_prometheus_samples() -> None:
    text = (
        "# HELP apiserver_request_total Counter\n"
        'apiserver_request_total{code="201",resource="pods",verb="POST"} 12\n'
        'apiserver_request_total{code="429",resource="pods",verb="PATCH"} 3\n'
        "apiserver_request_totally_other 5\n"
        'lorajob_api_throttled_total{reason="client"} 7.0\n'
    )
    names = frozenset({"apiserver_request_total", "lorajob_api_throttled_total"})
    assert parse_metrics(text, names) == [
        ("apiserver_request_total", {"code": "201", "resource": "pods", "verb": "POST"}, 12.0),
        ("apiserver_request_total", {"code": "429", "resource": "pods", "verb": "PATCH"}, 3.0),
        ("lorajob_api_throttled_total", {"reason": "client"}, 7.0),
    ]


@pytest.mark.slow
def test_suite_runner_quick_runs_the_chosen_parts(tmp_path: Path) -> None:
    out = _run("bench", tmp_path, "--only", "operator_scale,trainer_gpu")
    assert "total" in out
    assert (tmp_path / "operator_scale.json").is_file()
    assert not (tmp_path / "transfer.json").exists()


def test_dataset_memory_quick(tmp_path: Path) -> None:
    out = _run("bench.dataset_memory", tmp_path)
    assert 'datasets.load_dataset("json")' in out
    doc = _load(tmp_path, "dataset_memory")
    cases = doc["cases"]
    assert set(cases) == {
        "ours",
        "ours_max100",
        "ours_tokenized",
        "datasets",
        "datasets_max100",
        "datasets_streaming100",
    }
    everything = doc["params"]["records"]
    assert cases["ours"]["records"] == cases["datasets"]["records"] == everything > 100
    for limited in ("ours_max100", "datasets_max100", "datasets_streaming100"):
        assert cases[limited]["records"] == 100
    for case in cases.values():
        assert case["peak_rss_delta_bytes"] >= 0
        assert case["seconds"] > 0
    tokenized = cases["ours_tokenized"]
    assert tokenized["tokens"] > 0
    assert tokenized["token_bytes"] == tokenized["tokens"] * 5  # int32 id + int8 mask
    assert set(doc["comparison"]) == {
        "ours_vs_datasets_peak_rss",
        "ours_max100_vs_datasets_max100_peak_rss",
    }
