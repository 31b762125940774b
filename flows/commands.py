"""`vlp run|cycles|deploy|demo` sub-commands (the Prefect faces) (registered by vlp_core.cli)."""
from __future__ import annotations


def register(subparsers) -> None:
    """Add the flows sub-commands.  Heavy imports go inside the handlers."""
