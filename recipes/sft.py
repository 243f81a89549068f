"""The SFT recipe: LoRA supervised fine-tuning as a plain loop over training_core's primitives.

    from recipes.sft import train_sft
    train_sft(PipelineConfig(), "train.jsonl", "eval.jsonl", "runs/my-run")   # no Prefect needed

Features: chat rows rendered by the configured renderer with loss on the chosen turns; seeded per-epoch
batch order (a pure function of (seed, step)); linear warmup + linear decay; the next step submitted before
the previous one's results are awaited; atomic `step-N` checkpoints with the optimizer every `save_every`
steps; exact resume (recipes.common); eval loss before/after; optional periodic eval callback; a progress bar.
Data path: the training file (any format tasks.data_io loads) is rendered + tokenized once with
`datasets.map` into a memory-mapped Arrow cache under `run_dir/data_cache` (keyed by content + tokenizer +
renderer + config; a resume is a cache hit), and each step builds only its batch's datums from it, so RSS
does not grow with the dataset. The batch order is the seeded per-epoch permutation of `batch_indices`, a
pure function of (seed, step): the checkpoint's step alone puts a resumed run at the same row of its epoch.
`build_datums` (rows in memory) stays for small sets (eval-loss rows, other recipes).
Packing (`data.packing=true`): each step's batch (the same examples as unpacked) is packed first-fit
decreasing into rows of at most `data.max_length` input tokens (tasks.packing.packed_datums); the engine keeps
every sequence to its own causal block with positions from 0, so the loss is the unpacked one, computed on
fewer, fuller rows (`packed_rows` in the step metrics). Order, resume and the per-token loss are unchanged.
"""

from __future__ import annotations

import functools
import json
import logging
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from flows.sft_config import PipelineConfig
from infra.config import BadInputError
from recipes.common import (
    TrainResult,
    adam_params,
    describe_mismatches,
    latest_checkpoint,
    load_history,
    local_checkpoint,
    model_mismatches,
    read_rows,
    write_history,
)
from training_core import TrainingClient, types
from training_core.renderers import (
    TrainOnWhat,
    datum_from_tokens_weights,
    get_renderer,
    validate_supervised_batch,
)

log = logging.getLogger(__name__)

__all__ = ["TrainResult", "batch_indices", "build_datums", "lr_at", "mean_token_loss", "read_rows", "train_sft"]


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


def mean_token_loss(tc: TrainingClient, datums: list[types.Datum]) -> float:
    out = tc.forward(datums, "cross_entropy").result()
    wsum = sum(sum(d.loss_fn_inputs["weights"].data) for d in datums)
    return out.metrics["loss:sum"] / max(wsum, 1e-9)


def train_examples(cfg: PipelineConfig, train_path: str, tokenizer: Any, cache_root: str | Path) -> Any:
    """The training set as a memory-mapped tokenized Arrow cache entry (tasks.data_cache.TokenizedSet):
    built on the first attempt, a cache hit on every resume; batches are read from it by index."""
    from tasks.data_cache import tokenize_cached

    d = cfg.data
    return tokenize_cached(train_path, tokenizer, d.renderer, d.train_on_what, d.max_length, cache_root,
                           columns=d.columns, num_proc=d.num_proc)


