"""The end of a sweep: the selection leaderboard, the confirmation re-scoring, the gate and registry, MLflow
metrics with stable names, and the HTML/PNG sweep report.

Report (matplotlib, the style of evals/report.py): the selection score of every finished trial against each
hyperparameter with its CI as error bars; the training-loss curves of all trials overlaid (run_dir/
metrics.jsonl); the leaderboard; the confirmation scores next to the selection ones; the winner's flipped
examples against the runner-up (selection split).

MLflow names: on each finished trial's run `sweep_score`, `sweep_score_ci_low|_ci_high`, `sweep_rank`,
`sweep_diff_vs_best` (+ `_ci_low|_ci_high`), `sweep_p_vs_best_holm`, `sweep_diff_vs_base`, `sweep_p_vs_base_holm`,
tag `sweep_tied_with_best`; on the parent run `winner_selection_score`, `winner_confirmation_score` (+ `_ci_low|
_ci_high`), `runner_up_confirmation_score`, `base_confirmation_score`, `confirmation_diff` (+ `_ci_low|_ci_high`),
`confirmation_p_value`, `gate_passed`, `n_tied_with_best`; tags `winner`, `runner_up`, `tied_with_best`,
`verdict`, `gate`, `compared_against`.
Trade-off: the confirmation split is evaluated with the winner's config (its eval protocol equals every
trial's: eval settings are not swept by the default space; a space that sweeps `eval.*` would change it).
"""

from __future__ import annotations

import html
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from evals.compare import Flip, GatePolicy, compare, format_verdict_table
from evals.leaderboard import Leaderboard, _from_run_dir, leaderboard
from infra.config import from_dict


def _short(name: str) -> str:
    return name.split(".")[-1]


def _log_trial_metrics(client: Any, lb: Leaderboard, run_ids: dict[str, str]) -> None:
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    for r in lb.rows:
        rid = run_ids.get(r.name)
        if not rid:
            continue
        vals = {"sweep_score": r.score, "sweep_score_ci_low": r.ci[0], "sweep_score_ci_high": r.ci[1],
                "sweep_rank": float(r.rank), "sweep_diff_vs_best": r.diff_best,
                "sweep_diff_vs_best_ci_low": r.diff_best_ci[0], "sweep_diff_vs_best_ci_high": r.diff_best_ci[1],
                "sweep_p_vs_best_holm": r.p_best_holm, "sweep_diff_vs_base": r.diff_base,
                "sweep_p_vs_base_holm": r.p_base_holm}
        client.log_batch(rid, metrics=[Metric(k, float(v), ts, 0) for k, v in vals.items() if math.isfinite(v)])
        client.set_tag(rid, "sweep_tied_with_best", "true" if r.tied_with_best else "false")


