"""Retention: policies on hand-computed cases, prune/du on real storage checked against the filesystem."""

from __future__ import annotations

import argparse
import json
import os
import uuid
from pathlib import Path

import pytest

from infra.retention import (
    CheckpointInfo,
    add_checkpoint_commands,
    list_checkpoints,
    mark_champion,
    parse_duration,
    plan_prune,
    prune,
    usage,
)
from infra.s3_server import S3Endpoint
from infra.storage import MANIFEST_NAME, LocalStorage, Storage, manifest_for_dir, open_storage
from tests.s3_fixtures import s3_bucket, s3_endpoint  # noqa: F401

DAY = 86400.0
NOW = 1_800_000_000.0


def ck(prefix: str, age_days: float, **meta: float) -> CheckpointInfo:
    return CheckpointInfo(prefix, f"file:///x/{prefix}", 100, 2, NOW - age_days * DAY, dict(meta))


def deleted(plan_ckpts: list[CheckpointInfo], **kw: object) -> list[str]:
    return [c.prefix for c in plan_prune(plan_ckpts, now=NOW, **kw).delete]  # type: ignore[arg-type]


RUN = [ck(f"run/s{i}", age_days=10 - i, acc=a) for i, a in enumerate([0.2, 0.9, 0.5, 0.7, 0.4])]  # s4 newest


def test_policies_on_known_cases() -> None:
    assert deleted(RUN, keep_last=2) == ["run/s0", "run/s1", "run/s2"]
    assert deleted(RUN, keep_best=1, metric="acc") == ["run/s0", "run/s2", "run/s3"]  # s1 best, s4 latest
    assert deleted(RUN, keep_best=2, metric="acc", mode="min") == ["run/s1", "run/s2", "run/s3"]
    assert deleted(RUN, ttl_s=7.5 * DAY) == ["run/s0", "run/s1", "run/s2"]  # ages 10,9,8 days
    assert deleted(RUN, keep_last=1, keep_best=1, metric="acc") == ["run/s0", "run/s2", "run/s3"]  # union
    # The newest checkpoint survives even a policy that keeps nothing else.
    assert deleted(RUN, keep_last=0) == ["run/s0", "run/s1", "run/s2", "run/s3"]
    assert deleted(RUN, ttl_s=0) == ["run/s0", "run/s1", "run/s2", "run/s3"]
    assert deleted(RUN[:1], keep_last=0) == []  # the only checkpoint is never deleted
    # ... per run directory: each run keeps its resume point.
    other = [ck("other/s0", age_days=20)]
    assert deleted(RUN + other, keep_last=1) == ["run/s0", "run/s1", "run/s2", "run/s3"]
    champ = [*RUN[:2], CheckpointInfo(**{**RUN[2].__dict__, "champion": True}), *RUN[3:]]
    plan = plan_prune(champ, keep_last=1, now=NOW)
    assert [c.prefix for c in plan.delete] == ["run/s0", "run/s1", "run/s3"]
    assert plan.reasons["run/s2"] == ["champion"] and plan.freed_bytes == 300
    nested = [ck("a/s0", 5, **{"eval": {"acc": 0.1}}), ck("a/s1", 4, **{"eval": {"acc": 0.8}}), ck("a/s2", 1)]  # type: ignore[arg-type]
    assert deleted(nested, keep_best=1, metric="eval.acc") == ["a/s0"]
    with pytest.raises(ValueError, match="at least one"):
        plan_prune(RUN)
    with pytest.raises(ValueError, match="metric"):
        plan_prune(RUN, keep_best=1)
    assert parse_duration("7d") == 7 * DAY and parse_duration("90s") == 90 and parse_duration("2") == 2 * DAY


def _commit(st: Storage, root: Path, prefix: str, created_at: float, size: int, **meta: float) -> int:
    """Commit a checkpoint with a chosen created_at; returns its byte size on disk incl. manifest."""
    d = root / prefix.replace("/", "_")
    (d / "sub").mkdir(parents=True)
    (d / "w.bin").write_bytes(os.urandom(size))
    (d / "sub" / "c.json").write_text(json.dumps(meta))
    m = manifest_for_dir(d, dict(meta))
    m.created_at = created_at
    (d / MANIFEST_NAME).write_bytes(m.to_json())
    st.upload_dir(d, prefix)
    return size + len(json.dumps(meta)) + len(m.to_json())


