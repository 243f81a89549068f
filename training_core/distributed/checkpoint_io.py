"""Rank-independent checkpoints from ZeRO shards, in the single-process engine's format.

Gathering (`safe_get_full_*`) and scattering (`safe_set_full_*`) are collectives: every rank calls these
functions; only rank 0 writes. Files and keys are those of `training_core.state`:

- LoRA: adapter_model.safetensors (PEFT canonical keys) + adapter_config.json,
- full fine-tuning: model.safetensors (HF names) + config/tokenizer files of the base (a loadable HF dir),
- with optimizer: optimizer.safetensors (`{i}.exp_avg`, `{i}.exp_avg_sq`, `{i}.step` in parameter order),
  rng.safetensors (the controller's RNG), trainer_state.json; manifest.json last (`write_checkpoint`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from training_core import state as state_io
from training_core.checkpoint import write_checkpoint
from training_core.distributed.session import Session

MODEL_WEIGHTS = "model.safetensors"
_SKIP_BASE_FILES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")
_OWN_FILES = {
    "manifest.json",
    state_io.TRAINER_STATE,
    state_io.OPTIMIZER,
    state_io.RNG,
    "model.safetensors.index.json",
}


# ---- gather (collective) ---------------------------------------------------------------------------------
def flat_partitions(s: Session) -> list[torch.Tensor]:
    """This rank's flat fp32 master partitions: the tensors AdamW's state is keyed by.

    (ZeRO-3 only puts them in the inner optimizer's param_groups for the duration of its step.)
    """
    zopt = s.engine.optimizer
    flats = getattr(zopt, "fp32_partitioned_groups_flat", None)
    return list(flats if flats is not None else zopt.single_partition_of_fp32_groups)


def has_optimizer_state(s: Session) -> bool:
    inner = s.engine.optimizer.optimizer
    return any("exp_avg" in inner.state.get(p, {}) for p in flat_partitions(s))


def optimizer_step_count(s: Session) -> float:
    inner = s.engine.optimizer.optimizer
    steps = {float(inner.state[p]["step"]) for p in flat_partitions(s) if inner.state.get(p)}
    if len(steps) > 1:
        raise RuntimeError(f"optimizer partitions disagree on the Adam step count: {sorted(steps)}")
    return steps.pop() if steps else 0.0


def gather_params(s: Session) -> dict[str, torch.Tensor]:
    """Full fp32 trainable parameters by checkpoint key (meaningful on rank 0; every rank must call)."""
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for n in s.names:
        full = safe_get_full_fp32_param(s.params[n])
        if full is None:
            raise RuntimeError(f"parameter {n} has no fp32 master copy: is it in the optimizer?")
        if s.rank == 0:
            out[s.key(n)] = full.detach().to("cpu", torch.float32).contiguous().clone()
    return out


def gather_optimizer(s: Session) -> dict[str, torch.Tensor]:
    """`{i}.exp_avg/{i}.exp_avg_sq/{i}.step` over the trainable parameters in order (empty before step 1)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    if not has_optimizer_state(s):
        return {}
    step = optimizer_step_count(s)
    out: dict[str, torch.Tensor] = {}
    for i, n in enumerate(s.names):
        for key in ("exp_avg", "exp_avg_sq"):
            full = safe_get_full_optimizer_state(s.params[n], key)
            if s.rank == 0:
                out[f"{i}.{key}"] = full.detach().to("cpu", torch.float32).contiguous().clone()
        if s.rank == 0:
            out[f"{i}.step"] = torch.tensor([step], dtype=torch.float32)
    return out


# ---- scatter (collective) --------------------------------------------------------------------------------
def set_params(s: Session, sd: dict[str, torch.Tensor], source: str) -> None:
    """Load full fp32 values into the model's (partitioned) weights and into ZeRO's fp32 master copy."""
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param

    want = {s.key(n): n for n in s.names}
    missing, unexpected = sorted(set(want) - set(sd)), sorted(set(sd) - set(want))
    if missing or unexpected:
        raise ValueError(
            f"{source}: tensors do not match the model (missing {missing[:2]}, unexpected {unexpected[:2]})"
        )
    for k, n in want.items():
        p = s.params[n]
        shape = tuple(getattr(p, "ds_shape", p.shape))
        if tuple(sd[k].shape) != shape:
            raise ValueError(f"{source}: {k} has shape {tuple(sd[k].shape)}, the model has {shape}")
    for k, n in want.items():
        p, value = s.params[n], sd[k].to(torch.float32)
        if s.zero_stage == 3:
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0), torch.no_grad():
                p.data.copy_(value.to(p.device))  # rank 0's copy is re-partitioned on exit
        else:
            with torch.no_grad():
                p.data.copy_(value.to(p.device))
        safe_set_full_fp32_param(p, value.to(p.device))


