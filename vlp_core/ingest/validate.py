"""Validation before anything is downloaded: URL checks, duplicates, caption normalisation.

Every input row gets a verdict: ``None`` (download it) or a final manifest status with a
reason (``invalid_row``, ``refused_url``, ``duplicate_url``).  Caption normalisation never
drops a row: a caption that normalises to nothing becomes an empty string.
"""
from __future__ import annotations

import html
import ipaddress
import os
import re
import socket
from dataclasses import dataclass
from typing import Callable, Optional
from urllib.parse import urlsplit

from vlp_core.config import IngestParams

ALLOWED_SCHEMES = ("http", "https")
_TAG = re.compile(r"<[^>]{0,1000}>")
_SPACE = re.compile(r"\s+")


def normalise_caption(text: Optional[str], max_chars: int) -> str:
    """Remove NUL characters, unescape HTML entities (twice, for double-escaped alt-text),
    strip tags, collapse whitespace and cap the length (on a word boundary when possible)."""
    if text is None:
        return ""
    s = html.unescape(html.unescape(str(text).replace("\x00", "")))
    s = _TAG.sub(" ", s)
    s = _SPACE.sub(" ", s.replace("\u00a0", " ")).strip()
    if len(s) > max_chars:
        cut = s[:max_chars]
        space = cut.rfind(" ")
        s = (cut[:space] if space > max_chars // 2 else cut).rstrip()
    return s


def _address_kind(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> Optional[str]:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_private or ip.is_unspecified or ip.is_reserved or ip.is_multicast:
        return "private"
    return None


def _resolve(host: str) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError, OSError):
        return []
    return sorted({info[4][0] for info in infos})


@dataclass
class UrlValidator:
    """Checks one URL at a time; host resolutions are cached."""

    allow_private_network: bool = False
    resolver: Callable[[str], list[str]] = _resolve

    def __post_init__(self) -> None:
        self._cache: dict[str, Optional[str]] = {}

    def _host_verdict(self, host: str) -> Optional[str]:
        if host in self._cache:
            return self._cache[host]
        verdict: Optional[str] = None
        try:
            kind = _address_kind(ipaddress.ip_address(host))
            if kind:
                verdict = f"host {host} is a {kind} address"
        except ValueError:
            if host == "localhost" or host.endswith(".localhost"):
                verdict = f"host {host} is a loopback name"
            else:
                for addr in self.resolver(host):
                    try:
                        kind = _address_kind(ipaddress.ip_address(addr.split("%")[0]))
                    except ValueError:
                        continue
                    if kind:
                        verdict = f"host {host} resolves to {kind} address {addr}"
                        break
        self._cache[host] = verdict
        return verdict

    def check(self, url: object) -> tuple[Optional[str], Optional[str]]:
        """``(None, None)`` when the URL may be fetched, else ``(status, reason)``."""
        if url is None or not isinstance(url, str) or not url.strip():
            return "invalid_row", "missing url"
        url = url.strip()
        try:
            parts = urlsplit(url)
            host = parts.hostname
            parts.port  # noqa: B018 - raises ValueError for a bad port
        except ValueError as exc:
            return "invalid_row", f"malformed url ({exc})"
        if parts.scheme.lower() not in ALLOWED_SCHEMES:
            scheme = parts.scheme or "none"
            return "refused_url", f"scheme {scheme!r} not allowed (only http and https)"
        if not host:
            return "invalid_row", "url has no host"
        if not self.allow_private_network:
            verdict = self._host_verdict(host.lower())
            if verdict:
                return "refused_url", f"{verdict} (set ingest.allow_private_network=true to allow)"
        return None, None


@dataclass
class Verdicts:
    """Per input row: the cleaned url, the normalised caption and, if refused, status+reason."""

    urls: list[Optional[str]]
    captions: list[str]
    status: list[Optional[str]]
    reason: list[Optional[str]]


def allow_private(params: IngestParams) -> bool:
    """``ingest.allow_private_network``, or ``VLP_ALLOW_PRIVATE_NETWORK=1`` in the environment
    (for ``dvc repro`` of the demo, whose URLs are on its own loopback server)."""
    return bool(params.allow_private_network) or os.environ.get("VLP_ALLOW_PRIVATE_NETWORK") == "1"


def validate_rows(urls: list[Optional[str]], captions: list[Optional[str]], params: IngestParams,
                  validator: Optional[UrlValidator] = None) -> Verdicts:
    """Check every row; the first occurrence of a URL is kept, later ones are duplicates."""
    validator = validator or UrlValidator(allow_private(params))
    seen: dict[str, int] = {}
    out = Verdicts([], [], [], [])
    for i, (url, cap) in enumerate(zip(urls, captions)):
        clean = url.strip() if isinstance(url, str) else None
        status, reason = validator.check(url)
        if status is None and clean is not None:
            if clean in seen:
                status, reason = "duplicate_url", f"same url as row {seen[clean]}"
            else:
                seen[clean] = i
        out.urls.append(clean)
        out.captions.append(normalise_caption(cap, params.max_caption_chars))
        out.status.append(status)
        out.reason.append(reason)
    return out
