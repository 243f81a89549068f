"""Unattended retraining: a scheduled flow that picks up new data drops, and a flow for one pushed dataset.

Data drops live under one storage URI (`file://dir`, a plain path, or `s3://bucket/prefix`), one directory
per delivery:

    <data_uri>/<drop_id>/train.jsonl     chat rows ({"messages": [...]} per line)
    <data_uri>/<drop_id>/eval.jsonl      held-out rows, each with an "answer"
    <data_uri>/<drop_id>/manifest.json   written LAST by `tuneloop data push`: the commit point; every file's
                                         sha256 is verified on download

A drop uploaded by other tools (no manifest) counts once both files exist and the newest is older than
`settle_s` (an upload still in progress is not picked up). A drop's time is its newest object's mtime
(S3 LastModified). Every version these flows register is tagged `data.drop_uri`, `data.drop_id`,
`data.drop_mtime`. The champion's data time is its `data.drop_mtime` tag, or its registration time when it
was not trained from a drop. `scheduled_retrain` takes the newest drop newer than that which no registered
version was trained on yet (so a drop whose model failed the gate is not retrained on every tick), and
trains from the champion's checkpoint. The pipeline gates the result against the champion (not the base:
a retrain on bad data can still beat the base while undoing the champion's gains), so `champion` moves only
to a version that beats the current champion.

Two retrains never overlap: each holds the one slot of the Prefect global concurrency limit
`tuneloop-retrain` (created with limit 1 on first use) from planning to registration, so a second one
waits, then re-plans (and usually finds nothing left to do). The limit lives in the Prefect server; flows
run in ephemeral mode (no PREFECT_API_URL) are only serialized within one process.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from infra.config import from_dict, to_dict
from infra.storage import MANIFEST_NAME, ObjectInfo, open_storage

log = logging.getLogger(__name__)
Fetch = Callable[[Path], tuple[str, str]]  # local dir -> (train path, eval path)

RETRAIN_LIMIT = "tuneloop-retrain"
TRAIN_NAME, EVAL_NAME = "train.jsonl", "eval.jsonl"
TAG_DROP_URI, TAG_DROP_ID, TAG_DROP_MTIME, TAG_TRIGGER = (
    "data.drop_uri", "data.drop_id", "data.drop_mtime", "retrain.trigger",
)  # fmt: skip


@dataclass(frozen=True)
class DataDrop:
    drop_id: str
    uri: str  # storage URI of the drop directory (its identity in the registry tags)
    mtime: float  # newest object's mtime, epoch seconds
    committed: bool  # has a manifest (verified download)


@dataclass(frozen=True)
class ChampionInfo:
    version: str
    checkpoint_uri: str
    data_time: float  # epoch seconds of the data it was trained on (or its registration time)


@dataclass
class RetrainOutcome:
    status: str  # "trained" | "skipped"
    reason: str
    drop_id: str = ""
    drop_uri: str = ""
    init_from: str = ""  # checkpoint training started from ("" = a fresh adapter)
    champion_before: str = ""  # champion version when the run was planned
    model_version: str = ""
    promoted: bool = False
    gate_passed: bool = False
    verdict: str = ""
    mlflow_run_id: str = ""
    run_name: str = ""
    checkpoint_uri: str = ""
    compared_against: str = ""  # the gate's baseline: "champion v<N>" or "base"


def _logger() -> Any:
    try:
        return get_run_logger()
    except Exception:  # outside a flow run
        return log


# --- concurrency ------------------------------------------------------------------------------------------
def ensure_limit(name: str = RETRAIN_LIMIT, limit: int = 1) -> None:
    """Create the global concurrency limit if missing; an existing one keeps its (admin-chosen) limit."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=limit))
            except ObjectAlreadyExists:  # another process created it between our read and create
                pass


@contextmanager
def retrain_slot(name: str = RETRAIN_LIMIT, wait_s: float | None = None) -> Iterator[None]:
    """Hold one slot of the retrain limit; waits for a running retrain, TimeoutError after wait_s."""
    from prefect.concurrency.sync import concurrency

    ensure_limit(name)
    with concurrency(name, occupy=1, timeout_seconds=wait_s, strict=True):
        yield


# --- data drops -------------------------------------------------------------------------------------------
def list_drops(data_uri: str, settle_s: float = 60.0, now: float | None = None) -> list[DataDrop]:
    """Complete drops under data_uri, oldest first."""
    st = open_storage(data_uri)
    by_drop: dict[str, dict[str, ObjectInfo]] = {}
    for o in st.list(""):
        drop_id, sep, name = o.key.partition("/")
        if sep and "/" not in name:  # only <drop>/<file>: ignore top-level files and deeper trees
            by_drop.setdefault(drop_id, {})[name] = o
    now = time.time() if now is None else now
    drops = []
    for drop_id, objs in by_drop.items():
        if TRAIN_NAME not in objs or EVAL_NAME not in objs:
            continue
        committed = MANIFEST_NAME in objs
        mtime = max(o.mtime for o in objs.values())
        if committed or now - mtime >= settle_s:
            drops.append(DataDrop(drop_id, st.uri(drop_id), mtime, committed))
    return sorted(drops, key=lambda d: (d.mtime, d.drop_id))


