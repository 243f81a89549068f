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
from infra.storage_base import UPLOAD_MARKER
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


class _Killed(BaseException):
    """Stands for SIGKILL: no except/finally of the code under test handles it."""


def _interrupted_upload(st: Storage, src: Path, prefix: str) -> int:
    """Run upload_dir and kill it right after its first file; returns the bytes it left in storage."""
    src.mkdir(parents=True)
    (src / "a.bin").write_bytes(b"x" * 777)
    (src / "b.bin").write_bytes(b"y" * 10)
    real = st.put_file

    def put_then_die(key: str, path: object) -> None:
        real(key, path)  # type: ignore[arg-type]
        raise _Killed

    st.put_file = put_then_die  # type: ignore[method-assign]
    try:
        with pytest.raises(_Killed):
            st.upload_dir(src, prefix)
    finally:
        del st.put_file
    assert UPLOAD_MARKER in {o.key.rsplit("/", 1)[-1] for o in st.list(f"{prefix}/")}
    return sum(o.size for o in st.list(f"{prefix}/"))


def _disk_bytes(root: Path) -> int:
    return sum(os.path.getsize(Path(dp) / f) for dp, _, fs in os.walk(root) for f in fs)


def test_prune_and_du_on_local_storage(tmp_path: Path) -> None:
    st = LocalStorage(tmp_path / "store")
    sizes = {
        f"r/s{i}": _commit(st, tmp_path / "src", f"r/s{i}", NOW - (5 - i) * DAY, 1000 * (i + 1), acc=i / 10)
        for i in range(5)
    }
    left = _interrupted_upload(st, tmp_path / "src9", "r/s9")  # a crashed upload: marker + a file, no manifest
    cks = list_checkpoints(st, "r")
    assert [(c.prefix, c.size) for c in cks] == list(sizes.items())
    u = usage(st, "r")
    assert u.total_bytes == _disk_bytes(tmp_path / "store") and u.committed == 5
    assert u.committed_bytes == sum(sizes.values()) and u.uncommitted_bytes == left
    mark_champion(st, "r/s0")
    before = _disk_bytes(tmp_path / "store")
    dry = prune(st, "r", keep_last=2, dry_run=True, now=NOW)
    assert [c.prefix for c in dry.delete] == ["r/s1", "r/s2"] and _disk_bytes(tmp_path / "store") == before
    plan = prune(st, "r", keep_last=2, partial_older_than_s=DAY, now=NOW + 2 * DAY)
    assert [c.prefix for c in plan.delete] == ["r/s1", "r/s2"] and plan.partial == {"r/s9": left}
    assert st.list_committed("r") == ["r/s0", "r/s3", "r/s4"]
    assert not (tmp_path / "store" / "r" / "s1").exists() and not (tmp_path / "store" / "r" / "s9").exists()
    assert before - _disk_bytes(tmp_path / "store") == plan.freed_bytes == sizes["r/s1"] + sizes["r/s2"] + left
    _interrupted_upload(st, tmp_path / "src10", "r/s10")  # an upload in progress is not a leftover yet
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
    left = _interrupted_upload(st, tmp_path / "src-s3", "r/s3")
    st.put_bytes("r/summary.json", b"{}")  # a run's own file: not a leftover, and it marks r finished
    plan = prune(st, keep_last=1, partial_older_than_s=0)
    assert [c.prefix for c in plan.delete] == ["r/s0", "r/s1"] and plan.partial == {"r/s3": left}
    assert st.list_committed() == ["r/s2"] and [o.key for o in st.list("r/s0")] == []
    assert [o.key for o in st.list("r/s3")] == [] and st.exists("r/summary.json")
    assert [c.prefix for c in prune(st, ttl_s=0, now=NOW + DAY).delete] == ["r/s2"]  # finished: no resume point


def _pipeline_ck(prefix: str, age_days: float, **meta: object) -> CheckpointInfo:
    return CheckpointInfo(prefix, f"file:///x/{prefix}", 100, 2, NOW - age_days * DAY, dict(meta))


