"""Time from process start to the end of the first optimizer step: ours vs TRL, each in a fresh interpreter.

The parent notes the wall clock just before spawning ``python -c <script>``; the child prints the wall clock
when its first optimizer step has finished. The difference covers interpreter start, imports, model and
tokenizer load, LoRA setup, data preparation and one full step. Both sides use bf16 (their best precision
here) on the same preset, LoRA and batch as bench_train; runs alternate ours / TRL.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
_MARK = "TTFS_END"

_DATA = """
import torch
rows = torch.randint(0, {vocab}, ({B}, {T} + 1), generator=torch.Generator().manual_seed(0)).tolist()
"""

OURS = """
import time
from training_core import ServiceClient, types
sc = ServiceClient(checkpoint_root={ckpt!r}, compute_dtype="bfloat16", load_dtype="bfloat16")
tc = sc.create_lora_training_client({model!r}, rank={rank}, lora_alpha={alpha}, seed=0, train_unembed=False)
{data}
batch = [types.Datum(model_input=types.ModelInput.from_ints(r[:{T}]),
                     loss_fn_inputs={{"target_tokens": r[1:], "weights": [1.0] * {T}}}) for r in rows]
tc.forward_backward(batch, "cross_entropy")
tc.optim_step(types.AdamParams(learning_rate={lr}, beta1=0.9, beta2=0.999, eps=1e-8)).result()
print("{mark}", time.time(), flush=True)
"""

TRL = """
import time
from datasets import Dataset
from peft import LoraConfig
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer
{data}
class Mark(TrainerCallback):
    def on_optimizer_step(self, args, state, control, **kw):
        print("{mark}", time.time(), flush=True)
cfg = SFTConfig(output_dir={ckpt!r}, max_steps=1, per_device_train_batch_size={B}, learning_rate={lr},
                lr_scheduler_type="constant", max_grad_norm=0.0, max_length={T}, use_cpu=True, bf16=True,
                gradient_checkpointing=False, logging_strategy="no", save_strategy="no", eval_strategy="no",
                report_to="none", disable_tqdm=True)
peft = LoraConfig(r={rank}, lora_alpha={alpha}, lora_dropout=0.0, task_type="CAUSAL_LM",
                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
ds = Dataset.from_dict({{"input_ids": [r[:{T}] for r in rows]}})
SFTTrainer(model={path!r}, args=cfg, peft_config=peft, train_dataset=ds, callbacks=[Mark()]).train()
"""


def _one(script: str) -> float:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=600)
    marks = [ln for ln in proc.stdout.splitlines() if ln.startswith(_MARK)]
    if proc.returncode != 0 or not marks:
        raise RuntimeError(f"time-to-first-step child failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    return float(marks[0].split()[1]) - t0


def time_to_first_step(path: str, repeats: int = 2, with_trl: bool = True) -> dict[str, object]:
    import tempfile

    from bench.train_sides import ALPHA, LR, MODEL, RANK, B, T

    vocab = json.loads((Path(path) / "config.json").read_text())["vocab_size"]
    fmt = {"vocab": vocab, "B": B, "T": T, "rank": RANK, "alpha": ALPHA, "lr": LR, "mark": _MARK,
           "model": MODEL, "path": path}
    fmt["data"] = _DATA.format(**fmt)
    runs: dict[str, list[float]] = {"ours": [], "trl": []}
    for _ in range(repeats):
        with tempfile.TemporaryDirectory(prefix="bench-ttfs-") as ckpt:
            runs["ours"].append(_one(OURS.format(ckpt=ckpt, **fmt)))
            if with_trl:
                runs["trl"].append(_one(TRL.format(ckpt=ckpt, **fmt)))
    out: dict[str, object] = {"time_to_first_step_s_all": {k: [round(x, 2) for x in v] for k, v in runs.items()}}
    for k, v in runs.items():
        if v:
            out[f"time_to_first_step_s_{k}"] = round(statistics.median(v), 2)
    return out
