"""Training state <-> checkpoint files: adapter (PEFT format), optimizer moments, step and RNG state."""

from __future__ import annotations

import json
import random
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from training_core.checkpoint import verify_checkpoint, write_checkpoint
from training_core.engine import AdapterState, Engine, NonFiniteError
from training_core.types import LoraConfig

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
OPTIMIZER = "optimizer.safetensors"
RNG = "rng.safetensors"
TRAINER_STATE = "trainer_state.json"


def _peft_config_dict(engine: Engine, adapter: str) -> dict[str, Any]:
    cfg = engine.model.peft_config[adapter].to_dict()  # type: ignore[union-attr,index]
    cfg = {k: (sorted(v) if isinstance(v, set) else v) for k, v in cfg.items()}
    cfg["base_model_name_or_path"] = engine.base.path
    return cfg


def canonical_key(param_name: str, adapter: str) -> str:
    """PEFT's on-disk key (adapter name removed), e.g. `...q_proj.lora_A.weight`."""
    return param_name.replace(f".{adapter}.", ".")


def adapter_tensors(engine: Engine, adapter: str) -> dict[str, torch.Tensor]:
    st = engine.adapters[adapter]
    return {canonical_key(n, adapter): p.detach().to(torch.float32).contiguous().clone() for n, p in st.params.items()}


def set_adapter_tensors(engine: Engine, adapter: str, sd: dict[str, torch.Tensor], source: str) -> None:
    st = engine.adapters[adapter]
    want = {canonical_key(n, adapter): n for n in st.params}
    missing, unexpected = sorted(set(want) - set(sd)), sorted(set(sd) - set(want))
    if missing or unexpected:
        raise ValueError(f"{source}: adapter tensors do not match the model (missing {missing[:2]}, "
                         f"unexpected {unexpected[:2]})")
    with torch.no_grad():
        for k, n in want.items():
            prm = st.params[n]
            if prm.shape != sd[k].shape:
                raise ValueError(f"{source}: {k} has shape {tuple(sd[k].shape)}, the model has {tuple(prm.shape)}")
            prm.data = sd[k].to(torch.float32).clone()
    st.version += 1  # new weights: the sampler's cached decoder weights for this adapter are stale


def _optimizer_tensors(st: AdapterState) -> tuple[dict[str, torch.Tensor], list[str]]:
    names = list(st.params)  # optimizer slots are saved in this order, keyed by index
    out: dict[str, torch.Tensor] = {}
    if st.optimizer is None:
        return out, names
    state = st.optimizer.state
    for i, n in enumerate(names):
        s = state.get(st.params[n])
        if not s:
            continue
        out[f"{i}.exp_avg"] = s["exp_avg"].contiguous()
        out[f"{i}.exp_avg_sq"] = s["exp_avg_sq"].contiguous()
        out[f"{i}.step"] = torch.as_tensor(s["step"], dtype=torch.float32).reshape(1)
    return out, [canonical_key(n, st.name) for n in names]


