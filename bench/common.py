"""Shared helpers for the benchmarks: merge figures into one JSON file, print a small table.

``merge_results`` does a locked read-modify-write of ``bench/results.json`` (relative paths resolve against the
repository root, not the CWD): each figure is a top-level key, and ``_meta`` records when each figure was last
measured and on what machine, so benchmarks run at different times can share the file.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import os
import platform
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RESULTS = "bench/results.json"


def machine_info() -> dict[str, Any]:
    """Where a figure was measured: enough to tell CI machines and laptops apart."""
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    try:
        info["loadavg_1m"] = round(os.getloadavg()[0], 2)  # other work on the machine skews timings
    except OSError:
        pass
    return info


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    # The lock lives in the temp dir so no stray file lands in the repo; keyed by the results file's path.
    key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
    lock = Path(tempfile.gettempdir()) / f"tuneloop-bench-{key}.lock"
    with open(lock, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def merge_results(
    figures: Mapping[str, Any] | str, path: str | Path | Mapping[str, Any] = DEFAULT_RESULTS
) -> Path:
    """Merge ``figures`` into the JSON results file and return its path.

    Also accepts ``merge_results(section, figures)``: the figures are then stored under the key ``section``.
    """
    if isinstance(figures, str):  # merge_results("eval", {...}) form
        if not isinstance(path, Mapping):
            raise TypeError("merge_results(section, figures): figures must be a mapping")
        figures, path = {figures: dict(path)}, DEFAULT_RESULTS
    if isinstance(path, Mapping):
        raise TypeError("merge_results(figures, path): path must be a str or Path")
    out = Path(path)
    if not out.is_absolute():
        out = REPO_ROOT / out
    out.parent.mkdir(parents=True, exist_ok=True)
    now = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    with _locked(out):
        data: dict[str, Any] = {}
        if out.exists():
            try:
                data = json.loads(out.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{out}: not valid JSON ({e}); fix or delete it") from e
        meta = data.setdefault("_meta", {})
        times = meta.setdefault("measured_at", {})
        for key, value in figures.items():
            data[key] = value
            times[key] = now
        meta["updated_at"] = now
        meta["machine"] = machine_info()
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=out.name, suffix=".tmp")
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2, sort_keys=True)
            fh.write("\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; keep the usual permissions
        os.replace(tmp, out)  # atomic: a reader never sees a half-written file
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
    return str(v)


def print_table(
    rows: Sequence[Mapping[str, Any]] | Sequence[Sequence[Any]], header: Sequence[str] | None = None
) -> str:
    """Print (and return) an aligned text table from dict rows (columns = union of keys) or plain rows."""
    if not rows:
        return ""
    if isinstance(rows[0], Mapping):
        cols: list[str] = list(header or [])
        for r in rows:
            cols.extend(k for k in r if k not in cols)  # type: ignore[union-attr]
        body = [[_fmt(r.get(c, "")) for c in cols] for r in rows]  # type: ignore[union-attr]
    else:
        cols = list(header) if header else []
        body = [[_fmt(v) for v in r] for r in rows]
    table = [cols, *body] if cols else body
    widths = [max(len(row[i]) for row in table if i < len(row)) for i in range(max(len(r) for r in table))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)).rstrip() for row in table]
    if cols:
        lines.insert(1, "  ".join("-" * w for w in widths))
    text = "\n".join(lines)
    print(text)
    return text
