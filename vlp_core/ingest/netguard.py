"""The network guard: which addresses a download may connect to, checked at connect time.

Only globally routable addresses may be contacted, plus the ``host:port`` entries of
``ingest.allowed_hosts`` (the demo allows its own 127.0.0.1 server and nothing else).

* :func:`address_verdict` says why an address is not allowed (loopback, private, link-local,
  shared 100.64.0.0/10, reserved, multicast, and IPv6 forms that embed such an IPv4 address:
  IPv4-mapped, 6to4 2002::/16, NAT64 64:ff9b::/96, Teredo).
* :func:`guarded_create_connection` replaces ``socket.create_connection`` in img2dataset's
  download processes: it resolves the host once, checks **every** address, and connects to a
  checked address (no second lookup, so a name cannot resolve to a public address at check
  time and to 127.0.0.1 at fetch time).  Every connection goes through it, so every redirect
  hop is checked too.  A failed lookup fails closed.

:mod:`vlp_core.ingest.workers` installs it in img2dataset's download processes.
"""
from __future__ import annotations

import ipaddress
import socket
from typing import Iterable, Optional

_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_SHARED = ipaddress.ip_network("100.64.0.0/10")
_original_create_connection = socket.create_connection
_allowed: frozenset[tuple[str, int]] = frozenset()


class GuardRefused(OSError):
    """A connection the guard does not allow (the message says which and why)."""


def normalise_host(host: str) -> str:
    """Lower case, no trailing dots, no IPv6 brackets ("LOCALHOST." -> "localhost")."""
    return host.strip().strip("[]").rstrip(".").lower()


def parse_allowed(entries: Iterable[str]) -> frozenset[tuple[str, int]]:
    """``["127.0.0.1:8765", "[::1]:80"]`` -> ``{("127.0.0.1", 8765), ("::1", 80)}``; ValueError names a bad entry."""
    out = set()
    for entry in entries:
        text = str(entry).strip()
        host, sep, port = text.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{text!r} is not host:port")
        out.add((normalise_host(host), int(port)))
    return frozenset(out)


def address_verdict(addr: str) -> Optional[str]:
    """None when ``addr`` (an IP address string) may be contacted, else what kind of address it is."""
    try:
        ip = ipaddress.ip_address(addr.split("%", 1)[0])
    except ValueError:
        return "not an IP address"
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF) if ip in _NAT64 else None)
        if ip.teredo:
            for part in ip.teredo:
                kind = address_verdict(str(part))
                if kind:
                    return f"Teredo address embedding a {kind} address"
        if embedded is not None:
            kind = address_verdict(str(embedded))
            return f"IPv6 address embedding a {kind} address {embedded}" if kind else None
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if isinstance(ip, ipaddress.IPv4Address) and ip in _SHARED:
        return "shared (100.64.0.0/10)"
    if ip.is_multicast:
        return "multicast"
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_private:
        return "private"
    if not ip.is_global:
        return "reserved"
    return None


def host_verdict(host: str, port: int, allowed: frozenset[tuple[str, int]], resolver=socket.getaddrinfo
                 ) -> tuple[Optional[str], list[tuple]]:
    """``(None, addrinfos)`` when ``host:port`` may be contacted (the addresses to use), else
    ``(reason, [])``.  An allowed ``host:port`` is resolved but not checked."""
    name = normalise_host(host)
    try:
        infos = resolver(name, port, 0, socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        return f"lookup of {name} failed ({exc}); refused", []
    if not infos:
        return f"lookup of {name} gave no address; refused", []
    if (name, int(port)) in allowed:
        return None, list(infos)
    for info in infos:
        kind = address_verdict(info[4][0])
        if kind:
            return (f"{name}:{port} is a {kind} address" if info[4][0] == name else
                    f"{name}:{port} resolves to {kind} address {info[4][0]}") + \
                " (not in ingest.allowed_hosts)", []
    return None, list(infos)


def guarded_create_connection(address, timeout=socket._GLOBAL_DEFAULT_TIMEOUT, source_address=None, **kwargs):
    """``socket.create_connection`` that connects only to addresses the guard allows."""
    host, port = address[0], int(address[1])
    reason, infos = host_verdict(host, port, _allowed)
    if reason:
        raise GuardRefused(f"refused by the network guard: {reason}")
    error: Optional[OSError] = None
    for family, type_, proto, _, sockaddr in infos:
        sock = socket.socket(family, type_, proto)
        try:
            if timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:
                sock.settimeout(timeout)
            if source_address:
                sock.bind(source_address)
            sock.connect(sockaddr)  # the checked address itself: no second lookup
            return sock
        except OSError as exc:
            error = exc
            sock.close()
    raise error or OSError(f"could not connect to {host}:{port}")


def install(allowed: Iterable[tuple[str, int]] = ()) -> None:
    """Route every new TCP connection of this process through the guard."""
    global _allowed
    _allowed = frozenset(allowed)
    socket.create_connection = guarded_create_connection


def uninstall() -> None:
    global _allowed
    _allowed = frozenset()
    socket.create_connection = _original_create_connection
