"""`make demo`: one LoRAJob from `kubectl apply` to a downloadable adapter, on this machine.

What runs, all on 127.0.0.1 and all stopped at the end:
  * an S3 server (SeaweedFS) that enforces credentials,
  * a real Kubernetes control plane: etcd, kube-apiserver, kube-controller-manager
    and kube-scheduler v1.35 (built once by `make cluster-tools`), with RBAC,
  * a process kubelet that runs trainer pods as local processes,
  * the real operator (`kopf run -m lorajob_operator.handlers`), as the Helm chart's
    ServiceAccount with the chart's RBAC,
  * the real trainer (`python -m lora_trainer`), fine-tuning a tiny Llama with QLoRA
    (bitsandbytes NF4) on the CPU.

The demo builds the tiny base model and an alpaca dataset, uploads them, creates the
credentials Secret, applies examples/lorajob-tiny.yaml with kubectl, follows the job
like `kubectl get lj -w`, then lists the adapter in S3.

    python scripts/demo.py          # run and clean up
    python scripts/demo.py --keep   # leave the control plane up to explore with kubectl
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# Quiet library progress bars; the demo prints its own progress.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path[:0] = [str(REPO), str(REPO / "operator"), str(REPO / "trainer_image")]

# Imported after sys.path is set: the demo runs from a plain checkout too.
import yaml  # noqa: E402

from devcluster.controlplane import ControlPlane  # noqa: E402
from devcluster.kubelet import cpu_node  # noqa: E402
from devcluster.tiny_model import build_tiny_model, write_dataset  # noqa: E402

EXAMPLE = REPO / "examples" / "lorajob-tiny.yaml"
BUCKET = "lorajob-demo"
SECRET = "demo-s3-credentials"
JOB_TIMEOUT_S = 600.0
DATASET_RECORDS = 96


def say(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def detail(text: str) -> None:
    print(f"    {text}", flush=True)


def manifest_for(endpoint: str) -> dict[str, Any]:
    """examples/lorajob-tiny.yaml with ${S3_ENDPOINT} filled in."""
    text = EXAMPLE.read_text().replace("${S3_ENDPOINT}", endpoint)
    manifest: dict[str, Any] = yaml.safe_load(text)
    return manifest


def stage_inputs(cp: ControlPlane, manifest: dict[str, Any], workdir: Path) -> None:
    """Build the tiny model and dataset and put them where the manifest points."""
    spec = manifest["spec"]
    model_key = spec["model"]["uri"].removeprefix(f"s3://{BUCKET}/")
    data_key = spec["dataset"]["uri"].removeprefix(f"s3://{BUCKET}/")
    say("Building a tiny Llama (random weights) and an alpaca dataset")
    model_dir = build_tiny_model(workdir / "tiny-llama")
    params = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    detail(f"model: {model_dir.name} ({params / 1e6:.1f} MB of safetensors)")
    data = write_dataset(workdir / "alpaca.jsonl", "alpaca", n=DATASET_RECORDS)
    detail(f"dataset: {DATASET_RECORDS} records")
    say(f"Uploading to s3://{BUCKET}/")
    keys = cp.s3.upload_dir(model_dir, BUCKET, model_key)
    cp.s3.client().upload_file(str(data), BUCKET, data_key)
    detail(f"s3://{BUCKET}/{model_key}/ ({len(keys)} files)")
    detail(f"s3://{BUCKET}/{data_key}")


def kubectl(cp: ControlPlane, *args: str, stdin: str | None = None) -> str:
    print(f"    $ kubectl {' '.join(args)}", flush=True)
    out = cp.kubectl(*args, input=stdin).stdout
    for line in out.rstrip().splitlines():
        detail(line)
    return out


def describe_progress(status: dict[str, Any]) -> str:
    phase = status.get("phase") or "(no status yet)"
    progress = status.get("progress") or {}
    parts = [f"{phase:<10}"]
    if progress.get("stage"):
        parts.append(f"{progress['stage']:<12}")
    if progress.get("totalSteps"):
        parts.append(f"step {progress.get('step', 0)}/{progress['totalSteps']}")
    if progress.get("loss") is not None:
        parts.append(f"loss {progress['loss']:.4f}")
    if status.get("failureReason"):
        parts.append(f"{status['failureReason']}: {status.get('failureMessage', '')}")
    return "  ".join(parts)


def follow(cp: ControlPlane, name: str) -> dict[str, Any]:
    """Print each change of phase/stage/step/loss until the job finishes."""
    say(f"Following lorajob/{name} (what `kubectl get lj -w` shows, plus stage and step)")
    start = time.monotonic()
    last = ""
    while time.monotonic() - start < JOB_TIMEOUT_S:
        job = cp.get("lorajobs", name) or {}
        status = job.get("status") or {}
        line = describe_progress(status)
        if line != last:
            detail(f"{time.monotonic() - start:6.1f}s  {line}")
            last = line
        if status.get("phase") in ("Succeeded", "Failed"):
            return status
        time.sleep(0.5)
    raise SystemExit(f"the job did not finish within {JOB_TIMEOUT_S:.0f}s")


def show_adapter(cp: ControlPlane, status: dict[str, Any]) -> None:
    adapter = status.get("adapter") or {}
    uri = adapter.get("uri", "")
    say(f"Adapter at {uri}")
    prefix = uri.removeprefix(f"s3://{BUCKET}/").rstrip("/") + "/"
    listing = cp.s3.client().list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    for obj in listing.get("Contents", []):
        key = obj["Key"].removeprefix(prefix)
        if key.startswith("checkpoints/"):
            continue
        detail(f"{obj['Size']:>10,d} B  {key}")
    checkpoints = {  # checkpoints/run-<run>/attempt-<N>/checkpoint-<step>/...
        "/".join(obj["Key"].removeprefix(prefix).split("/")[1:4])
        for obj in listing.get("Contents", [])
        if obj["Key"].removeprefix(prefix).startswith("checkpoints/")
    }
    if checkpoints:
        detail(f"(plus checkpoints/: {', '.join(sorted(checkpoints))})")
    detail(f"sha256 of adapter_model.safetensors: {adapter.get('sha256')}")
    metrics = json.loads(
        cp.s3.client().get_object(Bucket=BUCKET, Key=prefix + "metrics.json")["Body"].read()
    )
    history = metrics.get("loss_history") or []
    if history:
        (first_step, first), (last_step, last) = history[0], history[-1]
        detail(
            f"training loss: {first:.4f} at step {first_step} -> {last:.4f} at step "
            f"{last_step} (run average {metrics['train_loss']:.4f})"
        )
    if metrics.get("eval_loss") is not None:
        detail(f"eval loss: {metrics['eval_loss']:.4f}")
    evaluation = status.get("evaluation") or {}
    for key in ("summary", "vllm"):
        if evaluation.get(key):
            detail(f"status.evaluation.{key}: {evaluation[key]}")
    # The model card, its plots and the sampled answers, copied out to look at.
    card_dir = (
        Path(tempfile.gettempdir()) / f"lorajob-demo-card-{prefix.strip('/').rsplit('/', 1)[-1]}"
    )
    for obj in listing.get("Contents", []):
        key = obj["Key"].removeprefix(prefix)
        if key in ("README.md", "samples.jsonl") or key.startswith("plots/"):
            dest = card_dir / key
            dest.parent.mkdir(parents=True, exist_ok=True)
            cp.s3.client().download_file(BUCKET, obj["Key"], str(dest))
    if (card_dir / "README.md").is_file():
        detail(f"model card and plots copied to {card_dir} (README.md, plots/*.png)")


def run(keep: bool) -> int:
    with tempfile.TemporaryDirectory(prefix="lorajob-demo-") as tmp:
        workdir = Path(tmp)
        say(
            "Starting a local cluster: etcd, kube-apiserver, kube-controller-manager, "
            "kube-scheduler, a process kubelet, S3 and the operator"
        )
        started = time.monotonic()
        plane = ControlPlane(
            nodes=[cpu_node()],
            s3_buckets=[BUCKET],
            operator=True,
            operator_env={
                # The demo's S3 server listens on 127.0.0.1, which the default policy
                # refuses as a private endpoint (it would be cloud metadata in a cluster).
                "LORAJOB_POLICY": '{"allowPrivateEndpoints": true}',
                "LORAJOB_PROGRESS_INTERVAL_SECONDS": "1",
                "LORAJOB_STATUS_MIN_INTERVAL_SECONDS": "0.5",
            },
        )
        with plane as cp:
            version = cp.cluster.request("GET", "/version")["gitVersion"]
            detail(f"Kubernetes {version} up in {time.monotonic() - started:.1f}s")
            detail(f"KUBECONFIG={cp.kubeconfig}")
            detail(f"S3 endpoint {cp.s3.endpoint}")
            manifest = manifest_for(cp.s3.endpoint)
            name = manifest["metadata"]["name"]
            stage_inputs(cp, manifest, workdir)

            say("Creating the credentials Secret and applying the LoRAJob")
            kubectl(
                cp,
                "create",
                "secret",
                "generic",
                SECRET,
                f"--from-literal=AWS_ACCESS_KEY_ID={cp.s3.access_key}",
                f"--from-literal=AWS_SECRET_ACCESS_KEY={cp.s3.secret_key}",
            )
            kubectl(cp, "apply", "-f", "-", stdin=yaml.safe_dump(manifest))

            status = follow(cp, name)
            say("Final state")
            kubectl(cp, "get", "lj", "-o", "wide")
            if status.get("phase") != "Succeeded":
                kubectl(cp, "describe", "lj", name)
                if status.get("podName"):
                    detail(f"trainer log of pod {status['podName']} (tail):")
                    log = cp.kubectl("logs", status["podName"], check=False).stdout
                    for line in log.splitlines()[-30:]:
                        detail(f"  {line}")
                detail("operator log tail:")
                for line in cp.operator_log_tail(30).splitlines():
                    detail(f"  {line}")
                return 1
            kubectl(cp, "wait", "--for=condition=Succeeded", f"lj/{name}", "--timeout=10s")
            show_adapter(cp, status)
            if keep:
                say("Control plane left running; Ctrl-C to stop it")
                detail(f"export KUBECONFIG={cp.kubeconfig}")
                detail(f"kubectl: {REPO / '.tools' / 'bin' / 'kubectl'}")
                try:
                    while True:
                        time.sleep(3600)
                except KeyboardInterrupt:
                    pass
            say("Stopping the control plane")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--keep", action="store_true", help="leave the control plane running until Ctrl-C"
    )
    args = parser.parse_args()
    return run(args.keep)


if __name__ == "__main__":
    sys.exit(main())
