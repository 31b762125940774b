"""`vlp versions|query|report` sub-commands (registered by vlp_core.cli)."""
from __future__ import annotations


def register(subparsers) -> None:
    """Add the catalog's sub-commands.  Heavy imports go inside the handlers."""
