"""The Generator factory behind `tuneloop eval` / `tuneloop compare` when given checkpoints or models."""

from __future__ import annotations

from pathlib import Path

from infra.config import BadInputError
from training_core import ServiceClient
from training_core.checkpoint import MANIFEST, CheckpointError
from training_core.textgen import SamplingGenerator


def make_generator(spec: str) -> SamplingGenerator:
    """A training_core checkpoint dir (adapter over its recorded base model), or a base model (preset/dir/hub id).

    A checkpoint that fails verification (no manifest, a file missing or not matching its sha256) is bad input:
    a one-line BadInputError naming the file (the CLI prints it and exits 2), never a traceback.
    """
    service = ServiceClient()
    path = Path(spec)
    # a dir with a manifest or trainer state is a checkpoint, even when corrupt: never load it as a base model
    if (path / "trainer_state.json").is_file() or (path / MANIFEST).is_file():
        try:
            client = service.create_sampling_client(model_path=spec)
        except CheckpointError as e:
            raise BadInputError(f"corrupt checkpoint: {' '.join(str(e).split())}") from None
        name = path.name
    else:
        client = service.create_sampling_client(base_model=spec)
        name = f"base:{spec}"
    return SamplingGenerator(client, name)
