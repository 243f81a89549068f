"""Shared test set-up: offline, no telemetry, state under a temp dir."""

from __future__ import annotations

import os

from tuneloop_cli.env import DEFAULTS  # a light module (os, pathlib): nothing heavy is imported yet

# Set before any heavy import so HF/MLflow/Prefect never reach a hub or phone home: the same defaults every
# entry point applies (PREFECT_HOME stays the Makefile's / the caller's).
for _k, _v in DEFAULTS.items():
    os.environ.setdefault(_k, _v)
