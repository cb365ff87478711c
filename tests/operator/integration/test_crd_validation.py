"""The CRD alone, on a real kube-apiserver, with no webhook and no operator (a default
install): `kubectl apply` refuses bad specs, naming the field and the fix with the
message parse_spec gives, and accepts good ones. Both sides come from one rule table
(loraops_contract.rules); this checks that the API server's CEL and the Python agree.
"""

from __future__ import annotations

import copy
import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from lorajob_operator.api import API_VERSION, KIND, InvalidSpecError, parse_spec

from devcluster.cluster import Cluster
from tests.operator.unit.test_crd_rules import URIS, all_rules
from tests.operator.unit.test_spec_validation import BASE, MALFORMED

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[3]
# What a default install applies: the committed CRD (drift-tested against the models).
CRD_FILE = REPO / "crds" / "finetune.loraops.dev_lorajobs.yaml"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    crds = list(yaml.safe_load_all(CRD_FILE.read_text()))
    with Cluster(tmp_path_factory.mktemp("crd"), crds=crds) as c:
        yield c


def _apply(cluster: Cluster, name: str, spec: Any, *, dry_run: bool = True) -> tuple[bool, str]:
    doc = {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": name}, "spec": spec}
    args = ["apply", "-f", "-"] + (["--dry-run=server"] if dry_run else [])
    result = cluster.kubectl(*args, check=False, input=json.dumps(doc))
    return result.returncode == 0, result.stderr


def _python_accepts(spec: Any) -> tuple[bool, list[str]]:
    try:
        parse_spec(spec)
    except InvalidSpecError as err:
        return False, err.problems
    return True, []


# Map fields: the API server writes their keys as [key].
_MAPS = frozenset({"nodeSelector"})


def _kube_path(python_path: str) -> str:
    """spec.scheduling.tolerations.0.value -> spec.scheduling.tolerations[0].value"""
    parts = python_path.split(".")
    out = parts[0]
    for before, part in itertools.pairwise(parts):
        out += f"[{part}]" if part.isdigit() or before in _MAPS else f".{part}"
    return out


def test_default_install_refuses_epochs_with_max_steps(cluster: Cluster) -> None:
    spec = copy.deepcopy(BASE) | {"training": {"epochs": 3, "maxSteps": 100}}
    accepted, stderr = _apply(cluster, "epochs-and-steps", spec, dry_run=False)
    assert not accepted
    [problem] = _python_accepts(spec)[1]
    field, message = problem.split(": ", 1)
    assert f"{field}: Invalid value: {message}" in stderr, stderr
    names = cluster.kubectl("get", "lorajobs", "-o", "name").stdout
    assert "epochs-and-steps" not in names


@pytest.mark.parametrize(
    ("spec", "field"), [(m[1], m[2]) for m in MALFORMED], ids=[m[0] for m in MALFORMED]
)
def test_bad_spec_is_refused_at_apply_naming_the_field(
    cluster: Cluster, spec: dict[str, Any], field: str
) -> None:
    accepted, stderr = _apply(cluster, "bad", spec)
    assert not accepted, f"the API server accepted a spec parse_spec refuses: {spec}"
    assert _kube_path(field) in stderr or field in stderr, stderr
    # Where the Python refusal is a rule's, the API server prints the same message.
    for problem in _python_accepts(spec)[1]:
        path, message = problem.split(": ", 1)
        message = message.split(" (got ")[0]
        if message in _rule_messages():
            assert f"{_kube_path(path)}: " in stderr, stderr
            assert message in stderr, stderr


def _rule_messages() -> set[str]:
    return {rule.message for rule in all_rules()}


GOOD: list[tuple[str, dict[str, Any]]] = [
    ("epochs 1 beside maxSteps", {"training": {"epochs": 1, "maxSteps": 100}}),
    ("epochs only", {"training": {"epochs": 2.5}}),
    ("evalSplit 0", {"dataset": {"uri": "s3://data/t.jsonl", "evalSplit": 0}}),
    (
        "eval every with evalUri",
        {
            "dataset": {"uri": "/data/t.jsonl", "evalUri": "hf://org/evals@v1", "evalSplit": 0},
            "training": {"evalEverySteps": 5},
        },
    ),
    ("target list", {"lora": {"targetModules": ["q_proj", "v_proj"], "useDora": True}}),
    (
        "tracking and evaluation",
        {
            "evaluation": {"prompts": ["what color is the sky"], "maxNewTokens": 16},
            "tracking": {
                "mlflow": {"trackingUri": "https://mlflow.example.com/", "credentialsSecret": "m"},
                "wandb": {"project": "support-bot", "mode": "offline"},
            },
        },
    ),
    ("nulls are unset", {"training": {"maxSteps": None}, "image": None}),
    (
        "endpoint with creds secret",
        {
            "storage": {
                "endpoint": "http://[::1]:9000/",
                "credentialsSecret": "s3-creds",
                "region": "eu-west-1",
            }
        },
    ),
    ("endpoint with local output", {"storage": {"endpoint": "https://s3.example.com"}}),
    ("cpu job", {"resources": {"gpus": 0, "cpu": "500m", "memory": "1.5Gi"}}),
    ("fsdp on 8 gpus", {"resources": {"gpus": 8}, "training": {"strategy": "fsdp"}}),
    (
        "fsdp on 2 nodes of 1 gpu",
        {"resources": {"gpus": 1, "nodes": 2}, "training": {"strategy": "fsdp"}},
    ),
    ("16 nodes of 16 gpus", {"resources": {"gpus": 16, "nodes": 16}}),
    ("2 cpu nodes", {"resources": {"gpus": 0, "nodes": 2, "cpu": "1", "memory": "2Gi"}}),
    (
        "mig",
        {"resources": {"gpus": 1, "gpuResourceName": "nvidia.com/mig-1g.10gb", "gpuProduct": "A"}},
    ),
    (
        "scheduling",
        {
            "scheduling": {
                "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-A100", "zone": ""},
                "tolerations": [
                    {"operator": "Exists"},
                    {
                        "key": "gpu",
                        "operator": "Exists",
                        "effect": "NoExecute",
                        "tolerationSeconds": 5,
                    },
                ],
                "affinity": {"nodeAffinity": {"anything": ["goes", 1]}},
                "priorityClassName": "high.priority",
                "queueName": "team-a",
            },
            "image": "localhost:5000/lora-trainer@sha256:" + "a" * 64,
        },
    ),
]