def ensure_optimizer_state(s: Session) -> None:
    """Create AdamW's (zero) state on the flat ZeRO partitions, as its first step would, and link it."""
    inner = s.engine.optimizer.optimizer
    for p in flat_partitions(s):
        st = inner.state[p]
        if "exp_avg" not in st:
            st["step"] = torch.tensor(0.0)
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    zopt = s.engine.optimizer
    if hasattr(zopt, "_hp_optimizer_states_linked"):  # ZeRO-1/2 map per-parameter views lazily
        zopt._hp_optimizer_states_linked = False
        zopt._lazy_init_hp_params_optimizer_state()


def set_optimizer(s: Session, opt: dict[str, torch.Tensor], names: list[str], source: str) -> None:
    from deepspeed.utils import safe_set_full_optimizer_state

    keys = [s.key(n) for n in s.names]
    if names != keys:
        diff = next(
            (i for i, (a, b) in enumerate(zip(names, keys, strict=False)) if a != b),
            min(len(names), len(keys)),
        )
        raise ValueError(
            f"{source}: optimizer parameter layout differs from the client's parameters "
            f"({len(names)} vs {len(keys)} names, first difference at index {diff})"
        )
    steps = {float(opt[f"{i}.step"].reshape(())) for i in range(len(keys)) if f"{i}.step" in opt}
    if len(steps) > 1:
        raise ValueError(
            f"{source}: parameters have different Adam step counts {sorted(steps)}; ZeRO keeps one"
        )
    ensure_optimizer_state(s)
    inner = s.engine.optimizer.optimizer
    step = steps.pop() if steps else 0.0
    for p in flat_partitions(s):
        inner.state[p]["step"] = torch.tensor(step)
    for i, n in enumerate(s.names):
        p = s.params[n]
        for key in ("exp_avg", "exp_avg_sq"):
            value = opt.get(f"{i}.{key}")
            value = torch.zeros(tuple(getattr(p, "ds_shape", p.shape))) if value is None else value
            safe_set_full_optimizer_state(p, value.to(torch.float32).to(p.device), key)


# ---- files -----------------------------------------------------------------------------------------------
def _base_files(model_path: str) -> list[Path]:
    base = Path(model_path)
    return [
        f
        for f in sorted(base.iterdir())
        if f.is_file()
        and not f.name.endswith(_SKIP_BASE_FILES)
        and f.name not in _OWN_FILES
        and not f.name.startswith(".")
    ]


