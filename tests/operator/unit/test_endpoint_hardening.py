"""URI and endpoint hardening (issue 11, item 3): every spelling of a private address is
refused by the admin policy, S3 and local paths with '.', '..' or '//' segments are
refused at validation, and allowedOutputPrefixes compares whole path segments."""

from __future__ import annotations

from typing import Any

import pytest
from lorajob_operator.api import InvalidSpecError, LoRAJobSpec, parse_spec
from lorajob_operator.objects import JobRef, build_trainer_pod
from lorajob_operator.policy import Policy, check_policy
from lorajob_operator.settings import OperatorSettings
from loraops_contract.endpoints import host_refusal
from loraops_contract.protocol import ENV_ALLOW_PRIVATE_ENDPOINTS
from pydantic import ValidationError

BASE: dict[str, Any] = {
    "model": {"uri": "s3://models/llama"},
    "dataset": {"uri": "s3://data/train.jsonl"},
    "output": {"uri": "s3://adapters/team-a/run-1"},
}

# Each is loopback, link-local (metadata), unspecified, multicast or reserved to libc's
# inet_aton, curl or a WHATWG URL parser.
PRIVATE_HOSTS = [
    "2130706433",  # 127.0.0.1 as one decimal number
    "[::ffff:127.0.0.1]",  # IPv4-mapped
    "[::ffff:7f00:1]",
    "127.1",  # inet_aton: the last part fills the remaining bytes
    "127.0.1",
    "0x7f000001",
    "0X7F.1",
    "0177.0.0.1",  # octal
    "017700000001",
    "127.0.0.1.",  # one trailing dot, as URL parsers allow
    "[::ffff:169.254.169.254]",
    "[::ffff:a9fe:a9fe]",
    "169.254.43518",  # 169.254.169.254 in three parts
    "0xa9.0xfe.0xa9.0xfe",
    "0251.0376.0251.0376",
    "[::127.0.0.1]",  # IPv4-compatible
    "[::ffff:0:127.0.0.1]",  # IPv4-translated (SIIT)
    "[64:ff9b::7f00:1]",  # NAT64 well-known prefix
    "[64:ff9b::169.254.169.254]",
    "[64:ff9b:1::1]",  # local-use NAT64: its IPv4 address cannot be told
    "[2002:7f00:1::]",  # 6to4
    "[2002:a9fe:a9fe::1]",
    "[2001:0:4136:e378:8000:63bf:80ff:fffe]",  # Teredo client 127.0.0.1
    "[fe80::1%25eth0]",  # link-local with a zone
    "[fd00:ec2::254]",  # AWS metadata over IPv6
    "100.100.100.200",  # Alibaba Cloud metadata
    "0",
    "0.0.0.0",
    "[::]",
    "224.0.0.1",
    "[ff02::1]",
    "255.255.255.255",
    "240.0.0.1",
    "LOCALHOST",
    "localhost.",
    "s3.localhost",
    "metadata.google.internal",
]
PUBLIC_HOSTS = [
    "s3.amazonaws.com",
    "minio.storage.svc",
    "10.0.0.5",  # in-cluster services have private addresses
    "192.168.1.20",
    "[fd12:3456::1]",
    "8.8.8.8",
    "[::ffff:8.8.8.8]",
    "[64:ff9b::8.8.8.8]",
    "[2002:808:808::1]",
    "0x08080808",
    "1.2.3",
    "127.example.com",
]


def spec(**extra: Any) -> LoRAJobSpec:
    return parse_spec(BASE | extra)


def endpoint_job(host: str) -> LoRAJobSpec:
    return spec(storage={"endpoint": f"http://{host}:9000", "credentialsSecret": "s3"})


@pytest.mark.parametrize("host", PRIVATE_HOSTS)
def test_every_spelling_of_a_private_address_is_refused(host: str) -> None:
    job = endpoint_job(host)
    (violation,) = check_policy(job, "team-a", Policy())
    assert violation.startswith("spec.storage.endpoint:"), violation
    assert "allowPrivateEndpoints=false" in violation
    assert check_policy(job, "team-a", Policy(allow_private_endpoints=True)) == []


@pytest.mark.parametrize("host", PUBLIC_HOSTS)
def test_public_and_cluster_addresses_pass(host: str) -> None:
    assert host_refusal(host) is None
    assert check_policy(endpoint_job(host), "team-a", Policy()) == []


def test_refusal_says_what_the_spelling_means() -> None:
    (violation,) = check_policy(endpoint_job("0x7f000001"), "team-a", Policy())
    assert "0x7f000001 (127.0.0.1) is a loopback address" in violation
    (violation,) = check_policy(endpoint_job("[::ffff:169.254.169.254]"), "team-a", Policy())
    assert "link-local" in violation
    assert "169.254.169.254" in violation


