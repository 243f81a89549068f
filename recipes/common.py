"""What every recipe's training loop shares: the result type, checkpoint discovery and verification,
starting from a checkpoint (`init_from`), and the per-step metrics history that survives a resume.

Resume contract (all recipes): the run directory's newest committed, verified `step-N` checkpoint is loaded
with its optimizer and the loop continues at step N, so no update is applied twice; a loop's randomness is a
pure function of (seed, step), so a resumed run follows the uninterrupted trajectory.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infra.config import BadInputError
from training_core.checkpoint import CheckpointError, is_committed, verify_checkpoint

log = logging.getLogger(__name__)
_STEP_RE = re.compile(r"step-(\d+)$")


@dataclass
class TrainResult:
    checkpoint: str
    steps: int
    resumed_from: int
    losses: list[tuple[int, float]] = field(default_factory=list)
    eval_loss_before: float | None = None
    eval_loss_after: float | None = None
    metrics_path: str = ""
    # the whole run's train-loss curve: `losses` holds only the steps this attempt ran (after `resumed_from`)
    loss_history: list[tuple[int, float]] = field(default_factory=list)


def read_rows(path: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def latest_checkpoint(ckpt_root: Path) -> tuple[int, str] | None:
    """The newest committed `step-N` checkpoint whose files match their manifest.

    A corrupt one (bit rot, a truncated copy) is skipped with a warning naming it, so a resume falls back to
    the newest valid checkpoint instead of failing every retry on the same file.
    """
    found = []
    for p in ckpt_root.glob("*/weights/step-*"):
        m = _STEP_RE.search(p.name)
        if m and is_committed(p):
            found.append((int(m.group(1)), str(p)))
    for step, path in sorted(found, reverse=True):
        try:
            verify_checkpoint(path)
        except CheckpointError as e:
            # moved aside (kept for inspection): the resumed run saves this step again in the same directory
            aside = Path(path).with_name(f"{Path(path).name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
            Path(path).rename(aside)
            log.warning("checkpoint %s is corrupt (%s); moved to %s, falling back to an older checkpoint",
                        path, e, aside)
            continue
        return step, path
    return None


_LORA_FIELDS = ("rank", "train_attn", "train_mlp", "train_unembed")


def checkpoint_model_values(path: str) -> dict[str, Any]:
    """The `model.*` values a checkpoint was trained with: a client built from it takes these, not the config's."""
    from training_core.state import read_trainer_state

    st = read_trainer_state(path)
    lora = st.get("lora")
    if lora is None:
        raise BadInputError(f"{path} is a full fine-tuning checkpoint; this pipeline trains LoRA adapters")
    return {"base_model": st["base_model"], "base_model_path": st.get("base_model_path"),
            **{k: lora[k] for k in _LORA_FIELDS}, "lora_alpha": float(lora.get("alpha") or lora["rank"])}


def model_mismatches(path: str, model: Any) -> dict[str, tuple[Any, Any]]:
    """`model.*` field -> (checkpoint value, config value) wherever they differ (alpha None means rank)."""
    ck = checkpoint_model_values(path)
    out = {k: (ck[k], getattr(model, k)) for k in _LORA_FIELDS if ck[k] != getattr(model, k)}
    if ck["lora_alpha"] != float(model.lora_alpha or model.rank):
        out["lora_alpha"] = (ck["lora_alpha"], model.lora_alpha)
    if ck["base_model"] != model.base_model:
        from training_core.model_loading import resolve

        if ck["base_model_path"] != resolve(model.base_model):  # a preset name vs its cached dir is no change
            out["base_model"] = (ck["base_model"], model.base_model)
    return out


def describe_mismatches(diffs: dict[str, tuple[Any, Any]]) -> str:
    return "; ".join(f"model.{k}: checkpoint {a!r}, config {b!r}" for k, (a, b) in diffs.items())


def adopt_init_from(cfg: Any, run_dir: Path) -> dict[str, tuple[Any, Any]]:
    """Set `cfg.model` to what training from `cfg.init_from` really uses (the checkpoint's base model and
    LoRA shape), so that the config logged to MLflow is the effective one. Returns what changed."""
    if not cfg.init_from:
        return {}
    diffs = model_mismatches(local_checkpoint(cfg.init_from, run_dir / "init"), cfg.model)
    for k, (ck_value, _) in diffs.items():
        setattr(cfg.model, k, ck_value)
    if diffs:
        log.warning("init_from %s: training uses the checkpoint's values, not the config's (%s)", cfg.init_from,
                    describe_mismatches(diffs))
    return diffs


def local_checkpoint(uri: str, dest: Path) -> str:
    """A local, verified copy of a checkpoint given as a path, file:// or s3:// URI."""
    if "://" not in uri:
        return uri
    if (dest / "manifest.json").exists():
        return str(dest)
    from infra.storage import open_storage

    man = open_storage(uri).download_dir("", dest)
    (dest / "manifest.json").write_bytes(man.to_json())  # training_core verifies against it on load
    return str(dest)


def load_history(path: Path, upto: int) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [r for r in rows if r["step"] <= upto]  # drop metrics of steps the checkpoint does not contain


def write_history(path: Path, history: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in history))
    tmp.replace(path)


def adam_params(train: Any, lr: float) -> Any:
    """AdamW hyper-parameters of a recipe's `train` section (SFT, DPO, distillation) at learning rate `lr`."""
    from training_core import types

    return types.AdamParams(learning_rate=lr, beta1=train.beta1, beta2=train.beta2, eps=train.eps,
                            weight_decay=train.weight_decay, grad_clip_norm=train.grad_clip_norm)