def _disk_bytes(root: Path) -> int:
    return sum(os.path.getsize(Path(dp) / f) for dp, _, fs in os.walk(root) for f in fs)


def test_prune_and_du_on_local_storage(tmp_path: Path) -> None:
    st = LocalStorage(tmp_path / "store")
    sizes = {
        f"r/s{i}": _commit(st, tmp_path / "src", f"r/s{i}", NOW - (5 - i) * DAY, 1000 * (i + 1), acc=i / 10)
        for i in range(5)
    }
    st.put_bytes("r/s9/w.bin", b"x" * 777)  # a crashed upload: no manifest
    cks = list_checkpoints(st, "r")
    assert [(c.prefix, c.size) for c in cks] == list(sizes.items())
    u = usage(st, "r")
    assert u.total_bytes == _disk_bytes(tmp_path / "store") and u.committed == 5
    assert u.committed_bytes == sum(sizes.values()) and u.uncommitted_bytes == 777
    mark_champion(st, "r/s0")
    before = _disk_bytes(tmp_path / "store")
    dry = prune(st, "r", keep_last=2, dry_run=True, now=NOW)
    assert [c.prefix for c in dry.delete] == ["r/s1", "r/s2"] and _disk_bytes(tmp_path / "store") == before
    plan = prune(st, "r", keep_last=2, partial_older_than_s=DAY, now=NOW + 2 * DAY)
    assert [c.prefix for c in plan.delete] == ["r/s1", "r/s2"] and plan.partial == {"r/s9": 777}
    assert st.list_committed("r") == ["r/s0", "r/s3", "r/s4"]
    assert not (tmp_path / "store" / "r" / "s1").exists() and not (tmp_path / "store" / "r" / "s9").exists()
    assert before - _disk_bytes(tmp_path / "store") == plan.freed_bytes == sizes["r/s1"] + sizes["r/s2"] + 777
    st.put_bytes("r/s10/w.bin", b"fresh")  # an upload in progress is not a leftover yet
    assert prune(st, "r", keep_last=2, partial_older_than_s=DAY).partial == {}


def test_cli_list_prune_du(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    st = LocalStorage(tmp_path / "store")
    for i in range(3):
        _commit(st, tmp_path / "src", f"run/s{i}", NOW + i, 500, loss=3.0 - i)
    parser = argparse.ArgumentParser(prog="tuneloop")
    add_checkpoint_commands(parser.add_subparsers(dest="cmd", required=True))

    def run(*argv: str) -> tuple[int, str]:
        args = parser.parse_args(["checkpoints", *argv, "--storage", st.uri()])
        rc = args.func(args)
        return rc, capsys.readouterr().out

    rc, out = run("list", "--json")
    assert rc == 0 and [c["prefix"] for c in json.loads(out)] == ["run/s0", "run/s1", "run/s2"]
    rc, out = run("prune", "--keep-best", "1", "--metric", "loss", "--mode", "min", "--dry-run", "--json")
    assert rc == 0 and [c["prefix"] for c in json.loads(out)["delete"]] == ["run/s0", "run/s1"]
    assert st.list_committed("") == ["run/s0", "run/s1", "run/s2"]
    rc, out = run("prune", "--keep-last", "1", "--protect", st.uri("run/s0"))
    assert rc == 0 and "deleted 1 checkpoints" in out and st.list_committed("") == ["run/s0", "run/s2"]
    rc, out = run("du", "--json")
    assert rc == 0 and json.loads(out)["total_bytes"] == _disk_bytes(tmp_path / "store")
    args = parser.parse_args(["checkpoints", "prune", "--storage", st.uri()])
    assert args.func(args) == 2 and "refusing" in capsys.readouterr().err


def test_prune_on_s3(s3_endpoint: S3Endpoint, s3_bucket: str, tmp_path: Path) -> None:  # noqa: F811
    st = open_storage(f"s3://{s3_bucket}/ret-{uuid.uuid4().hex[:6]}", **s3_endpoint.storage_options())
    sizes = [_commit(st, tmp_path, f"r/s{i}", NOW + i, 2000) for i in range(3)]
    assert [c.size for c in list_checkpoints(st)] == sizes
    plan = prune(st, keep_last=1)
    assert [c.prefix for c in plan.delete] == ["r/s0", "r/s1"]
    assert st.list_committed() == ["r/s2"] and [o.key for o in st.list("r/s0")] == []
