"""DPO as a plain loop over training_core's primitives, with atomic, resumable checkpoints.

Features:
- the sigmoid DPO loss (Rafailov et al. 2023) with `beta`, optional label smoothing (conservative DPO) and an
  RPO-style SFT term (mean NLL per chosen token, weight `sft_weight`), computed by `forward_backward_custom` in
  ONE forward/backward over the batch's chosen and rejected sequences together (2B datums, chosen first);
- reference logprobs of chosen and rejected computed once, with `forward`, from the frozen starting model, and
  cached with the dataset (`recipes.preference_data`), keyed by the starting model's content: a rerun or a
  resumed run reads them instead of recomputing (a resumed model is no longer the reference);
- starts from a fresh LoRA adapter on the base, from `init_from` (e.g. an SFT checkpoint: the DPO-after-SFT
  chain), or from a short built-in SFT warm-up (`cfg.warmup`: a 50/50 mix of chosen and rejected replies, so
  the starting policy is indifferent to the preference); the starting model is the reference;
- per-step metrics (metrics.jsonl, `on_step`, tqdm): loss, DPO loss, reward accuracy, reward margin, chosen and
  rejected implicit rewards and logprobs, lr, grad norm;
- a resumed run continues from the newest committed `step-N` with its optimizer and sees the same batches
  (`recipes.sft.batch_indices` is a pure function of (seed, step));
- eval helpers for the flow: held-out preference accuracy as an `EvalResult` (one 0/1 record per pair, so the
  paired compare works) and the behaviour benchmark of the built-in task (`data.preferences`).

Trade-offs: the local engine only (`forward_backward_custom` is not on the DeepSpeed backend); the custom loss
sums per-token logprobs per datum in Python (2B small ops per step, negligible next to the forward).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from infra.config import BadInputError
from recipes.common import (
    TrainResult,
    adam_params,
    describe_mismatches,
    latest_checkpoint,
    load_history,
    local_checkpoint,
    model_mismatches,
    write_history,
)
from recipes.dpo_config import DPOConfig
from recipes.preference_data import (
    PreferenceDataset,
    PreferencePair,
    load_ref_logprobs,
    prepare_preferences,
    save_ref_logprobs,
)
from recipes.sft import batch_indices, lr_at
from training_core import TrainingClient, types
from training_core.checkpoint import is_committed
from training_core.renderers import datum_from_tokens_weights

log = logging.getLogger(__name__)
WARMUP_NAME = "warmup-final"
TIE_TOL = 1e-5  # |implicit reward margin| below this is a tie (float noise of the same weights), not a win


@dataclass
class DPOTrainResult(TrainResult):
    start_checkpoint: str | None = None  # the starting model = the reference (None: the bare base model)
    dataset_dir: str = ""
    ref_key: str = ""
    heldout_accuracy_before: float | None = None
    heldout_accuracy_after: float | None = None
    data_stats: dict[str, Any] = field(default_factory=dict)  # recipes.preference_data.quality_stats


# ---------------------------------------------------------------- loss


def dpo_loss(policy_chosen_B: torch.Tensor, policy_rejected_B: torch.Tensor, ref_chosen_B: torch.Tensor,
             ref_rejected_B: torch.Tensor, beta: float, label_smoothing: float = 0.0, sft_weight: float = 0.0,
             chosen_nll_sum: torch.Tensor | None = None, chosen_tokens: float = 1.0
             ) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean over pairs of the (conservative) sigmoid DPO loss, plus `sft_weight` x mean NLL per chosen token.

    Inputs are summed completion logprobs per sequence. Label smoothing e: -(1-e) log s(b d) - e log s(-b d).
    """
    d_B = (policy_chosen_B - ref_chosen_B) - (policy_rejected_B - ref_rejected_B)
    per_pair_B = -(1 - label_smoothing) * F.logsigmoid(beta * d_B) - label_smoothing * F.logsigmoid(-beta * d_B)
    dpo = per_pair_B.mean()
    loss = dpo
    if sft_weight and chosen_nll_sum is not None:
        loss = loss + sft_weight * chosen_nll_sum / max(chosen_tokens, 1.0)
    with torch.no_grad():
        rc_B, rr_B = beta * (policy_chosen_B - ref_chosen_B), beta * (policy_rejected_B - ref_rejected_B)
        metrics = {"dpo_loss:mean": float(dpo), "reward_acc:mean": float((rc_B > rr_B).float().mean()),
                   "margin:mean": float((rc_B - rr_B).mean()), "reward_chosen:mean": float(rc_B.mean()),
                   "reward_rejected:mean": float(rr_B.mean()), "logps_chosen:mean": float(policy_chosen_B.mean()),
                   "logps_rejected:mean": float(policy_rejected_B.mean())}
    return loss, metrics


