"""Validation before anything is downloaded: URL checks, duplicates, caption normalisation.

Every input row gets a verdict: ``None`` (download it) or a final manifest status with a
reason (``invalid_row``, ``refused_url``, ``duplicate_url``).  Caption normalisation never
drops a row: a caption that normalises to nothing becomes an empty string.
"""
from __future__ import annotations

import html
import os
import re
import socket
from dataclasses import dataclass
from typing import Callable, Optional
from urllib.parse import urlsplit

from vlp_core.config import IngestParams
from vlp_core.ingest.netguard import address_verdict, normalise_host, parse_allowed

ALLOWED_SCHEMES = ("http", "https")
DEFAULT_PORTS = {"http": 80, "https": 443}
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


def _resolve(host: str) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError, OSError):
        return []
    return sorted({info[4][0] for info in infos})


@dataclass
class UrlValidator:
    """Checks one URL at a time, before download; host resolutions are cached.

    This early check gives refused rows their reason in the manifest; the authority is the
    connect-time guard in the download processes (:mod:`vlp_core.ingest.netguard`), which
    checks every hop and every address again.  A name whose lookup fails here is passed on (the
    download fails closed on it)."""

    allowed_hosts: frozenset = frozenset()  # {(host, port)} from netguard.parse_allowed
    resolver: Callable[[str], list[str]] = _resolve

    def __post_init__(self) -> None:
        self._cache: dict[str, Optional[str]] = {}

    def _host_verdict(self, host: str) -> Optional[str]:
        if host in self._cache:
            return self._cache[host]
        verdict: Optional[str] = None
        kind = address_verdict(host)
        if kind != "not an IP address":
            if kind:
                verdict = f"host {host} is a {kind} address"
        elif host == "localhost" or host.endswith(".localhost"):
            verdict = f"host {host} is a loopback name"
        else:
            for addr in self.resolver(host):
                kind = address_verdict(addr)
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
            port = parts.port  # raises ValueError for a bad port
        except ValueError as exc:
            return "invalid_row", f"malformed url ({exc})"
        scheme = parts.scheme.lower()
        if scheme not in ALLOWED_SCHEMES:
            return "refused_url", f"scheme {parts.scheme or 'none'!r} not allowed (only http and https)"
        if not host:
            return "invalid_row", "url has no host"
        host = normalise_host(host)
        if (host, port or DEFAULT_PORTS[scheme]) in self.allowed_hosts:
            return None, None
        verdict = self._host_verdict(host)
        if verdict:
            return "refused_url", f"{verdict} (not in ingest.allowed_hosts)"
        return None, None


@dataclass
class Verdicts:
    """Per input row: the cleaned url, the normalised caption and, if refused, status+reason."""

    urls: list[Optional[str]]
    captions: list[str]
    status: list[Optional[str]]
    reason: list[Optional[str]]


def allowed_hosts(params: IngestParams) -> frozenset[tuple[str, int]]:
    """``ingest.allowed_hosts`` plus the comma-separated ``VLP_ALLOWED_HOSTS`` of the environment
    (for ``dvc repro`` of the demo, whose URLs are on its own 127.0.0.1 server)."""
    extra = [h for h in os.environ.get("VLP_ALLOWED_HOSTS", "").split(",") if h.strip()]
    return parse_allowed([*params.allowed_hosts, *extra])


def validate_rows(urls: list[Optional[str]], captions: list[Optional[str]], params: IngestParams,
                  validator: Optional[UrlValidator] = None) -> Verdicts:
    """Check every row; the first occurrence of a URL is kept, later ones are duplicates."""
    validator = validator or UrlValidator(allowed_hosts(params))
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
