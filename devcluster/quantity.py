"""Kubernetes resource quantities ("500m", "16Gi", "1e3") as exact fractions."""

from __future__ import annotations

import functools
import re
from fractions import Fraction

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


# The same few strings ("1", "16Gi", "500m") come back for every container;
# Fractions are immutable, so sharing them is safe.
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