@pytest.mark.parametrize(
    "endpoint",
    [
        "http://%31%32%37.0.0.1:9000",
        "http://127\u30020\u30020\u30021:9000",
        "http://\uff4dinio:9000",
    ],
)
def test_endpoint_host_must_be_plain_ascii(endpoint: str) -> None:
    # Percent-escapes and Unicode dots are decoded differently by different clients.
    with pytest.raises(InvalidSpecError) as err:
        spec(storage={"endpoint": endpoint, "credentialsSecret": "s3"})
    assert err.value.problems[0].startswith("spec.storage.endpoint:")
    assert "ASCII" in err.value.message


@pytest.mark.parametrize(
    ("field", "uri"),
    [
        ("output.uri", "s3://adapters/team-a/../team-b/x"),
        ("output.uri", "s3://adapters/team-a/./x"),
        ("output.uri", "s3://adapters/team-a//x"),
        ("output.uri", "s3://adapters//team-a"),
        ("output.uri", "s3://adapters/team-a/.."),
        ("output.uri", "s3://adapters/team-a\\..\\team-b/x"),  # SeaweedFS reads \ as /
        ("output.uri", "/out/../etc"),
        ("model.uri", "s3://models/../other/llama"),
        ("model.uri", "/models//tiny"),
        ("dataset.uri", "s3://data/./train.jsonl"),
        ("dataset.evalUri", "s3://data/a/../eval.jsonl"),
    ],
)
def test_dot_and_empty_segments_are_refused_naming_the_field(field: str, uri: str) -> None:
    section, key = field.split(".")
    with pytest.raises(InvalidSpecError) as err:
        parse_spec(BASE | {section: {**BASE.get(section, {"uri": "s3://data/t.jsonl"}), key: uri}})
    (problem,) = err.value.problems
    assert problem.startswith(f"spec.{field}:"), problem
    assert "segment" in problem
    assert "s3://bucket/team-a/run-1" in problem  # the fix, by example


def test_plain_names_with_dots_and_one_trailing_slash_are_fine() -> None:
    job = spec(
        model={"uri": "s3://models/llama-3.1..8b/v1.0"},
        output={"uri": "s3://adapters/team-a/run-1/"},
    )
    assert job.output.uri == "s3://adapters/team-a/run-1/"


@pytest.mark.parametrize("prefix", ["s3://adapters/{namespace}", "s3://adapters/{namespace}/"])
def test_output_prefixes_compare_whole_segments(prefix: str) -> None:
    policy = Policy(allowed_output_prefixes=[prefix])
    assert check_policy(spec(output={"uri": "s3://adapters/team-a/x"}), "team-a", policy) == []
    assert check_policy(spec(output={"uri": "s3://adapters/team-a"}), "team-a", policy) == []
    assert check_policy(spec(output={"uri": "s3://adapters/team-a/"}), "team-a", policy) == []
    (v,) = check_policy(spec(output={"uri": "s3://adapters/team-ab/x"}), "team-a", policy)
    assert v.startswith("spec.output.uri: s3://adapters/team-ab/x is outside")
    assert check_policy(spec(output={"uri": "s3://adapters2/team-a/x"}), "team-a", policy) != []


def test_a_dot_dot_output_cannot_leave_its_prefix() -> None:
    # Today's string-prefix test passed this for team-a; now it does not even parse.
    with pytest.raises(InvalidSpecError, match=r"spec\.output\.uri: .*segment"):
        spec(output={"uri": "s3://adapters/team-a/../team-b/x"})


def test_a_policy_prefix_that_names_no_place_is_refused_at_load() -> None:
    with pytest.raises(ValidationError, match="segment"):
        Policy.model_validate({"allowedOutputPrefixes": ["s3://adapters/../{namespace}"]})
    with pytest.raises(ValidationError, match="not a valid S3 URI"):
        Policy.model_validate({"allowedOutputPrefixesByNamespace": {"a": ["s3://A/x"]}})


def _trainer_env(job: LoRAJobSpec, settings: OperatorSettings) -> dict[str, Any]:
    pod = build_trainer_pod(JobRef("j", "team-a", "uid-1"), job, settings, 1)
    return {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}


def test_the_trainer_is_told_the_policy_decision() -> None:
    # The trainer refuses a name that resolves to a private address (storage.py).
    job = endpoint_job("minio.storage.svc")
    for allowed in (False, True):
        settings = OperatorSettings(policy=Policy(allow_private_endpoints=allowed))
        assert _trainer_env(job, settings)[ENV_ALLOW_PRIVATE_ENDPOINTS] == str(allowed).lower()
    # AWS's own endpoint (no storage.endpoint): nothing to resolve and refuse.
    assert ENV_ALLOW_PRIVATE_ENDPOINTS not in _trainer_env(spec(), OperatorSettings())
