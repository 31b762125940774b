"""The offline, no-telemetry environment, set by the CLI and the Makefile alike."""
from __future__ import annotations

import os

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "WANDB_MODE": "disabled",
    "WANDB_SILENT": "true",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "60",
    "TOKENIZERS_PARALLELISM": "false",
}


def apply_offline_env() -> None:
    """Set every offline/no-telemetry variable that the user has not set already."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
