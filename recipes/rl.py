"""RL from verifiable rewards (GRPO-style) as a plain loop over training_core's primitives; no Prefect.

Each iteration i:
1. `save_weights_and_get_sampling_client()`; the dataset's groups for i (a pure function of (seed, i));
   `group_size` rollouts per problem, batched through the sampler (`sample_batch(..., num_samples)`), with
   the sampler's logprobs (untempered model logprobs: the importance ratio is exactly 1 on-policy). Multi-
   turn envs are stepped turn by turn; identical prompts share one batched call.
2. Rewards; advantages centred within each group (optionally divided by the group's std); groups with zero
   reward variance carry no signal and are dropped (counted: `zero_var_groups`).
3. Optional KL penalty vs the reference (the starting weights), k1 estimator folded into the advantages per
   sampled token: `adv_t = A - kl_coef * (q_t - ref_t)`, `q_t` the sampler's logprob, `ref_t` the
   reference's `forward` logprob of the same token; metric `kl` = mean over sampled tokens of `q_t - ref_t`
   (an unbiased estimate of KL(pi_sampler || pi_ref) since tokens are drawn from pi_sampler).
4. `num_substeps` x (`forward_backward(loss_fn)` + `optim_step`); an episode is one datum when each turn's
   prompt extends the previous turn's tokens (else one per turn); only sampled positions carry the
   advantage (`dro` also gets a weights mask).
Overlap (`rl.overlap`): iteration i+1's rollouts run in a thread with the weights before update i while
update i runs (one step off-policy, corrected by the importance ratio of the loss). The iteration after a
checkpoint is always sampled on-policy, so a resumed run equals an uninterrupted one with overlap too.

Checkpoints (`step-NNNNNN`, atomic `save_state` with the optimizer) every `save_every` iterations carry the
iteration, the sampler seed and the env position; all randomness derives from (seed, iteration), so a resume
repeats no update and skips none. Per iteration: a metrics row (on_iter + run_dir/metrics.jsonl) and the
rollout transcripts (run_dir/rollouts/iter-NNNNNN.jsonl). Start: `init_from`, else an SFT warm-up
(`warmup.steps`, the SFT recipe), else the base model. Failures (context overflow, unparseable answers, env
exceptions) get `env.*_reward` and are counted; they never crash the run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from envs.base import EnvGroupBuilder, FailureRewards, Message
from infra.config import BadInputError
from recipes.common import (
    TrainResult,
    adopt_init_from,
    describe_mismatches,
    latest_checkpoint,
    load_history,
    local_checkpoint,
    model_mismatches,
    write_history,
)
from recipes.rl_config import RLConfig
from training_core import types

log = logging.getLogger(__name__)


def derive_seed(*parts: Any) -> int:
    """A 31-bit seed from any parts (stable across processes, unlike hash())."""
    return int(hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


# ---------------------------------------------------------------- rollouts


@dataclass
class Turn:
    prompt_tokens: list[int]
    tokens: list[int]
    logprobs: list[float]


@dataclass
class Episode:
    messages: list[Message]
    turns: list[Turn] = field(default_factory=list)
    reward: float = 0.0
    failure: str | None = None  # overflow | unparseable | error
    metrics: dict[str, float] = field(default_factory=dict)
    logs: list[dict[str, Any]] = field(default_factory=list)


def rollout_groups(sampler: Any, renderer: Any, builders: list[EnvGroupBuilder], group_size: int,
                   params: types.SamplingParams, max_context: int, failure: FailureRewards,
                   max_turns: int = 16) -> list[list[Episode]]:
    """`group_size` episodes per builder; never raises for env or context problems (see FailureRewards)."""
    groups: list[list[Episode]] = []
    active: list[tuple[Episode, Any]] = []
    for b in builders:
        eps = []
        for env in b.make_envs(group_size):
            ep = Episode(messages=[])
            try:
                ep.messages = list(env.initial_observation())
                active.append((ep, env))
            except Exception as e:  # noqa: BLE001  (any env bug: defined reward, counted)
                _fail(ep, "error", failure.error, e)
            eps.append(ep)
        groups.append(eps)
    stop = renderer.get_stop_sequences()
    for turn in range(max_turns):
        if not active:
            break
        by_prompt: dict[tuple[int, ...], list[tuple[Episode, Any]]] = {}
        for ep, env in active:
            try:
                prompt = tuple(renderer.build_generation_prompt(ep.messages).to_ints())
            except Exception as e:  # noqa: BLE001  (an env produced messages the renderer refuses)
                _fail(ep, "error", failure.error, e)
                continue
            if len(prompt) + (params.max_tokens or 0) > max_context:
                _fail(ep, "overflow", failure.overflow, None)
                continue
            by_prompt.setdefault(prompt, []).append((ep, env))
        active = []
        by_count: dict[int, list[tuple[int, ...]]] = {}
        for p, members in by_prompt.items():  # identical prompts: one prompt, several samples
            by_count.setdefault(len(members), []).append(p)
        for count, prompts in sorted(by_count.items()):
            tp = types.SamplingParams(max_tokens=params.max_tokens, temperature=params.temperature, stop=stop,
                                      seed=None if params.seed is None else derive_seed(params.seed, turn, count))
            outs = sampler.sample_batch([types.ModelInput.from_ints(p) for p in prompts], tp, count).result()
            for p, out in zip(prompts, outs, strict=True):
                for (ep, env), seq in zip(by_prompt[p], out.sequences, strict=True):
                    ep.turns.append(Turn(list(p), list(seq.tokens), list(seq.logprobs or [])))
                    msg = renderer.parse_response(seq.tokens)[0]
                    try:
                        res = env.step(msg)
                    except Exception as e:  # noqa: BLE001
                        _fail(ep, "error", failure.error, e)
                        continue
                    ep.metrics.update(res.metrics)
                    ep.logs.append({"assistant": msg["content"], **res.logs})
                    ep.messages = [*ep.messages, {"role": "assistant", "content": msg["content"]}, *res.next_messages]
                    if res.done:
                        ep.reward = float(res.reward)
                        if res.metrics.get("unparseable"):
                            ep.failure = "unparseable"
                    else:
                        active.append((ep, env))
    for ep, _ in active:  # the env never ended the episode within max_turns
        _fail(ep, "unparseable", failure.unparseable, None)
    return groups


def _fail(ep: Episode, kind: str, reward: float, exc: BaseException | None) -> None:
    ep.failure, ep.reward = kind, reward
    ep.metrics.setdefault("correct", 0.0)
    if exc is not None:
        log.warning("env error (reward %s): %r", reward, exc)
        ep.logs.append({"error": repr(exc)})


# ---------------------------------------------------------------- advantages and datums


def group_advantages(rewards: list[float], normalize_std: bool = False, eps: float = 1e-6) -> list[float] | None:
    """Rewards centred on the group mean (divided by the group std when asked); None for zero variance."""
    mean = sum(rewards) / len(rewards)
    if max(rewards) - min(rewards) < 1e-12:
        return None
    adv = [r - mean for r in rewards]
    if normalize_std:
        std = math.sqrt(sum(a * a for a in adv) / len(adv))
        adv = [a / (std + eps) for a in adv]
    return adv


def _datum(seq: list[int], lp: list[float], sampled: list[int], advantage: float,
           with_mask: bool) -> tuple[types.Datum, list[int]]:
    """Token sequence `seq` (per-token sampler logprobs `lp`, sampled token indices `sampled`) -> a datum and
    the datum positions of its sampled tokens (position t predicts seq[t + 1])."""
    T = len(seq) - 1
    pos = [j - 1 for j in sampled]
    adv, w = [0.0] * T, [0.0] * T
    for t in pos:
        adv[t], w[t] = advantage, 1.0
    inputs: dict[str, Any] = {"target_tokens": seq[1:], "logprobs": lp[1:], "advantages": adv}
    if with_mask:
        inputs["weights"] = w
    return types.Datum(model_input=types.ModelInput.from_ints(seq[:-1]), loss_fn_inputs=inputs), pos


def turn_datum(turn: Turn, advantage: float, with_mask: bool = False) -> types.Datum:
    """prompt + sampled tokens, shifted; sampler logprobs and the advantage on sampled positions only."""
    seq = turn.prompt_tokens + turn.tokens
    n_p = len(turn.prompt_tokens)
    return _datum(seq, [0.0] * n_p + turn.logprobs, list(range(n_p, len(seq))), advantage, with_mask)[0]


def episode_datums(turns: list[Turn], advantage: float, with_mask: bool = False) -> list[tuple[types.Datum, list[int]]]:
    """One datum per run of turns whose prompt extends the previous turn's prompt + sampled tokens (a chat
    template re-render usually does: the transcript is trained as one sequence instead of re-sending the
    prefix per turn); a turn whose prompt does not (retokenized differently) starts a new datum."""
    out: list[tuple[types.Datum, list[int]]] = []
    seq: list[int] = []
    lp: list[float] = []
    sampled: list[int] = []
    for turn in turns:
        if not turn.tokens:
            continue
        if seq and turn.prompt_tokens[: len(seq)] == seq:
            gap = turn.prompt_tokens[len(seq):]  # env messages and the next turn's header
        else:
            if sampled:
                out.append(_datum(seq, lp, sampled, advantage, with_mask))
            seq, lp, sampled, gap = [], [], [], turn.prompt_tokens
        seq, lp = seq + gap, lp + [0.0] * len(gap)
        sampled += range(len(seq), len(seq) + len(turn.tokens))
        seq, lp = seq + turn.tokens, lp + turn.logprobs
    if sampled:
        out.append(_datum(seq, lp, sampled, advantage, with_mask))
    return out


def apply_kl_penalty(datums: list[types.Datum], sampled: list[list[int]], ref_logprobs: list[list[float]],
                     kl_coef: float) -> float:
    """adv_t -= kl_coef * (q_t - ref_t) on sampled positions, in place; returns mean(q_t - ref_t) (k1 KL)."""
    total, n = 0.0, 0
    for d, pos, ref in zip(datums, sampled, ref_logprobs, strict=True):
        q, adv = list(d.loss_fn_inputs["logprobs"].data), list(d.loss_fn_inputs["advantages"].data)
        for t in pos:
            diff = float(q[t]) - float(ref[t])
            adv[t] = float(adv[t]) - kl_coef * diff
            total, n = total + diff, n + 1
        d.loss_fn_inputs["advantages"] = types.to_tensor_data("advantages", [float(a) for a in adv])
    return total / max(n, 1)


def importance_ratios(datums: list[types.Datum], sampled: list[list[int]], logprobs: list[list[float]]) -> list[float]:
    """exp(forward logprob - sampler logprob) per sampled token (1 on-policy, within float rounding)."""
    out = []
    for d, pos, lp in zip(datums, sampled, logprobs, strict=True):
        q = d.loss_fn_inputs["logprobs"].data
        out.extend(math.exp(float(lp[t]) - float(q[t])) for t in pos)
    return out


def build_batch(groups: list[list[Episode]], cfg: RLConfig) -> tuple[list[types.Datum], list[list[int]],
                                                                     list[dict[str, Any]], dict[str, float]]:
    """Datums of the non-degenerate groups, their sampled positions, transcript rows and batch metrics."""
    datums: list[types.Datum] = []
    n_sampled: list[list[int]] = []
    rows: list[dict[str, Any]] = []
    zero_var, rewards = 0, []
    mask = cfg.rl.loss_fn == "dro"
    for g, eps in enumerate(groups):
        r = [ep.reward for ep in eps]
        rewards.extend(r)
        adv = group_advantages(r, cfg.rl.normalize_std)
        zero_var += adv is None
        for j, ep in enumerate(eps):
            a = 0.0 if adv is None else adv[j]
            if adv is not None:
                for d, pos in episode_datums(ep.turns, a, mask):
                    datums.append(d)
                    n_sampled.append(pos)
            if g < cfg.rl.rollout_log_groups:
                rows.append({"group": g, "sample": j, "prompt": ep.messages[: _n_initial(ep)],
                             "response": ep.messages[_n_initial(ep):], "reward": ep.reward, "advantage": a,
                             "failure": ep.failure, "logs": ep.logs})
    eps_all = [ep for eps in groups for ep in eps]
    n = max(len(eps_all), 1)
    mean = sum(rewards) / max(len(rewards), 1)
    sampled = [t for ep in eps_all for turn in ep.turns for t in turn.logprobs]
    m = {"reward_mean": mean, "reward_std": math.sqrt(sum((x - mean) ** 2 for x in rewards) / max(len(rewards), 1)),
         "pass_rate": sum(ep.metrics.get("correct", 0.0) for ep in eps_all) / n,
         "entropy": -sum(sampled) / max(len(sampled), 1),
         "response_len": sum(len(turn.tokens) for ep in eps_all for turn in ep.turns) / n,
         "zero_var_groups": float(zero_var), "groups": float(len(groups)), "datums": float(len(datums)),
         **{f"{k}_count": float(sum(ep.failure == k for ep in eps_all)) for k in ("overflow", "unparseable", "error")},
         "sampled_tokens": float(len(sampled))}
    return datums, n_sampled, rows, m


def _n_initial(ep: Episode) -> int:
    # the initial observation: every message before the first assistant turn
    for i, msg in enumerate(ep.messages):
        if msg["role"] == "assistant":
            return i
    return len(ep.messages)


# ---------------------------------------------------------------- start, reference, warm-up


def start_checkpoint(cfg: RLConfig, run_dir: str | Path) -> str | None:
    """The weights RL starts from: `init_from` (local copy), else the SFT warm-up's final checkpoint (trained
    here, resumable, reused when done), else None (the base model). The flow evaluates this as 'start'."""
    run_dir = Path(run_dir)
    if cfg.init_from:
        return local_checkpoint(cfg.init_from, run_dir / "init")
    if cfg.warmup.steps == 0:
        return None
    wdir = run_dir / "warmup"
    done = latest_checkpoint(wdir / "checkpoints")
    if done is not None and done[0] == cfg.warmup.steps:
        return done[1]
    return warm_start(cfg, wdir).checkpoint


def warmup_rows(cfg: RLConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str]:
    """(train rows, eval rows, train_on_what) of the SFT warm-up for the configured env."""
    e = cfg.env
    if e.name == "arithmetic":  # the env's own problems (generated or problem files): one source for both
        from envs.registry import build_dataset

        ds = build_dataset(e)
        return list(ds.train_rows), list(ds.eval_rows(min(e.n_eval, 64))), "last_assistant_message"
    if e.name == "tool_calc":
        from envs.tool_calc import sft_rows

        kw = {k: e.task_kwargs[k] for k in ("digits", "ops") if k in e.task_kwargs}
        rows = sft_rows(e.n_train, e.seed, system_prompt=e.system_prompt or None, **kw)
        return rows, rows[:64], "all_assistant_messages"  # eval rows only feed the warm-up's eval loss
    raise ValueError(f"env {e.name!r} has no warm-up data: set init_from (e.g. an SFT checkpoint) or warmup.steps=0")


def warm_start(cfg: RLConfig, wdir: Path) -> TrainResult:
    """A short SFT run (recipes.sft.train_sft) on demonstrations of the env's task; resumable."""
    from data.generators import write_jsonl
    from flows.sft_config import DataConfig, PipelineConfig, TrainConfig
    from recipes.sft import train_sft

    tr, ev, tow = warmup_rows(cfg)
    write_jsonl(tr, wdir / "train.jsonl")
    write_jsonl(ev, wdir / "eval.jsonl")
    w = cfg.warmup
    scfg = PipelineConfig(model=cfg.model, data=DataConfig(renderer=cfg.env.renderer, train_on_what=tow, replay=""),
                          train=TrainConfig(steps=w.steps, batch_size=w.batch_size, learning_rate=w.learning_rate,
                                            warmup_steps=min(w.warmup_steps, w.steps), save_every=w.steps))
    return train_sft(scfg, str(wdir / "train.jsonl"), str(wdir / "eval.jsonl"), wdir)


