"""The distillation recipe: a student learns a teacher's skill, on-policy or off-policy, as a plain loop.

    from recipes.distill import train_distill
    from recipes.distill_config import DistillConfig
    train_distill(DistillConfig(), "runs/my-distill")        # on-policy, reference teacher and student

Features:
- teacher: any model tuneloop loads (a preset, a HF dir, a tuneloop checkpoint: path, file:// or s3://),
  frozen (it is only ever `forward`ed or sampled); a bare base model is scored through a zero-initialised
  LoRA client, which computes exactly the base's logprobs in the engine's batched forward;
- the student and the teacher must share a tokenizer (same vocabulary): checked before any model is built,
  a `BadInputError` naming both otherwise;
- on-policy (tinker-cookbook's on-policy distillation): the student samples `group_size` completions per
  prompt with logprobs, the teacher scores the sampled tokens, and the per-token reverse KL
  `log p_student - log p_teacher` is the negated advantage (times `kl_coef`, optionally discounted over the
  future tokens) of an `importance_sampling` update; by default the batch's mean per-token KL is subtracted
  first (`kl_baseline`: same expected gradient, far less variance; `false` is the cookbook's exact signal);
- off-policy: the teacher samples completions for the same prompts and the student is fine-tuned on them
  with the SFT recipe's pieces (`build_datums`, `batch_indices`, `lr_at`);
- `train.max_student_tokens`: stop at a budget of completion tokens trained on (the modes compared at equal
  student tokens); atomic `step-N` checkpoints with the optimizer and exact resume (`recipes.common`): the
  step's prompts and sampling seeds are pure functions of (seed, step); metrics.jsonl, a progress bar, and per
  step the reverse KL, student sampling / teacher scoring / update tokens per second;
- evaluation helpers for the flow: the held-out skill benchmark (graded by code), generators for teacher and
  student, and the share of the teacher-student gap closed.

Trade-offs: one process, one engine per base model (teacher and student on the same base share its weights,
as two adapters); steps run synchronously (sample -> score -> update), which keeps on-policy exact (the
sampler always has the latest weights) and the timing shares meaningful; off-policy teacher completions are
sampled per step, not cached as a dataset, so an epoch's repeat of a prompt gets fresh completions.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
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
from recipes.distill_config import AUTO, DistillConfig
from recipes.prompt_data import PromptRow, load_prompts
from recipes.sft import batch_indices, build_datums, lr_at
from training_core import ServiceClient, TrainingClient, types
from training_core.renderers import get_renderer

log = logging.getLogger(__name__)

__all__ = ["ModelRef", "check_same_tokenizer", "discounted_sum", "gap_closed", "resolve_model",
           "reverse_kl_advantages", "train_distill", "training_prompts"]


@dataclass(frozen=True)
class ModelRef:
    """A loadable model: a base (preset, HF dir) and optionally a tuneloop LoRA checkpoint on it."""

    spec: str  # what the user wrote
    base_model: str
    checkpoint: str | None = None


def resolve_model(spec: str, scratch: Path) -> ModelRef:
    """A preset / HF dir / hub id -> a base; a tuneloop checkpoint (dir with trainer state, or URI) -> its base."""
    from training_core.state import TRAINER_STATE, read_trainer_state

    if "://" in spec:
        import hashlib

        spec_local = local_checkpoint(spec, scratch / hashlib.sha256(spec.encode()).hexdigest()[:12])
    else:
        spec_local = spec
    p = Path(spec_local)
    if (p / TRAINER_STATE).is_file():
        return ModelRef(spec, read_trainer_state(p)["base_model"], str(p))
    if "://" in spec:
        raise BadInputError(f"{spec}: not a tuneloop checkpoint (no {TRAINER_STATE})")
    return ModelRef(spec, spec)


def _tokenizer(base_model: str) -> Any:
    from transformers import AutoTokenizer

    from training_core.model_loading import resolve

    return AutoTokenizer.from_pretrained(resolve(base_model))


def check_same_tokenizer(teacher: ModelRef, student: ModelRef) -> None:
    """Refuse a pair whose tokenizers differ: per-token teacher logprobs only mean something on shared tokens."""
    if teacher.base_model == student.base_model:
        return
    t_vocab, s_vocab = _tokenizer(teacher.base_model).get_vocab(), _tokenizer(student.base_model).get_vocab()
    if t_vocab != s_vocab:
        only_t = len(set(t_vocab.items()) - set(s_vocab.items()))
        raise BadInputError(
            f"teacher {teacher.spec!r} (base {teacher.base_model}, vocab {len(t_vocab)}) and student "
            f"{student.spec!r} (base {student.base_model}, vocab {len(s_vocab)}) have different tokenizers "
            f"({only_t} teacher token ids differ); distillation needs the same tokenizer: pick a student of the "
            f"teacher's family")


def resolve_pair(cfg: DistillConfig, run_dir: Path) -> tuple[ModelRef, ModelRef]:
    """(teacher, student's starting model): `auto` builds (once, cached) the reference pair."""
    teacher_spec, init_from = cfg.teacher, cfg.init_from
    if AUTO in (teacher_spec, init_from):
        ref_teacher, ref_student = reference_models(cfg)
        teacher_spec = ref_teacher if teacher_spec == AUTO else teacher_spec
        init_from = (ref_student or "") if init_from == AUTO else init_from
    teacher = resolve_model(teacher_spec, run_dir / "teacher")
    if not init_from:
        return teacher, ModelRef(cfg.model.base_model, cfg.model.base_model)
    student = resolve_model(init_from, run_dir / "init")
    if student.checkpoint is None:
        raise BadInputError(f"init_from {init_from!r} is not a tuneloop checkpoint; to start from a base model "
                            f"set model.base_model={init_from} init_from=''")
    return teacher, student


def adopt_student_values(cfg: DistillConfig, init_ref: ModelRef) -> dict[str, tuple[Any, Any]]:
    """Set `cfg.model` to the starting checkpoint's base and LoRA shape (what training really uses), so the
    logged config is the effective one and a resume checks against it. Returns what changed."""
    if init_ref.checkpoint is None:
        return {}
    diffs = model_mismatches(init_ref.checkpoint, cfg.model)
    for k, (ck_value, _) in diffs.items():
        setattr(cfg.model, k, ck_value)
    if diffs:
        log.info("student %s: training uses the checkpoint's values (%s)", init_ref.spec, describe_mismatches(diffs))
    return diffs


# ---- the on-policy signal ------------------------------------------------------------------------------
def discounted_sum(x_T: torch.Tensor, gamma: float) -> torch.Tensor:
    """y[t] = sum_{k>=t} gamma**(k-t) * x[k] (gamma 0: y == x)."""
    if gamma == 0.0:
        return x_T.clone()
    y_T = torch.empty_like(x_T)
    acc = torch.zeros((), dtype=x_T.dtype)
    for t in range(x_T.shape[0] - 1, -1, -1):
        acc = x_T[t] + gamma * acc
        y_T[t] = acc
    return y_T


def reverse_kl_advantages(student_lp_T: torch.Tensor, teacher_lp_T: torch.Tensor, mask_T: torch.Tensor,
                          kl_coef: float, discount: float, baseline: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages_T, reverse_kl_T) of one sequence: rkl = (lp_s - lp_t) * mask,
    A = discounted(-kl_coef * (rkl - baseline)) * mask (baseline 0: the cookbook's signal)."""
    rkl_T = (student_lp_T - teacher_lp_T) * mask_T
    return discounted_sum(-kl_coef * (rkl_T - baseline) * mask_T, discount) * mask_T, rkl_T


def _sequence_datum(prompt: list[int], completion: list[int], inputs: dict[str, list[float]]) -> types.Datum:
    """Prompt + completion as one next-token datum; `inputs` are per-completion-token values (0 on the prompt)."""
    tokens = prompt + completion
    pad = [0.0] * (len(prompt) - 1)
    lfi: dict[str, Any] = {"target_tokens": torch.tensor(tokens[1:], dtype=torch.int64)}
    for k, v in inputs.items():
        lfi[k] = torch.tensor(pad + list(v), dtype=torch.float32)
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs=lfi)


# ---- data ----------------------------------------------------------------------------------------------
def training_prompts(cfg: DistillConfig) -> list[PromptRow]:
    d = cfg.data
    source = d.source or f"task:{d.task}"
    return load_prompts(source, d.n_prompts, d.seed, d.task_kwargs, columns=d.columns)


def _step_seed(cfg: DistillConfig, step: int) -> int:
    return cfg.data.seed * 1_000_003 + step  # a pure function of (seed, step): a resumed step samples the same


# ---- the loop ------------------------------------------------------------------------------------------
@dataclass
class _Ctx:
    cfg: DistillConfig
    student: TrainingClient
    teacher: TrainingClient
    renderer: Any
    prompts: list[PromptRow]
    prompt_tokens: list[list[int]]
    teacher_sampler: Any = None


def train_distill(cfg: DistillConfig, run_dir: str | Path,
                  on_iter: Callable[[int, dict[str, float]], None] | None = None,
                  stop_after: int | None = None) -> TrainResult:
    """Run (or resume) distillation in `cfg.mode`; `stop_after` ends after that many steps (interruption tests).

    `teacher=auto` / `init_from=auto` build (once, cached) the reference pair (`reference_models`).
    """
    run_dir = Path(run_dir)
    ckpt_root = run_dir / "checkpoints"
    m = cfg.model
    teacher_ref, init_ref = resolve_pair(cfg, run_dir)
    adopt_student_values(cfg, init_ref)
    latest = latest_checkpoint(ckpt_root)
    start_path = latest[1] if latest else init_ref.checkpoint
    check_same_tokenizer(teacher_ref, init_ref)
    service = ServiceClient(checkpoint_root=ckpt_root, compute_dtype=m.compute_dtype, session_id="distill")
    try:
        if latest is not None:
            start, path = latest
            if diffs := model_mismatches(path, m):
                raise BadInputError(f"cannot resume from {path}: it does not match the config "
                                    f"({describe_mismatches(diffs)}); use the run's original model settings")
            log.info("resuming from %s (step %d)", path, start)
            student = service.create_training_client_from_state_with_optimizer(path)
        elif start_path is not None:
            student, start = service.create_training_client_from_state(start_path), 0
        else:
            student = service.create_lora_training_client(
                m.base_model, rank=m.rank, seed=m.seed, train_mlp=m.train_mlp, train_attn=m.train_attn,
                train_unembed=m.train_unembed, lora_alpha=m.lora_alpha)
            start = 0
        if teacher_ref.checkpoint:
            teacher = service.create_training_client_from_state(teacher_ref.checkpoint)
        else:  # LoRA B starts at zero: this client computes exactly the base model's logprobs
            teacher = service.create_lora_training_client(teacher_ref.base_model, rank=1, seed=0)
        return _run(cfg, student, teacher, start, run_dir, on_iter, stop_after)
    finally:
        service.close()


def _run(cfg: DistillConfig, student: TrainingClient, teacher: TrainingClient, start: int, run_dir: Path,
         on_iter: Callable[[int, dict[str, float]], None] | None,
         stop_after: int | None) -> TrainResult:
    tok = student.get_tokenizer()
    renderer = get_renderer(cfg.data.renderer, tok)
    prompts = training_prompts(cfg)
    prompt_tokens = [renderer.build_generation_prompt(p.messages).to_ints() for p in prompts]
    room = cfg.data.max_length - cfg.distill.max_tokens
    too_long = [p.id for p, t in zip(prompts, prompt_tokens, strict=True) if len(t) > room]
    if too_long:
        raise BadInputError(f"{len(too_long)} prompts exceed data.max_length - distill.max_tokens = {room} tokens "
                            f"(e.g. {too_long[0]}); raise data.max_length or shorten them")
    ctx = _Ctx(cfg, student, teacher, renderer, prompts, prompt_tokens)
    if cfg.mode == "off_policy":
        ctx.teacher_sampler = teacher.save_weights_and_get_sampling_client()
    step_fn = _on_policy_step if cfg.mode == "on_policy" else _off_policy_step
    t = cfg.train
    metrics_path = run_dir / "metrics.jsonl"
    history = load_history(metrics_path, upto=start) if start else []
    tokens_done = int(history[-1].get("student_tokens", 0)) if history else 0
    res = TrainResult(checkpoint="", steps=t.steps, resumed_from=start, metrics_path=str(metrics_path))
    end = t.steps if stop_after is None else min(t.steps, start + stop_after)
    budget = t.max_student_tokens or None
    bar = tqdm(range(start, end), desc=f"distill {cfg.mode}", initial=start, total=t.steps, dynamic_ncols=True)
    last = start
    for step in bar:
        if budget is not None and tokens_done >= budget:
            break  # the budget was met by the previous step: it is the last one
        row = step_fn(ctx, step)
        tokens_done += int(row["step_tokens"])
        row = {"step": step + 1, **row, "student_tokens": tokens_done}
        history.append(row)
        last = step + 1
        res.losses.append((last, row["loss"]))
        bar.set_postfix(loss=f"{row['loss']:.3f}", tokens=tokens_done)
        if on_iter is not None:
            on_iter(last, {k: v for k, v in row.items() if k != "step"})
        done = budget is not None and tokens_done >= budget
        if last % t.save_every == 0 and last < t.steps and not done:
            student.save_state(f"step-{last:06d}", metadata={"step": last}).result()
            write_history(metrics_path, history)
    bar.close()
    if ctx.teacher_sampler is not None:
        ctx.teacher_sampler.close()
    res.loss_history = [(r["step"], r["loss"]) for r in history if "loss" in r]
    finished = last >= t.steps or (budget is not None and tokens_done >= budget)
    if not finished:  # interrupted on purpose: leave the newest checkpoint as it is
        write_history(metrics_path, history)
        return res
    res.steps = last
    final = latest_checkpoint(run_dir / "checkpoints")
    if final is None or final[0] != last:
        path = student.save_state(f"step-{last:06d}", metadata={"step": last, "final": True}).result().path
        final = (last, path)
    res.checkpoint = final[1]
    write_history(metrics_path, history)
    return res


def _adam(cfg: DistillConfig, step: int) -> types.AdamParams:
    return adam_params(cfg.train, lr_at(step, cfg))  # type: ignore[arg-type]


def _step_prompts(ctx: _Ctx, step: int) -> list[int]:
    return batch_indices(step, ctx.cfg.distill.prompts_per_step, len(ctx.prompts), ctx.cfg.data.seed)


def _sample_score(ctx: _Ctx, idx: list[int], seqs: list[list[int]]) -> float | None:
    """Share of completions graded correct, when the prompts carry answers (a metric only: never a reward)."""
    from data.generators import score

    rows = [ctx.prompts[i] for i in idx]
    if any(r.answer is None for r in rows):
        return None
    vals = [score(ctx.renderer.parse_response(s)[0]["content"], r.answer) for r, s in zip(rows, seqs, strict=True)]
    return sum(vals) / max(len(vals), 1)


def _on_policy_step(ctx: _Ctx, step: int) -> dict[str, float]:
    cfg, d = ctx.cfg, ctx.cfg.distill
    idx = _step_prompts(ctx, step)
    t0 = time.perf_counter()
    sampler = ctx.student.save_weights_and_get_sampling_client()
    params = types.SamplingParams(max_tokens=d.max_tokens, temperature=d.temperature, top_p=d.top_p,
                                  seed=_step_seed(cfg, step), stop=ctx.renderer.get_stop_sequences() or None)
    outs = sampler.sample_batch([types.ModelInput.from_ints(ctx.prompt_tokens[i]) for i in idx], params,
                                num_samples=d.group_size).result()
    sampler.close()
    t1 = time.perf_counter()
    seqs: list[tuple[list[int], list[int], list[float]]] = []
    rows_idx: list[int] = []
    for i, out in zip(idx, outs, strict=True):
        for s in out.sequences:
            if s.tokens:
                seqs.append((ctx.prompt_tokens[i], list(s.tokens), list(s.logprobs or [])))
                rows_idx.append(i)
    n_completion = sum(len(c) for _, c, _ in seqs)
    if not seqs:
        raise RuntimeError(f"step {step}: the student sampled no tokens at all")
    score_data = [_sequence_datum(p, c, {}) for p, c, _ in seqs]
    teacher_out = ctx.teacher.forward(score_data, "cross_entropy").result()
    t2 = time.perf_counter()
    lps_C = [torch.tensor(lps, dtype=torch.float32) for _, _, lps in seqs]
    teacher_C = [out["logprobs"].to_torch()[len(p) - 1:] for (p, _, _), out in zip(seqs, teacher_out.loss_fn_outputs,
                                                                                    strict=True)]
    rkl_sum = sum(float((s_ - t_).sum()) for s_, t_ in zip(lps_C, teacher_C, strict=True))
    # the batch's mean per-token KL as a baseline: the same expected gradient, far less variance (option)
    base = rkl_sum / n_completion if d.kl_baseline else 0.0
    data = []
    for (p, c, lps), s_C, t_C in zip(seqs, lps_C, teacher_C, strict=True):
        adv_C, _ = reverse_kl_advantages(s_C, t_C, torch.ones_like(s_C), d.kl_coef, d.kl_discount, base)
        data.append(_sequence_datum(p, c, {"logprobs": lps, "advantages": adv_C.tolist()}))
    fb = ctx.student.forward_backward(data, "importance_sampling")
    om = ctx.student.optim_step(_adam(cfg, step)).result().metrics
    loss = fb.result().metrics["loss:sum"]
    t3 = time.perf_counter()
    n_scored = sum(d_.model_input.length for d_ in data)
    row = {"loss": rkl_sum / n_completion, "reverse_kl": rkl_sum / n_completion, "is_loss_sum": loss,
           "lr": lr_at(step, cfg), "step_tokens": float(n_completion),  # type: ignore[arg-type]
           "sample_tokens_per_s": n_completion / (t1 - t0), "teacher_tokens_per_s": n_scored / (t2 - t1),
           "update_tokens_per_s": n_scored / (t3 - t2), "sample_s": t1 - t0, "teacher_s": t2 - t1,
           "update_s": t3 - t2, **{k.split(":")[0]: v for k, v in om.items() if k != "step:max"}}
    sc = _sample_score(ctx, rows_idx, [c for _, c, _ in seqs])
    if sc is not None:
        row["sample_score"] = sc
    return row


def _off_policy_step(ctx: _Ctx, step: int) -> dict[str, float]:
    cfg, d = ctx.cfg, ctx.cfg.distill
    idx = _step_prompts(ctx, step)
    t0 = time.perf_counter()
    params = types.SamplingParams(max_tokens=d.max_tokens, temperature=d.teacher_temperature,
                                  seed=_step_seed(cfg, step), stop=ctx.renderer.get_stop_sequences() or None)
    outs = ctx.teacher_sampler.sample_batch([types.ModelInput.from_ints(ctx.prompt_tokens[i]) for i in idx],
                                            params, num_samples=d.group_size).result()
    t1 = time.perf_counter()
    rows, clean = [], []
    for i, out in zip(idx, outs, strict=True):
        for j, s in enumerate(out.sequences):
            msg, ok = ctx.renderer.parse_response(list(s.tokens))
            if not msg["content"].strip():
                continue
            rows.append({"id": f"{ctx.prompts[i].id}-{step}-{j}", "messages": [*ctx.prompts[i].messages, msg]})
            clean.append(ok)
    # A completion cut at max_tokens would teach the student to stop mid-answer: dropped, unless all are cut.
    kept = [r for r, ok in zip(rows, clean, strict=True) if ok] or rows
    if not kept:
        raise RuntimeError(f"step {step}: the teacher produced no completion text")
    datums = build_datums(kept, ctx.student.get_tokenizer(), cfg.data.renderer, "last_assistant_message",
                          cfg.data.max_length)
    wsum = sum(sum(x.loss_fn_inputs["weights"].data) for x in datums)
    t2 = time.perf_counter()
    fb = ctx.student.forward_backward(datums, "cross_entropy")
    om = ctx.student.optim_step(_adam(cfg, step)).result().metrics
    loss = fb.result().metrics["loss:sum"] / max(wsum, 1e-9)
    t3 = time.perf_counter()
    n_scored = sum(x.model_input.length for x in datums)
    n_sampled = sum(len(s.tokens) for out in outs for s in out.sequences)
    return {"loss": loss, "lr": lr_at(step, cfg), "step_tokens": wsum,  # type: ignore[arg-type]
            "teacher_sample_tokens_per_s": n_sampled / (t1 - t0), "update_tokens_per_s": n_scored / (t3 - t2),
            "teacher_sample_s": t1 - t0, "update_s": t3 - t2, "dropped_truncated": float(len(rows) - len(kept)),
            **{k.split(":")[0]: v for k, v in om.items() if k != "step:max"}}


# ---- evaluation helpers --------------------------------------------------------------------------------
def gap_closed(student_before: float, student_after: float, teacher: float) -> float:
    """Share of the teacher-student gap the student closed: (after - before) / (teacher - before); NaN when the
    teacher is not better than the student was (there is no gap to close)."""
    gap = teacher - student_before
    return (student_after - student_before) / gap if gap > 0 else float("nan")


def skill_benchmark(cfg: DistillConfig, n: int | None = None, name: str = "target") -> Any:
    """Held-out problems of the teacher's skill (the task's eval split, never a training prompt), graded by
    code: `evals.runner.evaluate` scores teacher and student on the same examples."""
    from evals.benchmarks import Benchmark, Example
    from evals.graders import make_grader
    from recipes.prompt_data import task_prompts
    from tasks.evaluate import DEFAULT_GRADER

    rows = task_prompts(cfg.data.task, n or cfg.eval.n_examples, cfg.data.seed, split="eval", **cfg.data.task_kwargs)
    # meta {"row_id": ...} as the SFT pipeline's target benchmark: the same row gets the same example id
    examples = [Example.make(r.messages, r.answer, {"row_id": r.meta["row_id"]}) for r in rows]
    return Benchmark(name, examples, make_grader(DEFAULT_GRADER),
                     description=f"held-out {cfg.data.task} problems: the teacher's skill")


def eval_protocol(cfg: DistillConfig) -> Any:
    from evals.protocols import EvalProtocol

    e = cfg.eval
    return EvalProtocol(renderer=cfg.data.renderer, max_tokens=e.max_tokens, temperature=e.temperature,
                        top_p=e.top_p, seed=e.seed)


def model_generator(service: ServiceClient, ref: ModelRef | str, name: str, cfg: DistillConfig) -> Any:
    """A `evals.protocols.Generator` over a model reference or a checkpoint path (the teacher, the student)."""
    from training_core.textgen import SamplingGenerator

    if isinstance(ref, str):  # a checkpoint path or URI, or a base model (preset, HF dir)
        import tempfile

        ref = resolve_model(ref, Path(tempfile.gettempdir()) / "tuneloop-distill-eval")
    client = (service.create_sampling_client(model_path=ref.checkpoint) if ref.checkpoint
              else service.create_sampling_client(base_model=ref.base_model))
    return SamplingGenerator(client, name, renderer=cfg.data.renderer, batch_size=cfg.eval.batch_size)


def evaluate_models(cfg: DistillConfig, models: dict[str, ModelRef | str], results_dir: str | Path | None = None,
                    benchmarks: list[Any] | None = None) -> dict[str, Any]:
    """name -> `EvalResult` of each model on the skill benchmark (plus `benchmarks`), same examples and protocol."""
    from evals.runner import evaluate

    benches = benchmarks if benchmarks is not None else [skill_benchmark(cfg)]
    service = ServiceClient(compute_dtype=cfg.model.compute_dtype)
    try:
        return {name: evaluate(model_generator(service, ref, name, cfg), benches, eval_protocol(cfg), results_dir,
                               checkpoint=name, batch_size=cfg.eval.batch_size) for name, ref in models.items()}
    finally:
        service.close()


def heldout_reverse_kl(cfg: DistillConfig, teacher: ModelRef | str, student: ModelRef | str, n: int = 64,
                       samples: int = 2) -> float:
    """Mean per-token reverse KL (log p_student - log p_teacher) on the student's own completions of `n`
    held-out skill prompts (seeded, temperature 1): the quantity on-policy distillation minimises."""
    import tempfile

    scratch = Path(tempfile.gettempdir()) / "tuneloop-distill-eval"
    t_ref = resolve_model(teacher, scratch) if isinstance(teacher, str) else teacher
    s_ref = resolve_model(student, scratch) if isinstance(student, str) else student
    service = ServiceClient(compute_dtype=cfg.model.compute_dtype)
    try:
        clients = [service.create_training_client_from_state(r.checkpoint) if r.checkpoint
                   else service.create_lora_training_client(r.base_model, rank=1, seed=0) for r in (s_ref, t_ref)]
        renderer = get_renderer(cfg.data.renderer, clients[0].get_tokenizer())
        prompts = [renderer.build_generation_prompt(ex.messages).to_ints() for ex in skill_benchmark(cfg, n).examples]
        params = types.SamplingParams(max_tokens=cfg.distill.max_tokens, temperature=1.0, seed=cfg.eval.seed,
                                      stop=renderer.get_stop_sequences() or None)
        sampler = clients[0].save_weights_and_get_sampling_client()
        outs = sampler.sample_batch([types.ModelInput.from_ints(p) for p in prompts], params, samples).result()
        seqs = [(p, list(s.tokens)) for p, o in zip(prompts, outs, strict=True) for s in o.sequences if s.tokens]
        data = [_sequence_datum(p, c, {}) for p, c in seqs]
        lp_s, lp_t = (c.forward(data, "cross_entropy").result().loss_fn_outputs for c in clients)
        diff = sum(float((a["logprobs"].to_torch()[len(p) - 1:] - b["logprobs"].to_torch()[len(p) - 1:]).sum())
                   for (p, _), a, b in zip(seqs, lp_s, lp_t, strict=True))
        return diff / sum(len(c) for _, c in seqs)
    finally:
        service.close()


# ---- the reference pair (teacher=auto, init_from=auto) -----------------------------------------------------
def reference_models(cfg: DistillConfig) -> tuple[str, str | None]:
    """(teacher checkpoint, student checkpoint or None) for `cfg.data.task` on `cfg.model.base_model`.

    Made offline by two short SFT runs (`recipes.sft`) on generated data and cached by a hash of everything
    that shapes them (a second run, or another process, reuses them; a lock keeps two builds apart). The teacher
    is a rank-32 LoRA trained `teacher_steps` (the `reverse` task on `tiny` reaches ~100 % in 150 steps); the
    student a rank-`student_rank` LoRA trained `student_steps` (barely: it knows the answer format, rarely the
    answer).
    """
    import fcntl
    import hashlib
    import json

    from data.generators import train_eval, write_jsonl
    from flows.sft_config import DataConfig, ModelConfig, PipelineConfig, TrainConfig
    from recipes.sft import train_sft
    from training_core.checkpoint import is_committed
    from training_core.presets import cache_dir

    r, d = cfg.reference, cfg.data
    spec = {"v": 1, "base": cfg.model.base_model, "task": d.task, "kw": d.task_kwargs, "seed": d.seed,
            "renderer": d.renderer, "ref": {k: getattr(r, k) for k in ("teacher_steps", "student_steps",
                                                                      "student_rank", "n_train")}}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    root = (Path(r.cache_dir) if r.cache_dir else cache_dir() / "distill").resolve() / f"ref-{key}"
    marker = root / "reference.json"

    def cached() -> tuple[str, str | None] | None:
        if not marker.exists():
            return None
        got = json.loads(marker.read_text())
        ok = is_committed(Path(got["teacher"])) and (got["student"] is None or is_committed(Path(got["student"])))
        return (got["teacher"], got["student"]) if ok else None

    if (hit := cached()) is not None:
        return hit
    root.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f"ref-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (hit := cached()) is not None:
            return hit
        log.info("building the reference teacher/student for %s on %s in %s", d.task, cfg.model.base_model, root)
        train, held = train_eval(d.task, r.n_train, 16, seed=d.seed, **d.task_kwargs)
        write_jsonl(train, root / "train.jsonl")
        write_jsonl(held, root / "eval.jsonl")

        def sft(name: str, steps: int, rank: int) -> str:
            pc = PipelineConfig(
                model=ModelConfig(base_model=cfg.model.base_model, rank=rank, lora_alpha=2.0 * rank),
                data=DataConfig(task=d.task, task_kwargs=d.task_kwargs, seed=d.seed, replay="",
                                renderer=d.renderer, max_length=d.max_length),
                train=TrainConfig(steps=steps, save_every=steps, warmup_steps=min(10, steps // 3),
                                  eval_loss_examples=16))
            return train_sft(pc, str(root / "train.jsonl"), str(root / "eval.jsonl"), root / name).checkpoint

        teacher = sft("teacher", r.teacher_steps, 32)
        student = sft("student", r.student_steps, r.student_rank) if r.student_steps else None
        tmp = marker.with_suffix(".tmp")
        tmp.write_text(json.dumps({"teacher": teacher, "student": student, "spec": spec}))
        tmp.replace(marker)  # written last: a crash before here rebuilds (train_sft resumes its checkpoints)
        return teacher, student
