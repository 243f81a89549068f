"""Load a base causal LM + tokenizer (preset name, local dir or hub id) and pick LoRA target modules."""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "c_attn", "query_key_value", "Wqkv", "out_proj")
_MLP = ("gate_proj", "up_proj", "down_proj", "fc1", "fc2", "c_fc", "c_proj", "w1", "w2", "w3", "gate_up_proj")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(ValueError):
    """The base model or tokenizer cannot be resolved or loaded."""


@dataclass
class LoadedBase:
    name: str
    path: str
    model: nn.Module
    tokenizer: Any
    max_length: int
    vocab_size: int


def torch_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(_DTYPES)}") from None


def resolve(name_or_path: str) -> str:
    """Preset name -> cached local dir; local dir -> itself; otherwise a hub id (unchanged)."""
    try:
        from training_core.presets import resolve_model_path
    except ImportError:  # presets are optional for hub ids / local dirs
        return name_or_path
    return resolve_model_path(name_or_path)


_MALLOC_TUNED = False


def tune_malloc() -> bool:
    """Keep freed tensor memory in the process (glibc): no page faults re-zeroing it on every step.

    By default glibc hands every block above a dynamic threshold back to the OS on free (munmap / trim), so
    each training step faults in and zeroes its activations again (~50k page faults and ~10% of a 30M
    model's step here). One arena (the engine computes on one thread), a 32 MB mmap threshold (glibc's
    maximum) and no trimming make the allocator reuse them instead. Process-wide, once; set
    TUNELOOP_NO_MALLOPT=1 to opt out. Returns whether the settings were applied.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED or os.environ.get("TUNELOOP_NO_MALLOPT") == "1" or not sys.platform.startswith("linux"):
        return _MALLOC_TUNED
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim, m_top_pad, m_mmap, m_arena_max = -1, -2, -3, -8
        ok = all(libc.mallopt(k, v) == 1 for k, v in
                 ((m_arena_max, 1), (m_mmap, 32 << 20), (m_trim, 1 << 40), (m_top_pad, 64 << 20)))
    except (OSError, AttributeError):  # not glibc (musl, ...): nothing to tune
        ok = False
    _MALLOC_TUNED = ok
    return ok


def load_base(name_or_path: str, dtype: str = "float32") -> LoadedBase:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tune_malloc()  # before the engine's worker thread exists, so it shares the tuned arena

    path = resolve(name_or_path)
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    if not os.path.isdir(path) and offline and "/" not in path:
        from training_core.presets import PRESETS

        raise ModelLoadError(
            f"unknown model {name_or_path!r}: not a preset ({', '.join(sorted(PRESETS))}), not a local directory; "
            f"a hub id (org/name) needs network (HF_HUB_OFFLINE=0)"
        )
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        # without this, transformers guesses at the directory and asks for sentencepiece / tiktoken
        raise ModelLoadError(f"{name_or_path}: not a Hugging Face model directory (no config.json)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load model {name_or_path!r} (resolved to {path!r}): {e}") from e
    model.eval()  # no dropout: training is deterministic given the data
    cfg = model.config
    max_len = int(getattr(cfg, "max_position_embeddings", 0) or getattr(tokenizer, "model_max_length", 2048))
    vocab = int(model.get_input_embeddings().weight.shape[0])
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedBase(name_or_path, path, model, tokenizer, max_len, vocab)


def lora_target_modules(linear_leaves: set[str], train_attn: bool, train_mlp: bool, train_unembed: bool) -> list[str]:
    """Leaf Linear module names to adapt (from the unwrapped model), by the usual HF naming conventions."""
    wanted = (_ATTN if train_attn else ()) + (_MLP if train_mlp else ())
    names = {leaf for leaf in linear_leaves if leaf in wanted}
    if train_unembed:
        names.add("lm_head")
    if not names:
        raise ModelLoadError("no LoRA target modules found (train_attn/train_mlp/train_unembed all off?)")
    return sorted(names)
