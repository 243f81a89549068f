"""Stage 2-3: LoRA SFT through training_core's primitives, with atomic, resumable checkpoints.

Resume semantics: the run directory's newest committed `step-N` state checkpoint is loaded with its optimizer,
and training continues at batch N: no optimizer step is ever applied twice, and the trajectory equals an
uninterrupted run's (batches are a pure function of (seed, step)).
"""

from __future__ import annotations

import functools
import json
import logging
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from flows.sft_config import PipelineConfig
from infra.config import BadInputError
from training_core import TrainingClient, types
from training_core.checkpoint import CheckpointError, is_committed, verify_checkpoint
from training_core.renderers import (
    TrainOnWhat,
    datum_from_tokens_weights,
    get_renderer,
    validate_supervised_batch,
)

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


def build_datums(rows: list[dict[str, Any]], tokenizer: Any, renderer_name: str, train_on_what: str,
                 max_length: int) -> list[types.Datum]:
    renderer = get_renderer(renderer_name, tokenizer)
    examples = [renderer.build_supervised_example(r["messages"], TrainOnWhat(train_on_what)) for r in rows]
    too_long = [r["id"] for r, (t, _) in zip(rows, examples, strict=True) if len(t) > max_length]
    if too_long:  # bad input (flows.preflight reports it at file:line first): never retried
        from tasks.prepare_data import DataValidationError

        raise DataValidationError(f"{len(too_long)} examples exceed data.max_length={max_length} tokens (e.g. id "
                         f"{too_long[0]}); raise max_length or shorten them: truncation would drop the EOS")
    eos = renderer.get_end_of_turn_sequences() if hasattr(renderer, "get_end_of_turn_sequences") \
        else renderer.get_stop_sequences()
    validate_supervised_batch(examples, eos, [r["id"] for r in rows])
    return [datum_from_tokens_weights(t, w) for t, w in examples]


@functools.lru_cache(maxsize=2)  # the current epoch and, for a batch that straddles the boundary, the next
def _epoch_permutation(seed: int, epoch: int, n: int) -> tuple[int, ...]:
    perm = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(perm)
    return tuple(perm)


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> list[int]:
    """Indices of batch `step`: epoch-wise seeded permutations, a pure function of its arguments.

    One permutation per epoch, built once and cached (O(n) per epoch, O(batch) per step); a resumed run
    rebuilds the same permutation from (seed, epoch), so it sees the batches of an uninterrupted one.
    """
    out = []
    for k in range(step * batch_size, (step + 1) * batch_size):
        epoch, pos = divmod(k, n)
        out.append(_epoch_permutation(seed, epoch, n)[pos])
    return out


def lr_at(step: int, cfg: PipelineConfig) -> float:
    t = cfg.train
    if step < t.warmup_steps:
        return t.learning_rate * (step + 1) / t.warmup_steps
    frac = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
    return t.learning_rate * (1 - (1 - t.min_lr_ratio) * frac)


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


def _describe(diffs: dict[str, tuple[Any, Any]]) -> str:
    return "; ".join(f"model.{k}: checkpoint {a!r}, config {b!r}" for k, (a, b) in diffs.items())


def adopt_init_from(cfg: PipelineConfig, run_dir: Path) -> dict[str, tuple[Any, Any]]:
    """Set `cfg.model` to what training from `cfg.init_from` really uses (the checkpoint's base model and
    LoRA shape), so that the config logged to MLflow is the effective one. Returns what changed."""
    if not cfg.init_from:
        return {}
    diffs = model_mismatches(_local_checkpoint(cfg.init_from, run_dir / "init"), cfg.model)
    for k, (ck_value, _) in diffs.items():
        setattr(cfg.model, k, ck_value)
    if diffs:
        log.warning("init_from %s: training uses the checkpoint's values, not the config's (%s)", cfg.init_from,
                    _describe(diffs))
    return diffs