def _make_clients(cfg: RLConfig, service: Any, ckpt_root: Path, start_ckpt: str | None) -> tuple[Any, Any, int]:
    """(policy client, reference client or None, first iteration)."""
    m = cfg.model
    need_ref = cfg.rl.kl_coef > 0 or cfg.rl.kl_metric

    def fresh() -> Any:
        if start_ckpt:
            return service.create_training_client_from_state(start_ckpt)
        return service.create_lora_training_client(m.base_model, rank=m.rank, seed=m.seed, train_mlp=m.train_mlp,
                                                   train_attn=m.train_attn, train_unembed=m.train_unembed,
                                                   lora_alpha=m.lora_alpha)

    latest = latest_checkpoint(ckpt_root)
    if latest is None:
        tc, start = fresh(), 0
    else:
        start, path = latest
        if diffs := model_mismatches(path, m):  # a resume continues the same run: it cannot change the model
            raise BadInputError(f"cannot resume from {path}: it does not match the config "
                                f"({describe_mismatches(diffs)}); use the run's original model settings")
        log.info("resuming RL from %s (iteration %d)", path, start)
        tc = service.create_training_client_from_state_with_optimizer(path)
    return tc, (fresh() if need_ref else None), start  # the reference: the starting weights, never stepped


# ---------------------------------------------------------------- the loop


