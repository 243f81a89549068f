"""Checkpoint retention: list with sizes, prune by keep-last-N / keep-best / TTL, storage usage summary.

Pure planning (`plan_prune`) over CheckpointInfo records, a thin executor (`prune`) over a Storage, and
`add_checkpoint_commands(subparsers)` for `tuneloop checkpoints list|prune|du`.

Safety rules, whatever the policy: the newest committed checkpoint of every unfinished run (its resume point)
and any checkpoint marked champion (marker object or `protect=`) are kept; a checkpoint is kept if ANY
given policy keeps it; deleting un-commits first (manifest removed before the files).

Runs: in the pipeline's layout (`<run>/checkpoints/<session>/weights/step-N`, `<run>/checkpoints/final`) a
checkpoint belongs to the directory above `checkpoints/`; elsewhere to its parent directory. A run is finished
once it has `summary.json` (the pipeline writes it last) or a checkpoint whose metadata says `final: true`
(training writes it after its last step): it needs no resume point, so `--keep-last` / `--ttl` can free it.

Leftovers (`--partial-older-than`) are only what a killed writer leaves: hidden temp dirs of a local atomic
write (`.step-000004.tmp-…`) and uploads that hold the upload marker but no manifest. A run's own files
(summary.json, metrics.jsonl, report/, eval/, data_quality/ ...) are never leftovers.
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

from infra.config import BadInputError
from infra.storage import MANIFEST_NAME, CorruptCheckpointError, Storage, join_key, open_storage
from infra.storage_base import UPLOAD_MARKER

CHAMPION_MARKER = "CHAMPION.json"  # written next to manifest.json; not part of the manifest
DEFAULT_STORAGE_ENV = "TUNELOOP_STORAGE"
RUN_SUMMARY = "summary.json"  # flows/sft_pipeline.py writes it last into the run directory
CHECKPOINTS_DIR = "checkpoints"  # <run>/checkpoints/... in the pipeline's layout


def run_of(prefix: str) -> str:
    """The run directory owning checkpoint `prefix`: the part above the last `checkpoints/` (pipeline layout,
    whatever session / weights dirs lie below it), else the parent directory ('' at the root)."""
    parts = prefix.split("/")
    above = [i for i, p in enumerate(parts[:-1]) if p == CHECKPOINTS_DIR]
    if above:
        return "/".join(parts[: above[-1]])
    return prefix.rsplit("/", 1)[0] if "/" in prefix else ""


@dataclass(frozen=True)
class CheckpointInfo:
    prefix: str
    uri: str
    size: int  # bytes of every object under the prefix, manifest included
    files: int
    created_at: float
    metadata: dict[str, Any] = field(default_factory=dict)
    champion: bool = False
    run_finished: bool = False  # its run directory holds summary.json

    @property
    def group(self) -> str:
        """The run directory holding this checkpoint ('' at the root)."""
        return run_of(self.prefix)

    @property
    def final(self) -> bool:
        """Written after its run's last training step (training_core metadata `final: true`)."""
        return self.metadata.get("final") is True


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
    committed = storage.list_committed(prefix)
    # one lookup per run: summary.json may lie above `prefix` (e.g. --prefix run/checkpoints)
    finished = {r: storage.exists(join_key(r, RUN_SUMMARY)) for r in {run_of(ck) for ck in committed}}
    out: list[CheckpointInfo] = []
    for ck in committed:
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
                run_finished=finished[run_of(ck)],
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
        raise BadInputError(
            "give at least one of keep_last, keep_best (+metric) or ttl; refusing to prune everything"
        )
    if keep_best is not None and not metric:
        raise BadInputError("keep_best needs a metric name from the manifest metadata")
    if mode not in ("max", "min"):
        raise BadInputError(f"mode must be 'max' or 'min', got {mode!r}")
    now = time.time() if now is None else now
    ordered = sorted(checkpoints, key=lambda c: (c.created_at, c.prefix))
    reasons: dict[str, list[str]] = {}

    def keep(c: CheckpointInfo, why: str) -> None:
        reasons.setdefault(c.prefix, []).append(why)

    latest_per_group: dict[str, CheckpointInfo] = {}
    finished: set[str] = set()
    for c in ordered:
        latest_per_group[c.group] = c
        if c.run_finished or c.final:
            finished.add(c.group)
        if c.champion:
            keep(c, "champion")
    for g, c in latest_per_group.items():
        if g not in finished:  # a finished run resumes from nothing: the policies alone decide
            keep(c, f"resume point of {g or '/'}")
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