def _local_checkpoint(uri: str, dest: Path) -> str:
    """A local, verified copy of a checkpoint given as a path, file:// or s3:// URI."""
    if "://" not in uri:
        return uri
    if (dest / "manifest.json").exists():
        return str(dest)
    from infra.storage import open_storage

    man = open_storage(uri).download_dir("", dest)
    (dest / "manifest.json").write_bytes(man.to_json())  # training_core verifies against it on load
    return str(dest)


def mean_token_loss(tc: TrainingClient, datums: list[types.Datum]) -> float:
    out = tc.forward(datums, "cross_entropy").result()
    wsum = sum(sum(d.loss_fn_inputs["weights"].data) for d in datums)
    return out.metrics["loss:sum"] / max(wsum, 1e-9)


def train_sft(cfg: PipelineConfig, train_path: str, eval_path: str, run_dir: str | Path,
              on_step: Callable[[int, dict[str, float]], None] | None = None,
              stop_after: int | None = None,
              periodic: Callable[[int, TrainingClient], None] | None = None) -> TrainResult:
    """Run (or resume) SFT; `stop_after` ends early after that many steps (tests of interruption).

    `periodic(step, client)` runs every `train.eval_every` steps on the current weights (exactly `step` updates).
    """
    run_dir = Path(run_dir)
    ckpt_root = run_dir / "checkpoints"
    from training_core.distributed import make_service_client

    service = make_service_client(cfg.model.backend, checkpoint_root=ckpt_root, compute_dtype=cfg.model.compute_dtype,
                                  world_size=cfg.model.world_size, zero_stage=cfg.model.zero_stage,
                                  timeout_s=cfg.model.ds_timeout_s, session_id=f"{cfg.model.backend}")
    try:
        return _train(cfg, service, train_path, eval_path, ckpt_root, run_dir, on_step, stop_after, periodic)
    finally:
        if hasattr(service, "close"):
            service.close()  # stops DeepSpeed ranks; the local backend has nothing to close


