"""The Helm chart: lint, schema-valid Kubernetes objects, exact RBAC, PSS, settings mapping.

Everything is rendered by the real helm 4 binary and validated offline against the
Kubernetes 1.35 OpenAPI schemas bundled with kubernetes-validate.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import kopf
import kubernetes_validate
import pytest
import yaml
from lorajob_operator import webhook
from lorajob_operator.policy import Policy
from lorajob_operator.settings import ENV_PREFIX, OperatorSettings, load_settings

from tests.helm.chart import (
    CHART,
    NAMESPACE,
    REPO,
    SCENARIOS,
    HelmError,
    Manifest,
    Scenario,
    by_kind,
    one,
    render,
    run_helm,
    set_args,
)

K8S_VERSION = "1.35.0"
# Kinds from add-ons (Prometheus Operator, cert-manager) that kubernetes-validate has no
# schema for: the fields the chart sets are checked by hand below.
ADDON_REQUIRED_SPEC = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): {"selector", "endpoints"},
    ("cert-manager.io/v1", "Certificate"): {"secretName", "dnsNames", "issuerRef"},
    ("cert-manager.io/v1", "Issuer"): {"selfSigned"},
}

scenario_params = pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)


def _deployment(manifests: list[Manifest]) -> Manifest:
    return one(manifests, "Deployment")


def _container(manifests: list[Manifest]) -> dict[str, Any]:
    containers = _deployment(manifests)["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return dict(containers[0])


def _env(manifests: list[Manifest]) -> dict[str, str]:
    env = _container(manifests)["env"]
    for var in env:
        assert set(var) == {"name", "value"}, f"{var['name']}: the chart only sets plain values"
    return {var["name"]: var["value"] for var in env}


def _clear_settings_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)


# --- lint and schemas -----------------------------------------------------------------


@scenario_params
def test_helm_lint_strict(scenario: Scenario) -> None:
    out = run_helm(
        "lint", "--strict", str(CHART), "--namespace", NAMESPACE, *set_args(scenario.values)
    )
    assert "0 chart(s) failed" in out


@scenario_params
def test_manifests_are_valid_kubernetes_1_35_objects(scenario: Scenario) -> None:
    manifests = render(scenario.values, include_crds=True)
    assert by_kind(manifests, "CustomResourceDefinition"), "the chart must ship the CRD"
    for manifest in manifests:
        key = (manifest["apiVersion"], manifest["kind"])
        name = f"{manifest['kind']}/{manifest['metadata']['name']}"
        if key in ADDON_REQUIRED_SPEC:
            missing = ADDON_REQUIRED_SPEC[key] - set(manifest.get("spec", {}))
            assert not missing, f"{name}: spec lacks {sorted(missing)}"
            continue
        try:
            kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as err:
            path = ".".join(str(p) for p in err.path)
            pytest.fail(
                f"{name} is not a valid Kubernetes {K8S_VERSION} object: {path}: {err.message}"
            )


@scenario_params
def test_namespaced_objects_land_in_the_release_or_watched_namespace(scenario: Scenario) -> None:
    watched = set(re.findall(r"[a-z0-9-]+", scenario.values.get("watchNamespaces", "")))
    cluster_scoped = {"ClusterRole", "ClusterRoleBinding", "ValidatingWebhookConfiguration"}
    for manifest in render(scenario.values):
        namespace = manifest["metadata"].get("namespace")
        if manifest["kind"] in cluster_scoped:
            assert namespace is None
        elif manifest["kind"] in ("Role", "RoleBinding"):
            assert namespace in watched
        else:
            assert namespace == NAMESPACE, f"{manifest['kind']} in {namespace}"


@pytest.mark.parametrize(
    ("values", "error"),
    [
        ({"image.pullPolicy": "Sometimes"}, "/image/pullPolicy"),
        ({"imageTag": "v1"}, "additional properties 'imageTag' not allowed"),
        ({"trainer.defaultMemory": "16GB"}, "/trainer/defaultMemory"),
        ({"trainer.gpuResourceName": "gpu"}, "/trainer/gpuResourceName"),
        ({"watchNamespaces": "{team-*}"}, "/watchNamespaces/0"),
        ({"webhook.failurePolicy": "Maybe"}, "/webhook/failurePolicy"),
        ({"webhook.timeoutSeconds": "60"}, "/webhook/timeoutSeconds"),
        ({"policy.maxGpus": "8"}, "additional properties 'maxGpus' not allowed"),
        ({"policy.maxGpusPerJob": "-1"}, "/policy/maxGpusPerJob"),
        ({"trainer.extraEnv.1BAD": "x"}, "invalid propertyName '1BAD'"),
        ({"logLevel": "verbose"}, "/logLevel"),
        ({"apiClient.qps": "0"}, "/apiClient/qps"),
        ({"apiClient.burst": "0"}, "/apiClient/burst"),
    ],
)
def test_values_schema_rejects_bad_values(values: dict[str, str], error: str) -> None:
    with pytest.raises(HelmError) as excinfo:
        render(values)
    assert "don't meet the specifications of the schema" in str(excinfo.value)
    assert error in str(excinfo.value)


@pytest.mark.parametrize(
    ("values", "error"),
    [
        (
            {"webhook.enabled": "true", "webhook.certManager.enabled": "false"},
            "set webhook.caBundle",
        ),
        (
            {"metrics.serviceMonitor.enabled": "true", "metrics.service.enabled": "false"},
            "needs metrics.service.enabled",
        ),
        ({"serviceAccount.create": "false"}, "serviceAccount.name is required"),
        (
            {"trainer.extraEnv.AWS_SECRET_ACCESS_KEY": "x"},
            "trainer.extraEnv.AWS_SECRET_ACCESS_KEY: the operator sets AWS_SECRET_ACCESS_KEY itself",
        ),
    ],
)
def test_inconsistent_values_fail_with_the_fix(values: dict[str, str], error: str) -> None:
    with pytest.raises(HelmError, match=re.escape(error)):
        render(values)


# --- RBAC -------------------------------------------------------------------------------

# (apiGroups, resources, verbs, resourceNames)
Rule = tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...], tuple[str, ...]]
NAMESPACED_RULES: list[Rule] = [
    (
        ("finetune.loraops.dev",),
        ("lorajobs",),
        ("get", "list", "watch", "patch", "update", "delete"),  # delete: TTL after finish
        (),
    ),
    (("finetune.loraops.dev",), ("lorajobs/status",), ("get", "patch", "update"), ()),
    (("finetune.loraops.dev",), ("lorajobs/finalizers",), ("update",), ()),
    # patch: the gang gate of a job on several nodes comes off.
    (("",), ("pods",), ("get", "list", "watch", "create", "delete", "patch"), ()),
    # The rendezvous Service of a job on several nodes.
    (("",), ("services",), ("create", "delete"), ()),
    (("",), ("pods/status",), ("get",), ()),
    (("",), ("secrets",), ("get",), ()),
    (("",), ("events",), ("create", "patch"), ()),
    (("events.k8s.io",), ("events",), ("create", "patch"), ()),
]
CLUSTER_RULES: list[Rule] = [
    (("apiextensions.k8s.io",), ("customresourcedefinitions",), ("get", "list", "watch"), ()),
]
# kopf's managed mode creates and patches both configuration kinds under one name.
_WEBHOOK_CONFIGURATIONS = ("validatingwebhookconfigurations", "mutatingwebhookconfigurations")
KOPF_WEBHOOK_RULES: list[Rule] = [
    (("admissionregistration.k8s.io",), _WEBHOOK_CONFIGURATIONS, ("create",), ()),
    (
        ("admissionregistration.k8s.io",),
        _WEBHOOK_CONFIGURATIONS,
        ("patch",),
        (webhook.MANAGED_CONFIGURATION,),
    ),
]


def _rules(role: Manifest) -> list[Rule]:
    out: list[Rule] = []
    for rule in role["rules"]:
        assert set(rule) <= {"apiGroups", "resources", "verbs", "resourceNames"}
        assert "*" not in rule["verbs"], rule
        assert "*" not in rule["resources"], rule
        out.append(
            (
                tuple(rule["apiGroups"]),
                tuple(rule["resources"]),
                tuple(rule["verbs"]),
                tuple(rule.get("resourceNames", ())),
            )
        )
    return out


def test_rbac_rules_are_exact_cluster_wide() -> None:
    manifests = render()
    assert not by_kind(manifests, "Role")
    (cluster_role,) = by_kind(manifests, "ClusterRole")
    assert _rules(cluster_role) == CLUSTER_RULES + NAMESPACED_RULES
    binding = one(manifests, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == cluster_role["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "lorajob-lorajob-operator", "namespace": NAMESPACE}
    ]


def test_rbac_namespace_scoped_install_grants_nothing_outside_watched_namespaces() -> None:
    manifests = render({"watchNamespaces": "{team-a,team-b}"})
    (cluster_role,) = by_kind(manifests, "ClusterRole")
    # Cluster-wide: CRD discovery and namespace names. Pods, Secrets, jobs: only via Roles.
    assert _rules(cluster_role) == [*CLUSTER_RULES, (("",), ("namespaces",), ("list", "watch"), ())]
    roles = by_kind(manifests, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    for role in roles:
        assert _rules(role) == NAMESPACED_RULES
    bindings = by_kind(manifests, "RoleBinding")
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    for binding in bindings:
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": "lorajob-lorajob-operator",
        }
        assert binding["subjects"][0]["namespace"] == NAMESPACE
    assert _env(manifests)["LORAJOB_NAMESPACES"] == '["team-a","team-b"]'


def test_rbac_for_a_kopf_managed_webhook_is_limited_to_its_configuration() -> None:
    manifests = render({"webhook.enabled": "true", "webhook.configuration": "kopf"})
    (cluster_role,) = by_kind(manifests, "ClusterRole")
    assert _rules(cluster_role) == CLUSTER_RULES + KOPF_WEBHOOK_RULES + NAMESPACED_RULES
    # kopf writes the configuration itself, so the chart must not render one too.
    assert not by_kind(manifests, "ValidatingWebhookConfiguration")
    (service,) = [s for s in by_kind(manifests, "Service") if "webhook" in s["metadata"]["name"]]
    # kopf's URL carries the server's own port, so the Service must expose that port.
    env = _env(manifests)
    assert service["spec"]["ports"][0]["port"] == int(env["LORAJOB_WEBHOOK_PORT"])
    assert env["LORAJOB_WEBHOOK_MANAGED"] == "true"


def test_rbac_can_be_left_to_the_admin() -> None:
    manifests = render({"rbac.create": "false"})
    kinds = {m["kind"] for m in manifests}
    assert not kinds & {"ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}


# --- the operator pod -------------------------------------------------------------------


@scenario_params
def test_operator_pod_meets_pod_security_restricted(scenario: Scenario) -> None:
    """The Pod Security Standards "restricted" profile, checked rule by rule."""
    pod = _deployment(render(scenario.values))["spec"]["template"]["spec"]
    pod_sc = pod.get("securityContext", {})
    for flag in ("hostNetwork", "hostPID", "hostIPC", "hostUsers"):
        assert not pod.get(flag), flag
    for volume in pod.get("volumes", []):
        kinds = set(volume) - {"name"}
        assert kinds <= {"emptyDir", "secret", "configMap", "projected", "downwardAPI"}, volume
    assert pod_sc.get("seccompProfile", {}).get("type") in ("RuntimeDefault", "Localhost")
    for container in pod["containers"] + pod.get("initContainers", []):
        sc = container["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False
        assert not sc.get("privileged")
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert set(sc["capabilities"].get("add", [])) <= {"NET_BIND_SERVICE"}
        assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True
        assert sc.get("runAsUser", pod_sc.get("runAsUser")) != 0
        seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {}))
        assert seccomp.get("type") in ("RuntimeDefault", "Localhost")
        for port in container.get("ports", []):
            assert "hostPort" not in port
        # Beyond "restricted": immutable root filesystem, bounded memory, probes.
        assert sc["readOnlyRootFilesystem"] is True
        assert container["resources"]["limits"]["memory"]
        assert container["resources"]["requests"]["cpu"]


@scenario_params
def test_probes_services_and_monitors_point_at_real_ports(scenario: Scenario) -> None:
    manifests = render(scenario.values)
    container = _container(manifests)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    env = _env(manifests)
    assert ports["metrics"] == int(env["LORAJOB_METRICS_PORT"])
    assert ports["health"] == int(env["LORAJOB_HEALTH_PORT"])
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    pod_labels = _deployment(manifests)["spec"]["template"]["metadata"]["labels"]
    for service in by_kind(manifests, "Service"):
        assert service["spec"]["selector"].items() <= pod_labels.items()
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, f"{service['metadata']['name']}: {port}"
    for monitor in by_kind(manifests, "ServiceMonitor"):
        selected = [
            s
            for s in by_kind(manifests, "Service")
            if monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()
        ]
        assert [s["metadata"]["name"] for s in selected] == ["lorajob-lorajob-operator-metrics"]
        assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    if env["LORAJOB_WEBHOOK_ENABLED"] == "true":
        assert ports["webhook"] == int(env["LORAJOB_WEBHOOK_PORT"])


def test_operator_image_defaults_to_the_chart_app_version() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert (
        _container(render())["image"] == f"ghcr.io/loraops/lorajob-operator:{chart['appVersion']}"
    )
    digest = "sha256:" + "a" * 64
    image = _container(render({"image.digest": digest}))["image"]
    assert image == f"ghcr.io/loraops/lorajob-operator@{digest}"


def test_only_one_operator_runs_at_a_time() -> None:
    spec = _deployment(render())["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}


# --- values -> OperatorSettings ---------------------------------------------------------


@scenario_params
def test_every_env_var_is_an_operator_setting_and_parses(
    scenario: Scenario, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = _env(render(scenario.values))
    fields = set(OperatorSettings.model_fields)
    for name in env:
        assert name.startswith(ENV_PREFIX), name
        assert name.removeprefix(ENV_PREFIX).lower() in fields, f"{name} is not a settings field"
    _clear_settings_env(monkeypatch)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = load_settings()
    assert settings.namespaces == re.findall(
        r"[a-z0-9-]+", scenario.values.get("watchNamespaces", "")
    )
    assert settings.webhook_enabled is (scenario.values.get("webhook.enabled") == "true")
    if settings.webhook_enabled:
        assert settings.webhook_host == f"lorajob-lorajob-operator-webhook.{NAMESPACE}.svc"
        assert settings.webhook_cert_file == "/etc/lorajob/webhook/tls.crt"
    if "policy.maxGpusPerJob" in scenario.values:
        assert settings.policy.max_gpus_per_job == 8
    if "trainer.cachePvcName" in scenario.values:
        assert settings.cache_pvc_name == "hf-cache"
        assert settings.queue_for("team-a") == "gpus"


# Settings the chart deliberately does not expose, and why.
NOT_IN_CHART = {
    "trainer_command": "test-only override of the trainer command",
    "webhook_host": "derived from the release: the webhook Service's DNS name",
    "webhook_cert_file": "the mounted TLS Secret",
    "webhook_key_file": "the mounted TLS Secret",
    "webhook_managed": "derived from webhook.configuration",
}


def test_every_operator_setting_is_configurable_from_values() -> None:
    rendered = set(_env(render({"webhook.enabled": "true"})))
    template = (CHART / "templates" / "_settings.tpl").read_text()
    in_chart = {m.removeprefix(ENV_PREFIX).lower() for m in re.findall(r"LORAJOB_\w+", template)}
    missing = set(OperatorSettings.model_fields) - in_chart - set(NOT_IN_CHART)
    assert not missing, (
        f"settings without a chart value: {sorted(missing)}; map them in _settings.tpl"
    )
    assert {f"{ENV_PREFIX}{k.upper()}" for k in in_chart} >= rendered


def test_chart_defaults_are_the_operator_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """An install with default values behaves like the operator's documented defaults."""
    _clear_settings_env(monkeypatch)
    baseline = load_settings().model_dump()
    for name, value in _env(render()).items():
        monkeypatch.setenv(name, value)
    from_chart = load_settings().model_dump()
    differences = {k for k in baseline if baseline[k] != from_chart[k]}
    assert not differences, {k: (baseline[k], from_chart[k]) for k in differences}


