"""Load any common dataset format through Hugging Face `datasets`, validated row by row, for every recipe.

    from tasks.data_io import load_rows
    ds = load_rows("s3://bucket/chats.parquet", columns={"messages": "conversation"}, validate_fn=chat_validator())
    ds = load_rows("org/name:test")                      # a hub dataset (needs network, or its local cache)

Features:
- Sources: `.jsonl`/`.json`, `.parquet`, `.csv`, an Arrow directory written by `save_to_disk`, a local
  script-free dataset directory (data files, optionally with a README/dataset_infos), a hub id
  `org/name[:split]`, and `s3://bucket/key` (one object or a prefix of objects), downloaded through
  `infra.storage` with the same endpoint/credential resolution as checkpoints (env / AWS chain).
- Column mapping: `columns={"messages": "conversation"}` renames the user's column to ours; ShareGPT turns
  (`from`/`value`, roles human/gpt/system/tool) become `{role, content}` turns; a CSV cell holding the turns
  as a JSON string is parsed.
- Validation with a per-recipe `validate_fn(row, where) -> row` (`chat_validator` for chat SFT rows,
  `fields_validator` for flat shapes such as prompt/chosen/rejected): an error names the file and line
  (JSONL), or the file and 0-based row index (JSON arrays, Parquet, CSV, Arrow, directories), and the field.
  Nothing is written by the caller before `load_rows` returns.
- The result is an Arrow-backed (memory-mapped) `datasets.Dataset`; nothing is held as a Python list.

Trade-offs: a JSONL file Arrow cannot parse (mixed types, a bad line, a BOM) falls back to the exact
line-by-line reader, which names the bad line; a file that only Arrow refuses (mixed types across rows that
are each valid) is reported with Arrow's message and the file. A hub id in offline mode is one clear error.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infra.config import BadInputError

log = logging.getLogger(__name__)

ValidateFn = Callable[[dict[str, Any], str], dict[str, Any]]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(:[\w.-]+)?$")
_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt":
                   "assistant", "bing": "assistant", "bard": "assistant", "model": "assistant", "system": "system",
                   "tool": "tool", "function_response": "tool", "observation": "tool"}
VALIDATE_BATCH = 2048


class DataLoadError(BadInputError):
    """A dataset source cannot be loaded (missing, unsupported, unreachable hub); bad input: exit 2."""


@dataclass(frozen=True)
class Source:
    """A resolved dataset source: `kind` in jsonl/json/parquet/csv/arrow/arrow_dir/dir/hub."""

    spec: str  # what the user wrote (used in messages)
    kind: str
    path: str = ""  # local file or directory
    hub_id: str = ""
    split: str = "train"

    def where(self, index: int, line: int | None = None) -> str:
        """How an error names row `index`: `file:line` for text formats, `file row i` for columnar ones."""
        return f"{self.spec}:{line}" if line is not None else f"{self.spec} row {index}"


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def is_hub_id(spec: str) -> bool:
    """`org/name[:split]` that is not a (missing) local path: `data/train.jsonl` is a file name."""
    name = spec.partition(":")[0]
    return bool(_HUB_ID.match(spec)) and not spec.startswith((".", "/", "~")) and \
        Path(name).suffix.lower() not in _BUILDERS and not Path(name).exists()


def resolve_source(spec: str, cache_dir: str | Path | None = None) -> Source:
    """What `spec` names; `s3://` sources are downloaded first (into `cache_dir`, keyed by the URI)."""
    if not spec:
        raise DataLoadError("empty dataset path")
    if spec.startswith("s3://"):
        local = _download_s3(spec, cache_dir)
        src = resolve_source(str(local))
        return Source(spec, src.kind, src.path, split=src.split)
    p = Path(spec.removeprefix("file://")).expanduser()
    if p.is_file():
        kind = _BUILDERS.get(p.suffix.lower())
        if kind is None:
            raise DataLoadError(f"{spec}: unsupported file type {p.suffix!r} (use .jsonl, .json, .parquet, .csv, "
                                f"or an Arrow directory)")
        return Source(spec, "jsonl" if p.suffix.lower() == ".jsonl" else kind, str(p))
    if p.is_dir():
        if (p / "state.json").is_file() and (p / "dataset_info.json").is_file():
            return Source(spec, "arrow_dir", str(p))  # save_to_disk output
        if (p / "dataset_dict.json").is_file():
            return Source(spec, "arrow_dir", str(p))
        return Source(spec, "dir", str(p))
    name, _, split = spec.partition(":")
    if is_hub_id(spec):
        return Source(spec, "hub", hub_id=name, split=split or "train")
    raise DataLoadError(f"{spec}: no such file or directory (a hub dataset id looks like org/name[:split])")


def _download_s3(uri: str, cache_dir: str | Path | None) -> Path:
    """One object, or every object under a prefix, into a local dir named by a hash of the URI."""
    from infra.storage import open_storage
    from infra.storage_base import StorageError

    rest = uri[len("s3://"):].rstrip("/")
    bucket_prefix, _, name = rest.rpartition("/")
    root = Path(cache_dir or Path.home() / ".cache" / "tuneloop" / "data") / "s3" / \
        hashlib.sha256(uri.encode()).hexdigest()[:16]
    try:
        if bucket_prefix:
            parent = open_storage(f"s3://{bucket_prefix}")
            if name and parent.exists(name):
                dest = root / name
                root.mkdir(parents=True, exist_ok=True)
                parent.get_file(name, dest)
                return dest
        st = open_storage(uri)
        objs = st.list("")
        if not objs:
            raise DataLoadError(f"{uri}: no such object or prefix")
        dest = root / (name or "data")
        for o in objs:
            target = dest / o.key
            target.parent.mkdir(parents=True, exist_ok=True)
            st.get_file(o.key, target)
        return dest
    except StorageError as e:
        raise DataLoadError(f"{uri}: cannot download: {e}") from None


def _load_raw(src: Source, cache_dir: str | Path | None) -> Any:
    import datasets

    cd = str(cache_dir) if cache_dir else None
    if src.kind == "arrow_dir":
        ds = datasets.load_from_disk(src.path)
        if isinstance(ds, datasets.DatasetDict):
            ds = _pick_split(ds, src)
        return ds
    if src.kind == "hub":
        if _offline():
            raise DataLoadError(f"{src.spec}: a hub dataset, but HF_HUB_OFFLINE=1 (offline mode): run with "
                                f"HF_HUB_OFFLINE=0 on a machine that can reach the hub, or give a local file, an "
                                f"Arrow dir (save_to_disk) or s3:// path")
        try:
            return datasets.load_dataset(src.hub_id, split=src.split, cache_dir=cd)
        except Exception as e:  # noqa: BLE001 - many network/auth/not-found types: one located message
            raise DataLoadError(f"{src.spec}: cannot load hub dataset {src.hub_id!r} split {src.split!r}: "
                                f"{type(e).__name__}: {e}") from None
    if src.kind == "dir":
        dd = datasets.load_dataset(src.path, cache_dir=cd)
        return _pick_split(dd, src) if isinstance(dd, datasets.DatasetDict) else dd
    builder = "json" if src.kind == "jsonl" else src.kind
    # datasets keys its conversion cache by path + mtime: a file rewritten within the same mtime (or restored
    # with it) would be served stale, so the conversion lives under the file's content hash.
    base = Path(cd) if cd else Path(datasets.config.HF_DATASETS_CACHE)
    return datasets.load_dataset(builder, data_files=src.path, split="train",
                                 cache_dir=str(base / "by-content" / content_hash(src.path)[:20]))


def _pick_split(dd: Any, src: Source) -> Any:
    if src.split in dd:
        return dd[src.split]
    if len(dd) == 1:
        return next(iter(dd.values()))
    raise DataLoadError(f"{src.spec}: no split {src.split!r} (splits: {sorted(dd)}); name one as PATH:split")


def _jsonl_line_of(path: str, index: int) -> int:
    """1-based line of the `index`-th (0-based) non-blank line: Arrow skips blank lines, editors do not."""
    k = -1
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if raw.strip():
                k += 1
                if k == index:
                    return lineno
    return index + 1


def _jsonl_fallback(src: Source, validate_fn: ValidateFn | None, columns: dict[str, str] | None,
                    arrow_error: Exception) -> Any:
    """The exact line reader: names the first bad line; a file it accepts becomes a Dataset anyway (columns
    mapped per row, so `validate_fn` sees our names as on the Arrow path)."""
    import datasets

    from tasks.prepare_data import iter_json_lines

    def rows() -> Iterator[dict[str, Any]]:
        for lineno, row in iter_json_lines(Path(src.path), src.spec, _bad):
            if isinstance(row, dict):
                for ours, theirs in (columns or {}).items():
                    if theirs in row and theirs != ours:
                        row[ours] = row.pop(theirs)
            if validate_fn is not None:
                row = validate_fn(row, src.where(0, lineno))
            yield row

    got = list(rows())
    if not got:
        raise _bad(f"{src.spec}: no rows")
    try:
        return datasets.Dataset.from_list(got)
    except Exception:  # noqa: BLE001 - pyarrow's type errors: report Arrow's first complaint
        raise _bad(f"{src.spec}: rows are valid one by one but their types differ between rows, which a "
                   f"columnar dataset cannot hold: {arrow_error}") from None


def _bad(msg: str) -> BadInputError:
    from tasks.prepare_data import DataValidationError

    return DataValidationError(msg)


def apply_columns(ds: Any, columns: dict[str, str] | None, spec: str) -> Any:
    """Rename the user's columns to ours: `{"messages": "conversation"}` reads column `conversation`."""
    for ours, theirs in (columns or {}).items():
        if theirs == ours:
            continue
        if theirs not in ds.column_names and ours in ds.column_names:
            continue  # already in our schema (e.g. a prepared train.jsonl read with the run's mapping)
        if theirs not in ds.column_names:
            raise _bad(f"{spec}: data.columns.{ours}={theirs}: no such column (columns: {ds.column_names})")
        if ours in ds.column_names:
            ds = ds.remove_columns(ours)
        ds = ds.rename_column(theirs, ours)
    return ds


