"""`tuneloop eval` and `tuneloop compare` subcommands, registered on the lead's argparse CLI.

`compare A B` gates B against A; `compare SWEEP` or `compare R1 R2 R3 ...` prints the paired leaderboard of
evals/leaderboard.py (runs: pipeline run dirs, result folders, MLflow run ids, a sweep id or dir).

    from evals.cli import add_eval_commands, set_generator_factory
    set_generator_factory(lambda checkpoint_path: MyGenerator(checkpoint_path))
    add_eval_commands(subparsers)
    args = parser.parse_args(); sys.exit(args.func(args))

Exit codes: 0 ok / gate passed (or `--no-gate`), 1 gate failed, 2 bad input (unknown checkpoint, protocol
mismatch, no gate policy to decide with, ...).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from evals.compare import GatePolicy, compare, format_verdict_table
from evals.protocols import Generator, ProtocolMismatchError
from evals.report import write_report
from evals.runner import EvalResult, load_eval_result
from evals.store import ResultStore
from evals.suite import DEFAULT_BUILTINS, Suite, load_suite

GeneratorFactory = Callable[[str], Generator]
_FACTORY: GeneratorFactory | None = None


def set_generator_factory(fn: GeneratorFactory | None) -> None:
    """Register how a checkpoint path becomes a Generator (the lead wires training_core in here)."""
    global _FACTORY
    _FACTORY = fn


def get_generator_factory() -> GeneratorFactory | None:
    return _FACTORY


class CliError(Exception):
    pass


def _suite(args: argparse.Namespace) -> Suite:
    if args.suite:
        return load_suite(args.suite)
    names = [b.strip() for b in args.benchmarks.split(",") if b.strip()] if args.benchmarks else None
    from evals.benchmarks_real import cli_suite  # real benchmarks by name; built-ins otherwise

    return cli_suite(names, n=args.n, seed=args.seed, limit=args.limit)


def _from_mlflow_run(ref: str) -> EvalResult:
    """`runs:/<run_id>[/<checkpoint>]`: the per-example results a pipeline run logged (artifact `eval/`);
    the checkpoint defaults to that run's trained model ("trained")."""
    import tempfile

    import mlflow

    from infra.tracking import default_tracking_uri

    run_id, _, name = ref.removeprefix("runs:/").partition("/")
    name = name or "trained"
    uri = default_tracking_uri()  # MLFLOW_TRACKING_URI if set, else the embedded store
    dest = Path(tempfile.mkdtemp(prefix=f"tuneloop-run-{run_id[:8]}-"))
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    try:
        run = client.get_run(run_id)
        # the pipeline logs results in its nested "evaluate" run; accept that run's id or its parent's
        candidates = [run_id] + [r.info.run_id for r in client.search_runs(
            [run.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")]
        holder = next((c for c in candidates if any(a.path == "eval" for a in client.list_artifacts(c))), None)
        if holder is None:
            raise CliError(f"{ref!r}: MLflow run {run_id} (and its nested runs) logged no 'eval' results")
        local = client.download_artifacts(holder, "eval", str(dest))
    except CliError:
        raise
    except Exception as e:  # MlflowException and friends: report as bad input
        raise CliError(f"{ref!r}: cannot fetch the eval results of MLflow run {run_id} from {uri}: {e}") from e
    folder = ResultStore(local).checkpoint_dir(name)
    if not (folder / "checkpoint.json").exists():
        raise CliError(f"{ref!r}: run {run_id} has no results for checkpoint {name!r}")
    return load_eval_result(folder)


def _recorded_gate(ref: str) -> GatePolicy | None:
    """The gate policy a pipeline run recorded with its verdict (`comparison.json` on the pipeline's run; the
    nested evaluate run's id works too), or None for other references and runs that recorded none."""
    if not ref.startswith("runs:/"):
        return None
    import tempfile

    from mlflow.tracking import MlflowClient

    from evals.compare import GatePolicy
    from infra.tracking import default_tracking_uri

    run_id = ref.removeprefix("runs:/").partition("/")[0]
    uri = default_tracking_uri()
    client = MlflowClient(tracking_uri=uri)
    try:
        for rid in (run_id, client.get_run(run_id).data.tags.get("mlflow.parentRunId")):
            if rid and any(a.path == "comparison.json" for a in client.list_artifacts(rid)):
                local = client.download_artifacts(rid, "comparison.json", tempfile.mkdtemp(prefix="tuneloop-gate-"))
                policy = json.loads(Path(local).read_text())["policy"]
                return GatePolicy.from_dict(policy, source=f"{ref}: recorded comparison.json")
    except Exception as e:  # MlflowException, a malformed record: bad input, not a gate decision
        raise CliError(f"{ref!r}: cannot read the gate MLflow run {run_id} recorded in {uri}: {e}") from e
    return None


def _gate_for(args: argparse.Namespace, suite: Suite) -> GatePolicy | None:
    """--gate, else the suite's gate, else the gate the compared pipeline run(s) recorded; None if none.

    The recorded gate is the run's own (targets, guards, margins, minimum effect): re-deciding a run with
    other defaults (or with none, which passed vacuously) gave a verdict the pipeline never gave.
    """
    from evals.compare import GatePolicy

    if args.gate:
        return GatePolicy.from_yaml(args.gate)
    if suite.gate.targets or suite.gate.guards:
        return suite.gate
    recorded = [g for g in (_recorded_gate(args.a), _recorded_gate(args.b)) if g is not None]
    if any(g != recorded[0] for g in recorded[1:]):
        raise CliError("the two runs recorded different gate policies; pass the one to apply with --gate")
    return recorded[0] if recorded else None


def _resolve(ref: str, suite: Suite, args: argparse.Namespace) -> EvalResult:
    """A result folder (has checkpoint.json) is loaded; `runs:/ID[/CKPT]` is an MLflow pipeline run's results;
    a checkpoint is evaluated (resuming) or looked up."""
    if ref.startswith("runs:/"):
        return _from_mlflow_run(ref)
    p = Path(ref)
    if (p / "checkpoint.json").exists():
        return load_eval_result(p)
    store = ResultStore(args.results_dir)
    if _FACTORY is not None:
        return _evaluate_checkpoint(ref, suite, store, args)
    stored = store.checkpoint_dir(ref)
    if (stored / "checkpoint.json").exists():
        return load_eval_result(stored)
    raise CliError(f"{ref!r}: not a result folder, no results under {args.results_dir}, and no generator "
                   f"factory registered (evals.cli.set_generator_factory) to evaluate it")


def _evaluate_checkpoint(ref: str, suite: Suite, store: ResultStore, args: argparse.Namespace) -> EvalResult:
    if _FACTORY is None:
        raise CliError("no generator factory registered (evals.cli.set_generator_factory)")
    if not suite.benchmarks:
        raise CliError("the suite has no benchmarks")
    gen = _FACTORY(ref)

    def progress(name: str, done: int, total: int) -> None:
        if not args.json:
            print(f"  {name}: {done}/{total}", file=sys.stderr)

    from evals.benchmarks_real import evaluate_suite  # evaluate() + log-likelihood multiple choice

    return evaluate_suite(gen, suite.benchmarks, suite.protocol, store, checkpoint=ref,
                          batch_size=args.batch_size, progress=progress)


def _summary_table(result: EvalResult) -> str:
    rows = [["benchmark", "n", "mean", "95% CI", "extra", "protocol"]]
    for name, br in result.benchmarks.items():
        s = br.summary()
        extra = f"ppl={s['perplexity']:.3f}" if "perplexity" in s else ""
        if "pass_at_k" in s:
            extra = " ".join(f"pass@{k}={v:.3f}" for k, v in s["pass_at_k"].items())
        ci = f"[{s['ci_low']:.3f}, {s['ci_high']:.3f}]" if "ci_low" in s else "-"
        rows.append([name, f"{s['n']}/{s['n_expected']}", f"{s['mean']:.3f}", ci, extra, br.protocol_hash])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"checkpoint: {result.checkpoint}"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def _cmd_eval(args: argparse.Namespace) -> int:
    try:
        suite = _suite(args)
        result = _evaluate_checkpoint(args.checkpoint, suite, ResultStore(args.results_dir), args)
    except (CliError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result.summary(), indent=2, sort_keys=True))
    else:
        print(_summary_table(result))
        # the store is relative to the cwd: say exactly where the per-example results went
        print(f"results: {ResultStore(args.results_dir).checkpoint_dir(args.checkpoint).resolve()}")
    if args.report:
        index = write_report(args.report, results=[result], title=f"eval: {result.checkpoint}")
        if not args.json:
            print(f"report: {Path(index).resolve()}")
    return 0


def _cmd_leaderboard(args: argparse.Namespace) -> int:
    """`compare` with one ref (a sweep) or more than two: the paired leaderboard (evals/leaderboard.py)."""
    from evals.leaderboard import leaderboard, resolve_refs

    try:
        runs, base = resolve_refs(args.refs, sweep_root=args.sweep_root, mlflow_loader=_from_mlflow_run)
        if len(runs) < 2:
            raise CliError(f"{args.refs}: a leaderboard needs at least two runs, found {len(runs)}")
        policy = GatePolicy.from_yaml(args.gate) if args.gate else GatePolicy()
        lb = leaderboard(runs, base, benchmark=args.benchmark, policy=policy)
    except (CliError, ProtocolMismatchError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(lb.to_dict(), indent=2, sort_keys=True) if args.json else lb.format_table())
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    if len(args.refs) != 2 or args.leaderboard:
        return _cmd_leaderboard(args)
    args.a, args.b = args.refs
    try:
        suite = _suite(args)
        gate = _gate_for(args, suite)
        if gate is None or not (gate.targets or gate.guards):
            if not args.no_gate:  # refuse before any (possibly long) evaluation
                raise CliError("no gate policy names a target or guard benchmark, so there is nothing to gate on: "
                               "pass --gate FILE, a --suite with a gate, or runs:/ references of pipeline runs "
                               "(their recorded gate is used); or --no-gate to compare without a gate decision")
            gate = gate or GatePolicy()
        result_a, result_b = _resolve(args.a, suite, args), _resolve(args.b, suite, args)
        report = compare(result_a, result_b, gate,
                         allow_protocol_mismatch=True if args.allow_protocol_mismatch else None)
    except (CliError, ProtocolMismatchError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(report.to_json())
    else:
        print(format_verdict_table(report))
    if args.report:
        curves: Any = json.loads(Path(args.loss_curves).read_text()) if args.loss_curves else None
        index = write_report(args.report, report=report, results=[result_a, result_b], loss_curves=curves,
                             title=f"compare: {result_a.checkpoint} vs {result_b.checkpoint}")
        if not args.json:
            print(f"report: {index}")
    return 0 if (report.gate.passed or not report.gated) else 1


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--results-dir", default="eval_results", help="per-example result store (default: eval_results)")
    p.add_argument("--suite", help="suite YAML (protocol, benchmarks, gate); overrides --benchmarks/--n")
    p.add_argument("--benchmarks", help=f"comma list of built-ins (default: {','.join(DEFAULT_BUILTINS)})")
    p.add_argument("--n", type=int, default=100, help="examples per built-in benchmark")
    p.add_argument("--limit", type=int, default=None,
                   help="real benchmarks (gsm8k, mmlu, ...): a seeded, stratified subset of N examples (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the built-in generators")
    p.add_argument("--batch-size", type=int, default=64, help="prompts per Generator.generate call")
    p.add_argument("--json", action="store_true", help="machine-readable JSON on stdout")
    p.add_argument("--report", metavar="DIR", help="write an HTML report with PNG plots to DIR")


def add_eval_commands(subparsers: Any) -> None:
    """Register `eval` and `compare` on an argparse subparsers object; each sets `func(args) -> int`."""
    pe = subparsers.add_parser("eval", help="evaluate a checkpoint on a suite (resumable)")
    pe.add_argument("checkpoint", help="checkpoint path or name, passed to the generator factory")
    _common(pe)
    pe.set_defaults(func=_cmd_eval)
    pc = subparsers.add_parser("compare", help="paired comparison of two checkpoints / result folders + gate; "
                               "with one sweep or 3+ runs, a paired leaderboard")
    pc.add_argument("refs", nargs="+", metavar="RUN",
                    help="two refs A (baseline) B (candidate): result folder, checkpoint, or MLflow run "
                    "`runs:/ID[/CKPT]` (CKPT: trained), gated; one sweep (id or dir) or 3+ runs (pipeline run "
                    "dirs, result folders, MLflow run ids, sweep ids): the leaderboard")
    pc.add_argument("--leaderboard", action="store_true", help="print the leaderboard for two runs as well")
    pc.add_argument("--benchmark", default="target", help="leaderboard: the benchmark ranked (default: target)")
    pc.add_argument("--sweep-root", default=".tuneloop/sweeps", help="leaderboard: where sweep ids are looked up")
    _common(pc)
    pc.add_argument("--gate", help="gate policy YAML (targets, guards, margins); default: the suite's gate, else "
                    "the gate a compared pipeline run (runs:/...) recorded")
    pc.add_argument("--no-gate", action="store_true",
                    help="compare without a gate decision (exit 0); without it, no gate policy is an error (exit 2)")
    pc.add_argument("--allow-protocol-mismatch", action="store_true", help="compare despite differing protocols")
    pc.add_argument("--loss-curves", help="JSON {name: [[step, loss], ...]} to plot in the report")
    pc.set_defaults(func=_cmd_compare)
