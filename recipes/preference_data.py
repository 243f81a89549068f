"""Preference data for DPO: loading, validation, tokenization, a content-addressed cache, quality stats.

Rows, either shape:
    {"prompt": [messages], "chosen": [assistant message], "rejected": [assistant message]}
    {"prompt": "text", "chosen": "text", "rejected": "text"}       (= one user turn, one assistant reply)
from any source `tasks.data_io.load_rows` reads: JSONL (read line by line, exactly as before), JSON,
Parquet, CSV (a cell may hold the messages as a JSON string), an Arrow dir, a dataset dir, a hub id, s3://.
Other column names map with `data.columns.prompt=question` (also `chosen`, `rejected`, `id`); ShareGPT
`from`/`value` turns are converted.

Features:
- every row is validated before anything is written; an error names the file, the line (JSONL) or the
  0-based row index (columnar: `file row i`) and the field (`tasks.prepare_data.DataValidationError`, a
  `BadInputError`: exit code 2 through the CLI); chosen == rejected is an error; UTF-8 with a BOM and CRLF
  line endings are fine;
- a pair becomes `prompt_ids`, `chosen_ids`, `rejected_ids` (TRL's layout): the completion is the assistant's
  loss-weighted tokens under the renderer (content + end of turn), the prompt what precedes them;
- over-long pairs (prompt + reply > max_length) are refused, or with `truncate` cut at max_length (keep the
  start, as TRL does) and counted;
- the tokenized set is cached under `<cache_root>/preferences/<hash>`, the hash covering the file contents (or
  the generator config), the tokenizer (vocab, merges, chat template), the renderer and the length policy; the
  entry is a manifest-verified directory (`training_core.checkpoint`), recomputed if tampered with;
- reference logprobs of a starting model are cached inside the same entry (`ref-<model key>/`), so they are
  computed once per (dataset, starting model) and a resumed run reads the ones its first attempt used;
- data-quality stats: token lengths, identical pairs after tokenization, duplicates, truncation, and
  contamination of training prompts against eval prompts (exact match is an error, word n-gram overlap a count).

Trade-off: a chosen / rejected side is exactly one assistant message (multi-message completions would need a
per-renderer split of the prompt); the string shape is read as a single user turn.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from recipes.dpo_config import PrefDataConfig
from tasks.prepare_data import ROLES, DataValidationError, iter_json_lines
from training_core.checkpoint import CheckpointError, verify_checkpoint, write_checkpoint

log = logging.getLogger(__name__)
CACHE_VERSION = "1"


@dataclass
class PreferencePair:
    id: str
    source: str  # "file:line" or "generated train row N": where a problem can be fixed
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    truncated: bool = False
    prompt_text: str = ""


@dataclass
class PreferenceDataset:
    dir: str
    hash: str
    train: list[PreferencePair]
    eval: list[PreferencePair]
    stats: dict[str, Any] = field(default_factory=dict)
    cached: bool = False


# ---------------------------------------------------------------- reading + validation


def _messages(value: Any, fld: str, err: Any, prompt: bool) -> list[dict[str, str]]:
    if isinstance(value, str):
        if not value.strip():
            raise err(fld, "empty string")
        return [{"role": "user" if prompt else "assistant", "content": value}]
    if not isinstance(value, list) or not value:
        raise err(fld, "missing, or not a string / non-empty list of {role, content} messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise err(f"{fld}[{i}]", "not an object")
        if m.get("role") not in ROLES:
            raise err(f"{fld}[{i}].role", f"{m.get('role')!r} is not one of {list(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise err(f"{fld}[{i}].content", "missing or not a string")
        out.append({"role": m["role"], "content": m["content"]})
    if prompt and out[-1]["role"] == "assistant":
        raise err(f"{fld}[{len(out) - 1}].role", "the prompt must not end with the assistant's turn")
    if not prompt:
        if len(out) != 1 or out[0]["role"] != "assistant":
            raise err(fld, "must be exactly one assistant message (the completion)")
        if not out[0]["content"].strip():
            raise err(f"{fld}[0].content", "the completion is empty")
    return out


def validate_pair_row(row: Any, path: str, line: int) -> dict[str, Any]:
    """The row normalised to messages; DataValidationError naming `path:line` and the field otherwise."""
    return validate_pair(row, f"{path}:{line}")


def validate_pair(row: Any, where: str) -> dict[str, Any]:
    """The row normalised to messages; DataValidationError starting with `where` and naming the field."""
    def err(fld: str, msg: str) -> DataValidationError:
        return DataValidationError(f"{where}: field '{fld}': {msg}")

    if not isinstance(row, dict):
        raise err("<row>", f"expected a JSON object, got {type(row).__name__}")
    for k in ("prompt", "chosen", "rejected"):
        if k not in row:
            raise err(k, "missing (a preference row needs prompt, chosen and rejected)")
    out = {"prompt": _messages(row["prompt"], "prompt", err, True),
           "chosen": _messages(row["chosen"], "chosen", err, False),
           "rejected": _messages(row["rejected"], "rejected", err, False)}
    if out["chosen"][0]["content"] == out["rejected"][0]["content"]:
        raise err("rejected", "identical to 'chosen': a pair must differ (no preference to learn)")
    if "id" in row:
        out["id"] = str(row["id"])
    return out


def read_preference_jsonl(path: str | Path, columns: dict[str, str] | None = None,
                          cache_dir: str | Path | None = None) -> list[tuple[int, dict[str, Any]]]:
    """(line number for JSONL, else 0-based row index; normalised row) of every row of any format, all
    validated before returning (the name stays for its callers)."""
    return [(n, row) for _, n, row in _read(path, columns, cache_dir)]


def read_preferences(spec: str | Path, columns: dict[str, str] | None = None,
                     cache_dir: str | Path | None = None) -> list[tuple[str, dict[str, Any]]]:
    """(where, normalised row): `file:line` (JSONL) or `file row i` (columnar) names each pair's place."""
    return [(where, row) for where, _, row in _read(spec, columns, cache_dir)]


