"""Which failed manifest rows are worth another try (``vlp ingest --retry-failed``).

A row is retried only when it failed to *download* for a reason that may pass on another try:
a timeout, an HTTP 5xx answer, a refused, reset, aborted or dropped connection, a body cut
short, or no result at all (its img2dataset shard failed).  Everything else stays as it is:
rows refused before download (``invalid_row``, ``refused_url``, ``duplicate_url``), images
that failed to decode or resize (``failed_to_resize``), HTTP 4xx answers, opt-outs
(``X-Robots-Tag`` directives in ``ingest.disallowed_header_directives``), connections the
network guard refused (a redirect to a private address, a failed lookup) and any reason not
known to be transient.

The reasons are the ``error_message`` strings img2dataset records (``str()`` of the urllib /
socket exception), e.g. ``HTTP Error 503: Service Unavailable``, ``<urlopen error [Errno 111]
Connection refused>``, ``Remote end closed connection without response``, ``timed out``.
"""
from __future__ import annotations

import re
from typing import Optional, Sequence

# what the manifest says when an img2dataset shard gave no result (vlp_core/ingest/stage.py)
NO_RESULT = "no result from img2dataset"

_HTTP_STATUS = re.compile(r"HTTP Error (\d{3})")
# refusals and opt-outs: never retried, whatever else the message says
_PERMANENT = (
    "refused by the network guard",  # vlp_core/ingest/netguard.py (every hop, every lookup)
    "X-Robots-Tag",  # img2dataset: "Use of image disallowed by X-Robots-Tag directive"
)
_TRANSIENT = (
    NO_RESULT,
    "timed out",  # "timed out", "<urlopen error timed out>", "The read operation timed out", "[Errno 110] Connection timed out"
    "Connection refused",  # [Errno 111]
    "Connection reset",  # [Errno 104] Connection reset by peer
    "Connection aborted",  # [Errno 103] Software caused connection abort
    "Remote end closed connection",  # http.client.RemoteDisconnected
    "IncompleteRead",  # the body was cut short
    "Broken pipe",  # [Errno 32]
    "Network is unreachable",  # [Errno 101]
    "No route to host",  # [Errno 113]
    "EOF occurred in violation of protocol",  # TLS connection dropped
)


def is_transient(status: Optional[str], reason: Optional[str]) -> bool:
    """True when a manifest row with this ``status`` and ``reason`` failed for a reason that may
    pass on another try (see the module doc); False for every other row, successes included."""
    if status != "failed_to_download" or not reason:
        return False
    if any(p in reason for p in _PERMANENT):
        return False
    http = _HTTP_STATUS.search(reason)
    if http:
        return 500 <= int(http.group(1)) <= 599
    return any(t in reason for t in _TRANSIENT)


def transient_rows(statuses: Sequence[Optional[str]], reasons: Sequence[Optional[str]]) -> list[int]:
    """Indices (in order) of the rows :func:`is_transient` says to retry."""
    return [i for i, (s, r) in enumerate(zip(statuses, reasons)) if is_transient(s, r)]


__all__ = ["NO_RESULT", "is_transient", "transient_rows"]
