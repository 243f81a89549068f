"""`tuneloop deployments serve|create|run|push` and `tuneloop data push` (see flows/deployments.py).

    tuneloop deployments serve [-c cfg.yaml] [overrides] [--data-uri URI] [--cron "0 3 * * *"]
    tuneloop deployments create --work-pool tuneloop      # then: prefect worker start --pool tuneloop
    tuneloop deployments run scheduled [--wait]
    tuneloop data push FILE [--eval FILE] [--to URI] [--wait] [--set k=v ...]   # = deployments push
    (FILE: JSONL, JSON, Parquet, CSV, an Arrow dir, org/name[:split] or s3://; data.columns.messages=COL maps)

`push` validates the dataset, stores it as a committed drop (<to>/<drop_id>/train.jsonl, eval.jsonl,
manifest.json last) and starts the data-triggered deployment through the Prefect API when PREFECT_API_URL
is set, else runs the flow in this process. Without --eval, a deterministic 10% of FILE (rows with an
"answer") is held out for evaluation.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

# Light imports only: main.py builds this parser on every `tuneloop` call (prefect/torch load lazily).
from flows.deployments import DATA, DEFAULT_CRON, SCHEDULED, api_url, default_data_uri, resolved_config

if TYPE_CHECKING:
    from flows.retrain import RetrainOutcome

EXIT_OK, EXIT_FAIL = 0, 1


def _config(args: argparse.Namespace) -> dict[str, Any]:
    from flows.sft_config import PipelineConfig
    from infra.config import load_config

    return resolved_config(load_config(PipelineConfig, args.config, args.overrides))


Rows = list[dict[str, Any]]


def split_holdout(rows: Rows, frac: float, where: str) -> tuple[Rows, Rows]:
    """Deterministic split by a hash of each row's content (the same row always lands on the same side)."""
    def held_out(r: dict[str, Any]) -> bool:
        h = hashlib.sha256(json.dumps(r, sort_keys=True).encode()).digest()
        return int.from_bytes(h[:8], "big") / 2**64 < frac

    side = [held_out(r) for r in rows]
    train = [r for r, e in zip(rows, side, strict=True) if not e]
    evl = [r for r, e in zip(rows, side, strict=True) if e]
    from tasks.prepare_data import DataValidationError  # bad input: exit 2

    if not evl or not train:
        raise DataValidationError(f"{where}: {len(rows)} rows are too few to hold out {frac:.0%}; pass --eval FILE")
    for line, (r, e) in enumerate(zip(rows, side, strict=True), 1):
        if e and not isinstance(r.get("answer"), str):
            raise DataValidationError(f"{where}:{line}: field 'answer': held-out eval rows need one (or use --eval)")
    return train, evl


def push_dataset(train_file: str, eval_file: str | None = None, to: str | None = None,
                 drop_id: str | None = None, holdout: float = 0.1,
                 columns: dict[str, str] | None = None) -> tuple[str, str, str]:
    """Validate and store a dataset as a committed drop; returns (drop_id, train_uri, eval_uri).

    Any format `tasks.data_io` loads (JSONL, JSON, Parquet, CSV, Arrow dir, org/name[:split], s3://), with
    `columns` mapping the user's column names; a drop is always chat JSONL (what the retrain flow reads):
    local JSONL files without a mapping are stored byte for byte, anything else as the validated rows."""
    from flows.retrain import EVAL_NAME, TRAIN_NAME, safe_name
    from infra.storage import open_storage
    from tasks.prepare_data import is_jsonl, read_chat_rows_with_sources

    # every row checked; errors name file and line (JSONL) or row index (columnar), and the field
    rows = [r for _, r in read_chat_rows_with_sources(train_file, columns=columns)]
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    drop_id = drop_id or f"{stamp}-{safe_name(Path(train_file.rstrip('/')).stem.partition(':')[0])}"
    st = open_storage(to or default_data_uri())

    def store(path: Path, src: str, part: Rows) -> None:
        if is_jsonl(src) and not columns:
            path.write_bytes(Path(src).read_bytes())
        else:
            path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part))

    with tempfile.TemporaryDirectory(prefix="tuneloop-push-") as tmp:
        d = Path(tmp)
        if eval_file:
            evl = [r for _, r in read_chat_rows_with_sources(eval_file, need_answer=True, columns=columns)]
            store(d / TRAIN_NAME, train_file, rows)
            store(d / EVAL_NAME, eval_file, evl)
        else:
            train, evl = split_holdout(rows, holdout, train_file)
            for name, part in ((TRAIN_NAME, train), (EVAL_NAME, evl)):
                (d / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part))
        meta = {"source_train": _where(train_file),
                "source_eval": _where(eval_file) if eval_file else f"holdout {holdout}"}
        st.upload_dir(d, drop_id, metadata=meta)  # manifest written last: watchers never see half a drop
    return drop_id, st.uri(f"{drop_id}/{TRAIN_NAME}"), st.uri(f"{drop_id}/{EVAL_NAME}")


