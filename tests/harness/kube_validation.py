"""Built-in validation the real API server applies and operators most often trip over:
label/annotation syntax and size, and the core of Pod spec validation. Each
violation is a FieldCause worded like the server's, returned as a 422 Invalid.
"""

from __future__ import annotations

import json
import re
from typing import Any

from tests.harness.kube_quantity import QuantityError, parse_quantity
from tests.harness.kube_schema import FieldCause

Obj = dict[str, Any]

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
ANNOTATIONS_LIMIT = 256 * 1024
_RESTART_POLICIES = ("Always", "OnFailure", "Never")
_NATIVE_PREFIXES = ("kubernetes.io/", "requests.", "limits.")


def _invalid(field: str, value: Any, message: str) -> FieldCause:
    return FieldCause("FieldValueInvalid", field, f"Invalid value: {json.dumps(value)}: {message}")


def _qualified_name_errors(key: str) -> list[str]:
    """Errors of a label/annotation key (`prefix/name`, prefix a DNS subdomain)."""
    prefix, _, name = key.rpartition("/")
    errors = []
    if prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix)):
        errors.append(
            "prefix part a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.'"
        )
    if not name or len(name) > 63 or not _QUALIFIED_NAME.match(name):
        errors.append(
            "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end "
            "with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for "
            "validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]') and must be no more than 63 characters"
        )
    return errors


def metadata_causes(obj: Obj) -> list[FieldCause]:
    meta = obj.get("metadata") or {}
    causes: list[FieldCause] = []
    for key, value in (meta.get("labels") or {}).items():
        for error in _qualified_name_errors(key):
            causes.append(_invalid("metadata.labels", key, error))
        if not isinstance(value, str) or len(value) > 63 or not _LABEL_VALUE.match(value):
            causes.append(
                _invalid(
                    "metadata.labels",
                    value,
                    "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' "
                    "or '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or "
                    "'my_value',  or '12345', regex used for validation is "
                    "'(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?') and must be no more than 63 characters",
                )
            )
    annotations = meta.get("annotations") or {}
    for key in annotations:
        for error in _qualified_name_errors(key):
            causes.append(_invalid("metadata.annotations", key, error))
    size = sum(len(k) + len(str(v)) for k, v in annotations.items())
    if size > ANNOTATIONS_LIMIT:
        causes.append(
            FieldCause(
                "FieldValueTooLong",
                "metadata.annotations",
                f"Too long: may not be more than {ANNOTATIONS_LIMIT} bytes",
            )
        )
    return causes


def _quantities(section: Any, field: str, causes: list[FieldCause]) -> dict[str, Any]:
    parsed = {}
    for key, value in (section or {}).items():
        try:
            parsed[key] = parse_quantity(value)
        except QuantityError:
            causes.append(
                _invalid(
                    f"{field}[{key}]",
                    value,
                    "must match the regex (\\+|-)?(([0-9]+(\\.[0-9]*)?)|(\\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\\+|-)?(([0-9]+(\\.[0-9]*)?)|(\\.[0-9]+))))?",
                )
            )
    return parsed


def _container_causes(
    container: Obj, field: str, volumes: set[str], causes: list[FieldCause]
) -> None:
    name = container.get("name")
    if not name:
        causes.append(FieldCause("FieldValueRequired", f"{field}.name", "Required value"))
    elif len(name) > 63 or not _DNS_LABEL.match(name):
        causes.append(
            _invalid(
                f"{field}.name",
                name,
                "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character",
            )
        )
    if not container.get("image"):
        causes.append(FieldCause("FieldValueRequired", f"{field}.image", "Required value"))
    resources = container.get("resources") or {}
    limits = _quantities(resources.get("limits"), f"{field}.resources.limits", causes)
    requests = _quantities(resources.get("requests"), f"{field}.resources.requests", causes)
    for key, amount in requests.items():
        if key in limits and amount > limits[key]:
            causes.append(
                _invalid(
                    f"{field}.resources.requests",
                    str(resources["requests"][key]),
                    f"must be less than or equal to {key} limit of {resources['limits'][key]}",
                )
            )
        extended = "/" in key and not key.startswith(_NATIVE_PREFIXES)
        if extended and key not in limits:
            causes.append(
                FieldCause(
                    "FieldValueRequired",
                    f"{field}.resources.limits",
                    "Required value: Limit must be set for non overcommitable resources",
                )
            )
        elif extended and amount != limits[key]:
            causes.append(
                _invalid(
                    f"{field}.resources.requests[{key}]",
                    str(resources["requests"][key]),
                    f"must be equal to {key} limit of {resources['limits'][key]}",
                )
            )
    seen_env = set()
    for index, item in enumerate(container.get("env") or []):
        env_name = item.get("name", "")
        if not _ENV_NAME.match(env_name):
            causes.append(
                _invalid(
                    f"{field}.env[{index}].name",
                    env_name,
                    "a valid environment variable name must consist of alphabetic characters, digits, '_', '-', or '.', and must not start with a digit",
                )
            )
        seen_env.add(env_name)
        if "value" in item and "valueFrom" in item:
            causes.append(
                _invalid(
                    f"{field}.env[{index}].valueFrom",
                    "",
                    "may not be specified when `value` is not empty",
                )
            )
    for index, mount in enumerate(container.get("volumeMounts") or []):
        if mount.get("name") not in volumes:
            causes.append(
                FieldCause(
                    "FieldValueNotFound",
                    f"{field}.volumeMounts[{index}].name",
                    f"Not found: {json.dumps(mount.get('name'))}",
                )
            )
        if not mount.get("mountPath"):
            causes.append(
                FieldCause(
                    "FieldValueRequired",
                    f"{field}.volumeMounts[{index}].mountPath",
                    "Required value",
                )
            )


def pod_causes(pod: Obj) -> list[FieldCause]:
    """The core of the Pod validation a real server does on create."""
    spec = pod.get("spec") or {}
    causes: list[FieldCause] = []
    containers = spec.get("containers") or []
    if not containers:
        causes.append(FieldCause("FieldValueRequired", "spec.containers", "Required value"))
    volumes = set()
    for index, volume in enumerate(spec.get("volumes") or []):
        name = volume.get("name", "")
        if name in volumes:
            causes.append(
                FieldCause(
                    "FieldValueDuplicate",
                    f"spec.volumes[{index}].name",
                    f"Duplicate value: {json.dumps(name)}",
                )
            )
        volumes.add(name)
    names: set[str] = set()
    for kind in ("initContainers", "containers"):
        for index, container in enumerate(spec.get(kind) or []):
            _container_causes(container, f"spec.{kind}[{index}]", volumes, causes)
            name = container.get("name", "")
            if name and name in names:
                causes.append(
                    FieldCause(
                        "FieldValueDuplicate",
                        f"spec.{kind}[{index}].name",
                        f"Duplicate value: {json.dumps(name)}",
                    )
                )
            names.add(name)
    policy = spec.get("restartPolicy", "Always")
    if policy not in _RESTART_POLICIES:
        supported = ", ".join(json.dumps(p) for p in _RESTART_POLICIES)
        causes.append(
            FieldCause(
                "FieldValueNotSupported",
                "spec.restartPolicy",
                f"Unsupported value: {json.dumps(policy)}: supported values: {supported}",
            )
        )
    return causes