def finish_sweep(base: Any, cfg_cls: Any, trial_config: Callable[[dict[str, Any]], dict[str, Any]], spec: Any,
                 sweep_id: str, sweep_dir: Path, splits: Any, trials: list[Any], client: Any, parent_id: str,
                 uri: str, t0: float, rescore: Callable[..., tuple[str, dict[str, Any]]] | None = None) -> Any:
    from flows.sweep import SweepResult
    from infra import registry
    from recipes.common import local_checkpoint
    from tasks.gate_stage import gate_policy

    rescore = rescore or rescore_sft

    done = [t for t in trials if t.state == "COMPLETE"]
    if not done:
        states = ", ".join(f"{t.name}: {t.state} {t.error}" for t in trials)
        raise RuntimeError(f"sweep {sweep_id}: no trial finished ({states})")
    e = base.eval
    pol = GatePolicy(alpha=spec.alpha, min_effect=e.min_effect, confidence=e.confidence,
                     n_bootstrap=e.bootstrap_resamples, seed=e.seed)
    loaded = {t.name: _from_run_dir(Path(t.run_dir)) for t in done}
    base_sel = next((b for _, b in loaded.values() if b is not None), None)
    extra = {t.name: {**{_short(k): v for k, v in t.params.items()}, "trial": t.number} for t in done}
    lb = leaderboard({n: r for n, (r, _) in loaded.items()}, base_sel, benchmark=spec.metric, policy=pol,
                     extra=extra)
    _log_trial_metrics(client, lb, {t.name: t.mlflow_run_id for t in done})
    by_name = {t.name: t for t in done}
    winner, runner_up = lb.best, (lb.rows[1].name if len(lb.rows) > 1 else None)

    # --- confirmation: the first time anything reads the confirmation split
    cfg_w = from_dict(cfg_cls, trial_config(by_name[winner].params))
    conf_dir = sweep_dir / "confirmation"
    summaries = {n: json.loads((Path(by_name[n].run_dir) / "summary.json").read_text())
                 for n in (winner, runner_up) if n}
    models = {n: summaries[n]["local_checkpoint"] for n in (winner, runner_up) if n}
    champ = registry.get_champion(base.registry_model, tracking_uri=uri) if base.registry_model else None
    if champ is not None:
        models["champion"] = local_checkpoint(champ[1], sweep_dir / "champion")
    base_name, scored = rescore(cfg_w, splits, spec.metric, Path(by_name[winner].run_dir), models, conf_dir)
    base_res, win_res = scored[base_name], scored[winner]
    ru_res, champ_res = (scored[runner_up] if runner_up else None), scored.get("champion")
    gate_pol = gate_policy(cfg_w, [spec.metric])  # the pipeline's own gate, on the confirmation split
    report = compare(champ_res or base_res, win_res, gate_pol, info_baselines=[base_res] if champ_res else [])
    tgt = report.by_name()[spec.metric]
    verdict = {"improved": "improved", "regressed": "regressed"}.get(tgt.verdict, "no significant change")
    against = f"champion v{champ[0]}" if champ else base_name
    conf_lb = leaderboard({n: r for n, r in ((winner, win_res), (runner_up, ru_res)) if r is not None}, base_res,
                          benchmark=spec.metric, policy=pol)
    win_ci = conf_lb.by_name()[winner].ci

    version, promoted = "", False
    if base.registry_model:
        tags = {"pipeline": f"sweep-{summaries[winner].get('pipeline', 'sft')}", "sweep_id": sweep_id}
        version = registry.register_checkpoint(by_name[winner].mlflow_run_id, summaries[winner]["checkpoint_uri"],
                                               base.registry_model, tags, tracking_uri=uri)
        registry.set_verdict_tags(base.registry_model, version, {
            "verdict": verdict, "gate_passed": report.gate.passed, "split": "confirmation",
            "selection_score": round(lb.by_name()[winner].score, 6), "confirmation_score": round(tgt.mean_b, 6),
            "diff": round(tgt.diff, 6), "diff_ci": [round(tgt.diff_ci[0], 6), round(tgt.diff_ci[1], 6)],
            "p_value": tgt.p_value, "gate_failures": report.gate.failures, "run_name": winner,
            "compared_against": against, "sweep_id": sweep_id}, tracking_uri=uri)
        promoted = registry.promote_if_passed(base.registry_model, version, report.gate.passed, tracking_uri=uri,
                                              gated_against=champ[0] if champ else None)

    sel_flips = compare(loaded[runner_up][0], loaded[winner][0], pol).by_name()[spec.metric] if runner_up else None
    out = sweep_dir / "report"
    index = write_sweep_report(out, lb, trials, conf_lb, format_verdict_table(report), sel_flips, sweep_id)
    metrics = {"winner_selection_score": lb.by_name()[winner].score, "winner_confirmation_score": tgt.mean_b,
               "winner_confirmation_score_ci_low": win_ci[0], "winner_confirmation_score_ci_high": win_ci[1],
               "base_confirmation_score": base_res.means()[spec.metric], "confirmation_diff": tgt.diff,
               "confirmation_diff_ci_low": tgt.diff_ci[0], "confirmation_diff_ci_high": tgt.diff_ci[1],
               "confirmation_p_value": tgt.p_value, "gate_passed": float(report.gate.passed),
               "n_tied_with_best": float(len(lb.tied()))}
    if ru_res is not None:
        metrics["runner_up_confirmation_score"] = ru_res.means()[spec.metric]
    for k, v in metrics.items():
        if math.isfinite(v):
            client.log_metric(parent_id, k, float(v))
    for k, v in {"winner": winner, "runner_up": runner_up or "", "tied_with_best": json.dumps(lb.tied()),
                 "verdict": verdict, "gate": "passed" if report.gate.passed else "failed",
                 "compared_against": against}.items():
        client.set_tag(parent_id, k, v)
    (sweep_dir / "leaderboard.json").write_text(json.dumps(lb.to_dict(), indent=2))
    (sweep_dir / "confirmation.json").write_text(report.to_json(include_flips=False))
    client.log_artifacts(parent_id, str(out), "report")
    client.log_artifact(parent_id, str(sweep_dir / "leaderboard.json"))
    client.log_artifact(parent_id, str(sweep_dir / "confirmation.json"))
    return SweepResult(
        sweep_id=sweep_id, sweep_dir=str(sweep_dir), parent_run_id=parent_id, tracking_uri=uri, trials=trials,
        leaderboard=lb.to_dict(),
        leaderboard_table=lb.format_table(sorted({_short(k) for t in done for k in t.params})),
        winner=winner, runner_up=runner_up, winner_selection_score=lb.by_name()[winner].score,
        winner_confirmation_score=tgt.mean_b, winner_confirmation_ci=win_ci,
        runner_up_confirmation_score=ru_res.means()[spec.metric] if ru_res is not None else None,
        base_confirmation_score=base_res.means()[spec.metric], confirmation_diff=tgt.diff,
        confirmation_diff_ci=tuple(tgt.diff_ci), confirmation_p_value=tgt.p_value, compared_against=against,
        verdict=verdict, gate_passed=report.gate.passed, model_version=version, promoted=promoted,
        report_path=str(index), seconds=time.time() - t0,
        extra={"confirmation_leaderboard": conf_lb.to_dict(), "confirmation_table": format_verdict_table(report)})