def _where(spec: str) -> str:
    return str(Path(spec).resolve()) if Path(spec).exists() else spec  # s3:// and hub ids as given


def format_outcome(o: RetrainOutcome) -> str:
    if o.status != "trained":
        return f"skipped: {o.reason}"
    return (f"trained on drop {o.drop_id} from {o.init_from or 'a fresh adapter'}: model version "
            f"{o.model_version} ({'promoted to champion' if o.promoted else 'not promoted'}; verdict "
            f"{o.verdict}), MLflow run {o.mlflow_run_id}")


def _report_run(fr: Any, waited: bool) -> int:
    state = fr.state.name if fr.state else "unknown"
    print(f"flow run {fr.id} ({fr.name}): {state}")
    if not waited:
        return EXIT_OK
    return EXIT_OK if fr.state is not None and fr.state.is_completed() else EXIT_FAIL


def cmd_push(args: argparse.Namespace) -> int:
    from flows.deployments import trigger
    from flows.preflight import check_data
    from flows.retrain import data_triggered_run
    from flows.sft_config import PipelineConfig
    from infra.config import load_config

    # the checks the run will apply (lengths, duplicates, leaks), before a drop exists to start a run on
    data_cfg = load_config(PipelineConfig, args.config, [*args.overrides, f"data.train_file={args.file}",
                                                         f"data.eval_file={args.eval or ''}"])
    check_data(data_cfg, require_eval=False)
    drop_id, train_uri, eval_uri = push_dataset(args.file, args.eval, args.to, args.drop_id, args.holdout,
                                                columns=data_cfg.data.columns)
    print(f"pushed drop {drop_id}: {train_uri} + {eval_uri}")
    if args.no_trigger:
        return EXIT_OK
    params: dict[str, Any] = {"train_uri": train_uri, "eval_uri": eval_uri, "drop_id": drop_id}
    if api_url() and not args.local:
        if args.config or args.overrides:  # explicit config replaces the deployment's default for this run
            params["config"] = _config(args)
        fr = trigger(args.deployment, params, wait=args.wait, timeout=args.timeout)
        return _report_run(fr, args.wait)
    why = "--local" if args.local else "no Prefect server configured (PREFECT_API_URL)"
    print(f"{why}: running the flow in this process")
    out = data_triggered_run(config=_config(args), **params)
    print(format_outcome(out))
    if out.status == "trained" and not out.gate_passed and args.fail_on_gate:
        print("tuneloop: the gate failed: exit 1 (--no-fail-on-gate to exit 0)")
        return EXIT_FAIL
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    from flows.deployments import serve_deployments

    serve_deployments(_config(args), args.data_uri, args.cron, args.timezone, args.settle_s, args.limit)
    return EXIT_OK