def _train(cfg: PipelineConfig, service: Any, train_path: str, eval_path: str, ckpt_root: Path, run_dir: Path,
           on_step: Callable[[int, dict[str, float]], None] | None, stop_after: int | None,
           periodic: Callable[[int, TrainingClient], None] | None) -> TrainResult:
    latest = latest_checkpoint(ckpt_root)
    m = cfg.model
    if latest is None and cfg.init_from:
        src = _local_checkpoint(cfg.init_from, run_dir / "init")
        if diffs := model_mismatches(src, m):  # callers that log the config call adopt_init_from first
            log.warning("init_from %s: training uses the checkpoint's values (%s)", cfg.init_from, _describe(diffs))
        log.info("starting from %s (weights only, fresh optimizer)", cfg.init_from)
        tc = service.create_training_client_from_state(src)
        start = 0
    elif latest is None:
        tc = service.create_lora_training_client(m.base_model, rank=m.rank, seed=m.seed, train_mlp=m.train_mlp,
                                                 train_attn=m.train_attn, train_unembed=m.train_unembed,
                                                 lora_alpha=m.lora_alpha)
        start = 0
    else:
        start, path = latest
        if diffs := model_mismatches(path, m):  # a resume continues the same run: it cannot change the model
            raise BadInputError(f"cannot resume from {path}: it does not match the config ({_describe(diffs)}); "
                             f"use the run's original model settings or start a new run")
        log.info("resuming from %s (step %d)", path, start)
        tc = service.create_training_client_from_state_with_optimizer(path)
        assert tc.step == start, f"checkpoint step {tc.step} != name step {start}"
    tok = tc.get_tokenizer()
    train_rows, eval_rows = read_rows(train_path), read_rows(eval_path)
    d = cfg.data
    train_d = build_datums(train_rows, tok, d.renderer, d.train_on_what, d.max_length)
    eval_d = build_datums(eval_rows[: cfg.train.eval_loss_examples], tok, d.renderer, d.train_on_what, d.max_length)
    metrics_path = run_dir / "metrics.jsonl"
    history = _load_history(metrics_path, upto=start)
    res = TrainResult(checkpoint="", steps=cfg.train.steps, resumed_from=start, metrics_path=str(metrics_path))
    res.eval_loss_before = history[0].get("eval_loss") if history else mean_token_loss(tc, eval_d)
    if start == 0:
        history = [{"step": 0, "eval_loss": res.eval_loss_before}]
    t = cfg.train
    end = t.steps if stop_after is None else min(t.steps, start + stop_after)
    bar = tqdm(range(start, end), desc="train", initial=start, total=t.steps, dynamic_ncols=True)
    every = t.eval_every if periodic is not None else 0
    # Submit step s+1's work before waiting on step s's results (the engine runs them in order).
    pending: tuple[int, Any, Any, float] | None = None
    for step in bar:
        if every and step % every == 0 and step > start:
            if pending is not None:
                _finish(pending, history, res, bar, on_step)  # eval sees exactly `step` optimizer steps
                pending = None
            periodic(step, tc)  # type: ignore[misc]
        batch = [train_d[i] for i in batch_indices(step, t.batch_size, len(train_d), m.seed)]
        wsum = sum(sum(x.loss_fn_inputs["weights"].data) for x in batch)
        lr = lr_at(step, cfg)
        fb = tc.forward_backward(batch, "cross_entropy")
        op = tc.optim_step(types.AdamParams(learning_rate=lr, beta1=t.beta1, beta2=t.beta2, eps=t.eps,
                                            weight_decay=t.weight_decay, grad_clip_norm=t.grad_clip_norm))
        if pending is not None:
            _finish(pending, history, res, bar, on_step)
        pending = (step, fb, op, wsum)
        if (step + 1) % t.save_every == 0 and step + 1 < t.steps:
            _finish(pending, history, res, bar, on_step)
            pending = None
            tc.save_state(f"step-{step + 1:06d}", metadata={"step": step + 1}).result()
            _write_history(metrics_path, history)
    if pending is not None:
        _finish(pending, history, res, bar, on_step)
    if every and end == t.steps:
        periodic(end, tc)  # type: ignore[misc]
    bar.close()
    res.loss_history = [(r["step"], r["train_loss"]) for r in history if "train_loss" in r]
    if end < t.steps:  # interrupted on purpose: leave the newest checkpoint as is
        _write_history(metrics_path, history)
        return res
    res.eval_loss_after = mean_token_loss(tc, eval_d)
    history.append({"step": t.steps, "eval_loss": res.eval_loss_after})
    final = latest_checkpoint(ckpt_root)
    if final is None or final[0] != t.steps:
        final = (t.steps, tc.save_state(f"step-{t.steps:06d}", metadata={"step": t.steps, "final": True})
                 .result().path)
    res.checkpoint = final[1]
    _write_history(metrics_path, history)
    return res


def _finish(pending: tuple[int, Any, Any, float], history: list[dict[str, Any]], res: TrainResult, bar: Any,
            on_step: Callable[[int, dict[str, float]], None] | None) -> None:
    step, fb, op, wsum = pending
    loss = fb.result().metrics["loss:sum"] / max(wsum, 1e-9)
    om = op.result().metrics
    row = {"step": step + 1, "train_loss": loss, **{k.split(":")[0]: v for k, v in om.items() if k != "step:max"}}
    history.append(row)
    res.losses.append((step + 1, loss))
    bar.set_postfix(loss=f"{loss:.3f}")
    if on_step is not None:
        on_step(step + 1, {k: v for k, v in row.items() if k != "step"})


def _load_history(path: Path, upto: int) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [r for r in rows if r["step"] <= upto]  # drop metrics of steps the checkpoint does not contain


def _write_history(path: Path, history: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in history))
    tmp.replace(path)