def _map_columns(row: Any, columns: dict[str, str] | None) -> Any:
    if isinstance(row, dict):
        for ours, theirs in (columns or {}).items():
            if theirs in row and theirs != ours:
                row[ours] = row.pop(theirs)
    return row


def _read(spec: str | Path, columns: dict[str, str] | None, cache_dir: str | Path | None
          ) -> list[tuple[str, int, dict[str, Any]]]:
    from tasks.data_io import iter_validated, load_rows, normalize_turns, resolve_source

    src = resolve_source(str(spec), cache_dir)
    rows = []
    if src.kind == "jsonl":  # the exact line reader: lines as the user's editor shows them
        p = Path(src.path)
        name = str(spec) if src.spec.startswith("s3://") else str(p)
        for lineno, row in iter_json_lines(p, name):
            rows.append((f"{name}:{lineno}", lineno, validate_pair(_map_columns(row, columns), f"{name}:{lineno}")))
        if not rows:
            raise DataValidationError(f"{name}: no rows")
        return rows
    csv = src.kind == "csv"

    def check(row: dict[str, Any], where: str) -> dict[str, Any]:
        for k in ("prompt", "chosen", "rejected"):  # Arrow nulls dropped, ShareGPT turns, CSV's JSON cells
            v = row.get(k)
            if isinstance(v, list) or (csv and isinstance(v, str)):
                row[k] = normalize_turns(v)
        return validate_pair(row, where)

    ds = load_rows(src, columns, cache_dir=cache_dir, normalize=False)
    for i, row in enumerate(iter_validated(ds, src, check)):
        rows.append((src.where(i), i, row))
    return rows