# ------------------------------------------------------------------------- per-recipe confirmation re-scoring
# rescore(cfg, splits, metric, winner's run dir, {name: checkpoint}, out_dir) -> (baseline name, {name: result}):
# the baseline (the base model, or the recipe's start) and every named model on the confirmation split, with
# the configured guards, one ServiceClient (one base-model load) for all of them.


def _reusable(winner_dir: Path, models: dict[str, str], baseline: str) -> dict[str, Path]:
    """Result folders of the same models from the trials' own runs: the baseline's and each trained model's
    (`<run_dir>/eval/trained` of the trial whose checkpoint it is)."""
    from evals.store import ResultStore

    out = {baseline: ResultStore(winner_dir / "eval").checkpoint_dir(baseline)}
    for name, ck in models.items():
        rd = _run_dir_of(ck)
        if rd is not None:
            out[name] = ResultStore(rd / "eval").checkpoint_dir("trained")
    return out


def _run_dir_of(checkpoint: str) -> Path | None:
    """The pipeline run dir holding `checkpoint` (<run_dir>/checkpoints/...), if any."""
    for parent in Path(checkpoint).parents:
        if parent.name == "checkpoints" and (parent.parent / "summary.json").exists():
            return parent.parent
    return None


def _with(cfg: Any, **dotted: Any) -> Any:
    from flows.sweep_config import set_dotted
    from infra.config import to_dict

    d = to_dict(cfg)
    for k, v in dotted.items():
        set_dotted(d, k.replace("__", "."), v)
    return from_dict(type(cfg), d)


def _score_all(cfg: Any, benches: list[Any], baseline: tuple[str, str | None], models: dict[str, str],
               out_dir: Path, extra: Callable[[Any, str | None, str], Any] | None = None,
               reuse: dict[str, Path] | None = None) -> dict[str, Any]:
    """`reuse`: {model name: a result folder of that same model} whose guard results (the guards' examples are
    not split: the trials scored them already) are copied instead of re-generated."""
    from evals.store import store_result
    from tasks.evaluate import evaluate_model, guard_names
    from training_core import ServiceClient

    guards = set(guard_names(list(cfg.eval.guards)))
    for name, src in (reuse or {}).items():
        reuse_results(src, out_dir, name, guards)

    service = ServiceClient(compute_dtype=cfg.model.compute_dtype)
    out = {}
    try:
        for name, ck in (baseline, *models.items()):
            res = evaluate_model(cfg, benches, ck, name, out_dir, service=service) if benches else None
            if extra is not None:
                more = extra(service, ck, name)
                store_result(out_dir, name, more)  # on disk like the sampled benchmarks: the confirmation is auditable
                if res is None:
                    res = more
                else:
                    res.benchmarks.update(more.benchmarks)
            out[name] = res
    finally:
        service.close()
    return out


def reuse_results(src_dir: Path, dst_root: Path, dst_name: str, only: set[str] | None = None) -> int:
    """Copy stored per-example results of one model (a result folder) into `dst_root` under checkpoint name
    `dst_name`, so an evaluation of the same model on the same examples under the same protocol (the store's
    content key: benchmark, protocol hash, dataset hash) finds them done and generates nothing. `only`: these
    benchmarks. Returns the number of benchmarks copied (none already there is overwritten)."""
    import dataclasses

    from evals.store import ResultStore, list_result_metas, read_records_file

    if not (src_dir / "checkpoint.json").exists():
        return 0
    store, n = ResultStore(dst_root), 0
    for meta, path in list_result_metas(src_dir):
        if (only is not None and meta.benchmark not in only) or not path.exists():
            continue
        if store.load_records(dst_name, meta.benchmark, meta.protocol_hash):
            continue
        recs = read_records_file(path)
        if len(recs) < meta.n_examples:  # an unfinished result: let the evaluation do it
            continue
        store.begin(dataclasses.replace(meta, checkpoint=dst_name))
        store.append([dataclasses.replace(r, checkpoint=dst_name) for r in recs.values()])
        n += 1
    return n