def fetch_drop(drop: DataDrop, dest: str | Path) -> tuple[str, str]:
    """Local copies of a drop's train/eval files (all hashes verified when the drop is committed)."""
    st = open_storage(drop.uri)
    dest = Path(dest)
    if drop.committed:
        st.download_dir("", dest)
    else:
        for name in (TRAIN_NAME, EVAL_NAME):
            st.get_file(name, dest / name)
    return str(dest / TRAIN_NAME), str(dest / EVAL_NAME)


def stage_checkpoint(uri: str, dest: Path) -> None:
    """A verified local copy of a stored checkpoint that is itself committed (manifest.json included).

    WHY: recipes/common.local_checkpoint looks for `<run_dir>/init/manifest.json` before downloading `init_from`, but
    Storage.download_dir does not write the manifest, so training_core would reject the copy; staging it
    here makes `init_from=<storage URI>` work (and verifies every file's sha256 on the way).
    """
    if (dest / MANIFEST_NAME).exists():
        return
    man = open_storage(uri).download_dir("", dest)
    (dest / MANIFEST_NAME).write_bytes(man.to_json())  # last: the copy is committed only when complete


def _split_uri(uri: str) -> tuple[str, str]:
    parent, sep, name = uri.rstrip("/").rpartition("/")
    if not sep or not name or parent.endswith(":/"):
        raise ValueError(f"{uri!r}: expected a file URI like s3://bucket/pre/train.jsonl or /d/train.jsonl")
    return parent, name


# --- registry ---------------------------------------------------------------------------------------------
def _mlflow(tracking_uri: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def champion_info(model: str, tracking_uri: str) -> ChampionInfo | None:
    from infra import registry

    got = registry.get_champion(model, tracking_uri=tracking_uri)
    if got is None:
        return None
    version, ckpt = got
    mv = _mlflow(tracking_uri).get_model_version(model, version)
    t = mv.tags.get(TAG_DROP_MTIME)
    return ChampionInfo(version, ckpt, float(t) if t else mv.creation_timestamp / 1000.0)


def trained_drop_uris(model: str, tracking_uri: str) -> set[str]:
    """Drops some registered version of `model` was already trained on (errors propagate: guessing "none"
    would retrain old drops)."""
    versions = _mlflow(tracking_uri).search_model_versions(f"name = '{model}'")
    return {v.tags[TAG_DROP_URI] for v in versions if TAG_DROP_URI in v.tags}


def plan_retrain(drops: list[DataDrop], champion: ChampionInfo | None, trained: set[str]
                 ) -> tuple[DataDrop | None, str]:
    """The drop to train on (or None) and why."""
    if not drops:
        return None, "no complete data drops"
    newer = [d for d in drops if champion is None or d.mtime > champion.data_time]
    fresh = [d for d in newer if d.uri not in trained]
    if not fresh:
        if champion is None:
            return None, f"no new data: all {len(drops)} drop(s) were trained on already"
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(champion.data_time))
        return None, (f"no new data: none of {len(drops)} drop(s) is both newer than champion "
                      f"v{champion.version}'s data ({when} UTC) and not trained on yet")
    pick = max(fresh, key=lambda d: (d.mtime, d.drop_id))
    return pick, f"drop {pick.drop_id} is the newest of {len(fresh)} new drop(s)"


def _tag_version(model: str, version: str, run_id: str, tracking_uri: str, tags: dict[str, str]) -> None:
    """Record which data a version was trained on (on the version and on its MLflow run)."""
    client = _mlflow(tracking_uri)
    for k, v in tags.items():
        if model and version:
            client.set_model_version_tag(model, version, k, v)
        client.set_tag(run_id, k, v)


# --- the shared retrain step ------------------------------------------------------------------------------
def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")[:60] or "drop"


