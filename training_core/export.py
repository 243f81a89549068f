"""Export a checkpoint as (a) a PEFT adapter directory and (b) a merged Hugging Face model directory.

The merged model is loadable by plain `transformers` (no tuneloop, no peft) and its logits equal the adapter
model's within fp32 rounding (tested at atol 1e-4). Merging is done in fp32 whatever the serving dtype.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from training_core.checkpoint import verify_checkpoint
from training_core.model_loading import load_base
from training_core.state import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_trainer_state


def export_peft_adapter(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Copy the (verified) adapter files: `PeftModel.from_pretrained(base, out_dir)` loads them."""
    verify_checkpoint(checkpoint)
    out = Path(out_dir)
    if out.exists():
        raise FileExistsError(f"{out} exists; refusing to overwrite")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
        shutil.copy2(Path(checkpoint) / f, tmp / f)
    tmp.rename(out)
    return out


def export_merged(checkpoint: str | Path, out_dir: str | Path, dtype: str = "float32") -> Path:
    """Base + LoRA deltas merged into plain weights, saved with the tokenizer as a normal HF directory."""
    from peft import LoraConfig, get_peft_model

    ck = Path(checkpoint)
    trainer = read_trainer_state(ck)
    base = load_base(trainer["base_model"], "float32")
    cfg = json.loads((ck / ADAPTER_CONFIG).read_text())
    peft_cfg = LoraConfig(r=cfg["r"], lora_alpha=cfg["lora_alpha"], target_modules=cfg["target_modules"],
                          lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    if "lm_head" in cfg["target_modules"] and getattr(base.model.config, "tie_word_embeddings", False):
        # Merging a LoRA delta into a tied lm_head would also change the input embeddings: untie first.
        head = base.model.get_output_embeddings()
        head.weight = torch.nn.Parameter(head.weight.detach().clone())
        base.model.config.tie_word_embeddings = False
    model = get_peft_model(base.model, peft_cfg, adapter_name="default")
    sd = load_file(str(ck / ADAPTER_WEIGHTS))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in sd.items():
            name = k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")
            if name not in params:
                raise ValueError(f"{ck}: adapter tensor {k} has no place in the base model")
            params[name].copy_(v)
    merged = model.merge_and_unload()
    if dtype != "float32":
        merged = merged.to({"bfloat16": torch.bfloat16, "float16": torch.float16}[dtype])
    out = Path(out_dir)
    if out.exists():
        raise FileExistsError(f"{out} exists; refusing to overwrite")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp)
    base.tokenizer.save_pretrained(tmp)
    tmp.rename(out)
    return out