def normalize_turns(turns: Any) -> Any:
    """ShareGPT `{from, value}` turns -> `{role, content}`; Arrow's null fields (absent keys) dropped; a JSON
    string (the only way CSV holds a list of turns) is parsed (left as is if it is not JSON: validation says so)."""
    if isinstance(turns, str) and turns.lstrip().startswith("["):
        try:
            turns = json.loads(turns)
        except json.JSONDecodeError:
            return turns
    if not isinstance(turns, list):
        return turns
    out = []
    for m in turns:
        if isinstance(m, dict):
            m = {k: v for k, v in m.items() if v is not None}
            if "role" not in m and "from" in m:
                m = {"role": _SHAREGPT_ROLES.get(str(m.pop("from")).lower(), m.get("from")),
                     "content": m.pop("value", None), **m}
                m = {k: v for k, v in m.items() if v is not None}
        out.append(m)
    return out


def iter_validated(ds: Any, src: Source, validate_fn: ValidateFn,
                   batch_size: int = VALIDATE_BATCH) -> Iterator[dict[str, Any]]:
    """Every row through `validate_fn`, streamed in Arrow batches (an error names the row's place)."""
    i = 0
    for batch in ds.iter(batch_size=batch_size):
        cols = list(batch)
        for j in range(len(batch[cols[0]]) if cols else 0):
            row = {c: batch[c][j] for c in cols}
            row = {k: v for k, v in row.items() if v is not None}  # a key absent from this row
            try:
                yield validate_fn(row, src.where(i))
            except BadInputError as e:
                if src.kind == "jsonl":  # re-locate at the line the user's editor shows
                    line = _jsonl_line_of(src.path, i)
                    raise type(e)(str(e).replace(src.where(i), src.where(i, line), 1)) from None
                raise
            i += 1


