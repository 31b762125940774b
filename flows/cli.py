"""The ``vlp`` program: :mod:`vlp_core.cli`'s stage commands plus the Prefect faces of
:mod:`flows.commands` (``run``, ``cycles``, ``deploy``, ``demo``).

It sits above both layers, so ``vlp_core`` never imports ``flows``.
"""
from __future__ import annotations

import sys
from typing import Sequence

from vlp_core.cli import COMMAND_MODULES
from vlp_core.cli import main as core_main

MODULES = (*COMMAND_MODULES, "flows.commands")


def main(argv: Sequence[str] | None = None) -> int:
    return core_main(argv, MODULES)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