def _train_on_drop(config: dict[str, Any], drop: DataDrop, champion: ChampionInfo | None, trigger: str,
                   fetch: Fetch) -> RetrainOutcome:
    """Fetch the drop into the run dir, run the SFT pipeline on it (from the champion if given), tag the
    registered version and its MLflow run with the drop."""
    from flows.sft_config import PipelineConfig
    from flows.sft_pipeline import sft_pipeline
    from infra.tracking import default_tracking_uri

    cfg = from_dict(PipelineConfig, config)
    tracking_uri = cfg.tracking_uri or default_tracking_uri()
    run_name = f"{trigger}-{safe_name(drop.drop_id)}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    train_path, eval_path = fetch(Path(cfg.run_root) / run_name / "data")
    cfg.data.train_file, cfg.data.eval_file = train_path, eval_path
    cfg.tracking_uri = tracking_uri
    if champion is not None:
        cfg.init_from = champion.checkpoint_uri  # continue from the best model so far, fresh optimizer
        if "://" in cfg.init_from:
            stage_checkpoint(cfg.init_from, Path(cfg.run_root) / run_name / "init")  # where train.py looks
    _logger().info("training on drop %s (%s) from %s", drop.drop_id, drop.uri,
                   cfg.init_from or "a fresh adapter")
    res = sft_pipeline(to_dict(cfg), run_name=run_name)
    tags = {TAG_DROP_URI: drop.uri, TAG_DROP_ID: drop.drop_id, TAG_DROP_MTIME: repr(drop.mtime),
            TAG_TRIGGER: trigger}
    _tag_version(cfg.registry_model, res.model_version, res.mlflow_run_id, tracking_uri, tags)
    return RetrainOutcome(
        status="trained", reason=f"trained on drop {drop.drop_id}", drop_id=drop.drop_id, drop_uri=drop.uri,
        init_from=cfg.init_from, champion_before=champion.version if champion else "",
        model_version=res.model_version, promoted=res.promoted, gate_passed=res.gate_passed,
        verdict=res.verdict, mlflow_run_id=res.mlflow_run_id, run_name=run_name,
        checkpoint_uri=res.checkpoint_uri, compared_against=res.compared_against,
    )


def _model_and_tracking(config: dict[str, Any]) -> tuple[str, str]:
    from flows.sft_config import PipelineConfig
    from infra.tracking import default_tracking_uri

    cfg = from_dict(PipelineConfig, config)
    return cfg.registry_model, cfg.tracking_uri or default_tracking_uri()


# --- flows ------------------------------------------------------------------------------------------------
@flow(name="scheduled-retrain", log_prints=True)
def scheduled_retrain(config: dict[str, Any], data_dir_uri: str, settle_s: float = 60.0,
                      wait_s: float | None = None) -> RetrainOutcome:
    """Train on the newest data drop newer than the champion's, starting from the champion; or skip."""
    model, tracking_uri = _model_and_tracking(config)
    if not model:
        raise ValueError("scheduled_retrain needs config registry_model: the champion and the drops already "
                         "trained on are found in the MLflow registry")
    logger = _logger()
    with retrain_slot(wait_s=wait_s):  # plan inside the slot: a waiting run sees what the previous one did
        drops = list_drops(data_dir_uri, settle_s=settle_s)
        champion = champion_info(model, tracking_uri)
        trained = trained_drop_uris(model, tracking_uri)
        drop, why = plan_retrain(drops, champion, trained)
        logger.info("plan: %s (champion: %s)", why, f"v{champion.version}" if champion else "none")
        if drop is None:
            return RetrainOutcome(status="skipped", reason=why,
                                  champion_before=champion.version if champion else "")
        return _train_on_drop(config, drop, champion, "scheduled", lambda dest: fetch_drop(drop, dest))


def resolve_pushed(train_uri: str, eval_uri: str, drop_id: str = "") -> tuple[DataDrop, Fetch]:
    """The drop a pushed pair of file URIs forms, and how to fetch it.

    Two files named train.jsonl/eval.jsonl in one committed directory are that drop (verified download);
    any other pair is identified by the train file's URI and copied as is.
    """
    t_parent, t_name = _split_uri(train_uri)
    e_parent, e_name = _split_uri(eval_uri)
    t_st, e_st = open_storage(t_parent), open_storage(e_parent)
    infos = [o for st, n in ((t_st, t_name), (e_st, e_name)) for o in st.list(n) if o.key == n]
    if len(infos) != 2:
        raise FileNotFoundError(f"data_triggered_run: {train_uri} or {eval_uri} does not exist")
    same_dir = t_parent == e_parent
    committed = same_dir and (t_name, e_name) == (TRAIN_NAME, EVAL_NAME) and t_st.is_committed("")
    default_id = t_parent.rstrip("/").rsplit("/", 1)[-1] if same_dir else t_name
    drop = DataDrop(drop_id or default_id, t_st.uri() if same_dir else t_st.uri(t_name),
                    max(o.mtime for o in infos), committed)

    def fetch(dest: Path) -> tuple[str, str]:
        if committed:
            return fetch_drop(drop, dest)
        t_st.get_file(t_name, dest / TRAIN_NAME)
        e_st.get_file(e_name, dest / EVAL_NAME)
        return str(dest / TRAIN_NAME), str(dest / EVAL_NAME)

    return drop, fetch


@flow(name="data-triggered-run", log_prints=True)
def data_triggered_run(config: dict[str, Any], train_uri: str, eval_uri: str, drop_id: str = "",
                       from_champion: bool = True, wait_s: float | None = None) -> RetrainOutcome:
    """Train on one pushed dataset (file URIs); starts from the champion unless from_champion=False."""
    drop, fetch = resolve_pushed(train_uri, eval_uri, drop_id)
    model, tracking_uri = _model_and_tracking(config)
    with retrain_slot(wait_s=wait_s):
        champion = champion_info(model, tracking_uri) if (model and from_champion) else None
        return _train_on_drop(config, drop, champion, "push", fetch)
