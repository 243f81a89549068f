"""Process environment for every entry point: offline, no telemetry, state under .tuneloop.

Must run before prefect / mlflow / transformers are imported: they read these at import time.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULTS = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "TOKENIZERS_PARALLELISM": "false",
    # transformers' "Loading weights" bar: a 0.01 s bar reading thousands of it/s on every model load
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "DS_ACCELERATOR": "cpu",
    # the ephemeral Prefect API server needs more than the default 20 s on a busy 2-core machine
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
}


def apply_env_defaults(create_dirs: bool = True) -> None:
    """Set the defaults; `create_dirs=False` writes nothing (the CLI creates them only once a command runs,
    so a refused input leaves no trace)."""
    for k, v in DEFAULTS.items():
        os.environ.setdefault(k, v)
    os.environ.setdefault("PREFECT_HOME", str(Path(".tuneloop/prefect").resolve()))
    if create_dirs:
        ensure_state_dirs()
    quiet_known_warnings()


def quiet_known_warnings() -> None:
    """Warnings every run printed that say nothing a tuneloop user can act on."""
    import warnings

    # transformers' deprecation notices about its own internals (`is_gradient_checkpointing`, called by peft
    # on every adapter load), issued from transformers' modules
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers(\.|$)")


def ensure_state_dirs() -> None:
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)  # prefect will not create parents