def test_policy_values_are_exactly_the_policy_model() -> None:
    schema = yaml.safe_load((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    aliases = {field.alias or name for name, field in Policy.model_fields.items()}
    assert set(schema["properties"]["policy"]["properties"]) == aliases
    assert set(values["policy"]) == aliases
    assert Policy.model_validate(values["policy"]) == Policy()


def test_every_value_is_commented() -> None:
    """Each value in values.yaml has a comment right above it.

    Exempt: mappings whose children are commented, the standard Kubernetes `resources`
    block and the fields of list items (e.g. a toleration), which the list's comment covers.
    """
    lines = (CHART / "values.yaml").read_text().splitlines()
    undocumented = []
    exempt_below: int | None = None  # indentation of a block whose body is exempt
    for i, line in enumerate(lines):
        item = re.match(r"^(\s*)- ", line)
        if item:
            exempt_below = exempt_below if exempt_below is not None else len(item[1]) - 1
            continue
        m = re.match(r"^(\s*)([A-Za-z][\w.-]*):(.*)$", line)
        if not m:
            continue
        indent, key, rest = len(m[1]), m[2], m[3].strip()
        if exempt_below is not None and indent > exempt_below:
            continue
        exempt_below = indent if key == "resources" else None
        has_children = (
            rest == "" and i + 1 < len(lines) and lines[i + 1].startswith(" " * (indent + 2))
        )
        if has_children and key != "resources":
            continue  # its children carry the comments
        previous = lines[i - 1].strip() if i else ""
        if not previous.startswith("#"):
            undocumented.append(key)
    assert not undocumented, f"values without a comment: {undocumented}"


# --- CRD ----------------------------------------------------------------------------------


def test_chart_crd_is_the_generated_crd() -> None:
    generated = REPO / "crds" / "finetune.loraops.dev_lorajobs.yaml"
    shipped = sorted((CHART / "crds").iterdir())
    assert [p.name for p in shipped] == [generated.name], "run `make crds`"
    assert shipped[0].read_text() == generated.read_text(), "chart CRD is stale: run `make crds`"


# --- webhook ------------------------------------------------------------------------------


def test_webhook_configuration_targets_the_operator_service() -> None:
    manifests = render({"webhook.enabled": "true", "watchNamespaces": "{team-a}"})
    config = one(manifests, "ValidatingWebhookConfiguration")
    (webhook,) = config["webhooks"]
    service = webhook["clientConfig"]["service"]
    names = {s["metadata"]["name"] for s in by_kind(manifests, "Service")}
    assert service["name"] in names
    assert service["namespace"] == NAMESPACE
    assert webhook["rules"] == [
        {
            "apiGroups": ["finetune.loraops.dev"],
            "apiVersions": ["v1alpha1"],
            "operations": ["CREATE", "UPDATE"],
            "resources": ["lorajobs"],
            "scope": "Namespaced",
        }
    ]
    assert webhook["namespaceSelector"]["matchExpressions"][0]["values"] == ["team-a"]
    annotation = config["metadata"]["annotations"]["cert-manager.io/inject-ca-from"]
    certificate = one(manifests, "Certificate")
    assert annotation == f"{NAMESPACE}/{certificate['metadata']['name']}"
    assert f"{service['name']}.{NAMESPACE}.svc" in certificate["spec"]["dnsNames"]
    volumes = _deployment(manifests)["spec"]["template"]["spec"]["volumes"]
    secrets = [v["secret"]["secretName"] for v in volumes if "secret" in v]
    assert secrets == [certificate["spec"]["secretName"]]


def test_webhook_path_is_the_operators_handler() -> None:
    """kopf's server routes /<handler id>: the chart's path must name the real handler."""
    registry = kopf.OperatorRegistry()
    webhook.register(OperatorSettings(webhook_enabled=True), registry=registry)
    handler_ids = {str(h.id) for h in registry._webhooks.get_all_handlers()}
    manifests = render({"webhook.enabled": "true"})
    (config,) = one(manifests, "ValidatingWebhookConfiguration")["webhooks"]
    assert config["clientConfig"]["service"]["path"].lstrip("/") in handler_ids
    assert _env(manifests)["LORAJOB_WEBHOOK_MANAGED"] == "false"


def test_webhook_is_off_by_default() -> None:
    manifests = render()
    assert not by_kind(manifests, "ValidatingWebhookConfiguration")
    assert _env(manifests)["LORAJOB_WEBHOOK_ENABLED"] == "false"


def test_rendering_is_deterministic(tmp_path: Path) -> None:
    del tmp_path
    assert render({"webhook.enabled": "true"}) == render({"webhook.enabled": "true"})


def test_chart_refuses_clusters_it_was_not_made_for() -> None:
    with pytest.raises(HelmError, match=re.escape("incompatible with Kubernetes v1.28.0")):
        run_helm("template", "x", str(CHART), "--kube-version", "1.28.0")
    assert "kind: Deployment" in run_helm("template", "x", str(CHART), "--kube-version", "1.29.0")