def pair_datums(pairs: list[PreferencePair]) -> list[types.Datum]:
    """[chosen_0 .. chosen_{B-1}, rejected_0 .. rejected_{B-1}]: weight 1 on every completion token."""
    out = []
    for side in ("chosen_ids", "rejected_ids"):
        for p in pairs:
            comp = getattr(p, side)
            out.append(datum_from_tokens_weights(p.prompt_ids + comp, [0.0] * len(p.prompt_ids) + [1.0] * len(comp)))
    return out


def make_loss_fn(ref_B2: torch.Tensor, beta: float, label_smoothing: float = 0.0,
                 sft_weight: float = 0.0) -> Callable[[list[types.Datum], list[torch.Tensor]],
                                                      tuple[torch.Tensor, dict[str, float]]]:
    """The `forward_backward_custom` loss of one batch; `ref_B2[:, 0]` / `[:, 1]` = reference chosen / rejected."""
    def fn(data: list[types.Datum], lp_list: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        B = len(data) // 2
        w_list = [d.loss_fn_inputs["weights"].to_torch() for d in data]
        seq_2B = torch.stack([(lp * w).sum() for lp, w in zip(lp_list, w_list, strict=True)])
        n_chosen = float(sum(float(w.sum()) for w in w_list[:B]))
        loss, metrics = dpo_loss(seq_2B[:B], seq_2B[B:], ref_B2[:, 0], ref_B2[:, 1], beta, label_smoothing,
                                 sft_weight, -seq_2B[:B].sum(), n_chosen)
        return loss, metrics
    return fn


def sequence_logprobs(tc: TrainingClient, pairs: list[PreferencePair], batch_pairs: int) -> torch.Tensor:
    """(N, 2) summed completion logprobs (chosen, rejected) under `tc`'s current weights, by `forward`."""
    out = []
    futs = []
    for i in range(0, len(pairs), batch_pairs):  # all submitted first: the engine runs them back to back
        chunk = pairs[i:i + batch_pairs]
        data = pair_datums(chunk)
        futs.append((len(chunk), data, tc.forward(data, "cross_entropy")))
    for B, data, fut in futs:
        res = fut.result()
        s = [float((o["logprobs"].to_torch() * d.loss_fn_inputs["weights"].to_torch()).sum())
             for o, d in zip(res.loss_fn_outputs, data, strict=True)]
        out.append(torch.tensor([s[:B], s[B:]], dtype=torch.float64).T)
    return torch.cat(out) if out else torch.zeros((0, 2), dtype=torch.float64)


# ---------------------------------------------------------------- starting model + reference


def start_model_key(cfg: DPOConfig, start_ckpt: str | None) -> str:
    """Content key of the starting (= reference) model: its adapter's weights and config (by the checksums in
    its manifest, not the manifest itself, whose timestamps differ: equal warm-ups, e.g. a sweep's trials, are
    one reference and their `heldout_pref` results one protocol), or the base model."""
    if start_ckpt:
        files = json.loads((Path(start_ckpt) / "manifest.json").read_text())["files"]
        ident = "/".join(f"{n}:{files[n]['sha256']}" for n in sorted(files)
                         if n.startswith(("adapter_model", "adapter_config")))
    else:
        from training_core.model_loading import resolve

        ident = f"base:{resolve(cfg.model.base_model)}"
    return hashlib.sha256(f"{ident}/{cfg.model.compute_dtype}".encode()).hexdigest()[:16]


def _new_client(service: Any, cfg: DPOConfig, start_ckpt: str | None) -> TrainingClient:
    m = cfg.model
    if start_ckpt:
        return service.create_training_client_from_state(start_ckpt)
    return service.create_lora_training_client(m.base_model, rank=m.rank, seed=m.seed, train_mlp=m.train_mlp,
                                               train_attn=m.train_attn, train_unembed=m.train_unembed,
                                               lora_alpha=m.lora_alpha)


def reference_logprobs(cfg: DPOConfig, service: Any, ds: PreferenceDataset, start_ckpt: str | None,
                       tc: TrainingClient | None = None) -> tuple[str, torch.Tensor, torch.Tensor]:
    """(key, train (N, 2), eval (M, 2)) reference logprobs: from the cache, else computed once and cached.

    `tc` (when given) must hold the starting weights; otherwise a client is built from the starting model.
    """
    key = start_model_key(cfg, start_ckpt)
    cached = load_ref_logprobs(ds, key)
    if cached is not None and len(cached["train"]) == len(ds.train) and len(cached["eval"]) == len(ds.eval):
        log.info("reference logprobs: cache hit (%s)", key)
        return key, torch.tensor(cached["train"], dtype=torch.float64), torch.tensor(cached["eval"],
                                                                                     dtype=torch.float64)
    own = tc is None
    client = _new_client(service, cfg, start_ckpt) if own else tc
    try:
        bs = cfg.train.ref_batch_size
        tr, ev = sequence_logprobs(client, ds.train, bs), sequence_logprobs(client, ds.eval, bs)
    finally:
        if own:
            client.close()
    save_ref_logprobs(ds, key, {"train": tr.tolist(), "eval": ev.tolist()},
                      {"start_checkpoint": start_ckpt, "base_model": cfg.model.base_model})
    return key, tr, ev


def _find_warmup(ckpt_root: Path) -> str | None:
    for p in sorted(ckpt_root.glob(f"*/weights/{WARMUP_NAME}")):
        if is_committed(p):
            return str(p)
    return None


def warmup_sft(cfg: DPOConfig, service: Any, ds: PreferenceDataset, ckpt_root: Path, run_dir: Path) -> str:
    """Short SFT on a seeded mix of chosen / rejected replies; returns its committed checkpoint (reused if done)."""
    done = _find_warmup(ckpt_root)
    if done:
        return done
    w, m = cfg.warmup, cfg.model
    rng = random.Random(f"warmup/{cfg.data.seed}")
    data = []
    for p in ds.train:
        comp = p.chosen_ids if rng.random() < w.chosen_fraction else p.rejected_ids
        data.append(datum_from_tokens_weights(p.prompt_ids + comp, [0.0] * len(p.prompt_ids) + [1.0] * len(comp)))
    tc = _new_client(service, cfg, None)
    t = cfg.train
    rows = []
    for step in tqdm(range(w.steps), desc="sft warm-up", dynamic_ncols=True):
        batch = [data[i] for i in batch_indices(step, w.batch_size, len(data), m.seed + 1)]
        wsum = sum(sum(x.loss_fn_inputs["weights"].data) for x in batch)
        fb = tc.forward_backward(batch, "cross_entropy")
        tc.optim_step(types.AdamParams(learning_rate=w.learning_rate, beta1=t.beta1, beta2=t.beta2, eps=t.eps,
                                       grad_clip_norm=t.grad_clip_norm))
        rows.append({"step": step + 1, "train_loss": fb.result().metrics["loss:sum"] / max(wsum, 1e-9)})
    path = tc.save_state(WARMUP_NAME, metadata={"warmup_steps": w.steps}).result().path
    tc.close()
    write_history(run_dir / "warmup_metrics.jsonl", rows)
    return path


# ---------------------------------------------------------------- training


def prepare(cfg: DPOConfig, tokenizer: Any, eval_prompts: list[str] | None = None) -> PreferenceDataset:
    return prepare_preferences(cfg.data, tokenizer, cfg.cache_root, eval_prompts or [])


def train_dpo(cfg: DPOConfig, run_dir: str | Path, on_step: Callable[[int, dict[str, float]], None] | None = None,
              stop_after: int | None = None, service: Any = None) -> DPOTrainResult:
    """Run (or resume) DPO in `run_dir`; `stop_after` ends early after that many steps (interruption tests)."""
    if cfg.model.backend != "local":
        raise BadInputError("DPO runs on the local engine (model.backend=local): forward_backward_custom is not "
                            "available on the DeepSpeed backend")
    run_dir = Path(run_dir)
    ckpt_root = run_dir / "checkpoints"
    from training_core import ServiceClient

    own = service is None
    service = service or ServiceClient(checkpoint_root=ckpt_root, compute_dtype=cfg.model.compute_dtype,
                                       session_id="local")
    try:
        return _train(cfg, service, ckpt_root, run_dir, on_step, stop_after)
    finally:
        if own:
            service.close()


def _start_checkpoint(cfg: DPOConfig, service: Any, ds: PreferenceDataset, ckpt_root: Path,
                      run_dir: Path) -> str | None:
    if cfg.init_from:  # e.g. an SFT run's output: the warm-up is for starting from a bare base
        src = local_checkpoint(cfg.init_from, run_dir / "init")
        if diffs := model_mismatches(src, cfg.model):
            log.warning("init_from %s: training uses the checkpoint's values (%s)", cfg.init_from,
                        describe_mismatches(diffs))
        return src
    if cfg.warmup.steps > 0:
        return warmup_sft(cfg, service, ds, ckpt_root, run_dir)
    return None


def tokenizer_for(cfg: DPOConfig) -> Any:
    """The base model's tokenizer (what the preference cache is keyed on)."""
    from transformers import AutoTokenizer

    from training_core.model_loading import resolve

    return AutoTokenizer.from_pretrained(resolve(cfg.model.base_model))


_tokenizer = tokenizer_for  # the name flows/dpo_pipeline.py imports


def _train(cfg: DPOConfig, service: Any, ckpt_root: Path, run_dir: Path,
           on_step: Callable[[int, dict[str, float]], None] | None, stop_after: int | None) -> DPOTrainResult:
    ds = prepare(cfg, tokenizer_for(cfg), eval_prompts_of(behaviour_benchmark(cfg)))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "data_quality.json").write_text(json.dumps(ds.stats, indent=2))  # lengths, truncation, contamination
    latest = latest_checkpoint(ckpt_root)
    start_ckpt = _start_checkpoint(cfg, service, ds, ckpt_root, run_dir)
    if latest is None:
        tc = _new_client(service, cfg, start_ckpt)
        start = 0
        key, ref_tr, ref_ev = reference_logprobs(cfg, service, ds, start_ckpt, tc)
    else:
        start, path = latest
        if diffs := model_mismatches(path, cfg.model):
            raise BadInputError(f"cannot resume from {path}: it does not match the config "
                                f"({describe_mismatches(diffs)}); use the run's original model settings")
        key, ref_tr, ref_ev = reference_logprobs(cfg, service, ds, start_ckpt)  # cached: never the resumed model
        log.info("resuming from %s (step %d)", path, start)
        tc = service.create_training_client_from_state_with_optimizer(path)
        assert tc.step == start, f"checkpoint step {tc.step} != name step {start}"
    t = cfg.train
    metrics_path = run_dir / "metrics.jsonl"
    history = load_history(metrics_path, upto=start)
    res = DPOTrainResult(checkpoint="", steps=t.steps, resumed_from=start, metrics_path=str(metrics_path),
                         start_checkpoint=start_ckpt, dataset_dir=ds.dir, ref_key=key, data_stats=ds.stats)
    if start == 0 or not history:
        ev0 = heldout_metrics(tc, ds.eval, ref_ev, cfg)
        history = [{"step": 0, "eval_loss": ev0["loss"], "eval_reward_acc": ev0["reward_acc"]}]
    res.eval_loss_before = history[0].get("eval_loss")
    res.heldout_accuracy_before = history[0].get("eval_reward_acc")
    end = t.steps if stop_after is None else min(t.steps, start + stop_after)
    bar = tqdm(range(start, end), desc="dpo", initial=start, total=t.steps, dynamic_ncols=True)
    pending: tuple[int, Any, Any] | None = None
    for step in bar:
        idx = batch_indices(step, t.batch_size, len(ds.train), cfg.model.seed)
        loss_fn = make_loss_fn(ref_tr[idx].float(), t.beta, t.label_smoothing, t.sft_weight)
        fb = tc.forward_backward_custom(pair_datums([ds.train[i] for i in idx]), loss_fn)
        op = tc.optim_step(adam_params(t, lr_at(step, cfg)))  # type: ignore[arg-type]
        if pending is not None:  # the next step was submitted before waiting on this one's results
            _finish(pending, history, res, bar, on_step, lr_at(pending[0], cfg))
        pending = (step, fb, op)
        if (step + 1) % t.save_every == 0 and step + 1 < t.steps:
            _finish(pending, history, res, bar, on_step, lr_at(step, cfg))
            pending = None
            tc.save_state(f"step-{step + 1:06d}", metadata={"step": step + 1}).result()
            write_history(metrics_path, history)
    if pending is not None:
        _finish(pending, history, res, bar, on_step, lr_at(pending[0], cfg))
    bar.close()
    res.loss_history = [(r["step"], r["train_loss"]) for r in history if "train_loss" in r]
    if end < t.steps:  # interrupted on purpose: leave the newest checkpoint as is
        write_history(metrics_path, history)
        return res
    ev1 = heldout_metrics(tc, ds.eval, ref_ev, cfg)
    res.eval_loss_after, res.heldout_accuracy_after = ev1["loss"], ev1["reward_acc"]
    history.append({"step": t.steps, "eval_loss": ev1["loss"], "eval_reward_acc": ev1["reward_acc"]})
    final = latest_checkpoint(ckpt_root)
    if final is None or final[0] != t.steps:
        final = (t.steps, tc.save_state(f"step-{t.steps:06d}", metadata={"step": t.steps, "final": True})
                 .result().path)
    res.checkpoint = final[1]
    write_history(metrics_path, history)
    tc.close()
    return res


