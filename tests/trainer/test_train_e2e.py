"""End to end on the CPU: QLoRA (4-bit NF4) against a real S3 server, then use the adapter.

One run covers: a LoRAJob manifest run locally with `--job` (S3 endpoint taken from
spec.storage), model + data from S3, live progress over HTTP, loss going down,
checkpoints, upload with the manifest last, the merged model, and a termination
message without secrets. The adapter is then reloaded onto the base model and
generates, and the merged model computes the same logits.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from loraops_contract.config import TrainerConfig, run_id
from loraops_contract.protocol import ExitCode
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from devcluster.s3 import S3Server
from devcluster.tiny_model import write_dataset
from tests.trainer.trainer_proc import reaped, start_trainer

pytestmark = pytest.mark.slow

MAX_STEPS = 12


def _job(s3: S3Server) -> dict[str, Any]:
    return {
        "apiVersion": "finetune.loraops.dev/v1alpha1",
        "kind": "LoRAJob",
        "metadata": {"name": "e2e", "namespace": "tests"},
        "spec": {
            "model": {"uri": "s3://models/tiny-e2e"},
            "dataset": {"uri": "s3://data/e2e/alpaca.jsonl", "evalSplit": 0.1},
            "lora": {"r": 8, "alpha": 16},
            "quantization": {"mode": "nf4"},
            "training": {
                "maxSteps": MAX_STEPS,
                "batchSize": 4,
                "gradientAccumulationSteps": 1,
                "learningRate": 5e-3,
                "maxSeqLength": 128,
                "warmupRatio": 0.0,
                "checkpointEverySteps": 5,
                "gradientCheckpointing": True,
            },
            # Kept, to check them below (by default they go once the adapter is complete).
            "output": {"uri": "s3://out/e2e/adapter", "mergedModel": True, "keepCheckpoints": True},
            # Kubernetes-only fields: ignored by --job, except the S3 endpoint.
            "resources": {"gpus": 0},
            "storage": {"endpoint": s3.endpoint, "region": "us-east-1"},
            "backoffLimit": 1,
        },
    }


def _download(s3: S3Server, prefix: str, dest: Path) -> dict[str, bytes]:
    client = s3.client()
    files = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket="out", Prefix=prefix + "/"):
        for item in page.get("Contents", []):
            name = item["Key"][len(prefix) + 1 :]
            body = client.get_object(Bucket="out", Key=item["Key"])["Body"].read()
            files[name] = body
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            (dest / name).write_bytes(body)
    return files


def test_qlora_on_s3_end_to_end(s3: S3Server, tiny_model_dir: Path, tmp_path: Path) -> None:
    s3.upload_dir(tiny_model_dir, "models", "tiny-e2e")
    data = write_dataset(tmp_path / "alpaca.jsonl", "alpaca", n=96)
    s3.client().upload_file(str(data), "data", "e2e/alpaca.jsonl")
    job = tmp_path / "lorajob.yaml"
    job.write_text(yaml.safe_dump(_job(s3)))
    creds = {k: v for k, v in s3.env().items() if k != "AWS_ENDPOINT_URL"}

    run = start_trainer(["--job", str(job)], creds, tmp_path / "work")
    seen: list[dict[str, Any]] = []

    def training_reported() -> bool:
        p = run.progress()
        if p and p.get("stage") == "training" and p.get("step", 0) > 0:
            seen.append(p)
            return True
        return False

    with reaped(run):
        run.wait_until(training_reported, timeout=180)
        rc, log, term = run.finish()
    assert rc == ExitCode.OK, log[-4000:]

    # Live progress had the fields the operator shows.
    p = seen[-1]
    assert p["totalSteps"] == MAX_STEPS
    assert "loss" in p
    assert "learningRate" in p

    # Termination message: success summary with the adapter's identity.
    assert term is not None
    assert term["outcome"] == "Succeeded"
    assert term["steps"] == MAX_STEPS
    assert term["adapter"]["uri"] == "s3://out/e2e/adapter"
    assert term["tokensPerSecond"] > 0
    assert term["evalLoss"] > 0

    # No secret in the log or the termination message.
    assert s3.secret_key not in log
    assert s3.secret_key not in json.dumps(term)

    # Everything listed in the manifest is there, with matching sizes and hashes.
    out = tmp_path / "adapter"
    files = _download(s3, "e2e/adapter", out)
    manifest = json.loads(files["manifest.json"])
    listed = {f["path"]: f for f in manifest["files"]}
    for required in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "README.md",
        "metrics.json",
        "merged/config.json",
    ):
        assert required in listed, required
    for path, entry in listed.items():
        assert len(files[path]) == entry["size"]
        assert hashlib.sha256(files[path]).hexdigest() == entry["sha256"]
    assert term["adapter"]["sha256"] == listed["adapter_model.safetensors"]["sha256"]
    assert term["adapter"]["files"] == len(listed)
    assert "training_args.bin" not in files

    # Checkpoints were saved along the way (complete, and pruned to the newest two).
    client = s3.client()
    keys = [
        o["Key"]
        for o in client.list_objects_v2(Bucket="out", Prefix="e2e/adapter/checkpoints/")["Contents"]
    ]
    markers = sorted(k for k in keys if k.endswith("/COMPLETE"))
    # A local run: the first attempt in this output, under its run's namespace.
    spec = _job(s3)["spec"]
    cfg = TrainerConfig.model_validate(
        {k: spec[k] for k in TrainerConfig.model_fields if k in spec}
    )
    run_prefix = f"e2e/adapter/checkpoints/run-{run_id(cfg)}"
    assert markers == [
        f"{run_prefix}/attempt-1/checkpoint-10/COMPLETE",
        f"{run_prefix}/attempt-1/checkpoint-12/COMPLETE",
    ]

    # The loss went down.
    metrics = json.loads(files["metrics.json"])
    losses = [loss for _, loss in metrics["loss_history"]]
    assert len(losses) >= MAX_STEPS
    assert min(losses[-3:]) < losses[0] - 0.2, losses
    assert metrics["eval_loss"] < losses[0]

    # The adapter loads onto the base model and generates; merged == base + adapter.
    tokenizer = AutoTokenizer.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, out).eval()
    prompt = tokenizer("What color is the sky?", return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(**prompt, max_new_tokens=8, do_sample=False)  # type: ignore[no-untyped-call]
        adapted_logits = model(**prompt).logits
        with model.disable_adapter():
            base_logits = model(**prompt).logits
    assert generated.shape[1] > prompt["input_ids"].shape[1]
    assert not torch.allclose(adapted_logits, base_logits, atol=1e-4)  # training changed something
    merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32).eval()  # type: ignore[no-untyped-call]
    with torch.no_grad():
        merged_logits = merged(**prompt).logits
    torch.testing.assert_close(merged_logits, adapted_logits, atol=1e-3, rtol=1e-3)
