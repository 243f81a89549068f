"""The Generator factory behind `tuneloop eval` / `tuneloop compare` when given checkpoints or models."""

from __future__ import annotations

from pathlib import Path

from training_core import ServiceClient
from training_core.textgen import SamplingGenerator


def make_generator(spec: str) -> SamplingGenerator:
    """A training_core checkpoint dir (adapter over its recorded base model), or a base model (preset/dir/hub id)."""
    service = ServiceClient()
    if (Path(spec) / "trainer_state.json").is_file():
        client = service.create_sampling_client(model_path=spec)
        name = Path(spec).name
    else:
        client = service.create_sampling_client(base_model=spec)
        name = f"base:{spec}"
    return SamplingGenerator(client, name)
