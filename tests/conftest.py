"""Shared test set-up: offline, no telemetry (the same defaults every entry point applies)."""

from __future__ import annotations

from tuneloop_cli.env import apply_env_defaults

# Before any heavy import, so HF/MLflow/Prefect never reach a hub or phone home.
apply_env_defaults()
