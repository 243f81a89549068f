"""Checkpoint retention: list with sizes, prune by keep-last-N / keep-best / TTL, storage usage summary.

Pure planning (`plan_prune`) over CheckpointInfo records, a thin executor (`prune`) over a Storage, and
`add_checkpoint_commands(subparsers)` for `tuneloop checkpoints list|prune|du`.

Safety rules, whatever the policy: the newest committed checkpoint of every run directory (the resume point)
and any checkpoint marked champion (marker object or `protect=`) are kept; a checkpoint is kept if ANY
given policy keeps it; deleting un-commits first (manifest removed before the files).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from infra.storage import MANIFEST_NAME, CorruptCheckpointError, ObjectInfo, Storage, join_key, open_storage

CHAMPION_MARKER = "CHAMPION.json"  # written next to manifest.json; not part of the manifest
DEFAULT_STORAGE_ENV = "TUNELOOP_STORAGE"


@dataclass(frozen=True)
class CheckpointInfo:
    prefix: str
    uri: str
    size: int  # bytes of every object under the prefix, manifest included
    files: int
    created_at: float
    metadata: dict[str, Any] = field(default_factory=dict)
    champion: bool = False

    @property
    def group(self) -> str:
        """The run directory holding this checkpoint ('' at the root)."""
        return self.prefix.rsplit("/", 1)[0] if "/" in self.prefix else ""


@dataclass
class PrunePlan:
    keep: list[CheckpointInfo]
    delete: list[CheckpointInfo]
    reasons: dict[str, list[str]]  # prefix -> why it is kept
    partial: dict[str, int] = field(default_factory=dict)  # uncommitted dir prefix -> bytes to delete

    @property
    def freed_bytes(self) -> int:
        return sum(c.size for c in self.delete) + sum(self.partial.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "keep": [
                {"prefix": c.prefix, "size": c.size, "why": self.reasons.get(c.prefix, [])} for c in self.keep
            ],
            "delete": [{"prefix": c.prefix, "size": c.size} for c in self.delete],
            "partial": self.partial,
            "freed_bytes": self.freed_bytes,
        }


def _to_prefix(storage: Storage, ref: str) -> str:
    """Accept a key prefix or a full URI of this storage."""
    root = storage.uri("")
    return ref[len(root) :].strip("/") if ref.startswith(root) else ref.strip("/")


def list_checkpoints(
    storage: Storage, prefix: str = "", *, protect: Iterable[str] = ()
) -> list[CheckpointInfo]:
    """Committed checkpoints under prefix, oldest first, with sizes summed from one listing."""
    protected = {_to_prefix(storage, p) for p in protect}
    objects = storage.list(f"{prefix.strip('/')}/" if prefix.strip("/") else "")
    out: list[CheckpointInfo] = []
    for ck in storage.list_committed(prefix):
        inside = [o for o in objects if ck == "" or o.key.startswith(ck + "/")]
        try:
            manifest = storage.read_manifest(ck)
            created, meta = manifest.created_at, manifest.metadata
        except CorruptCheckpointError:  # unreadable manifest: still listed, dated by the object
            mobj = next(o for o in inside if o.key.endswith(MANIFEST_NAME))
            created, meta = mobj.mtime, {}
        marker = join_key(ck, CHAMPION_MARKER)
        out.append(
            CheckpointInfo(
                prefix=ck,
                uri=storage.uri(ck),
                size=sum(o.size for o in inside),
                files=len(inside),
                created_at=created,
                metadata=meta,
                champion=ck in protected or any(o.key == marker for o in inside),
            )
        )
    return sorted(out, key=lambda c: (c.created_at, c.prefix))


def mark_champion(storage: Storage, prefix: str, note: dict[str, Any] | None = None) -> None:
    """Pin a committed checkpoint so prune never deletes it (the registry's champion pointer)."""
    if not storage.is_committed(prefix):
        raise CorruptCheckpointError(
            f"{storage.uri(prefix)}: not a committed checkpoint; cannot mark champion"
        )
    storage.put_bytes(
        join_key(prefix, CHAMPION_MARKER), json.dumps({"marked_at": time.time(), **(note or {})}).encode()
    )


def unmark_champion(storage: Storage, prefix: str) -> None:
    storage.delete(join_key(prefix, CHAMPION_MARKER))


def metric_value(metadata: dict[str, Any], metric: str) -> float | None:
    """metadata[metric], or a dotted path into nested dicts ('eval.accuracy'); None if absent/non-numeric."""
    if metric in metadata:
        node: Any = metadata[metric]
    else:
        node = metadata
        for part in metric.split("."):
            node = node.get(part) if isinstance(node, dict) else None
    if node is None or isinstance(node, bool):
        return None
    try:
        return float(node)
    except (TypeError, ValueError):
        return None


def plan_prune(
    checkpoints: list[CheckpointInfo],
    *,
    keep_last: int | None = None,
    keep_best: int | None = None,
    metric: str | None = None,
    mode: str = "max",
    ttl_s: float | None = None,
    now: float | None = None,
) -> PrunePlan:
    """Decide what to keep. A checkpoint survives if any rule keeps it; with no rule at all, refuse."""
    if keep_last is None and keep_best is None and ttl_s is None:
        raise ValueError(
            "give at least one of keep_last, keep_best (+metric) or ttl; refusing to prune everything"
        )
    if keep_best is not None and not metric:
        raise ValueError("keep_best needs a metric name from the manifest metadata")
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
    now = time.time() if now is None else now
    ordered = sorted(checkpoints, key=lambda c: (c.created_at, c.prefix))
    reasons: dict[str, list[str]] = {}

    def keep(c: CheckpointInfo, why: str) -> None:
        reasons.setdefault(c.prefix, []).append(why)

    latest_per_group: dict[str, CheckpointInfo] = {}
    for c in ordered:
        latest_per_group[c.group] = c
        if c.champion:
            keep(c, "champion")
    for g, c in latest_per_group.items():
        keep(c, f"latest in {g or '/'}")
    if keep_last is not None and keep_last > 0:
        for c in ordered[-keep_last:]:
            keep(c, f"last {keep_last}")
    if keep_best is not None and metric:
        scored = [(v, c) for c in ordered if (v := metric_value(c.metadata, metric)) is not None]
        scored.sort(key=lambda vc: vc[0], reverse=(mode == "max"))
        for v, c in scored[:keep_best]:
            keep(c, f"best {keep_best} by {metric}={v:g}")
    if ttl_s is not None:
        for c in ordered:
            if now - c.created_at < ttl_s:
                keep(c, "younger than ttl")
    return PrunePlan(
        keep=[c for c in ordered if c.prefix in reasons],
        delete=[c for c in ordered if c.prefix not in reasons],
        reasons=reasons,
    )


def find_partial(
    storage: Storage, prefix: str = "", *, older_than_s: float, now: float | None = None
) -> dict[str, list[ObjectInfo]]:
    """Objects outside every committed checkpoint, by directory, where the directory's newest object is older
    than older_than_s (so an upload still in progress is left alone).

    These are leftovers of crashed uploads. Only meaningful on a checkpoints root: anything else living
    under the prefix would count too.
    """
    now = time.time() if now is None else now
    committed = storage.list_committed(prefix)
    dirs: dict[str, list[ObjectInfo]] = {}
    for o in storage.list(f"{prefix.strip('/')}/" if prefix.strip("/") else ""):
        if any(c == "" or o.key.startswith(c + "/") for c in committed):
            continue
        dirs.setdefault(o.key.rsplit("/", 1)[0] if "/" in o.key else "", []).append(o)
    return {d: objs for d, objs in dirs.items() if d and now - max(o.mtime for o in objs) >= older_than_s}


def prune(
    storage: Storage,
    prefix: str = "",
    *,
    keep_last: int | None = None,
    keep_best: int | None = None,
    metric: str | None = None,
    mode: str = "max",
    ttl_s: float | None = None,
    partial_older_than_s: float | None = None,
    protect: Iterable[str] = (),
    dry_run: bool = False,
    now: float | None = None,
) -> PrunePlan:
    plan = plan_prune(
        list_checkpoints(storage, prefix, protect=protect),
        keep_last=keep_last, keep_best=keep_best, metric=metric, mode=mode, ttl_s=ttl_s, now=now,
    )  # fmt: skip
    leftovers = (
        find_partial(storage, prefix, older_than_s=partial_older_than_s, now=now)
        if partial_older_than_s is not None
        else {}
    )
    plan.partial = {d: sum(o.size for o in objs) for d, objs in leftovers.items()}
    if not dry_run:
        for c in plan.delete:
            storage.delete_checkpoint(c.prefix)
        for objs in leftovers.values():
            for o in objs:
                storage.delete(o.key)
    return plan


@dataclass
class Usage:
    total_bytes: int
    objects: int
    committed: int
    committed_bytes: int
    uncommitted_bytes: int
    per_group: dict[str, dict[str, int]]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def usage(storage: Storage, prefix: str = "") -> Usage:
    objects = storage.list(f"{prefix.strip('/')}/" if prefix.strip("/") else "")
    cks = list_checkpoints(storage, prefix)
    per_group: dict[str, dict[str, int]] = {}
    for c in cks:
        g = per_group.setdefault(c.group or "/", {"checkpoints": 0, "bytes": 0})
        g["checkpoints"] += 1
        g["bytes"] += c.size
    total = sum(o.size for o in objects)
    committed_bytes = sum(c.size for c in cks)
    return Usage(total, len(objects), len(cks), committed_bytes, total - committed_bytes, per_group)


# --- CLI -----------------------------------------------------------------------------------------------------
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float:
    """'90s', '30m', '12h', '7d', '2w'; a bare number means days."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"bad duration {text!r}: use e.g. 90s, 30m, 12h, 7d, 2w")
    return float(m.group(1)) * _UNITS[m.group(2) or "d"]


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _fmt_time(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t))


def _cmd_list(args: argparse.Namespace) -> int:
    st = open_storage(args.storage)
    cks = list_checkpoints(st, args.prefix, protect=args.protect)
    if args.json:
        print(json.dumps([asdict(c) for c in cks], indent=2))
        return 0
    for c in cks:
        flag = " [champion]" if c.champion else ""
        print(f"{_fmt_time(c.created_at)}  {human_bytes(c.size):>10}  {c.files:>4} files  {c.prefix}{flag}")
    print(
        f"{len(cks)} committed checkpoints, {human_bytes(sum(c.size for c in cks))} in {st.uri(args.prefix)}"
    )
    return 0


def _champion_refs(args: argparse.Namespace) -> list[str]:
    refs = list(args.protect)
    if args.champion_model:
        from infra.registry import get_champion

        champ = get_champion(args.champion_model)
        if champ is not None:
            refs.append(champ[1])
    return refs


def _cmd_prune(args: argparse.Namespace) -> int:
    st = open_storage(args.storage)
    try:
        plan = prune(
            st, args.prefix, keep_last=args.keep_last, keep_best=args.keep_best, metric=args.metric, mode=args.mode,
            ttl_s=args.ttl, partial_older_than_s=args.partial_older_than, protect=_champion_refs(args),
            dry_run=args.dry_run,
        )  # fmt: skip
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"dry_run": args.dry_run, **plan.to_dict()}, indent=2))
        return 0
    verb = "would delete" if args.dry_run else "deleted"
    for c in plan.keep:
        print(f"keep    {c.prefix}  ({', '.join(plan.reasons[c.prefix])})")
    for c in plan.delete:
        print(f"{verb:<7} {c.prefix}  {human_bytes(c.size)}")
    for d, n in plan.partial.items():
        print(f"{verb:<7} {d}/ (uncommitted leftovers)  {human_bytes(n)}")
    print(
        f"{verb} {len(plan.delete)} checkpoints, {human_bytes(plan.freed_bytes)} freed; kept {len(plan.keep)}"
    )
    return 0


def _cmd_du(args: argparse.Namespace) -> int:
    u = usage(open_storage(args.storage), args.prefix)
    if args.json:
        print(json.dumps(u.to_dict(), indent=2))
        return 0
    for g, v in sorted(u.per_group.items()):
        print(f"{human_bytes(v['bytes']):>10}  {v['checkpoints']:>4} checkpoints  {g}")
    print(
        f"total {human_bytes(u.total_bytes)} in {u.objects} objects: {u.committed} committed checkpoints "
        f"{human_bytes(u.committed_bytes)}, uncommitted/other {human_bytes(u.uncommitted_bytes)}"
    )
    return 0


def add_checkpoint_commands(subparsers: Any) -> argparse.ArgumentParser:
    """Register `checkpoints list|prune|du`; each leaf sets args.func(args) -> exit code."""
    p = subparsers.add_parser("checkpoints", help="list, prune and measure stored checkpoints")
    sub = p.add_subparsers(dest="checkpoints_cmd", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--storage", default=os.environ.get(DEFAULT_STORAGE_ENV, ".tuneloop/runs"),
                        help=f"storage URI (file://, path or s3://bucket/prefix); default ${DEFAULT_STORAGE_ENV} or .tuneloop/runs (the pipeline default)")  # fmt: skip
        sp.add_argument("--prefix", default="", help="only checkpoints under this key prefix")
        sp.add_argument("--json", action="store_true", help="machine-readable output")

    ls = sub.add_parser("list", help="committed checkpoints with sizes")
    common(ls)
    ls.add_argument(
        "--protect", action="append", default=[], help="mark this checkpoint URI/prefix as champion"
    )
    ls.set_defaults(func=_cmd_list)

    pr = sub.add_parser(
        "prune", help="delete checkpoints no policy keeps (latest per run and champion always kept)"
    )
    common(pr)
    pr.add_argument("--keep-last", type=int, help="keep the N newest")
    pr.add_argument("--keep-best", type=int, help="keep the N best by --metric (manifest metadata)")
    pr.add_argument("--metric", help="metadata key, e.g. eval/accuracy or eval.accuracy")
    pr.add_argument(
        "--mode", choices=["max", "min"], default="max", help="whether higher or lower --metric is better"
    )
    pr.add_argument("--ttl", type=parse_duration, help="keep checkpoints younger than this (7d, 12h ...)")
    pr.add_argument("--partial-older-than", type=parse_duration,
                    help="also delete uncommitted upload leftovers older than this")  # fmt: skip
    pr.add_argument("--protect", action="append", default=[], help="never delete this checkpoint URI/prefix")
    pr.add_argument(
        "--champion-model", help="protect this registered model's champion (MLflow, $MLFLOW_TRACKING_URI)"
    )
    pr.add_argument("--dry-run", action="store_true", help="show what would be deleted, delete nothing")
    pr.set_defaults(func=_cmd_prune)

    du = sub.add_parser("du", help="storage usage summary")
    common(du)
    du.set_defaults(func=_cmd_du)
    return p
