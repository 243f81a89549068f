"""Scheduled and data-triggered retraining against a real `prefect server` on loopback, tracked in MLflow."""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient
from prefect.client.orchestration import get_client
from prefect.events.worker import EventsWorker
from prefect.exceptions import ObjectNotFound
from prefect.logging.handlers import APILogWorker
from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

from data.generators import train_eval
from flows.cli import push_dataset
from flows.deployments import DATA, SCHEDULED
from flows.retrain import (
    RETRAIN_LIMIT,
    TAG_DROP_ID,
    TAG_DROP_MTIME,
    TAG_DROP_URI,
    ChampionInfo,
    DataDrop,
    champion_info,
    ensure_limit,
    list_drops,
    plan_retrain,
    resolve_pushed,
    retrain_slot,
    scheduled_retrain,
)
from flows.sft_config import PipelineConfig
from infra import registry
from infra.config import load_config, to_dict
from infra.s3_server import S3Endpoint
from infra.services import start_prefect_server
from infra.storage import CorruptCheckpointError, open_storage
from tests.s3_fixtures import s3_bucket, s3_endpoint  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
FAST = [
    "model.rank=8", "data.n_train=100", "data.n_eval=20", "eval.n_examples=20", "eval.batch_size=20",
    "train.steps=6", "train.save_every=6", "train.batch_size=4", "train.eval_loss_examples=8",
    "eval.bootstrap_resamples=200", "eval.guards=[]", "eval.max_tokens=8",
]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A real Prefect server (own PREFECT_HOME), one sqlite MLflow store, and a `tuneloop deployments serve`
    process for model "m-push" (started here so its ~15 s start-up overlaps the tests before it needs it)."""
    tmp = tmp_path_factory.mktemp("deployments")
    home = tmp / "prefect-home"
    tracking = f"sqlite:///{tmp}/mlflow.db"
    rec = start_prefect_server(home, tmp / "prefect.log", timeout=180)
    serve_args = [*FAST, f"run_root={tmp}/serve-runs", f"tracking_uri={tracking}", "registry_model=m-push",
                  "--data-uri", f"file://{tmp}/pushed", "--cron", "30 4 * * 1"]
    env = {**os.environ, "PREFECT_API_URL": rec.url, "PREFECT_HOME": str(home),
           "PREFECT_RUNNER_POLL_FREQUENCY": "1", "PYTHONPATH": str(ROOT)}
    proc = None
    try:
        with open(tmp / "serve.log", "wb") as f:
            cmd = [sys.executable, "-m", "tuneloop_cli.main", "deployments", "serve", *serve_args]
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        with temporary_settings({PREFECT_API_URL: rec.url, PREFECT_HOME: str(home)}):
            yield {"tmp": tmp, "api": rec.url, "home": home, "tracking": tracking, "serve": proc,
                   "serve_log": tmp / "serve.log", "pushed": f"file://{tmp}/pushed"}
            # Ship buffered logs/events now: after the server stops, their workers retry for a minute at exit.
            with contextlib.suppress(RuntimeError):  # not started
                APILogWorker.instance().drain()
            EventsWorker.drain_all()
    finally:
        if proc is not None:
            _stop(proc)
        rec.stop()


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)  # the runner pauses its schedules and exits
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def _config(stack: dict[str, Any], tmp: Path, model: str) -> dict[str, Any]:
    cfg = load_config(PipelineConfig, None, [*FAST, f"run_root={tmp}/runs",
                                             f"tracking_uri={stack['tracking']}", f"registry_model={model}"])
    return to_dict(cfg)


def _write_dataset(d: Path, seed: int) -> tuple[Path, Path]:
    train, evl = train_eval("addition", 60, 20, seed=seed, digits=2)
    d.mkdir(parents=True, exist_ok=True)
    tr, ev = d / f"train-{seed}.jsonl", d / f"eval-{seed}.jsonl"
    tr.write_text("".join(json.dumps(dict(r)) + "\n" for r in train))
    ev.write_text("".join(json.dumps(dict(r)) + "\n" for r in evl))
    return tr, ev


def _set_mtime(dir_: Path, t: float) -> None:
    for p in dir_.iterdir():
        os.utime(p, (t, t))


def _mlflow(stack: dict[str, Any]) -> MlflowClient:
    return MlflowClient(tracking_uri=stack["tracking"], registry_uri=stack["tracking"])


# --- pure logic -------------------------------------------------------------------------------------------
def test_list_drops_and_plan(tmp_path: Path) -> None:
    now = 1_000_000.0
    root = tmp_path / "data"
    files = {  # drop -> (names, mtime)
        "committed": (["train.jsonl", "eval.jsonl", "manifest.json"], now - 5),  # fresh but committed: counts
        "settled": (["train.jsonl", "eval.jsonl"], now - 120),  # no manifest, old enough: counts
        "uploading": (["train.jsonl", "eval.jsonl"], now - 5),  # no manifest, too fresh: not yet
        "half": (["train.jsonl"], now - 500),  # no eval file: never
    }
    for drop, (names, t) in files.items():
        for n in names:
            (root / drop).mkdir(parents=True, exist_ok=True)
            (root / drop / n).write_text("{}\n")
        _set_mtime(root / drop, t)
    (root / "stray.jsonl").write_text("x")
    (root / "settled" / "sub").mkdir()
    (root / "settled" / "sub" / "train.jsonl").write_text("x")
    os.utime(root / "settled" / "sub" / "train.jsonl", (now - 120, now - 120))

    drops = list_drops(f"file://{root}", settle_s=60, now=now)
    assert [(d.drop_id, d.committed, d.mtime) for d in drops] == [("settled", False, now - 120),
                                                                  ("committed", True, now - 5)]
    assert drops[0].uri == f"file://{root / 'settled'}"

    a, b, c = (DataDrop(n, f"file:///d/{n}", t, True) for n, t in (("a", 100.0), ("b", 200.0), ("c", 300.0)))
    assert plan_retrain([], None, set())[0] is None
    assert plan_retrain([a, b, c], None, set())[0] == c  # no champion: the newest
    champ = ChampionInfo("3", "file:///ck", data_time=200.0)
    assert plan_retrain([a, b, c], champ, set())[0] == c
    pick, why = plan_retrain([a, b, c], champ, {c.uri})  # a is untrained but older than the champion's data
    assert pick is None and "no new data" in why
    assert plan_retrain([a, b], ChampionInfo("1", "u", 150.0), set())[0] == b
    assert plan_retrain([a, b, c], None, {c.uri})[0] == b  # c already tried (gate failed): not again


def test_push_splits_validates_and_pushed_drops_resolve(tmp_path: Path) -> None:
    train, evl = train_eval("addition", 40, 5, seed=4, digits=2)
    src = tmp_path / "all.jsonl"
    src.write_text("".join(json.dumps(dict(r)) + "\n" for r in train))
    data_uri = f"file://{tmp_path}/data"
    ids = [push_dataset(str(src), to=data_uri, drop_id=f"s{i}", holdout=0.25) for i in (1, 2)]
    parts = {}
    for drop_id, tr_uri, ev_uri in ids:
        assert tr_uri == f"{data_uri}/{drop_id}/train.jsonl" and ev_uri == f"{data_uri}/{drop_id}/eval.jsonl"
        d = tmp_path / "data" / drop_id
        parts[drop_id] = [[json.loads(x) for x in (d / n).read_text().splitlines()]
                          for n in ("train.jsonl", "eval.jsonl")]
    tr1, ev1 = parts["s1"]
    assert parts["s2"] == parts["s1"], "the hold-out split is deterministic"
    assert sorted(map(json.dumps, tr1 + ev1)) == sorted(json.dumps(dict(r)) for r in train)  # a partition
    assert 0 < len(ev1) < len(train) and all("answer" in r for r in ev1)
    bad = tmp_path / "noanswer.jsonl"
    bad.write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in train))
    with pytest.raises(ValueError, match=r"noanswer.jsonl:\d+: field 'answer'"):
        push_dataset(str(bad), to=data_uri, holdout=0.25)

    # a pushed drop resolves to itself, committed: the download verifies every file
    drop, fetch = resolve_pushed(ids[0][1], ids[0][2])
    assert (drop.drop_id, drop.uri, drop.committed) == ("s1", f"{data_uri}/s1", True)
    got_tr, _ = fetch(tmp_path / "f1")
    assert Path(got_tr).read_bytes() == (tmp_path / "data" / "s1" / "train.jsonl").read_bytes()
    (tmp_path / "data" / "s1" / "eval.jsonl").write_text("{}\n")  # tampered after the commit
    with pytest.raises(CorruptCheckpointError):
        fetch(tmp_path / "f2")
    # any other pair of files: identified by the train file, copied as is
    ev_file = tmp_path / "elsewhere" / "ev.jsonl"
    ev_file.parent.mkdir()
    ev_file.write_text("".join(json.dumps(dict(r)) + "\n" for r in evl))
    drop, fetch = resolve_pushed(f"file://{src}", str(ev_file))
    assert (drop.drop_id, drop.uri, drop.committed) == ("all.jsonl", f"file://{src}", False)
    assert [Path(p).read_bytes() for p in fetch(tmp_path / "f3")] == [src.read_bytes(), ev_file.read_bytes()]
    with pytest.raises(FileNotFoundError):
        resolve_pushed(f"file://{tmp_path}/missing.jsonl", str(ev_file))


def test_drops_under_an_s3_prefix(s3_endpoint: S3Endpoint, s3_bucket: str, tmp_path: Path,  # noqa: F811
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The same drop layout on a real S3 server (SeaweedFS); endpoint and keys from the AWS variables."""
    for k, v in s3_endpoint.aws_env().items():
        monkeypatch.setenv(k, v)
    prefix = f"s3://{s3_bucket}/drops-{uuid.uuid4().hex[:6]}"
    tr, ev = _write_dataset(tmp_path / "src", 6)
    t0 = time.time()
    drop_id, tr_uri, ev_uri = push_dataset(str(tr), str(ev), to=prefix, drop_id="s3drop")
    assert tr_uri == f"{prefix}/s3drop/train.jsonl"
    open_storage(prefix).put_bytes("half/train.jsonl", b"{}\n")  # an upload in progress: no eval, no manifest
    (drop,) = list_drops(prefix)
    assert (drop.drop_id, drop.uri, drop.committed) == ("s3drop", f"{prefix}/s3drop", True)
    assert abs(drop.mtime - t0) < 120  # S3 LastModified
    pushed, fetch = resolve_pushed(tr_uri, ev_uri)
    assert (pushed.uri, pushed.committed) == (drop.uri, True)
    got = fetch(tmp_path / "dl")
    assert [Path(p).read_bytes() for p in got] == [tr.read_bytes(), ev.read_bytes()]


