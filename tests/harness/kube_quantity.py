"""Kubernetes resource quantities ("500m", "16Gi", "1e3") as exact fractions."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from fractions import Fraction
from typing import Any

_QUANTITY = re.compile(r"^(?P<number>[+-]?(\d+\.?\d*|\.\d+))(?P<suffix>[a-zA-Z]*|[eE][+-]?\d+)$")
_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {
    "n": Fraction(1, 10**9),
    "u": Fraction(1, 10**6),
    "m": Fraction(1, 1000),
    "": Fraction(1),
    "k": Fraction(10**3),
    "M": Fraction(10**6),
    "G": Fraction(10**9),
    "T": Fraction(10**12),
    "P": Fraction(10**15),
    "E": Fraction(10**18),
}


class QuantityError(ValueError):
    """Not a valid quantity string."""


def parse_quantity(value: str | int | float) -> Fraction:
    """Exact value of a quantity; raises QuantityError with the server's wording."""
    if isinstance(value, bool):
        raise QuantityError(f"quantities must match the regular expression; got {value!r}")
    if isinstance(value, int | float):
        return Fraction(str(value))
    return _parse_string(value)


# The same few strings ("1", "16Gi", "500m") come back for every pod the scheduler
# and the quota checks look at; Fractions are immutable, so sharing them is safe.
@functools.lru_cache(maxsize=4096)
def _parse_string(value: str) -> Fraction:
    match = _QUANTITY.match(value.strip())
    if not match:
        raise QuantityError(
            f"quantities must match the regular expression "
            f"'^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'; got {value!r}"
        )
    number = Fraction(match["number"])
    suffix = match["suffix"]
    if suffix in _BINARY:
        return number * _BINARY[suffix]
    if suffix in _DECIMAL:
        return number * _DECIMAL[suffix]
    if suffix[:1] in ("e", "E"):
        return number * Fraction(10) ** int(suffix[1:])
    raise QuantityError(f"unknown quantity suffix {suffix!r} in {value!r}")


def sum_containers(
    pod: dict[str, Any], pick: Callable[[dict[str, Any]], dict[str, Any]]
) -> dict[str, Fraction]:
    """The quantities `pick` returns for each container of `pod`, summed per resource;
    invalid quantities are skipped (the API server rejects them at create)."""
    totals: dict[str, Fraction] = {}
    for container in (pod.get("spec") or {}).get("containers") or []:
        for key, value in pick(container.get("resources") or {}).items():
            try:
                totals[key] = totals.get(key, Fraction(0)) + parse_quantity(value)
            except QuantityError:
                continue
    return totals


def pod_requests(pod: dict[str, Any]) -> dict[str, Fraction]:
    """What a pod's containers ask for, summed per resource: a request, or the limit
    when no request is given, as the scheduler counts them."""
    return sum_containers(
        pod, lambda res: {**(res.get("limits") or {}), **(res.get("requests") or {})}
    )


def format_quantity(value: Fraction) -> str:
    """Canonical-ish rendering: integers plain (binary suffix when exact), else milli-units."""
    if value.denominator == 1:
        integer = value.numerator
        for suffix, factor in reversed(_BINARY.items()):
            if integer and integer % factor == 0:
                return f"{integer // factor}{suffix}"
        return str(integer)
    millis = value * 1000
    if millis.denominator == 1:
        return f"{millis.numerator}m"
    return str(float(value))