def rescore_sft(cfg: Any, splits: Any, metric: str, run_dir: Path, models: dict[str, str], out_dir: Path
                ) -> tuple[str, dict[str, Any]]:
    """SFT: the confirmation rows as the target benchmark; the baseline is the base model."""
    from tasks.evaluate import guard_benchmarks, target_benchmark

    benches = [target_benchmark(splits.confirmation, len(splits.confirmation_ids), name=metric),
               *guard_benchmarks(cfg)]
    return "base", _score_all(cfg, benches, ("base", None), models, out_dir, reuse=_reusable(run_dir, models, "base"))


def rescore_rl(cfg: Any, splits: Any, metric: str, run_dir: Path, models: dict[str, str], out_dir: Path
               ) -> tuple[str, dict[str, Any]]:
    """RL: the confirmation problems (env.eval_file) greedy, graded by the env; the baseline is the start the
    trials were judged against (the winner's warm-up / init_from checkpoint, already there: not retrained)."""
    from recipes.rl import start_checkpoint
    from recipes.rl_eval import eval_benchmark
    from tasks.evaluate import guard_benchmarks

    cfg_c = _with(cfg, env__eval_file=splits.confirmation, eval__n_examples=len(splits.confirmation_ids))
    start = start_checkpoint(cfg_c, run_dir)
    benches = [eval_benchmark(cfg_c, len(splits.confirmation_ids), name=metric), *guard_benchmarks(cfg_c)]
    name = "start" if start else "base"
    return name, _score_all(cfg_c, benches, (name, start), models, out_dir, reuse=_reusable(run_dir, models, name))


def _dpo_start(cfg: Any, run_dir: Path) -> str | None:
    from recipes.dpo import _find_warmup

    if cfg.init_from:
        return str(run_dir / "init") if (run_dir / "init").exists() else cfg.init_from
    return _find_warmup(run_dir / "checkpoints") if cfg.warmup.steps > 0 else None


def _pref_result(cfg: Any, service: Any, start: str | None, checkpoint: str | None, name: str) -> Any:
    """`heldout_pref` (implicit-reward accuracy on cfg.data.eval_file's pairs, reference = the start) of one
    model; the prepared pairs and the reference logprobs come from the DPO cache (computed once)."""
    import torch

    from recipes.dpo import _new_client, preference_eval_result, prepare, reference_logprobs, tokenizer_for

    ds = prepare(cfg, tokenizer_for(cfg))
    # the key names the reference by its adapter's checksums (recipes.dpo.start_model_key), as the pipeline does
    key, _, ref_ev = reference_logprobs(cfg, service, ds, start)
    tc = service.create_training_client_from_state(checkpoint) if checkpoint else _new_client(service, cfg, None)
    try:
        return preference_eval_result(tc, ds, torch.as_tensor(ref_ev), cfg, name, key)
    finally:
        tc.close()


def rescore_dpo(cfg: Any, splits: Any, metric: str, run_dir: Path, models: dict[str, str], out_dir: Path
                ) -> tuple[str, dict[str, Any]]:
    """DPO: held-out preference accuracy on the confirmation pairs (reference: the winner's start) + guards."""
    from tasks.evaluate import guard_benchmarks

    cfg_c = _with(cfg, data__eval_file=splits.confirmation)
    start = _dpo_start(cfg_c, run_dir)
    name = "start" if start else "base"

    def pref(service: Any, ck: str | None, who: str) -> Any:
        return _pref_result(cfg_c, service, start, ck, who)

    return name, _score_all(cfg_c, guard_benchmarks(cfg_c), (name, start), models, out_dir, extra=pref,
                            reuse=_reusable(run_dir, models, name))


# ------------------------------------------------------------------------------------------------- report