def train_rl(cfg: RLConfig, run_dir: str | Path, on_iter: Callable[[int, dict[str, float]], None] | None = None,
             stop_after: int | None = None) -> TrainResult:
    """Run (or resume) RL; `stop_after` ends after that many iterations of this attempt (interruption tests).

    `losses` / `loss_history` hold (iteration, mean reward) rows: this attempt's / the whole run's."""
    from training_core.distributed import make_service_client

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    adopt_init_from(cfg, run_dir)
    start_ckpt = start_checkpoint(cfg, run_dir)
    ckpt_root = run_dir / "checkpoints"
    m = cfg.model
    service = make_service_client(m.backend, checkpoint_root=ckpt_root, compute_dtype=m.compute_dtype,
                                  world_size=m.world_size, zero_stage=m.zero_stage, timeout_s=m.ds_timeout_s,
                                  session_id="rl")
    try:
        return _train(cfg, service, run_dir, ckpt_root, start_ckpt, on_iter, stop_after)
    finally:
        if hasattr(service, "close"):
            service.close()


def _train(cfg: RLConfig, service: Any, run_dir: Path, ckpt_root: Path, start_ckpt: str | None,
           on_iter: Callable[[int, dict[str, float]], None] | None, stop_after: int | None) -> TrainResult:
    from envs.registry import build_dataset, failure_rewards
    from training_core.renderers import get_renderer

    r = cfg.rl
    tc, ref, start = _make_clients(cfg, service, ckpt_root, start_ckpt)
    dataset = build_dataset(cfg.env)
    renderer = get_renderer(cfg.env.renderer, tc.get_tokenizer())
    max_context = cfg.env.max_context or tc._engine.base.max_length  # noqa: SLF001  (the model's context)
    failure = failure_rewards(cfg.env)
    metrics_path = run_dir / "metrics.jsonl"
    history = load_history(metrics_path, upto=start)
    write_history(metrics_path, history)  # drop rows of iterations the checkpoint does not contain
    (run_dir / "rollouts").mkdir(exist_ok=True)
    res = TrainResult(checkpoint="", steps=r.iterations, resumed_from=start, metrics_path=str(metrics_path))
    end = r.iterations if stop_after is None else min(r.iterations, start + stop_after)
    adam = types.AdamParams(learning_rate=r.learning_rate, beta1=r.beta1, beta2=r.beta2, eps=cfg.rl.eps,
                            grad_clip_norm=r.grad_clip_norm)
    loss_cfg = dict(r.loss_fn_config) or None
    pool = ThreadPoolExecutor(1, thread_name_prefix="rl-rollout") if r.overlap else None

    def rollouts(it: int, sampler: Any) -> tuple[list[list[Episode]], float]:
        t0 = time.perf_counter()
        params = types.SamplingParams(max_tokens=cfg.env.max_tokens, temperature=r.temperature,
                                      seed=derive_seed(r.seed, it))
        groups = rollout_groups(sampler, renderer, dataset.batch(it, r.groups_per_batch), r.group_size, params,
                                max_context, failure, max_turns=cfg.env.max_turns + 1)
        return groups, time.perf_counter() - t0

    bar = tqdm(range(start, end), desc="rl", initial=start, total=r.iterations, dynamic_ncols=True)
    prefetched: Any = None
    prev_sampler: Any = None
    for it in bar:
        t_iter = time.perf_counter()
        sampler = tc.save_weights_and_get_sampling_client()
        groups, t_sample = prefetched.result() if prefetched is not None else rollouts(it, sampler)
        if prev_sampler is not None:  # its prefetch is done: free the snapshot
            prev_sampler.close()
            prev_sampler = None
        prefetched = None
        if pool is not None and it + 1 < end and (it + 1) % r.save_every != 0:
            prefetched = pool.submit(rollouts, it + 1, sampler)  # weights before update `it`: one step stale
        datums, n_sampled, rows, met = build_batch(groups, cfg)
        t0 = time.perf_counter()
        if datums and ref is not None:
            ref_out = ref.forward(datums, "cross_entropy").result()
            ref_lp = [o["logprobs"].tolist() for o in ref_out.loss_fn_outputs]
            met["kl"] = apply_kl_penalty(datums, n_sampled, ref_lp, r.kl_coef)
        if datums:
            k = min(r.num_substeps, len(datums))
            futs = []
            for s in range(k):
                chunk = datums[s * len(datums) // k:(s + 1) * len(datums) // k]
                futs.append((tc.forward_backward(chunk, r.loss_fn, loss_cfg), tc.optim_step(adam)))
            fb0 = futs[0][0].result()
            lp0 = [o["logprobs"].tolist() for o in fb0.loss_fn_outputs]
            ratios = importance_ratios(datums[:len(lp0)], n_sampled[:len(lp0)], lp0)
            met["ratio_mean"] = sum(ratios) / max(len(ratios), 1)
            met["loss"] = sum(f.result().metrics["loss:sum"] for f, _ in futs) / max(met["sampled_tokens"], 1)
            for _, op in futs:
                op.result()
        t_train = time.perf_counter() - t0
        train_tokens = sum(d.model_input.length for d in datums)
        met.update(sample_time_s=t_sample, train_time_s=t_train, iter_time_s=time.perf_counter() - t_iter,
                   sample_tokens_per_s=met["sampled_tokens"] / max(t_sample, 1e-9),
                   train_tokens_per_s=train_tokens / max(t_train, 1e-9) if datums else 0.0,
                   off_policy=float(it > 0 and r.overlap and it % r.save_every != 0 and it != start))
        if prefetched is None:
            sampler.close()
        else:
            prev_sampler = sampler
        _write_rollouts(run_dir / "rollouts" / f"iter-{it:06d}.jsonl", it, rows)
        row = {"step": it + 1, **met}
        history.append(row)
        with metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        res.losses.append((it + 1, met["reward_mean"]))
        bar.set_postfix(reward=f"{met['reward_mean']:.3f}", zero_var=int(met["zero_var_groups"]))
        if on_iter is not None:
            on_iter(it + 1, {k: v for k, v in row.items() if k != "step"})
        if (it + 1) % r.save_every == 0 and it + 1 < r.iterations:
            tc.save_state(f"step-{it + 1:06d}", metadata=_ckpt_meta(cfg, it + 1)).result()
    bar.close()
    if pool is not None:
        pool.shutdown(wait=True)
    res.loss_history = [(h["step"], h["reward_mean"]) for h in history if "reward_mean" in h]
    if end < r.iterations:  # interrupted on purpose: the newest checkpoint stays as it is
        return res
    final = latest_checkpoint(ckpt_root)
    if final is None or final[0] != r.iterations:
        final = (r.iterations, tc.save_state(f"step-{r.iterations:06d}",
                                             metadata={**_ckpt_meta(cfg, r.iterations), "final": True}).result().path)
    res.checkpoint = final[1]
    return res


def _ckpt_meta(cfg: RLConfig, iteration: int) -> dict[str, Any]:
    return {"step": iteration, "iteration": iteration, "sampler_seed": cfg.rl.seed,
            "env_position": iteration * cfg.rl.groups_per_batch, "recipe": "rl"}


def _write_rollouts(path: Path, it: int, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps({"iteration": it, **row}, default=str) + "\n" for row in rows))
    tmp.replace(path)