def head_rows(path: str, n: int, cache_root: str | Path, columns: dict[str, str] | None = None
              ) -> list[dict[str, Any]]:
    """The first `n` rows of any format (the eval-loss examples), with ids; not the whole file as a list."""
    if path.endswith(".jsonl") and not columns:
        rows = []
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    rows.append(json.loads(line))
                    if len(rows) == n:
                        break
    else:
        from tasks.data_io import load_rows, normalize_turns

        ds = load_rows(path, columns, cache_dir=Path(cache_root) / "hf")
        rows = [{k: v for k, v in r.items() if v is not None} for r in ds.select(range(min(n, len(ds))))]
        rows = [{**r, "messages": normalize_turns(r["messages"])} for r in rows]
    return [{**r, "id": r.get("id", f"{path} row {i}")} for i, r in enumerate(rows)]


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
        src = local_checkpoint(cfg.init_from, run_dir / "init")
        if diffs := model_mismatches(src, m):  # callers that log the config call adopt_init_from first
            log.warning("init_from %s: training uses the checkpoint's values (%s)", cfg.init_from, describe_mismatches(diffs))
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
            raise BadInputError(f"cannot resume from {path}: it does not match the config ({describe_mismatches(diffs)}); "
                             f"use the run's original model settings or start a new run")
        log.info("resuming from %s (step %d)", path, start)
        tc = service.create_training_client_from_state_with_optimizer(path)
        assert tc.step == start, f"checkpoint step {tc.step} != name step {start}"
    tok = tc.get_tokenizer()
    d = cfg.data
    train_set = train_examples(cfg, train_path, tok, run_dir / "data_cache")
    eval_d = build_datums(head_rows(eval_path, cfg.train.eval_loss_examples, run_dir / "data_cache", d.columns), tok,
                          d.renderer, d.train_on_what, d.max_length)
    metrics_path = run_dir / "metrics.jsonl"
    history = load_history(metrics_path, upto=start)
    res = TrainResult(checkpoint="", steps=cfg.train.steps, resumed_from=start, metrics_path=str(metrics_path))
    res.eval_loss_before = history[0].get("eval_loss") if history else mean_token_loss(tc, eval_d)
    if start == 0:
        history = [{"step": 0, "eval_loss": res.eval_loss_before}]
    t = cfg.train
    end = t.steps if stop_after is None else min(t.steps, start + stop_after)
    bar = tqdm(range(start, end), desc="train", initial=start, total=t.steps, dynamic_ncols=True)
    every = t.eval_every if periodic is not None else 0
    # Submit step s+1's work before waiting on step s's results (the engine runs them in order).
    pending: tuple[int, Any, Any, float, int | None] | None = None
    for step in bar:
        if every and step % every == 0 and step > start:
            if pending is not None:
                _finish(pending, history, res, bar, on_step)  # eval sees exactly `step` optimizer steps
                pending = None
            periodic(step, tc)  # type: ignore[misc]
        idx = batch_indices(step, t.batch_size, len(train_set), m.seed)
        if d.packing:
            from tasks.packing import packed_datums

            batch = packed_datums(train_set.examples(idx), d.max_length)
        else:
            batch = train_set.datums(idx)
        wsum = sum(sum(x.loss_fn_inputs["weights"].data) for x in batch)
        lr = lr_at(step, cfg)
        fb = tc.forward_backward(batch, "cross_entropy")
        op = tc.optim_step(adam_params(t, lr))
        if pending is not None:
            _finish(pending, history, res, bar, on_step)
        pending = (step, fb, op, wsum, len(batch) if d.packing else None)
        if (step + 1) % t.save_every == 0 and step + 1 < t.steps:
            _finish(pending, history, res, bar, on_step)
            pending = None
            tc.save_state(f"step-{step + 1:06d}", metadata={"step": step + 1}).result()
            write_history(metrics_path, history)
    if pending is not None:
        _finish(pending, history, res, bar, on_step)
    if every and end == t.steps:
        periodic(end, tc)  # type: ignore[misc]
    bar.close()
    res.loss_history = [(r["step"], r["train_loss"]) for r in history if "train_loss" in r]
    if end < t.steps:  # interrupted on purpose: leave the newest checkpoint as is
        write_history(metrics_path, history)
        return res
    res.eval_loss_after = mean_token_loss(tc, eval_d)
    history.append({"step": t.steps, "eval_loss": res.eval_loss_after})
    final = latest_checkpoint(ckpt_root)
    if final is None or final[0] != t.steps:
        final = (t.steps, tc.save_state(f"step-{t.steps:06d}", metadata={"step": t.steps, "final": True})
                 .result().path)
    res.checkpoint = final[1]
    write_history(metrics_path, history)
    return res


def _finish(pending: tuple[int, Any, Any, float, int | None], history: list[dict[str, Any]], res: TrainResult,
            bar: Any, on_step: Callable[[int, dict[str, float]], None] | None) -> None:
    step, fb, op, wsum, packed_rows = pending
    loss = fb.result().metrics["loss:sum"] / max(wsum, 1e-9)
    om = op.result().metrics
    row = {"step": step + 1, "train_loss": loss, **{k.split(":")[0]: v for k, v in om.items() if k != "step:max"}}
    if packed_rows is not None:
        row["packed_rows"] = packed_rows  # forward rows of this step (the unpacked count is train.batch_size)
    history.append(row)
    res.losses.append((step + 1, loss))
    bar.set_postfix(loss=f"{loss:.3f}")
    if on_step is not None:
        on_step(step + 1, {k: v for k, v in row.items() if k != "step"})