def _plots(out: Path, lb: Leaderboard, trials: list[Any]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pngs = []
    rows = lb.by_name()
    params = sorted({k for t in trials for k in t.params})
    done = [t for t in trials if t.name in rows]
    if params and done:
        fig, axes = plt.subplots(1, len(params), figsize=(4.2 * len(params), 3.4), dpi=100, squeeze=False)
        for ax, p in zip(axes.flat, params, strict=True):
            for t in done:
                r = rows[t.name]
                color = "#2a9d3c" if r.is_best else ("#e69f00" if r.tied_with_best else "#7f8c8d")
                ax.errorbar([t.params[p]], [r.score], yerr=[[r.score - r.ci[0]], [r.ci[1] - r.score]], fmt="o",
                            capsize=4, color=color)
            if all(isinstance(t.params[p], int | float) and t.params[p] > 0 for t in done) and \
                    max(t.params[p] for t in done) / min(t.params[p] for t in done) >= 20:
                ax.set_xscale("log")
            ax.set_xlabel(p)
            ax.set_ylabel(f"{lb.benchmark} (selection)")
        fig.suptitle("score vs hyperparameter (95% CI; green: best, orange: tied with it)")
        fig.tight_layout()
        fig.savefig(out / "params.png")
        plt.close(fig)
        pngs.append("params.png")
    fig, ax = plt.subplots(figsize=(7, 3.8), dpi=100)
    for t in trials:
        path = Path(t.run_dir) / "metrics.jsonl"
        if not path.exists():
            continue
        pts = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
        pts = [(r["step"], r["train_loss"]) for r in pts if "train_loss" in r]
        if pts:
            ax.plot(*zip(*pts, strict=True), label=f"t{t.number} {t.state.lower()}",
                    linestyle="-" if t.state == "COMPLETE" else ":")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("learning curves (dotted: pruned / failed / unfinished)")
    fig.tight_layout()
    fig.savefig(out / "curves.png")
    plt.close(fig)
    pngs.append("curves.png")
    return pngs


def _flip_table(flips: list[Flip], limit: int = 15) -> str:
    rows = "".join(f"<tr><td>{html.escape(f.prompt[-160:])}</td><td>{html.escape(str(f.target))}</td>"
                   f"<td>{html.escape(f.output_a)}</td><td>{html.escape(f.output_b)}</td></tr>" for f in flips[:limit])
    more = f"<p>... and {len(flips) - limit} more</p>" if len(flips) > limit else ""
    return ("<table><tr><th>prompt</th><th>target</th><th>runner-up</th><th>winner</th></tr>" + rows + "</table>"
            + more)


def write_sweep_report(out_dir: str | Path, lb: Leaderboard, trials: list[Any], conf_lb: Leaderboard,
                       gate_table: str, flips: Any, sweep_id: str) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pngs = _plots(out, lb, trials)
    cols = sorted({_short(k) for t in trials for k in t.params})
    states = "".join(f"<tr><td>t{t.number}</td><td>{html.escape(t.name)}</td><td>{t.state}</td>"
                     f"<td>{html.escape(json.dumps(t.params))}</td><td>{'' if t.value is None else f'{t.value:.3f}'}"
                     f"</td><td>{t.seconds:.0f}</td><td>{html.escape(t.error[:200])}</td></tr>" for t in trials)
    parts = [f"<h1>sweep {html.escape(sweep_id)}</h1>",
             f"<p><b>{html.escape(lb.statement())}</b></p>",
             "<h2>leaderboard (selection split)</h2>", f"<pre>{html.escape(lb.format_table(cols))}</pre>",
             "<h2>confirmation split (never seen during the sweep)</h2>",
             f"<pre>{html.escape(conf_lb.format_table())}</pre>", f"<pre>{html.escape(gate_table)}</pre>",
             *(f'<img src="{p}" alt="{p}">' for p in pngs),
             "<h2>trials</h2><table><tr><th>#</th><th>run</th><th>state</th><th>params</th><th>selection score"
             "</th><th>s</th><th>error</th></tr>" + states + "</table>"]
    if flips is not None:
        parts += ["<h2>winner vs runner-up: flipped examples (selection split)</h2>",
                  f"<h3>winner right, runner-up wrong ({len(flips.fixed)})</h3>", _flip_table(flips.fixed),
                  f"<h3>runner-up right, winner wrong ({len(flips.broken)})</h3>", _flip_table(flips.broken)]
    style = ("<style>body{font-family:sans-serif;max-width:1200px;margin:auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 6px;font-size:12px;vertical-align:top}img{max-width:100%}</style>")
    index = out / "index.html"
    index.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>sweep {html.escape(sweep_id)}</title>"
                     f"{style}</head><body>{''.join(parts)}</body></html>")
    return index
