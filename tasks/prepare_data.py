"""Stage 1: prepare and validate the chat dataset; cached by a hash of its inputs and config.

A cache entry is a committed (manifest-verified) directory. One whose files were deleted or changed is
recomputed, never trusted (pain-points cluster 10).

Inputs: `data.train_file` / `eval_file` / `replay` may be any source `tasks.data_io` loads (JSONL, JSON,
Parquet, CSV, an Arrow dir, a dataset dir, `org/name[:split]`, `s3://...`), with `data.columns` mapping the
user's column names to ours. A plain local JSONL keeps the exact line reader (errors name file:line, BOM,
CRLF and non-UTF-8 handled); other formats name "file row i". The prepared entry is always JSONL
(`train.jsonl`, `eval.jsonl`): recipes then tokenize it into the Arrow cache of `tasks.data_cache`.

A user training file without replay is prepared streaming (`_prepare_streamed`: validated row by row while
train.jsonl is written, memory flat in the row count: million-row files); generated data and replay mixing
(a seeded shuffle of the whole set) keep the list path. `iter_decoded_lines` / `validate_chat_jsonl` are the
line reader's checks, streamed, for pre-flight.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from flows.sft_config import DataConfig
from infra.config import BadInputError
from training_core.checkpoint import CheckpointError, verify_checkpoint, write_checkpoint

log = logging.getLogger(__name__)
ROLES = ("system", "user", "assistant", "tool")


class DataValidationError(BadInputError):
    """A dataset row is malformed; the message names the file, line and field."""


@dataclass
class DatasetInfo:
    dir: str
    train_path: str
    eval_path: str
    n_train: int
    n_eval: int
    hash: str
    cached: bool


def validate_row(row: Any, path: str, line: int, need_answer: bool) -> dict[str, Any]:
    return validate_chat_row(row, f"{path}:{line}", need_answer)


def validate_chat_row(row: Any, where: str, need_answer: bool = False) -> dict[str, Any]:
    """One chat SFT row; `where` is "file:line" (text formats) or "file row i" (columnar formats)."""
    def err(fld: str, msg: str) -> DataValidationError:
        return DataValidationError(f"{where}: field '{fld}': {msg}")

    if not isinstance(row, dict):
        raise err("<row>", f"expected a JSON object, got {type(row).__name__}")
    msgs = row.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise err("messages", "missing or not a non-empty list of {role, content} objects")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise err(f"messages[{i}]", "not an object")
        if m.get("role") not in ROLES:
            raise err(f"messages[{i}].role", f"{m.get('role')!r} is not one of {list(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise err(f"messages[{i}].content", "missing or not a string")
    if msgs[-1]["role"] != "assistant":
        raise err(f"messages[{len(msgs) - 1}].role", "the last message must be the assistant's (the target)")
    if not msgs[-1]["content"].strip():
        raise err(f"messages[{len(msgs) - 1}].content", "the assistant target is empty")
    if need_answer and not isinstance(row.get("answer"), str):
        raise err("answer", "eval rows need a string 'answer' to grade against")
    return row


def _decode_lines(p: Path) -> list[tuple[int, str]]:
    """(line number, text) of every line: UTF-8 with an optional BOM, LF or CRLF; other bytes name their line."""
    return list(iter_decoded_lines(p))


def iter_decoded_lines(p: Path) -> Iterator[tuple[int, str]]:
    """`_decode_lines`, streamed: one line in memory at a time (preflight of million-row files)."""
    if p.is_dir():
        raise DataValidationError(f"{p}: is a directory, not a JSONL file")
    if not p.exists():
        raise DataValidationError(f"{p}: file not found")
    try:
        fh = open(p, "rb")  # noqa: SIM115 - closed below, also when the consumer stops early
    except OSError as e:
        raise DataValidationError(f"{p}: cannot read: {e.strerror}") from None
    with fh:
        lineno = 0
        for lineno, chunk in enumerate(fh, 1):  # noqa: B007 - the last number is used below
            chunk = chunk.removesuffix(b"\n")
            if lineno == 1 and chunk.startswith(b"\xef\xbb\xbf"):
                chunk = chunk[3:]  # a UTF-8 BOM is legitimate (some editors write one)
            try:
                text = chunk.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataValidationError(f"{p}:{lineno}: not UTF-8 text (byte 0x{chunk[e.start]:02x} at byte "
                                          f"{e.start + 1} of the line); re-save the file as UTF-8") from None
            yield lineno, text.removesuffix("\r")  # CRLF line endings are legitimate too
        if lineno == 0:
            yield 1, ""  # as bytes.split: an empty file is one empty line



def iter_json_lines(p: Path, name: str | None = None,
                    error: Callable[[str], Exception] = DataValidationError) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of every non-blank line of a JSONL file, streamed; a line that is not JSON
    raises `error("<name>:<line>: invalid JSON (<why> at column <c>)")`: the one message every reader gives."""
    for lineno, line in iter_decoded_lines(p):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            raise error(f"{name or p}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None

def validate_chat_jsonl(path: str | Path, need_answer: bool = False) -> int:
    """`read_chat_jsonl_lines`'s checks and messages, streamed (no row kept); returns the number of rows."""
    p = Path(path)
    n = 0
    for lineno, row in iter_json_lines(p):
        validate_row(row, str(p), lineno, need_answer)
        n += 1
    if not n:
        raise DataValidationError(f"{p}: no rows")
    return n


def read_chat_jsonl_lines(path: str | Path, need_answer: bool = False) -> list[tuple[int, dict[str, Any]]]:
    """(line number, row) of every row, all validated before returning (nothing downstream sees a bad file)."""
    p = Path(path)
    rows = []
    for lineno, line in _decode_lines(p):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            # colno counts characters of this line (1-based), as an editor shows them
            raise DataValidationError(f"{p}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        rows.append((lineno, validate_row(row, str(p), lineno, need_answer)))
    if not rows:
        raise DataValidationError(f"{p}: no rows")
    return rows


def read_chat_jsonl(path: str | Path, need_answer: bool = False) -> list[dict[str, Any]]:
    """Read and validate every row before returning (so nothing downstream sees a bad file)."""
    return [row for _, row in read_chat_jsonl_lines(path, need_answer)]


def is_jsonl(path: str | Path) -> bool:
    return str(path).lower().endswith(".jsonl") and not str(path).startswith("s3://")


def read_chat_rows_with_sources(path: str, need_answer: bool = False, columns: dict[str, str] | None = None,
                                cache_dir: str | Path | None = None) -> list[tuple[str, dict[str, Any]]]:
    """(source, row) of every validated row of any format `tasks.data_io` loads.

    A local JSONL without a column mapping is read by the exact line reader (every row's line is its
    source, BOM/CRLF/non-UTF-8 handled as before); every other source goes through `datasets`, its
    source being "file row i" (0-based). Rows are materialised: this is the preflight/small-data path;
    training at scale reads the tokenized Arrow cache instead (tasks.data_cache).
    """
    if is_jsonl(path) and not columns:
        return [(f"{path}:{n}", r) for n, r in read_chat_jsonl_lines(path, need_answer)]
    from tasks.data_io import chat_validator, iter_validated, load_rows, resolve_source

    src = resolve_source(path, cache_dir)  # once: an s3:// source is downloaded here
    ds = load_rows(src, columns, None, cache_dir=cache_dir)
    rows = list(iter_validated(ds, src, chat_validator(need_answer)))
    return [(src.where(i, _line(src, i)), r) for i, r in enumerate(rows)]


def _line(src: Any, i: int) -> int | None:
    return i + 1 if src.kind == "jsonl" else None  # a mapped JSONL: close enough (blank lines are rare)


def _file_hash(path: str) -> str:
    """Content hash of a file, or of every file of a directory (Arrow dirs, dataset dirs); a remote source
    (s3://, a hub id) is keyed by its name (it is re-read on a miss, not watched)."""
    if not path:
        return ""
    p = Path(path)
    if not p.exists():
        return hashlib.sha256(path.encode()).hexdigest()
    h = hashlib.sha256()
    for f in sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]:
        h.update(str(f.relative_to(p) if p.is_dir() else "").encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def _replay_file(cfg: DataConfig) -> str:
    """The replay JSONL path, or "" when replay is off, unresolved ("auto") or built in ("builtin:...")."""
    return "" if cfg.replay in ("", "auto") or cfg.replay.startswith("builtin:") else cfg.replay


def dataset_hash(cfg: DataConfig) -> str:
    key = {"cfg": asdict(cfg), "train": _file_hash(cfg.train_file), "eval": _file_hash(cfg.eval_file),
           "replay": _file_hash(_replay_file(cfg))}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _with_ids(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        if "id" not in r:
            blob = json.dumps({"m": r["messages"], "a": r.get("answer")}, sort_keys=True)
            r = {**r, "id": hashlib.sha256(blob.encode()).hexdigest()[:16]}
        out.append(r)
    return out


def resolve_replay(cfg: DataConfig, base_model: str) -> DataConfig:
    """`cfg` with `replay="auto"` resolved for `base_model` (so the dataset hash names the real choice)."""
    if cfg.replay != "auto":
        return cfg
    from training_core.presets import PRESETS, RandomInitSpec

    known = isinstance(PRESETS.get(base_model), RandomInitSpec)
    if not known:
        log.info("data.replay=auto: no known pretraining text for %s, no replay (set data.replay=FILE)", base_model)
    return replace(cfg, replay="builtin:prose" if known else "")


def replay_rows(cfg: DataConfig, n_task: int) -> list[dict[str, Any]]:
    """Replay rows making up `replay_fraction` of a training set that has `n_task` task rows."""
    return [r for r, _ in _replay_with_sources(cfg, n_task)]


def _replay_with_sources(cfg: DataConfig, n_task: int) -> list[tuple[dict[str, Any], str]]:
    if not cfg.replay or cfg.replay == "auto" or n_task == 0:
        return []
    if not 0.0 <= cfg.replay_fraction < 1.0:
        raise DataValidationError(f"data.replay_fraction must be in [0, 1), got {cfg.replay_fraction}")
    n = round(n_task * cfg.replay_fraction / (1.0 - cfg.replay_fraction))
    if n == 0:
        return []
    if cfg.replay == "builtin:prose":
        from data.generators import prose

        return [(dict(r), f"{cfg.replay} row {i + 1}") for i, r in enumerate(prose(n, seed=cfg.seed))]
    if cfg.replay.startswith("builtin:"):
        raise DataValidationError(f"data.replay: unknown built-in {cfg.replay!r} (known: builtin:prose)")
    path = _replay_file(cfg)
    lines = read_chat_rows_with_sources(path)
    pool = list(zip(_with_ids([r for _, r in lines]), [s for s, _ in lines], strict=True))
    if len(pool) < n:
        log.warning("data.replay %s has %d rows, fewer than the %d asked for: using all of them", cfg.replay,
                    len(pool), n)
        return pool
    return random.Random(f"replay/{cfg.seed}").sample(pool, n)


Sourced = tuple[list[dict[str, Any]], list[str]]


def build_rows_with_sources(cfg: DataConfig, require_eval: bool = True) -> tuple[Sourced, Sourced]:
    """(train rows, their sources), (eval rows, their sources): a source is "file:line" or "generated row N",
    so a problem found in the shuffled, replay-mixed set is reported where the user can fix it.
    `require_eval=False` (`tuneloop data validate` of a training file alone) allows an empty eval side."""
    if cfg.train_file:
        if not cfg.eval_file and require_eval:
            raise DataValidationError("data.train_file is set but data.eval_file is not: give a held-out eval set")
        tl = read_chat_rows_with_sources(cfg.train_file, columns=cfg.columns)
        train, t_src = _with_ids([r for _, r in tl]), [s for s, _ in tl]
        el = read_chat_rows_with_sources(cfg.eval_file, need_answer=True, columns=cfg.columns) \
            if cfg.eval_file else []
        evl, e_src = _with_ids([r for _, r in el]), [s for s, _ in el]
    else:
        from data.generators import train_eval

        gen_train, gen_eval = train_eval(cfg.task, cfg.n_train, cfg.n_eval, seed=cfg.seed, **cfg.task_kwargs)
        train, evl = [dict(r) for r in gen_train], [dict(r) for r in gen_eval]
        t_src = [f"generated train row {i + 1}" for i in range(len(train))]
        e_src = [f"generated eval row {i + 1}" for i in range(len(evl))]
    replay = _replay_with_sources(cfg, len(train))
    if replay:  # interleaved at seeded random positions, so every batch sees some
        mixed = list(zip(train, t_src, strict=True)) + replay
        random.Random(f"mix/{cfg.seed}").shuffle(mixed)
        train, t_src = [r for r, _ in mixed], [s for _, s in mixed]
    return (train, t_src), (evl, e_src)


def build_rows(cfg: DataConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    (train, _), (evl, _) = build_rows_with_sources(cfg)
    return train, evl


def leaked_rows(train: list[dict[str, Any]], evl: list[dict[str, Any]]) -> list[tuple[int, int]]:
    """(eval index, train index) of every eval row that is also a training row (same id)."""
    first = {}
    for i, r in enumerate(train):
        first.setdefault(r["id"], i)
    return [(j, first[r["id"]]) for j, r in enumerate(evl) if r["id"] in first]


def _write_jsonl(rows: list[dict[str, Any]]) -> Any:
    def write(p: Path) -> None:
        p.write_text("".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rows))

    return write


def prepare_dataset(cfg: DataConfig, cache_root: str | Path) -> DatasetInfo:
    h = dataset_hash(cfg)
    d = Path(cache_root) / "datasets" / h
    if d.exists():
        try:
            m = verify_checkpoint(d)
            log.info("dataset cache hit %s", d)
            return DatasetInfo(str(d), str(d / "train.jsonl"), str(d / "eval.jsonl"), m["metadata"]["n_train"],
                               m["metadata"]["n_eval"], h, cached=True)
        except CheckpointError as e:
            log.warning("dataset cache entry %s is not usable (%s); recomputing", d, e)
            shutil.rmtree(d)
    if cfg.train_file and cfg.replay in ("", "auto"):  # a user file, no mixing: streamed (any row count)
        return _prepare_streamed(cfg, d, h)
    train, evl = build_rows(cfg)  # validates everything before anything is written
    leaked = leaked_rows(train, evl)
    if leaked:
        raise DataValidationError(f"{len(leaked)} eval rows also appear in the training set (e.g. id "
                                  f"{evl[leaked[0][0]]['id']})")
    write_checkpoint(d, {"train.jsonl": _write_jsonl(train), "eval.jsonl": _write_jsonl(evl)},
                     {"n_train": len(train), "n_eval": len(evl), "config": asdict(cfg)})
    log.info("prepared dataset %s: %d train / %d eval rows", d, len(train), len(evl))
    return DatasetInfo(str(d), str(d / "train.jsonl"), str(d / "eval.jsonl"), len(train), len(evl), h, cached=False)


def _iter_train_rows(cfg: DataConfig) -> Iterator[dict[str, Any]]:
    """The validated rows of `cfg.train_file`, one at a time: `read_chat_rows_with_sources`' checks and messages."""
    if is_jsonl(cfg.train_file) and not cfg.columns:
        p = Path(cfg.train_file)
        for lineno, row in iter_json_lines(p):
            yield validate_row(row, str(p), lineno, False)
        return
    from tasks.data_io import chat_validator, iter_validated, load_rows, resolve_source

    src = resolve_source(cfg.train_file)
    yield from iter_validated(load_rows(src, cfg.columns), src, chat_validator())


def _prepare_streamed(cfg: DataConfig, d: Path, h: str) -> DatasetInfo:
    """`prepare_dataset` of a user training file without replay, row by row: the same train.jsonl / eval.jsonl
    and errors, with memory flat in the row count. Two passes over the file: the first validates every row
    and checks leaks before anything is written (as the list path does), the second writes the entry."""
    if not cfg.eval_file:
        raise DataValidationError("data.train_file is set but data.eval_file is not: give a held-out eval set")
    el = read_chat_rows_with_sources(cfg.eval_file, need_answer=True, columns=cfg.columns)
    evl = _with_ids([r for _, r in el])
    eval_of: dict[Any, list[int]] = {}
    for j, r in enumerate(evl):
        eval_of.setdefault(r["id"], []).append(j)
    leaked: set[int] = set()
    n = 0
    for row in _iter_train_rows(cfg):
        leaked.update(eval_of.get(_with_ids([row])[0]["id"], ()))
        n += 1
    if not n:
        raise DataValidationError(f"{cfg.train_file}: no rows")
    if leaked:
        raise DataValidationError(f"{len(leaked)} eval rows also appear in the training set (e.g. id "
                                  f"{evl[min(leaked)]['id']})")

    def write_train(p: Path) -> None:
        with open(p, "w", encoding="utf-8") as fh:
            for row in _iter_train_rows(cfg):
                fh.write(json.dumps(_with_ids([row])[0], sort_keys=True, ensure_ascii=False) + "\n")

    write_checkpoint(d, {"train.jsonl": write_train, "eval.jsonl": _write_jsonl(evl)},
                     {"n_train": n, "n_eval": len(evl), "config": asdict(cfg)})
    log.info("prepared dataset %s: %d train / %d eval rows (streamed)", d, n, len(evl))
    return DatasetInfo(str(d), str(d / "train.jsonl"), str(d / "eval.jsonl"), n, len(evl), h, cached=False)
