"""DeepSpeed ZeRO config templates used by `training_core.distributed` (zero2.json, zero3.json).

The JSON files are the single source of the ZeRO settings; the controller loads one with `load_config` and
only fills in what depends on the run (nothing today: the batch-size fields are bookkeeping, since each
`forward_backward` call is one backward per rank and `optim_step` is the boundary).
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

STAGES = (2, 3)


def load_config(stage: int) -> dict[str, Any]:
    """The ZeRO-`stage` template as a fresh dict (2 or 3)."""
    if stage not in STAGES:
        raise ValueError(f"zero_stage must be one of {STAGES}, got {stage!r}")
    name = f"zero{stage}.json"
    text = resources.files(__package__).joinpath(name).read_text()
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"infra/deepspeed/{name}: invalid JSON at line {e.lineno}: {e.msg}") from e
    got = cfg.get("zero_optimization", {}).get("stage")
    if got != stage:
        raise ValueError(f"infra/deepspeed/{name}: zero_optimization.stage is {got!r}, expected {stage}")
    return cfg