def test_finished_pipeline_runs_are_freed_unfinished_keep_their_resume_point() -> None:
    """The pipeline's layout: `<run>/checkpoints/<session>/weights/step-N` and `<run>/checkpoints/final`."""
    done = [
        _pipeline_ck("done/checkpoints/sess-a-train-0/weights/step-000004", 9, step=4),
        _pipeline_ck("done/checkpoints/sess-b-train-0/weights/step-000008", 8, step=8),  # after a resume
        _pipeline_ck("done/checkpoints/sess-b-train-0/weights/step-000010", 7, step=10, final=True),
        _pipeline_ck("done/checkpoints/final", 7, step=10, final=True),
    ]
    killed = [
        _pipeline_ck("killed/checkpoints/sess-c-train-0/weights/step-000004", 6, step=4),
        _pipeline_ck("killed/checkpoints/sess-c-train-0/weights/step-000008", 5, step=8),
    ]
    s3_final_only = [_pipeline_ck("s3run/checkpoints/final", 4, step=10, final=True)]
    every = done + killed + s3_final_only
    # one run per run directory, whatever the session dirs below checkpoints/
    assert {c.group for c in every} == {"done", "killed", "s3run"}
    # ttl 0 frees every finished run; the killed run keeps only its resume point
    assert sorted(deleted(every, ttl_s=0)) == sorted(c.prefix for c in every if c is not killed[1])
    assert plan_prune(every, ttl_s=0, now=NOW).reasons == {killed[1].prefix: ["resume point of killed"]}
    assert sorted(deleted(every, keep_last=1)) == sorted(c.prefix for c in every[:-1] if c is not killed[1])
    # summary.json alone marks a run finished too (its final checkpoint pruned earlier)
    no_final = [CheckpointInfo(**{**c.__dict__, "run_finished": True}) for c in done[:2]]
    assert deleted(no_final, keep_last=0) == [c.prefix for c in no_final]


def test_kill_during_save_leaves_a_temp_dir_that_du_counts_and_prune_removes(tmp_path: Path,
                                                                              capsys: pytest.CaptureFixture[str]
                                                                              ) -> None:
    """SIGKILL inside training_core's atomic checkpoint write leaves `.step-N.tmp-*`: hidden from the
    checkpoint listing, but counted by du, reported by list, removed by prune --partial-older-than; a run's
    own files (summary.json, metrics.jsonl, report/, eval/, data_quality/) are never leftovers."""
    import subprocess
    import sys

    run = tmp_path / "store" / "run1"
    weights = run / "checkpoints" / "sess-a-train-0" / "weights"
    code = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from training_core.checkpoint import write_checkpoint\n"
        "def ok(p): p.write_bytes(b'w' * 5000)\n"
        "def die(p):\n"
        "    p.write_bytes(b'half' * 100)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "w = Path(sys.argv[1])\n"
        "write_checkpoint(w / 'step-000002', {'adapter.bin': ok}, {'step': 2})\n"
        "write_checkpoint(w / 'step-000004', {'adapter.bin': ok, 'opt.bin': die}, {'step': 4})\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(weights)], cwd=Path(__file__).parents[1])
    assert proc.returncode == -9
    (temp,) = [p for p in weights.iterdir() if p.name.startswith(".step-000004.tmp-")]
    temp_bytes = _disk_bytes(temp)
    assert temp_bytes == 5000 + 400
    for rel in ("summary.json", "metrics.jsonl", "report/index.html", "eval/base/checkpoint.json",
                "data_quality/report.json"):
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        (run / rel).write_text("{}")
    st = LocalStorage(tmp_path / "store")
    assert st.list_committed() == ["run1/checkpoints/sess-a-train-0/weights/step-000002"]
    u = usage(st)
    assert u.total_bytes == _disk_bytes(tmp_path / "store") and u.temp_bytes == temp_bytes

    parser = argparse.ArgumentParser(prog="tuneloop")
    add_checkpoint_commands(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args(["checkpoints", "list", "--storage", st.uri()])
    assert args.func(args) == 0 and "1 half-written temp entries" in capsys.readouterr().out
    plan = prune(st, partial_older_than_s=0)
    temp_key = temp.relative_to(tmp_path / "store").as_posix()
    assert plan.partial == {temp_key: temp_bytes} and not temp.exists()
    # the unfinished-looking step-2 is the run's newest, but summary.json says the run finished: ttl frees it
    assert [c.prefix for c in plan.delete] == [] and prune(st, ttl_s=0).delete[0].prefix.endswith("step-000002")
    left = sorted(p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file())
    assert left == ["data_quality/report.json", "eval/base/checkpoint.json", "metrics.jsonl", "report/index.html",
                    "summary.json"]
