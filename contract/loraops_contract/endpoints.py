"""Which storage endpoints point at the node, the pod or the cloud's metadata service.

Torch-free and dependency-free on purpose: the operator's admin-policy check
(`allowPrivateEndpoints`, also run by its admission webhook) and the trainer's
connect-time check (storage.py) both call `host_refusal` / `address_refusal`, so the
two can never disagree about what counts as a private endpoint.

A host is judged by every address some client could take it for, not by how it is
spelled: `127.1`, `0x7f000001`, `2130706433` and `0177.0.0.1` are all 127.0.0.1 to
libc's `inet_aton`, curl and WHATWG URL parsers, and `[::ffff:169.254.169.254]`,
`[64:ff9b::a9fe:a9fe]` (NAT64) or `[2002:a9fe:a9fe::]` (6to4) reach an IPv4 address
through IPv6. A name is judged by what it resolves to, at connect time, in the trainer.

Refused: loopback, link-local (cloud metadata at 169.254.169.254), unspecified and
"this network", multicast, broadcast and reserved addresses, and the known metadata
addresses outside those ranges (AWS's fd00:ec2::254, Alibaba's 100.100.100.200).
Private ranges (10/8, 172.16/12, 192.168/16, fc00::/7) are allowed: an in-cluster
S3 service has such an address. Admins narrow endpoints further with
`allowedS3Endpoints` and an egress NetworkPolicy.
"""

from __future__ import annotations

import ipaddress
import re

__all__ = ["IPAddress", "address_refusal", "host_addresses", "host_refusal"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Names that mean "this machine" or the metadata service without any DNS lookup.
_LOCAL_NAMES = frozenset({"localhost", "metadata", "metadata.google.internal"})
_METADATA = frozenset(
    {
        ipaddress.ip_address("fd00:ec2::254"),  # AWS IMDS over IPv6 (a ULA address)
        ipaddress.ip_address("100.100.100.200"),  # Alibaba Cloud (a CGNAT address)
    }
)
_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")  # deprecated ::a.b.c.d
_IPV4_TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")  # SIIT ::ffff:0:a.b.c.d
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052 well-known prefix
# RFC 8215 local-use NAT64 prefixes: the site picks the prefix length, so the IPv4
# address inside cannot be told from the address alone; the whole range is refused.
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
_AMBIGUOUS_DECIMAL = re.compile(r"^[0-9]+(\.[0-9]+){3}$")


def host_refusal(host: str) -> str | None:
    """Why `host` (a URL's host, brackets optional) is a private endpoint, or None.

    e.g. "127.1 (127.0.0.1) is a loopback address".
    """
    name = _bare(host)
    if name.rstrip(".") in _LOCAL_NAMES or name.rstrip(".").endswith(".localhost"):
        return f"{host} names the local machine or the metadata service"
    for ip in sorted(host_addresses(name), key=str):
        if why := address_refusal(ip):
            spelled = "" if str(ip) == name else f" ({ip})"
            return f"{host}{spelled} is {why}"
    return None


def address_refusal(ip: IPAddress) -> str | None:
    """What kind of private address `ip` is ("a loopback address", ...), or None."""
    if ip in _METADATA:
        return "a cloud metadata service address"
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(ip)
        if embedded:
            return next(
                (f"{why} (IPv4 {v4} inside IPv6)" for v4 in embedded if (why := _v4(v4))),
                None,
            )
        if ip in _NAT64_LOCAL:
            return "a local-use NAT64 address (its IPv4 address cannot be told)"
        return _v6(ip)
    return _v4(ip)


def host_addresses(host: str) -> set[IPAddress]:
    """Every IP address some client reads `host` as; empty for a DNS name.

    IPv4 in every inet_aton spelling (1-4 dot-separated parts, each decimal, 0-octal
    or 0x-hex, the last one filling the remaining bytes, one trailing dot allowed as
    WHATWG URL parsers do), plus the all-decimal reading that parsers ignoring leading
    zeros make of `0177.0.0.1`; IPv6 without its zone (`%eth0`).
    """
    name = _bare(host).lower()
    try:
        return {ipaddress.ip_address(name.split("%", 1)[0])}
    except ValueError:
        pass
    name = name.removesuffix(".")
    found: set[IPAddress] = set()
    if (value := _inet_aton(name)) is not None:
        found.add(ipaddress.IPv4Address(value))
    if _AMBIGUOUS_DECIMAL.match(name):
        parts = [int(p) for p in name.split(".")]
        if all(p < 256 for p in parts):
            found.add(ipaddress.IPv4Address(".".join(map(str, parts))))
    return found


def _bare(host: str) -> str:
    host = host.strip()
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def _inet_aton(text: str) -> int | None:
    """The address glibc's inet_aton (and curl, and WHATWG URLs) make of `text`."""
    parts = text.split(".")
    if not 1 <= len(parts) <= 4:
        return None
    values = [_aton_number(p) for p in parts]
    if any(v is None for v in values):
        return None
    numbers = [v for v in values if v is not None]
    *head, last = numbers
    if any(v > 255 for v in head) or last >= 256 ** (5 - len(numbers)):
        return None
    value = last
    for i, v in enumerate(head):
        value += v << (8 * (3 - i))
    return value


def _aton_number(part: str) -> int | None:
    try:
        if part[:2] in ("0x", "0X"):
            return int(part[2:] or "0", 16)  # WHATWG reads a bare "0x" as 0
        if len(part) > 1 and part.startswith("0"):
            return int(part, 8)
        return int(part, 10) if part.isdigit() else None
    except ValueError:
        return None


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses that `ip` reaches or stands for (mapped, compatible, NAT64, ...)."""
    low32 = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.ipv4_mapped is not None:
        return [ip.ipv4_mapped]
    if ip in _IPV4_TRANSLATED or ip in _NAT64:
        return [low32]
    if ip in _IPV4_COMPATIBLE and int(ip) > 1:  # :: and ::1 are IPv6's own
        return [low32]
    if ip.sixtofour is not None:
        return [ip.sixtofour]
    if ip.teredo is not None:
        return list(ip.teredo)
    return []


def _v4(ip: ipaddress.IPv4Address) -> str | None:
    checks = (
        (ip.is_loopback, "a loopback address"),
        (ip.is_link_local, "a link-local address (the cloud metadata service lives there)"),
        (ip in _THIS_NETWORK, "an unspecified (this-network) address"),
        (ip.is_multicast, "a multicast address"),
        (ip.is_reserved, "a reserved (or broadcast) address"),
    )
    return next((why for hit, why in checks if hit), None)


def _v6(ip: ipaddress.IPv6Address) -> str | None:
    checks = (
        (ip.is_loopback, "a loopback address"),
        (ip.is_unspecified, "an unspecified address"),
        (ip.is_link_local, "a link-local address"),
        (ip.is_site_local, "a site-local address"),
        (ip.is_multicast, "a multicast address"),
        (ip.is_reserved, "a reserved address"),
    )
    return next((why for hit, why in checks if hit), None)