def _finish(pending: tuple[int, Any, Any], history: list[dict[str, Any]], res: TrainResult, bar: Any,
            on_step: Callable[[int, dict[str, float]], None] | None, lr: float) -> None:
    step, fb, op = pending
    m = fb.result().metrics
    om = op.result().metrics
    row: dict[str, Any] = {"step": step + 1, "train_loss": m["loss:sum"], "lr": lr}
    row.update({k.split(":")[0]: v for k, v in m.items() if k != "loss:sum"})
    row.update({k.split(":")[0]: v for k, v in om.items() if k != "step:max"})
    history.append(row)
    res.losses.append((step + 1, row["train_loss"]))
    bar.set_postfix(loss=f"{row['train_loss']:.3f}", acc=f"{row['reward_acc']:.2f}", margin=f"{row['margin']:.2f}")
    if on_step is not None:
        on_step(step + 1, {k: v for k, v in row.items() if k != "step"})


# ---------------------------------------------------------------- evaluation helpers


def heldout_metrics(tc: TrainingClient, pairs: list[PreferencePair], ref_N2: torch.Tensor,
                    cfg: DPOConfig) -> dict[str, Any]:
    """DPO loss and implicit-reward accuracy on held-out pairs; `scores` = one 0/1 per pair (ties are 0)."""
    pol_N2 = sequence_logprobs(tc, pairs, cfg.train.ref_batch_size)
    t = cfg.train
    loss, _ = dpo_loss(pol_N2[:, 0], pol_N2[:, 1], ref_N2[:, 0], ref_N2[:, 1], t.beta, t.label_smoothing)
    margin_N = t.beta * ((pol_N2[:, 0] - ref_N2[:, 0]) - (pol_N2[:, 1] - ref_N2[:, 1]))
    scores = (margin_N > TIE_TOL).double()
    return {"loss": float(loss), "reward_acc": float(scores.mean()) if len(pairs) else float("nan"),
            "scores": scores.tolist(), "margins": margin_N.tolist(), "policy": pol_N2, "ref": ref_N2}