def load_rows(spec: str | Source, columns: dict[str, str] | None = None, validate_fn: ValidateFn | None = None, *,
              cache_dir: str | Path | None = None, normalize: bool = True) -> Any:
    """Load `spec` as a `datasets.Dataset`, columns mapped, every row checked by `validate_fn`.

    `validate_fn(row, where)` gets a plain dict (absent keys omitted) and raises a BadInputError whose message
    starts with `where` (e.g. `train.jsonl:7` or `data.parquet row 6`) and names the field. It only checks:
    the returned dataset holds the mapped columns as loaded (`normalize_turns` is applied to a `messages`
    column when it holds ShareGPT turns). Raises DataLoadError / DataValidationError (bad input, exit 2).
    """
    import datasets
    from datasets.exceptions import DatasetGenerationError

    src = spec if isinstance(spec, Source) else resolve_source(spec, cache_dir)
    spec = src.spec
    try:
        ds = _load_raw(src, cache_dir)
    except DatasetGenerationError as e:
        if src.kind != "jsonl":
            raise _bad(f"{spec}: cannot be read as {src.kind}: {e.__cause__ or e}") from None
        ds = _jsonl_fallback(src, validate_fn, columns, e)  # names the bad line, or reads what Arrow could not
        return _sharegpt(ds) if normalize else ds
    except (datasets.exceptions.DataFilesNotFoundError, FileNotFoundError, ValueError) as e:
        what = "is a directory, not a dataset `datasets` can load" if src.kind == "dir" else \
            f"cannot be loaded as a {src.kind} dataset"
        raise DataLoadError(f"{spec}: {what}: {e}") from None
    if len(ds) == 0:
        raise _bad(f"{spec}: no rows")
    ds = apply_columns(ds, columns, spec)
    if normalize:
        ds = _sharegpt(ds)
    if validate_fn is not None:
        for _ in iter_validated(ds, src, validate_fn):
            pass
    return ds


