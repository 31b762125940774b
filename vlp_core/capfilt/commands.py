"""`vlp` sub-commands of vlp_core.capfilt (registered by vlp_core.cli)."""
from __future__ import annotations


def register(subparsers) -> None:
    """Add this package's sub-commands.  Heavy imports go inside the handlers."""