def rng_snapshot() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    np_state = np.random.get_state()
    py_state = random.getstate()
    js = {
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return {"torch": torch.get_rng_state()}, js


def rng_restore(tensors: dict[str, torch.Tensor], js: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    p = js["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    n = js["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))


def save_adapter_checkpoint(
    engine: Engine, adapter: str, path: str | Path, *, with_optimizer: bool, metadata: dict[str, Any] | None = None
) -> Path:
    st = engine.adapters[adapter]
    adapter_sd = adapter_tensors(engine, adapter)
    # Last line of defence (the engine refuses non-finite steps): a NaN adapter must never become a checkpoint
    # that a resume or a registry promotion would pick up. One pass over the adapter, at save time only.
    bad = [k for k, v in adapter_sd.items() if not bool(torch.isfinite(v).all())]
    if bad:
        raise NonFiniteError(f"refusing to save {path}: adapter tensors hold NaN/inf ({len(bad)}, e.g. {bad[0]})")
    peft_cfg = _peft_config_dict(engine, adapter)
    trainer: dict[str, Any] = {
        "base_model": engine.base.name,
        "base_model_path": engine.base.path,
        "lora": asdict(st.lora),
        "step": st.step,
        "kind": "state" if with_optimizer else "sampler",
    }
    writers = {
        ADAPTER_WEIGHTS: lambda p: save_file(adapter_sd, str(p)),
        ADAPTER_CONFIG: lambda p: p.write_text(json.dumps(peft_cfg, indent=2, sort_keys=True)),
    }
    if with_optimizer:
        opt_sd, names = _optimizer_tensors(st)
        rng_t, rng_js = rng_snapshot()
        trainer.update(param_names=names, rng=rng_js, has_optimizer=bool(opt_sd))
        if st.optimizer is not None:
            g = st.optimizer.param_groups[0]
            trainer["optimizer_hparams"] = {"lr": g["lr"], "betas": list(g["betas"]), "eps": g["eps"],
                                            "weight_decay": g["weight_decay"]}
        writers[OPTIMIZER] = lambda p: save_file(opt_sd or {"empty": torch.zeros(1)}, str(p))
        writers[RNG] = lambda p: save_file(rng_t, str(p))
    writers[TRAINER_STATE] = lambda p: p.write_text(json.dumps(trainer, indent=2, sort_keys=True))
    meta = {**trainer, **(metadata or {})}
    meta.pop("rng", None)
    meta.pop("param_names", None)
    return write_checkpoint(path, writers, meta)


def read_trainer_state(path: str | Path) -> dict[str, Any]:
    verify_checkpoint(path)
    return json.loads((Path(path) / TRAINER_STATE).read_text())


def lora_config_from_checkpoint(path: str | Path) -> LoraConfig:
    return LoraConfig(**read_trainer_state(path)["lora"])


def load_adapter_checkpoint(engine: Engine, adapter: str, path: str | Path, *, with_optimizer: bool) -> int:
    """Load weights (and optionally optimizer + step + RNG) into an existing adapter. Returns the step."""
    p = Path(path)
    trainer = read_trainer_state(p)  # verifies every hash first
    st = engine.adapters[adapter]
    if trainer["lora"]["rank"] != st.lora.rank:
        raise ValueError(f"checkpoint {p} has LoRA rank {trainer['lora']['rank']}, the client has {st.lora.rank}")
    set_adapter_tensors(engine, adapter, load_file(str(p / ADAPTER_WEIGHTS)), str(p))
    st.pending_grads = False
    if not with_optimizer:
        st.optimizer, st.step = None, 0
        return 0
    if trainer.get("kind") != "state":
        raise ValueError(f"checkpoint {p} holds sampler weights only; it has no optimizer state to load")
    st.optimizer = torch.optim.AdamW(list(st.params.values()))
    hp = trainer.get("optimizer_hparams")
    if hp:
        for g in st.optimizer.param_groups:
            g.update(lr=hp["lr"], betas=tuple(hp["betas"]), eps=hp["eps"], weight_decay=hp["weight_decay"])
    if trainer.get("has_optimizer"):
        opt = load_file(str(p / OPTIMIZER))
        names = list(st.params)
        if trainer["param_names"] != [canonical_key(n, adapter) for n in names]:
            raise ValueError(f"checkpoint {p}: optimizer parameter layout differs from the client's adapter")
        for i, n in enumerate(names):
            if f"{i}.exp_avg" in opt:
                st.optimizer.state[st.params[n]] = {
                    "step": opt[f"{i}.step"].reshape(()).clone(),
                    "exp_avg": opt[f"{i}.exp_avg"].clone(),
                    "exp_avg_sq": opt[f"{i}.exp_avg_sq"].clone(),
                }
    st.step = int(trainer["step"])
    rng_restore(load_file(str(p / RNG)), trainer["rng"])
    return st.step