def _sharegpt(ds: Any) -> Any:
    """Rewrite a `messages` column of ShareGPT turns once (Arrow map, cached by fingerprint)."""
    if "messages" not in ds.column_names or len(ds) == 0:
        return ds
    first = ds[0]["messages"]
    if not (isinstance(first, list) and first and isinstance(first[0], dict) and "from" in first[0]
            and first[0].get("role") is None):
        return ds
    return ds.map(lambda b: {"messages": [normalize_turns(t) for t in b["messages"]]}, batched=True,
                  desc="sharegpt turns")


def chat_validator(need_answer: bool = False) -> ValidateFn:
    """The SFT row check (tasks.prepare_data.validate_chat_row) as a `validate_fn`, ShareGPT turns accepted."""
    from tasks.prepare_data import validate_chat_row

    def check(row: dict[str, Any], where: str) -> dict[str, Any]:
        if "messages" in row:
            row = {**row, "messages": normalize_turns(row["messages"])}
        return validate_chat_row(row, where, need_answer)

    return check


def fields_validator(fields: dict[str, type | tuple[type, ...]], optional: tuple[str, ...] = ()) -> ValidateFn:
    """A `validate_fn` for flat row shapes (RL problems, preference pairs, prompt-only sets): each field present
    (unless optional) with the given type; a string field must not be blank.

        load_rows(path, {"prompt": "question"}, fields_validator({"prompt": str, "chosen": str, "rejected": str}))
    """
    def check(row: dict[str, Any], where: str) -> dict[str, Any]:
        for name, typ in fields.items():
            v = row.get(name)
            if v is None:
                if name in optional:
                    continue
                raise _bad(f"{where}: field '{name}': missing (columns: {sorted(row)}; map yours with "
                           f"data.columns.{name}=COLUMN)")
            if not isinstance(v, typ):
                want = " or ".join(t.__name__ for t in (typ if isinstance(typ, tuple) else (typ,)))
                raise _bad(f"{where}: field '{name}': expected {want}, got {type(v).__name__}")
            if isinstance(v, str) and not v.strip():
                raise _bad(f"{where}: field '{name}': empty")
        return row

    return check


def source_fingerprint(src: Source, ds: Any = None) -> str:
    """What a cache entry built from `src` is keyed by: the content hash of a file (local or downloaded from
    s3; a changed file is a miss even with the same mtime), else the `datasets` fingerprint (hub, dirs)."""
    if src.path and Path(src.path).is_file():
        return content_hash(src.path)
    if ds is None:
        raise ValueError(f"{src.spec}: a directory or hub source is keyed by its loaded dataset's fingerprint")
    return str(getattr(ds, "_fingerprint", "")) or hashlib.sha256(src.spec.encode()).hexdigest()



def content_hash(path: str) -> str:
    """sha256 of a file's bytes (never memoised on mtime: that is the staleness this avoids)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()