def save(s: Session, args: dict[str, Any]) -> dict[str, str]:
    """Gather on all ranks; rank 0 writes and commits the checkpoint: {"path"} or {"error"} on rank 0.

    A failed write (disk full, name taken) is reported, not raised: the ranks' training state is unchanged,
    so the pool stays usable.
    """
    with_optimizer = args["kind"] == "state"
    params = gather_params(s)
    opt = gather_optimizer(s) if with_optimizer else {}
    if s.rank != 0:
        return {}
    trainer: dict[str, Any] = dict(args["trainer"])  # base_model, lora, ... from the controller
    trainer.update(step=s.step, kind=args["kind"], base_model_path=s.model_path, full_finetune=s.lora is None)
    writers: dict[str, Any] = {}
    if s.lora is not None:
        peft_cfg = s.peft_config_dict()
        writers[state_io.ADAPTER_WEIGHTS] = lambda p: save_file(params, str(p))
        writers[state_io.ADAPTER_CONFIG] = lambda p: p.write_text(
            json.dumps(peft_cfg, indent=2, sort_keys=True)
        )
    else:
        tied = s.model.config.to_dict().get("tie_word_embeddings")
        writers[MODEL_WEIGHTS] = lambda p: save_file(params, str(p), metadata={"format": "pt"})
        for f in _base_files(s.model_path):  # tokenizer, chat template, generation config: a loadable HF dir
            if f.name != "config.json":
                writers[f.name] = lambda p, f=f: shutil.copyfile(f, p)
        cfg_json = s.model.config.to_json_string()
        writers["config.json"] = lambda p: p.write_text(cfg_json)
        trainer["tie_word_embeddings"] = tied
    if with_optimizer:
        rng_t = args["rng_tensors"]
        trainer.update(param_names=[s.key(n) for n in s.names], rng=args["rng_json"], has_optimizer=bool(opt))
        if s.hparams is not None:
            trainer["optimizer_hparams"] = dict(s.hparams)
        writers[state_io.OPTIMIZER] = lambda p: save_file(opt or {"empty": torch.zeros(1)}, str(p))
        writers[state_io.RNG] = lambda p: save_file(rng_t, str(p))
    writers[state_io.TRAINER_STATE] = lambda p: p.write_text(json.dumps(trainer, indent=2, sort_keys=True))
    meta = {**trainer, **(args.get("metadata") or {})}
    meta.pop("rng", None)
    meta.pop("param_names", None)
    try:
        return {"path": str(write_checkpoint(args["path"], writers, meta))}
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"}


def load(s: Session, args: dict[str, Any]) -> int:
    """Every rank reads the (already verified) files and sets its shards. Returns the restored step."""
    p = Path(args["path"])
    trainer = json.loads((p / state_io.TRAINER_STATE).read_text())
    is_full = trainer.get("full_finetune", False) or trainer.get("lora") is None
    if is_full != (s.lora is None):
        kind = "full fine-tuning" if is_full else "LoRA"
        raise ValueError(
            f"checkpoint {p} holds {kind} weights; the client is "
            f"{'full fine-tuning' if s.lora is None else 'LoRA'}"
        )
    if s.lora is not None and trainer["lora"]["rank"] != s.lora.rank:
        raise ValueError(
            f"checkpoint {p} has LoRA rank {trainer['lora']['rank']}, the client has {s.lora.rank}"
        )
    weights = state_io.ADAPTER_WEIGHTS if s.lora is not None else MODEL_WEIGHTS
    sd = load_file(str(p / weights))
    if s.lora is None and "lm_head.weight" not in s.names:  # tied to the embedding: one tensor in the model
        sd.pop("lm_head.weight", None)
    with_optimizer = bool(args["with_optimizer"])
    if with_optimizer and trainer.get("kind") != "state":
        raise ValueError(f"checkpoint {p} holds sampler weights only; it has no optimizer state to load")
    set_params(s, sd, str(p))
    s.pending_grads = False
    if not with_optimizer:
        if has_optimizer_state(
            s
        ):  # weights only: the optimizer starts fresh, as in the single-process engine
            ensure_optimizer_state(s)
            set_optimizer(s, {}, [s.key(n) for n in s.names], str(p))
        s.step, s.hparams = 0, None
        return 0
    hp = trainer.get("optimizer_hparams")
    s.hparams = {**hp, "betas": list(hp["betas"])} if hp else None
    if trainer.get("has_optimizer"):
        set_optimizer(s, load_file(str(p / state_io.OPTIMIZER)), list(trainer["param_names"]), str(p))
    elif has_optimizer_state(s):
        set_optimizer(s, {}, [s.key(n) for n in s.names], str(p))
    s.step = int(trainer["step"])
    return s.step