@pytest.mark.parametrize("extra", [g[1] for g in GOOD], ids=[g[0] for g in GOOD])
def test_good_spec_is_accepted(cluster: Cluster, extra: dict[str, Any]) -> None:
    spec = copy.deepcopy(BASE) | extra
    if "storage" in extra and "credentialsSecret" not in extra["storage"]:
        spec["output"] = {"uri": "/output/run-1"}
    assert _python_accepts(spec) == (True, [])
    accepted, stderr = _apply(cluster, "good", spec)
    assert accepted, stderr


def test_examples_are_accepted(cluster: Cluster) -> None:
    for path in sorted((REPO / "examples").rglob("*.yaml")):
        text = path.read_text().replace("${S3_ENDPOINT}", "http://127.0.0.1:9000")
        for doc in yaml.safe_load_all(text):
            if doc and doc.get("kind") == KIND:
                accepted, stderr = _apply(cluster, "example", doc["spec"])
                assert accepted, f"{path}: {stderr}"


@pytest.mark.parametrize("uri", URIS)
def test_uri_verdicts_agree(cluster: Cluster, uri: str) -> None:
    """RE2 (CEL) and Python read the URI patterns alike: one verdict per URI, as the
    model and as the output."""
    for spec in (
        copy.deepcopy(BASE) | {"model": {"uri": uri}},
        copy.deepcopy(BASE) | {"output": {"uri": uri}},
    ):
        python_ok, _ = _python_accepts(spec)
        kube_ok, stderr = _apply(cluster, "uri", spec)
        assert kube_ok == python_ok, f"{uri!r}: python {python_ok}, API server: {stderr}"


NAMES: list[tuple[str, str]] = [
    ("storage.region", "us-east-1"),
    ("storage.region", "US-EAST"),
    ("storage.credentialsSecret", "a.b-c"),
    ("storage.credentialsSecret", "a..b"),
    ("storage.endpoint", "HTTPS://minio:9000"),
    ("storage.endpoint", "http://minio:0"),
    ("storage.endpoint", "http://minio:65536"),
    ("storage.endpoint", "http://minio:65535/path"),
    ("storage.endpoint", "http://u@minio"),
    ("storage.endpoint", "http://minio?x=1"),
    ("storage.endpoint", "ftp://minio"),
    ("storage.endpoint", "http://"),
    ("resources.cpu", "0.0"),
    ("resources.cpu", "1e3"),
    ("resources.memory", "1.5Gi"),
    ("resources.gpuResourceName", "example.com/fpga"),
    ("resources.gpuResourceName", "gpu.kubernetes.io/x"),
    ("scheduling.queueName", "a" * 64),
    ("scheduling.priorityClassName", "a" * 253),
    ("image", "UPPER/x"),
    ("image", "registry.example.com:5000/team/trainer:v1"),
]


@pytest.mark.parametrize(("path", "value"), NAMES, ids=[f"{p}={v[:20]}" for p, v in NAMES])
def test_value_verdicts_agree(cluster: Cluster, path: str, value: str) -> None:
    spec = copy.deepcopy(BASE) | {"output": {"uri": "/output/x"}}
    section, _, leaf = path.rpartition(".")
    (spec.setdefault(section, {}) if section else spec)[leaf] = value
    python_ok, problems = _python_accepts(spec)
    kube_ok, stderr = _apply(cluster, "value", spec)
    assert kube_ok == python_ok, f"python {problems}, API server: {stderr}"