def _row_id(row: dict[str, Any]) -> str:
    blob = json.dumps([row["prompt"], row["chosen"], row["rejected"]], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_rows(cfg: PrefDataConfig, cache_dir: str | Path | None = None
               ) -> tuple[list[tuple[str, dict[str, Any]]], list[tuple[str, dict[str, Any]]]]:
    """(source, row) lists of train and eval, validated."""
    if cfg.train_file:
        if not cfg.eval_file:
            raise DataValidationError("data.train_file is set but data.eval_file is not: give held-out pairs")
        return (read_preferences(cfg.train_file, cfg.columns, cache_dir),
                read_preferences(cfg.eval_file, cfg.columns, cache_dir))
    from data.preferences import preference_rows

    kw = dict(cfg.task_kwargs)
    tr_rows = preference_rows(cfg.n_train, cfg.seed, "train", **kw)
    ev_rows = preference_rows(cfg.n_eval, cfg.seed, "eval", **kw)
    return ([(f"generated train row {i + 1}", validate_pair_row(r, "generated train", i + 1))
             for i, r in enumerate(tr_rows)],
            [(f"generated eval row {i + 1}", validate_pair_row(r, "generated eval", i + 1))
             for i, r in enumerate(ev_rows)])


# ---------------------------------------------------------------- tokenization


def _split_completion(tokens: list[int], weights: list[float]) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids): the completion spans the loss-weighted tokens of the last assistant turn."""
    idx = [i for i, w in enumerate(weights) if w > 0]
    return tokens[: idx[0]], tokens[idx[0]: idx[-1] + 1]


def tokenize_pair(row: dict[str, Any], renderer: Any, source: str, max_length: int,
                  truncate: bool) -> PreferencePair:
    from training_core.renderers import TrainOnWhat

    sides = {}
    for k in ("chosen", "rejected"):
        toks, w = renderer.build_supervised_example(row["prompt"] + row[k], TrainOnWhat.LAST_ASSISTANT_MESSAGE)
        sides[k] = _split_completion(toks, w)
    (p_c, chosen), (p_r, rejected) = sides["chosen"], sides["rejected"]
    if p_c != p_r:  # a renderer whose prompt rendering depends on the reply: there is no shared prompt
        raise DataValidationError(f"{source}: field 'prompt': renders differently before chosen and rejected")
    truncated = False
    for k, comp in (("chosen", chosen), ("rejected", rejected)):
        n = len(p_c) + len(comp)
        if n > max_length:
            if not truncate:
                raise DataValidationError(f"{source}: field '{k}': prompt + {k} is {n} tokens, over "
                                          f"data.max_length={max_length} (raise it, or set data.truncate=true)")
            truncated = True
    if truncated:
        keep = max_length - len(p_c)
        if keep < 1:
            raise DataValidationError(f"{source}: field 'prompt': the prompt alone is {len(p_c)} tokens, "
                                      f"data.max_length={max_length} leaves no completion token")
        chosen, rejected = chosen[:keep], rejected[:keep]
        if chosen == rejected:
            raise DataValidationError(f"{source}: field 'rejected': identical to 'chosen' after truncation to "
                                      f"data.max_length={max_length}")
    text = "\n".join(m["content"] for m in row["prompt"])
    return PreferencePair(row.get("id") or _row_id(row), source, p_c, chosen, rejected, truncated, text)


# ---------------------------------------------------------------- cache + stats


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Vocab + merges + special tokens + chat template: what decides the token ids of a rendered pair."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else json.dumps(tokenizer.get_vocab(),
                                                                               sort_keys=True).encode())
    h.update(str(getattr(tokenizer, "chat_template", "") or "").encode())
    return h.hexdigest()[:16]


def _file_hash(spec: str, cache_dir: str | Path | None = None) -> str:
    """A file's content hash (streamed); a directory / hub / s3 prefix: its loaded dataset's fingerprint."""
    if not spec:
        return ""
    from tasks.data_io import load_rows, resolve_source, source_fingerprint

    src = resolve_source(spec, cache_dir)
    if src.path and Path(src.path).is_file():
        return source_fingerprint(src)
    return source_fingerprint(src, load_rows(src, cache_dir=cache_dir, normalize=False))


def dataset_hash(cfg: PrefDataConfig, tokenizer: Any, cache_dir: str | Path | None = None) -> str:
    key = {"v": CACHE_VERSION, "cfg": asdict(cfg), "train": _file_hash(cfg.train_file, cache_dir),
           "eval": _file_hash(cfg.eval_file, cache_dir), "tok": tokenizer_fingerprint(tokenizer)}
    if not cfg.columns:  # keys of entries written before column mapping existed stay valid
        key["cfg"].pop("columns")
    if cfg.train_file:  # the generator's knobs do not matter for user files
        for k in ("task", "task_kwargs", "n_train", "n_eval", "seed"):
            key["cfg"].pop(k)
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


_WORD = re.compile(r"\w+")


def contamination(train_texts: Sequence[str], eval_texts: Sequence[str], n: int = 8) -> list[tuple[int, int]]:
    """(eval index, train index) of eval texts sharing a word n-gram (or their whole text, if shorter)."""
    index: dict[tuple[str, ...], int] = {}
    for i, t in enumerate(train_texts):
        w = _WORD.findall(t.lower())
        k = min(n, len(w))
        for s in range(0, len(w) - k + 1):
            index.setdefault(tuple(w[s:s + k]), i)
    out = []
    for j, t in enumerate(eval_texts):
        w = _WORD.findall(t.lower())
        k = min(n, len(w))
        for s in range(0, len(w) - k + 1):
            hit = index.get(tuple(w[s:s + k]))
            if hit is not None:
                out.append((j, hit))
                break
    return out


def _lens(xs: list[int]) -> dict[str, float]:
    return {"min": min(xs), "mean": round(sum(xs) / len(xs), 2), "max": max(xs)} if xs else {}


def quality_stats(train: list[PreferencePair], evl: list[PreferencePair],
                  eval_prompts: Sequence[str] = ()) -> dict[str, Any]:
    """Lengths, identical pairs (same tokens), duplicates, truncation, contamination vs eval prompts."""
    ident = [p.source for p in train if p.chosen_ids == p.rejected_ids]
    seen: dict[tuple[Any, ...], str] = {}
    dups = []
    for p in train:
        key = (tuple(p.prompt_ids), tuple(p.chosen_ids), tuple(p.rejected_ids))
        if key in seen:
            dups.append(f"{p.source} (= {seen[key]})")
        seen.setdefault(key, p.source)
    targets = [p.prompt_text for p in evl] + list(eval_prompts)
    hits = contamination([p.prompt_text for p in train], targets)
    return {
        "n_train": len(train), "n_eval": len(evl),
        "prompt_tokens": _lens([len(p.prompt_ids) for p in train]),
        "chosen_tokens": _lens([len(p.chosen_ids) for p in train]),
        "rejected_tokens": _lens([len(p.rejected_ids) for p in train]),
        "identical_pairs": len(ident), "identical_examples": ident[:10],
        "duplicates": len(dups), "duplicate_examples": dups[:10],
        "truncated": sum(p.truncated for p in train), "truncated_eval": sum(p.truncated for p in evl),
        "contaminated_eval_prompts": len({j for j, _ in hits}), "eval_prompts_checked": len(targets),
        "contamination_examples": [f"eval prompt {targets[j]!r} ~ {train[i].source}" for j, i in hits[:10]],
    }


def _pairs_writer(pairs: list[PreferencePair]) -> Any:
    def write(p: Path) -> None:
        p.write_text("".join(json.dumps(asdict(x), ensure_ascii=False) + "\n" for x in pairs))
    return write


def _read_pairs(p: Path) -> list[PreferencePair]:
    return [PreferencePair(**json.loads(x)) for x in p.read_text().splitlines() if x.strip()]


def prepare_preferences(cfg: PrefDataConfig, tokenizer: Any, cache_root: str | Path,
                        eval_prompts: Sequence[str] = ()) -> PreferenceDataset:
    """Validated, tokenized train / eval pairs, from the cache when an intact entry exists.

    `eval_prompts`: prompts of other eval sets (e.g. the behaviour benchmark) checked for contamination.
    A training prompt equal to a held-out pair's prompt is an error; nothing is written on any error.
    """
    from training_core.renderers import get_renderer

    hf_cache = Path(cache_root) / "hf"  # datasets' conversions of Parquet/CSV/... and s3 downloads
    h = dataset_hash(cfg, tokenizer, hf_cache)
    d = Path(cache_root) / "preferences" / h
    if d.exists():
        try:
            m = verify_checkpoint(d)
            log.info("preference cache hit %s", d)
            stats = m["metadata"]["stats"]
            if eval_prompts:  # other eval sets may change between runs: their check is never cached
                stats = quality_stats(_read_pairs(d / "train.jsonl"), _read_pairs(d / "eval.jsonl"), eval_prompts)
            return PreferenceDataset(str(d), h, _read_pairs(d / "train.jsonl"), _read_pairs(d / "eval.jsonl"),
                                     stats, cached=True)
        except (CheckpointError, KeyError, TypeError, json.JSONDecodeError) as e:
            log.warning("preference cache entry %s is not usable (%s); recomputing", d, e)
            shutil.rmtree(d)
    tr_rows, ev_rows = build_rows(cfg, hf_cache)
    renderer = get_renderer(cfg.renderer, tokenizer)
    train = [tokenize_pair(r, renderer, s, cfg.max_length, cfg.truncate) for s, r in tr_rows]
    evl = [tokenize_pair(r, renderer, s, cfg.max_length, cfg.truncate) for s, r in ev_rows]
    train_prompts: dict[tuple[int, ...], str] = {}
    for p in train:
        train_prompts.setdefault(tuple(p.prompt_ids), p.source)  # the first occurrence names the place
    leaked = [(p.source, train_prompts[tuple(p.prompt_ids)]) for p in evl if tuple(p.prompt_ids) in train_prompts]
    if leaked:
        raise DataValidationError(f"{len(leaked)} held-out pairs have a training prompt (e.g. {leaked[0][0]} = "
                                  f"{leaked[0][1]}): the held-out accuracy would be contaminated")
    stats = quality_stats(train, evl, eval_prompts)
    write_checkpoint(d, {"train.jsonl": _pairs_writer(train), "eval.jsonl": _pairs_writer(evl)},
                     {"stats": quality_stats(train, evl), "config": asdict(cfg)})
    log.info("prepared preference data %s: %d train / %d eval pairs", d, len(train), len(evl))
    return PreferenceDataset(str(d), h, train, evl, stats, cached=False)


# ---------------------------------------------------------------- reference logprobs cache


def ref_dir(ds: PreferenceDataset, model_key: str) -> Path:
    return Path(ds.dir) / f"ref-{model_key}"


def load_ref_logprobs(ds: PreferenceDataset, model_key: str) -> dict[str, list[list[float]]] | None:
    """{"train": [[chosen, rejected], ...], "eval": [...]} summed completion logprobs, or None if not cached."""
    d = ref_dir(ds, model_key)
    if not d.exists():
        return None
    try:
        verify_checkpoint(d)
        return json.loads((d / "ref.json").read_text())
    except (CheckpointError, json.JSONDecodeError) as e:
        log.warning("reference logprobs %s not usable (%s); recomputing", d, e)
        shutil.rmtree(d)
        return None


def save_ref_logprobs(ds: PreferenceDataset, model_key: str, ref: dict[str, list[list[float]]],
                      meta: dict[str, Any]) -> None:
    d = ref_dir(ds, model_key)
    try:
        write_checkpoint(d, {"ref.json": lambda p: p.write_text(json.dumps(ref))}, meta)
    except CheckpointError:  # another process committed the same values first: keep theirs
        pass