# --- concurrency ------------------------------------------------------------------------------------------
def _hold_concurrently(name: str, n: int, hold_s: float, meet: threading.Barrier | None = None
                       ) -> list[tuple[float, float]]:
    """n threads each hold a slot of `name` for hold_s; their (start, end) spans, sorted.

    With `meet`, each holder also waits (inside the slot) until all n are inside at once."""
    spans: list[tuple[float, float]] = []
    errors: list[BaseException] = []

    def hold() -> None:
        try:
            with retrain_slot(name, wait_s=60):
                t0 = time.monotonic()
                if meet is not None:
                    meet.wait()
                time.sleep(hold_s)
                spans.append((t0, time.monotonic()))
        except BaseException as e:  # surfaced below
            errors.append(e)

    # Threads start with an empty contextvars context: hand them this one (it holds the server's settings).
    threads = [threading.Thread(target=contextvars.copy_context().run, args=(hold,)) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert not errors, errors
    return sorted(spans)


def test_retrains_never_overlap(stack: dict[str, Any], tmp_path: Path) -> None:
    spans = _hold_concurrently(RETRAIN_LIMIT, 2, 1.0)
    assert len(spans) == 2
    assert spans[1][0] >= spans[0][1], f"second retrain started while the first held the slot: {spans}"
    # Control: under a limit of 2 both holders are inside at once (they meet there) and the same
    # measurement sees the overlap, so the check above can fail.
    ensure_limit("tuneloop-test-wide", limit=2)
    wide = _hold_concurrently("tuneloop-test-wide", 2, 0.2, meet=threading.Barrier(2, timeout=60))
    assert wide[1][0] < wide[0][1]

    # The flow itself takes the slot: while it is held, a scheduled retrain waits and then gives up.
    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        with retrain_slot():
            held.set()
            release.wait(60)

    th = threading.Thread(target=contextvars.copy_context().run, args=(holder,))
    th.start()
    try:
        assert held.wait(30)
        t0 = time.monotonic()
        state = scheduled_retrain(_config(stack, tmp_path, "m-busy"), f"file://{tmp_path}/none", wait_s=2,
                                  return_state=True)
        assert state.is_failed() and time.monotonic() - t0 >= 2
        with pytest.raises(TimeoutError):
            state.result()
    finally:
        release.set()
        th.join(30)


# --- the schedule's logic, flow called directly (runs against the test server) ----------------------------
def test_scheduled_retrain_trains_new_drop_from_champion_then_skips(stack: dict[str, Any], tmp_path: Path
                                                                    ) -> None:
    from training_core.service_client import ServiceClient

    model, uri = "m-sched", stack["tracking"]
    cfg = _config(stack, tmp_path, model)
    data_uri = f"file://{tmp_path}/data"
    assert scheduled_retrain(cfg, data_uri).reason == "no complete data drops"

    # Champion: a rank-4 adapter (the config says rank 8, so the result's rank shows where training started),
    # trained on drop d1.
    ck = ServiceClient(checkpoint_root=tmp_path / "ck").create_lora_training_client("tiny", rank=4, seed=7)
    store = open_storage(tmp_path / "ckstore")
    store.upload_dir(ck.save_state("champ").result().path, "champ")
    champ_uri = store.uri("champ")
    client = _mlflow(stack)
    run_id = client.create_run(client.create_experiment("champ-setup")).info.run_id
    now = time.time()
    d1_uri = f"file://{tmp_path}/data/d1"
    tags = {TAG_DROP_URI: d1_uri, TAG_DROP_MTIME: repr(now - 2000)}
    v1 = registry.register_checkpoint(run_id, champ_uri, model, tags, tracking_uri=uri)
    assert registry.promote_if_passed(model, v1, True, tracking_uri=uri)

    src = tmp_path / "src"
    for drop, seed, age in (("d0", 0, 3000), ("d1", 1, 2000), ("d2", 2, 1000), ("d3", 3, 10)):
        tr, ev = _write_dataset(src, seed)
        push_dataset(str(tr), str(ev), to=data_uri, drop_id=drop)
        if drop == "d3":  # still uploading: no manifest and newer than settle_s
            (tmp_path / "data" / "d3" / "manifest.json").unlink()
        _set_mtime(tmp_path / "data" / drop, now - age)
    assert champion_info(model, uri) == ChampionInfo(v1, champ_uri, now - 2000)

    out = scheduled_retrain(cfg, data_uri, settle_s=600)
    assert (out.status, out.drop_id, out.init_from, out.champion_before) == ("trained", "d2", champ_uri, v1)
    # gated against the champion it started from, not the raw base
    assert out.compared_against == f"champion v{v1}"
    # MLflow: a new version tagged with the drop, its run recorded init_from = the champion's checkpoint
    mv = client.get_model_version(model, out.model_version)
    assert int(out.model_version) == int(v1) + 1
    assert mv.tags[TAG_DROP_ID] == "d2" and mv.tags[TAG_DROP_URI] == f"file://{tmp_path}/data/d2"
    run = client.get_run(out.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.params["init_from"] == champ_uri
    assert run.data.tags[TAG_DROP_ID] == "d2" and run.data.tags["compared_against"] == f"champion v{v1}"
    # it trained on d2's rows (byte-identical copy) starting from the champion's rank-4 adapter
    run_dir = Path(cfg["run_root"]) / out.run_name
    assert (run_dir / "data" / "train.jsonl").read_bytes() == (src / "train-2.jsonl").read_bytes()
    state = json.loads(open_storage(out.checkpoint_uri).get_bytes("trainer_state.json"))
    assert state["lora"]["rank"] == 4 and state["step"] == 6

    again = scheduled_retrain(cfg, data_uri, settle_s=600)
    assert again.status == "skipped" and "no new data" in again.reason
    assert len(client.search_model_versions(f"name = '{model}'")) == 2


# --- deployments on the server: a served process executes a pushed dataset's run --------------------------
def _wait_deployment(name: str, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as c:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"serve exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
            try:
                return c.read_deployment_by_name(name)
            except ObjectNotFound:
                time.sleep(0.5)
    raise TimeoutError(f"deployment {name} not registered after {timeout}s:\n{log.read_text()[-3000:]}")


def _wait_scheduled_runs(deployment_id: Any, timeout: float) -> list[datetime]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId

    flt = FlowRunFilter(deployment_id=FlowRunFilterDeploymentId(any_=[deployment_id]))
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as c:
        while time.monotonic() < deadline:
            runs = c.read_flow_runs(flow_run_filter=flt)
            if runs:
                assert all(r.state is not None and r.state.is_scheduled() for r in runs)
                return [r.expected_start_time.astimezone(UTC) for r in runs if r.expected_start_time]
            time.sleep(0.5)
    raise TimeoutError(f"the server scheduled no runs for deployment {deployment_id} in {timeout}s")


def test_push_runs_served_data_deployment(stack: dict[str, Any], tmp_path: Path, capsys: Any) -> None:
    from tuneloop_cli.main import main

    model, data_uri, proc, log = "m-push", stack["pushed"], stack["serve"], stack["serve_log"]
    dep = _wait_deployment(DATA, proc, log, 120)
    sched = _wait_deployment(SCHEDULED, proc, log, 10)
    assert [s.schedule.cron for s in sched.schedules] == ["30 4 * * 1"] and not sched.paused
    # the server's scheduler really turns the cron into runs (it silently did not with SQLAlchemy 2.1)
    upcoming = _wait_scheduled_runs(sched.id, 60)
    assert all(t.weekday() == 0 and (t.hour, t.minute) == (4, 30) and t > datetime.now(UTC)
               for t in upcoming)
    tr, ev = _write_dataset(tmp_path / "src", 5)
    rc = main(["deployments", "push", str(tr), "--eval", str(ev), "--to", data_uri, "--drop-id", "p1",
               "--wait", "--timeout", "400"])
    out = capsys.readouterr().out
    assert rc == 0, out + log.read_text()[-3000:]
    # the drop is committed in storage with the pushed bytes
    st = open_storage(data_uri)
    man = st.read_manifest("p1")
    assert man.files["train.jsonl"].sha256 == hashlib.sha256(tr.read_bytes()).hexdigest()
    # the flow run belongs to the data deployment and completed
    run_id = re.search(r"flow run ([0-9a-f-]{36})", out).group(1)  # type: ignore[union-attr]
    with get_client(sync_client=True) as c:
        fr = c.read_flow_run(run_id)
    assert fr.deployment_id == dep.id and fr.state is not None and fr.state.is_completed()
    assert fr.parameters["train_uri"] == st.uri("p1/train.jsonl")
    # its MLflow run and registered version exist, tagged with the drop
    client = _mlflow(stack)
    versions = client.search_model_versions(f"name = '{model}'")
    assert len(versions) == 1 and versions[0].tags[TAG_DROP_ID] == "p1"
    run = client.get_run(versions[0].run_id)
    assert run.info.status == "FINISHED" and run.data.tags["verdict"]
    assert run.data.params["data.train_file"].endswith("/data/train.jsonl")
    assert run.data.params["init_from"] == ""  # no champion yet: a fresh adapter
    assert run.data.tags["compared_against"] == "base"  # and the gate's baseline is the base model
