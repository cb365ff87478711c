"""The three patch flavours of the Kubernetes API.

* `application/merge-patch+json` (RFC 7386);
* `application/json-patch+json` (RFC 6902, via the jsonpatch library);
* `application/strategic-merge-patch+json`: an approximation of the server's
  strategic merge for built-in types: merge patch, except that the well-known
  lists are merged by their patchMergeKey (containers by name, conditions by
  type, ...), `finalizers` merge as a set, and `$patch: delete` items and
  `$deleteFromPrimitiveList/<field>` directives are honoured.
"""

from __future__ import annotations

import json
from typing import Any

import jsonpatch

MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"

# patchMergeKey of the list fields we approximate (field name -> key).
_MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "ports": "containerPort",
    "conditions": "type",
    "ownerReferences": "uid",
    "imagePullSecrets": "name",
    "containerStatuses": "name",
    "initContainerStatuses": "name",
    "podIPs": "ip",
    "readinessGates": "conditionType",
}
_SET_LISTS = {"finalizers"}


class PatchError(ValueError):
    """A patch the server cannot apply (-> 422/400)."""


def _clone(value: Any) -> Any:
    """Deep copy of JSON data (a json round-trip is much faster than copy.deepcopy)."""
    return json.loads(json.dumps(value))


def _merge_into(target: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        return patch
    result = target if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merge_into(result.get(key), value)
    return result


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch; returns a new value (inputs untouched)."""
    return _merge_into(_clone(target), _clone(patch))


def json_patch(target: Any, operations: Any) -> Any:
    if not isinstance(operations, list):
        raise PatchError("json patch must be a list of operations")
    try:
        return jsonpatch.JsonPatch(operations).apply(_clone(target))
    except (
        jsonpatch.JsonPatchException,
        jsonpatch.JsonPointerException,
        KeyError,
        IndexError,
        TypeError,
    ) as exc:
        raise PatchError(
            f"the server rejected our request due to an error in our request: {exc}"
        ) from exc


def _merge_keyed_list(target: list[Any], patch: list[Any], key: str) -> list[Any]:
    result: list[Any] = target
    index = {item.get(key): i for i, item in enumerate(result) if isinstance(item, dict)}
    for item in patch:
        if not isinstance(item, dict) or key not in item:
            result.append(item)
            continue
        position = index.get(item[key])
        if item.get("$patch") == "delete":
            if position is not None:
                result[position] = None
            continue
        if position is None:
            index[item[key]] = len(result)
            result.append(_strategic_into({}, item))
        else:
            result[position] = _strategic_into(result[position], item)
    return [item for item in result if item is not None]


def _strategic_into(target: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        return patch
    result = target if isinstance(target, dict) else {}
    deletions = {}
    for key, value in patch.items():
        if key.startswith("$deleteFromPrimitiveList/"):
            deletions[key.split("/", 1)[1]] = value or []
        elif key.startswith("$"):
            continue  # $setElementOrder, $retainKeys, $patch: ordering/hints only
        elif value is None:
            result.pop(key, None)
        elif isinstance(value, list) and key in _MERGE_KEYS:
            current = result.get(key)
            current = current if isinstance(current, list) else []
            result[key] = _merge_keyed_list(current, value, _MERGE_KEYS[key])
        elif isinstance(value, list) and key in _SET_LISTS:
            current = result.get(key)
            current = current if isinstance(current, list) else []
            result[key] = current + [v for v in value if v not in current]
        elif isinstance(value, dict) and value.get("$patch") == "replace":
            result[key] = {k: v for k, v in value.items() if k != "$patch"}
        elif isinstance(value, dict) and value.get("$patch") == "delete":
            result.pop(key, None)
        else:
            result[key] = _strategic_into(result.get(key), value)
    for key, removed in deletions.items():
        if isinstance(result.get(key), list):
            result[key] = [v for v in result[key] if v not in removed]
    return result


def _drop_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def strategic_merge_patch(target: Any, patch: Any) -> Any:
    """Approximate strategic merge patch (see module docstring); returns a new value.

    Strategic merge exists only for built-in types, which the real server decodes
    into Go structs: an explicit null never survives there, wherever it sits (in a
    list item replaced wholesale, a `$patch: replace` map), so none survives here."""
    return _drop_nulls(_strategic_into(_clone(target), _clone(patch)))


def apply_patch(content_type: str, target: dict[str, Any], body: Any) -> Any:
    """Apply a patch of the given media type to `target` (not modified)."""
    media = content_type.split(";", 1)[0].strip()
    if media == MERGE_PATCH:
        return merge_patch(target, body)
    if media == JSON_PATCH:
        return json_patch(target, body)
    if media == STRATEGIC_MERGE_PATCH:
        return strategic_merge_patch(target, body)
    if media == APPLY_PATCH:
        # Server-side apply without field ownership: the applied configuration wins.
        return merge_patch(target, body)
    raise PatchError(f"the server does not support patch type {media!r}")