def preference_eval_result(tc: TrainingClient, ds: PreferenceDataset, ref_ev: torch.Tensor, cfg: DPOConfig,
                           checkpoint: str, ref_key: str, name: str = "heldout_pref") -> Any:
    """Held-out preference accuracy as an `evals.runner.EvalResult` (kind "preference", one 0/1 per pair)."""
    from evals.protocols import EvalProtocol
    from evals.runner import BenchmarkResult, EvalResult
    from evals.store import ExampleRecord

    hm = heldout_metrics(tc, ds.eval, ref_ev, cfg)
    proto = EvalProtocol(renderer=cfg.data.renderer, grader="dpo_implicit_reward", grader_version="1",
                         extra={"beta": str(cfg.train.beta), "reference": ref_key, "dataset": ds.hash})
    phash = proto.hash()
    records = {}
    for p, s, mg, pol in zip(ds.eval, hm["scores"], hm["margins"], hm["policy"].tolist(), strict=True):
        records[p.id] = ExampleRecord(example_id=p.id, benchmark=name, checkpoint=checkpoint, protocol_hash=phash,
                                      prompt=p.prompt_text, output="", extracted=f"{mg:.6f}", score=float(s),
                                      extra={"margin": mg, "logp_chosen": pol[0], "logp_rejected": pol[1],
                                             "source": p.source})
    dhash = hashlib.sha256(",".join(sorted(records)).encode()).hexdigest()[:16]
    br = BenchmarkResult(name, "preference", checkpoint, proto, phash, dhash, len(records), records)
    return EvalResult(checkpoint, {name: br})


def behaviour_benchmark(cfg: DPOConfig, n: int | None = None, name: str = "target") -> Any:
    """The built-in task's held-out prompts graded by its code check (None for user files: no check known)."""
    if cfg.data.train_file:
        return None
    from data.preferences import constraint_benchmark

    return constraint_benchmark(n or cfg.eval.n_examples, seed=cfg.data.seed, name=name,
                                max_tokens=cfg.eval.max_tokens, **dict(cfg.data.task_kwargs))


def eval_prompts_of(bench: Any) -> list[str]:
    return [ex.prompt_text() for ex in bench.examples] if bench is not None else []
