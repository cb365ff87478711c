"""A LoRAJob from `kubectl apply` to an adapter that PEFT loads, plus the secret scan."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from devcluster.tools import kubectl
from tests.e2e.conftest import BUCKET, JOB_TIMEOUT_S, Cluster, sha256


def test_job_succeeds_and_the_adapter_loads_with_peft(cluster: Cluster, tmp_path: Path) -> None:
    cluster.create_secret()
    manifest = cluster.manifest("happy")
    # `kubectl wait` is what users script against: started while the job runs, it must
    # return 0 once the Succeeded condition is True.
    cluster.apply(manifest)
    waiter = subprocess.Popen(
        [
            str(kubectl()),
            "--kubeconfig",
            str(cluster.cp.kubeconfig),
            "wait",
            "--for=condition=Succeeded",
            "lj/happy",
            f"--timeout={int(JOB_TIMEOUT_S)}s",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        status = cluster.wait_phase("happy", "Succeeded")
        out, err = waiter.communicate(timeout=60)
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.communicate()
    assert waiter.returncode == 0, err
    assert "condition met" in out

    # Status: one attempt, final progress, conditions, the adapter's identity.
    assert status["attempts"] == 1
    assert status.get("failedAttempts", 0) == 0
    max_steps = manifest["spec"]["training"]["maxSteps"]
    assert status["progress"]["step"] == status["progress"]["totalSteps"] == max_steps
    assert status["progress"]["loss"] > 0
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Succeeded"]["status"] == "True"
    assert conditions["Accepted"]["status"] == "True"
    adapter = status["adapter"]
    assert adapter["uri"] == f"s3://{BUCKET}/adapters/happy"

    # The adapter in S3: manifest.json written last lists every file with its hash.
    local = cluster.download("adapters/happy", tmp_path / "adapter")
    listed = json.loads((local / "manifest.json").read_text())["files"]
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {e["path"] for e in listed}
    for entry in listed:
        data = (local / entry["path"]).read_bytes()
        assert len(data) == entry["size"], entry["path"]
        assert sha256(data) == entry["sha256"], entry["path"]
    weights = (local / "adapter_model.safetensors").read_bytes()
    assert sha256(weights) == adapter["sha256"]
    assert len(weights) == adapter["size"]
    # Once the manifest vouched for the adapter, the checkpoints went (keepCheckpoints is
    # off by default) and status names none; the adapter names its base model by its URI.
    assert not [k for k in cluster.s3_objects("adapters/happy/") if "/checkpoints/" in k]
    assert "lastCheckpoint" not in status
    config = json.loads((local / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == manifest["spec"]["model"]["uri"]
    # The pod's CPU limit (resources.cpu: "1") reached the trainer as its torch threads.
    assert cluster.cp.kubelet is not None
    log = cluster.cp.kubelet.pod_log("default", status["podName"])
    assert "torch threads: 1 (the pod's CPU limit)" in log, log[-2000:]

    # It is a PEFT adapter for the base model: load it, check it was trained, run it.
    # (Imported here: collecting the suite must not pay for the training stack.)
    import torch  # noqa: PLC0415
    from peft import PeftModel  # noqa: PLC0415
    from safetensors.torch import load_file  # noqa: PLC0415
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    assert config["peft_type"] == "LORA"
    assert config["r"] == 8
    tensors = load_file(str(local / "adapter_model.safetensors"))
    lora_b = [t for name, t in tensors.items() if "lora_B" in name]
    assert lora_b, "no LoRA B matrices in the adapter"
    # B starts at zero in LoRA: any non-zero B means the optimizer actually stepped.
    assert any(bool(t.abs().sum() > 0) for t in lora_b)
    base = AutoModelForCausalLM.from_pretrained(cluster.inputs.model_dir)
    model = PeftModel.from_pretrained(base, str(local))
    tokenizer = AutoTokenizer.from_pretrained(str(local))
    batch = tokenizer("What colour is the sky?", return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape[:2] == batch["input_ids"].shape
    assert bool(torch.isfinite(logits).all())

    # What users see with kubectl.
    table = cluster.kubectl("get", "lj", "happy").stdout
    assert "Succeeded" in table
    events = cluster.kubectl(
        "get", "events", "--field-selector", "involvedObject.name=happy", "-o", "json"
    ).stdout
    reasons = {e["reason"] for e in json.loads(events)["items"]}
    assert {"PodCreated", "Completed"} <= reasons, reasons

    # Issue #5: the credentials appear nowhere the operator or the trainer wrote.
    cluster.assert_no_secret_leaks([cluster.s3.secret_key, cluster.s3.access_key])
