"""Decoding of the Kubernetes protobuf request bodies kubectl's typed commands send.

`kubectl create secret|configmap|namespace|serviceaccount|quota` POST
`application/vnd.kubernetes.protobuf` (the "k8s\\x00" envelope around a
runtime.Unknown), and helm sends DeleteOptions that way. We decode exactly those kinds into JSON-shaped dicts; any other
kind is a 415 so a missing mapping is loud, not silently wrong.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

MAGIC = b"k8s\x00"
PROTOBUF = "application/vnd.kubernetes.protobuf"

Fields = dict[int, list[Any]]


class ProtobufError(ValueError):
    """Undecodable or unsupported protobuf body."""


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise ProtobufError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(data: bytes) -> Fields:
    """Raw fields of one message: {number: [int | bytes, ...]}."""
    fields: Fields = {}
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        value: Any
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 2:
            length, pos = _varint(data, pos)
            value = data[pos : pos + length]
            pos += length
        elif wire == 1:
            value, pos = data[pos : pos + 8], pos + 8
        elif wire == 5:
            value, pos = data[pos : pos + 4], pos + 4
        else:
            raise ProtobufError(f"unsupported wire type {wire}")
        fields.setdefault(number, []).append(value)
    return fields


def _str(fields: Fields, number: int) -> str | None:
    values = fields.get(number)
    return values[-1].decode() if values else None


def _map(fields: Fields, number: int, value: Callable[[bytes], Any]) -> dict[str, Any] | None:
    entries = fields.get(number)
    if not entries:
        return None
    result = {}
    for raw in entries:
        entry = _fields(raw)
        result[_str(entry, 1) or ""] = value((entry.get(2) or [b""])[-1])
    return result


def _strings(fields: Fields, number: int) -> list[str] | None:
    values = fields.get(number)
    return [v.decode() for v in values] if values else None


def _prune(obj: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if v is not None}


def _metadata(raw: bytes) -> dict[str, Any]:
    f = _fields(raw)
    # proto3 cannot tell "" from unset; Kubernetes treats both as unset.
    return _prune_empty(
        {
            "name": _str(f, 1),
            "generateName": _str(f, 2),
            "namespace": _str(f, 3),
            "labels": _map(f, 11, bytes.decode),
            "annotations": _map(f, 12, bytes.decode),
            "finalizers": _strings(f, 14),
        }
    )


def _prune_empty(obj: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if v}


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _quantity(raw: bytes) -> str:
    return _str(_fields(raw), 1) or "0"


def _secret(f: Fields) -> dict[str, Any]:
    return _prune(
        {"data": _map(f, 2, _b64), "type": _str(f, 3), "stringData": _map(f, 4, bytes.decode)}
    )


def _configmap(f: Fields) -> dict[str, Any]:
    return _prune({"data": _map(f, 2, bytes.decode), "binaryData": _map(f, 3, _b64)})


def _namespace(f: Fields) -> dict[str, Any]:
    del f
    return {}


def _serviceaccount(f: Fields) -> dict[str, Any]:
    del f
    return {}


def _resourcequota(f: Fields) -> dict[str, Any]:
    spec_raw = f.get(2)
    if not spec_raw:
        return {}
    spec = _fields(spec_raw[-1])
    return {"spec": _prune({"hard": _map(spec, 1, _quantity), "scopes": _strings(spec, 2)})}


def _varint_field(fields: Fields, number: int) -> int | None:
    values = fields.get(number)
    return int(values[-1]) if values else None


def _delete_options(f: Fields) -> dict[str, Any]:
    out: dict[str, Any] = {}
    grace = _varint_field(f, 1)
    if grace is not None:
        out["gracePeriodSeconds"] = grace
    if f.get(2):
        pre = _fields(f[2][-1])
        out["preconditions"] = _prune_empty({"uid": _str(pre, 1), "resourceVersion": _str(pre, 2)})
    orphan = _varint_field(f, 3)
    if orphan is not None:
        out["orphanDependents"] = bool(orphan)
    if _str(f, 4):
        out["propagationPolicy"] = _str(f, 4)
    if _strings(f, 5):
        out["dryRun"] = _strings(f, 5)
    return out


def _access_review(f: Fields) -> dict[str, Any]:
    spec = _fields(f[2][-1]) if f.get(2) else {}
    out: dict[str, Any] = {}
    if spec.get(1):
        attrs = _fields(spec[1][-1])
        names = ("namespace", "verb", "group", "version", "resource", "subresource", "name")
        out["resourceAttributes"] = _prune_empty(
            {n: _str(attrs, i) for i, n in enumerate(names, 1)}
        )
    if spec.get(2):
        attrs = _fields(spec[2][-1])
        out["nonResourceAttributes"] = _prune_empty(
            {"path": _str(attrs, 1), "verb": _str(attrs, 2)}
        )
    return {"spec": out}


_KINDS: dict[str, Callable[[Fields], dict[str, Any]]] = {
    "DeleteOptions": _delete_options,
    "SelfSubjectAccessReview": _access_review,
    "Secret": _secret,
    "ConfigMap": _configmap,
    "Namespace": _namespace,
    "ServiceAccount": _serviceaccount,
    "ResourceQuota": _resourcequota,
}


def decode(body: bytes) -> dict[str, Any]:
    """The JSON-shaped object inside a Kubernetes protobuf envelope."""
    if not body.startswith(MAGIC):
        raise ProtobufError("missing the k8s protobuf envelope")
    unknown = _fields(body[len(MAGIC) :])
    type_meta = _fields((unknown.get(1) or [b""])[-1])
    api_version, kind = _str(type_meta, 1) or "v1", _str(type_meta, 2) or ""
    if kind not in _KINDS:
        raise ProtobufError(
            f"protobuf bodies of kind {kind!r} are not supported by the harness; send JSON"
        )
    message = _fields((unknown.get(2) or [b""])[-1])
    obj: dict[str, Any] = {"apiVersion": api_version, "kind": kind}
    if kind != "DeleteOptions":  # the only kind here without ObjectMeta
        obj["metadata"] = _metadata(message[1][-1]) if message.get(1) else {}
    obj.update(_KINDS[kind](message))
    return obj