@dataclass(frozen=True)
class Leftover:
    key: str  # a hidden temp entry, or the prefix of an interrupted upload
    size: int
    mtime: float  # newest object in it
    kind: str  # "temp" | "upload"


def find_partial(
    storage: Storage, prefix: str = "", *, older_than_s: float, now: float | None = None
) -> list[Leftover]:
    """Half-written leftovers whose newest object is older than older_than_s (a write in progress is left
    alone): hidden temp dirs/files of a killed local writer (training_core's `.step-N.tmp-…` checkpoint dirs,
    storage and download temps) and uploads interrupted before their manifest (upload marker, no manifest).
    """
    now = time.time() if now is None else now
    found = [Leftover(o.key, o.size, o.mtime, "temp") for o in storage.list_temp(prefix)]
    objects = storage.list(f"{prefix.strip('/')}/" if prefix.strip("/") else "")
    keys = {o.key for o in objects}
    for o in objects:
        if o.key.rsplit("/", 1)[-1] != UPLOAD_MARKER or "/" not in o.key:
            continue
        up = o.key.rsplit("/", 1)[0]
        if join_key(up, MANIFEST_NAME) in keys:
            continue  # committed; the stray marker of a kill between commit and marker removal
        inside = [x for x in objects if x.key.startswith(up + "/")]
        found.append(Leftover(up, sum(x.size for x in inside), max(x.mtime for x in inside), "upload"))
    return sorted((f for f in found if now - f.mtime >= older_than_s), key=lambda f: f.key)


def _delete_leftover(storage: Storage, left: Leftover) -> None:
    if left.kind == "temp":
        storage.delete_temp(left.key)
        return
    marker = join_key(left.key, UPLOAD_MARKER)
    for o in storage.list(f"{left.key}/"):
        if o.key != marker:
            storage.delete(o.key)
    storage.delete(marker)  # last: a prune killed midway still finds this upload next time


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
    cks = list_checkpoints(storage, prefix, protect=protect)
    if keep_last is None and keep_best is None and ttl_s is None and partial_older_than_s is not None:
        # only a leftover clean-up was asked for: every committed checkpoint stays
        plan = PrunePlan(keep=cks, delete=[], reasons={c.prefix: ["no checkpoint policy given"] for c in cks})
    else:
        plan = plan_prune(
            cks, keep_last=keep_last, keep_best=keep_best, metric=metric, mode=mode, ttl_s=ttl_s, now=now
        )
    leftovers = (
        find_partial(storage, prefix, older_than_s=partial_older_than_s, now=now)
        if partial_older_than_s is not None
        else []
    )
    plan.partial = {left.key: left.size for left in leftovers}
    if not dry_run:
        for c in plan.delete:
            storage.delete_checkpoint(c.prefix)
        for left in leftovers:
            _delete_leftover(storage, left)
    return plan


@dataclass
class Usage:
    total_bytes: int
    objects: int
    committed: int
    committed_bytes: int
    uncommitted_bytes: int  # everything else, half-written temp entries included
    per_group: dict[str, dict[str, int]]
    temp_bytes: int = 0  # hidden temp entries of killed local writers (prune --partial-older-than)

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
    temp = sum(t.size for t in storage.list_temp(prefix))
    total = sum(o.size for o in objects) + temp
    committed_bytes = sum(c.size for c in cks)
    return Usage(total, len(objects), len(cks), committed_bytes, total - committed_bytes, per_group, temp)


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
    temps = st.list_temp(args.prefix)
    if temps:
        print(f"{len(temps)} half-written temp entries ({human_bytes(sum(t.size for t in temps))}), "
              f"e.g. {temps[0].key}: `checkpoints prune --partial-older-than` removes them")
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
        print(f"{verb:<7} {d} (half-written leftover)  {human_bytes(n)}")
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
        f"{human_bytes(u.committed_bytes)}, uncommitted/other {human_bytes(u.uncommitted_bytes)} "
        f"(half-written temp dirs {human_bytes(u.temp_bytes)})"
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
        "prune", help="delete checkpoints no policy keeps (an unfinished run's resume point and the champion always kept)"
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
                    help="also delete half-written leftovers older than this (temp dirs of killed writes, interrupted uploads)")  # fmt: skip
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