def cmd_create(args: argparse.Namespace) -> int:
    from flows.deployments import create_deployments

    ids = create_deployments(_config(args), args.data_uri, args.work_pool, args.cron, args.timezone,
                             args.settle_s)
    for name, dep_id in ids.items():
        print(f"deployment {name}: {dep_id}")
    print(f"start a worker: prefect worker start --pool {args.work_pool}")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from flows.deployments import trigger

    if args.which == "scheduled":
        name, params = SCHEDULED, {}
    else:
        if not (args.train and args.eval):
            from infra.config import BadInputError

            raise BadInputError("`deployments run data` needs --train URI and --eval URI")
        name, params = DATA, {"train_uri": args.train, "eval_uri": args.eval}
    return _report_run(trigger(name, params, wait=args.wait, timeout=args.timeout), args.wait)


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="pipeline YAML config (defaults are embedded)")
    p.add_argument("overrides", nargs="*", help="config overrides like train.steps=100")


def _deploy_args(p: argparse.ArgumentParser) -> None:
    _config_args(p)
    p.add_argument("--data-uri", default=default_data_uri(), help="watched drops location (file:// or s3://)")
    p.add_argument("--cron", default=DEFAULT_CRON, help="retrain schedule (default %(default)r)")
    p.add_argument("--timezone", default="UTC")
    p.add_argument("--settle-s", type=float, default=60.0, help="age before an unmanifested drop counts")


def _wait_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--wait", action="store_true", help="wait for the run; exit 1 unless it completed")
    p.add_argument("--timeout", type=float, default=6 * 3600, help="seconds to wait with --wait")


def add_push_command(subparsers: Any) -> argparse.ArgumentParser:
    """`push` on any subparsers object (`tuneloop data push` and `tuneloop deployments push`)."""
    p = subparsers.add_parser("push", help="store a dataset as a data drop and start the pipeline on it")
    p.add_argument("file", help="training chat JSONL")
    p.add_argument("--config", "-c", help="pipeline YAML config (default: the deployment's, or embedded)")
    # An option, not a positional: argparse cannot take positionals after FILE once options came between.
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="config overrides, e.g. --set train.steps=100 model.rank=8")
    p.add_argument("--eval", help="held-out eval JSONL (rows with 'answer'); default: hold out part of FILE")
    p.add_argument("--to", default=default_data_uri(), help="data location (default %(default)s)")
    p.add_argument("--drop-id", help="drop name (default <UTC time>-<file stem>)")
    p.add_argument("--holdout", type=float, default=0.1, help="eval fraction without --eval")
    p.add_argument("--no-trigger", action="store_true", help="only store the drop")
    p.add_argument("--local", action="store_true", help="run the flow here even if a server is configured")
    p.add_argument("--deployment", default=DATA, help="deployment to trigger (default %(default)s)")
    p.add_argument("--fail-on-gate", action=argparse.BooleanOptionalAction, default=True,
                   help="run here: exit 1 when the run's gate fails (default); --no-fail-on-gate exits 0")
    _wait_args(p)
    p.set_defaults(func=cmd_push)
    return p


def add_flow_commands(subparsers: Any) -> argparse.ArgumentParser:
    """Register `deployments serve|create|run|push`; each leaf sets args.func(args) -> exit code."""
    p = subparsers.add_parser("deployments", help="scheduled and data-triggered retraining (Prefect)")
    sub = p.add_subparsers(dest="deployments_cmd", required=True)
    s = sub.add_parser("serve", help="register the deployments and execute their runs (blocks)")
    _deploy_args(s)
    s.add_argument("--limit", type=int, help="max concurrent runs in this process")
    s.set_defaults(func=cmd_serve)
    c = sub.add_parser("create", help="register the deployments on a work pool (run them with a worker)")
    _deploy_args(c)
    c.add_argument("--work-pool", default="tuneloop", help="process work pool (created if missing)")
    c.set_defaults(func=cmd_create)
    r = sub.add_parser("run", help="start a deployment run now")
    r.add_argument("which", choices=["scheduled", "data"])
    r.add_argument("--train", help="train file URI (data)")
    r.add_argument("--eval", help="eval file URI (data)")
    _wait_args(r)
    r.set_defaults(func=cmd_run)
    add_push_command(sub)
    return p
